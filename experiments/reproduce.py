"""Reproduce the paper's Table 1 and Fig. 3 on MNIST and Fashion-MNIST from one command.

    python experiments/reproduce.py --profile quick   # minutes: smoke test
    python experiments/reproduce.py --profile full    # ~1 hour on 2 CPU cores (5 min a model)
    python experiments/reproduce.py --profile peers --methods "AiR-MAPT tuned" AiR-UNet VoxelMorph
    python experiments/reproduce.py --profile peers --methods AiR-UNet VoxelMorph --refine 50
    python experiments/reproduce.py --profile full --methods AiR-UNet VoxelMorph --seeds 1 2 3
    python experiments/reproduce.py --profile quick --max-steps 300   # same numbers on any load

For each dataset, trains the methods of air_reg.zoo (--methods picks) on same-class pairs
(--train-pairing) for the profile's wall-clock budget (or --max-steps steps), then scores them,
the identity ("Original"), SimpleITK's Demons and ANTs SyN on the same fixed test pairs, drawn
at random, within a class, and "known" (the same-class moving images warped by known smooth
diffeomorphisms: end-point error). ``--refine N`` adds each learned model with N steps of the
shipped refinement preset. ``--seeds`` trains each method once per seed (``seed=``: the
initialisation and dropout; the pairs stay as they are) and adds each metric's mean ± std over
the seeds. Writes to experiments/results/<profile>/: table_<data>_<pairing>.{md,csv},
per_pair_<data>_<pairing>.csv, (with seeds) seeds_<data>_<pairing>.md, fig3_<data>.png and
results.md; checkpoints stay under runs/ (not tracked). The work: air_reg.bench.reproduction.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from air_reg import zoo
from air_reg.bench.reproduction import PROFILES, Plan, reproduce_dataset
from air_reg.classical import has_ants, has_simpleitk

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("reproduce")
LABELS = [m.label for m in zoo.DATASET_METHODS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--datasets", nargs="+", default=list(zoo.DATASETS), choices=zoo.DATASETS)
    parser.add_argument("--methods", nargs="+", default=LABELS, choices=LABELS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-demons", action="store_true", help="skip the SimpleITK row")
    parser.add_argument("--no-ants", action="store_true", help="skip the ANTs SyN row")
    parser.add_argument(
        "--train-pairing",
        choices=("random", "same_class"),
        default="same_class",
        help="pairs to train on (same_class: closest to the paper's Original statistics)",
    )
    parser.add_argument("--test-pairs", type=int, default=None, help="override the profile's")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="train each model N optimiser steps instead of the profile's wall-clock budget",
    )
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
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps {args.max_steps}: give a positive number of steps")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = PROFILES[args.profile]
    if args.test_pairs:
        profile = dataclasses.replace(profile, test_pairs=args.test_pairs)
    out = args.out or REPO / "experiments" / "results" / args.profile
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    use_demons = has_simpleitk() and not args.no_demons
    if not use_demons:
        log.warning("SimpleITK missing (pip install air-reg[classical]): no Demons row")
    use_ants = has_ants() and not args.no_ants
    if not use_ants:
        log.warning("antspyx missing (pip install air-reg[peers]) or --no-ants: no ANTs row")
    plan = Plan(
        methods=tuple(args.methods),
        profile=profile,
        budget=profile.max_time if args.max_steps is None else args.max_steps,
        train_pairing=args.train_pairing,
        seeds=tuple(args.seeds) if args.seeds else None,
        refine=args.refine,
        ship=None if args.ship_weights is None else tuple(args.ship_weights),
        demons=use_demons,
        ants=use_ants,
    )
    budget = (
        f"{profile.max_time} per model (DD:HH:MM:SS)"
        if args.max_steps is None
        else f"{args.max_steps} steps per model"
    )
    report = [
        f"# Reproduction ({args.profile} profile)\n",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; training budget {budget}, trained on "
        f"{args.train_pairing} pairs; {profile.test_pairs} test pairs per pairing mode; "
        f"load average at start {os.getloadavg()[0]:.1f}.\n\n",
        f"Command: `python experiments/reproduce.py {shlex.join(sys.argv[1:])}`\n",
    ]
    started = time.time()
    for data in args.datasets:
        report += reproduce_dataset(data, plan, out)
    report.append(f"\nTotal wall time: {(time.time() - started) / 60:.1f} min.\n")
    (out / "results.md").write_text("".join(report))
    log.info("Wrote %s", out)


if __name__ == "__main__":
    main()
