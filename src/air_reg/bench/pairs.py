"""The benchmark pairs: the fixed, seeded test (or validation) pairs of a dataset, and the same
moving images under known deformations.

Every benchmark (reproduce, converge, refine_benchmark) scores on these, so two tables that
name the same dataset, pairing and count were scored on the same pairs.
"""

from __future__ import annotations

import tempfile

import torch
from hydra.utils import instantiate

from air_reg.config import compose_config
from air_reg.data.synthetic import known_flows
from air_reg.models.components.spatial_transformer import warp

PAIRINGS = ("random", "same_class")  # the pairing modes of the benchmark tables
KNOWN_PX = 2.0  # std (px) of the known deformations' coarse velocity (the tables' setting)


def benchmark_batches(
    data: str, pairing: str, n: int, *, batch_size: int = 250, split: str = "test"
) -> list[dict]:
    """The first ``n`` pairs of ``data``'s ``split`` ("test" or "val") in ``pairing`` mode, in
    batches of ``batch_size``: ``{"fixed", "moving", ...}`` with (B, 1, H, W) images.

    The pairs come from the data config's seeds (``data.pair_seed``), never from the global
    RNG: the same call gives the same pairs in any process, before or after training.
    """
    if split not in ("test", "val"):
        raise ValueError(f"benchmark_batches: split={split!r}; choose 'test' or 'val'")
    cfg = compose_config(
        "train",
        [
            f"data={data}",
            f"data.pairing={pairing}",
            f"data.num_{split}_pairs={n}",
            f"data.eval_batch_size={batch_size}",
        ],
        tempfile.gettempdir(),  # no run: nothing is written there
    )
    dm = instantiate(cfg.data)
    dm.setup("test" if split == "test" else "fit")
    return list(dm.test_dataloader() if split == "test" else dm.val_dataloader())


def known_deformation_batches(
    batches: list[dict], magnitude: float = KNOWN_PX, seed: int = 0
) -> list[dict]:
    """The same moving images, each with a fixed image made by a known smooth diffeomorphism
    (``air_reg.data.synthetic.known_flows``): ``{"fixed", "moving", "flow"}``, so scoring
    reports the end-point error. Seeded: the same batches give the same deformations."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        moving = b["moving"]  # (B, 1, H, W)
        flow = known_flows(len(moving), tuple(moving.shape[-2:]), g, magnitude=magnitude)
        out.append({"fixed": warp(moving, flow), "moving": moving, "flow": flow})
    return out
