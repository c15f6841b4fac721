"""One pyramid level of ``air_reg.refine``'s Adam loop in one C++ call (``csrc/refine_loop.cpp``,
issue #31).

``refine`` takes ``steps`` Adam steps per level on ``b * (similarity(warped, fixed) +
penalty)``, each an autograd pass through a dozen small ops (and the kernels of
``speed.warp``); most of a step's time there is per-op overhead, not arithmetic.
``adam_level`` runs the same maths (the B-spline control grid made dense, scaling and squaring,
the affine composition, the warp through the upsampled flow, the similarity, the diffusion and
fold penalties, every transpose written out, then ``_Adam``'s update with ``_optimise``'s
cosine step) for a whole level in one call: pairs over torch's threads when B > 1, one pair's
rows over them when B == 1. Same floats up to the order of some sums (tested against
autograd). The similarity is ``MSE`` or a ``MutualInformation`` over all pixels with its box
window on the fixed image (``supports``): then each step builds the joint histogram, its
entropies and ``_ParzenMI``'s analytic gradient (the min/max mapping's terms too). ``refine``
takes it for float32 CPU, those similarities, the pixel ``Diffusion``, Adam and a control grid;
``per_op()`` turns it off (benchmarks, tests) and ``speed.warp.torch_ops()`` turns it off with
the kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch
from torch import nn

from air_reg.errors import UserError
from air_reg.losses import MSE, MutualInformation
from air_reg.speed import kernels
from air_reg.speed import warp as warp_ops

_MIN_ROWS = 32  # field rows per thread below which one pair is not split (a barrier a pass)
_state = {"fused": True}


class _Level(ctypes.Structure):
    """``AirRefineLevel`` in ``csrc/refine_loop.cpp``."""

    _fields_ = [
        *[
            (n, ctypes.c_void_p)
            for n in ("param", "m", "v", "fixed", "moving", "rows", "cols", "affine", "matrix")
        ],  # fmt: skip
        *[
            (n, ctypes.c_long)
            for n in ("B", "C", "H", "W", "fh", "fw", "gh", "gw", "squarings", "steps", "t")
        ],  # fmt: skip
        ("lr", ctypes.c_double),
        ("decay", ctypes.c_double),
        *[
            (n, ctypes.c_float)
            for n in ("scale_y", "scale_x", "reg_weight", "fold_weight", "fold_margin")
        ],  # fmt: skip
        ("fixed_bins", ctypes.c_void_p),
        ("bins", ctypes.c_long),
        ("normalised", ctypes.c_long),
    ]


@functools.cache
def _function():
    fn = kernels.library().air_refine_level
    fn.argtypes = [ctypes.POINTER(_Level), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = None
    return fn


@contextlib.contextmanager
def per_op():
    """Within this block ``refine`` runs its per-op path (autograd over ``speed.warp``'s
    kernels, or torch's ops under ``torch_ops()``) instead of the fused level loop."""
    before, _state["fused"] = _state["fused"], False
    try:
        yield
    finally:
        _state["fused"] = before


def supports(similarity: nn.Module) -> bool:
    """Whether the fused loop computes this similarity: ``MSE``, or ``MutualInformation`` over
    all pixels (``sampling`` 1) with the box window on the fixed image (its defaults)."""
    if type(similarity) is MSE:
        return True
    return (
        type(similarity) is MutualInformation
        and similarity.sampling == 1
        and similarity.fixed_window == "box"
    )


def _fixed_bins(mi: MutualInformation, fixed: torch.Tensor) -> torch.Tensor:
    """(B, C * H * W) int32 box-window bins of the fixed image, as ``mutual_information``."""
    s = mi._bin_coordinates(fixed.detach().flatten(1))
    scaled = (s - 1) / (mi.bins - 3) * mi.bins
    return scaled.long().clamp(0, mi.bins - 1).int().contiguous()


def available(*tensors: torch.Tensor) -> bool:
    """Whether the fused loop may run on these tensors here (not under ``per_op()`` or
    ``torch_ops()``; CPU float32, eager, kernels built)."""
    return _state["fused"] and warp_ops._kernel_ok(*tensors)  # torch_ops() lives there


def adam_level(
    param: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: int,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: tuple[float, float],
    squarings: int,
    steps: int,
    lr: float,
    decay: float,
    reg_weight: float,
    fold_weight: float,
    fold_margin: float,
    affine: torch.Tensor | None = None,
    matrix: torch.Tensor | None = None,
    similarity: nn.Module | None = None,
) -> int:
    """``steps`` Adam steps on each pair's ``similarity(warp_by_coarse_flow(moving, flow),
    fixed) + penalty(flow, reg_weight, fold_weight, fold_margin)`` (``similarity``: ``MSE()``
    when None; see ``supports``), ``flow`` =
    ``after_affine(integrate(scale * rows @ param @ cols^T, squarings))``: ``param`` (B, 2, gh,
    gw) and Adam's moments ``m``, ``v`` are updated in place; returns Adam's step count after
    ``t``. ``fixed``, ``moving`` (B, C, H, W) are the level's images, ``rows`` (fh, gh) and
    ``cols`` (fw, gw) make the grid dense on the (fh, fw) field grid (fh <= H, fw <= W,
    ``scale`` = field grid / full image size); ``affine`` (B, 2, fh, fw) and ``matrix`` (B, 2,
    2) = A - I the level's affine displacement and matrix, or None. The step is ``lr * (decay
    + (1 - decay) * (1 + cos(pi i / (steps - 1))) / 2)`` at step i, as ``_optimise``'s."""
    (b, c, h, w), (fh, gh), (fw, gw) = fixed.shape, rows.shape, cols.shape
    if (
        moving.shape != fixed.shape
        or param.shape != (b, 2, gh, gw)
        or m.shape != param.shape
        or v.shape != param.shape
        or not (2 <= fh <= h and 2 <= fw <= w)
        or (affine is None) != (matrix is None)
        or (affine is not None and (affine.shape != (b, 2, fh, fw) or matrix.shape != (b, 2, 2)))
    ):
        raise UserError(
            f"adam_level: shapes do not fit: param {tuple(param.shape)}, images "
            f"{tuple(fixed.shape)}, rows {tuple(rows.shape)}, cols {tuple(cols.shape)} (need "
            f"param (B, 2, gh, gw), rows (fh, gh), cols (fw, gw), 2 <= fh <= H, 2 <= fw <= W)"
        )
    similarity = MSE() if similarity is None else similarity
    if not supports(similarity):
        raise UserError(
            f"adam_level computes MSE or MutualInformation (sampling=1, fixed_window='box'), "
            f"not {similarity!r}; refine runs the others through autograd"
        )
    kernels.count("refine_level", "fused")
    if not steps:
        return t
    state = [x.detach() for x in (param, m, v)]
    work = [x.contiguous() for x in state]  # updated in place, copied back when a copy
    inputs = [x.detach().contiguous() for x in (fixed, moving, rows, cols)]
    if affine is not None:
        inputs += [affine.detach().contiguous(), matrix.detach().contiguous()]
    mi = type(similarity) is MutualInformation
    bins = _fixed_bins(similarity, fixed) if mi else None
    level = _Level(
        *[x.data_ptr() for x in work + inputs[:4]],
        *([x.data_ptr() for x in inputs[4:]] or [None, None]),
        b, c, h, w, fh, fw, gh, gw, squarings, steps, t,
        lr, decay, *scale, reg_weight, fold_weight, fold_margin,
        None if bins is None else bins.data_ptr(), similarity.bins if mi else 0,
        int(mi and similarity.normalised),
    )  # fmt: skip
    threads = max(1, torch.get_num_threads())
    fn = _function()
    if b == 1 and kernels.library().openmp:  # one pair: its rows over the threads
        fn(ctypes.byref(level), max(1, min(threads, fh // _MIN_ROWS)), 1, 0, 1)
    else:
        threads = min(threads, b)
        kernels.run_shares(lambda t0, t1: fn(ctypes.byref(level), 1, threads, t0, t1), threads)
    for x, y in zip(state, work, strict=True):
        if x.data_ptr() != y.data_ptr():
            x.copy_(y)
    return t + steps
