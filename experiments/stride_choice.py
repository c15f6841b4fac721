"""How coarse the refinement's field grid is while optimising (``refine.field_stride``, issue
#31), on the tune split only: EPE, folding and time per pair for each stride.

    python experiments/stride_choice.py   # ~3 min on 2 cores -> results/stride_choice/

The field (its B-spline evaluation, scaling and squaring, penalties) lives on a grid
``field_stride`` times coarser than each pyramid level; the images stay at the level's size,
and the result is integrated at full size. A level too small for the stride (a side under
``min_size``) takes the stride halved (``refine.flows.field_size``). Tune sets: the 10
MNI152 tune slices at 233 x 197 under 5 px fields, scikit-image's 8 tune images cropped at
512 x 512 under 8 px fields, and 18 tune pairs of each family (160 x 208; small and large
with MSE, contrast with mutual information). Model-free, the default preset with
``refine_steps=60``, one pair a call (as ``register`` runs it), the strides taking turns pair
by pair. EPE px over every pixel (mean), folding: % of pixels with det J <= 0 (mean), ms a pair
(median; with ``--rounds`` R, R calls a pair and stride).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from air_reg import metrics as M
from air_reg.bench import families as fam
from air_reg.bench.machine import run_header, write_report
from air_reg.refine import RefineSettings, refine

OUT = Path(__file__).resolve().parent / "results" / "stride_choice"
STRIDES = (2, 4, 8)


def tune_sets(pairs: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]:
    """(fixed, moving, true flow, similarity) of each tune set."""
    g = torch.Generator().manual_seed(41)
    out = {
        "MNI152 slices, 5 px (10, 233 x 197)": (*fam.mni_known("tune", g), "mse"),
        "scikit-image crops, 8 px (8, 512 x 512)": (*fam.skimage_known("tune", g), "mse"),
    }
    for name in fam.FAMILIES:
        b = fam.family(name, pairs, split="tune", seed=2)[0]
        similarity = "mi" if name == "contrast" else "mse"
        out[f"family {name} ({pairs}, 160 x 208, {similarity.upper()})"] = (
            b["fixed"], b["moving"], b["flow"], similarity)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strides", type=int, nargs="+", default=list(STRIDES))
    ap.add_argument("--pairs", type=int, default=18, help="tune pairs a family")
    ap.add_argument("--rounds", type=int, default=1, help="timed calls a pair and stride")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    start, header = time.time(), run_header()
    lines = [
        "# The field grid's stride (issue #31)",
        "",
        f"{header}; `python experiments/stride_choice.py`; model-free `refine_steps=60`, one "
        "pair a call, tune sets only. Each cell: EPE px / folding % / ms a pair (median).",
        "",
        "| tune set | identity EPE | " + " | ".join(f"stride {s}" for s in args.strides) + " |",
        "|---|---|" + "---|" * len(args.strides),
    ]
    for name, (fixed, moving, flow, similarity) in tune_sets(args.pairs).items():
        settings = {s: RefineSettings(steps=60, similarity=similarity, field_stride=s)
                    for s in args.strides}  # fmt: skip
        refine(fixed[:1], moving[:1], None, settings[args.strides[0]])  # warm-up
        epe = {s: [] for s in settings}
        fold = {s: [] for s in settings}
        ms = {s: [] for s in settings}
        for i in range(len(fixed)):
            order = args.strides[i % len(settings) :] + args.strides[: i % len(settings)]
            for s in order:
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    got = refine(fixed[i : i + 1], moving[i : i + 1], None, settings[s])
                    ms[s].append(1000 * (time.perf_counter() - t))
                epe[s].append(float((got - flow[i : i + 1]).norm(dim=1).mean()))
                fold[s].append(100 * float(M.folding(got).mean()))
        cells = [f"{statistics.mean(epe[s]):.3f} / {statistics.mean(fold[s]):.3f} / "
                 f"{statistics.median(ms[s]):.0f}" for s in args.strides]  # fmt: skip
        ident = float(flow.norm(dim=1).mean())
        lines.append(f"| {name} | {ident:.3f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_report(args.out / "README.md", lines, start)


if __name__ == "__main__":
    main()
