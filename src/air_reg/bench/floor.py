"""The floor of one refinement (issue #31): the arithmetic and memory traffic that the default
preset's optimisation needs for one pair, against what this machine can compute and move.

``work(size, settings)`` walks the preset as ``refine`` runs it (pyramid levels, steps per
level, the field grid, the control grid, the squarings) and counts per Adam step, forward and
backward: the B-spline evaluation (separable: a pass along rows, then along columns, per flow
channel), scaling and squaring (each squaring a bilinear warp of the 2-channel field), the
image warp through the upsampled flow at the level's size, the similarity and the penalties.
The per-element costs (``COSTS``) are stated estimates of the minimal work (flops, and bytes
moved assuming every array is read and written once per pass), not measurements of the code.
``machine()`` measures one core's matmul throughput and memory bandwidth here; ``floor`` is
the larger of the two times (a roofline). ``python experiments/refine_floor.py`` prints it
beside the measured refinement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from air_reg.refine import RefineSettings
from air_reg.refine.flows import control_grid, field_size, pyramid

# (flops, bytes) per element of each pass, forward; backward is counted as BACKWARD x forward.
COSTS = {
    "bspline": (2 * 4, 4 * 2),  # a 4-tap pass: 4 multiply-adds; read and write one float
    "warp2": (2 * 10, 4 * (4 * 2 + 2 + 2)),  # bilinear of 2 channels: weights + 4 taps each
    "warp1": (12, 4 * (4 + 2 + 1)),  # image: 4 taps, read the flow (2), write 1
    "upflow": (2 * 8, 4 * (2 + 2)),  # the coarse flow upsampled bilinearly to the level
    "similarity": (3, 4 * 2),  # MSE: difference, square, add; read both images
    "penalty": (30, 4 * 2 * 3),  # diffusion + det J of a 2-channel field: ~30 flops a pixel
    "adam": (12, 4 * 4),  # per control-point value: m, v, param, grad
}
BACKWARD = 2.0  # a backward pass costs about twice the forward's work


@dataclass(frozen=True)
class Work:
    """What one pair's refinement needs: flops and bytes, and the steps it takes."""

    flops: float
    bytes: float
    steps: int


def work(size: tuple[int, int], settings: RefineSettings | None = None) -> Work:
    """The flops and bytes of ``refine`` on one (H, W) pair with ``settings`` (default preset)."""
    s = settings or RefineSettings.preset("default", steps=60)
    grid = control_grid(size, s.grid, s.spacing)
    squarings = s.integration_steps or 0
    flops = nbytes = 0.0
    sizes = pyramid(size, s.levels, s.min_size)
    total_steps = 0
    for i, level in enumerate(sizes):
        steps = s.steps * (len(sizes) - i)
        field = field_size(level, s.stride_for(size), s.min_size)
        n_level, n_field = level[0] * level[1], field[0] * field[1]
        per = {
            "bspline": 2 * (field[0] * grid[1] + n_field) if grid else 0,  # 2 channels
            "warp2": squarings * n_field,
            "upflow": n_level,
            "warp1": n_level,
            "similarity": n_level,
            "penalty": n_field,
            "adam": 2 * grid[0] * grid[1] if grid else 2 * n_field,
        }
        for k, n in per.items():
            f, b = COSTS[k]
            scale = 1 if k == "adam" else 1 + BACKWARD
            flops += steps * n * f * scale
            nbytes += steps * n * b * scale
        total_steps += steps
    return Work(flops, nbytes, total_steps)


def machine(threads: int = 1, seconds: float = 0.5) -> dict:
    """One run of this machine's float32 matmul rate (GFLOP/s) and memory bandwidth (GB/s:
    a copy of 64 MB, beyond the caches; and of 1 MB, in them), on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(512, 512)
        gflops = _rate(lambda: a @ a, 2 * 512**3, seconds) / 1e9
        big, small = torch.empty(16 * 2**20), torch.empty(2**18)
        src_big, src_small = torch.randn_like(big), torch.randn_like(small)
        dram = _rate(lambda: big.copy_(src_big), 2 * big.numel() * 4, seconds) / 1e9
        cache = _rate(lambda: small.copy_(src_small), 2 * small.numel() * 4, seconds) / 1e9
    finally:
        torch.set_num_threads(before)
    return {"gflops": gflops, "dram_gbs": dram, "cache_gbs": cache}


def _rate(fn, amount: float, seconds: float) -> float:
    """``amount`` per second of ``fn``: the best of repeated timed calls within ``seconds``."""
    fn()
    best, end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < end:
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return amount / best


def floor_ms(w: Work, m: dict, in_cache: bool = True) -> dict:
    """The compute time, the memory time (in-cache or DRAM bandwidth) and the floor (their
    maximum), in ms."""
    compute = w.flops / (m["gflops"] * 1e9) * 1e3
    memory = w.bytes / ((m["cache_gbs"] if in_cache else m["dram_gbs"]) * 1e9) * 1e3
    return {"compute_ms": compute, "memory_ms": memory, "floor_ms": max(compute, memory)}
