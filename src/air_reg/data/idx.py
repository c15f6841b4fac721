"""Read MNIST-format idx ``.gz`` files (MNIST, Fashion-MNIST) without any network access."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from air_reg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Folder names under the data root, as torchvision lays them out (<root>/<name>/raw/).
DATASETS = {"mnist": "MNIST", "fashion": "FashionMNIST"}


DATA_ENV = "AIR_REG_DATA"


class IdxFileError(DataError, RuntimeError):
    """An idx file that is corrupt, truncated or does not fit its partner (a RuntimeError, as
    before this type existed)."""


def default_data_root() -> Path:
    """Where the idx files are when ``paths.data_dir`` is not set: ``$AIR_REG_DATA``, else
    ``<repo>/data`` when air-reg runs from a source checkout, else ``./data``."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    repo_data = Path(__file__).resolve().parents[3] / "data"
    return repo_data if (repo_data / "MNIST").is_dir() else Path("data").resolve()


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (gzip-compressed) into a uint8 array."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise IdxFileError(
            f"{path} is corrupt or truncated ({err}); replace it with the original "
            f"{path.name} (the repository ships a copy under data/)"
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise IdxFileError(f"{path} is not an idx file of unsigned bytes; replace it")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise IdxFileError(
            f"{path} holds {len(raw)} bytes where its header promises {expected}; "
            f"the file is truncated or corrupt: replace it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _try_download(name: str, root: Path) -> bool:
    """Best-effort torchvision download into ``root``; False when it cannot."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion": datasets.FashionMNIST}[name]
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as err:  # no network, server down, ...
        log.warning("torchvision could not download %s: %s", name, err)
        return False
    return True


def load_dataset(name: str, root: str | Path | None = None, download: bool = True):
    """All 70,000 images of ``name`` as uint8 (N, 28, 28) and labels (N,), train then test."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    root = Path(root) if root else default_data_root()
    raw = root / DATASETS[name] / "raw"
    missing = [f for f in FILES if not (raw / f).is_file()]
    if missing and download and _try_download(name, root):
        missing = [f for f in FILES if not (raw / f).is_file()]
    if missing:
        raise DataError(
            f"{name} data missing: put {', '.join(missing)} (the original idx .gz files) "
            f"in {raw}/, or set paths.data_dir=... (or the environment variable {DATA_ENV}) "
            f"to a folder holding {DATASETS[name]}/raw/"
        )
    arrays = [read_idx(raw / f) for f in FILES]
    images = np.concatenate([arrays[0], arrays[2]])
    labels = np.concatenate([arrays[1], arrays[3]])
    if images.ndim != 3 or len(images) != len(labels):
        raise IdxFileError(f"{raw}: images {images.shape} and labels {labels.shape} disagree")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def checksums(name: str, root: str | Path | None = None) -> dict[str, str]:
    """sha256 of each raw file, for the run record."""
    raw = (Path(root) if root else default_data_root()) / DATASETS[name] / "raw"
    return {f: hashlib.sha256((raw / f).read_bytes()).hexdigest() for f in FILES}
