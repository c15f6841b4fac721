"""Refinement speed, issue #31's matrix: model-free refinement (MSE and MI), one pair a call
and batched, beside ANTs SyN and SimpleITK Demons, at 28 x 28, 233 x 197 and 512 x 512, on
pairs with known fields (same contrast and a contrast change), interleaved in one run.

    python experiments/refine_matrix.py            # -> experiments/results/refine_matrix/
    python experiments/refine_matrix.py --quick    # 2 pairs, 512 x 512 replaced by 128 x 128
    OMP_NUM_THREADS=1 python experiments/refine_matrix.py --threads 1   # one core each

Writes table.md (one row per size, family, method and mode, then the issue's targets),
results.csv (the same rows, with every round's ms per pair) and README.md (command, machine,
threads, load, wall time). The work: air_reg.bench.refine_matrix.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from air_reg.bench import refine_matrix as rm
from air_reg.bench.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "refine_matrix"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=8, help="pairs (rounds) per size and family")
    p.add_argument("--sizes", nargs="+", default=None, metavar="NAME",
                   help=f"a subset of {[s.name for s in rm.SIZES + rm.QUICK_SIZES]}")  # fmt: skip
    p.add_argument("--families", nargs="+", default=list(rm.FAMILIES), choices=rm.FAMILIES)
    p.add_argument("--methods", nargs="+", default=list(rm.METHODS), choices=rm.METHODS)
    p.add_argument("--steps", type=int, default=rm.STEPS, help="refine_steps of the refine rows")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for torch, ANTs and Demons (default: torch's count)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="--pairs 2, sizes 28x28 233x197 128x128, batches of 4")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    pool = rm.QUICK_SIZES if args.quick else rm.SIZES
    if args.quick:
        args.pairs = 2
    other = rm.SIZES if args.quick else rm.QUICK_SIZES
    known = {s.name: s for s in other + pool}  # the pool's batches win
    unknown = sorted(set(args.sizes or []) - set(known))
    if unknown:
        p.error(f"unknown sizes {unknown}; choose from {sorted(known)}")
    args.size_specs = [known[n] for n in args.sizes] if args.sizes else list(pool)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load, tic = os.getloadavg()[0], time.time()
    threads = args.threads or torch.get_num_threads()
    rows = rm.run(args.size_specs, args.pairs, families=args.families, methods=args.methods,
                  steps=args.steps, seed=args.seed, threads=threads)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=rm.FIELDS)
        w.writeheader()
        w.writerows({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in r.items()}
                    for r in rows)  # fmt: skip
    text = rm.table(rows) + "\n" + rm.targets(rows)
    (args.out / "table.md").write_text(text)
    command = shlex.join(["python", "experiments/refine_matrix.py", *(argv or sys.argv[1:])])
    sizes = ", ".join(f"{s.name} ({s.source}, fields up to {s.max_px:g} px, batches of "
                      f"{s.batch})" for s in args.size_specs)  # fmt: skip
    (args.out / "README.md").write_text(
        f"# Refinement speed matrix (issue #31), {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`{command}`: {args.pairs} pairs per size and family; sizes {sizes}; "
        f"refine_steps={args.steps}, seed {args.seed}. {os.cpu_count()} CPU cores "
        f"({cpu_name()}), {threads} threads for torch, ANTs and Demons "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); load average "
        f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"{time.time() - tic:.0f} s in all.\n\n"
        "ms/pair: median over rounds; batched: the call / its batch. Round r: every method "
        "once, the order rotating every round, single mode on pair r, batched mode on pair r "
        "and the next ones (its EPE pair r's); one untimed warm-up call per method and size. "
        "÷ ANTs, ÷ Demons, MI ÷ MSE: median over rounds of the per-round ratio to that row's "
        "time (single pair; MI ÷ MSE in the same mode). EPE: px, mean over every pixel, and "
        "over the fixed image's strongest 20 % gradients that map inside the moving image "
        "(edges). pairs: the pairs scored (and rounds timed). Pairs and families: "
        "`air_reg.bench.refine_matrix`.\n\n" + text
    )
    print(text)
    return rows


if __name__ == "__main__":
    main()
