"""LightningDataModules: MNIST / Fashion-MNIST pairs with the paper's 80/20 split."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from air_reg.data.idx import checksums, load_dataset
from air_reg.data.pairs import PAIRINGS, PairDataset, PairSampler, collate_batch, draw_pairs
from air_reg.data.preprocess import Preprocessing
from air_reg.errors import ConfigError
from air_reg.models.contract import as_size

log = logging.getLogger(__name__)


def seeded_split(
    items: torch.Tensor, train_fraction: float, val_fraction: float, seed: int, min_train: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(val, train, test) rows of ``items`` shuffled with ``seed``: ``train_fraction`` of them
    (at least ``min_train``) for training, ``val_fraction`` of that part for validation."""
    perm = items[torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))]
    n_train = max(min_train, round(train_fraction * len(items)))
    n_val = round(val_fraction * n_train)
    return perm[:n_val], perm[n_val:n_train], perm[n_train:]


class PairDataModule(L.LightningDataModule):
    """Fixed/moving pairs over one image collection.

    All images (train + test files pooled, 70,000 for MNIST) are split once with
    ``split_seed``: ``train_fraction`` for training, the rest for testing (the paper's
    80/20); validation is carved out of the training part. Training pairs are redrawn
    every epoch from ``(pair_seed, epoch)``; validation and test pairs are one fixed seeded
    list, so every method is scored on the same pairs. The images are 8-bit, read / 255 and
    resized to ``image_size`` (``preprocessing``: what ``register`` applies to a file).
    """

    def __init__(
        self,
        *,
        dataset: str = "mnist",
        root: str | None = None,
        image_size: int = 28,
        pairing: str = "random",
        batch_size: int = 64,
        eval_batch_size: int = 512,
        train_fraction: float = 0.8,
        val_fraction: float = 0.05,
        pairs_per_epoch: int | None = None,
        num_val_pairs: int | None = 1000,
        num_test_pairs: int | None = None,
        split_seed: int = 0,
        pair_seed: int = 0,
        num_workers: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        if pairing not in PAIRINGS:
            raise ConfigError(f"data.pairing must be one of {PAIRINGS}, got {pairing!r}")
        if not 0 < train_fraction < 1 or not 0 <= val_fraction < 1:
            raise ConfigError("data.train_fraction must be in (0, 1), data.val_fraction in [0, 1)")
        if image_size < 4:
            raise ConfigError(f"data.image_size must be >= 4, got {image_size}")
        self.save_hyperparameters(logger=False)
        self.preprocessing = Preprocessing(sizing="resize", size=as_size(image_size))
        self.dataset: PairDataset | None = None
        self.partner: torch.Tensor | None = None  # preset moving partner (synthetic data)

    # -- data loading: subclasses override ``load`` -------------------------------------
    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Images (N, 1, H, W) in [0, 1], labels (N,), optional flows, and how many of the
        first images form the split pool (the rest are partners)."""
        raw, labels = load_dataset(self.hparams.dataset, self.hparams.root, self.hparams.download)
        size = self.preprocessing.size
        images = self.preprocessing.to_model(raw[:, None].float().div_(255), size)
        return images, labels, None, len(images)

    def file_checksums(self) -> dict[str, str]:
        """sha256 of the raw files read, for the run record."""
        return checksums(self.hparams.dataset, self.hparams.root)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        hp = self.hparams
        images, labels, flows, n_pool = self.load()
        # Ground-truth flows only describe the preset pairs.
        self.dataset = PairDataset(images, labels, flows if hp.pairing == "given" else None)
        self.val_pool, self.train_pool, self.test_pool = seeded_split(
            torch.arange(n_pool), hp.train_fraction, hp.val_fraction, hp.split_seed
        )
        g = torch.Generator().manual_seed(hp.pair_seed + 1)
        self.val_pairs = self._draw(self.val_pool, hp.num_val_pairs, g)
        g = torch.Generator().manual_seed(hp.pair_seed + 2)
        self.test_pairs = self._draw(self.test_pool, hp.num_test_pairs, g)
        log.info(
            "%s: %d train / %d val / %d test images, %d val and %d test pairs (%s pairing)",
            hp.dataset,
            len(self.train_pool),
            len(self.val_pool),
            len(self.test_pool),
            len(self.val_pairs),
            len(self.test_pairs),
            hp.pairing,
        )

    def _draw(self, pool: torch.Tensor, n: int | None, g: torch.Generator) -> torch.Tensor:
        if len(pool) == 0:
            return torch.empty(0, 2, dtype=torch.long)
        labels = self.dataset.labels
        return draw_pairs(pool, labels, n or len(pool), self.hparams.pairing, g, self.partner)

    def train_pairs(self, epoch: int) -> torch.Tensor:
        """The (P, 2) training pairs of ``epoch``: a deterministic function of seed and epoch."""
        g = torch.Generator().manual_seed(self.hparams.pair_seed * 1_000_003 + epoch)
        return self._draw(self.train_pool, self.hparams.pairs_per_epoch, g)

    @property
    def image_size(self) -> int:
        return self.hparams.image_size

    def _loader(self, sampler: PairSampler, batch_size: int) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_batch,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(PairSampler(self.train_pairs, even=True), self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        sampler = PairSampler(lambda _epoch: self.val_pairs)
        return self._loader(sampler, self.hparams.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        sampler = PairSampler(lambda _epoch: self.test_pairs)
        return self._loader(sampler, self.hparams.eval_batch_size)
