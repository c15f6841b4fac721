"""``data=synth``: image pairs drawn on the fly from random label maps (SynthMorph-style).

No real image and no manual label: a pair is one random label map (``label_maps``: argmax of
smooth noise, blobs from large to small) deformed by a known diffeomorphism
(``random_deformations``: tiny to large, sometimes with an affine part, sometimes none), each
side rendered on its own (``render``: a random intensity and texture per label, blur, bias
field, noise, gamma), so the network learns to register any contrast and texture at any size.
Convention (``air_reg.warp``): ``warped(p) = moving(p + flow(p))``; the fixed label map is
exactly ``warp(moving_labels, flow, mode="nearest")`` and the fixed image is rendered from it
(no image is resampled), so ``flow`` is the true flow on the fixed grid. Everything is drawn
from one ``torch.Generator``: the same seed gives bit-identical pairs.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from air_reg.data.synthetic import affine_after, make_flows, random_affines
from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import integrate_velocity, resize_flow, warp
from air_reg.models.contract import as_size

log = logging.getLogger(__name__)

VELOCITY_SIDE = 64  # velocities are integrated with this many pixels on the short side at most


@dataclass(frozen=True)
class SynthSettings:
    """How synthetic pairs are drawn; each field is also a ``data.*`` setting (conf/data/synth)."""

    num_labels: int = 16  # regions of a label map: labels 1..num_labels (0 is never drawn)
    label_scales: tuple[float, ...] = (2, 3, 5, 8, 12)  # noise cells across the short side
    max_fraction: float = 0.1  # largest smooth displacement, a fraction of min(H, W)
    min_px: float = 0.2  # smallest one; log-uniform in between, per pair
    grids: tuple[int, ...] = (4, 8, 16)  # control grids of the velocity (coarse + finer detail)
    identity_p: float = 0.05  # pairs with exactly zero flow
    affine_p: float = 0.5  # pairs with an affine part (its strength log-uniform in 2%..100%)
    rotation_deg: float = 10.0
    scale: float = 0.1
    shear: float = 0.05
    shift_fraction: float = 0.05  # affine shift, a fraction of min(H, W)
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
    """Gaussian noise (*shape, H, W) on a grid of ``cells`` cells across the short side,
    bicubic-upsampled (nodes on the image corners; two small matmuls), of unit variance on
    average over the pixels (the expected variance, not each draw's)."""
    h, w = size
    gh, gw = (max(1, round(cells * s / min(h, w))) + 1 for s in (h, w))
    rows, cols = _upsampling(gh, h), _upsampling(gw, w)
    var = rows.square().sum(1).mean() * cols.square().sum(1).mean()
    coarse = torch.randn(math.prod(shape), gh, gw, generator=generator)
    dense = rows @ (coarse / var.sqrt()) @ cols.T  # (B, H, W)
    return dense.view(*shape, h, w)


def label_maps(
    n: int,
    size,
    generator: torch.Generator,
    *,
    num_labels: int = _D.num_labels,
    scales: tuple[float, ...] = _D.label_scales,
) -> torch.Tensor:
    """Random label maps (n, 1, H, W) int64 in 1..num_labels: argmax over ``num_labels``
    smooth noise channels, each image at one scale drawn from ``scales`` (cells across)."""
    size = as_size(size)
    pick = torch.randint(len(scales), (n,), generator=generator)
    logits = torch.empty(n, num_labels, *size)
    for s, cells in enumerate(scales):
        rows = (pick == s).nonzero()[:, 0]
        if len(rows):
            logits[rows] = smooth_noise((len(rows), num_labels), size, cells, generator)
    return _argmax(logits) + 1


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(1, keepdim=True)`` for (n, K, H, W), a few times faster (a running max)."""
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
    """(n, fields, H, W) textures of unit variance (expected): octaves of smooth noise (cell
    sizes ``cells`` pixels) weighted by a random power law per field, grain to clouds."""
    h, w = size = as_size(size)
    slope = 2 * torch.rand(n, fields, 1, 1, generator=generator)  # 0: grainy .. 2: cloudy
    weights = torch.stack([c ** (slope / 2) for c in cells])  # (octaves, n, fields, 1, 1)
    weights = weights / weights.square().sum(0).sqrt()
    out = torch.zeros(n, fields, h, w)
    for c, weight in zip(cells, weights, strict=True):
        out += smooth_noise((n, fields), size, min(h, w) / c, generator) * weight
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
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 1, H, W) images, each blurred by its own Gaussian ``sigma`` (n,) pixels."""
    if radius == 0:
        return x
    n, _, h, w = x.shape
    r = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (r / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (n, 2r + 1)
    pad = min(radius, h - 1, w - 1)
    y = F.pad(x.view(1, n, h, w), (pad, pad, pad, pad), mode="replicate")
    y = F.conv2d(y, k.view(n, 1, -1, 1)[:, :, radius - pad : radius + pad + 1], groups=n)
    y = F.conv2d(y, k.view(n, 1, 1, -1)[..., radius - pad : radius + pad + 1], groups=n)
    return y.view(n, 1, h, w)


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
    """Images (n, 1, H, W) in [0, 1] of label maps (n, 1, H, W): each label's intensity plus its
    mix of ``texture`` (n, J, H, W) (``contrast`` from ``label_contrast``; both drawn when not
    given), then blur, bias field, noise and gamma drawn per image; min-max normalised."""
    n, _, h, w = labels.shape
    if texture is None:
        texture = texture_fields(n, (h, w), generator)
    if contrast is None:
        k = num_labels or int(labels.max())
        contrast = label_contrast(
            n, k, generator, fields=texture.shape[1], texture_max=texture_max
        )
    c = contrast.shape[2]
    per_pixel = contrast.gather(1, labels.view(n, -1, 1).expand(-1, -1, c))  # (n, HW, 1 + J)
    per_pixel = per_pixel.transpose(1, 2).reshape(n, c, h, w)
    image = per_pixel[:, :1] + (per_pixel[:, 1:] * texture).sum(1, keepdim=True)
    u = lambda: torch.rand(n, generator=generator)  # noqa: E731
    image = _blur(image, blur_max * u(), math.ceil(3 * blur_max))
    bias = smooth_noise((n, 1), (h, w), 3, generator) * (bias_max * u()).view(n, 1, 1, 1)
    image = _minmax(_minmax(image) * bias.exp())
    noise = torch.randn(n, 1, h, w, generator=generator) * (noise_max * u()).view(n, 1, 1, 1)
    gamma = torch.exp(gamma_std * torch.randn(n, 1, 1, 1, generator=generator))
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
    """Diffeomorphic flows (n, 2, H, W) in pixels: a smooth part whose peak displacement is
    log-uniform in ``min_px``..``max_fraction`` min(H, W) (within a few %), composed with an
    affine part for ``affine_p`` of the pairs; ``identity_p`` of them exactly zero.

    The smooth part is a velocity summed over ``make_flows`` grids (the k-th at std
    1 / (k + 1)), scaled *before* scaling and squaring (folding-free by construction; scaling
    the integrated flow instead, as ``multiscale_flows`` does, folds beyond ~10 %), integrated
    at <= ``VELOCITY_SIDE`` px on the short side and resized.
    """
    h, w = size = as_size(size)
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    short = min(h, w)
    hi = max(max_fraction * short, min_px)
    peak = torch.exp(math.log(min_px) + u(n) * math.log(hi / min_px))  # (n,) pixels
    ratio = min(1.0, VELOCITY_SIDE / short)
    small = (max(2, round(h * ratio)), max(2, round(w * ratio)))
    velocity = sum(make_flows(n, small, 1 / (k + 1), generator, grid=g) for k, g in
                   enumerate(grids))  # fmt: skip
    target = (peak * ratio).view(n, 1, 1, 1)  # in pixels of the small grid
    flow = velocity
    for _ in range(2):  # the second pass corrects for exp's peak growing faster than linearly
        velocity = velocity * target / _peak(flow)
        flow = integrate_velocity(velocity, integration_steps)
    flow = resize_flow(flow, size)
    strength = torch.exp(math.log(0.02) * u(n))  # affine strength, log-uniform in 2 %..100 %
    a, t = random_affines(n, generator, rotation_deg=rotation_deg, scale=scale, shear=shear,
                          shift_px=shift_fraction * short)  # fmt: skip
    eye = torch.eye(2).expand(n, 2, 2)
    a, t = eye + strength.view(n, 1, 1) * (a - eye), strength.view(n, 1) * t
    rows = (u(n) < affine_p).nonzero()[:, 0]
    flow[rows] = affine_after(flow[rows], a[rows], t[rows])
    flow[u(n) < identity_p] = 0.0
    return flow


def _peak(flow: torch.Tensor) -> torch.Tensor:
    """(n, 1, 1, 1) largest displacement of each flow (n, 2, H, W) (no ``norm(dim=1)``: slow)."""
    return flow.square().sum(1).flatten(1).amax(1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)


@torch.no_grad()
def make_synth_pairs(n: int, size, generator: torch.Generator, **settings) -> dict:
    """``n`` pairs at ``size`` (H, W) or int: ``fixed``, ``moving`` (n, 1, H, W) in [0, 1],
    ``flow`` (n, 2, H, W), ``fixed_labels``, ``moving_labels`` (n, 1, H, W) int64, with
    ``fixed_labels == warp(moving_labels, flow, mode="nearest")`` (module docstring).
    ``settings``: ``SynthSettings`` fields."""
    s = SynthSettings.of(**settings)
    size = as_size(size)
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


# -- the data module -------------------------------------------------------------------------
