"""The image files ``register`` is given: two files, or two folders whose files pair up by
name (any format ``data=folder`` reads), and reading a pair the way the model was trained."""

from __future__ import annotations

from pathlib import Path

import torch

from air_reg.data.preprocess import Preprocessing
from air_reg.data.readers import FOLDER_SUFFIXES, stem_of, suffix_of
from air_reg.images import ImageError


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


def read_pair(
    fixed_path: Path, moving_path: Path, prep=None, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images read and normalised by ``prep`` (a ``Preprocessing``; default: [0, 1]
    images as they are), (1, 1, H, W) each; refuses pairs of different sizes, and pairs
    larger than the ``size`` a network trained on padded images takes."""
    if prep is None:
        prep = Preprocessing()
    fixed, moving = prep.load(fixed_path), prep.load(moving_path)
    if fixed.shape != moving.shape:
        (fh, fw), (mh, mw) = fixed.shape[-2:], moving.shape[-2:]
        raise ImageError(
            f"fixed {fixed_path} is {fh}x{fw} but moving {moving_path} is {mh}x{mw} (HxW); "
            f"resample one of them to the other's size first"
        )
    if size is not None:
        prep.check_fits(fixed.shape, size, f"fixed {fixed_path}")
    return fixed, moving
