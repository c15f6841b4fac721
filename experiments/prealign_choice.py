"""How many Adam steps of a mutual-information affine stage before the shipped AiR-Match, one-shot
(``prealign``, issue #32), and from what image size, on the tune families only.

    python experiments/prealign_choice.py    # ~2 min on 2 cores -> results/prealign_choice/
    # the rule checked once on held-out pairs no choice looked at (test split, seeds 1 and 2):
    python experiments/prealign_choice.py --split test --seeds 1 2 --sizes 160x208 --steps 0 15 \
        --out experiments/results/prealign_choice/test_seeds_1_2

Pairs: ``bench.families.family(name, 18, size, seed, split="tune")`` (small, large, contrast)
at 64 x 80, 96 x 128 and 160 x 208, seeds 0, 1 and 2 (54 pairs a family and size). Each
``prealign`` value is ``air_reg.load_model(<shipped default>, prealign=N)`` (its cascade as
shipped), with the size rule lifted (``refine.optimise.PREALIGN_MIN_SIDE`` set to 0 here) so
that every size shows what the stage does; one pair a call as ``register`` runs it (its guard
too), the values taking turns pair by pair (the order rotating), after one untimed warm-up call
each. EPE px over every pixel, the worst pair's, how many pairs it left more than 0.5 px worse
than without it, and folding (% of pixels with det J <= 0); ms a pair the median over the calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import air_reg
from air_reg import zoo
from air_reg.bench import families
from air_reg.bench.family_bench import timed_scores
from air_reg.bench.machine import run_header, write_report
from air_reg.refine import optimise, registrar
from air_reg.refine.optimise import keep_if_better

OUT = Path(__file__).resolve().parent / "results" / "prealign_choice"
FIELDS = ("fixed", "moving", "flow", "edges")  # of a family's batch, what the rows use
STEPS = (0, 15, 30)
SIZES = ((64, 80), (96, 128), (160, 208))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    ap.add_argument("--pairs", type=int, default=18, help="pairs a family, size and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--split", default="tune", help="tune (the choice) or test (a check)")
    ap.add_argument("--sizes", nargs="+", default=[f"{h}x{w}" for h, w in SIZES])
    ap.add_argument("--agree-px", type=float, nargs="+", default=[registrar.PREALIGN_AGREE_PX],
                    help="the network's check (registrar.PREALIGN_AGREE_PX)")  # fmt: skip
    ap.add_argument("--families", nargs="+", default=list(families.FAMILIES),
                    choices=families.FAMILIES)  # fmt: skip
    ap.add_argument("--shift-px", type=float, default=None,
                    help="the large family's shifts, +- px (default: its 8)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    start, header = time.time(), run_header()
    optimise.PREALIGN_MIN_SIDE = 0  # every size: what the rule is chosen from
    weights = zoo.WEIGHTS_DIR / f"{zoo.default_weights()}.ckpt"
    models = {}  # label: (model, agree_px); prealign 0 first, the baseline
    for n in sorted(args.steps):
        for px in args.agree_px if n else args.agree_px[:1]:
            label = f"{n} (> {px:g} px)" if n and len(args.agree_px) > 1 else str(n)
            models[label] = (air_reg.load_model(weights, prealign=n), px)
    rows = []
    for size in [tuple(int(n) for n in text.split("x")) for text in args.sizes]:
        for name in args.families:
            batches = [families.family(name, args.pairs, size, seed, split=args.split,
                                       shift_px=args.shift_px)[0]
                       for seed in args.seeds]  # fmt: skip
            batch = {k: torch.cat([b[k] for b in batches]) for k in FIELDS}
            rows += _rows(models, batch, name, size)
    lines = [
        "# Pre-alignment before the shipped AiR-Match, one-shot (issue #32)",
        "",
        f"{header}; `python experiments/prealign_choice.py {' '.join(sys.argv[1:])}`; the "
        f"{args.split} families, {args.pairs} "
        f"pairs a family, size and seed (seeds {args.seeds}), one pair a call, the guard as "
        "`register` runs it; `prealign` 0 is the network's cascade alone; the size rule lifted.",
        "",
        "| size | family | prealign (Adam steps, network's check) | EPE px | worst pair "
        "| pairs > 0.5 px worse | folding % | ms a pair |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_report(args.out / "README.md", lines, start)


def _rows(models: dict, batch: dict, name: str, size) -> list[str]:
    scores = timed_scores({n: _guarded(model, px) for n, (model, px) in models.items()}, batch)
    epe, fold, ms = ({n: scores[n][k] for n in models} for k in ("epe", "folding", "ms"))
    base = epe[next(iter(models))]  # prealign 0 (or the fewest steps asked for)
    worse = {n: sum(e > b + 0.5 for e, b in zip(epe[n], base, strict=True)) for n in models}
    return [f"| {size[0]} x {size[1]} | {name} | {n} | {statistics.mean(epe[n]):.3f} | "
            f"{max(epe[n]):.2f} | {worse[n]} | {statistics.mean(fold[n]):.3f} | "
            f"{statistics.median(ms[n]):.0f} |" for n in models]  # fmt: skip


def _guarded(model, agree_px: float):
    """``model``'s one-shot with the network's check at ``agree_px`` and the guard, as
    ``register`` runs it."""

    def run(f, m):
        registrar.PREALIGN_AGREE_PX = agree_px
        return keep_if_better(model(f, m), f, m, model.guard_similarity)[0]

    return run


if __name__ == "__main__":
    main()
