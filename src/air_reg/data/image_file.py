"""An image file with what the outputs need beyond its pixels: geometry, header, colour.

``read_image_file`` gives the values registration reads (``readers.read_array``: the one
reading of an image; a colour file's luminance, or one ``channel`` of it), the file's
``Geometry`` (a NIfTI's spacing, origin and direction; pixel files: ``Geometry.pixels``), the
NIfTI header, and a colour file's channels. ``write_like`` writes a result in the format of
the file it was computed for: a NIfTI with that file's header (geometry, units, codes; the
data type of ``dtype_from``), ``.npy`` values as they are, other formats as an 8-bit PNG
(grey, or RGB for a colour image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from air_reg.data.readers import NIFTI_SUFFIXES, as_pixels, check_file, read_array, suffix_of
from air_reg.errors import ConfigError
from air_reg.geometry import Geometry
from air_reg.images import PIL_SUFFIXES, load_pil_pixels, save_npy
from air_reg.utils import write_with


@dataclass(frozen=True)
class ImageFile:
    """One image file: ``values`` (H, W) as registration reads them (8-/16-bit in [0, 1],
    floats and NIfTI as stored), ``colour`` (H, W, 3) in [0, 1] for a colour file (else None),
    ``geometry``, and for a NIfTI its ``header`` and on-disk ``dtype``."""

    path: Path
    values: np.ndarray
    geometry: Geometry
    colour: np.ndarray | None = None
    header: object | None = None
    dtype: np.dtype | None = None

    @property
    def suffix(self) -> str:
        return suffix_of(self.path)

    @property
    def is_nifti(self) -> bool:
        return self.suffix in NIFTI_SUFFIXES


CHANNELS = {"red": 0, "green": 1, "blue": 2}


def read_image_file(path: str | Path, channel: str | int | None = None) -> ImageFile:
    """``path`` read once for registration and outputs (module docstring). ``channel``: a
    colour image is registered on this channel (red|green|blue or 0-2) instead of its
    luminance; its three channels are warped either way."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    if suffix not in PIL_SUFFIXES:
        return ImageFile(path, read_array(path, unit=True), Geometry.pixels(2))
    check_file(path)  # decoded once: the grey values and, for a colour file, its colours
    grey, rgb = load_pil_pixels(path, grey=channel is None)
    colour = None if rgb is None else rgb.astype(np.float32) / 255.0
    if colour is not None and channel is not None:
        index = CHANNELS.get(channel, channel) if isinstance(channel, str) else channel
        if index not in (0, 1, 2):
            raise ConfigError(f"channel must be red, green, blue or 0-2, got {channel!r}")
        values = colour[..., index].copy()
    else:
        values = as_pixels(grey, path, unit=True)  # a colour file: its luminance (logged)
    return ImageFile(path, values, Geometry.pixels(2), colour)


def _read_nifti(path: Path) -> ImageFile:
    import nibabel  # read_array has checked that it is installed

    values = read_array(path, unit=True)
    image = nibabel.load(path)
    kept = tuple(i for i, n in enumerate(image.shape[:3]) if n > 1)  # read_array squeezes
    axes = kept if len(kept) == values.ndim else None
    geometry = Geometry.from_affine(image.affine, values.ndim, axes)
    return ImageFile(path, values, geometry, None, image.header.copy(), image.get_data_dtype())


def write_like(path: str | Path, values: np.ndarray, like: ImageFile, dtype_from=None) -> Path:
    """Write ``values`` ((H, W), or (H, W, 3) colour, in ``like``'s units) as ``like``'s
    format: NIfTI with its header (and ``dtype_from``'s data type), .npy, or an 8-bit PNG of
    [0, 1] values."""
    path = Path(path)
    if like.is_nifti:
        import nibabel

        from air_reg.fields import write_nifti

        header = like.header.copy()
        dtype = np.dtype((dtype_from or like).dtype or np.float32)
        if np.issubdtype(dtype, np.integer):  # round into the type, as ITK's writers do
            info = np.iinfo(dtype)
            values = np.clip(np.rint(values), info.min, info.max)
        header.set_data_dtype(dtype)
        shape = header.get_data_shape()
        image = nibabel.Nifti1Image(values.astype(dtype).reshape(shape), None, header)
        write_nifti(path, image)
        return path
    if like.suffix == ".npy":
        return save_npy(path, values.astype(np.float32))
    pixels = np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)
    write_with(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    return path


def output_suffix(like: ImageFile) -> str:
    """The suffix of a result written for ``like`` (``write_like``)."""
    return like.suffix if like.is_nifti or like.suffix == ".npy" else ".png"
