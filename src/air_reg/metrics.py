"""Evaluation metrics, one value per pair: each returns a (B,) tensor ((B, K) per label).

Images are (B, 1, *spatial) in [0, 1]; flows are (B, D, *spatial) in pixels (see the README);
label maps are (B, 1, *spatial) integer values 0..K in float tensors, 0 = background. Spatial
is (H, W) or (D, H, W), in one code path (``ssim`` follows torchmetrics, which takes both).
Definitions, empty cases and their Learn2Reg sources: docs/metrics.md.
"""

from __future__ import annotations

import math

import torch

from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import flow_ndim, warp

HD_PERCENT = 95.0  # Learn2Reg's robust Hausdorff percentile
DSC_QUANTILE = 0.3  # Learn2Reg's DSC30: the 30 % quantile over pairs
JAC_CLIP = (1e-9, 1e9)  # Learn2Reg's clip of the Jacobian determinant before the log

SMOOTH = 1e-3  # the authors' smoothing constant for the soft ("smooth") Dice


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per pair (capped for identical images)."""
    return 10 * torch.log10(data_range**2 / mse(a, b).clamp(min=1e-10))


def smooth_dice(warped: torch.Tensor, fixed: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """Soft Dice on intensities: (2 sum w f + s) / (sum w^2 + sum f^2 + s)."""
    w, f = warped.flatten(1), fixed.flatten(1)
    return (2 * (w * f).sum(1) + smooth) / (w.square().sum(1) + f.square().sum(1) + smooth)


def dice(warped: torch.Tensor, fixed: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice of the foregrounds binarised at ``threshold`` (1 when both are empty)."""
    w, f = (warped.flatten(1) > threshold).float(), (fixed.flatten(1) > threshold).float()
    denom = w.sum(1) + f.sum(1)
    return torch.where(denom > 0, 2 * (w * f).sum(1) / denom.clamp(min=1), torch.ones_like(denom))


def ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Global normalised cross-correlation in [-1, 1]."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / ((a.square().sum(1) * b.square().sum(1)).sqrt() + eps)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity (torchmetrics, Gaussian window 11, data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure  # slow import

    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")


def _det(m: list[list[torch.Tensor]]) -> torch.Tensor:
    """Determinant of a small matrix of tensors by cofactor expansion along the first row
    (2 x 2: a d - b c, the former 2-D arithmetic, bit for bit)."""
    if len(m) == 1:
        return m[0][0]
    out = None
    for j, a in enumerate(m[0]):
        term = a * _det([row[:j] + row[j + 1 :] for row in m[1:]])
        out = term if out is None else (out - term if j % 2 else out + term)
    return out


def jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """det of the Jacobian of p -> p + flow(p), (B, *spatial), central differences inside
    (one-sided at the border); each side needs 2 pixels or more."""
    n = flow_ndim(flow)
    if min(flow.shape[2:]) < 2:
        raise ConfigError(f"a Jacobian needs 2 pixels or more per side, got {tuple(flow.shape)}")
    grads = [torch.gradient(flow, dim=2 + j)[0] for j in range(n)]  # d(flow)/d(axis j)
    jac = [[g[:, i] for g in grads] for i in range(n)]  # d flow_i / d axis_j, (B, *spatial)
    for i in range(n):
        jac[i][i] = 1 + jac[i][i]  # J = I + grad flow
    return _det(jac)


def folding(flow: torch.Tensor) -> torch.Tensor:
    """Percentage of pixels whose Jacobian determinant is <= 0."""
    return 100 * (jacobian_determinant(flow) <= 0).float().flatten(1).mean(1)


def sd_log_jacobian(flow: torch.Tensor, clip: tuple[float, float] = JAC_CLIP) -> torch.Tensor:
    """Std (unbiased) over pixels of log J, J clipped to ``clip`` (Learn2Reg): folds give -20.7."""
    return jacobian_determinant(flow).clamp(*clip).log().flatten(1).std(1)


def epe(
    flow: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    spacing: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Mean end-point error in pixels against a ground-truth flow, (B,); with ``mask``
    (B, 1, *spatial) bool, over the masked pixels only (NaN for a pair whose mask is empty); with
    ``spacing`` (mm per pixel, per axis) in millimetres."""
    diff = flow - target
    if spacing is not None:
        shape = (1, -1) + (1,) * (diff.ndim - 2)
        diff = diff * torch.tensor(spacing, dtype=diff.dtype, device=diff.device).view(shape)
    err = diff.square().sum(1).sqrt()  # (B, *spatial)
    if mask is None:
        return err.flatten(1).mean(1)
    return torch.stack([e[m].mean() for e, m in zip(err, mask[:, 0], strict=True)])


def _label_ints(labels: torch.Tensor, name: str) -> torch.Tensor:
    """(B, 1, *spatial) float label map -> (B, *spatial) int64, refusing non-integer values."""
    if labels.ndim not in (4, 5) or labels.shape[1] != 1:
        raise ConfigError(
            f"{name} must be (B, 1, H, W) or (B, 1, D, H, W), got {tuple(labels.shape)}"
        )
    ints = labels.round()
    if not torch.equal(ints, labels) or (ints < 0).any() or not ints.isfinite().all():
        raise ValueError(
            f"{name} must hold integer labels >= 0 (0 = background); warp label maps with "
            f"air_reg.warp(labels, flow, mode='nearest'), never bilinear"
        )
    return ints[:, 0].long()


def _num_labels(*maps) -> int:
    """The largest label in (B, *spatial) torch or numpy maps (0 for empty maps)."""
    return max(int(x.max()) if len(x.reshape(-1)) else 0 for x in maps)


def _per_label_counts(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, *spatial) int64 labels -> (B, K + 1) counts; labels above K count as background."""
    labels = torch.where(labels > k, 0, labels).flatten(1)  # (B, N)
    offsets = (k + 1) * torch.arange(labels.shape[0], device=labels.device)[:, None]
    counts = torch.bincount((labels + offsets).flatten(), minlength=labels.shape[0] * (k + 1))
    return counts.view(-1, k + 1)


def label_dice(
    fixed_labels: torch.Tensor,
    warped_labels: torch.Tensor,
    moving_labels: torch.Tensor | None = None,
    num_labels: int | None = None,
) -> torch.Tensor:
    """(B, K) Dice of labels 1..K; NaN where a label is absent from fixed or moving (Learn2Reg).

    ``moving_labels`` (before warping) decides which labels count; without it, the warped map.
    ``num_labels`` defaults to the largest label in the maps.
    """
    f = _label_ints(fixed_labels, "fixed_labels")  # (B, *spatial)
    w = _label_ints(warped_labels, "warped_labels")
    m = w if moving_labels is None else _label_ints(moving_labels, "moving_labels")
    _same_grid(f, w)
    k = _num_labels(f, m) if num_labels is None else int(num_labels)
    cf, cw, cm = (_per_label_counts(x, k) for x in (f, w, m))  # (B, K + 1)
    inter = _per_label_counts(torch.where(f == w, f, 0), k)  # pixels labelled alike
    dsc = 2 * inter / (cf + cw).clamp(min=1)
    valid = (cf > 0) & (cm > 0)
    out = torch.where(valid, dsc, torch.nan)[:, 1:]  # (B, K): background dropped
    return out.to(fixed_labels.dtype) if fixed_labels.is_floating_point() else out


def _same_grid(*maps) -> None:
    """The fixed and warped label maps (B, *spatial) must share one shape."""
    if len({tuple(x.shape) for x in maps}) > 1:
        shapes = [(x.shape[0], 1, *x.shape[1:]) for x in maps]
        raise ConfigError(f"fixed and warped label maps need one shape, got {shapes}")


def _boundary(mask):
    """Pixels of a bool mask (H, W) or (D, H, W) with a face neighbour (4 in 2-D, 6 in 3-D)
    outside it (or outside the image)."""
    from scipy import ndimage  # lazy: keeps `import air_reg.metrics` light

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _robust_hausdorff(a, b, percent: float) -> float:
    """max of the two directed ``percent``-th percentiles of boundary distances (px)."""
    import numpy as np
    from scipy import ndimage

    where = np.nonzero(a | b)  # crop to the union's box: distances stay the same
    box = tuple(slice(i.min(), i.max() + 1) for i in where)
    ba, bb = _boundary(a[box]), _boundary(b[box])
    a_to_b = ndimage.distance_transform_edt(~bb)[ba]  # each a-boundary pixel to b's boundary
    b_to_a = ndimage.distance_transform_edt(~ba)[bb]
    # surface-distance's percentile (equal weights): the smallest d with P(dist <= d) >= p
    return max(float(np.percentile(d, percent, method="inverted_cdf")) for d in (a_to_b, b_to_a))


def label_hd95(
    fixed_labels: torch.Tensor,
    warped_labels: torch.Tensor,
    moving_labels: torch.Tensor | None = None,
    num_labels: int | None = None,
    percent: float = HD_PERCENT,
) -> torch.Tensor:
    """(B, K) 95 % Hausdorff distance in pixels per label (scipy, on the CPU).

    NaN where a label is absent from fixed or moving (Learn2Reg); the image diagonal
    sqrt((H-1)^2 + (W-1)^2 [+ (D-1)^2]) where the warped map lost it (surface-distance: inf).
    """
    f = _label_ints(fixed_labels, "fixed_labels").cpu().numpy()  # (B, *spatial)
    w = _label_ints(warped_labels, "warped_labels").cpu().numpy()
    m = w if moving_labels is None else _label_ints(moving_labels, "moving_labels").cpu().numpy()
    _same_grid(f, w)
    k = _num_labels(f, m) if num_labels is None else int(num_labels)
    out = torch.full((f.shape[0], k), math.nan, dtype=torch.float64)
    diagonal = math.hypot(*(n - 1 for n in f.shape[1:]))
    for i in range(f.shape[0]):
        for label in range(1, k + 1):
            fi, wi = f[i] == label, w[i] == label
            if not fi.any() or not (m[i] == label).any():
                continue  # no registration can match it: excluded, as in Learn2Reg
            out[i, label - 1] = _robust_hausdorff(fi, wi, percent) if wi.any() else diagonal
    dtype = fixed_labels.dtype if fixed_labels.is_floating_point() else torch.float32
    return out.to(device=fixed_labels.device, dtype=dtype)


def mean_over_labels(per_label: torch.Tensor) -> torch.Tensor:
    """(B, K) -> (B,) mean over the scored (non-NaN) labels; NaN when none is scored."""
    return per_label.nanmean(1)


def dsc30(mean_dice: torch.Tensor) -> torch.Tensor:
    """Dataset-level DSC30: the 30 % quantile (linear) of (N,) per-pair mean Dice, NaN skipped."""
    return torch.nanquantile(mean_dice.double().flatten(), DSC_QUANTILE)


def pair_metrics(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    flow: torch.Tensor | None = None,
    target_flow: torch.Tensor | None = None,
    full: bool = True,
    *,
    fixed_labels: torch.Tensor | None = None,
    moving_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every per-pair metric for a batch; ``full=False`` keeps the cheap ones (validation).

    Images (B, 1, *spatial), 2-D or 3-D. With label maps: "dice_labels" (mean label Dice),
    and with ``full`` "hd95" (pixels);
    the moving labels are warped by ``flow`` with nearest-neighbour sampling.
    """
    out = {
        "mse": mse(warped, fixed),
        "psnr": psnr(warped, fixed),
        "smooth_dice": smooth_dice(warped, fixed),
    }
    if flow is not None:
        out["folding"] = folding(flow)
    if full:
        out |= {
            "dice": dice(warped, fixed),
            "ncc": ncc(warped, fixed),
            "ssim": ssim(warped, fixed),
        }
        if flow is not None:
            out["sdlogj"] = sd_log_jacobian(flow)
    if flow is not None and target_flow is not None:
        out["epe"] = epe(flow, target_flow)
    if fixed_labels is not None or moving_labels is not None:
        out |= label_metrics(fixed_labels, moving_labels, flow, full=full)[1]
    return out


def label_metrics(
    fixed_labels: torch.Tensor | None,
    moving_labels: torch.Tensor | None,
    flow: torch.Tensor | None,
    full: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B, K) Dice per label, and the per-pair means: "dice_labels" (and with ``full``
    "hd95"); the moving labels are warped by ``flow`` with nearest-neighbour sampling."""
    if fixed_labels is None or moving_labels is None or flow is None:
        raise ValueError(
            "label metrics need fixed_labels, moving_labels and the flow that warps them; "
            "pass all three (or neither)"
        )
    # nearest-neighbour: integer values stay integer (exact in float32 up to 2**24)
    warped_labels = warp(moving_labels.to(flow.dtype), flow, mode="nearest")
    args = (fixed_labels, warped_labels, moving_labels)
    per_label = label_dice(*args)
    out = {"dice_labels": mean_over_labels(per_label)}
    if full:
        out["hd95"] = mean_over_labels(label_hd95(*args))
    return per_label, out
