"""What the refinement's step count buys at 233 x 197 (issue #31): EPE against time per pair
for ``refine_steps`` N (the default preset: 3 levels of N, 2N and 3N Adam steps, fine to
coarse), on the tune split only.

    python experiments/steps_choice.py   # ~1 min on 2 cores -> results/steps_choice/

Pairs: the 10 MNI152 tune slices (z 77-86) at 233 x 197, each against itself warped by a
smooth ``known_flows`` field of at most 5 px (``families.mni_known``), one pair a call as
``register`` runs it; the step counts take turns pair by pair (the order rotating), after one
untimed warm-up call each. EPE px over every pixel; ms a pair the median over the calls
(``--rounds`` passes over the pairs).
Says how far the CLI preset's time could fall by counting fewer steps, and what that costs;
``--lbfgs N ...`` adds rows of the same preset with L-BFGS (``refine.optimizer=lbfgs``, N
iterations a level as N Adam steps would be, each with its strong-Wolfe line search: the
torch path), to see whether a second-order method reaches the same error in fewer passes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from air_reg.bench import families as fam
from air_reg.bench.machine import run_header, write_report
from air_reg.refine import RefineSettings, refine

OUT = Path(__file__).resolve().parent / "results" / "steps_choice"
STEPS = (10, 15, 20, 30, 45, 60, 90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    ap.add_argument("--rounds", type=int, default=3, help="passes over the pairs (timing)")
    ap.add_argument("--lbfgs", type=int, nargs="*", default=[], help="L-BFGS rows, N a level")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    start = time.time()
    header = run_header()
    fixed, moving, flow = fam.mni_known("tune", torch.Generator().manual_seed(31))
    settings = {n: RefineSettings(steps=n) for n in args.steps}
    settings |= {f"lbfgs {n}": RefineSettings(steps=n, optimizer="lbfgs") for n in args.lbfgs}
    for s in settings.values():  # warm-up: kernels loaded, caches filled
        refine(fixed[:1], moving[:1], None, s)
    ms = {n: [] for n in settings}
    epe = {n: [] for n in settings}
    for k in range(args.rounds * len(fixed)):
        i = k % len(fixed)
        order = list(settings)[k % len(settings) :] + list(settings)[: k % len(settings)]
        for n in order:
            t = time.perf_counter()
            got = refine(fixed[i : i + 1], moving[i : i + 1], None, settings[n])
            ms[n].append(1000 * (time.perf_counter() - t))
            if k < len(fixed):  # deterministic: scored once
                epe[n].append(float((got - flow[i : i + 1]).norm(dim=1).mean()))
    ident = float(flow.norm(dim=1).mean())
    lbfgs = f" --lbfgs {' '.join(map(str, args.lbfgs))}" if args.lbfgs else ""
    ref = max(args.steps)
    lines = [
        "# Refinement steps against time, 233 x 197 (issue #31)",
        "",
        f"{header}; `python experiments/steps_choice.py{lbfgs}`; 10 MNI152 tune slices under 5 px "
        f"fields, one pair a call, the default preset, {args.rounds} rounds; identity EPE "
        f"{ident:.3f} px.",
        "",
        f"| refine_steps (fine / middle / coarse) | EPE px | vs {ref} steps | ms a pair | "
        f"vs {ref} steps |",
        "|---|---|---|---|---|",
    ]
    for n in settings:
        e, t = statistics.mean(epe[n]), statistics.median(ms[n])
        e_ref, t_ref = statistics.mean(epe[ref]), statistics.median(ms[ref])
        k = settings[n].steps  # a level's steps, fine to coarse: k, 2k, 3k
        label = f"{n} ({k} / {2 * k} / {3 * k})"
        lines.append(f"| {label} | {e:.3f} | {e / e_ref:.2f}x | {t:.0f} | {t / t_ref:.2f}x |")
    write_report(args.out / "README.md", lines, start)


if __name__ == "__main__":
    main()
