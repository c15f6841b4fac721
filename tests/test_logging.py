"""Dashboards: CSV by default, W&B offline without an account, TensorBoard, image grids."""

import pytest
import torch

from air_reg.callbacks import grid_image, pair_grid, wandb_logged_in, wandb_logger
from air_reg.train import train

TINY = ["data=synthetic", "data.num_images=128", "model.net.patch_size=7", "trainer.max_epochs=1"]


def test_pair_grid_has_four_columns_per_pair():
    fixed = torch.rand(3, 1, 28, 28)
    image = pair_grid(fixed, fixed, torch.zeros(3, 2, 28, 28))
    assert image.shape == (3, 3 * 30 + 2, 4 * 30 + 2)  # make_grid pads 2 px around tiles


def test_zero_flow_draws_the_regular_grid():
    lines = grid_image((8, 8), step=4)
    assert lines[0, 0, 0].sum() == 8
    assert lines[0, 0, 1].sum() == 2


def test_wandb_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not wandb_logged_in()
    logger = wandb_logger(project="t", save_dir=str(tmp_path))
    assert logger._offline


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "wandb", "tensorboard"])
def test_training_logs_metrics_and_image_grids(make_cfg, tmp_path, monkeypatch, logger):
    if logger == "tensorboard":
        pytest.importorskip("tensorboard")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B must go offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(make_cfg("train", [*TINY, f"logger={logger}"]))
    assert (tmp_path / "images" / "val_epoch000.png").is_file()
    expected = {
        "csv": "csv/metrics.csv",
        "wandb": "wandb/offline-run-*/run-*.wandb",
        "tensorboard": "tensorboard/events.out.tfevents.*",
    }[logger]
    assert list(tmp_path.glob(expected)), f"nothing matches {expected}"
