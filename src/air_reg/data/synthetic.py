"""Known smooth deformations and a tiny generated dataset of shapes warped by them.

The one home of known deformations: ``make_flows`` (a smooth random field: the synthetic data's
warps) and ``known_flows`` (a smooth random velocity integrated to a diffeomorphism: the
benchmarks' "known" pairs, ``air_reg.bench.pairs``, and the brain benchmark's,
``air_reg.bench.brain``), so an end-point error means the same thing everywhere; and, for the
2-D families of ``air_reg.bench.families``, ``multiscale_flows`` (the same integration over a
coarse-plus-finer velocity) and ``random_affines`` / ``affine_after`` (an affine part composed
with a smooth one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from air_reg.data.datamodule import PairDataModule
from air_reg.models.components.spatial_transformer import (
    CoarseToDense,
    identity_grid,
    integrate_velocity,
    warp,
)

SHAPES = ("ellipse", "rectangle", "ring")
KINDS = ("bspline", "gaussian")  # families of known_flows' random velocities


def make_shapes(
    n: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` soft-edged random shapes (n, 1, size, size) in [0, 1] and their shape labels."""
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    labels = torch.randint(len(SHAPES), (n,), generator=generator)
    yx = identity_grid((size, size)) / (size - 1) * 2 - 1  # (2, S, S) in [-1, 1]
    centre = (u(n, 2, 1, 1) - 0.5) * 0.4
    radii = 0.25 + 0.35 * u(n, 2, 1, 1)
    angle = u(n, 1, 1) * math.pi
    d = yx[None] - centre  # (n, 2, S, S)
    cos, sin = angle.cos(), angle.sin()
    r = torch.stack([cos * d[:, 0] + sin * d[:, 1], -sin * d[:, 0] + cos * d[:, 1]], 1) / radii
    ellipse = r.square().sum(1).sqrt()  # 1 on the boundary
    box = r.abs().amax(1)
    dist = torch.where(labels[:, None, None] == 1, box, ellipse)
    inside = torch.sigmoid((1 - dist) * size / 4)
    ring = inside * torch.sigmoid((dist - 0.55) * size / 4)
    images = torch.where(labels[:, None, None] == 2, ring, inside)
    return images[:, None].clamp(0, 1), labels


def make_flows(
    n: int,
    size: int | tuple[int, int],
    magnitude: float,
    generator: torch.Generator,
    grid: int = 4,
) -> torch.Tensor:
    """Smooth random flows (n, 2, H, W) (``size``: H = W, or (H, W)): a ``grid`` x ``grid``
    Gaussian grid of std ``magnitude`` px, cubic-B-spline upsampled."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    coarse = torch.randn(n, 2, grid, grid, generator=generator) * magnitude
    return CoarseToDense(in_size=(grid, grid), out_size=size, mode="bspline")(coarse)


def smoothed_noise(
    n: int, size: tuple[int, int], generator: torch.Generator, sigma: float = 12.0
) -> torch.Tensor:
    """White noise (n, 2, H, W) smoothed by a Gaussian of ``sigma`` px (reflected borders, so
    H and W must exceed 6 ``sigma``): a second family of smooth fields, with no control grid."""
    h, w = size
    noise = torch.randn(n, 2, h, w, generator=generator)
    r = torch.arange(-3 * int(sigma), 3 * int(sigma) + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = k / k.sum()
    pad = len(k) // 2
    rows = F.conv2d(F.pad(noise, (0, 0, pad, pad), mode="reflect"),
                    k.view(1, 1, -1, 1).expand(2, 1, -1, 1), groups=2)  # fmt: skip
    return F.conv2d(F.pad(rows, (pad, pad, 0, 0), mode="reflect"),
                    k.view(1, 1, 1, -1).expand(2, 1, 1, -1), groups=2)  # fmt: skip


@torch.no_grad()
def known_flows(
    n: int,
    size: int | tuple[int, int],
    generator: torch.Generator,
    *,
    magnitude: float = 1.0,
    kind: str = "bspline",
    max_px: float | None = None,
    integration_steps: int = 7,
) -> torch.Tensor:
    """Known smooth diffeomorphisms (n, 2, H, W) in pixels, folding-free by construction: a
    random stationary velocity integrated by scaling and squaring.

    ``kind="bspline"``: ``make_flows``' velocity (std ``magnitude`` px on a 4 x 4 grid);
    ``kind="gaussian"``: ``smoothed_noise`` times ``magnitude``. ``max_px``: each flow is then
    scaled so that its largest displacement is ``max_px`` (the brain benchmark's 6 px).
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if kind == "bspline":
        velocity = make_flows(n, size, magnitude, generator)
    elif kind == "gaussian":
        velocity = smoothed_noise(n, size, generator) * magnitude
    else:
        raise ValueError(f"known_flows: kind={kind!r}; choose one of {KINDS}")
    flow = integrate_velocity(velocity, integration_steps)
    if max_px is not None:  # each flow's own largest displacement -> max_px
        flow = flow * (max_px / flow.norm(dim=1).flatten(1).amax(1).view(-1, 1, 1, 1))
    return flow


@torch.no_grad()
def multiscale_flows(
    n: int,
    size: int | tuple[int, int],
    generator: torch.Generator,
    max_px: float | torch.Tensor,
    *,
    grids: tuple[int, ...] = (4, 8),
    integration_steps: int = 7,
) -> torch.Tensor:
    """Smooth diffeomorphisms (n, 2, H, W) in pixels with two scales of detail: a velocity
    summed over ``make_flows`` grids (the k-th at std 1 / (k + 1)), integrated by scaling and
    squaring, then scaled so that each flow's largest displacement is ``max_px`` (a float or
    (n,) per flow). With grids (4, 8) no pixel folds up to 10 px at 160 x 208 (the scaled
    flow's Jacobian determinant stays above ~0.6 there; checked by the families' tests)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    velocity = sum(make_flows(n, size, 1.0 / (k + 1), generator, grid=g) for k, g in
                   enumerate(grids))  # fmt: skip
    flow = integrate_velocity(velocity, integration_steps)
    peak = flow.norm(dim=1).flatten(1).amax(1).clamp_min(1e-12)  # (n,)
    return flow * (torch.as_tensor(max_px, dtype=flow.dtype) / peak).view(-1, 1, 1, 1)


def random_affines(
    n: int,
    generator: torch.Generator,
    *,
    rotation_deg: float = 10.0,
    scale: float = 0.1,
    shear: float = 0.05,
    shift_px: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (n, 2, 2), t (n, 2)) in (row, column) pixel coordinates: a rotation uniform in
    +-``rotation_deg``, an isotropic scale in 1 +- ``scale``, a shear in +-``shear`` and a
    shift in +-``shift_px`` per axis; ``A = R(angle) @ [[s, shear], [0, s]]``."""
    u = lambda *shape: 2 * torch.rand(*shape, generator=generator) - 1  # noqa: E731
    angle, s, k, t = u(n) * math.radians(rotation_deg), 1 + scale * u(n), shear * u(n), u(n, 2)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    upper = torch.stack([torch.stack([s, k], -1), torch.stack([torch.zeros_like(s), s], -1)], -2)
    return rot @ upper, t * shift_px


def affine_after(flow: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow (B, 2, H, W) of p -> T(p + flow(p)) - p, T(q) = A (q - c) + c + t about the
    image centre c: the affine (``random_affines``) composed after ``flow``, exactly (no
    resampling). Diffeomorphic when ``flow`` is and det A > 0."""
    h, w = flow.shape[-2:]
    grid = identity_grid((h, w), dtype=flow.dtype)[None]  # (1, 2, H, W)
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=flow.dtype).view(1, 2, 1, 1)
    q = grid + flow - centre  # (B, 2, H, W) about the centre
    moved = torch.einsum("bij,bjhw->bihw", a.to(flow.dtype), q)
    return moved + centre + t.to(flow.dtype).view(-1, 2, 1, 1) - grid


@torch.no_grad()
def make_pairs(n: int, size: int, magnitude: float, generator: torch.Generator):
    """(fixed, moving, flow, labels): shapes and their known warps, fixed = warp(moving, flow)."""
    moving, labels = make_shapes(n, size, generator)
    flow = make_flows(n, size, magnitude, generator)
    return warp(moving, flow), moving, flow, labels


class SyntheticDataModule(PairDataModule):
    """Shapes (moving) and their known warps (fixed = moving warped by ``flow``).

    Pairs are preset: fixed image ``i`` goes with its own un-warped template, and the
    batch carries the ground-truth ``flow`` so end-point error can be measured.
    """

    def __init__(
        self, *, num_images: int = 512, magnitude: float = 1.5, seed: int = 0, **kwargs
    ) -> None:
        kwargs.setdefault("dataset", "synthetic")
        kwargs.setdefault("pairing", "given")
        kwargs.setdefault("num_val_pairs", None)
        super().__init__(**kwargs)
        self.num_images, self.magnitude, self.seed = num_images, magnitude, seed

    def file_checksums(self) -> dict[str, str]:
        return {}  # generated from the seed, no files

    def load(self):
        g = torch.Generator().manual_seed(self.seed)
        size = self.hparams.image_size
        fixed, moving, flows, labels = make_pairs(self.num_images, size, self.magnitude, g)
        n = self.num_images
        images = torch.cat([fixed, moving])
        self.partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        all_flows = torch.cat([flows, torch.zeros_like(flows)])
        return images, torch.cat([labels, labels]), all_flows, n
