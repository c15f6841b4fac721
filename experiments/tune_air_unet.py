"""Choose AiR-UNet's settings on VALIDATION pairs, never on the test pairs of the tables.

    python experiments/tune_air_unet.py --datasets fashion          # ~35 min on 2 CPU cores
    python experiments/tune_air_unet.py --variants base fold --budget 00:00:01:00   # quicker

Trains each variant (``experiment=air_unet`` plus Hydra overrides, VoxelMorph as the yardstick)
for the same wall-clock budget as experiments/reproduce.py's ``peers`` profile, one after the
other, and scores it on the validation split: same-class pairs (MSE, Dice), the same moving
images under known smooth diffeomorphisms (EPE) and random pairs (folding, the hardest case
for it). The test pairs stay untouched until the chosen configuration runs in reproduce.py.
Writes experiments/results/tune_air_unet/table_<data>.md and results.csv.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from refine_benchmark import known_deformation_batches
from reproduce import KNOWN_PX, PROFILES, load_test_batches, train_method

import air_reg
from air_reg.scoring import identity_method, score, summarise
from air_reg.utils import write_text

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("tune_air_unet")
FOLD = "model/regularizer=diffusion_fold"
FOUR_LEVELS = ("model.net.channels=[8,16,32,32]", "model.net.decoder_channels=[16,16,32,32]")
VARIANTS = {  # name -> (experiment, overrides)
    "base": ("air_unet", ()),
    "reg 0.1": ("air_unet", ("model.reg_weight=0.1",)),
    "fold": ("air_unet", (FOLD,)),
    "fold, 7 squarings": ("air_unet", (FOLD, "model.net.integration_steps=7")),
    "attention at 1/2 and 1/4": ("air_unet", ("model.net.scales=[2,4]",)),
    # round 2 (after round 1: the fold term keeps MSE/Dice and folds 4x less; EPE still loses)
    "fold, reg 0.07": ("air_unet", (FOLD, "model.reg_weight=0.07")),
    "fold, 4 levels": ("air_unet", (FOLD, *FOUR_LEVELS)),
    "fold, 4 levels, attention at 1/8": (
        "air_unet",
        (FOLD, *FOUR_LEVELS, "model.net.scales=[8]"),
    ),
    "fold, 4 levels, 7 squarings": (
        "air_unet",
        (FOLD, *FOUR_LEVELS, "model.net.integration_steps=7"),
    ),
    # round 3 (round 2: 4 levels buy a little EPE; VoxelMorph's is still lower): its width
    "fold, wide": (
        "air_unet",
        (FOLD, "model.net.channels=[16,32,32]", "model.net.decoder_channels=[32,32,32]"),
    ),
    "fold, 4 levels, wide": (
        "air_unet",
        (FOLD, "model.net.channels=[16,32,32,32]", "model.net.decoder_channels=[32,32,32,32]"),
    ),
    "VoxelMorph": ("voxelmorph", ()),
}
KEYS = (("same_class", "mse"), ("same_class", "dice"), ("known", "epe"), ("random", "folding"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["fashion"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--budget", default=PROFILES["peers"]["max_time"], help="DD:HH:MM:SS")
    parser.add_argument("--pairs", type=int, default=1000, help="validation pairs per set")
    parser.add_argument(
        "--out", type=Path, default=REPO / "experiments" / "results" / "tune_air_unet"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = {**PROFILES["peers"], "max_time": args.budget}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    report = [
        f"# AiR-UNet variants on validation pairs\n\nBudget {args.budget} per model, "
        f"{torch.get_num_threads()} torch threads, load average at start "
        f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.pairs} validation pairs per set.\n",
    ]
    for data in args.datasets:
        sets = {
            p: load_test_batches(data, p, args.pairs, split="val")
            for p in ("same_class", "random")
        }
        sets["known"] = known_deformation_batches(sets["same_class"], KNOWN_PX)
        models = {"Original": identity_method}
        for name in args.variants:
            experiment, overrides = VARIANTS[name]
            run = args.out / "runs" / data / name.replace(" ", "_").replace(",", "")
            if run.exists():
                shutil.rmtree(run)
            ckpt = train_method(experiment, data, "same_class", profile, run, overrides)
            models[name] = air_reg.load_model(ckpt)
        results = {p: summarise(score(models, bs)[0]) for p, bs in sets.items()}
        lines = [
            "| variant | overrides | MSE | Dice | EPE (known) | folding % (random) |",
            "|---|---|---|---|---|---|",
        ]
        for name in models:
            values = [results[p][name][k]["mean"] for p, k in KEYS]
            over = " ".join(VARIANTS[name][1]) if name in VARIANTS else ""
            lines.append(f"| {name} | `{over}` | " + " | ".join(f"{v:.4f}" for v in values) + " |")
            scores = {k: v for (_, k), v in zip(KEYS, values, strict=True)}
            rows.append({"data": data, "variant": name, **scores})
        table = "\n".join(lines) + "\n"
        write_text(args.out / f"table_{data}.md", table)
        report += [f"\n## {data}\n\n", table]
    with open(args.out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["data", "variant", *(k for _, k in KEYS)])
        writer.writeheader()
        writer.writerows(rows)
    write_text(args.out / "results.md", "".join(report))
    log.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()
