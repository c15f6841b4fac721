"""Timed jobs (one training step, one batched inference) and interleaved timing.

The machine is shared and noisy, so every comparison is measured in the same run, interleaved
(round-robin with a rotating start, after a warm-up); a speed-up is the median of per-round
time ratios, which pair measurements taken seconds apart.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from air_reg import warp
from air_reg.models import contract


def image_pairs(batch: int, size: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random (fixed, moving) images in [0, 1], (batch, 1, H, W) each, of side ``size``
    or (H, W), the same in every run."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(2 * batch, 1, h, w, generator=g), 5, 1, 2)
    return x[:batch].contiguous(), x[batch:].contiguous()


def with_threads(n: int, fn: Callable) -> Callable:
    """``fn`` run with ``n`` torch threads, the old count restored after."""

    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def _pairs_for(net: nn.Module, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(device) for t in image_pairs(batch, contract.image_size(net)))


def train_job(
    net: nn.Module, batch: int, *, bf16: bool = False, device: str = "cpu"
) -> Callable[[], None]:
    """One full step: forward, warp, MSE, backward, Adam (``net`` already on ``device``)."""
    fixed, moving = _pairs_for(net, batch, device)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    net.train()

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(warp(moving, net(fixed, moving)), fixed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer_job(
    net: nn.Module, batch: int, *, bf16: bool = False, device: str = "cpu"
) -> Callable[[], torch.Tensor]:
    """One batched inference call: flow + warp without gradients."""
    fixed, moving = _pairs_for(net, batch, device)
    net.eval()

    @torch.no_grad()
    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return warp(moving, net(fixed, moving))

    return step


def interleave(jobs: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every job, round-robin with a rotating start, after a warm-up."""
    for job in jobs.values():
        for _ in range(warmup):
            job()
    names, times = list(jobs), {k: [] for k in jobs}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def speedup(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of time(slow) / time(fast)."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True))


def timing_row(t: list[float], pairs: int) -> dict:
    """Table columns of one job's seconds per call, ``pairs`` pairs a call."""
    med = statistics.median(t)
    return {
        "pairs/s": pairs / med,
        "ms/pair": 1e3 * med / pairs,
        "spread %": 100 * (max(t) - min(t)) / med,
    }
