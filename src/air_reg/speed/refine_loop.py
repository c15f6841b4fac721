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
the kernels. Volumes (B, C, D, H, W) run ``csrc/refine_loop3d.cpp`` (issue #34): the same maths
with trilinear sampling and the 3 x 3 Jacobian, MSE or the same MI (``csrc/mi.h``, shared; its
joint histogram summed in double), one volume's slices over the threads unless the machine is
oversubscribed (``_oversubscribed``). ``adam_affine_level`` is a level of the 2-D affine stage
(``refine.estimate_affine``: six numbers a pair, Adam with two learning rates) in one call
(``csrc/affine_loop.cpp``), for the same similarities.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch
from torch import nn

from air_reg.errors import UserError
from air_reg.losses import MSE, MutualInformation
from air_reg.speed import kernels
from air_reg.speed import warp as warp_ops

# One pair's level is split over a team of threads (~15 barriers a step) when each thread
# gets at least this many field rows and level pixels: measured 2026-12-06 21:15 on 2 quiet
# cores, team of 2 / one thread: 1.23x on a 58 x 49 level (field 29 x 25), 1.49x on 116 x 98,
# 1.61x on 233 x 197 (field 59 x 50); 0.95-1.24x on 28 x 28 (noise), left to one thread. The
# load is not asked for a pair (volumes ask it, _oversubscribed): a benchmark's own threads
# raise the load average above the core count, and one thread then cost more than the team
# (matrix run of 22:35, dropped). Since the team scatters without per-thread buffers
# (2026-12-07) the levels of a 233 x 197 pair gain another 1.08-1.11x (docs/speed.md, "One pair
# on both cores"; experiments/results/loop_ab/).
_MIN_ROWS = 8
_MIN_PIXELS = 1024
_MIN_SLICES = 8  # field slices per thread below which one volume is not split
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


class _Level3(ctypes.Structure):
    """``AirRefineLevel3`` in ``csrc/refine_loop3d.cpp``."""

    _fields_ = [
        *[(n, ctypes.c_void_p) for n in ("param", "m", "v", "fixed", "moving")],
        ("mats", ctypes.c_void_p * 3),
        ("affine", ctypes.c_void_p),
        ("matrix", ctypes.c_void_p),
        ("B", ctypes.c_long),
        ("C", ctypes.c_long),
        *[(n, ctypes.c_long * 3) for n in ("size", "field", "grid")],
        *[(n, ctypes.c_long) for n in ("squarings", "steps", "t")],
        ("lr", ctypes.c_double),
        ("decay", ctypes.c_double),
        ("scale", ctypes.c_float * 3),
        *[(n, ctypes.c_float) for n in ("reg_weight", "fold_weight", "fold_margin")],
        ("fixed_bins", ctypes.c_void_p),
        ("bins", ctypes.c_long),
        ("normalised", ctypes.c_long),
    ]


class _AffineLevel(ctypes.Structure):
    """``AirAffineLevel`` in ``csrc/affine_loop.cpp``."""

    _fields_ = [
        *[(n, ctypes.c_void_p) for n in ("matrix", "shift", "m", "v", "fixed", "moving")],
        *[(n, ctypes.c_long) for n in ("B", "C", "H", "W", "steps", "t")],
        ("lr_matrix", ctypes.c_double),
        ("lr_shift", ctypes.c_double),
        ("scale_y", ctypes.c_float),
        ("scale_x", ctypes.c_float),
        ("fixed_bins", ctypes.c_void_p),
        ("bins", ctypes.c_long),
        ("normalised", ctypes.c_long),
    ]


@functools.cache
def _function(name: str = "air_refine_level", level=_Level, team: bool = True):
    fn = getattr(kernels.library(), name)
    fn.argtypes = [ctypes.POINTER(level), *[ctypes.c_int] * (4 if team else 3)]
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


def supports(similarity: nn.Module, nd: int = 2) -> bool:
    """Whether the fused loop computes this similarity on ``nd``-D images (2 or 3): ``MSE``,
    or ``MutualInformation`` over all pixels (``sampling`` 1) with the box window on the fixed
    image (its defaults)."""
    if nd not in (2, 3):
        return False
    return type(similarity) is MSE or (
        type(similarity) is MutualInformation
        and similarity.sampling == 1
        and similarity.fixed_window == "box"
    )


def _fixed_bins(mi: MutualInformation, fixed: torch.Tensor) -> torch.Tensor:
    """(B, C * H * W) (or C * D * H * W) int32 box-window bins of the fixed image, as
    ``mutual_information``."""
    return mi._box_bins(mi._bin_coordinates(fixed.detach().flatten(1))).int().contiguous()


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
    slices: torch.Tensor | None = None,
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
    + (1 - decay) * (1 + cos(pi i / (steps - 1))) / 2)`` at step i, as ``_optimise``'s. Volumes
    (B, C, D, H, W) take ``slices`` (fd, gd) too, a (B, 3, gd, gh, gw) ``param``, three
    ``scale``s, ``affine`` (B, 3, fd, fh, fw) and ``matrix`` (B, 3, 3)."""
    if fixed.ndim == 5:
        return _adam_level_3d(param, m, v, t, fixed, moving, (slices, rows, cols), scale, affine,
                              matrix, similarity, squarings=squarings, steps=steps, lr=lr,
                              decay=decay, reg_weight=reg_weight, fold_weight=fold_weight,
                              fold_margin=fold_margin)  # fmt: skip
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
    similarity = _similarity(similarity, "adam_level")
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
    _run(_function(), level, b, max(1, min(threads, fh // _MIN_ROWS, h * w // _MIN_PIXELS)),
         state, work)  # fmt: skip
    return t + steps


def _adam_level_3d(param, m, v, t, fixed, moving, mats, scale, affine, matrix, similarity,
                   **knobs) -> int:  # fmt: skip
    """``adam_level`` on volumes (``csrc/refine_loop3d.cpp``)."""
    b, c, *size = fixed.shape
    fits = all(x is not None and x.ndim == 2 for x in mats)
    field = tuple(x.shape[0] for x in mats) if fits else ()
    grid = tuple(x.shape[1] for x in mats) if fits else ()
    shapes = [None if x is None else tuple(x.shape) for x in mats]
    if (
        not fits
        or moving.shape != fixed.shape
        or any(x.shape != (b, 3, *grid) for x in (param, m, v))
        or not all(2 <= f <= n for f, n in zip(field, size, strict=True))
        or len(scale) != 3
        or (affine is None) != (matrix is None)
        or (affine is not None and (affine.shape != (b, 3, *field) or matrix.shape != (b, 3, 3)))
    ):
        raise UserError(
            f"adam_level: volume shapes do not fit: param {tuple(param.shape)}, images "
            f"{tuple(fixed.shape)}, matrices {shapes} "
            f"(need param (B, 3, gd, gh, gw), slices (fd, gd), rows (fh, gh), cols (fw, gw), "
            f"2 <= field <= image per axis, three scales)"
        )
    similarity = _similarity(similarity, "adam_level", nd=3)
    kernels.count("refine_level", "fused")
    if not knobs["steps"]:
        return t
    state = [x.detach() for x in (param, m, v)]
    work = [x.contiguous() for x in state]  # updated in place, copied back when a copy
    inputs = [x.detach().contiguous() for x in (fixed, moving, *mats)]
    extra = [] if affine is None else [x.detach().contiguous() for x in (affine, matrix)]
    mi = type(similarity) is MutualInformation
    bins = _fixed_bins(similarity, fixed) if mi else None
    k = knobs
    level = _Level3(
        *[x.data_ptr() for x in work + inputs[:2]],
        (ctypes.c_void_p * 3)(*[x.data_ptr() for x in inputs[2:]]),
        *([x.data_ptr() for x in extra] or [None, None]),
        b, c, (ctypes.c_long * 3)(*size), (ctypes.c_long * 3)(*field),
        (ctypes.c_long * 3)(*grid), k["squarings"], k["steps"], t, k["lr"], k["decay"],
        (ctypes.c_float * 3)(*scale), k["reg_weight"], k["fold_weight"], k["fold_margin"],
        None if bins is None else bins.data_ptr(), similarity.bins if mi else 0,
        int(mi and similarity.normalised),
    )  # fmt: skip
    threads = max(1, torch.get_num_threads())
    team = 1 if _oversubscribed() else max(1, min(threads, field[0] // _MIN_SLICES))
    _run(_function("air_refine_level3d", _Level3), level, b, team, state, work)
    return t + k["steps"]


def adam_affine_level(
    matrix: torch.Tensor,
    shift: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    t: int,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    scale: tuple[float, float],
    steps: int,
    lr: tuple[float, float],
    similarity: nn.Module | None = None,
) -> int:
    """``steps`` of ``torch.optim.Adam`` (learning rates ``lr`` = (matrix's, shift's)) on each
    pair's ``similarity(warp(moving, affine_flow([matrix | shift * scale], (H, W))), fixed)``:
    one level of ``refine.estimate_affine`` on 2-D images, in one C++ call
    (``csrc/affine_loop.cpp``). ``matrix`` (B, 2, 2), ``shift`` (B, 2) (full-size pixels) and
    Adam's moments ``m``, ``v`` (B, 6: the matrix's four entries, then the shift's two) are
    updated in place; returns Adam's step count after ``t``. ``fixed``, ``moving`` (B, C, H,
    W) are the level's images, ``scale`` the level's size / full size per axis; the
    similarity is ``MSE()`` (None) or one ``supports`` names."""
    b, c, h, w = fixed.shape
    if (
        moving.shape != fixed.shape
        or matrix.shape != (b, 2, 2)
        or shift.shape != (b, 2)
        or m.shape != (b, 6)
        or v.shape != (b, 6)
    ):
        raise UserError(
            f"adam_affine_level: shapes do not fit: matrix {tuple(matrix.shape)}, shift "
            f"{tuple(shift.shape)}, moments {tuple(m.shape)}, images {tuple(fixed.shape)} (need "
            f"(B, 2, 2), (B, 2), (B, 6) and (B, C, H, W))"
        )
    similarity = _similarity(similarity, "adam_affine_level", caller="estimate_affine")
    kernels.count("affine_level", "fused")
    if not steps:
        return t
    state = [x.detach() for x in (matrix, shift, m, v)]
    work = [x.contiguous() for x in state]
    inputs = [x.detach().contiguous() for x in (fixed, moving)]
    mi = type(similarity) is MutualInformation
    bins = _fixed_bins(similarity, fixed) if mi else None
    level = _AffineLevel(
        *[x.data_ptr() for x in work + inputs], b, c, h, w, steps, t, *lr, *scale,
        None if bins is None else bins.data_ptr(), similarity.bins if mi else 0,
        int(mi and similarity.normalised),
    )  # fmt: skip
    fn = _function("air_affine_level", _AffineLevel, team=False)
    threads = min(max(1, torch.get_num_threads()), b)
    kernels.run_shares(lambda t0, t1: fn(ctypes.byref(level), threads, t0, t1), threads)
    _copy_back(state, work)
    return t + steps


def _similarity(similarity: nn.Module | None, who: str, nd: int = 2,
                caller: str = "refine") -> nn.Module:  # fmt: skip
    """``similarity`` (``MSE()`` for None) when the fused loops compute it (``supports``);
    else a ``UserError`` naming ``who`` and the autograd path of ``caller``."""
    similarity = MSE() if similarity is None else similarity
    if not supports(similarity, nd):
        where = " on volumes" if nd == 3 else ""
        raise UserError(
            f"{who} computes MSE or MutualInformation (sampling=1, fixed_window='box'){where}, "
            f"not {similarity!r}; {caller} runs the others through autograd"
        )
    return similarity


def _copy_back(state, work) -> None:
    """Copy the updated ``work`` tensors back into ``state`` where they were copies."""
    for x, y in zip(state, work, strict=True):
        if x.data_ptr() != y.data_ptr():
            x.copy_(y)


def _run(fn, level, b: int, team: int, state, work) -> None:
    """Call the level ``fn``: one pair's rows (slices) over a ``team`` of OpenMP threads, or
    the pairs over torch's threads; then copy the Adam state back where it was a copy."""
    if b == 1 and kernels.library().openmp:
        fn(ctypes.byref(level), team, 1, 0, 1)
    else:
        threads = min(max(1, torch.get_num_threads()), b)
        kernels.run_shares(lambda t0, t1: fn(ctypes.byref(level), 1, threads, t0, t1), threads)
    _copy_back(state, work)


def _oversubscribed() -> bool:
    """Whether more tasks want to run than this process has cores (1-minute load average). A
    team of threads meets at ~15 barriers a step, and on such a machine each barrier waits for
    a descheduled thread: measured 15 s with 2 threads vs 3 s with one on a 2 mm MNI152 pair
    (load 4 on 2 cores), so one thread runs a lone volume then."""
    try:
        cores = len(os.sched_getaffinity(0))
        return os.getloadavg()[0] > cores
    except (AttributeError, OSError):  # not Linux: no affinity or no load average
        return False
