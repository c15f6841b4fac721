"""Evaluation metrics, one value per pair: each returns a (B,) tensor.

Images are (B, 1, H, W) in [0, 1]; flows are (B, 2, H, W) in pixels (see the README).
"""

from __future__ import annotations

import torch

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


def jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """det of the Jacobian of p -> p + flow(p), (B, H, W), central differences inside."""
    d_dy = torch.gradient(flow, dim=2)[0]  # (B, 2, H, W): d(flow)/d(row)
    d_dx = torch.gradient(flow, dim=3)[0]  # d(flow)/d(col)
    return (1 + d_dy[:, 0]) * (1 + d_dx[:, 1]) - d_dx[:, 0] * d_dy[:, 1]


def folding(flow: torch.Tensor) -> torch.Tensor:
    """Percentage of pixels whose Jacobian determinant is <= 0."""
    return 100 * (jacobian_determinant(flow) <= 0).float().flatten(1).mean(1)


def sd_log_jacobian(flow: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Standard deviation of log|J| (clamped away from 0), a smoothness measure."""
    return jacobian_determinant(flow).abs().clamp(min=eps).log().flatten(1).std(1)


def epe(flow: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean end-point error in pixels against a ground-truth flow."""
    return (flow - target).square().sum(1).sqrt().flatten(1).mean(1)


def pair_metrics(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    flow: torch.Tensor | None = None,
    target_flow: torch.Tensor | None = None,
    full: bool = True,
) -> dict[str, torch.Tensor]:
    """Every per-pair metric for a batch; ``full=False`` keeps the cheap ones (validation)."""
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
    return out
