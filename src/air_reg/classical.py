"""Classical baselines, returning flows in our convention: SimpleITK diffeomorphic Demons and
ANTs SyN (antspyx), on 2-D or 3-D pairs in one code path.

Our arrays are (H, W) or (D, H, W) and a flow's channel i runs along array axis i, in voxels.
SimpleITK reads numpy axes in reverse (ITK's x is our last axis); antspyx keeps numpy's order.

SimpleITK (``pip install air-reg[classical]``) and antspyx (``pip install air-reg[peers]``)
are optional and imported only when used.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch

from air_reg.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = "SimpleITK is needed for the classical baselines: pip install air-reg[classical]"
ANTS_HINT = "antspyx is needed for the ANTs SyN baseline: pip install air-reg[peers]"


def has_simpleitk() -> bool:
    """Whether SimpleITK can be imported."""
    try:
        _sitk()
    except ImportError:
        return False
    return True


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return sitk


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    """``spacing`` (mm per voxel, one per spatial axis in our axis order) as floats; 1s if None."""
    if spacing is None:
        return (1.0,) * ndim
    out = tuple(float(s) for s in spacing)
    if len(out) != ndim or not all(s > 0 for s in out):
        raise ConfigError(
            f"spacing needs {ndim} positive values (mm per voxel, one per axis), got {spacing!r}"
        )
    return out


def to_sitk_image(image: torch.Tensor, spacing: tuple[float, ...] | None = None):
    """(H, W) or (D, H, W) tensor -> float32 SimpleITK image, origin 0, identity direction,
    ``spacing`` (our axis order; default 1: index = mm)."""
    sitk = _sitk()
    # GetImageFromArray reads numpy axes in reverse: our (D, H, W) is ITK's (z, y, x)
    img = sitk.GetImageFromArray(image.detach().cpu().numpy().astype(np.float32))
    if spacing is not None:
        img.SetSpacing(_spacing(spacing, image.ndim)[::-1])
    return img


def field_to_flow(field) -> torch.Tensor:
    """SimpleITK displacement field on the fixed grid -> our flow (N, *spatial) in voxels,
    channel i along our axis i (rows before columns)."""
    sitk = _sitk()
    arr = sitk.GetArrayFromImage(field)  # (*spatial, N), components in physical (x, y[, z])
    spacing = np.asarray(field.GetSpacing())  # (x, y[, z]) mm per voxel
    if (spacing != 1).any():  # identity direction, origin 0: voxels = mm / spacing
        arr = arr / spacing
    # (x, y[, z]) -> our (... rows, cols) order, channels first
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr[..., ::-1], -1, 0))).float()


def flow_to_field(flow: torch.Tensor, spacing: tuple[float, ...] | None = None):
    """Our flow (N, *spatial) in voxels -> SimpleITK displacement field image (float64 vectors
    in mm, (x, y[, z])), with ``spacing`` (our axis order; default 1)."""
    sitk = _sitk()
    n = flow.shape[0]
    arr = flow.detach().cpu().double().numpy()
    if spacing is not None:
        arr = arr * np.asarray(_spacing(spacing, n)).reshape(n, *(1,) * n)
    arr = np.moveaxis(arr[::-1], 0, -1)  # (*spatial, N) as (x, y[, z])
    field = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)
    if spacing is not None:
        field.SetSpacing(_spacing(spacing, n)[::-1])
    return field


def check_pairs(fixed: torch.Tensor, moving: torch.Tensor) -> None:
    """Raise ``ConfigError`` unless ``fixed`` and ``moving`` are (B, 1, H, W) or
    (B, 1, D, H, W) of one shape."""
    shapes = [
        tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        for x in (fixed, moving)
    ]
    if not (
        isinstance(fixed, torch.Tensor)
        and isinstance(moving, torch.Tensor)
        and fixed.ndim in (4, 5)
        and fixed.shape[1] == 1
        and fixed.shape == moving.shape
        and fixed.shape[0] > 0
        and min(fixed.shape[2:]) > 1
    ):
        raise ConfigError(
            f"the classical baselines take fixed and moving tensors of one shape (B, 1, H, W) "
            f"or (B, 1, D, H, W) (B >= 1 pairs, one channel, sides >= 2), got {shapes[0]} and "
            f"{shapes[1]}; add the batch and channel axes with image[None, None] or pick one "
            f"channel"
        )


def demons_filter(
    *,
    iterations: int = 100,
    smoothing_sigma: float = 1.0,
    update_sigma: float | None = None,
    max_step: float = 2.0,
    num_threads: int | None = None,
):
    """A configured ``sitk.DiffeomorphicDemonsRegistrationFilter`` (symmetric ESM forces)."""
    sitk = _sitk()
    f = sitk.DiffeomorphicDemonsRegistrationFilter()
    f.SetNumberOfIterations(iterations)
    f.SetSmoothDisplacementField(True)  # Gaussian on the total field: the elastic-like prior
    f.SetStandardDeviations(smoothing_sigma)  # pixels (unit spacing)
    f.SetSmoothUpdateField(update_sigma is not None)  # fluid-like prior on each update
    if update_sigma is not None:
        f.SetUpdateFieldStandardDeviations(update_sigma)
    f.SetMaximumUpdateStepLength(max_step)  # px per iteration; ITK's 0.5 is slow on MNIST
    f.SetMaximumRMSError(0.0)  # no early stop on RMS change: always `iterations` iterations
    if num_threads is not None:
        f.SetNumberOfThreads(num_threads)
    return f


def demons(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    iterations: int = 100,
    smoothing_sigma: float = 1.0,
    *,
    update_sigma: float | None = None,
    max_step: float = 2.0,
    histogram_matching: bool = False,
    levels: int = 1,
    spacing: tuple[float, ...] | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Diffeomorphic Demons pair by pair; (B, 1, H, W) or (B, 1, D, H, W) images -> flow
    (B, 2, H, W) or (B, 3, D, H, W) in voxels.

    ``histogram_matching`` maps the moving intensities onto the fixed ones first (for
    different scanners; off by default because our pairs share intensities in [0, 1]).
    ``levels > 1``: a pyramid, each level binned by 2 (``sitk.BinShrink``) and started from
    the coarser level's field, ``iterations`` at each (sigmas in voxels of the level).
    ``spacing`` (mm per voxel, our axis order) is the images' geometry; the flow stays in voxels.
    """
    check_pairs(fixed, moving)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ConfigError(f"demons: levels must be an int >= 1, got {levels!r}")
    sitk = _sitk()
    f = demons_filter(
        iterations=iterations,
        smoothing_sigma=smoothing_sigma,
        update_sigma=update_sigma,
        max_step=max_step,
        num_threads=num_threads,
    )
    flows = []
    for fix, mov in zip(fixed[:, 0], moving[:, 0], strict=True):  # (*spatial) each
        fix_img, mov_img = to_sitk_image(fix, spacing), to_sitk_image(mov, spacing)
        if histogram_matching:
            mov_img = sitk.HistogramMatching(mov_img, fix_img, 256, 7, True)
        # The output field d lives on the fixed grid and maps fixed points p to moving
        # points p + d(p): Resample(moving, DisplacementFieldTransform(d)) = moving(p + d(p)),
        # which is exactly our backward-warp convention once (x, y[, z]) becomes our axes.
        if levels == 1:
            field = f.Execute(fix_img, mov_img)
        else:
            field = _demons_pyramid(sitk, f, fix_img, mov_img, levels)
        flows.append(field_to_flow(field))
    log.debug("demons: %d pairs, %d iterations, %d levels", len(flows), iterations, levels)
    return torch.stack(flows).to(device=fixed.device, dtype=fixed.dtype)


def _demons_pyramid(sitk, f, fix_img, mov_img, levels: int):
    """Coarse to fine: each level's field (physical mm) resampled onto the next level's grid."""
    field = None
    for k in reversed(range(levels)):
        shrink = [min(2**k, max(1, n // 4)) for n in fix_img.GetSize()]  # >= 4 voxels a side
        f_k, m_k = (sitk.BinShrink(x, shrink) if k else x for x in (fix_img, mov_img))
        if field is None:
            field = f.Execute(f_k, m_k)
            continue
        up = sitk.ResampleImageFilter()
        up.SetReferenceImage(f_k)
        up.SetInterpolator(sitk.sitkLinear)
        up.SetUseNearestNeighborExtrapolator(True)  # binning drops an odd last voxel
        field = f.Execute(f_k, m_k, up.Execute(field))
    return field


# ANTs SyN ------------------------------------------------------------------------------------
# antspyx's defaults are tuned for 1 mm brain MRI: Mattes MI and (40, 20, 0) iterations, i.e. no
# iterations at full resolution. On small 2-D images with shared intensities, CC of radius 2 and
# iterations at every level (shrink 4, 2, 1; smoothing 2, 1, 0 px) register far better
# (docs/protocol.md, "Peers"). Any other `ants.registration` keyword can be passed as well.
SYN_DEFAULTS = {
    "syn_metric": "CC",  # CC | mattes | meansquares | demons
    "syn_sampling": 2,  # CC radius (px), or the number of histogram bins for mattes
    "reg_iterations": (100, 70, 50),  # per level; len 3 = shrink factors 4x2x1, sigmas 2x1x0
    "grad_step": 0.2,
    "flow_sigma": 3.0,  # Gaussian on each update (px): the fluid-like prior
    "total_sigma": 0.0,  # Gaussian on the total field (px): the elastic-like prior
}
THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_ITK_THREADS = {"value": None}  # THREADS_ENV as ITK read it (once per process)


def has_ants() -> bool:
    """Whether antspyx (``import ants``) can be imported."""
    try:
        _ants()
    except ImportError:
        return False
    return True


def _ants():
    try:
        import ants
    except ImportError as err:
        raise ImportError(ANTS_HINT) from err
    return ants


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _set_threads(num_threads: int | None) -> None:
    """ITK reads ``$ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, at its first use in a process:
    set it before then to ``num_threads``, else (unless it is set) to the cores we may use."""
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ConfigError(f"num_threads must be a positive int or None, got {num_threads!r}")
    if _ITK_THREADS["value"] is None:  # this process's first ANTs registration (through us)
        if num_threads is not None or THREADS_ENV not in os.environ:
            os.environ[THREADS_ENV] = str(num_threads or _available_cores())
        _ITK_THREADS["value"] = os.environ[THREADS_ENV]
    elif num_threads is not None and str(num_threads) != _ITK_THREADS["value"]:
        log.warning(
            "ants_syn: ITK fixed its thread count (%s) at this process's first registration; "
            "num_threads=%d takes effect only in a new process",
            _ITK_THREADS["value"],
            num_threads,
        )


def _syn_settings(ants, settings: dict) -> dict:
    """``SYN_DEFAULTS`` updated by ``settings``, checked against ``ants.registration``'s own
    keywords (it swallows unknown ones silently) and with sequences as the tuples it needs."""
    params = inspect.signature(ants.registration).parameters
    known = {n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    known -= {"fixed", "moving", "type_of_transform", "outprefix"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"ants_syn got unknown settings {unknown}: pass keywords of ants.registration, "
            f"e.g. {sorted(SYN_DEFAULTS)}, aff_iterations, aff_shrink_factors, "
            f"aff_smoothing_sigmas (see help(ants.registration))"
        )
    merged = {**SYN_DEFAULTS, **settings}
    # antspyx tests `type(x) is tuple` for the aff_* schedules: a list would be ignored
    return {
        k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in merged.items()
    }


RAMP_VOXELS = 2**22  # the most voxels a coordinate ramp of transforms_to_flow may hold


def transforms_to_flow(ants, fixed_img, transforms: list[str]) -> torch.Tensor:
    """ANTs forward transforms (moving -> fixed, as ``registration`` returns them) -> our flow
    (N, *spatial) on the fixed grid, in voxels, channel i along axis i (rows before columns).

    Warping one index ramp per axis gives ``p + flow(p)`` whatever ANTs' axis order; linear
    interpolation of a linear ramp is exact, so a ramp may be sampled every ``step`` voxels
    (1 unless it would exceed ``RAMP_VOXELS``; volumes), and the ramps reach ``max(shape)``
    voxels beyond the image so that points mapped outside it keep their coordinates. The
    geometry (spacing, origin; identity direction) is ``fixed_img``'s, as the moving image's.
    """
    shape, n = tuple(fixed_img.shape), fixed_img.dimension
    m = max(shape)
    step = 1
    while math.prod(-(-(s + 2 * m) // step) + 1 for s in shape) > RAMP_VOXELS:
        step += 1
    spacing, origin = tuple(fixed_img.spacing), tuple(fixed_img.origin)
    axes = [np.arange(-m, s + m + step, step, dtype=np.float64) if step > 1 else
            np.arange(-m, s + m, dtype=np.float64) for s in shape]  # fmt: skip
    ramp_origin = tuple(o - m * sp for o, sp in zip(origin, spacing, strict=True))
    ramp_spacing = tuple(step * sp for sp in spacing)
    target = []
    for i in range(n):
        view = [1] * n
        view[i] = len(axes[i])
        coord = np.broadcast_to(axes[i].reshape(view), [len(a) for a in axes])
        ramp = ants.from_numpy(np.ascontiguousarray(coord), origin=ramp_origin,
                               spacing=ramp_spacing)  # fmt: skip
        out = ants.apply_transforms(fixed_img, ramp, transforms, interpolator="linear")
        target.append(out.numpy())  # (*spatial): the index along axis i each voxel maps to
    identity = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return torch.from_numpy(np.stack(target) - np.stack(identity)).float()


def ants_syn(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    transform: str = "SyNOnly",
    spacing: tuple[float, ...] | None = None,
    num_threads: int | None = None,
    **settings,
) -> torch.Tensor:
    """ANTs SyN pair by pair; (B, 1, H, W) or (B, 1, D, H, W) images -> flow (B, 2, H, W) or
    (B, 3, D, H, W) in voxels.

    ``transform``: antspyx's ``type_of_transform`` (``SyNOnly``: deformable only, our
    pairs need no affine stage; ``SyN`` adds one). ``settings``: keywords of
    ``ants.registration`` over ``SYN_DEFAULTS`` (radii and sigmas in voxels, as ANTs has
    them). ``spacing`` (mm per voxel, our axis order; default 1) is the images' geometry; the
    flow stays in voxels. ``num_threads`` (default: the cores this process may use) can only
    be set before the first ANTs call of a process. ANTs' transform files go to a temporary
    folder, removed afterwards.
    """
    check_pairs(fixed, moving)
    ants = _ants()
    settings = _syn_settings(ants, settings)
    geometry = {} if spacing is None else {"spacing": _spacing(spacing, fixed.ndim - 2)}
    _set_threads(num_threads)
    flows = []
    with tempfile.TemporaryDirectory(prefix="air_reg_ants_") as tmp:
        for i, (fix, mov) in enumerate(zip(fixed[:, 0], moving[:, 0], strict=True)):
            # (*spatial) each; antspyx keeps numpy's axis order (unlike SimpleITK): ANTs' axis
            # i is ours, origin 0, so ANTs' physical mm are our voxels times the spacing
            fix_img, mov_img = (
                ants.from_numpy(x.detach().cpu().numpy().astype(np.float32), **geometry)
                for x in (fix, mov)
            )
            out = ants.registration(
                fix_img,
                mov_img,
                type_of_transform=transform,
                outprefix=os.path.join(tmp, f"pair{i}_"),
                **settings,
            )
            # fwdtransforms map fixed points to moving points: warped(p) = moving(T(p))
            flows.append(transforms_to_flow(ants, fix_img, out["fwdtransforms"]))
    log.debug("ants_syn: %d pairs, %s, %s", len(flows), transform, settings)
    return torch.stack(flows).to(device=fixed.device, dtype=fixed.dtype)
