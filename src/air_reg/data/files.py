"""The image files ``register`` is given: two files, or two folders whose files pair up by
name (any format ``data=folder`` reads), and reading a pair the way the model was trained."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from air_reg.data.image_file import ImageFile, read_image_file
from air_reg.data.preprocess import Preprocessing
from air_reg.data.readers import FOLDER_SUFFIXES, stem_of, suffix_of
from air_reg.geometry import Geometry, moving_index, sample, warp_through
from air_reg.images import ImageError
from air_reg.models.components.spatial_transformer import identity_grid, warp

log = logging.getLogger(__name__)


def find_pairs(fixed: Path, moving: Path) -> list[tuple[str, Path, Path]]:
    """(name, fixed file, moving file) for two files, or for two folders paired by file name."""
    if fixed.is_dir() != moving.is_dir():
        folder, other = ("fixed", "moving") if fixed.is_dir() else ("moving", "fixed")
        raise ImageError(
            f"{folder} is a folder but {other} is not ({fixed}, {moving}); "
            f"pass two image files or two folders"
        )
    if not fixed.is_dir():
        return [(stem_of(fixed), fixed, moving)]
    found = [_images_in(fixed), _images_in(moving)]
    only = [sorted(found[0].keys() - found[1].keys()), sorted(found[1].keys() - found[0].keys())]
    if only[0] or only[1]:
        raise ImageError(
            f"folders {fixed} and {moving} do not pair up by file name: only in fixed: "
            f"{_listing(only[0])}; only in moving: {_listing(only[1])}; give each pair the "
            f"same file name in both folders"
        )
    if not found[0]:
        raise ImageError(
            f"no images ({' '.join(FOLDER_SUFFIXES)}) in {fixed} or {moving}; put the pairs "
            f"there under the same file names, or pass two image files"
        )
    names = sorted(found[0])
    stems = [stem_of(Path(n)) for n in names]
    if len(set(stems)) < len(stems):
        twins = sorted(n for n, stem in zip(names, stems, strict=True) if stems.count(stem) > 1)
        raise ImageError(f"{_listing(twins)} share a name: outputs would clash; rename them")
    return [(stem, found[0][n], found[1][n]) for stem, n in zip(stems, names, strict=True)]


def _images_in(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in folder.iterdir()
        if p.is_file() and suffix_of(p) in FOLDER_SUFFIXES and not p.name.startswith(".")
    }


def _listing(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) or "none"


def preprocessing_of(model):
    """How ``model`` reads images (``Preprocessing`` from its checkpoint's data record) and the
    size its network takes: None for a model that takes pairs at their own size."""
    any_size = getattr(model, "accepts_any_size", False)
    return Preprocessing.of_model(model), None if any_size else tuple(model.image_size)


@dataclass(frozen=True)
class Pair:
    """A fixed and a moving image as ``register`` uses them: ``fixed`` and ``moving`` (1, 1,
    H, W) normalised on the fixed grid (the moving one resampled there through physical space
    when its grid differs: another size, spacing, origin or direction, as ITK resamples), and
    the files (``ImageFile``: geometry, header, colour) the outputs are written for."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_file: ImageFile
    moving_file: ImageFile
    moving_native: torch.Tensor  # (1, 1, h, w) normalised on the moving image's own grid

    @property
    def same_grid(self) -> bool:
        return self.moving_native.shape == self.fixed.shape and (
            self.fixed_file.geometry.same_grid(self.moving_file.geometry)
        )

    @property
    def spacing(self) -> tuple[float, ...]:
        """The fixed image's pixel spacing (mm), per axis."""
        return self.fixed_file.geometry.spacing

    def warp(self, image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear"):
        """A moving-side ``image`` (1, C, h, w) on the moving grid warped by ``flow`` (1, 2,
        H, W) onto the fixed grid: one interpolation."""
        if self.same_grid:
            return warp(image, flow, mode=mode)
        fixed_g, moving_g = self.fixed_file.geometry, self.moving_file.geometry
        return warp_through(image, flow, fixed_g, moving_g, mode=mode)


def read_pair(
    fixed_path: Path,
    moving_path: Path,
    prep=None,
    size: tuple[int, int] | None = None,
    channel: str | int | None = None,
) -> Pair:
    """Both files read (``read_image_file``) and normalised by ``prep`` (a ``Preprocessing``;
    default: [0, 1] images as they are); the moving image resampled onto the fixed grid when
    the grids differ (pixel files: unit spacing, a shared origin at the first pixel). Refuses
    a fixed image larger than the ``size`` a network trained on padded images takes."""
    if prep is None:
        prep = Preprocessing()
    files = [read_image_file(p, channel) for p in (fixed_path, moving_path)]
    _check_ranks(*files)
    fixed, moving = (torch.from_numpy(prep.normalise(f.values, f.path))[None, None]
                     for f in files)  # fmt: skip
    if size is not None:
        prep.check_fits(fixed.shape, size, f"fixed {fixed_path}")
    fixed_g, moving_g = files[0].geometry, files[1].geometry
    _warn_if_sizes_differ(*files)
    on_fixed = moving
    if moving.shape != fixed.shape or not fixed_g.same_grid(moving_g):
        grid = identity_grid(fixed.shape[2:], dtype=fixed.dtype)[None]  # (1, D, *size)
        on_fixed = sample(moving, moving_index(fixed_g, moving_g, grid))
        if not _overlap(fixed.shape[2:], moving.shape[2:], fixed_g, moving_g):
            raise ImageError(
                f"fixed {fixed_path} and moving {moving_path} do not overlap in physical "
                f"space (origin, spacing, direction); check their headers"
            )
    return Pair(fixed, on_fixed, files[0], files[1], moving)


def _warn_if_sizes_differ(fixed: ImageFile, moving: ImageFile) -> None:
    """A warning when two pixel files (no geometry of their own) differ in size: they are
    placed as ITK places them, which is seldom what two views of one scene at two
    resolutions mean."""
    f, m = fixed.values.shape, moving.values.shape
    if f == m or fixed.is_nifti or moving.is_nifti:
        return
    covered = math.prod(min(a, b) for a, b in zip(f, m, strict=True)) / math.prod(f)
    log.warning(
        "fixed %s is %s and moving %s is %s pixels: files without a geometry are placed as "
        "ITK places them, unit spacing from a shared first pixel, so the moving image covers "
        "%.1f %% of the fixed one; if both show the same field of view, resize one to the "
        "other's size first (or save both as NIfTI with their pixel spacings)",
        fixed.path, " x ".join(map(str, f)), moving.path, " x ".join(map(str, m)),
        100 * covered,
    )  # fmt: skip


def _check_ranks(fixed: ImageFile, moving: ImageFile) -> None:
    """Two 2-D images or two 3-D volumes (one message naming the fix otherwise)."""
    for f in (fixed, moving):
        if f.values.ndim not in (2, 3):
            raise ImageError(f"{f.path} has shape {f.values.shape}: register takes 2-D images "
                             f"or 3-D volumes")  # fmt: skip
    if fixed.values.ndim != moving.values.ndim:
        volume, image = (fixed, moving) if fixed.values.ndim == 3 else (moving, fixed)
        how = (
            "nibabel.save(nibabel.Nifti1Image(volume[:, :, k], affine), 'slice.nii.gz')"
            if volume.is_nifti
            else "np.save('slice.npy', volume[k])"
        )
        raise ImageError(
            f"{volume.path} is a 3-D volume of shape {volume.values.shape} and {image.path} a "
            f"2-D image: register two 2-D images or two volumes; to register a slice, save "
            f"the slice to register as its own file, e.g. {how}"
        )


def _overlap(fixed_size, moving_size, fixed_g: Geometry, moving_g: Geometry) -> bool:
    """Whether any fixed pixel centre falls inside the moving image."""
    q = moving_index(fixed_g, moving_g, identity_grid(fixed_size)[None].float())[0]  # (D, *size)
    inside = torch.ones(q.shape[1:], dtype=torch.bool)
    for i, n in enumerate(moving_size):
        inside &= (q[i] >= -0.5) & (q[i] <= n - 0.5)
    return bool(inside.any())
