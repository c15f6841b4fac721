"""Where an image's pixels lie in physical space, as ITK sees it, and sampling through it.

A ``Geometry`` maps an index ``p`` (air-reg's axis order: a (H, W) array's rows, then columns;
a NIfTI's voxel axes i, j, k as nibabel reads them) to a physical point in ITK's LPS frame
(millimetres): ``x = origin + direction @ (spacing * p)``. ``direction``'s column i is the
physical direction of array axis i. Defaults (``Geometry.pixels``) are what ITK gives a PNG:
unit spacing, origin 0, rows along physical y and columns along x, so a field air-reg exports
for a PNG pair applies in SimpleITK and ANTs to the same PNG files.

A flow stays in pixels of the fixed grid (the stable contract); physically it is the
displacement ``direction @ (spacing * flow)`` (``to_physical``). A moving image on another
grid is sampled at ``moving_index(fixed_geometry, moving_geometry, p + flow)``: the fixed
pixel's physical point, then the moving image's index there (``sample``), as ITK resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from air_reg.errors import DataError
from air_reg.models.components.spatial_transformer import identity_grid

RAS_FROM_LPS = (-1.0, -1.0, 1.0)  # NIfTI headers are RAS, ITK's physical space is LPS


@dataclass(frozen=True)
class Geometry:
    """Spacing (mm per pixel, per array axis), origin (LPS mm) and direction (D x D, column i
    = axis i's unit direction) of a D-dimensional image."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        d = len(self.spacing)
        if len(self.origin) != d or np.shape(self.direction) != (d, d):
            raise DataError(f"a geometry needs D spacings, D origin values and D x D directions, "
                            f"got {self}")  # fmt: skip
        if min(self.spacing) <= 0 or not np.isfinite(self.spacing).all():
            raise DataError(f"pixel spacing must be positive, got {self.spacing}; fix the "
                            f"image header")  # fmt: skip
        if abs(np.linalg.det(np.asarray(self.direction))) < 1e-6:
            raise DataError(f"the image's direction matrix is singular ({self.direction}); "
                            f"fix the image header")  # fmt: skip

    @classmethod
    def pixels(cls, ndim: int = 2) -> Geometry:
        """A pixel image's geometry as ITK reads it: unit spacing, origin 0, array axis i
        along physical axis ndim - 1 - i (a PNG's rows along y, columns along x)."""
        direction = np.eye(ndim)[::-1]
        return cls.of(np.ones(ndim), np.zeros(ndim), direction)

    @classmethod
    def of(cls, spacing, origin, direction) -> Geometry:
        """From array-likes (rounded to float64 tuples)."""
        rows = tuple(tuple(float(v) for v in row) for row in np.asarray(direction))
        return cls(tuple(float(s) for s in np.ravel(spacing)),
                   tuple(float(o) for o in np.ravel(origin)), rows)  # fmt: skip

    @classmethod
    def from_affine(cls, affine, ndim: int, axes: tuple[int, ...] | None = None) -> Geometry:
        """From a NIfTI (RAS) 4 x 4 affine, for an image of ``ndim`` axes: the voxel ``axes``
        kept (default the first ``ndim``; a 2-D slice stored as (1, Y, Z): (1, 2)), in the
        first ``ndim`` physical coordinates, as ITK reads a 2-D NIfTI."""
        axes = tuple(range(ndim)) if axes is None else tuple(axes)
        lps = np.diag([*RAS_FROM_LPS, 1.0]) @ np.asarray(affine, dtype=np.float64)
        matrix = lps[:ndim, list(axes)]  # (physical, index)
        spacing = np.linalg.norm(matrix, axis=0)
        if (spacing <= 0).any():
            raise DataError(
                f"the NIfTI affine has a zero axis ({affine.tolist()}); fix the header"
            )
        return cls.of(spacing, lps[:ndim, 3], matrix / spacing)

    # -- views --------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @property
    def matrix(self) -> np.ndarray:
        """(D, D) physical mm per index step: direction @ diag(spacing)."""
        return np.asarray(self.direction) * np.asarray(self.spacing)[None, :]

    @property
    def is_unit(self) -> bool:
        """Unit spacing: errors in pixels are errors in mm."""
        return all(s == 1.0 for s in self.spacing)

    def affine(self) -> np.ndarray:
        """The NIfTI (RAS) 4 x 4 affine of this geometry (2-D: embedded, k along +z)."""
        lps = np.eye(4)
        d = self.ndim
        lps[:d, :d], lps[:d, 3] = self.matrix, self.origin
        return np.diag([*RAS_FROM_LPS, 1.0]) @ lps

    def same_grid(self, other: Geometry, tol: float = 1e-6) -> bool:
        """Whether two geometries place index p at the same physical point (within ``tol``)."""
        return (self.ndim == other.ndim
                and np.allclose(self.matrix, other.matrix, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol))  # fmt: skip

    # -- flows --------------------------------------------------------------------------------
    def to_physical(self, flow: torch.Tensor) -> torch.Tensor:
        """A flow (B, D, *spatial) in pixels -> the physical displacement (B, D, *spatial), mm,
        components in LPS order (what an ITK displacement field holds)."""
        m = torch.as_tensor(self.matrix, dtype=flow.dtype, device=flow.device)
        return torch.einsum("ij,bj...->bi...", m, flow)

    def from_physical(self, displacement: torch.Tensor) -> torch.Tensor:
        """``to_physical``'s inverse: LPS mm -> pixels along the array axes."""
        m = torch.as_tensor(np.linalg.inv(self.matrix), dtype=displacement.dtype,
                            device=displacement.device)  # fmt: skip
        return torch.einsum("ij,bj...->bi...", m, displacement)

    def physical_norm(self, flow: torch.Tensor) -> torch.Tensor:
        """(B, *spatial) length in mm of each displacement of a flow in pixels."""
        return self.to_physical(flow).square().sum(1).sqrt()


def moving_index(fixed: Geometry, moving: Geometry, points: torch.Tensor) -> torch.Tensor:
    """Fixed-grid points (B, D, *spatial) in fixed pixels -> the moving image's index there
    (B, D, *spatial): q = M_m^-1 (o_f + M_f p - o_m)."""
    a = np.linalg.solve(moving.matrix, fixed.matrix)  # (D, D)
    b = np.linalg.solve(moving.matrix, np.subtract(fixed.origin, moving.origin))
    a_t = torch.as_tensor(a, dtype=points.dtype, device=points.device)
    b_t = torch.as_tensor(b, dtype=points.dtype, device=points.device)
    shape = (1, -1) + (1,) * (points.ndim - 2)
    return torch.einsum("ij,bj...->bi...", a_t, points) + b_t.view(shape)


def sample(image: torch.Tensor, index: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "border") -> torch.Tensor:  # fmt: skip
    """``image`` (B, C, *size) sampled at ``index`` (B, D, *out) in its own pixels (channel i
    along axis i): (B, C, *out). Any output grid, any image size (D = 2 or 3)."""
    d = index.shape[1]
    size = image.shape[2:]
    if len(size) != d:
        raise ValueError(f"a {d}-D index needs a {d}-D image, got {tuple(image.shape)}")
    # grid_sample wants (x, y[, z]) = reversed axes, in [-1, 1] with align_corners=True.
    norm = [index[:, i] * (2.0 / max(size[i] - 1, 1)) - 1.0 for i in range(d)]
    grid = torch.stack(norm[::-1], dim=-1)  # (B, *out, D)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp_through(
    moving: torch.Tensor,
    flow: torch.Tensor,
    fixed: Geometry,
    moving_geom: Geometry,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """``moving`` (B, C, *its size) warped onto the fixed grid by ``flow`` (B, D, *fixed size)
    in fixed pixels, through physical space (one interpolation): ITK's resampling."""
    points = identity_grid(flow.shape[2:], flow.device, flow.dtype)[None] + flow
    return sample(moving, moving_index(fixed, moving_geom, points), mode, padding_mode)


def as_flow(flow: torch.Tensor) -> torch.Tensor:
    """(D, *size) or (1, D, *size) -> (1, D, *size)."""
    flow = torch.as_tensor(flow)
    return flow[None] if flow.ndim == flow.shape[0] + 1 else flow
