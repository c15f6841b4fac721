"""The shipped weights (weights/*.ckpt) load offline and register better than the identity."""

import pytest
import torch

import air_reg
from air_reg import metrics
from air_reg.checkpoint import WEIGHTS_DIR
from air_reg.data import PairDataModule

WEIGHTS = sorted(WEIGHTS_DIR.glob("*.ckpt"))


@pytest.mark.parametrize("path", WEIGHTS, ids=lambda p: p.stem)
def test_shipped_weights_beat_the_identity(path):
    if path.stem.startswith("voxelmorph"):
        pytest.importorskip("voxelmorph")  # the peer's package: extra [peers]
    model = air_reg.load_model(path)
    data = model.build_config["data"]
    dm = PairDataModule(
        dataset=data["dataset"],
        image_size=data["image_size"],
        pairing="same_class",
        num_val_pairs=8,
        num_test_pairs=64,
    )
    dm.setup()
    batch = dm.dataset.__getitems__(dm.test_pairs.tolist())
    with torch.no_grad():
        warped = air_reg.warp(batch["moving"], model(batch["fixed"], batch["moving"]))
    before = metrics.mse(batch["moving"], batch["fixed"]).mean()
    assert metrics.mse(warped, batch["fixed"]).mean() < before


def test_the_models_are_shipped_for_both_datasets():
    names = {p.stem for p in WEIGHTS}
    models = ("air", "mapt", "mapt_tuned", "dirnet", "air_unet", "voxelmorph")
    expected = {f"{m}_{d}" for m in models for d in ("mnist", "fashion")}
    assert expected <= names, sorted(expected - names)
