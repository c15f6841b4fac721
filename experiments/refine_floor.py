"""How close one refinement is to this machine's floor (issue #31): the flops and bytes the
default preset needs for one pair, what one core computes and moves per second, and the
measured time of the same refinement, at 28 x 28, 233 x 197 and 512 x 512.

    python experiments/refine_floor.py        # prints the table (docs/speed.md, "The floor")

The estimate and its assumptions: air_reg.bench.floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import air_reg
from air_reg.bench.floor import floor_ms, machine, work
from air_reg.bench.machine import cpu_name

SIZES = ((28, 28), (233, 197), (512, 512))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    m = machine()
    rates = (
        f"matmul {m['gflops']:.1f} GFLOP/s, copy {m['cache_gbs']:.1f} GB/s in cache, "
        f"{m['dram_gbs']:.1f} GB/s from memory"
    )
    print(f"{cpu_name()}, 1 thread, load {load:.2f}: {rates}\n")
    print(
        "| size | steps | GFLOP | MB moved | compute ms | memory ms (cache) | floor ms | "
        "measured ms (median) | measured / floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    model = air_reg.load_model(None, refine_steps=args.steps)
    g = torch.Generator().manual_seed(0)
    for size in SIZES:
        w = work(size, model.settings)
        f = floor_ms(w, m)
        fixed, moving = torch.rand(1, 1, *size, generator=g), torch.rand(1, 1, *size, generator=g)
        model(fixed, moving)  # warm-up
        times = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            model(fixed, moving)
            times.append(1e3 * (time.perf_counter() - tic))
        ms = statistics.median(times)
        print(f"| {size[0]} x {size[1]} | {w.steps} | {w.flops / 1e9:.3f} | {w.bytes / 1e6:.0f} | "
              f"{f['compute_ms']:.1f} | {f['memory_ms']:.1f} | {f['floor_ms']:.1f} | {ms:.0f} | "
              f"{ms / f['floor_ms']:.0f}x |")  # fmt: skip
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
