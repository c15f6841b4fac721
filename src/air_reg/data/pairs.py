"""Fixed/moving pair datasets held as in-memory tensors, with rank-sharded pair samplers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from air_reg.errors import ConfigError

PAIRINGS = ("random", "same_class", "given")


class PairDataset(Dataset):
    """All images in one (N, 1, H, W) float tensor; an item is a (fixed, moving) index pair.

    ``__getitems__`` gathers a whole batch with one indexing call per field, so the
    DataLoader does no per-item work. ``labels`` (N,) are class or group ids (pairing);
    ``flows`` (N, 2, H, W), when given, is the ground-truth flow that registers ``moving`` onto
    fixed image ``i`` (synthetic data); ``segs`` (N, 1, H, W), when given, are integer label
    maps (as floats) that travel with the images as ``fixed_labels`` / ``moving_labels``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        flows: torch.Tensor | None = None,
        segs: torch.Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.flows, self.segs = images, labels, flows, segs

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
        f, m = idx[:, 0], idx[:, 1]
        batch = {
            "fixed": self.images[f],
            "moving": self.images[m],
            "fixed_class": self.labels[f],
            "moving_class": self.labels[m],
        }
        if self.flows is not None:
            batch["flow"] = self.flows[f]
        if self.segs is not None:
            batch["fixed_labels"], batch["moving_labels"] = self.segs[f], self.segs[m]
        return batch

    def __getitem__(self, pair: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([pair]).items()}


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``__getitems__`` already returns a collated batch."""
    return batch


def draw_pairs(
    pool: torch.Tensor,
    labels: torch.Tensor,
    num_pairs: int,
    pairing: str,
    generator: torch.Generator,
    partner: torch.Tensor | None = None,
) -> torch.Tensor:
    """(num_pairs, 2) (fixed, moving) indices drawn from ``pool``.

    Every pool image is a fixed image once per pass (a fresh permutation each pass);
    ``random`` draws the moving image from the whole pool, ``same_class`` from the fixed
    image's class, ``given`` takes ``partner[fixed]``. An image is never paired with itself
    (such a pair is no registration problem and its PSNR is infinite): the few draws that hit
    the fixed image are redrawn, leaving every other pair as drawn.
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    passes = -(-num_pairs // len(pool))
    order = torch.cat([torch.randperm(len(pool), generator=generator) for _ in range(passes)])
    fixed = pool[order[:num_pairs]]
    if pairing == "given":
        if partner is None:
            raise ConfigError("pairing='given' needs a dataset with preset partners")
        moving = partner[fixed]
    else:
        moving = _draw_moving(pool, labels, fixed, pairing, generator)
        for _ in range(100):  # self-pairs: ~1 in len(class) draws, so this ends in a round or two
            same = moving == fixed
            if not same.any():
                break
            moving[same] = _draw_moving(pool, labels, fixed[same], pairing, generator)
    return torch.stack([fixed, moving], dim=1)


def _draw_moving(
    pool: torch.Tensor,
    labels: torch.Tensor,
    fixed: torch.Tensor,
    pairing: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """One moving index per fixed index: from the whole pool, or from the fixed image's class."""
    if pairing == "random":
        return pool[torch.randint(len(pool), (len(fixed),), generator=generator)]
    moving = torch.empty_like(fixed)  # same_class: uniform among the pool images of the class
    pool_labels = labels[pool]
    for c in labels[fixed].unique():
        members = pool[pool_labels == c]
        sel = labels[fixed] == c
        moving[sel] = members[torch.randint(len(members), (int(sel.sum()),), generator=generator)]
    return moving


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PairSampler(Sampler):
    """Yields (fixed, moving) index pairs for one epoch, sharded across ranks.

    ``draw(epoch)`` returns the epoch's global (P, 2) pair list; rank r takes rows
    r, r + W, r + 2W, ... so ranks never see the same pair. With ``even=True`` (training)
    the list is cut to a multiple of W so that every rank runs the same number of steps.
    Lightning calls ``set_epoch`` at the start of each epoch.
    """

    def __init__(self, draw: Callable[[int], torch.Tensor], even: bool = False) -> None:
        self.draw, self.even, self.epoch = draw, even, 0
        self._cache: tuple[int, torch.Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pairs(self) -> torch.Tensor:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.draw(self.epoch))
        rank, world = _rank_and_world()
        pairs = self._cache[1]
        if self.even:
            pairs = pairs[: len(pairs) // world * world]
        return pairs[rank::world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from map(tuple, self._pairs().tolist())

    def __len__(self) -> int:
        return len(self._pairs())
