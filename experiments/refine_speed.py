"""Speed of native-size refinement: air-reg's CPU kernels vs the same computation in torch ops,
beside SimpleITK Demons, interleaved in one run on the same brain MRI pairs.

    python -m air_reg.data.brain           # once: data/brain_mni152/ from nilearn's wheel
    python experiments/refine_speed.py     # -> experiments/results/refine_speed/
    python experiments/refine_speed.py --pairs 8 --rounds 2   # quicker
    python experiments/refine_speed.py --per-op    # + the kernels without the fused level loop

Each round times, one after the other on the same pairs (held-out MNI152 slices at their own
233 x 197, each warped by a known smooth B-spline field of max 6 px, as in brain_mri.py):
model-free ``refine`` with the shipped preset on the kernels (each level's Adam loop in one
call, ``air_reg.speed.refine_loop``; with ``--per-op`` also step by step through autograd over
``air_reg.speed.warp``), the same with torch's ops (``speed.warp.torch_ops()``: the same
maths), and Demons pair by pair (brain_mri.py's settings). The order rotates every round; a
ratio is the median over rounds of the per-round ratio (the host is shared and noisy). The
end-point error on the head shows the three compute the same registration. Writes
refine_speed.md and refine_speed.csv.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from air_reg.bench import brain
from air_reg.bench.machine import cpu_name
from air_reg.bench.refinement import (
    interleaved_times,
    model_free,
    refine_preset,
    torch_ops,
)
from air_reg.bench.speed.timing import speedup
from air_reg.classical import demons, has_simpleitk
from air_reg.models.components.spatial_transformer import warp
from air_reg.speed import refine_loop

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("refine_speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="refine_steps (brain_mri.py's)")
    parser.add_argument("--per-op", action="store_true", help="+ refine_loop.per_op()'s row")
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/refine_speed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # (n, 1, 233, 197) test slices, each warped by one known B-spline field
    _, slices = brain.load_split(brain.data_root(REPO / "data" / "brain_mni152"), "test")
    g = torch.Generator().manual_seed(0)
    moving = torch.stack([torch.from_numpy(slices[k]) for k in sorted(slices)[: args.pairs]])
    moving = moving[:, None]
    targets = torch.cat(
        [brain.known_flow("bspline", tuple(moving.shape[-2:]), g) for _ in range(len(moving))]
    )
    fixed = warp(moving, targets)
    settings = refine_preset("default")

    def ours():
        return model_free(fixed, moving, args.steps, settings)

    def peer():
        return torch.cat([demons(fixed[i : i + 1], moving[i : i + 1], **brain.DEMONS)
                          for i in range(len(fixed))])  # fmt: skip

    def epe(flow):  # over every head pixel of every pair
        return (flow - targets).norm(dim=1)[fixed[:, 0] > brain.HEAD].mean().item()

    def per_op():  # autograd over the kernels of speed.warp, step by step
        with refine_loop.per_op():
            return ours()

    rows = {"air-reg kernels": ours, "torch ops (same maths)": torch_ops(ours)}
    if args.per_op:
        rows["per-op kernels (no fused loop)"] = per_op
    if has_simpleitk():
        rows["SimpleITK Demons"] = peer
    ours()  # warm-up: the kernels' build or load, torch's first calls
    load = os.getloadavg()[0]
    times, errors = interleaved_times(rows, args.rounds, len(fixed), epe)
    lines = [
        f"# Native-size refinement speed, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python experiments/refine_speed.py --pairs {args.pairs} --rounds {args.rounds} "
        f"--steps {args.steps}`; {os.cpu_count()} CPU cores ({cpu_name()}), "
        f"{torch.get_num_threads()} torch threads, load average {load:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at the end. {args.pairs} MNI152 test slices at 233 x 197 "
        "warped by known B-spline fields (max 6 px); model-free `refine`, "
        f"`refine_steps={args.steps}`, preset `default`; Demons pair by pair.",
        "",
        "| method | ms/pair (median) | min-max | ÷ air-reg kernels, median of rounds | EPE (px) |",
        "|---|---|---|---|---|",
    ]
    for name, t in times.items():
        ratio = speedup(times, name, "air-reg kernels")  # median over rounds of t / kernels'
        lines.append(f"| {name} | {statistics.median(t):.0f} | {min(t):.0f}-{max(t):.0f} | "
                     f"{ratio:.2f} | {errors[name]:.4f} |")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "refine_speed.md").write_text("\n".join(lines) + "\n")
    with open(args.out / "refine_speed.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "round", "ms_per_pair", "epe"])
        for name, t in times.items():
            writer.writerows([name, r, f"{v:.1f}", f"{errors[name]:.5f}"] for r, v in enumerate(t))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
