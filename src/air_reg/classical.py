"""Classical baselines, returning flows in our convention: SimpleITK diffeomorphic Demons and
ANTs SyN (antspyx).

SimpleITK (``pip install air-reg[classical]``) and antspyx (``pip install air-reg[peers]``)
are optional and imported only when used.
"""

from __future__ import annotations

import inspect
import logging
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


def to_sitk_image(image: torch.Tensor):
    """(H, W) tensor -> float32 SimpleITK image with unit spacing and origin 0 (index = mm)."""
    sitk = _sitk()
    # GetImageFromArray reads numpy (rows, cols) as ITK (y, x): index (i, j) = (col, row).
    return sitk.GetImageFromArray(image.detach().cpu().numpy().astype(np.float32))


def field_to_flow(field) -> torch.Tensor:
    """SimpleITK displacement field on the fixed grid -> our flow (2, H, W), ch0 = rows."""
    sitk = _sitk()
    arr = sitk.GetArrayFromImage(field)  # (H, W, 2), components in physical (x, y) order
    # Unit spacing, identity direction, origin 0: physical mm == pixels. (x, y) -> (y, x).
    return torch.from_numpy(np.ascontiguousarray(arr[..., ::-1].transpose(2, 0, 1))).float()


def flow_to_field(flow: torch.Tensor):
    """Our flow (2, H, W) -> SimpleITK displacement field image (float64 vectors, (x, y))."""
    sitk = _sitk()
    arr = flow.detach().cpu().double().numpy()[::-1].transpose(1, 2, 0)  # (H, W, 2) as (x, y)
    return sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)


def check_pairs(fixed: torch.Tensor, moving: torch.Tensor) -> None:
    """Raise ``ConfigError`` unless ``fixed`` and ``moving`` are (B, 1, H, W) of one shape."""
    shapes = [
        tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        for x in (fixed, moving)
    ]
    if not (
        isinstance(fixed, torch.Tensor)
        and isinstance(moving, torch.Tensor)
        and fixed.ndim == 4
        and fixed.shape[1] == 1
        and fixed.shape == moving.shape
        and fixed.shape[0] > 0
        and min(fixed.shape[-2:]) > 1
    ):
        raise ConfigError(
            f"the classical baselines take fixed and moving tensors of one shape (B, 1, H, W) "
            f"(B >= 1 pairs, one channel, H, W >= 2), got {shapes[0]} and {shapes[1]}; add the "
            f"batch and channel axes with image[None, None] or pick one channel"
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
    num_threads: int | None = None,
) -> torch.Tensor:
    """Diffeomorphic Demons pair by pair; (B, 1, H, W) images -> flow (B, 2, H, W) in pixels.

    ``histogram_matching`` maps the moving intensities onto the fixed ones first (for
    different scanners; off by default because our pairs share intensities in [0, 1]).
    """
    check_pairs(fixed, moving)
    sitk = _sitk()
    f = demons_filter(
        iterations=iterations,
        smoothing_sigma=smoothing_sigma,
        update_sigma=update_sigma,
        max_step=max_step,
        num_threads=num_threads,
    )
    flows = []
    for fix, mov in zip(fixed[:, 0], moving[:, 0], strict=True):  # (H, W) each
        fix_img, mov_img = to_sitk_image(fix), to_sitk_image(mov)
        if histogram_matching:
            mov_img = sitk.HistogramMatching(mov_img, fix_img, 256, 7, True)
        # The output field d lives on the fixed grid and maps fixed points p to moving
        # points p + d(p): Resample(moving, DisplacementFieldTransform(d)) = moving(p + d(p)),
        # which is exactly our backward-warp convention once (x, y) becomes (rows, cols).
        field = f.Execute(fix_img, mov_img)
        flows.append(field_to_flow(field))
    log.debug("demons: %d pairs, %d iterations each", len(flows), iterations)
    return torch.stack(flows).to(device=fixed.device, dtype=fixed.dtype)


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


def transforms_to_flow(ants, fixed_img, transforms: list[str]) -> torch.Tensor:
    """ANTs forward transforms (moving -> fixed, as ``registration`` returns them) -> our flow
    (2, H, W) on the fixed grid, in pixels, channel 0 = rows.

    Warping the row- and column-index images gives ``p + flow(p)`` whatever ANTs' axis order;
    linear interpolation of a linear ramp is exact, and the ramps reach ``max(H, W)`` pixels
    beyond the image so that points mapped outside it keep their coordinates.
    """
    h, w = fixed_img.shape
    m = max(h, w)
    rows, cols = np.meshgrid(
        np.arange(-m, h + m, dtype=np.float64),
        np.arange(-m, w + m, dtype=np.float64),
        indexing="ij",
    )
    target = []
    for coord in (rows, cols):
        ramp = ants.from_numpy(coord, origin=(-float(m), -float(m)), spacing=(1.0, 1.0))
        out = ants.apply_transforms(fixed_img, ramp, transforms, interpolator="linear")
        target.append(out.numpy())  # (H, W): the row (column) each fixed pixel maps to
    identity = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return torch.from_numpy(np.stack(target) - np.stack(identity)).float()


def ants_syn(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    transform: str = "SyNOnly",
    num_threads: int | None = None,
    **settings,
) -> torch.Tensor:
    """ANTs SyN pair by pair; (B, 1, H, W) images -> flow (B, 2, H, W) in pixels.

    ``transform``: antspyx's ``type_of_transform`` (``SyNOnly``: deformable only, our
    pairs need no affine stage; ``SyN`` adds one). ``settings``: keywords of
    ``ants.registration`` over ``SYN_DEFAULTS``. ``num_threads`` (default: the cores this
    process may use) can only be set before the first ANTs call of a process. ANTs' transform
    files go to a temporary folder, removed afterwards.
    """
    check_pairs(fixed, moving)
    ants = _ants()
    settings = _syn_settings(ants, settings)
    _set_threads(num_threads)
    flows = []
    with tempfile.TemporaryDirectory(prefix="air_reg_ants_") as tmp:
        for i, (fix, mov) in enumerate(zip(fixed[:, 0], moving[:, 0], strict=True)):  # (H, W)
            # unit spacing, origin 0: ANTs' physical mm are our pixels
            fix_img, mov_img = (
                ants.from_numpy(x.detach().cpu().numpy().astype(np.float32)) for x in (fix, mov)
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
