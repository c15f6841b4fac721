"""Raw pixel arrays from a user's files: PNG/JPEG/TIFF, ``.npy`` and NIfTI (2-D or 3-D).

``read_array`` returns the file's values (2-D, or 3-D for a NIfTI volume; with ``unit``,
8- and 16-bit images in [0, 1]); ``normalise`` maps an image to [0, 1]; ``slices`` cuts a
volume into 2-D images. Every failure is one ``ImageError`` naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from air_reg.images import PIL_SUFFIXES, ImageError, _check_size, _load_npy, _load_pil, _reason

NIFTI_SUFFIXES = (".nii", ".nii.gz")
FOLDER_SUFFIXES = (*PIL_SUFFIXES, ".npy", *NIFTI_SUFFIXES)
NORMALISATIONS = ("minmax", "percentile", "none")


def suffix_of(path: Path) -> str:
    """``.nii.gz`` for gzipped NIfTI, else the lower-case suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def stem_of(path: Path) -> str:
    """The file name without its (double) suffix: ``brain.nii.gz`` -> ``brain``."""
    return path.name[: -len(suffix_of(path))] if suffix_of(path) else path.name


def read_array(path: Path, unit: bool = False) -> np.ndarray:
    """The pixels of one file as a float32 array: (H, W), or (X, Y, Z) for a NIfTI volume.

    ``unit``: 8- and 16-bit images and arrays (not NIfTI) are scaled by 1/255 or 1/65535 to
    [0, 1], the one reading of an image (``air_reg.data.preprocess``: training, eval and
    register; so ``data.normalize=none`` takes a 16-bit PNG); label maps keep their values."""
    check_file(path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        array = _load_nifti(path)
    elif suffix == ".npy":
        array = _load_npy(path)
    elif suffix in PIL_SUFFIXES:
        array = _load_pil(path)
    else:
        raise ImageError(f"{path}: unsupported file type; use one of {FOLDER_SUFFIXES}")
    return as_pixels(array, path, unit)


def check_file(path: Path) -> None:
    """An ``ImageError`` naming the fix when ``path`` is missing or empty."""
    if not path.is_file() or path.stat().st_size == 0:
        what = "does not exist" if not path.exists() else "is empty (0 bytes)"
        raise ImageError(f"{path} {what}; re-export or remove it")


def as_pixels(array: np.ndarray, path: Path, unit: bool = False) -> np.ndarray:
    """``read_array``'s checks and conversion of the pixels already loaded from ``path``."""
    suffix = suffix_of(path)
    array = np.squeeze(np.asarray(array))
    if unit and suffix not in NIFTI_SUFFIXES and array.dtype in (np.uint8, np.uint16):
        array = array / np.iinfo(array.dtype).max
    if array.ndim not in (2, 3) or min(array.shape) < 1:
        raise ImageError(
            f"{path}: expected a 2-D image or a 3-D volume, got shape {array.shape}; "
            f"save one image (or one volume) per file"
        )
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ImageError(
            f"{path}: complex pixels ({array.dtype}); save their magnitude, np.abs(a)"
        )
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise ImageError(
            f"{path}: unsupported pixel type {array.dtype}; save uint8, uint16 or float pixels"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # out of float32's range: inf, below
        array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        raise ImageError(
            f"{path}: {int(bad.sum())} pixel(s) are NaN or inf (or beyond float32); replace "
            f"them, e.g. with np.nan_to_num"
        )
    return array


def _load_nifti(path: Path) -> np.ndarray:
    try:
        import nibabel
    except ImportError as err:
        raise ImageError(
            f"{path}: reading NIfTI needs nibabel: pip install 'air-reg[nifti]' (or nibabel)"
        ) from err
    try:
        image = nibabel.load(path)  # the header only: the voxels are read below
        shape = tuple(int(n) for n in image.shape)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise ImageError(
            f"{path} could not be read as NIfTI ({_reason(err)}); re-export it"
        ) from err
    _check_size(path, shape)  # a corrupt header may claim terabytes
    try:
        return np.asanyarray(image.dataobj)
    except Exception as err:
        raise ImageError(
            f"{path} could not be read as NIfTI: the header describes {shape} voxels but the "
            f"data do not match ({_reason(err)}); re-export it"
        ) from err


def slices(volume: np.ndarray, axis: int, first: int | None, last: int | None) -> list:
    """2-D images of ``volume`` along ``axis``, indices ``first`` .. ``last - 1``."""
    if not -3 <= axis < 3:
        raise ImageError(f"data.slice_axis must be 0, 1 or 2, got {axis}")
    moved = np.moveaxis(volume, axis, 0)
    return [(i, moved[i]) for i in range(len(moved))[first:last]]


def normalise(
    image: np.ndarray, mode: str, percentiles=(1.0, 99.0), where: str | Path = "an image"
) -> np.ndarray:
    """``image`` mapped to [0, 1]: ``minmax``, ``percentile`` (clip to the percentiles, then
    min-max) or ``none`` (the values must already lie in [0, 1]; ``where`` names the image in
    the error). A constant image gives 0."""
    if mode not in NORMALISATIONS:
        raise ValueError(f"data.normalize must be one of {NORMALISATIONS}, got {mode!r}")
    if mode == "none":
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 1:
            raise ImageError(
                f"{where}: values lie in [{lo:.4g}, {hi:.4g}], outside [0, 1], and "
                f"normalize=none (register's default without a model, or the model's "
                f"recorded data.normalize) takes them as they are; rescale the image to [0, "
                f"1], e.g. (a - a.min()) / (a.max() - a.min()), or pass normalize=minmax "
                f"(training: data.normalize=minmax)"
            )
        return image.astype(np.float32)
    if mode == "percentile":
        p_lo, p_hi = np.percentile(image, list(percentiles))
        image = np.clip(image, p_lo, p_hi)
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)
