"""Refinement and the classical peers on 2-D families with known fields (small, large, contrast
change), from images inside the installed wheels, in one run.

    python experiments/refine_families.py                  # -> experiments/results/families/
    python experiments/refine_families.py --quick          # 9 pairs a family at 96 x 128
    python experiments/refine_families.py --split tune     # where settings are chosen

Pairs: ``air_reg.bench.families`` (scikit-image's bundled images and MNI152 slices under known
smooth, affine + deformable, and contrast-changing deformations; ``tune`` and ``test`` use
disjoint sources). Rows: identity; model-free refinement with the default preset
(``load_model(None, refine_steps=60)``), with ``similarity=mi``, with ``affine_steps=100``; ANTs
SyN with and without its affine stage (Mattes MI on the contrast family); SimpleITK Demons.
Pair by pair, the method order rotating. Writes table.md, results.csv (one row per pair and
method) and README.md (command, machine, time, load). The work: air_reg.bench.family_bench.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from air_reg.bench.families import FAMILIES, SIZE, SPLITS
from air_reg.bench.family_bench import (
    FIELDS,
    LABELS,
    NET,
    NET_CASCADE,
    NET_REFINE,
    STEPS,
    run,
    tables,
)
from air_reg.bench.machine import cpu_name
from air_reg.bench.tables import csv_rows

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "families"
QUICK = {"pairs": 9, "size": (96, 128)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=18, help="pairs per family (9 sources a split)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--size", type=int, nargs=2, default=list(SIZE), metavar=("H", "W"))
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--models", nargs="+", default=[], metavar="SOURCE",
                   help="learned models (shipped weights names or .ckpt paths): a one-shot and "
                   "a refined row each")  # fmt: skip
    p.add_argument("--cascaded", nargs="+", default=[], metavar="SOURCE",
                   help="learned models also run one-shot in 3 passes with the affine fit "
                   "between them (AiR-Match's default inference, for the ablations)")  # fmt: skip
    p.add_argument("--steps", type=int, default=STEPS, help="refine_steps of the refined rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="--pairs 9 --size 96 128 (a sanity run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.size = QUICK["pairs"], list(QUICK["size"])
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load, tic = os.getloadavg()[0], time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    with csv_rows(args.out / "results.csv", FIELDS) as sink:  # a cut run keeps its rows
        methods = args.methods + [f"{kind}:{m}" for m in args.models for kind in (NET, NET_REFINE)]
        methods += [f"{NET_CASCADE}:{m}" for m in args.cascaded]
        rows = run(args.families, args.pairs, tuple(args.size), args.split, methods,
                   seed=args.seed, steps=args.steps, sink=sink)  # fmt: skip
    table = tables(rows)
    (args.out / "table.md").write_text(table)
    command = shlex.join(["python", "experiments/refine_families.py", *(argv or sys.argv[1:])])
    (args.out / "README.md").write_text(
        f"# Refinement on the 2-D families, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`{command}`: {args.pairs} pairs a family, {args.size[0]} x {args.size[1]}, split "
        f"`{args.split}`, seed {args.seed}, refine_steps={args.steps}. {os.cpu_count()} CPU "
        f"cores ({cpu_name()}), {torch.get_num_threads()} torch threads; load average "
        f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"{time.time() - tic:.0f} s in all.\n\n"
        "EPE: px, mean over every pixel of a pair, then over pairs; EPE edges: over the fixed "
        "image's strongest 20 % gradients whose true target lies inside the moving image. "
        "Times: one pair a call, after one untimed warm-up call per method and family, the "
        "method order rotating every pair. Pairs and split: `air_reg.bench.families`.\n\n" + table
    )
    print(table)
    return rows


if __name__ == "__main__":
    main()
