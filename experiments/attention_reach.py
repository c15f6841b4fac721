"""Where attention's global match matters (issue #32): the large-motion family with its affine
shifts widened from +-8 px (the benchmark's) to +-16, +-24 and +-32 px per axis, the shipped
global match against its local-window ablation and the synthetic-trained VoxelMorph (at
AiR-Match's inference), one-shot, on the test split.

    python experiments/attention_reach.py         # ~4 min on 2 cores -> results/attention_reach/
    python experiments/attention_reach.py --ants  # + ANTs SyN with its affine stage (~+8 min)

The local window at the coarsest scale (1/8, radius 3) reaches +-24 px in one pass (the
cascade's passes and the affine stage in front extend it); the global match reaches any
position. The models were trained on motions up to about 10 % of the side (128 x 128): the
wider shifts are also beyond their training distribution. Nothing here is chosen from these
runs: a characterisation, not a tuning set.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from air_reg.bench import families
from air_reg.bench.family_bench import NET, NET_CASCADE, make_method
from air_reg.bench.machine import run_header, write_report
from air_reg.metrics import epe

REPO = Path(__file__).resolve().parents[1]
FOUNDATION = REPO / "experiments" / "results" / "foundation"
MODELS = {  # label: method key (family_bench), the 6,250-step weights of each
    "global match (AiR-Match)": f"{NET}:air_match_synth",
    "local window": f"{NET}:{FOUNDATION}/air_match_local_synth/checkpoints/step6250.ckpt",
    "VoxelMorph, AiR-Match's inference": (
        f"{NET_CASCADE}:{FOUNDATION}/voxelmorph_synth/checkpoints/step6250.ckpt"
    ),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shifts", type=float, nargs="+", default=[8.0, 16.0, 24.0, 32.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="test-split seeds")
    p.add_argument("--pairs", type=int, default=18, help="pairs a seed")
    p.add_argument("--ants", action="store_true", help="add ANTs SyN with its affine stage")
    p.add_argument(
        "--out", type=Path, default=REPO / "experiments" / "results" / "attention_reach"
    )
    args = p.parse_args(argv)
    start, head = time.time(), run_header()
    methods = {"identity": "identity", **MODELS}
    if args.ants:
        methods["ANTs SyN (affine + SyN)"] = "syn_affine"
    fns = {label: make_method(key, "large") for label, key in methods.items()}
    fns = {label: fn for label, fn in fns.items() if fn is not None}
    errors = {s: {label: [] for label in fns} for s in args.shifts}
    at_edges = {s: {label: [] for label in fns} for s in args.shifts}  # the families' edges
    for shift in args.shifts:
        for seed in args.seeds:
            batch = families.family("large", args.pairs, seed=seed, shift_px=shift)[0]
            for i in range(args.pairs):
                f, m, truth, edges = (batch[k][i : i + 1]
                                      for k in ("fixed", "moving", "flow", "edges"))  # fmt: skip
                for label, fn in fns.items():
                    with torch.no_grad():
                        flow = fn(f, m)
                    errors[shift][label].append(epe(flow, truth).item())
                    at_edges[shift][label].append(epe(flow, truth, edges).item())
        print(f"+-{shift:g} px:", {k: round(statistics.mean(v), 3)
                                   for k, v in errors[shift].items()})  # fmt: skip
    labels = list(fns)
    n = len(args.seeds) * args.pairs
    lines = [f"# Where the global match matters: wider large motions ({head})", "",
             f"`python experiments/attention_reach.py --shifts "
             f"{' '.join(f'{s:g}' for s in args.shifts)} --seeds "
             f"{' '.join(map(str, args.seeds))}{' --ants' if args.ants else ''}`: the large "
             f"family (`air_reg.bench.families`, test split, {families.SIZE[0]} x "
             f"{families.SIZE[1]}) with its affine shifts widened, {n} pairs a row (seeds "
             f"{', '.join(map(str, args.seeds))}), one pair a call, one-shot as `register` runs "
             "each model (with its guard). EPE px, mean over the pairs (worst pair); the "
             "global match's edge: 1 - its EPE / the other's.", "",
             "| shifts | " + " | ".join(labels) + " | edge vs local window | edge vs VoxelMorph |",
             "|---" * (len(labels) + 3) + "|"]  # fmt: skip
    glob, local, vxm = (labels[1], labels[2], labels[3])
    for shift in args.shifts:
        mean = {k: statistics.mean(v) for k, v in errors[shift].items()}
        cells = [f"{mean[k]:.3f} ({max(errors[shift][k]):.1f})" for k in labels]
        edges = [f"{100 * (1 - mean[glob] / mean[other]):.1f} %" for other in (local, vxm)]
        lines.append(f"| +-{shift:g} px | " + " | ".join(cells + edges) + " |")
    lines += ["", "EPE px at the fixed image's strongest 20 % gradients whose true target lies "
              "inside the moving image (`families.masks`: where the images say where a pixel "
              "went), mean over the pairs that have such pixels:", "",
              "| shifts | " + " | ".join(labels) + " |",
              "|---" * (len(labels) + 1) + "|"]  # fmt: skip
    for shift in args.shifts:
        cells = []
        for k in labels:
            kept = [e for e in at_edges[shift][k] if not math.isnan(e)]
            cells.append(f"{statistics.mean(kept):.3f}" if kept else "-")
        lines.append(f"| +-{shift:g} px | " + " | ".join(cells) + " |")
    write_report(args.out / "README.md", lines, start)


if __name__ == "__main__":
    main()
