"""Spatial-transformer stage: warping, coarse-to-dense fields, scaling-and-squaring.

Conventions (see the README): a ``flow`` is a displacement in pixels (voxels),
``(B, D, *spatial)`` with D = 2 (H, W) or 3 (D, H, W) spatial axes, channel i along spatial
axis i (2-D: channel 0 rows (y), channel 1 columns (x)), defined on the fixed grid, and
``warped(p) = moving(p + flow(p))``. Every function here takes both ranks in one code path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models.contract import as_size

INTERPOLATIONS = ("bilinear", "bicubic", "bspline")
SPATIAL_DIMS = (2, 3)  # images (B, C, H, W) and volumes (B, C, D, H, W)


def spatial_ndim(x: torch.Tensor, name: str = "image") -> int:
    """The number of spatial axes (2 or 3) of a (B, C, H, W) or (B, C, D, H, W) tensor."""
    if x.ndim - 2 not in SPATIAL_DIMS:
        raise ConfigError(
            f"{name} must be (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}; "
            f"add the batch and channel axes (x[None, None])"
        )
    return x.ndim - 2


def flow_ndim(flow: torch.Tensor, name: str = "flow") -> int:
    """The number of spatial axes of a flow, checking it has one channel per axis."""
    if flow.ndim - 2 not in SPATIAL_DIMS or flow.shape[1] != flow.ndim - 2:
        raise ConfigError(
            f"{name} must be (B, 2, H, W) or (B, 3, D, H, W) (one channel per spatial axis, "
            f"in voxels), got {tuple(flow.shape)}"
        )
    return flow.ndim - 2


def identity_grid(size: tuple[int, ...], device=None, dtype=None) -> torch.Tensor:
    """Pixel coordinates of a grid of ``size`` (H, W) or (D, H, W) as a (D, *size) tensor."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def warp(
    moving: torch.Tensor,
    flow: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Sample ``moving`` (B, C, *spatial) at ``p + flow(p)``; flow is (B, D, *spatial) in
    pixels. ``bilinear`` is trilinear on volumes; ``bicubic`` is 2-D only (torch's)."""
    n = flow_ndim(flow)
    if moving.ndim != flow.ndim or moving.shape[2:] != flow.shape[2:]:
        raise ConfigError(
            f"moving {tuple(moving.shape)} and flow {tuple(flow.shape)} need the same "
            f"spatial size (resize_flow the flow to the image)"
        )
    if n == 3 and mode == "bicubic":
        raise ConfigError("bicubic warping is 2-D only; use mode='bilinear' for volumes")
    # grid_sample wants (x, y[, z]) in [-1, 1] with align_corners=True: -1 is the first pixel
    # centre, coordinates in reversed axis order. Built channel by channel (no flip/permute
    # copies): warp is the hot op of training, scaling and squaring and refinement.
    coords = []
    for i, size in enumerate(flow.shape[2:]):
        base = torch.linspace(-1.0, 1.0, size, device=flow.device, dtype=flow.dtype)
        base = base.view((size,) + (1,) * (n - 1 - i))  # broadcast over the later axes
        coords.append(flow[:, i] * (2.0 / max(size - 1, 1)) + base)  # (B, *spatial)
    grid = torch.stack(coords[::-1], dim=-1)  # (B, *spatial, D)
    return F.grid_sample(moving, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def pad_to_multiple(
    x: torch.Tensor, multiple: int, mode: str = "replicate"
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` (N, C, *spatial) padded, centred (the odd pixel bottom/right), so that each
    spatial side divides ``multiple``, and the pads in ``F.pad``'s order (last axis first:
    left, right, top, bottom[, front, back]); ``crop`` undoes it on an output."""
    extra = [-n % multiple for n in x.shape[2:]]
    pads = tuple(p for e in reversed(extra) for p in (e // 2, e - e // 2))
    return (F.pad(x, pads, mode=mode) if any(extra) else x), pads


def crop(y: torch.Tensor, pads: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    """The ``size`` window of a padded output (``pad_to_multiple``'s ``pads``)."""
    starts = pads[::2][::-1]  # the leading pad of each spatial axis, in axis order
    window = tuple(slice(s, s + n) for s, n in zip(starts, size, strict=True))
    return y[(..., *window)]


def resample(x: torch.Tensor, size: tuple[int, ...], antialias: bool) -> torch.Tensor:
    """Linear resampling of (B, C, *spatial) to ``size`` (align_corners=False; bilinear or
    trilinear, ``antialias`` when shrinking)."""
    if x.ndim == 4 or not antialias:
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)
    # torch has no antialiased trilinear; the filter is separable: (H, W), then D
    b, c, d = x.shape[:3]
    x = resample(x.reshape(b, c * d, *x.shape[3:]), size[1:], True)  # (B, C D, H', W')
    x = resample(x.reshape(b, c, d, -1), (size[0], x.shape[2] * x.shape[3]), True)
    return x.reshape(b, c, *size)


def resize_flow(flow: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(B, D, *s) pixels on an s grid -> (B, D, *size) pixels on a ``size`` grid."""
    n, old, size = flow_ndim(flow), tuple(flow.shape[2:]), tuple(int(s) for s in size)
    if len(size) != n:
        raise ConfigError(f"size {size} needs {n} sides for a flow {tuple(flow.shape)}")
    if old == size:
        return flow
    shrink = any(new < o for new, o in zip(size, old, strict=True))
    out = resample(flow, size, antialias=shrink)
    scale = torch.tensor([new / o for new, o in zip(size, old, strict=True)], dtype=flow.dtype,
                         device=flow.device)  # fmt: skip
    return out * scale.view(1, n, *(1,) * n)  # a displacement of d model pixels is d * H / h here


def integrate_velocity(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Scaling and squaring: exp of a stationary velocity field (B, D, *spatial), in pixels."""
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
    B-spline control points (smoothest, does not interpolate them exactly). A fresh copy of a
    cached matrix (refinement builds the same few for every pair: 4 ms of a 28 x 28 call).
    """
    if mode not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {mode!r}; choose one of {INTERPOLATIONS}")
    return _interpolation_matrix(int(n_in), int(n_out), mode).clone()


@functools.lru_cache(maxsize=256)
def _interpolation_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
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
    """Resample a coarse (B, C, *in_size) field to (B, C, *out_size) with a fixed separable
    operator (2-D or 3-D sizes).

    One module serves every model: AiR's per-patch displacements, MAPT's branch fusion and
    DIRNet's control points. Precomputed 1-D matrices make it a few small matmuls.
    """

    def __init__(
        self, *, in_size: tuple[int, ...], out_size: tuple[int, ...], mode: str = "bicubic"
    ) -> None:
        super().__init__()
        self.in_size, self.out_size, self.mode = tuple(in_size), tuple(out_size), mode
        if len(self.in_size) != len(self.out_size) or len(self.in_size) not in SPATIAL_DIMS:
            raise ConfigError(f"in_size {in_size} and out_size {out_size} need 2 or 3 sides each")
        # 2-D: "rows", "cols" (the former names); 3-D: "slices", "rows", "cols"
        names = ("slices", "rows", "cols")[-len(self.in_size) :]
        for name, n_in, n_out in zip(names, self.in_size, self.out_size, strict=True):
            self.register_buffer(name, interpolation_matrix(n_in, n_out, mode), False)
        self._names = names
        low, up = "dhw"[-len(names) :], "DHW"[-len(names) :]
        mats = [f"{u}{lo}" for u, lo in zip(up, low, strict=True)]
        # 2-D: "Hh,bchw,Ww->bcHW"; 3-D: "Dd,bcdhw,Hh,Ww->bcDHW"
        self._equation = ",".join([mats[0], f"bc{low}", *mats[1:]]) + f"->bc{up}"

    @property
    def matrices(self) -> list[torch.Tensor]:
        """The 1-D (out, in) matrices, one per axis in axis order."""
        return [getattr(self, name) for name in self._names]

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        if tuple(coarse.shape[2:]) == self.out_size and self.mode != "bspline":
            return coarse
        mats = self.matrices  # (out, in) per axis
        return torch.einsum(self._equation, mats[0], coarse, *mats[1:])  # (B, C, *out_size)

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
        coarse_size: tuple[int, ...],
        image_size: tuple[int, ...],
        interpolation: str = "bicubic",
        integration_steps: int = 0,
    ) -> None:
        super().__init__()
        if integration_steps < 0:
            raise ConfigError(f"integration_steps must be >= 0, got {integration_steps}")
        self.upsample = CoarseToDense(in_size=coarse_size, out_size=image_size, mode=interpolation)
        self.integration_steps = integration_steps

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        dense = self.upsample(coarse)  # (B, D, *spatial)
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
