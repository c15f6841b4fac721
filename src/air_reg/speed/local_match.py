"""AiR-Match's local window match at inference on air-reg's CPU kernel
(``csrc/local_match.cpp``).

``models.components.matching.local_match`` scores each fixed feature against the (2r+1)^2
moving features around it, softmaxes the scores and reads the flow as the mean offset. In
torch that is one shifted product and channel sum per offset (49 at r = 3), a score block, a
softmax and an einsum, about a third of a one-shot pass at 160 x 208; the kernel computes each
pixel block's scores in registers, then their softmax and mean offset, in one pass.
``KernelLocalMatch`` is what ``air_reg.speed.accelerate`` puts in place of the models' plain
``LocalMatch`` (unless ``speed.attention=sdpa``): the same maths, only float32 rounding
differs (flows within 1e-4 px of the torch ops, ``tests/test_air_match.py``).

Scope: 2-D, CPU float32, eager, no gradient needed (training and volumes run the torch ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from air_reg.models.components.matching import LocalMatch
from air_reg.speed import kernels

_MIN_ROWS = 8  # output rows a thread at least: tiny grids stay on one thread (not tuned)


def why_not(fixed: torch.Tensor, moving: torch.Tensor) -> str | None:
    """Why these features cannot go through the kernel (None when they can)."""
    if fixed.ndim != 4:
        return "it takes 2-D features (volumes run the torch ops)"
    if torch.is_grad_enabled() and (fixed.requires_grad or moving.requires_grad):
        return "it has no backward pass (training runs the torch ops)"
    if why := kernels.why_not(fixed, moving):
        return why
    return None if kernels.available() else f"the kernels are unavailable: {kernels.failure()}"


def local_match(fixed, moving, *, radius: int, scale, score: str = "l2", prior=0.0):
    """``matching.local_match`` on the kernel: flow (B, 2, h, w) from features (B, C, h, w)."""
    b, c, h, w = fixed.shape
    padded = F.pad(moving, (radius,) * 4, mode="replicate").contiguous()
    half = padded.square().sum(1).mul_(0.5) if score == "l2" else None  # |m|^2 / 2
    fixed, flow = fixed.contiguous(), fixed.new_empty(b, 2, h, w)
    fn, threads = kernels.library().air_local_match, max(1, min(torch.get_num_threads(),
                                                                b * h // _MIN_ROWS))  # fmt: skip
    args = (fixed.data_ptr(), padded.data_ptr(), None if half is None else half.data_ptr(),
            flow.data_ptr(), b, c, h, w, radius, float(scale), float(prior), threads)  # fmt: skip
    kernels.run_shares(lambda t0, t1: fn(*args, t0, t1), threads)
    return flow


class KernelLocalMatch(LocalMatch):
    """``LocalMatch`` on the kernel where it can run (``why_not``), else the torch ops."""

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, **kw) -> torch.Tensor:
        if kw.get("score", "l2") in ("l2", "dot") and why_not(fixed, moving) is None:
            kernels.count("local_match", "kernel")
            kw.pop("max_scores", None)  # no score block to bound
            return local_match(fixed, moving, **kw)
        kernels.count("local_match", "torch")
        return super().forward(fixed, moving, **kw)
