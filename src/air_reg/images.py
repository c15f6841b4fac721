"""Read and write single grayscale images: PNG/JPEG/TIFF (via PIL) and ``.npy`` arrays.

The loaders here (``_load_pil``, ``_load_npy``) are the ones every reader shares:
``data=folder``, ``eval`` and ``register`` read a file through ``air_reg.data.preprocess``
(``readers.read_array`` on top of these loaders, then the model's recorded normalisation).
``read_image`` is the strict reader of the Python API: one 2-D image already in [0, 1] (8-bit
/ 255, 16-bit / 65535), as a (1, 1, H, W) float32 tensor. Every failure is one clear
``ImageError`` line naming the problem and the fix. Writes are atomic (temp name, rename).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from air_reg.errors import UserError
from air_reg.models.components.spatial_transformer import resample
from air_reg.utils import write_with

log = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IMAGE_SUFFIXES = (*PIL_SUFFIXES, ".npy")
COLOUR_MODES = ("RGB", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
# Values (pixels or voxels) one file may hold (16384^2 images, 645^3 volumes): a corrupt
# header that claims more is refused before anything is allocated. PIL itself refuses
# images above 2 * Image.MAX_IMAGE_PIXELS (179 M pixels) as decompression bombs.
MAX_PIXELS = 2**28


class ImageError(UserError, ValueError):
    """An image file that is missing, unreadable, or not a 2-D grayscale image in [0, 1]."""


def read_image(path: str | Path) -> torch.Tensor:
    """One grayscale image as a (1, 1, H, W) float32 tensor in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ImageError(f"image {path} {what}; check the path (relative to {Path.cwd()})")
    if path.stat().st_size == 0:
        raise ImageError(f"image {path} is an empty file (0 bytes); re-export or re-copy it")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _load_npy(path)
    elif suffix in PIL_SUFFIXES:
        array = _load_pil(path)
    else:
        raise ImageError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {IMAGE_SUFFIXES}"
        )
    return torch.from_numpy(_to_unit(array, path))[None, None]


def _load_npy(path: Path) -> np.ndarray:
    try:  # memory-mapped: a header claiming a huge shape costs nothing before the size check
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:  # numpy raises ValueError, EOFError, OSError, TokenError, ...
        raise ImageError(
            f"{path} could not be read as a .npy array (truncated, corrupt or not written "
            f"by np.save: {_reason(err)}); re-save it with np.save"
        ) from err
    if not isinstance(array, np.ndarray):  # np.load gives an NpzFile for .npz content
        array.close()
        raise ImageError(f"{path} is an .npz archive, not one array; save one with np.save")
    _check_size(path, array.shape)
    try:
        return np.array(array)  # read the mapped pixels now, into memory
    except Exception as err:
        raise ImageError(
            f"{path} could not be read as a .npy array ({_reason(err)}); re-save it with np.save"
        ) from err


def _load_pil(path: Path) -> np.ndarray:
    """A PIL-readable file's (H, W) grey pixels (``load_pil_pixels``)."""
    return load_pil_pixels(path, colour=False)[0]


def _is_colour(img: Image.Image) -> bool:
    return img.mode in COLOUR_MODES or len(img.getbands()) > 1  # also TIFF's RGBX, La, ...


def load_pil_pixels(
    path: Path, grey: bool = True, colour: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A PIL-readable file decoded once: its (H, W) grey pixels (``_pil_to_array``; None when
    ``grey`` is False and the file is in colour) and, with ``colour``, a colour file's (H, W,
    3) uint8 RGB pixels (alpha dropped; else None)."""
    try:
        with Image.open(path) as img:
            _check_size(path, img.size)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:  # never read the first frame of a stack silently
                raise ImageError(
                    f"{path} holds {frames} frames (a multi-page TIFF or an animation); save "
                    f"the one to register as its own file, e.g. in Python: im = "
                    f"PIL.Image.open(path); im.seek(k); im.save('frame_k.png')"
                )
            if img.format == "TIFF":  # a corrupt header may claim far more than its strips
                covered = sum((x1 - x0) * (y1 - y0) for _, (x0, y0, x1, y1), *_ in img.tile)
                if covered < img.width * img.height:
                    raise ImageError(
                        f"{path} is truncated or corrupt: its data cover {covered} of its "
                        f"{img.width} x {img.height} pixels; re-export or re-copy the file"
                    )
            img.load()  # decode now: truncated files fail here, not later
            rgb = np.asarray(img.convert("RGB")) if colour and _is_colour(img) else None
            return (_pil_to_array(img, path) if grey or rgb is None else None), rgb
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(
            f"{path} is too large to read ({_reason(err)}); crop or downsample it, or check "
            f"that it is not corrupt"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageError(
            f"{path} is not an image PIL can read (wrong extension or not an image at all); "
            f"export it as PNG, JPEG or TIFF, or save the pixels with np.save"
        ) from err
    except Exception as err:  # PIL's plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageError(
            f"{path} is truncated or corrupt ({_reason(err)}); re-export or re-copy the file"
        ) from err


def _reason(err: BaseException) -> str:
    """``err`` as one short line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _check_size(path: Path, shape) -> None:
    """Refuse a file whose header claims more than ``MAX_PIXELS`` values, before reading."""
    count = math.prod(int(n) for n in shape)
    if count > MAX_PIXELS:
        raise ImageError(
            f"{path} is too large: its header claims {' x '.join(map(str, shape))} = {count} "
            f"values, more than air-reg reads ({MAX_PIXELS}); crop or downsample it, or check "
            f"that it is not corrupt"
        )


def _pil_to_array(img: Image.Image, path: Path) -> np.ndarray:
    """A 2-D numpy array of the image's gray values, converting colour and 16-bit modes."""
    if _is_colour(img):
        log.warning(
            "%s: converted %s to grayscale (luminance%s)",
            path,
            img.mode,
            ", alpha dropped" if "A" in img.mode else "",
        )
        img = img.convert("L")
    if img.mode.startswith("I;16"):
        log.info("%s: 16-bit image, scaled by 1/65535 to [0, 1]", path)
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":  # 32-bit ints: PIL's mode for some 16-bit PNG/TIFF files
        array = np.asarray(img)
        if array.min() < 0 or array.max() > 65535:
            raise ImageError(
                f"{path}: 32-bit integer pixels outside 0..65535; save it as 8- or 16-bit"
            )
        log.info("%s: 16-bit image, scaled by 1/65535 to [0, 1]", path)
        return array.astype(np.uint16)
    return np.asarray(img)  # "L" uint8, "1" bool, "F" float32


def _to_unit(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) float32 in [0, 1] from uint8, uint16, bool or float pixels."""
    if array.ndim != 2:
        raise ImageError(
            f"{path}: expected a 2-D (H, W) grayscale image, got shape {array.shape} "
            f"({array.ndim}-D); save one image per file, e.g. np.save(path, array[0])"
        )
    if array.size == 0:
        raise ImageError(f"{path}: the image has no pixels (shape {array.shape}); re-export it")
    if not array.dtype.isnative:  # big-endian .npy or TIFF: the same values, native order
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise ImageError(
            f"{path}: unsupported pixel type {array.dtype}; save uint8 (0-255), "
            f"uint16 (0-65535) or float values in [0, 1]"
        )
    bad = ~np.isfinite(array)
    if bad.any():
        kind = "NaN" if np.isnan(array).any() else "inf"
        raise ImageError(
            f"{path}: {int(bad.sum())} pixel(s) are {kind}; replace them before registering, "
            f"e.g. np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0)"
        )
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi > 1:
        raise ImageError(
            f"{path}: float pixels must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; rescale "
            f"them, e.g. (a - a.min()) / (a.max() - a.min())"
        )
    return array.astype(np.float32)


def _as_2d(image) -> np.ndarray:
    """(H, W) numpy array from a (H, W), (1, H, W) or (1, 1, H, W) tensor or array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise ValueError(f"expected one 2-D image, got shape {image.shape}")
    return image


def write_image(path: str | Path, image) -> Path:
    """Write a [0, 1] float image ((H, W) or (1, 1, H, W)) as an 8-bit grayscale PNG."""
    pixels = np.rint(np.clip(_as_2d(image), 0, 1) * 255).astype(np.uint8)
    write_with(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    return Path(path)


def save_npy(path: str | Path, array) -> Path:
    """``np.save`` ``array`` (tensor or array) to ``path`` atomically."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file handle: np.save adds no ".npy" suffix
            np.save(fh, np.asarray(array), allow_pickle=False)

    write_with(path, _save)
    return Path(path)


def resize(images: torch.Tensor, size: int | tuple[int, ...]) -> torch.Tensor:
    """(N, C, *s) float images to (N, C, *size), 2-D or 3-D: bilinear (trilinear),
    antialiased when shrinking; an int is a square 2-D size."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[2:]) == size:
        return images
    shrink = any(n < o for n, o in zip(size, images.shape[2:], strict=True))
    return resample(images, size, antialias=shrink).clamp(0, 1)
