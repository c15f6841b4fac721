"""A folder of one's own non-square PNGs with label maps: train, eval (label metrics), register."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from test_folder_data import H, W, png_folder

from air_reg.eval import evaluate
from air_reg.register import register
from air_reg.train import train


@pytest.mark.slow
def test_a_folder_of_non_square_pngs_with_labels_trains_evaluates_and_registers(tmp_path):
    data = png_folder(tmp_path / "images", n=24)
    overrides = [
        "data=folder",
        f"data.path={data}",
        "data.batch_size=8",
        "model=dirnet",
        "model.net.channels=16",
        "model.optimizer.lr=1e-3",
        "trainer.max_epochs=2",
    ]
    run = tmp_path / "run"
    metrics = train(compose_config("train", overrides, run))
    assert {"test/mse", "test/dice_labels", "test/hd95"} <= set(metrics)
    record = json.loads((run / "run_record.json").read_text())
    assert record["config"]["data"]["image_size"] == [H, W]  # the images' own size
    ckpt = run / "checkpoints" / "last.ckpt"

    summary = evaluate(compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path / "eval"))
    for method in ("identity", "model"):
        assert {"dice_labels", "hd95", "dsc30", "dice_label_1", "dice_label_2"} <= set(
            summary[method]
        )
    assert 0 < summary["identity"]["dice_labels"]["mean"] < 1
    per_pair = (tmp_path / "eval" / "per_pair.csv").read_text().splitlines()[0]
    assert "dice_labels" in per_pair
    assert "hd95" in per_pair

    a, b = data / "img0.png", data / "img1.png"
    out = register(
        compose_config(
            "register", [f"fixed={a}", f"moving={b}", f"ckpt_path={ckpt}"], tmp_path / "r"
        )
    )
    assert out["num_pairs"] == 1
    assert out["pairs"][0]["height"] == H
    assert out["pairs"][0]["width"] == W
