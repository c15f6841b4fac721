"""Reproduce the paper's Table 1 and Fig. 3 on MNIST and Fashion-MNIST from one command.

    python experiments/reproduce.py --profile quick   # minutes: smoke test
    python experiments/reproduce.py --profile full    # ~1 hour on 2 CPU cores (5 min a model)
    python experiments/reproduce.py --profile peers --methods "AiR-MAPT tuned" AiR-UNet VoxelMorph
    python experiments/reproduce.py --profile peers --methods AiR-UNet VoxelMorph --refine 50
    python experiments/reproduce.py --profile full --methods AiR-UNet VoxelMorph --seeds 1 2 3

For each dataset, trains DIRNet, AiR-single, AiR-MAPT (the paper's configurations as written),
our tuned MAPT, AiR-UNet and VoxelMorph (src/air_reg/conf/experiment/*.yaml; --methods picks)
on same-class pairs (--train-pairing) for a fixed wall-clock budget, then scores them, the
identity ("Original"), SimpleITK's diffeomorphic Demons and ANTs SyN on the same fixed test
pairs, drawn both at random and within a class, and on "known" pairs: the same-class test
moving images warped by known smooth diffeomorphisms (end-point error, as in
refine_benchmark.py). ``--refine N`` adds each learned model with N steps of the shipped
refinement preset on top. ``--seeds`` trains each method once per seed (``seed=``: the
initialisation and dropout; the training pairs and their order, the validation and the test
pairs stay as they are) and adds each metric's mean ± std over the seeds. Writes to
experiments/results/<profile>/: table_<data>_<pairing>.{md,csv}, per_pair_<data>_<pairing>.csv,
(with seeds) seeds_<data>_<pairing>.md, fig3_<data>.png and results.md; checkpoints stay under
runs/ (not tracked).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from refine_benchmark import known_deformation_batches

import air_reg
from air_reg.checkpoint import WEIGHTS_DIR
from air_reg.classical import ants_syn, demons, has_ants, has_simpleitk
from air_reg.config import compose_config
from air_reg.scoring import (
    identity_method,
    markdown_table,
    score,
    summarise,
    write_per_pair_csv,
)
from air_reg.train import train
from air_reg.utils import write_with
from air_reg.viz import method_figure

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("reproduce")
PROFILES = {
    # budget per training run, test pairs per pairing mode, validation pairs
    "quick": {
        "max_time": "00:00:00:45",
        "test_pairs": 200,
        "val_pairs": 200,
        "pairs_per_epoch": 1024,
    },
    "smoke": {
        "max_time": "00:00:00:08",
        "test_pairs": 16,
        "val_pairs": 32,
        "pairs_per_epoch": 256,
    },
    "peers": {  # the full budget, fewer test pairs: ANTs SyN takes ~0.3 s a pair
        "max_time": "00:00:05:00",
        "test_pairs": 500,
        "val_pairs": 1000,
        "pairs_per_epoch": 4096,
    },
    "full": {
        "max_time": "00:00:05:00",
        "test_pairs": 1000,
        "val_pairs": 1000,
        "pairs_per_epoch": 4096,
    },
}
METHODS = {  # table column -> experiment config
    "DIRNet": "paper_dirnet",
    "AiR-single": "paper_air",
    "AiR-MAPT": "paper_mapt",
    "AiR-MAPT tuned": "mapt_tuned",
    "AiR-UNet": "air_unet",
    "AiR-UNet no attention": "air_unet_no_attention",  # ablations of AiR-UNet
    "AiR-UNet coarse decoder": "air_unet_coarse",
    "VoxelMorph": "voxelmorph",
}
SHIPPED = {
    "DIRNet": "dirnet",
    "AiR-single": "air",
    "AiR-MAPT": "mapt",
    "AiR-MAPT tuned": "mapt_tuned",
    "AiR-UNet": "air_unet",
    "AiR-UNet no attention": "air_unet_no_attention",
    "AiR-UNet coarse decoder": "air_unet_coarse",
    "VoxelMorph": "voxelmorph",
}  # air_reg/weights/<name>_<data>.ckpt
DATASETS = ("mnist", "fashion")
PAIRINGS = ("random", "same_class")
KNOWN_PX = 2.0  # largest displacement of the known deformations (refine_benchmark's default)


def train_method(
    experiment: str,
    data: str,
    pairing: str,
    profile: dict,
    out: Path,
    overrides: tuple[str, ...] = (),
) -> Path:
    """Train one method (plus Hydra ``overrides``); return its best checkpoint (lowest
    validation MSE)."""
    cfg = compose_config(
        "train",
        [
            f"experiment={experiment}",
            f"data={data}",
            f"data.pairing={pairing}",
            f"data.num_val_pairs={profile['val_pairs']}",
            f"data.pairs_per_epoch={profile['pairs_per_epoch']}",
            "callbacks.image_grid=null",
            f"trainer.max_time={profile['max_time']}",
            "trainer.max_epochs=1000",
            "trainer.enable_progress_bar=false",
            "test=false",
            *overrides,
        ],
        out,
    )
    start = time.time()
    train(cfg)
    log.info("%s on %s trained in %.0f s", experiment, data, time.time() - start)
    best = sorted((out / "checkpoints").glob("epoch_*.ckpt"))
    return best[-1] if best else out / "checkpoints" / "last.ckpt"


def ship(ckpt: Path, dest: Path) -> None:
    """Copy a checkpoint's weights and model record (no optimiser state) to ``dest``."""
    full = torch.load(ckpt, map_location="cpu", weights_only=True)
    keep = ("state_dict", "air_reg", "epoch", "global_step", "pytorch-lightning_version")
    write_with(dest, lambda tmp: torch.save({k: full[k] for k in keep if k in full}, tmp))


def load_test_batches(
    data: str, pairing: str, n: int, batch_size: int = 250, split: str = "test"
) -> list[dict]:
    """The fixed, seeded ``n`` test (or ``split="val"``: validation) pairs of ``data`` in
    ``pairing`` mode."""
    dm = instantiate(
        compose_config(
            "train",
            [
                f"data={data}",
                f"data.pairing={pairing}",
                f"data.num_{split}_pairs={n}",
                f"data.eval_batch_size={batch_size}",
            ],
            REPO / "outputs",
        ).data
    )
    dm.setup("test" if split == "test" else "fit")
    return list(dm.test_dataloader() if split == "test" else dm.val_dataloader())


def write_tables(out: Path, tag: str, per_pair: dict, ms: dict) -> str:
    summary = summarise(per_pair)
    table = markdown_table(summary, ms)
    (out / f"table_{tag}.md").write_text(table)
    with open(out / f"table_{tag}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "metric", "mean", "std", "n"])
        for method, metrics in summary.items():
            for k, v in metrics.items():
                writer.writerow([method, k, f"{v['mean']:.6g}", f"{v['std']:.6g}", v["n"]])
    write_per_pair_csv(out / f"per_pair_{tag}.csv", per_pair)
    return table


def seed_table(summary: dict, groups: dict[str, list[str]]) -> str:
    """Markdown: each metric's mean over a method's seed rows ± the std over those seeds
    (``groups``: method -> its rows in ``summary``); rows outside ``groups`` by their mean."""
    single = [n for n in summary if not any(n in rows for rows in groups.values())]
    names = [*single, *groups]
    head = ["metric", *(f"{g} ({len(groups[g])} seeds)" if g in groups else g for g in names)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for metric in dict.fromkeys(k for row in summary.values() for k in row):
        cells = [metric]
        for name in names:
            rows = [r for r in groups.get(name, [name]) if metric in summary[r]]
            means = torch.tensor([summary[r][metric]["mean"] for r in rows])
            if len(means) == 0:
                cells.append("")
            elif len(means) == 1:
                cells.append(f"{means.item():.4f}")
            else:
                cells.append(f"{means.mean().item():.4f} ± {means.std().item():.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-demons", action="store_true", help="skip the SimpleITK row")
    parser.add_argument("--no-ants", action="store_true", help="skip the ANTs SyN row")
    parser.add_argument(
        "--train-pairing",
        choices=PAIRINGS,
        default="same_class",
        help="pairs to train on (same_class: closest to the paper's Original statistics)",
    )
    parser.add_argument("--test-pairs", type=int, default=None, help="override the profile's")
    parser.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="also score each learned model + N refinement steps (the shipped preset)",
    )
    parser.add_argument(
        "--ship-weights",
        nargs="*",
        default=None,
        metavar="METHOD",
        help="copy the trained weights of these methods (none named: all) to "
        "air_reg/weights/<model>_<data>.ckpt",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        metavar="S",
        help="train every method once per seed (rows '<method> seed S'; the config's seed "
        "when not given); with 2 or more, seeds_<data>_<pairing>.md gives each metric's mean "
        "over the seeds ± its std over the seeds",
    )
    args = parser.parse_args()
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
    if args.seeds and len(args.seeds) > 1 and args.ship_weights is not None:
        parser.error("--ship-weights with several --seeds: which seed's weights? name one seed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = dict(PROFILES[args.profile])
    if args.test_pairs:
        profile["test_pairs"] = args.test_pairs
    out = args.out or REPO / "experiments" / "results" / args.profile
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    use_demons = has_simpleitk() and not args.no_demons
    if not use_demons:
        log.warning("SimpleITK missing (pip install air-reg[classical]): no Demons row")
    use_ants = has_ants() and not args.no_ants
    if not use_ants:
        log.warning("antspyx missing (pip install air-reg[peers]) or --no-ants: no ANTs row")

    report = [
        f"# Reproduction ({args.profile} profile)\n",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; training budget {profile['max_time']} per model "
        f"(DD:HH:MM:SS), trained on {args.train_pairing} pairs; "
        f"{profile['test_pairs']} test pairs per pairing mode; load average at start "
        f"{os.getloadavg()[0]:.1f}.\n\n",
        f"Command: `python experiments/reproduce.py {shlex.join(sys.argv[1:])}`\n",
    ]
    started = time.time()
    for data in args.datasets:
        models, groups, in_figure = {}, {}, set()
        # seed by seed, the methods interleaved: a change of load hits them alike
        for seed, method in [(s, m) for s in args.seeds or [None] for m in args.methods]:
            name = method if seed is None else f"{method} seed {seed}"
            run = out / "runs" / data / (METHODS[method] + ("" if seed is None else f"_{seed}"))
            if run.exists():
                shutil.rmtree(run)
            overrides = () if seed is None else (f"seed={seed}",)
            ckpt = train_method(METHODS[method], data, args.train_pairing, profile, run, overrides)
            rows = {method: (name, air_reg.load_model(ckpt))}  # table label: (row, model)
            if args.refine:
                tail = f" + refine {args.refine}"
                refined = air_reg.load_model(ckpt, refine_steps=args.refine)
                rows[method + tail] = (name + tail, refined)
            for label, (row, model) in rows.items():
                models[row] = model
                groups.setdefault(label, []).append(row)
                if seed is None or seed == args.seeds[0]:
                    in_figure.add(row)
            if args.ship_weights is not None and method in (args.ship_weights or METHODS):
                ship(ckpt, WEIGHTS_DIR / f"{SHIPPED[method]}_{data}.ckpt")
        test_sets = {p: load_test_batches(data, p, profile["test_pairs"]) for p in PAIRINGS}
        test_sets["known"] = known_deformation_batches(test_sets["same_class"], KNOWN_PX)
        for pairing, batches in test_sets.items():
            methods = {"Original": identity_method, **models}
            if use_demons:
                methods["Demons"] = demons
            if use_ants:
                methods["ANTs SyN"] = ants_syn
            per_pair, ms = score(methods, batches)
            tag = f"{data}_{pairing}"
            table = write_tables(out, tag, per_pair, ms)
            report += [f"\n## {data}, {pairing} test pairs\n", table]
            if args.seeds and len(args.seeds) > 1:
                seeds = seed_table(summarise(per_pair), groups)
                (out / f"seeds_{tag}.md").write_text(seeds)
                report += [f"\n### over seeds {' '.join(map(str, args.seeds))}\n", seeds]
            if pairing == "random":
                first = batches[0]
                flows = {
                    name: m(first["fixed"][:6], first["moving"][:6])
                    for name, m in models.items()
                    if name in in_figure  # one seed's
                }
                if use_demons:
                    flows["Demons"] = demons(first["fixed"][:6], first["moving"][:6])
                method_figure(first["fixed"], first["moving"], flows, out / f"fig3_{data}.png")
    report.append(f"\nTotal wall time: {(time.time() - started) / 60:.1f} min.\n")
    (out / "results.md").write_text("".join(report))
    log.info("Wrote %s", out)


if __name__ == "__main__":
    main()
