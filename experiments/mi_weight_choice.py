"""How the diffusion weight that goes with each similarity (``refine.reg_weight: auto``) was
chosen (issue #31), on the tune split only.

    python experiments/mi_weight_choice.py   # ~1 min on 2 cores -> results/mi_weight_choice/

Pairs: the first 6 of each family of ``air_reg.bench.families`` (small, large, contrast) on
the tune sources, 160 x 208, one pair a call. Model-free refinement, the default preset with
``refine_steps=60``, MSE at three weights and mutual information at five. EPE px over every
pixel, mean over the pairs (the guard on, as ``register`` runs: a pair it refuses scores the
identity's error). The chosen weights are ``air_reg.refine.settings.REG_WEIGHTS``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from air_reg.bench import families as fam
from air_reg.bench.machine import run_header, write_report
from air_reg.refine import RefineSettings, refine
from air_reg.refine.settings import REG_WEIGHTS

OUT = Path(__file__).resolve().parent / "results" / "mi_weight_choice"
WEIGHTS = {"mse": (0.002, 0.01, 0.05), "mi": (0.05, 0.2, 1.0, 2.0, 5.0)}
FAMILIES = ("small", "large", "contrast")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=6, help="pairs a family")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    start = time.time()
    header = run_header()
    batches = {f: fam.family(f, args.pairs, split="tune")[0] for f in FAMILIES}
    row = {f: float(b["flow"].norm(dim=1).mean()) for f, b in batches.items()}
    rows = [("identity", row)]
    for similarity, weights in WEIGHTS.items():
        for w in weights:
            s = RefineSettings(steps=60, similarity=similarity, reg_weight=w)
            row = {}
            for f, b in batches.items():
                epe = []
                for i in range(args.pairs):
                    got = refine(b["fixed"][i : i + 1], b["moving"][i : i + 1], None, s)
                    epe.append(float((got - b["flow"][i : i + 1]).norm(dim=1).mean()))
                row[f] = statistics.mean(epe)
            chosen = " (chosen)" if REG_WEIGHTS.get(similarity) == w else ""
            rows.append((f"{similarity.upper()}, reg_weight {w}{chosen}", row))
            print(rows[-1], flush=True)
    lines = [
        "# The diffusion weight of each similarity (issue #31)",
        "",
        f"{header}; `python experiments/mi_weight_choice.py`; the first {args.pairs} tune pairs "
        f"of each family, 160 x 208, model-free `refine_steps=60`, one pair a call. EPE px, mean.",
        "",
        "| | " + " | ".join(FAMILIES) + " |",
        "|---|" + "---|" * len(FAMILIES),
    ]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(f"{row[f]:.3f}" for f in FAMILIES) + " |")
    write_report(args.out / "README.md", lines, start)


if __name__ == "__main__":
    main()
