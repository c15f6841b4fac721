"""Shared fixtures: the real configs composed with Hydra's compose API, forced onto the CPU."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict

from air_reg import config as air_reg_config
from air_reg.speed import kernels

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="no C++ compiler here: air-reg's CPU kernels cannot be built"
)


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``air_reg/conf/<name>.yaml`` on the CPU, no progress bars, output in a temp dir."""
    cfg = air_reg_config.compose_config(name, overrides, output_dir)
    with open_dict(cfg):
        if "trainer" in cfg:
            cfg.trainer.enable_progress_bar = False
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg("train", [overrides...])`` -> composed DictConfig writing under tmp_path."""

    def _make(name: str = "train", overrides: list[str] | None = None) -> DictConfig:
        return compose_config(name, overrides or [], tmp_path)

    return _make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Sequence(torch.nn.Module):
    """A stub 'network' returning given flows in turn and recording what it was shown."""

    def __init__(self, *flows: torch.Tensor) -> None:
        super().__init__()
        self.flows, self.seen = list(flows), []

    def forward(self, fixed, moving):
        self.seen.append(moving)
        return self.flows[len(self.seen) - 1]


class NaNAfterLoss(torch.nn.Module):
    """MSE that turns NaN after ``steps`` calls in training mode (for the non-finite test)."""

    def __init__(self, steps: int = 3) -> None:
        super().__init__()
        self.steps, self.calls = steps, 0

    def forward(self, warped, fixed):
        loss = (warped - fixed).square().mean()
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls > self.steps:
                return loss * float("nan")
        return loss


class RankWeightDigest(L.Callback):
    """Writes a sha256 of the weights each rank ends with to ``<folder>/rank<k>.txt``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_fit_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.txt").write_text(digest.hexdigest())
