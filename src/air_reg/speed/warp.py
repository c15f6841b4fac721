"""The warps of instance optimisation on air-reg's CPU kernels (``csrc/warp.cpp``).

``air_reg.refine`` spends nearly all of a step in three computations over dense fields:

- ``warp_by_coarse_flow(moving, flow)``: the image warped by a flow on a coarser grid, i.e.
  ``warp(moving, resize_flow(flow, moving's size))`` (bilinear upsampling, then bilinear
  sampling with border padding);
- ``integrate(velocity, steps)``: scaling and squaring, ``integrate_velocity``;
- ``penalty(flow, reg_weight, fold_weight, fold_margin)``: ``reg_weight * Diffusion()(flow)
  + fold_weight * NegativeJacobian(fold_margin)(flow)``, value and gradient in one pass.

In torch each is a dozen passes over the field (channel selects, scales, a stacked grid,
``grid_sample``, ``interpolate`` and their backwards, which fill zero tensors first); the
kernels do each forward and each backward in one pass, on torch's threads. Same maths: only
float32 rounding differs (tested against the torch ops). The kernels take CPU float32 tensors
in eager mode, an image that needs no gradient (the refinement's constant moving image) and a
flow no larger than the image; anything else, or no compiler, runs the torch ops.
``torch_ops()`` forces the torch ops (benchmarks, tests). ``upwarp`` is the former name of
``warp_by_coarse_flow`` (deprecated).
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from air_reg import deprecation
from air_reg.losses import Diffusion, NegativeJacobian
from air_reg.models.components.spatial_transformer import integrate_velocity, resize_flow, warp
from air_reg.speed import kernels

_MIN_ROWS = 16  # output rows per thread below which one thread is faster
_state = {"kernels": True}


@contextlib.contextmanager
def torch_ops():
    """Within this block ``warp_by_coarse_flow``, ``integrate`` and ``penalty`` run torch's
    ops."""
    before, _state["kernels"] = _state["kernels"], False
    try:
        yield
    finally:
        _state["kernels"] = before


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    return _state["kernels"] and kernels.why_not(*tensors) is None and kernels.available()


def _threads(units: int) -> int:
    return max(1, min(torch.get_num_threads(), units))


class _UpWarp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, moving: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        moving, flow = moving.detach().contiguous(), flow.detach().contiguous()
        (b, c, h, w), (fh, fw) = moving.shape, flow.shape[-2:]
        out = torch.empty_like(moving)
        fn, threads = kernels.library().air_upwarp_fwd, _threads(b * h // _MIN_ROWS)
        args = (moving.data_ptr(), flow.data_ptr(), out.data_ptr(), b, c, h, w, fh, fw, threads)
        kernels.run_shares(lambda t0, t1: fn(*args, t0, t1), threads)
        ctx.save_for_backward(moving, flow)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        moving, flow = ctx.saved_tensors
        grad = grad.contiguous()
        (b, c, h, w), (fh, fw) = moving.shape, flow.shape[-2:]
        grad_flow = torch.zeros_like(flow)
        fn, threads = kernels.library().air_upwarp_bwd, _threads(b)
        args = (moving.data_ptr(), flow.data_ptr(), grad.data_ptr(), grad_flow.data_ptr(),
                b, c, h, w, fh, fw, threads)  # fmt: skip
        kernels.run_shares(lambda t0, t1: fn(*args, t0, t1), threads)
        return None, grad_flow


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        u = u.detach().contiguous()
        b, _, h, w = u.shape
        out = torch.empty_like(u)
        fn, threads = kernels.library().air_square_fwd, _threads(b * h // _MIN_ROWS)
        kernels.run_shares(lambda t0, t1: fn(u.data_ptr(), out.data_ptr(), b, h, w, threads,
                                             t0, t1), threads)  # fmt: skip
        ctx.save_for_backward(u)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (u,) = ctx.saved_tensors
        b, _, h, w = u.shape
        grad = grad.contiguous()
        grad_u = grad.clone()  # the identity term; the kernel adds the sampling's
        fn, threads = kernels.library().air_square_bwd, _threads(b)
        kernels.run_shares(lambda t0, t1: fn(u.data_ptr(), grad.data_ptr(), grad_u.data_ptr(),
                                             b, h, w, threads, t0, t1), threads)  # fmt: skip
        return grad_u


def warp_by_coarse_flow(moving: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``warp(moving, resize_flow(flow, (H, W)))`` for an (h, w) flow with h <= H, w <= W:
    the (B, C, H, W) image warped by a flow computed on a coarser grid."""
    size = tuple(moving.shape[2:])  # (H, W) or (D, H, W)
    fits = flow.ndim == 4 and flow.shape[:2] == (moving.shape[0], 2)
    if (
        fits
        and flow.shape[-2] <= size[0]
        and flow.shape[-1] <= size[1]
        and not moving.requires_grad
        and _kernel_ok(moving, flow)
    ):
        kernels.count("warp_by_coarse_flow", "kernel")
        return _UpWarp.apply(moving, flow)
    kernels.count("warp_by_coarse_flow", "torch")
    return warp(moving, resize_flow(flow, size))


def upwarp(moving: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Deprecated name of ``warp_by_coarse_flow``."""
    deprecation.warn("air_reg.speed.warp.upwarp is deprecated; use warp_by_coarse_flow")
    return warp_by_coarse_flow(moving, flow)


def integrate(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """``integrate_velocity(velocity, steps)``: scaling and squaring."""
    if not steps or not _kernel_ok(velocity) or velocity.ndim != 4 or velocity.shape[1] != 2:
        if steps:
            kernels.count("integrate", "torch")
        return integrate_velocity(velocity, steps)
    kernels.count("integrate", "kernel")
    flow = velocity / (2**steps)
    for _ in range(steps):
        flow = _Square.apply(flow)
    return flow


class _Penalty(torch.autograd.Function):
    """Value and gradient come from one kernel pass; the backward scales the gradient."""

    @staticmethod
    def forward(ctx, flow: torch.Tensor, reg_weight: float, fold_weight: float, fold_margin):
        flow = flow.detach().contiguous()
        b, _, h, w = flow.shape
        grad = torch.zeros_like(flow)
        value = torch.zeros(b, dtype=torch.float64)
        fn, threads = kernels.library().air_flow_penalty, _threads(b)
        args = (flow.data_ptr(), grad.data_ptr(), value.data_ptr(), b, h, w,
                reg_weight, fold_weight, fold_margin, threads)  # fmt: skip
        kernels.run_shares(lambda t0, t1: fn(*args, t0, t1), threads)
        ctx.save_for_backward(grad)
        return value.sum().to(flow.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_value, None, None, None


def penalty(
    flow: torch.Tensor,
    reg_weight: float,
    fold_weight: float,
    fold_margin: float = 0.05,
    regularizer: torch.nn.Module | None = None,
    *,
    margin: float | None = None,
) -> torch.Tensor:
    """``reg_weight * regularizer(flow) + fold_weight * NegativeJacobian(fold_margin)(flow)``;
    ``regularizer`` defaults to ``Diffusion()``, the one the kernel computes (any other runs
    in torch ops). ``margin`` is the former name of ``fold_margin``."""
    fold_margin = deprecation.renamed("penalty", "margin", "fold_margin", margin, fold_margin)
    diffusion = regularizer is None or (
        type(regularizer) is Diffusion and regularizer.spacing is None  # pixels: the kernel's
    )
    if (
        diffusion
        and flow.ndim == 4
        and flow.shape[1] == 2
        and min(flow.shape[-2:]) >= 2
        and (_kernel_ok(flow))
    ):
        kernels.count("penalty", "kernel")
        return _Penalty.apply(flow, float(reg_weight), float(fold_weight), float(fold_margin))
    kernels.count("penalty", "torch")
    regularizer = Diffusion() if regularizer is None else regularizer
    value = flow.new_zeros(())
    if reg_weight:
        value = value + reg_weight * regularizer(flow)
    if fold_weight:
        value = value + fold_weight * NegativeJacobian(fold_margin)(flow)
    return value
