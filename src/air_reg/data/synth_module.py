"""``data=synth``'s LightningDataModule: training batches drawn on the fly from (seed, epoch,
batch index), fixed validation and test sets (``air_reg.data.synth`` draws the pairs)."""

from __future__ import annotations

import logging
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from air_reg.data.pairs import _rank_and_world
from air_reg.data.preprocess import Preprocessing
from air_reg.data.synth import SynthSettings, make_synth_pairs
from air_reg.errors import ConfigError
from air_reg.models.contract import spatial_size

log = logging.getLogger(__name__)
TRAIN, VAL, TEST = 0, 1, 2  # seed streams: training never draws a validation or test pair

CHUNK = 16  # validation/test pairs drawn per seed: the sets do not depend on any batch size


def pair_generator(seed: int, stream: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one batch (or chunk): (seed, stream, epoch, index) hashed by NumPy's
    SeedSequence, so neighbouring indices give unrelated streams."""
    state = np.random.SeedSequence([seed, stream, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class SynthBatches(Dataset):
    """Training batch ``(epoch, i)``: ``batch_size`` pairs drawn from (seed, TRAIN, epoch, i)."""

    def __init__(self, *, batch_size: int, size: tuple[int, ...], seed: int, settings: dict):
        self.batch_size, self.size, self.seed, self.settings = batch_size, size, seed, settings

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        g = pair_generator(self.seed, TRAIN, *key)
        return make_synth_pairs(self.batch_size, self.size, g, **self.settings)


class Slices(Dataset):
    """Batch ``(_, i)`` of a stored set of pairs: rows i * batch_size .. (i + 1) * batch_size."""

    def __init__(self, pairs: dict[str, torch.Tensor], batch_size: int) -> None:
        self.pairs, self.batch_size = pairs, batch_size

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        rows = slice(key[1] * self.batch_size, (key[1] + 1) * self.batch_size)
        return {k: v[rows] for k, v in self.pairs.items()}


class RankBatches(Sampler):
    """Keys (epoch, i) of this rank's batches: i = rank, rank + W, ... below ``num_batches``
    (with ``even``, cut to a multiple of W, at least W: every rank runs as many steps)."""

    def __init__(self, num_batches: int, even: bool = False) -> None:
        self.num_batches, self.even, self.epoch = num_batches, even, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at each epoch's start
        self.epoch = epoch

    def _indices(self) -> range:
        rank, world = _rank_and_world()
        n = max(1, self.num_batches // world) * world if self.even else self.num_batches
        return range(rank, n, world)

    def __iter__(self):
        return ((self.epoch, i) for i in self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class SynthDataModule(L.LightningDataModule):
    """Synthetic pairs (module docstring), generated on the fly at ``image_size`` (H, W), or
    (D, H, W) for volumes (``data=synth3d``): batches (B, 1, *image_size), flows (B, D, ...).

    Training batch ``i`` of epoch ``e`` is drawn from (seed, e, i): any batch can be
    regenerated, a resumed run sees the same stream, and ranks draw different batches.
    Validation and test pairs are fixed sets from their own seed streams. ``settings``:
    ``SynthSettings`` fields. ``normalize`` is not applied here (the images are generated in
    [0, 1], min-max normalised): it is the record of how ``register`` reads a file for a model
    trained on these pairs (``preprocessing``: per-image min-max, resized to ``image_size``).
    """

    def __init__(
        self,
        *,
        image_size: int | list[int] = 128,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        pairs_per_epoch: int | None = 2000,
        num_val_pairs: int | None = 64,
        num_test_pairs: int | None = 64,
        seed: int = 0,
        num_workers: int = 0,
        normalize: str = "minmax",
        **settings,
    ) -> None:
        super().__init__()
        size = spatial_size(image_size)
        if min(size) < 8:
            raise ConfigError(f"data.image_size must be at least 8 per side, got {list(size)}")
        if seed < 0 or batch_size < 1 or eval_batch_size < 1:
            raise ConfigError("data.seed must be >= 0, data.batch_size and eval_batch_size >= 1")
        self.settings = SynthSettings.of(**settings)
        plain = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in asdict(self.settings).items()}  # fmt: skip
        hparams = {
            "image_size": list(size),
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "pairs_per_epoch": pairs_per_epoch or 2000,
            "num_val_pairs": num_val_pairs or 64,
            "num_test_pairs": num_test_pairs or 64,
            "seed": seed,
            "num_workers": num_workers,
            "normalize": normalize,
            "dataset": "synth",
        }
        # plain values (no tuples, no OmegaConf): checkpoints are read with weights_only=True
        self.save_hyperparameters(hparams | plain, logger=False)
        self.preprocessing = Preprocessing.folder(normalize=normalize, image_size=list(size))
        self.val_set: dict[str, torch.Tensor] | None = None
        self.test_set: dict[str, torch.Tensor] | None = None

    @property
    def image_size(self) -> tuple[int, ...]:
        return tuple(self.hparams.image_size)

    def file_checksums(self) -> dict[str, str]:
        return {}  # generated from the seed, no files

    def pairs(self, stream: int, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` pairs of a fixed set (``VAL`` or ``TEST``), drawn in chunks."""
        hp, settings = self.hparams, asdict(self.settings)
        seeds = [pair_generator(hp.seed, stream, 0, j) for j in range(-(-n // CHUNK))]
        chunks = [make_synth_pairs(CHUNK, self.image_size, g, **settings) for g in seeds]
        return {k: torch.cat([c[k] for c in chunks])[:n] for k in chunks[0]}

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self.pairs(VAL, hp.num_val_pairs)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self.pairs(TEST, hp.num_test_pairs)
        log.info(
            "synth: %s pairs on the fly (%d per epoch), %d val, %d test pairs",
            "x".join(map(str, self.image_size)), hp.pairs_per_epoch, hp.num_val_pairs,
            hp.num_test_pairs,
        )  # fmt: skip

    def _loader(self, dataset: Dataset, num_batches: int, even: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=None, sampler=RankBatches(num_batches, even),
                          num_workers=workers, persistent_workers=workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        batches = SynthBatches(batch_size=hp.batch_size, size=self.image_size, seed=hp.seed,
                               settings=asdict(self.settings))  # fmt: skip
        return self._loader(batches, max(1, hp.pairs_per_epoch // hp.batch_size), even=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "validate")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set, "test")

    def _eval_loader(self, pairs: dict | None, stage: str) -> DataLoader:
        if pairs is None:
            self.setup(stage)
            pairs = self.val_set if stage == "validate" else self.test_set
        b = self.hparams.eval_batch_size
        return self._loader(Slices(pairs, b), -(-len(pairs["fixed"]) // b))
