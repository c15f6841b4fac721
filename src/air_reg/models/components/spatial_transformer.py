"""Spatial-transformer stage: warping, coarse-to-dense fields, scaling-and-squaring.

Conventions (see the README): a ``flow`` is a displacement in pixels, ``(B, 2, H, W)``,
channel 0 along rows (y), channel 1 along columns (x), defined on the fixed grid, and
``warped(p) = moving(p + flow(p))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models.contract import as_size

INTERPOLATIONS = ("bilinear", "bicubic", "bspline")


def identity_grid(size: tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    """Pixel coordinates of a (H, W) grid as a (2, H, W) tensor (rows, columns)."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def warp(
    moving: torch.Tensor,
    flow: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Sample ``moving`` (B, C, H, W) at ``p + flow(p)``; flow is (B, 2, H, W) in pixels."""
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (B, 2, H, W), got {tuple(flow.shape)}")
    if moving.ndim != 4 or moving.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"moving {tuple(moving.shape)} and flow {tuple(flow.shape)} need the same (H, W)"
        )
    h, w = flow.shape[-2:]
    # grid_sample wants (x, y) in [-1, 1] with align_corners=True: -1 is the first pixel centre.
    # Built channel by channel (no flip/permute copies): warp is the hot op of training,
    # scaling and squaring and refinement.
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=flow.dtype)  # (W,)
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=flow.dtype)  # (H,)
    gx = flow[:, 1] * (2.0 / max(w - 1, 1)) + xs  # (B, H, W)
    gy = flow[:, 0] * (2.0 / max(h - 1, 1)) + ys[:, None]
    grid = torch.stack((gx, gy), dim=-1)  # (B, H, W, 2)
    return F.grid_sample(moving, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def pad_to_multiple(
    x: torch.Tensor, multiple: int, mode: str = "replicate"
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``x`` (N, C, H, W) padded, centred (the odd pixel bottom/right), so that H and W divide
    ``multiple``, and the pads (left, right, top, bottom); ``crop`` undoes it on an output."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pads, mode=mode) if ph or pw else x), pads


def crop(y: torch.Tensor, pads: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """The (H, W) = ``size`` window of a padded output (``pad_to_multiple``'s ``pads``)."""
    return y[..., pads[2] : pads[2] + size[0], pads[0] : pads[0] + size[1]]


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, h, w) pixels on an h x w grid -> (B, 2, H, W) pixels on an H x W grid."""
    h, w = flow.shape[-2:]
    if (h, w) == tuple(size):
        return flow
    shrink = size[0] < h or size[1] < w
    out = F.interpolate(flow, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    scale = torch.tensor([size[0] / h, size[1] / w], dtype=flow.dtype, device=flow.device)
    return out * scale.view(1, 2, 1, 1)  # a displacement of d model pixels is d * H / h here


def integrate_velocity(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring: exp of a stationary velocity field (B, 2, H, W), in pixels."""
    flow = velocity / (2**steps)
    for _ in range(steps):
        flow = flow + warp(flow, flow)  # phi_{2t} = phi_t o phi_t
    return flow


def _cubic_bspline(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    inner = (4 - 6 * t**2 + 3 * t**3) / 6
    outer = (2 - t).clamp(min=0) ** 3 / 6
    return torch.where(t < 1, inner, outer)


def interpolation_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """(n_out, n_in) matrix that resamples a 1-D signal of cell values onto n_out pixels.

    The n_in coarse values sit at the centres of equal cells covering the n_out pixels
    (a patch grid), i.e. ``align_corners=False`` geometry. ``bspline`` treats them as cubic
    B-spline control points (smoothest, does not interpolate them exactly).
    """
    if mode not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {mode!r}; choose one of {INTERPOLATIONS}")
    if mode == "bspline":
        step = n_in / n_out  # control-point units per pixel
        centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * step - 0.5
        return _cubic_bspline(centres[:, None] - torch.arange(n_in)[None, :]).float()
    eye = torch.eye(n_in).reshape(n_in, 1, n_in)  # n_in one-hot signals of length n_in
    if n_in == n_out:
        return torch.eye(n_in)
    out = F.interpolate(eye[:, :, None, :], size=(1, n_out), mode=mode, align_corners=False)
    return out.reshape(n_in, n_out).T.contiguous()


class CoarseToDense(nn.Module):
    """Resample a coarse (B, C, h, w) field to (B, C, H, W) with a fixed separable operator.

    One module serves every model: AiR's per-patch displacements, MAPT's branch fusion and
    DIRNet's control points. Precomputed 1-D matrices make it a pair of small matmuls.
    """

    def __init__(
        self, *, in_size: tuple[int, int], out_size: tuple[int, int], mode: str = "bicubic"
    ) -> None:
        super().__init__()
        self.in_size, self.out_size, self.mode = tuple(in_size), tuple(out_size), mode
        self.register_buffer("rows", interpolation_matrix(in_size[0], out_size[0], mode), False)
        self.register_buffer("cols", interpolation_matrix(in_size[1], out_size[1], mode), False)

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        if tuple(coarse.shape[-2:]) == self.out_size and self.mode != "bspline":
            return coarse
        # (B, C, h, w) -> (B, C, H, W): rows (H, h) and cols (W, w)
        return torch.einsum("Hh,bchw,Ww->bcHW", self.rows, coarse, self.cols)

    def extra_repr(self) -> str:
        return f"in_size={self.in_size}, out_size={self.out_size}, mode={self.mode!r}"


class FlowField(nn.Module):
    """Coarse displacements -> dense flow in pixels, optionally diffeomorphic.

    With ``integration_steps > 0`` the dense field is a stationary velocity integrated by
    scaling and squaring (folding-free for smooth enough velocities).
    """

    def __init__(
        self,
        *,
        coarse_size: tuple[int, int],
        image_size: tuple[int, int],
        interpolation: str = "bicubic",
        integration_steps: int = 0,
    ) -> None:
        super().__init__()
        if integration_steps < 0:
            raise ConfigError(f"integration_steps must be >= 0, got {integration_steps}")
        self.upsample = CoarseToDense(in_size=coarse_size, out_size=image_size, mode=interpolation)
        self.integration_steps = integration_steps

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        dense = self.upsample(coarse)  # (B, 2, H, W)
        if self.integration_steps:
            dense = integrate_velocity(dense, self.integration_steps)
        return dense


def common_divisors(size) -> list[int]:
    """The sizes that divide both sides of an int (square) or (H, W) image size."""
    h, w = as_size(size)
    return [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]


def check_patch_sizes(
    image_size,
    patch_sizes,
    *,
    what: str = "patch size",
    knob: str = "model.net.patch_size(s)",
    powers_of_two: bool = False,
) -> tuple[int, int]:
    """The (H, W) of ``image_size`` (int: square); raise if a patch size does not divide
    both sides, listing the valid ones (``what``/``knob``/``powers_of_two``: for DIRNet)."""
    h, w = as_size(image_size)
    bad = [p for p in patch_sizes if int(p) <= 0 or h % int(p) or w % int(p)]
    if bad:
        valid = [d for d in common_divisors((h, w)) if not powers_of_two or d & (d - 1) == 0]
        raise ConfigError(
            f"{what}(s) {bad} do not divide image size {h}x{w}; valid {what}s for {h}x{w} "
            f"are {valid} (set {knob} or resize/pad the images: data.image_size / data.pad_to)"
        )
    return h, w
