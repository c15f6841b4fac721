"""Train a method for a budget and export its weights: what every benchmark's training shares.

A budget is a wall-clock time ("DD:HH:MM:SS": the tables' fair-share rule, each model the same
minutes on the same machine) or a number of optimiser steps (an int: the same numbers on any
load, where training is deterministic).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import open_dict

from air_reg.config import compose_config
from air_reg.train import train
from air_reg.utils import write_with

log = logging.getLogger(__name__)
Budget = str | int  # "DD:HH:MM:SS" of wall clock, or optimiser steps
KEEP = ("state_dict", "air_reg", "epoch", "global_step", "pytorch-lightning_version")


def budget_overrides(budget: Budget | None) -> list[str]:
    """Trainer overrides for ``budget``: a time cap, or a step cap with no time cap; None: the
    config's own."""
    if budget is None:
        return []
    if isinstance(budget, int):
        return [f"++trainer.max_steps={budget}", "trainer.max_time=null"]
    return [f"trainer.max_time={budget}"]


def best_checkpoint(run: str | Path) -> Path:
    """The run's best checkpoint (``epoch_NNN.ckpt``, by validation MSE), else its last."""
    best = sorted((Path(run) / "checkpoints").glob("epoch_*.ckpt"))
    return best[-1] if best else Path(run) / "checkpoints" / "last.ckpt"


def train_for(
    experiment: str,
    data: str | None,
    budget: Budget | None,
    out: str | Path,
    overrides: Sequence[str] = (),
    *,
    test: bool = False,
    accelerator: str = "cpu",
) -> Path:
    """Train ``experiment=<experiment>`` (on ``data=<data>``; None: the experiment's own) for
    ``budget`` into the run folder ``out``; return its best checkpoint (lowest validation MSE).

    ``overrides`` are Hydra overrides applied last; no image grids, no progress bar; ``test``
    also scores the test split (``<out>/metrics.json``). ``accelerator``: "cpu" or "gpu".
    """
    cfg = compose_config(
        "train",
        [
            f"experiment={experiment}",
            *([f"data={data}"] if data else []),
            "callbacks.image_grid=null",
            *budget_overrides(budget),
            "trainer.enable_progress_bar=false",
            f"test={str(test).lower()}",
            *overrides,
        ],
        out,
    )
    if accelerator != "cpu":
        with open_dict(cfg):
            cfg.trainer.accelerator = accelerator
    start = time.time()
    train(cfg)
    log.info("%s on %s trained in %.0f s", experiment, data or "its data", time.time() - start)
    return best_checkpoint(out)


def export(ckpt: str | Path, dest: str | Path) -> None:
    """Copy a checkpoint's weights and model record (no optimiser state) to ``dest``: what
    ``air_reg/weights/`` ships and ``load_model`` reads."""
    full = torch.load(ckpt, map_location="cpu", weights_only=True)
    write_with(dest, lambda tmp: torch.save({k: full[k] for k in KEEP if k in full}, tmp))
