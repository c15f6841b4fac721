"""Table 1 as written, trained to convergence: DIRNet, AiR-single and AiR-MAPT until the
validation MSE plateaus, then scored on the fixed test pairs of the 5-minute tables.

    python experiments/converge.py --datasets mnist --models mapt   # one run, then --reuse
    python experiments/converge.py                       # paper settings, both datasets, CPU
    python experiments/converge.py --variant both --accelerator gpu   # + the authors' code's
    python experiments/converge.py --variant both --score-only   # score runs made apart
    python experiments/converge.py --datasets mnist --resume --max-steps 40000  # go on

Plateau rule (``plateaued``): at every validation (every ``--val-every`` steps), once at
least ``--min-steps`` steps are done, stop when the best validation MSE so far is less than
``--min-delta`` (relative) below the best one at or before step (1 - ``--patience-fraction``)
x the current step. ``--max-steps`` and ``--max-time`` (per run) cap it; ``--resume`` goes
on with runs a cap stopped, from their last.ckpt, and the caps then count the whole run.
Variants: ``paper`` = ``experiment=paper_*`` (28x28); ``authors`` = ``experiment=authors_air|
authors_mapt`` and DIRNet at 64x64 (the authors' code's setting). Every row is scored at 28x28
on the same pairs (a 64x64 model sees them upsampled; its flow is brought back to 28x28);
the authors' models are also scored at 64x64 beside Original at 64x64. Writes to
experiments/results/converged/ (README.md there describes each file).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from omegaconf import open_dict
from reproduce import REPO, load_test_batches, write_tables

import air_reg
from air_reg.classical import demons, has_simpleitk
from air_reg.config import compose_config
from air_reg.scoring import identity_method, score, summarise
from air_reg.images import resize
from air_reg.train import train
from air_reg.utils import write_json, write_text

log = logging.getLogger("converge")
DATASETS = ("mnist", "fashion")
NAMES = {"dirnet": "DIRNet", "air": "AiR-single", "mapt": "AiR-MAPT"}
# DIRNet as the authors' CNN: 64x64 in, an 8x8 control grid (spacing 8), bicubic to dense.
AUTHORS_DIRNET = ["data.image_size=64", "model.net.num_pools=3", "model.net.interpolation=bicubic"]
VARIANTS = {  # variant -> model -> (experiment config, extra overrides)
    "paper": {m: (f"paper_{m}", []) for m in NAMES},
    "authors": {
        "dirnet": ("paper_dirnet", AUTHORS_DIRNET),
        "air": ("authors_air", []),
        "mapt": ("authors_mapt", []),
    },
}
SCORE_SIZE = 28  # every table row is scored at the data's own size
COLUMNS = ("mse", "psnr", "smooth_dice", "dice", "folding", "sdlogj")
TABLE_HEAD = (
    "| method | MSE | vs Original | PSNR | smooth Dice | Dice | folding % | SDlogJ | ms/pair "
    "| steps | wall min | stopped by | note |"
)


def plateaued(steps, values, *, fraction=0.25, min_delta=0.01, min_steps=0) -> bool:
    """True when the best of ``values`` improved by less than ``min_delta`` (relative) over
    the last ``fraction`` of the run and ``steps[-1] >= min_steps`` (non-finite: skipped)."""
    pts = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if not pts or steps[-1] < min_steps:
        return False
    cutoff = (1 - fraction) * steps[-1]
    before = [v for s, v in pts if s <= cutoff]
    if not before:
        return False  # nothing to compare with yet
    best_before, best_now = min(before), min(v for _, v in pts)
    return best_before - best_now < min_delta * best_before


class PlateauStopping(L.Callback):
    """Records (step, wall s, ``monitor``) at every validation to ``<run>/curve.csv`` and
    stops training when ``plateaued``; on fit end writes ``<run>/stop.json`` (why it stopped:
    plateau, max_steps, max_time or other; the best checkpoint)."""

    def __init__(
        self,
        *,
        folder,
        monitor="val/mse",
        fraction=0.25,
        min_delta=0.01,
        min_steps=0,
        resume_step=None,
        resume_wall_s=0.0,
    ):
        self.folder, self.monitor = Path(folder), monitor
        self.rule = {"fraction": fraction, "min_delta": min_delta, "min_steps": min_steps}
        self.rows: list[tuple[int, float, float]] = []
        self.start, self.stopped, self.offset = None, False, 0.0
        if resume_step is not None:  # a resumed run: its curve so far, its clock goes on
            self.rows = [r for r in read_curve(self.folder) if r[0] <= resume_step]
            self.offset = resume_wall_s

    def on_train_start(self, trainer, pl_module):
        self.start = time.monotonic() - self.offset

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        self.rows.append((trainer.global_step, time.monotonic() - self.start, value))
        steps, _, values = zip(*self.rows, strict=True)
        if plateaued(steps, values, **self.rule):
            self.stopped = trainer.should_stop = True
        stop = ": plateau, stopping" if self.stopped else ""
        log.info(
            "step %d %s %.5f (best %.5f)%s", steps[-1], self.monitor, value, min(values), stop
        )
        if trainer.is_global_zero:
            lines = ["step,wall_s,val_mse"] + [f"{s},{w:.2f},{v:.6g}" for s, w, v in self.rows]
            write_text(self.folder / "curve.csv", "\n".join(lines) + "\n")

    def on_fit_end(self, trainer, pl_module):
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if self.stopped:
            reason = "plateau"
        elif trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            reason = "max_steps"
        elif timer is not None and (timer.time_remaining() or 0) <= 0:
            reason = "max_time"
        else:
            reason = "other"
        best = min(self.rows, key=lambda r: r[2]) if self.rows else (0, 0.0, math.nan)
        ckpt = trainer.checkpoint_callback
        info = {
            "reason": reason,
            "steps": trainer.global_step,
            "wall_s": time.monotonic() - self.start if self.start else 0.0,
            "best_step": best[0],
            "best_val_mse": best[2],
            "best_ckpt": ckpt.best_model_path if ckpt else "",
            "rule": self.rule,
        }
        if trainer.is_global_zero:
            write_json(self.folder / "stop.json", info)


def train_run(
    variant: str, model: str, data: str, args, run: Path, earlier: dict | None = None
) -> dict:
    """Train one configuration until the plateau rule or a cap stops it; its stop record.
    ``earlier``: the stop record of the run in ``run``, to go on from its last.ckpt (steps,
    optimiser, clock and curve kept), so the caps count the whole run."""
    experiment, extra = VARIANTS[variant][model]
    plateau_resume = {}
    if earlier is not None:
        ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
        plateau_resume = {
            "resume_step": ckpt["global_step"],
            "resume_wall_s": ckpt["callbacks"]["Timer"]["time_elapsed"]["train"],
        }
        extra = [*extra, f"ckpt_path={run / 'checkpoints/last.ckpt'}"]
        log_csv = run / "csv/metrics.csv"  # Lightning's CSV logger starts it afresh: keep it
        if log_csv.exists():
            log_csv.rename(log_csv.with_name(f"metrics_to_step_{ckpt['global_step']}.csv"))
        log.info("resuming %s at step %d", run, ckpt["global_step"])
    cfg = compose_config(
        "train",
        [
            f"experiment={experiment}",
            f"data={data}",
            "data.pairing=same_class",  # as reproduce.py trains by default
            f"data.num_val_pairs={args.val_pairs}",
            *extra,
            "callbacks.image_grid=null",
            f"trainer.max_time={args.max_time}",
            "trainer.max_epochs=-1",
            "trainer.enable_progress_bar=false",
            "test=false",
        ],
        run,
    )
    with open_dict(cfg):
        cfg.data.pairs_per_epoch = cfg.data.batch_size * args.val_every  # 1 epoch = 1 validation
        cfg.trainer.max_steps = args.max_steps  # not in trainer/default.yaml
        cfg.trainer.accelerator = args.accelerator
        cfg.callbacks.plateau = {
            "_target_": f"{__name__}.PlateauStopping",
            "folder": str(run),
            "fraction": args.patience_fraction,
            "min_delta": args.min_delta,
            "min_steps": args.min_steps,
            **plateau_resume,
        }
    train(cfg)
    info = json.loads((run / "stop.json").read_text())
    # the caps and threads this run had (split runs may differ from the scoring call's)
    info |= {
        "max_steps": args.max_steps,
        "max_time": args.max_time,
        "threads": torch.get_num_threads(),
    }
    if earlier is not None:  # the legs before: where each stopped, its caps, where next began
        leg = {k: earlier.get(k) for k in ("steps", "reason", "max_steps", "max_time", "threads")}
        leg["resumed_at"] = plateau_resume["resume_step"]
        info["earlier_legs"] = [*earlier.get("earlier_legs", []), leg]
    write_json(run / "stop.json", info)
    return info


def read_curve(run: Path) -> list[tuple[int, float, float]]:
    with open(run / "curve.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(int(r["step"]), float(r["wall_s"]), float(r["val_mse"])) for r in rows]


def downsample_flow(flow: torch.Tensor, size) -> torch.Tensor:
    """(B, 2, h, w) flow in pixels of its grid -> (B, 2, H, W) in pixels of the ``size`` grid."""
    h, w = flow.shape[-2:]
    out = F.interpolate(flow, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out * torch.tensor([size[0] / h, size[1] / w], dtype=flow.dtype).view(1, 2, 1, 1)


def at_size(model, size: int):
    """A method on the data's own images for a model trained at ``size``: the pair upsampled
    as the data module does (air_reg.images.resize), the flow brought back to the images' grid."""

    def method(fixed, moving):
        flow = model(resize(fixed, size), resize(moving, size))
        return downsample_flow(flow, tuple(fixed.shape[-2:]))

    return method


def markdown_rows(summary: dict, ms: dict, runs: dict, folding_note: float) -> str:
    """One row per method (mean ± std over pairs), MSE change vs Original, the run's length
    and a note where folding exceeds ``folding_note`` % or the run did not plateau."""
    lines = [TABLE_HEAD, "|---" * TABLE_HEAD.count(" | ") + "|---|"]
    original = summary["Original"]["mse"]["mean"]
    for name, s in summary.items():
        cells = [f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}" if k in s else "" for k in COLUMNS]
        run, notes = runs.get(name), []
        if "folding" in s and s["folding"]["mean"] > folding_note:
            notes.append(f"folding > {folding_note:g} %")
        if run and run["reason"] != "plateau":
            notes.append(f"no plateau ({run['reason']})")
        length = [str(run["steps"]), f"{run['wall_s'] / 60:.1f}", run["reason"]] if run else []
        rel = f"{100 * (s['mse']['mean'] / original - 1):+.1f} %"
        row = [name, cells[0], rel, *cells[1:], f"{ms[name]:.3f}", *(length or [""] * 3)]
        lines.append("| " + " | ".join([*row, "; ".join(notes)]) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, curves: dict, data: str) -> None:
    """Validation MSE vs steps and vs wall time, one row per variant, all models on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({v for v, _ in curves}, key=list(VARIANTS).index)
    fig, axes = plt.subplots(len(variants), 2, figsize=(10, 3.6 * len(variants)), squeeze=False)
    for row, variant in zip(axes, variants, strict=True):
        for (v, name), rows in curves.items():
            if v == variant and rows:
                steps, wall, mse = zip(*rows, strict=True)
                row[0].plot(steps, mse, marker=".", label=name)
                row[1].plot([w / 60 for w in wall], mse, marker=".", label=name)
        size = "64x64, upsampled" if variant == "authors" else "28x28"
        for ax, xlabel in zip(row, ("training steps", "wall minutes"), strict=True):
            ax.set(
                xlabel=xlabel, ylabel=f"val MSE ({size})", yscale="log", title=f"{data}, {variant}"
            )
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_all(data: str, variants: list[str], args, out: Path) -> dict[str, dict]:
    """Train (or with ``--reuse`` keep; with ``--score-only`` only keep) every run of
    ``data``; ``{row name: run record}``
    with the loaded best network under "net" and its validation curve under "curve"."""
    runs = {}
    for variant in variants:
        for model in args.models:
            name = NAMES[model] + (" authors-64" if variant == "authors" else "")
            run = out / "runs" / data / f"{variant}_{model}"
            stop = run / "stop.json"
            earlier = json.loads(stop.read_text()) if stop.exists() else None
            if args.score_only and earlier is None:
                log.warning("--score-only: no finished run in %s, no %s row", run, name)
                continue
            if args.resume and earlier and (run / "checkpoints/last.ckpt").exists():
                if earlier["reason"] != "plateau":
                    train_run(variant, model, data, args, run, earlier)
            elif not (args.reuse and earlier):
                shutil.rmtree(run, ignore_errors=True)
                train_run(variant, model, data, args, run)
            info = json.loads((run / "stop.json").read_text())
            ckpt = run / "checkpoints" / (Path(info["best_ckpt"]).name or "last.ckpt")  # movable
            runs[name] = info | {
                "variant": variant,
                "curve": read_curve(run),
                "net": air_reg.load_model(ckpt),
            }
    return runs


def score_dataset(data: str, runs: dict, args, out: Path, use_demons: bool) -> list[str]:
    """Tables of ``data``'s test pairs: every row at 28x28; the 64x64 models also at 64x64."""
    batches = load_test_batches(data, "same_class", args.test_pairs)
    methods = {"Original": identity_method, **({"Demons": demons} if use_demons else {})}
    native = {n: r["net"] for n, r in runs.items() if r["net"].image_size[0] != SCORE_SIZE}
    for name, r in runs.items():
        size = r["net"].image_size[0]
        methods[name] = r["net"] if size == SCORE_SIZE else at_size(r["net"], size)
    sections = [(data, batches, methods, "28x28: every row on the same images")]
    if native:  # beside the identity at that size
        size = next(iter(native.values())).image_size
        up = [{k: resize(b[k], size) for k in ("fixed", "moving")} for b in batches]
        what = f"{size[0]}x{size[1]} (upsampled pairs): the authors' models at their own size"
        sections.append((f"{data}_{size[0]}", up, {"Original": identity_method, **native}, what))
    report = []
    for tag, bs, scored, what in sections:
        per_pair, ms = score(scored, bs)
        write_tables(out, tag, per_pair, ms)  # the long CSV and per-pair CSV; .md replaced:
        table = markdown_rows(summarise(per_pair), ms, runs, args.folding_note)
        write_text(out / f"table_{tag}.md", table)
        report += [f"\n## {data}, {what}\n\n", table]
    return report


def write_curves(out: Path, data: str, runs: dict) -> str:
    """curves_<data>.csv and .png; the runs' lengths as a markdown table."""
    curves = {(r["variant"], name): r["curve"] for name, r in runs.items()}
    with open(out / f"curves_{data}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "method", "step", "wall_s", "val_mse"])
        for (variant, name), rows in curves.items():
            writer.writerows([variant, name, *r] for r in rows)
    plot_curves(out / f"curves_{data}.png", curves, data)
    lines = [
        f"\n### {data}: runs\n\n| method | steps | wall min | steps/s | best val MSE (at step) "
        "| stopped by | caps (steps, DD:HH:MM:SS) | torch threads |\n"
        "|---|---|---|---|---|---|---|---|\n"
    ]
    for name, r in runs.items():
        rate = r["steps"] / max(r["wall_s"], 1e-9)
        caps = f"{r['max_steps']}, {r['max_time']}" if "max_time" in r else ""
        lines.append(
            f"| {name} | {r['steps']} | {r['wall_s'] / 60:.1f} | {rate:.2f} | "
            f"{r['best_val_mse']:.5f} ({r['best_step']}) | {r['reason']} | {caps} | "
            f"{r.get('threads', '')} |\n"
        )
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="paper")
    parser.add_argument("--max-steps", type=int, default=40000, help="cap per run")
    parser.add_argument("--max-time", default="00:02:00:00", help="cap per run, DD:HH:MM:SS")
    parser.add_argument("--min-steps", type=int, default=3000, help="no plateau stop before")
    parser.add_argument("--val-every", type=int, default=250, help="steps between validations")
    parser.add_argument("--patience-fraction", type=float, default=0.25)
    parser.add_argument("--min-delta", type=float, default=0.01, help="relative improvement")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--test-pairs", type=int, default=1000)
    parser.add_argument("--val-pairs", type=int, default=1000)
    parser.add_argument("--folding-note", type=float, default=1.0, help="note rows above this %%")
    parser.add_argument("--no-demons", action="store_true", help="skip the SimpleITK row")
    parser.add_argument("--reuse", action="store_true", help="keep runs that have a stop.json")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with runs that stopped at a cap, from their last.ckpt, under these caps "
        "(counted over the whole run); runs that plateaued are kept",
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="train nothing: score the runs that have a stop.json (after split runs)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/converged")
    args = parser.parse_args()
    args.max_steps = -(-args.max_steps // args.val_every) * args.val_every  # ends on a validation
    if args.resume and args.score_only:
        parser.error("--resume trains and --score-only does not: choose one")
    args.reuse = args.reuse or args.score_only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    use_demons = has_simpleitk() and not args.no_demons
    if not use_demons:
        log.warning("no Demons row (SimpleITK missing or --no-demons)")
    rule = (
        f"validation every {args.val_every} steps; stop at the first validation at step s >= "
        f"{args.min_steps} where the best val MSE so far is less than {100 * args.min_delta:g} % "
        f"below the best at or before step {1 - args.patience_fraction:g} s; caps "
        + (
            "per run in the runs tables (runs made apart, scored here with --score-only)"
            if args.score_only
            else f"{args.max_steps} steps and {args.max_time} (DD:HH:MM:SS) per run"
        )
    )
    report = [
        "# Table 1 trained to convergence\n\n",
        f"Command: `python experiments/converge.py {shlex.join(sys.argv[1:])}`"
        + (
            " (scores the runs made apart, e.g. by `bash experiments/converge_cpu.sh`; each "
            "run's caps and threads are in the runs tables)\n\n"
            if args.score_only
            else "\n\n"
        ),
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, accelerator {args.accelerator}; load average at start "
        f"{os.getloadavg()[0]:.1f}. Trained on same-class pairs; {args.test_pairs} same-class "
        f"test pairs (reproduce.py's, same seeds).\n\nPlateau rule: {rule}.\n",
    ]
    started = time.time()
    for data in args.datasets:
        runs = train_all(data, variants, args, args.out)
        if not runs:
            log.warning("no runs for %s: nothing to score", data)
            continue
        report += score_dataset(data, runs, args, args.out, use_demons)
        report.append(write_curves(args.out, data, runs))
    report.append(f"\nTotal wall time: {(time.time() - started) / 60:.1f} min.\n")
    write_text(args.out / "results.md", "".join(report))
    log.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()
