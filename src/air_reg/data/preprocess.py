"""How an image file becomes a network's input: one record (``Preprocessing``), one code path.

The folder data module (training, and ``eval``, which rebuilds it from the checkpoint's data
config) and ``register`` read, normalise and size every image through the functions here,
with the settings the checkpoint records in its data config (``build_config["data"]``):

- reading (one rule for every source, ``readers.read_array(unit=True)``): 8-bit pixels / 255,
  16-bit / 65535, bool as 0/1, floats (``.npy``, float TIFF, NIfTI) as stored; the idx
  datasets (MNIST, Fashion-MNIST) are 8-bit files, so / 255;
- normalising, per image and before any sizing: ``minmax``, ``percentile`` (clip to
  ``percentiles``, then min-max) or ``none`` (the values must already lie in [0, 1]);
- sizing to the network's (H, W) (or (D, H, W) for volumes, ``data.volumes=whole``):
  ``resize`` (bilinear, trilinear for volumes, antialiased when shrinking; a flow comes back
  resized, its displacements scaled per axis), ``pad`` (zeros, centred, the odd pixel
  bottom/right; a flow comes back cropped to the image) or ``none`` (own size).

Records written before this module existed hold the same keys (``normalize``, ``percentiles``,
``image_size``, ``pad_to``; none of them for the idx and synthetic data) and read the same way:
``pad_to`` set means padding, to ``image_size`` when it is set (``train`` records the padded
size there), else to the largest image rounded up to a multiple of ``pad_to``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from air_reg.data.readers import NIFTI_SUFFIXES, NORMALISATIONS, normalise, read_array, suffix_of
from air_reg.errors import ConfigError
from air_reg.images import ImageError, resize
from air_reg.models.components.spatial_transformer import resize_flow
from air_reg.models.contract import as_size, spatial_size

SIZINGS = ("resize", "pad", "none")


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation and sizing of one image, as a model was trained with (module docstring).

    ``size``: the network's (H, W) or (D, H, W) for ``resize`` and ``pad`` (for ``pad``
    without it: the largest image rounded up to a multiple of ``pad_to``). The default,
    ``Preprocessing()``, takes [0, 1] images as they are: model-free registration.
    """

    normalize: str = "none"
    percentiles: tuple[float, float] = (1.0, 99.0)
    sizing: str = "none"
    size: tuple[int, ...] | None = None
    pad_to: int | None = None

    def __post_init__(self) -> None:
        if self.normalize not in NORMALISATIONS:
            raise ConfigError(
                f"data.normalize must be one of {NORMALISATIONS}, got {self.normalize!r}"
            )
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"data.percentiles must be [low, high] in [0, 100], got {[lo, hi]}")
        if self.sizing not in SIZINGS:
            raise ConfigError(f"sizing must be one of {SIZINGS}, got {self.sizing!r}")
        if self.sizing == "resize" and self.size is None:
            raise ConfigError("resizing needs a size: set data.image_size=[H,W]")
        if self.pad_to is not None and self.pad_to < 1:
            raise ConfigError(f"data.pad_to must be a positive integer, got {self.pad_to}")
        if self.sizing == "pad" and self.size is None and self.pad_to is None:
            raise ConfigError("padding needs data.pad_to=N or data.image_size=[H,W]")

    # -- from a record --------------------------------------------------------------------
    @classmethod
    def folder(
        cls,
        *,
        normalize: str = "minmax",
        percentiles: Iterable[float] = (1.0, 99.0),
        image_size=None,
        pad_to: int | None = None,
    ) -> Preprocessing:
        """``data=folder``'s settings: ``pad_to`` pads (to ``image_size`` when set, which
        ``train`` records), else ``image_size`` resizes, else each image keeps its size."""
        size = spatial_size(image_size) if image_size is not None else None
        sizing = "pad" if pad_to else "resize" if size is not None else "none"
        lo, hi = (float(p) for p in percentiles)
        return cls(normalize, (lo, hi), sizing, size, int(pad_to) if pad_to else None)

    @classmethod
    def of(cls, data: Mapping | None) -> Preprocessing:
        """The preprocessing a data config records: a checkpoint's ``build_config["data"]``
        or a composed ``cfg.data``; ``None`` (no record: model-free) takes images as they are.
        The idx datasets and the synthetic shapes are [0, 1] (8-bit / 255, or generated) and
        resized to ``image_size`` (28 when absent)."""
        if not data:
            return cls()
        target = str(data.get("_target_") or "")
        if target.endswith("FolderDataModule") or "normalize" in data or "pad_to" in data:
            return cls.folder(
                normalize=data.get("normalize") or "minmax",
                percentiles=data.get("percentiles") or (1.0, 99.0),
                image_size=data.get("image_size"),
                pad_to=data.get("pad_to"),
            )
        return cls(sizing="resize", size=as_size(data.get("image_size") or 28))

    @classmethod
    def of_model(cls, model) -> Preprocessing:
        """The preprocessing ``model`` (from ``load_model``) was trained with; the default for
        a model without a record (model-free registration)."""
        record = getattr(model, "build_config", None)
        return cls.of(record.get("data") if isinstance(record, Mapping) else None)

    # -- one image ------------------------------------------------------------------------
    def read(self, path: str | Path) -> np.ndarray:
        """The file's values (module docstring): (H, W), or (X, Y, Z) for a NIfTI volume."""
        return read_array(Path(path), unit=True)

    def normalise(self, image: np.ndarray, where: str | Path) -> np.ndarray:
        """``image`` (H, W) mapped to [0, 1] float32 by ``normalize``; ``where`` names it."""
        return normalise(image, self.normalize, self.percentiles, where)

    def load(self, path: str | Path) -> torch.Tensor:
        """One 2-D image file read and normalised: (1, 1, H, W) float32 in [0, 1] (register)."""
        array = self.read(path)
        self.check_2d(array, path)
        return torch.from_numpy(self.normalise(array, path))[None, None]

    @staticmethod
    def check_2d(array: np.ndarray, path: str | Path) -> None:
        """Refuse a volume where a 2-D image is needed (the fix in the message)."""
        if array.ndim != 2:
            how = (
                "nibabel.save(nibabel.Nifti1Image(volume[:, :, k], affine), 'slice.nii.gz')"
                if suffix_of(Path(path)) in NIFTI_SUFFIXES
                else "np.save('slice.npy', volume[k])"
            )
            raise ImageError(
                f"{path} is a 3-D volume of shape {array.shape}; register takes 2-D images "
                f"only: save the slice to register as its own file, e.g. {how}"
            )

    # -- sizes ----------------------------------------------------------------------------
    def common_size(self, sizes: Iterable[tuple[int, ...]]) -> tuple[int, ...] | None:
        """The one (H, W) or (D, H, W) images of ``sizes`` are brought to; None keeps their
        own size."""
        if self.sizing == "none":
            return None
        if self.size is not None:
            return self.size
        sizes, n = list(sizes), self.pad_to
        return tuple(-(-max(s[i] for s in sizes) // n) * n for i in range(len(sizes[0])))

    def check_fits(self, shape, size: tuple[int, ...], where: str | Path) -> None:
        """Padding never shrinks: refuse an image larger than ``size`` (one line, the fix)."""
        sides, size = tuple(shape[-len(size) :]), tuple(size)
        if self.sizing == "pad" and any(s > n for s, n in zip(sides, size, strict=True)):
            have, most = "x".join(map(str, sides)), "x".join(map(str, size))
            raise ImageError(
                f"{where} is {have}, larger than the {most} the network takes "
                f"(it was trained on images padded to that size with data.pad_to, never "
                f"shrunk); crop or downsample the image to at most {most}"
            )

    def to_model(
        self, images: torch.Tensor, size: tuple[int, ...], labels: bool = False
    ) -> torch.Tensor:
        """(N, C, *s) images at the network's ``size`` (N, C, *size): padded for ``pad``, else
        resized (a no-op at that size); ``labels`` resize nearest-neighbour."""
        size, own = tuple(size), tuple(images.shape[2:])
        if own == size:
            return images
        if self.sizing == "pad":
            self.check_fits(images.shape, size, f"an image of {images.shape[2:]}")
            starts = pad_offsets(own, size)
            pads = [(a, n - s - a) for a, n, s in zip(starts, size, own, strict=True)]
            return F.pad(images, [p for pair in reversed(pads) for p in pair])  # last axis first
        if labels:
            return F.interpolate(images, size=size, mode="nearest")
        return resize(images, size)

    def from_model(self, flow: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """A flow (N, D, *S) on the network's grid back on the image's (N, D, *size): cropped
        for ``pad`` (displacements in pixels are the same), resized and scaled otherwise."""
        size = tuple(size)
        if tuple(flow.shape[2:]) == size:
            return flow
        if self.sizing == "pad":
            starts = pad_offsets(size, tuple(flow.shape[2:]))
            return flow[(..., *(slice(a, a + n) for a, n in zip(starts, size, strict=True)))]
        return resize_flow(flow, size)


def pad_offsets(image: tuple[int, ...], padded: tuple[int, ...]) -> tuple[int, ...]:
    """(top, left) (or (front, top, left)) of an ``image`` padded, centred, to ``padded``."""
    return tuple((p - i) // 2 for i, p in zip(image, padded, strict=True))
