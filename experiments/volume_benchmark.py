"""The classical peers, the refinement and learned models on 3-D MNI152 volumes under known
fields (small, large = affine + smooth, contrast change), pair by pair, in one run.

    python experiments/volume_benchmark.py                       # 2 mm, 2 pairs a family
    python experiments/volume_benchmark.py --size 1mm --pairs 1  # the full 197 x 233 x 189
    python experiments/volume_benchmark.py --quick               # 4 mm, 1 pair, a sanity run
    python experiments/volume_benchmark.py --models logs/.../last.ckpt   # + one-shot, refined

Rows: identity; air-reg refinement (``load_model(None, refine_steps=N)``, an affine stage on
``large``, similarity=mi on ``contrast``); ANTs SyN with its affine stage (Mattes MI); SimpleITK
Demons (3 levels); each ``--models`` checkpoint one-shot and refined. Writes table.md,
results.csv (one row per pair and method) and README.md (command, machine, time, load) to
experiments/results/volumes/. The work: ``air_reg.bench.volumes``.
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

from air_reg.bench.machine import cpu_name
from air_reg.bench.tables import csv_rows
from air_reg.bench.volumes import FAMILIES, FIELDS, LABELS, NET, NET_REFINE, STEPS, run, table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "volumes"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="2mm", help="voxel size: 2mm (99 x 117 x 95), 1mm, 4mm...")
    p.add_argument("--pairs", type=int, default=2, help="pairs per family")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--models", nargs="+", default=[], metavar="CKPT",
                   help="3-D checkpoints: a one-shot and a refined row each")  # fmt: skip
    p.add_argument("--steps", type=int, default=STEPS, help="refine_steps of the refined rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="the central window only (a smoke test)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="--size 4mm --pairs 1")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.pairs = "4mm", 1
    if not args.size.endswith("mm") or not args.size[:-2].isdigit():
        p.error(f"--size is a whole number of mm, e.g. 2mm or 1mm, got {args.size!r}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load, tic = os.getloadavg()[0], time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    with csv_rows(args.out / "results.csv", FIELDS) as sink:  # a cut run keeps its rows
        methods = args.methods + [f"{kind}:{m}" for m in args.models for kind in (NET, NET_REFINE)]
        rows = run(args.families, args.pairs, methods, mm=int(args.size[:-2]), seed=args.seed,
                   steps=args.steps, crop=args.crop, sink=sink)  # fmt: skip
    text = table(rows)
    (args.out / "table.md").write_text(text)
    command = shlex.join(["python", "experiments/volume_benchmark.py", *(argv or sys.argv[1:])])
    (args.out / "README.md").write_text(
        f"# Volumes: MNI152 under known 3-D fields, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`{command}`: {args.pairs} pair(s) a family at {args.size} ({rows[0]['shape']} "
        f"voxels), seed {args.seed}, refine_steps={args.steps}. {os.cpu_count()} CPU cores "
        f"({cpu_name()}), {torch.get_num_threads()} torch threads in the timed calls (one "
        f"elsewhere); load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
        f"end; {time.time() - tic:.0f} s in all.\n\n"
        "EPE: mm, mean over the fixed image's head mask, then over pairs. Dice: grey and white "
        "matter labels (moving labels warped nearest-neighbour); HD95: mm, mean of the two. "
        "Seconds: one call a pair, after an untimed call on a 24^3 crop, the method order "
        "rotating every pair. Peak MB: the process's peak resident memory during the call "
        "above its resident memory just before (air_reg.bench.volumes.PeakMemory). Pairs, "
        "fields and settings: `air_reg.bench.volumes`.\n\n" + text
    )
    print(text)
    return rows


if __name__ == "__main__":
    main()
