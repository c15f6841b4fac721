"""Speed of native-size refinement: air-reg's CPU kernels vs the same computation in torch ops,
beside SimpleITK Demons, interleaved in one run on the same brain MRI pairs.

    python experiments/brain_data.py       # once: data/brain_mni152/ from nilearn's wheel
    python experiments/refine_speed.py     # -> experiments/results/refine_speed/
    python experiments/refine_speed.py --pairs 8 --rounds 2   # quicker

Each round times, one after the other on the same pairs (held-out MNI152 slices at their own
233 x 197, each warped by a known smooth B-spline field of max 6 px, as in brain_mri.py):
model-free ``refine`` with the shipped preset on the kernels (``air_reg.speed.warp``), the
same with torch's ops (``speed.warp.torch_ops()``: the same maths), and Demons pair by pair
(brain_mri.py's settings). The order rotates every round; a ratio is the median over rounds of
the per-round ratio (the host is shared and noisy). The end-point error on the head shows the
three compute the same registration. Writes refine_speed.md and refine_speed.csv.
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
from benchmark_report import cpu_name
from brain_mri import DEMONS, HEAD, known_flow, load_split

from air_reg.classical import demons, has_simpleitk
from air_reg.models.components.spatial_transformer import warp
from air_reg.refine import load_preset, refine
from air_reg.speed import warp as fast

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("refine_speed")


def known_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fixed, moving, target flow), each (n, ., 233, 197): test slices warped by known fields."""
    _, slices = load_split("test")
    g = torch.Generator().manual_seed(0)
    moving = torch.stack([torch.from_numpy(slices[k]) for k in sorted(slices)[:n]])[:, None]
    targets = torch.cat([known_flow("bspline", tuple(moving.shape[-2:]), g) for _ in range(n)])
    return warp(moving, targets), moving, targets


def epe(flow: torch.Tensor, target: torch.Tensor, fixed: torch.Tensor) -> float:
    head = fixed[:, 0] > HEAD
    return (flow - target).norm(dim=1)[head].mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="refine_steps (brain_mri.py's)")
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/refine_speed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fixed, moving, targets = known_pairs(args.pairs)
    settings = load_preset("default")

    def ours():
        return refine(fixed, moving, steps=args.steps, **settings)

    def torch_ops():
        with fast.torch_ops():
            return ours()

    def peer():
        return torch.cat([demons(fixed[i : i + 1], moving[i : i + 1], **DEMONS)
                          for i in range(len(fixed))])  # fmt: skip

    rows = {"air-reg kernels": ours, "torch ops (same maths)": torch_ops}
    if has_simpleitk():
        rows["SimpleITK Demons"] = peer
    ours()  # warm-up: the kernels' build or load, torch's first calls
    load = os.getloadavg()[0]
    times = {name: [] for name in rows}
    errors = {}
    for r in range(args.rounds):
        names = list(rows)[r % len(rows) :] + list(rows)[: r % len(rows)]
        for name in names:
            tic = time.perf_counter()
            flow = rows[name]()
            times[name].append(1000 * (time.perf_counter() - tic) / len(fixed))
            errors[name] = epe(flow, targets, fixed)
        log.info("round %d: %s", r, {n: round(t[-1]) for n, t in times.items()})
    base = times["air-reg kernels"]
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
        ratio = statistics.median(a / b for a, b in zip(t, base, strict=True))
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
