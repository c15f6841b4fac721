"""``data=folder``: a folder of your own 2-D images (or of volumes, sliced or whole), with labels.

Images: every PNG/JPEG/TIFF/``.npy``/NIfTI file below ``path`` (sub-folders included, hidden
files and the label folder excluded). With ``volumes: slices`` (the default) a 3-D volume
becomes its slices along ``slice_axis`` (``slice_range: [first, last)`` keeps some); with
``volumes: whole`` every file must be a 3-D volume and is one image (B, 1, D, H, W), its
array axes in stored order (NIfTI: (X, Y, Z) as (D, H, W)). Label maps (integer images or
volumes, optional): same relative name under ``path/<labels>/`` (any supported suffix), or
``<name><label_suffix>`` beside the image; they travel with the pairs as ``fixed_labels`` /
``moving_labels`` (B, 1, *size) and are warped with nearest-neighbour sampling for the metrics.

Reading, normalising (``normalize``: minmax, percentile or none, per image or volume) and
sizing go through ``air_reg.data.preprocess.Preprocessing``, the record ``register`` applies
too. Sizes: all images keep their own size when they share one; ``image_size: [H, W]`` (whole
volumes: ``[D, H, W]``) resizes every image (bilinear or trilinear; labels nearest); ``pad_to:
N`` zero-pads each image, centred, to the largest size per axis rounded up to a multiple of N
(so patch sizes dividing N fit), or to ``image_size`` when both are set (``train`` records
the padded size as ``image_size``).

Pairing: ``random``; ``group`` (within a group: the image's sub-folder, or a CSV ``groups``
with columns ``file,group``); ``atlas`` (``atlas`` names the one fixed image, every other image
is moving); ``csv`` (``pairs``: columns ``fixed,moving`` and optionally ``split`` =
train/val/test; without it the pairs are split with ``split_seed``). Images are split into
train/val/test with ``split_seed`` (``train_fraction``, ``val_fraction`` of the training part).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from air_reg.data.datamodule import PairDataModule, seeded_split
from air_reg.data.pairs import PairDataset, draw_pairs
from air_reg.data.preprocess import Preprocessing
from air_reg.data.readers import FOLDER_SUFFIXES, read_array, slices, stem_of, suffix_of
from air_reg.errors import ConfigError
from air_reg.images import ImageError
from air_reg.models.contract import spatial_size

log = logging.getLogger(__name__)

PAIRINGS = ("random", "group", "atlas", "csv")
VOLUMES = ("slices", "whole")  # a 3-D file as its 2-D slices, or as one volume


class FolderDataModule(PairDataModule):
    """Pairs over the images of one folder (module docstring); batches as PairDataModule's."""

    def __init__(
        self,
        *,
        path: str,
        labels: str | None = "labels",
        label_suffix: str | None = None,
        volumes: str = "slices",
        slice_axis: int = 2,
        slice_range: list[int] | None = None,
        normalize: str = "minmax",
        percentiles: tuple[float, float] = (1.0, 99.0),
        image_size: int | list[int] | None = None,
        pad_to: int | None = None,
        pairing: str = "random",
        groups: str | None = None,
        atlas: str | None = None,
        pairs: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        train_fraction: float = 0.8,
        val_fraction: float = 0.1,
        pairs_per_epoch: int | None = None,
        num_val_pairs: int | None = None,
        num_test_pairs: int | None = None,
        split_seed: int = 0,
        pair_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        # LightningDataModule's __init__ (PairDataModule's checks are for idx datasets); the
        # super() call also lets save_hyperparameters find this constructor's arguments.
        super(PairDataModule, self).__init__()
        if pairing not in PAIRINGS:
            raise ConfigError(f"data.pairing must be one of {PAIRINGS} for data=folder")
        if pairing == "atlas" and not atlas:
            raise ConfigError("data.pairing=atlas needs data.atlas=<file name of the template>")
        if pairing == "csv" and not pairs:
            raise ConfigError("data.pairing=csv needs data.pairs=<CSV with fixed,moving columns>")
        if not 0 < train_fraction < 1 or not 0 <= val_fraction < 1:
            raise ConfigError("data.train_fraction must be in (0, 1), data.val_fraction in [0, 1)")
        # Plain Python values (not OmegaConf lists): they are saved in checkpoints, which are
        # read back with weights_only=True.
        if volumes not in VOLUMES:
            raise ConfigError(f"data.volumes must be one of {VOLUMES}, got {volumes!r}")
        whole = volumes == "whole"
        if image_size is not None:
            image_size = [image_size] * 3 if whole and isinstance(image_size, int) else image_size
            image_size = list(spatial_size(image_size))
            if len(image_size) != (3 if whole else 2):
                raise ConfigError(
                    f"data.image_size {image_size} needs {'[D,H,W]' if whole else '[H,W]'} with "
                    f"data.volumes={volumes} (whole volumes take [D,H,W], images and slices [H,W])"
                )
        if whole and slice_range is not None:
            raise ConfigError("data.slice_range cuts slices; leave it null for data.volumes=whole")
        percentiles = [float(p) for p in percentiles]
        if slice_range is not None:
            slice_range = [int(i) for i in slice_range]
            if len(slice_range) != 2:
                raise ConfigError(f"data.slice_range is [first, last), got {slice_range}")
        if pad_to is not None and pad_to < 1:
            raise ConfigError(f"data.pad_to must be a positive integer, got {pad_to}")
        self.save_hyperparameters(logger=False)
        self.preprocessing = Preprocessing.folder(
            normalize=normalize, percentiles=percentiles, image_size=image_size, pad_to=pad_to
        )
        self.hparams.dataset = f"folder {path}"
        self.root = Path(path).expanduser()
        self.dataset, self.partner = None, None

    # -- reading the folder ------------------------------------------------------------
    def image_files(self) -> list[Path]:
        """The image files below ``path`` (label maps, hidden files and CSVs excluded)."""
        if not self.root.is_dir():
            raise ImageError(f"data.path {self.root} is not a folder; point it at your images")
        label_dir = self.root / self.hparams.labels if self.hparams.labels else None
        suffix = self.hparams.label_suffix
        found = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            if suffix_of(p) not in FOLDER_SUFFIXES:
                continue
            if label_dir is not None and label_dir in p.parents:
                continue
            if suffix and stem_of(p).endswith(suffix):
                continue
            found.append(p)
        if not found:
            raise ImageError(
                f"no images ({' '.join(FOLDER_SUFFIXES)}) in {self.root} or its sub-folders; "
                f"put your images there or set data.path"
            )
        return found

    def label_file(self, image: Path) -> Path | None:
        """The label map of ``image``, or None when it has none."""
        stem, rel = stem_of(image), image.parent.relative_to(self.root)
        if self.hparams.label_suffix:
            folder, stem = image.parent, stem + self.hparams.label_suffix
        elif self.hparams.labels:
            folder = self.root / self.hparams.labels / rel
        else:
            return None
        hits = [
            folder / f"{stem}{s}" for s in FOLDER_SUFFIXES if (folder / f"{stem}{s}").is_file()
        ]
        return hits[0] if hits else None

    @functools.cached_property
    def _data(self) -> dict:
        """Everything read once: images, label maps, names, groups, files."""
        hp, names, images, segs, groups, files = self.hparams, [], [], [], [], []
        first, last = list(hp.slice_range) if hp.slice_range else (None, None)
        image_files = self.image_files()
        label_files = {f: self.label_file(f) for f in image_files}
        with_labels = [f for f, lab in label_files.items() if lab is not None]
        if with_labels and len(with_labels) < len(image_files):
            missing = [str(f.relative_to(self.root)) for f in image_files if not label_files[f]]
            raise ImageError(
                f"{len(missing)} image(s) have no label map ({', '.join(missing[:5])}...), "
                f"the other {len(with_labels)} do; give every image one, or none"
            )
        prep = self.preprocessing
        for f in image_files:
            array, seg = prep.read(f), None
            if hp.volumes == "whole" and array.ndim != 3:
                raise ImageError(
                    f"{f} is a 2-D image {array.shape} but data.volumes=whole reads 3-D volumes; "
                    f"keep only volumes in {self.root}, or read slices (data.volumes=slices)"
                )
            lab = label_files[f]
            if lab is not None:
                seg = read_array(lab)
                if seg.shape != array.shape:
                    raise ImageError(
                        f"label map {lab} is {seg.shape} but its image {f} is {array.shape}; "
                        f"they must have the same shape"
                    )
                if (seg < 0).any() or (seg != np.round(seg)).any():
                    raise ImageError(f"label map {lab} holds non-integer or negative values")
                files.append(lab)
            files.append(f)
            rel = f.relative_to(self.root)
            group = str(rel.parent) if rel.parent != Path(".") else ""
            cut = (
                (lambda a: [(None, a)])
                if array.ndim == 2 or hp.volumes == "whole"
                else (lambda a: slices(a, hp.slice_axis, first, last))
            )
            parts = cut(array)  # [(slice index or None, (H, W) image or (D, H, W) volume)]
            seg_parts = cut(seg) if seg is not None else [(None, None)] * len(parts)
            for (i, image), (_, s) in zip(parts, seg_parts, strict=True):
                names.append(str(rel) if i is None else f"{rel}#{i}")
                images.append(prep.normalise(image, self.root / names[-1]))
                segs.append(s)
                groups.append(group)
        images, segs = self._common_size(names, images, segs if with_labels else None)
        return {"names": names, "images": images, "segs": segs, "groups": groups, "files": files}

    def _common_size(self, names, images, segs):
        """(N, 1, *size) tensors at one size: resized, padded, or refused (module docstring)."""
        prep, shapes = self.preprocessing, [a.shape for a in images]
        sizes = Counter(shapes)
        size = prep.common_size(sizes)
        if size is None and len(sizes) > 1:
            listing = ", ".join(
                f"{'x'.join(map(str, shape))} ({n} image(s), e.g. {names[shapes.index(shape)]})"
                for shape, n in sizes.most_common(4)
            )
            sides = "[D,H,W]" if self.hparams.volumes == "whole" else "[H,W]"
            raise ImageError(
                f"images of different sizes in {self.root}: {listing}; set data.image_size="
                f"{sides} to resize them all, or data.pad_to=N to pad them to a common size"
            )
        for name, shape in zip(names, shapes, strict=True) if size is not None else ():
            prep.check_fits(shape, size, self.root / name)
        out = [torch.from_numpy(a)[None, None] for a in images]
        seg_out = [torch.from_numpy(s)[None, None] for s in segs] if segs is not None else None
        if size is not None:
            out = [prep.to_model(x, size) for x in out]
            if seg_out is not None:
                seg_out = [prep.to_model(s, size, labels=True) for s in seg_out]
        return torch.cat(out), torch.cat(seg_out) if seg_out is not None else None

    @property
    def image_size(self) -> tuple[int, ...]:
        return tuple(self._data["images"].shape[2:])  # (H, W), or (D, H, W) for whole volumes

    def file_checksums(self) -> dict[str, str]:
        return {
            str(f.relative_to(self.root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in self._data["files"]
        }

    def load(self):
        d = self._data
        groups = {g: i for i, g in enumerate(dict.fromkeys(self._groups()))}
        labels = torch.tensor([groups[g] for g in self._groups()])
        return d["images"], labels, None, len(d["images"])

    def _groups(self) -> list[str]:
        if not self.hparams.groups:
            return self._data["groups"]
        table = _read_csv(Path(self.hparams.groups).expanduser(), ("file", "group"))
        by_file = {row["file"]: row["group"] for row in table}
        names = self._data["names"]
        missing = [n for n in names if n.split("#")[0] not in by_file]
        if missing:
            raise ImageError(
                f"data.groups {self.hparams.groups} has no group for {len(missing)} image(s), "
                f"e.g. {missing[:3]}; give every file (relative to data.path) a row"
            )
        return [by_file[n.split("#")[0]] for n in names]

    # -- splits and pairs ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        hp = self.hparams
        images, labels, _, n = self.load()
        self.dataset = PairDataset(images, labels, segs=self._data["segs"])
        names = self._data["names"]
        index = {name: i for i, name in enumerate(names)}
        index |= {name.split("#")[0]: i for i, name in enumerate(names) if "#" not in name}
        if hp.pairing == "csv":
            self._setup_csv_pairs(index)
            return
        pool = torch.arange(n)
        if hp.pairing == "atlas":
            if hp.atlas not in index:
                raise ImageError(
                    f"data.atlas {hp.atlas!r} is not one of the images in {self.root} (names are "
                    f"relative paths, slices 'file#index'), e.g. {names[:3]}"
                )
            self.atlas = index[hp.atlas]
            pool = pool[pool != self.atlas]
        self.val_pool, self.train_pool, self.test_pool = seeded_split(
            pool, hp.train_fraction, hp.val_fraction, hp.split_seed, min_train=1
        )
        g = torch.Generator().manual_seed(hp.pair_seed + 1)
        self.val_pairs = self._draw(self.val_pool, hp.num_val_pairs, g)
        g = torch.Generator().manual_seed(hp.pair_seed + 2)
        self.test_pairs = self._draw(self.test_pool, hp.num_test_pairs, g)
        log.info(
            "%s: %d images (%d train / %d val / %d test), %s pairing",
            self.root,
            n,
            len(self.train_pool),
            len(self.val_pool),
            len(self.test_pool),
            hp.pairing,
        )

    def _draw(self, pool: torch.Tensor, n: int | None, g: torch.Generator) -> torch.Tensor:
        if len(pool) == 0:
            return torch.empty(0, 2, dtype=torch.long)
        n = n or len(pool)
        if self.hparams.pairing == "atlas":
            passes = -(-n // len(pool))
            order = torch.cat([torch.randperm(len(pool), generator=g) for _ in range(passes)])
            moving = pool[order[:n]]
            return torch.stack([torch.full_like(moving, self.atlas), moving], dim=1)
        if len(pool) < 2:
            log.warning(
                "a split of %d image(s) has no pairs: use more images or fractions", len(pool)
            )
            return torch.empty(0, 2, dtype=torch.long)
        kind = "same_class" if self.hparams.pairing == "group" else "random"
        pairs = draw_pairs(pool, self.dataset.labels, n, kind, g)
        same = pairs[:, 0] == pairs[:, 1]  # a group of one image has no partner
        if same.any():
            log.warning("%d pair(s) without a partner in their group dropped", int(same.sum()))
        return pairs[~same]

    def _setup_csv_pairs(self, index: dict[str, int]) -> None:
        hp = self.hparams
        rows = _read_csv(Path(hp.pairs).expanduser(), ("fixed", "moving"))
        unknown = [r[k] for r in rows for k in ("fixed", "moving") if r[k] not in index]
        if unknown:
            raise ImageError(
                f"data.pairs {hp.pairs} names {len(unknown)} file(s) not among the images of "
                f"{self.root}, e.g. {unknown[:3]}; use paths relative to data.path"
            )
        pairs = torch.tensor([[index[r["fixed"]], index[r["moving"]]] for r in rows])
        if rows and "split" in rows[0]:
            splits = [r["split"] for r in rows]
            bad = sorted(set(splits) - {"train", "val", "test"})
            if bad:
                raise ImageError(f"data.pairs split values must be train/val/test, got {bad}")
            parts = {
                s: pairs[[i for i, x in enumerate(splits) if x == s]]
                for s in ("train", "val", "test")
            }
        else:
            cut = seeded_split(pairs, hp.train_fraction, hp.val_fraction, hp.split_seed, 1)
            parts = dict(zip(("val", "train", "test"), cut, strict=True))
        self.csv_train, self.val_pairs, self.test_pairs = (
            parts["train"],
            parts["val"],
            parts["test"],
        )
        self.train_pool = self.val_pool = self.test_pool = torch.empty(0, dtype=torch.long)

    def train_pairs(self, epoch: int) -> torch.Tensor:
        if self.hparams.pairing != "csv":
            return super().train_pairs(epoch)
        g = torch.Generator().manual_seed(self.hparams.pair_seed * 1_000_003 + epoch)
        return self.csv_train[torch.randperm(len(self.csv_train), generator=g)]


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ImageError(f"CSV {path} does not exist; check data.groups / data.pairs")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or any(c not in rows[0] for c in columns):
        raise ImageError(f"CSV {path} needs a header with the columns {', '.join(columns)}")
    return [{k: (v or "").strip() for k, v in r.items()} for r in rows]
