"""Table 1 as written, trained to convergence: each run until the validation MSE plateaus
(``callbacks=plateau``: ``air_reg.callbacks.PlateauStopping``) or a cap, then scored on the
benchmark's same-class test pairs. ``experiments/converge.py`` is its command line.

Variants: ``paper`` = ``experiment=paper_*`` (28x28); ``authors`` = ``experiment=authors_air|
authors_mapt`` and DIRNet at 64x64 (the authors' code's setting). Every row is scored at 28x28
on the same pairs (a 64x64 model sees them upsampled, its flow brought back to 28x28); the
authors' models are also scored at 64x64 beside Original at 64x64.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import air_reg
from air_reg.bench.pairs import benchmark_batches
from air_reg.bench.tables import write_tables
from air_reg.bench.training import train_for
from air_reg.callbacks import read_curve
from air_reg.classical import demons
from air_reg.config import compose_config
from air_reg.images import resize
from air_reg.scoring import identity_method, score, summarise
from air_reg.utils import write_json, write_text

log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class Caps:
    """The plateau rule, the caps per run and how the runs are trained and scored."""

    max_steps: int = 40000  # a multiple of val_every: the run ends on a validation
    max_time: str = "00:02:00:00"  # DD:HH:MM:SS
    min_steps: int = 3000
    val_every: int = 250
    patience_fraction: float = 0.25
    min_delta: float = 0.01
    accelerator: str = "cpu"
    val_pairs: int = 1000
    test_pairs: int = 1000
    folding_note: float = 1.0


def train_run(variant: str, model: str, data: str, caps: Caps, run: Path, earlier=None) -> dict:
    """Train one configuration until the plateau rule or a cap stops it; its stop record.
    ``earlier``: the stop record of the run in ``run``, to go on from its last.ckpt (steps,
    optimiser, clock and curve kept), so the caps count the whole run."""
    experiment, extra = VARIANTS[variant][model]
    resume = []
    if earlier is not None:
        last = run / "checkpoints/last.ckpt"
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        step, wall = ckpt["global_step"], ckpt["callbacks"]["Timer"]["time_elapsed"]["train"]
        resume = [
            f"callbacks.plateau.resume_step={step}",
            f"callbacks.plateau.resume_wall_s={wall}",
            f"ckpt_path={last}",
        ]
        log_csv = run / "csv/metrics.csv"  # Lightning's CSV logger starts it afresh: keep it
        if log_csv.exists():
            log_csv.rename(log_csv.with_name(f"metrics_to_step_{step}.csv"))
        log.info("resuming %s at step %d", run, step)
    base = [f"experiment={experiment}", f"data={data}", *extra]
    batch_size = compose_config("train", base, run).data.batch_size
    train_for(
        experiment,
        data,
        caps.max_time,
        run,
        [
            *extra,
            "data.pairing=same_class",  # as reproduce.py trains by default
            f"data.num_val_pairs={caps.val_pairs}",
            f"data.pairs_per_epoch={batch_size * caps.val_every}",  # 1 epoch = 1 validation
            "trainer.max_epochs=-1",
            f"++trainer.max_steps={caps.max_steps}",
            "callbacks=plateau",
            f"callbacks.plateau.fraction={caps.patience_fraction}",
            f"callbacks.plateau.min_delta={caps.min_delta}",
            f"callbacks.plateau.min_steps={caps.min_steps}",
            *resume,
        ],
        accelerator=caps.accelerator,
    )
    info = json.loads((run / "stop.json").read_text())
    # the caps and threads this run had (split runs may differ from the scoring call's)
    info |= {
        "max_steps": caps.max_steps,
        "max_time": caps.max_time,
        "threads": torch.get_num_threads(),
    }
    if earlier is not None:  # the legs before: where each stopped, its caps, where next began
        leg = {k: earlier.get(k) for k in ("steps", "reason", "max_steps", "max_time", "threads")}
        leg["resumed_at"] = step
        info["earlier_legs"] = [*earlier.get("earlier_legs", []), leg]
    write_json(run / "stop.json", info)
    return info


def train_all(
    data: str,
    variants: list[str],
    models: list[str],
    caps: Caps,
    out: Path,
    *,
    reuse: bool = False,
    resume: bool = False,
    score_only: bool = False,
) -> dict[str, dict]:
    """Train (``reuse``: keep finished runs; ``resume``: go on with capped ones; ``score_only``:
    only keep) every run of ``data``; ``{row name: stop record}`` with the loaded best network
    under "net" and its validation curve under "curve"."""
    runs = {}
    for variant in variants:
        for model in models:
            name = NAMES[model] + (" authors-64" if variant == "authors" else "")
            run = out / "runs" / data / f"{variant}_{model}"
            stop = run / "stop.json"
            earlier = json.loads(stop.read_text()) if stop.exists() else None
            if score_only and earlier is None:
                log.warning("--score-only: no finished run in %s, no %s row", run, name)
                continue
            if resume and earlier and (run / "checkpoints/last.ckpt").exists():
                if earlier["reason"] != "plateau":
                    train_run(variant, model, data, caps, run, earlier)
            elif not ((reuse or score_only) and earlier):
                shutil.rmtree(run, ignore_errors=True)
                train_run(variant, model, data, caps, run)
            info = json.loads(stop.read_text())
            ckpt = run / "checkpoints" / (Path(info["best_ckpt"]).name or "last.ckpt")  # movable
            runs[name] = info | {
                "variant": variant,
                "curve": read_curve(run),
                "net": air_reg.load_model(ckpt),
            }
    return runs


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


def score_dataset(data: str, runs: dict, caps: Caps, out: Path, use_demons: bool) -> list[str]:
    """Tables of ``data``'s test pairs: every row at 28x28; the 64x64 models also at 64x64."""
    batches = benchmark_batches(data, "same_class", caps.test_pairs)
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
        table = markdown_rows(summarise(per_pair), ms, runs, caps.folding_note)
        write_text(out / f"table_{tag}.md", table)
        report += [f"\n## {data}, {what}\n\n", table]
    return report


def plot_curves(path: Path, curves: dict, data: str) -> None:
    """Validation MSE vs steps and vs wall time, one row per variant, all models on each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = sorted({v for v, _ in curves}, key=list(VARIANTS).index)
    fig = Figure(figsize=(10, 3.6 * len(variants)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(variants), 2, squeeze=False)
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
