"""``data=synth``: image (or volume) pairs drawn on the fly from random label maps (SynthMorph).

No real image and no manual label: a pair is one random label map (``label_maps``: argmax of
smooth noise, blobs from large to small) deformed by a known diffeomorphism
(``random_deformations``: tiny to large, sometimes with an affine part, sometimes none), each
side rendered on its own (``render``: a random intensity and texture per label, blur, bias
field, noise, gamma), so the network learns to register any contrast and texture at any size.
Convention (``air_reg.warp``): ``warped(p) = moving(p + flow(p))``; the fixed label map is
exactly ``warp(moving_labels, flow, mode="nearest")`` and the fixed image is rendered from it
(no image is resampled), so ``flow`` is the true flow on the fixed grid. Everything is drawn
from one ``torch.Generator``: the same seed gives bit-identical pairs.

A size (H, W) draws images, (D, H, W) volumes, in one code path: noise is upsampled, blurred
and deformed axis by axis, and the affine part rotates in each of the D (D - 1) / 2 planes.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import (
    CoarseToDense,
    identity_grid,
    integrate_velocity,
    resize_flow,
    warp,
)
from air_reg.models.contract import spatial_size

log = logging.getLogger(__name__)

VELOCITY_SIDE = {2: 64, 3: 32}  # velocities are integrated at most this many pixels (voxels)
# on the short side (their finest control grid is 16 cells; 3-D warps cost the cube)


@dataclass(frozen=True)
class SynthSettings:
    """How synthetic pairs are drawn; each field is also a ``data.*`` setting (conf/data/synth)."""

    num_labels: int = 16  # regions of a label map: labels 1..num_labels (0 is never drawn)
    label_scales: tuple[float, ...] = (2, 3, 5, 8, 12)  # noise cells across the short side
    max_fraction: float = 0.1  # largest smooth displacement, a fraction of the short side
    min_px: float = 0.2  # smallest one; log-uniform in between, per pair
    grids: tuple[int, ...] = (4, 8, 16)  # control grids of the velocity (coarse + finer detail)
    identity_p: float = 0.05  # pairs with exactly zero flow
    affine_p: float = 0.5  # pairs with an affine part (its strength log-uniform in 2%..100%)
    rotation_deg: float = 10.0
    scale: float = 0.1
    shear: float = 0.05
    shift_fraction: float = 0.05  # affine shift, a fraction of the short side
    same_contrast_p: float = 0.5  # pairs whose moving image shares the fixed one's contrast
    texture_fields: int = 3  # noise fields a label's texture mixes
    texture_cells: tuple[int, ...] = (2, 4, 8, 16, 32)  # their octaves, cell sizes in pixels
    texture_max: float = 0.5  # largest texture amplitude (label intensities span 0..1)
    blur_max: float = 1.0  # Gaussian blur sigma, uniform in 0..blur_max pixels
    bias_max: float = 0.3  # multiplicative bias field exp(b * smooth noise), b in 0..bias_max
    noise_max: float = 0.05  # additive Gaussian noise std, uniform in 0..noise_max
    gamma_std: float = 0.25  # gamma = exp(N(0, gamma_std))

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        bad = [k for k, v in values.items() if (min(v, default=0) <= 0 if isinstance(v, tuple)
                                                else v < 0)]  # fmt: skip
        bad += [k for k in ("identity_p", "affine_p", "same_contrast_p") if values[k] > 1]
        bad += [k for k in ("min_px", "max_fraction") if values[k] == 0]
        limits = {"num_labels": self.num_labels < 2, "texture_fields": self.texture_fields < 1,
                  "scale": self.scale >= 1, "rotation_deg": self.rotation_deg >= 90}  # fmt: skip
        bad += [k for k, out in limits.items() if out]  # scale, rotation: det A > 0 throughout
        if bad:
            raise ConfigError(
                f"data.{', data.'.join(bad)} out of range: probabilities in [0, 1], num_labels "
                f">= 2, texture_fields >= 1, scale < 1, rotation_deg < 90, the rest >= 0 "
                f"(list entries > 0); see conf/data/synth.yaml"
            )

    @classmethod
    def of(cls, **settings) -> SynthSettings:
        """The settings from keywords, refusing unknown names (listing the valid ones)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ConfigError(f"unknown synth setting(s) {unknown}; valid: {', '.join(names)}")
        lists = ("label_scales", "grids", "texture_cells")  # from YAML: lists (or ListConfig)
        tuples = {k: tuple(settings[k]) for k in lists if k in settings}
        return cls(**(settings | tuples))


_D = SynthSettings()


@functools.lru_cache(maxsize=64)
def _upsampling(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bicubic interpolation matrix, nodes on the first and last pixels."""
    eye = torch.eye(n_in)[:, None, :, None]  # n_in one-hot signals (n_in, 1, n_in, 1)
    out = F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=True)
    return out[:, 0, :, 0].T.contiguous()


def smooth_noise(shape, size, cells: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise (*shape, *size) on a grid of ``cells`` cells across the short side,
    bicubic-upsampled per axis (nodes on the image corners; small matmuls), of unit variance
    on average over the pixels (the expected variance, not each draw's)."""
    size = tuple(size)
    grid = [max(1, round(cells * s / min(size))) + 1 for s in size]
    mats = [_upsampling(g, s) for g, s in zip(grid, size, strict=True)]  # (out, in) per axis
    var = mats[0].square().sum(1).mean()
    for m in mats[1:]:
        var = var * m.square().sum(1).mean()
    coarse = torch.randn(math.prod(shape), *grid, generator=generator) / var.sqrt()
    if len(size) == 3:  # depth first, on the coarse grid: (B, gd, gh gw) -> (B, D, gh, gw)
        coarse = (mats[0] @ coarse.flatten(2)).view(len(coarse), size[0], *grid[1:])
    dense = mats[-2] @ coarse @ mats[-1].T  # (B, [D,] H, W)
    return dense.view(*shape, *size)


def label_maps(
    n: int,
    size,
    generator: torch.Generator,
    *,
    num_labels: int = _D.num_labels,
    scales: tuple[float, ...] = _D.label_scales,
) -> torch.Tensor:
    """Random label maps (n, 1, *size) int64 in 1..num_labels: argmax over ``num_labels``
    smooth noise channels, each image at one scale drawn from ``scales`` (cells across)."""
    size = spatial_size(size)
    pick = torch.randint(len(scales), (n,), generator=generator)
    logits = torch.empty(n, num_labels, *size)
    for s, cells in enumerate(scales):
        rows = (pick == s).nonzero()[:, 0]
        if len(rows):
            logits[rows] = smooth_noise((len(rows), num_labels), size, cells, generator)
    return _argmax(logits) + 1


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(1, keepdim=True)`` for (n, K, *spatial), a few times faster (a running max)."""
    best, index = x[:, :1].clone(), torch.zeros_like(x[:, :1], dtype=torch.long)
    for k in range(1, x.shape[1]):
        index.masked_fill_(x[:, k : k + 1] > best, k)
        best = torch.maximum(best, x[:, k : k + 1])
    return index


def texture_fields(
    n: int,
    size,
    generator: torch.Generator,
    *,
    fields: int = _D.texture_fields,
    cells: tuple[int, ...] = _D.texture_cells,
) -> torch.Tensor:
    """(n, fields, *size) textures of unit variance (expected): octaves of smooth noise (cell
    sizes ``cells`` pixels) weighted by a random power law per field, grain to clouds."""
    size = spatial_size(size)
    ones = (1,) * len(size)
    slope = 2 * torch.rand(n, fields, *ones, generator=generator)  # 0: grainy .. 2: cloudy
    weights = torch.stack([c ** (slope / 2) for c in cells])  # (octaves, n, fields, 1, ...)
    weights = weights / weights.square().sum(0).sqrt()
    out = torch.zeros(n, fields, *size)
    for c, weight in zip(cells, weights, strict=True):
        out += smooth_noise((n, fields), size, min(size) / c, generator) * weight
    return out


def label_contrast(
    n: int, num_labels: int, generator: torch.Generator, *, fields: int, texture_max: float
) -> torch.Tensor:
    """(n, num_labels + 1, 1 + fields) per label (row = label value): its intensity, uniform in
    0..1, and the weights of the texture fields (random signs, amplitude up to texture_max)."""
    k = num_labels + 1
    intensity = torch.rand(n, k, 1, generator=generator)
    amplitude = (
        texture_max
        * torch.rand(n, 1, 1, generator=generator)
        * torch.rand(n, k, 1, generator=generator)
    )  # textured images and nearly flat ones
    mix = torch.randn(n, k, fields, generator=generator) / math.sqrt(fields)
    return torch.cat([intensity, amplitude * mix], dim=2)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(2, x.ndim))
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 1, *spatial) images, each blurred by its own Gaussian ``sigma`` (n,) pixels."""
    if radius == 0:
        return x
    n, _, *size = x.shape
    r = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (r / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (n, 2r + 1)
    pad = min(radius, *(s - 1 for s in size))
    k = k[:, radius - pad : radius + pad + 1]
    y = F.pad(x.view(1, n, *size), (pad, pad) * len(size), mode="replicate")
    conv = F.conv2d if len(size) == 2 else F.conv3d
    for axis in range(len(size)):  # separable: one 1-D kernel along each axis
        shape = [1] * len(size)
        shape[axis] = -1
        y = conv(y, k.reshape(n, 1, *shape), groups=n)
    return y.view(n, 1, *size)


def render(
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    contrast: torch.Tensor | None = None,
    texture: torch.Tensor | None = None,
    num_labels: int | None = None,
    texture_max: float = _D.texture_max,
    blur_max: float = _D.blur_max,
    bias_max: float = _D.bias_max,
    noise_max: float = _D.noise_max,
    gamma_std: float = _D.gamma_std,
) -> torch.Tensor:
    """Images (n, 1, *spatial) in [0, 1] of label maps (n, 1, *spatial): each label's intensity
    plus its mix of ``texture`` (n, J, *spatial) (``contrast`` from ``label_contrast``; both
    drawn when not given), then blur, bias field, noise and gamma drawn per image; min-max
    normalised."""
    n, _, *size = labels.shape
    ones = (1,) * len(size)
    if texture is None:
        texture = texture_fields(n, size, generator)
    if contrast is None:
        k = num_labels or int(labels.max())
        contrast = label_contrast(
            n, k, generator, fields=texture.shape[1], texture_max=texture_max
        )
    c = contrast.shape[2]
    per_pixel = contrast.gather(1, labels.view(n, -1, 1).expand(-1, -1, c))  # (n, HW, 1 + J)
    per_pixel = per_pixel.transpose(1, 2).reshape(n, c, *size)
    image = per_pixel[:, :1] + (per_pixel[:, 1:] * texture).sum(1, keepdim=True)
    u = lambda: torch.rand(n, generator=generator)  # noqa: E731
    image = _blur(image, blur_max * u(), math.ceil(3 * blur_max))
    bias = smooth_noise((n, 1), size, 3, generator) * (bias_max * u()).view(n, 1, *ones)
    image = _minmax(_minmax(image) * bias.exp())
    noise = torch.randn(n, 1, *size, generator=generator) * (noise_max * u()).view(n, 1, *ones)
    gamma = torch.exp(gamma_std * torch.randn(n, 1, *ones, generator=generator))
    return _minmax(image + noise) ** gamma


@torch.no_grad()
def random_deformations(
    n: int,
    size,
    generator: torch.Generator,
    *,
    max_fraction: float = _D.max_fraction,
    min_px: float = _D.min_px,
    grids: tuple[int, ...] = _D.grids,
    identity_p: float = _D.identity_p,
    affine_p: float = _D.affine_p,
    rotation_deg: float = _D.rotation_deg,
    scale: float = _D.scale,
    shear: float = _D.shear,
    shift_fraction: float = _D.shift_fraction,
    integration_steps: int = 7,
) -> torch.Tensor:
    """Diffeomorphic flows (n, D, *size) in pixels: a smooth part whose peak displacement is
    log-uniform in ``min_px``..``max_fraction`` min(size) (within a few %), composed with an
    affine part for ``affine_p`` of the pairs; ``identity_p`` of them exactly zero.

    The smooth part is a velocity summed over ``bspline_fields`` grids (the k-th at std
    1 / (k + 1)), scaled *before* scaling and squaring (folding-free by construction; scaling
    the integrated flow instead, as ``multiscale_flows`` does, folds beyond ~10 %), integrated
    at <= ``VELOCITY_SIDE`` px on the short side and resized.
    """
    size = spatial_size(size)
    nd, ones = len(size), (1,) * len(size)
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    short = min(size)
    hi = max(max_fraction * short, min_px)
    peak = torch.exp(math.log(min_px) + u(n) * math.log(hi / min_px))  # (n,) pixels
    ratio = min(1.0, VELOCITY_SIDE[nd] / short)
    small = tuple(max(2, round(s * ratio)) for s in size)
    velocity = sum(bspline_fields(n, small, 1 / (k + 1), generator, grid=g) for k, g in
                   enumerate(grids))  # fmt: skip
    target = (peak * ratio).view(n, 1, *ones)  # in pixels of the small grid
    flow = velocity
    for _ in range(2):  # the second pass corrects for exp's peak growing faster than linearly
        velocity = velocity * target / _peak(flow)
        flow = integrate_velocity(velocity, integration_steps)
    flow = resize_flow(flow, size)
    strength = torch.exp(math.log(0.02) * u(n))  # affine strength, log-uniform in 2 %..100 %
    a, t = random_affines(n, nd, generator, rotation_deg=rotation_deg, scale=scale,
                          shear=shear, shift_px=shift_fraction * short)  # fmt: skip
    eye = torch.eye(nd).expand(n, nd, nd)
    a, t = eye + strength.view(n, 1, 1) * (a - eye), strength.view(n, 1) * t
    rows = (u(n) < affine_p).nonzero()[:, 0]
    flow[rows] = affine_after(flow[rows], a[rows], t[rows])
    flow[u(n) < identity_p] = 0.0
    return flow


def _peak(flow: torch.Tensor) -> torch.Tensor:
    """(n, 1, ...) largest displacement of each flow (n, D, *size) (no ``norm(dim=1)``: slow)."""
    peak = flow.square().sum(1).flatten(1).amax(1).sqrt().clamp_min(1e-12)
    return peak.view(-1, *(1,) * (flow.ndim - 1))


def bspline_fields(
    n: int, size: tuple[int, ...], magnitude: float, generator: torch.Generator, grid: int = 4
) -> torch.Tensor:
    """Smooth random fields (n, D, *size): a ``grid`` per axis of Gaussian control points of
    std ``magnitude`` px, cubic-B-spline upsampled (``synthetic.make_flows`` in any rank)."""
    coarse = torch.randn(n, len(size), *(grid,) * len(size), generator=generator) * magnitude
    return CoarseToDense(in_size=(grid,) * len(size), out_size=size, mode="bspline")(coarse)


def random_affines(
    n: int,
    ndim: int,
    generator: torch.Generator,
    *,
    rotation_deg: float,
    scale: float,
    shear: float,
    shift_px: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (n, D, D), t (n, D)) in pixel coordinates (axis order): ``A = R @ U``, R rotating by
    +-``rotation_deg`` in each axis plane (0, 1)[, (0, 2), (1, 2)], U upper triangular with an
    isotropic scale 1 +- ``scale`` on its diagonal and shears +-``shear`` above it; t in
    +-``shift_px`` per axis (2-D: ``synthetic.random_affines``, the same draws)."""
    u = lambda *shape: 2 * torch.rand(*shape, generator=generator) - 1  # noqa: E731
    planes = list(itertools.combinations(range(ndim), 2))
    m = len(planes)
    angle = u(n, m) * math.radians(rotation_deg)  # in synthetic.random_affines' order
    s, k, t = 1 + scale * u(n), shear * u(n, m), u(n, ndim) * shift_px
    rot, upper = None, torch.eye(ndim) * s.view(n, 1, 1)
    for p, (i, j) in enumerate(planes):
        cos, sin = angle[:, p].cos(), angle[:, p].sin()
        r = torch.eye(ndim).repeat(n, 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = cos, -sin, sin, cos
        rot = r if rot is None else rot @ r
        upper[:, i, j] = k[:, p]
    return rot @ upper, t


def affine_after(flow: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow (B, D, *size) of p -> T(p + flow(p)) - p, T(q) = A (q - c) + c + t about the
    grid's centre c: the affine composed after ``flow``, exactly (no resampling).
    Diffeomorphic when ``flow`` is and det A > 0 (``synthetic.affine_after`` in any rank)."""
    size, nd = tuple(flow.shape[2:]), flow.ndim - 2
    ones = (1,) * nd
    grid = identity_grid(size, dtype=flow.dtype)[None]  # (1, D, *size)
    centre = torch.tensor([(s - 1) / 2 for s in size], dtype=flow.dtype).view(1, nd, *ones)
    q = grid + flow - centre  # (B, D, *size) about the centre
    axes = "dhw"[-nd:]
    moved = torch.einsum(f"bij,bj{axes}->bi{axes}", a.to(flow.dtype), q)
    return moved + centre + t.to(flow.dtype).view(-1, nd, *ones) - grid


@torch.no_grad()
def make_synth_pairs(n: int, size, generator: torch.Generator, **settings) -> dict:
    """``n`` pairs at ``size`` (H, W), (D, H, W) or int (square): ``fixed``, ``moving``
    (n, 1, *size) in [0, 1], ``flow`` (n, D, *size), ``fixed_labels``, ``moving_labels``
    (n, 1, *size) int64, with ``fixed_labels == warp(moving_labels, flow, mode="nearest")``
    (module docstring). ``settings``: ``SynthSettings`` fields."""
    s = SynthSettings.of(**settings)
    size = spatial_size(size)
    moving_labels = label_maps(n, size, generator, num_labels=s.num_labels, scales=s.label_scales)
    flow = random_deformations(
        n, size, generator, max_fraction=s.max_fraction, min_px=s.min_px, grids=s.grids,
        identity_p=s.identity_p, affine_p=s.affine_p, rotation_deg=s.rotation_deg,
        scale=s.scale, shear=s.shear, shift_fraction=s.shift_fraction,
    )  # fmt: skip
    fixed_labels = warp(moving_labels.float(), flow, mode="nearest").long()
    # The texture is anatomy: drawn on the moving grid and carried to the fixed one by the flow.
    texture = texture_fields(n, size, generator, fields=s.texture_fields, cells=s.texture_cells)
    draw = lambda: label_contrast(n, s.num_labels, generator, fields=s.texture_fields,  # noqa: E731
                                  texture_max=s.texture_max)  # fmt: skip
    fixed_contrast, moving_contrast = draw(), draw()
    same = (torch.rand(n, generator=generator) < s.same_contrast_p).view(n, 1, 1)
    moving_contrast = torch.where(same, fixed_contrast, moving_contrast)
    look = {k: getattr(s, k) for k in ("blur_max", "bias_max", "noise_max", "gamma_std")}
    fixed = render(fixed_labels, generator, contrast=fixed_contrast, texture=warp(texture, flow),
                   **look)  # fmt: skip
    moving = render(moving_labels, generator, contrast=moving_contrast, texture=texture, **look)
    return {"fixed": fixed, "moving": moving, "flow": flow, "fixed_labels": fixed_labels,
            "moving_labels": moving_labels}  # fmt: skip
