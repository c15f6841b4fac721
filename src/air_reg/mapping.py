"""A saved field applied to what other tools hold: another image or a label map (points and
TRE: ``air_reg.points``).

A flow is (1, D, *fixed size) in pixels of the fixed grid, ``warped(p) = moving(p + flow(p))``;
a moving file on another grid is sampled at ``moving_index(fixed, moving, p + flow(p))``
(``air_reg.geometry``). Images are warped bilinearly (every channel), label maps by nearest
neighbour (integers stay integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from air_reg.data.image_file import ImageFile, read_image_file, write_like
from air_reg.data.readers import NIFTI_SUFFIXES, read_array, suffix_of
from air_reg.errors import DataError, UserError
from air_reg.fields import nifti_image
from air_reg.geometry import Geometry, as_flow, warp_through
from air_reg.images import COLOUR_MODES, _check_size, _load_npy, _load_pil, save_npy
from air_reg.models.components.spatial_transformer import warp
from air_reg.utils import write_with

FLOAT32_INTS = 2**24  # labels up to this size are exact in float32


# -- images and label maps -----------------------------------------------------------------
def _warp(
    values: np.ndarray,
    flow: torch.Tensor,
    fixed_geom: Geometry,
    moving_geom: Geometry,
    mode: str,
    dtype: torch.dtype,
    channels: bool,
) -> np.ndarray:
    flow = as_flow(flow).to(dtype)
    d = flow.shape[1]
    if values.ndim != d + channels:
        raise DataError(
            f"a {d}-D field warps {d}-D images{' (+ channels)' * channels}, got "
            f"an array of shape {values.shape}; give an image of the fixed "
            f"image's dimension"
        )
    x = torch.from_numpy(np.array(values, dtype=np.float64)).to(dtype)
    x = x.movedim(-1, 0)[None] if channels else x[None, None]  # (1, C, *moving size)
    if d == 2 and x.shape[2:] == flow.shape[2:] and fixed_geom.same_grid(moving_geom):
        out = warp(x, flow, mode=mode)  # the very op air_reg.warp runs
    else:
        out = warp_through(x, flow, fixed_geom, moving_geom, mode=mode)
    return (out[0].movedim(0, -1) if channels else out[0, 0]).numpy()  # (*fixed size[, C])


def warp_image(
    values: np.ndarray, flow: torch.Tensor, fixed_geom: Geometry, moving_geom: Geometry
) -> np.ndarray:
    """``values`` (*moving size) or (*moving size, C) warped bilinearly onto the fixed grid:
    (*fixed size[, C]) float32."""
    channels = values.ndim == as_flow(flow).shape[1] + 1
    return _warp(values, flow, fixed_geom, moving_geom, "bilinear", torch.float32, channels)


def warp_labels(
    labels: np.ndarray,
    flow: torch.Tensor,
    fixed_geom: Geometry,
    moving_geom: Geometry,
    *,
    name: str = "labels",
) -> np.ndarray:
    """A label map (*moving size) warped by nearest neighbour onto the fixed grid, in its own
    dtype; non-integer values are refused (``name`` names the file in the error)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{name} holds {labels.dtype} values; a label map holds integers")
    if labels.dtype.kind == "f":
        bad = labels[~np.isfinite(labels) | (labels != np.rint(labels))]
        if bad.size:
            raise DataError(
                f"{name} holds non-integer values (e.g. {bad.flat[0]:g}): a label map "
                f"must hold integers; pass it as image= to warp it as an image"
            )
    big = labels.size and np.abs(labels.astype(np.float64)).max() >= FLOAT32_INTS
    dtype = torch.float64 if big else torch.float32
    out = _warp(labels, flow, fixed_geom, moving_geom, "nearest", dtype, channels=False)
    return np.rint(out).astype(labels.dtype)


@dataclass(frozen=True)
class LabelFile:
    """A label map as stored: ``values`` in the file's integer dtype (NIfTI: float32 holding
    the stored values; ``file.dtype`` is the on-disk type), a P-mode PNG's ``palette``."""

    file: ImageFile
    values: np.ndarray
    palette: list | None = None


def read_labels(path: str | Path) -> LabelFile:
    """A label map (grey or palette PNG/TIFF, .npy, NIfTI) with its values as stored (no
    scaling to [0, 1]); a colour image is refused."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        file = read_image_file(path)
        return LabelFile(file, file.values)
    if not path.is_file() or path.stat().st_size == 0:
        read_array(path)  # raises its one-line error
    palette = None
    if suffix == ".npy":
        values = np.squeeze(_load_npy(path))
    else:
        values, palette = _read_pil_labels(path)
    values = values.astype(values.dtype.newbyteorder("="))
    return LabelFile(
        ImageFile(path, values.astype(np.float32), Geometry.pixels(values.ndim)), values, palette
    )


def _read_pil_labels(path: Path) -> tuple[np.ndarray, list | None]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode, bands = img.mode, len(img.getbands())
            if mode == "P":  # a palette PNG: the indices are the labels
                _check_size(path, img.size)
                return np.asarray(img), img.getpalette()
    except UserError:
        raise
    except Exception:  # not readable: _load_pil names the problem
        return _load_pil(path), None
    if mode in COLOUR_MODES or bands > 1:
        raise DataError(
            f"{path} is a colour image ({mode}); a label map holds one integer per "
            f"pixel: save it as a grey or palette PNG, .npy or NIfTI"
        )
    return _load_pil(path), None


def nifti_grid(fixed: ImageFile) -> ImageFile:
    """``fixed`` as ``write_like``'s template for a NIfTI on its grid: itself when a NIfTI,
    else a header carrying its geometry."""
    if fixed.is_nifti:
        return fixed
    image = nifti_image(np.zeros(fixed.values.shape, np.float32), fixed.geometry)
    return ImageFile(
        fixed.path.with_name("grid.nii"),
        fixed.values,
        fixed.geometry,
        None,
        image.header,
        np.dtype(np.float32),
    )


def write_labels(
    path: str | Path, values: np.ndarray, labels: LabelFile, fixed: ImageFile
) -> Path:
    """Warped labels (*fixed size) in ``labels``' format and dtype (a NIfTI on ``fixed``'s
    grid and header); ``path``'s suffix should be ``output_suffix(labels.file)``."""
    path = Path(path)
    if labels.file.is_nifti:
        return write_like(path, values, nifti_grid(fixed), dtype_from=labels.file)
    if labels.file.suffix == ".npy":
        return save_npy(path, values.astype(labels.values.dtype))
    from PIL import Image

    image = Image.fromarray(values.astype(labels.values.dtype))  # L, I;16 or 1
    if labels.palette is not None:
        image.putpalette(labels.palette)  # L -> P, the indices kept
    write_with(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
