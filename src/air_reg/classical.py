"""Classical baseline: SimpleITK diffeomorphic Demons, returning flows in our convention.

SimpleITK is optional (``pip install air-reg[classical]``) and imported only when used.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

INSTALL_HINT = "SimpleITK is needed for the classical baselines: pip install air-reg[classical]"


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
    if fixed.ndim != 4 or fixed.shape[1] != 1 or fixed.shape != moving.shape:
        raise ValueError(
            f"need (B, 1, H, W) pairs, got {tuple(fixed.shape)}, {tuple(moving.shape)}"
        )
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
