"""A tiny generated dataset of shapes with known smooth warps, for fast tests and EPE."""

from __future__ import annotations

import math

import torch

from air_reg.data.datamodule import PairDataModule
from air_reg.models.components.spatial_transformer import CoarseToDense, identity_grid, warp

SHAPES = ("ellipse", "rectangle", "ring")


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
    n: int, size: int, magnitude: float, generator: torch.Generator, grid: int = 4
) -> torch.Tensor:
    """Smooth random flows (n, 2, size, size): a coarse Gaussian grid, B-spline upsampled."""
    coarse = torch.randn(n, 2, grid, grid, generator=generator) * magnitude
    return CoarseToDense(in_size=(grid, grid), out_size=(size, size), mode="bspline")(coarse)


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
