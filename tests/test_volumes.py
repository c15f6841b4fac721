"""Volumes end to end (issue #34): train and eval on synthetic volume pairs through the same
entry points as images, and load_model on the checkpoint."""

from __future__ import annotations

import pytest
import torch

import air_reg
from air_reg.eval import evaluate
from air_reg.train import train


@pytest.mark.slow  # ~15 s on 2 cores
@pytest.mark.parametrize("model", ["air_match", "voxelmorph"])
def test_train_and_eval_on_synthetic_volumes(make_cfg, tmp_path, model):
    if model == "voxelmorph":
        pytest.importorskip("voxelmorph")
    cfg = make_cfg("train", [f"model={model}", "data=synth3d", "data.image_size=[16,16,16]",
                             "data.pairs_per_epoch=4", "data.num_val_pairs=2",
                             "data.num_test_pairs=2", "trainer.max_epochs=1"])  # fmt: skip
    metrics = train(cfg)
    assert {"test/epe", "test/dice_labels", "test/folding"} <= set(metrics)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    model_ = air_reg.load_model(ckpt)
    fixed = torch.rand(1, 1, 16, 16, 16)
    assert model_(fixed, fixed).shape == (1, 3, 16, 16, 16)
    summary = evaluate(make_cfg("eval", [f"ckpt_path={ckpt}", "num_pairs=2"]))
    assert summary["identity"]["epe"]["mean"] > 0  # the identity's error on known 3-D fields
    assert set(summary["model"]) >= {"mse", "epe", "folding"}
