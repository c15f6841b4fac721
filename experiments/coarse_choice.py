"""From what image size the shipped AiR-Match registers a pair first at a coarser size, one-shot
(``registrar.COARSE_SIDE``, issue #32), chosen on the tune families, then checked on the test
split.

    python experiments/coarse_choice.py       # ~5 min on 2 cores -> results/coarse_choice/
    # the choice checked once on held-out pairs (test split, seeds 1 and 2):
    python experiments/coarse_choice.py --split test --seeds 1 2 --sides 0 256 \
        --out experiments/results/coarse_choice/test_seeds_1_2

Pairs: ``bench.families.family(name, n, size, seed, split)`` (small, large, contrast) at sizes
larger than the families' 160 x 208; the networks were trained at 128 x 128. Each
``COARSE_SIDE`` value (0: none, the pair registered at its own size only) runs the default
one-shot (``air_reg.load_model(<shipped default>)``, its affine stage and cascade) one pair a
call with the guard as ``register`` runs it, the values taking turns pair by pair (the order
rotating) after one untimed warm-up call each. EPE px over every pixel, the worst pair's, how
many pairs a value left more than 0.5 px worse than none, folding (% of pixels with det J <=
0) and ms a pair (median).
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
from air_reg.refine import registrar
from air_reg.refine.optimise import keep_if_better

OUT = Path(__file__).resolve().parent / "results" / "coarse_choice"
FIELDS = ("fixed", "moving", "flow", "edges")  # of a family's batch, what the rows use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[0, 192, 256],
                    help="COARSE_SIDE values, px (0: none)")  # fmt: skip
    ap.add_argument("--sizes", nargs="+", default=["320x416", "480x624"])
    ap.add_argument("--families", nargs="+", default=list(families.FAMILIES),
                    choices=families.FAMILIES)  # fmt: skip
    ap.add_argument("--pairs", type=int, default=12, help="pairs a family, size and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--split", default="tune", help="tune (the choice) or test (a check)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    start, header = time.time(), run_header()
    model = air_reg.load_model(zoo.WEIGHTS_DIR / f"{zoo.default_weights()}.ckpt")
    rows = []
    for size in [tuple(int(n) for n in text.split("x")) for text in args.sizes]:
        for name in args.families:
            batches = [families.family(name, args.pairs, size, seed, split=args.split)[0]
                       for seed in args.seeds]  # fmt: skip
            batch = {k: torch.cat([b[k] for b in batches]) for k in FIELDS}
            rows += _rows(model, args.sides, batch, name, size)
    lines = [
        "# Coarse first: the shipped AiR-Match one-shot on larger images (issue #32)",
        "",
        f"{header}; `python experiments/coarse_choice.py {' '.join(sys.argv[1:])}`; the "
        f"{args.split} families, {args.pairs} pairs a family, size and seed (seeds "
        f"{args.seeds}), one pair a call, the guard as `register` runs it; `COARSE_SIDE` 0: "
        "none (the pair at its own size only).",
        "",
        "| size | family | COARSE_SIDE | registered first at | EPE px | worst pair "
        "| pairs > 0.5 px worse | folding % | ms a pair |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_report(args.out / "README.md", lines, start)


def _rows(model, sides: list[int], batch: dict, name: str, size) -> list[str]:
    scores = timed_scores({s: _guarded(model, s) for s in sides}, batch)
    epe, fold, ms = ({s: scores[s][k] for s in sides} for k in ("epe", "folding", "ms"))
    base = epe[sides[0]]  # the first value asked for (0: none)
    out = []
    for s in sides:
        registrar.COARSE_SIDE = s or None
        first = registrar.coarse_size(size)
        at = "-" if first is None else f"{first[0]} x {first[1]}"
        worse = sum(e > b + 0.5 for e, b in zip(epe[s], base, strict=True))
        mean_fold, median_ms = statistics.mean(fold[s]), statistics.median(ms[s])
        out.append(f"| {size[0]} x {size[1]} | {name} | {s or 'none'} | {at} | "
                   f"{statistics.mean(epe[s]):.3f} | {max(epe[s]):.2f} | {worse} | "
                   f"{mean_fold:.3f} | {median_ms:.0f} |")  # fmt: skip
    return out


def _guarded(model, side: int):
    """``model``'s one-shot with ``COARSE_SIDE`` = ``side`` (0: none) and the guard, as
    ``register`` runs it."""

    def run(f, m):
        registrar.COARSE_SIDE = side or None
        return keep_if_better(model(f, m), f, m, model.guard_similarity)[0]

    return run


if __name__ == "__main__":
    main()
