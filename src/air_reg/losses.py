"""Similarity losses and flow regularisers; each an ``nn.Module`` that works on any device.

Similarities take ``(warped, fixed)`` images (B, C, H, W) and return a scalar to minimise.
Regularisers take a flow (B, 2, H, W) in pixels and return a scalar penalty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from air_reg import deprecation
from air_reg.errors import ConfigError
from air_reg.metrics import jacobian_determinant, ncc


class MSE(nn.Module):
    """Mean squared intensity difference (the paper-faithful choice)."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(warped, fixed)


class NCC(nn.Module):
    """1 - global normalised cross-correlation per pair, averaged over the batch (min 0)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return (1 - ncc(warped, fixed, eps=self.eps)).mean()


class LocalNCC(nn.Module):
    """1 - local (windowed) squared NCC, as in VoxelMorph, averaged over pixels (min 0)."""

    def __init__(self, window: int = 9, eps: float = 1e-5) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ConfigError(f"window must be a positive odd integer, got {window}")
        self.window, self.eps = window, eps

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        c = warped.shape[1]
        stacked = torch.cat([warped, fixed, warped * warped, fixed * fixed, warped * fixed], 1)
        # Window means of I, J, I^2, J^2, IJ in one pooling call: (B, 5C, H, W).
        means = F.avg_pool2d(
            stacked, self.window, stride=1, padding=self.window // 2, count_include_pad=False
        )
        mi, mj, mii, mjj, mij = means.split(c, dim=1)
        cross = mij - mi * mj
        var_i, var_j = (mii - mi * mi).clamp(min=0), (mjj - mj * mj).clamp(min=0)
        return (1 - cross * cross / (var_i * var_j + self.eps)).mean()


def _flow_differences(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of a (B, 2, H, W) flow along rows and columns."""
    return flow[:, :, 1:, :] - flow[:, :, :-1, :], flow[:, :, :, 1:] - flow[:, :, :, :-1]


class Diffusion(nn.Module):
    """Mean squared spatial gradient of the flow (``Grad`` in VoxelMorph), pixels^2."""

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        dy, dx = _flow_differences(flow)
        return dy.square().mean() + dx.square().mean()


class BendingEnergy(nn.Module):
    """Mean squared second derivatives of the flow (penalises curvature, not affine motion)."""

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        dy, dx = _flow_differences(flow)
        dyy = dy[:, :, 1:, :] - dy[:, :, :-1, :]
        dxx = dx[:, :, :, 1:] - dx[:, :, :, :-1]
        dxy = dy[:, :, :, 1:] - dy[:, :, :, :-1]
        return dyy.square().mean() + dxx.square().mean() + 2 * dxy.square().mean()


class DiffusionFold(nn.Module):
    """:class:`Diffusion` plus ``fold_weight`` x :class:`NegativeJacobian` (``fold_margin``).

    For training a network whose field may fold on hard pairs: the fold term is zero wherever
    det J keeps the margin, so ordinary pairs see plain diffusion. Scaled, as every
    regulariser, by ``model.reg_weight``. ``margin`` is the former name of ``fold_margin``
    (the shipped AiR-UNet checkpoints record it).
    """

    def __init__(
        self, fold_weight: float = 20.0, fold_margin: float = 0.05, *, margin: float | None = None
    ) -> None:
        super().__init__()
        if fold_weight < 0:
            raise ConfigError(f"fold_weight must be >= 0, got {fold_weight}")
        fold_margin = deprecation.renamed(
            "DiffusionFold", "margin", "fold_margin", margin, fold_margin
        )
        self.fold_weight = fold_weight
        self.diffusion, self.fold = Diffusion(), NegativeJacobian(fold_margin)

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        return self.diffusion(flow) + self.fold_weight * self.fold(flow)


class NegativeJacobian(nn.Module):
    """Mean of ``relu(fold_margin - det J)`` of p -> p + flow(p): penalises folding (det <= 0).

    Zero wherever the field keeps a margin ``fold_margin`` from folding, so it leaves ordinary
    pairs alone; it is what keeps scaling-and-squaring refinement at 0 % folding on the few
    pairs whose optimum is an extreme compression (measured in experiments/refine_benchmark.py).
    ``eps`` is the former name of ``fold_margin``.
    """

    def __init__(self, fold_margin: float = 0.05, *, eps: float | None = None) -> None:
        super().__init__()
        self.fold_margin = deprecation.renamed(
            "NegativeJacobian", "eps", "fold_margin", eps, fold_margin
        )

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fold_margin - jacobian_determinant(flow)).mean()


class MutualInformation(nn.Module):
    """Negative mutual information per pair (Parzen-window joint histogram), batch mean.

    For images of different contrast (T1 vs T2, CT vs MR): it rewards any consistent
    intensity mapping, not equal intensities. Intensities are taken in [0, 1]; ``bins``
    Gaussian windows ``sigma`` (in bin widths) apart.
    """

    def __init__(self, bins: int = 32, sigma: float = 0.5, eps: float = 1e-10) -> None:
        super().__init__()
        if bins < 2:
            raise ConfigError(f"bins must be >= 2, got {bins}")
        self.bins, self.sigma, self.eps = bins, sigma, eps

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        centres = torch.linspace(0, 1, self.bins, device=fixed.device, dtype=fixed.dtype)
        width = self.sigma / (self.bins - 1)

        def windows(x: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, N, bins), rows sum to 1
            w = torch.exp(-0.5 * ((x.flatten(1)[..., None] - centres) / width).square())
            return w / (w.sum(-1, keepdim=True) + self.eps)

        a, b = windows(warped.clamp(0, 1)), windows(fixed.clamp(0, 1))
        joint = torch.einsum("bni,bnj->bij", a, b) / a.shape[1]  # (B, bins, bins)
        pa, pb = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
        mi = (joint * ((joint + self.eps) / (pa * pb + self.eps)).log()).sum((1, 2))
        return -mi.mean()
