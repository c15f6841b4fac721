"""The shipped weights (air_reg/weights/*.ckpt) load offline and keep their recorded gains.

Each shipped model's MSE reduction on a fixed set of test pairs (the first 100 same-class test
pairs of its dataset, as ``PairDataModule`` draws them with its default seeds) is recorded
below. A change that loses part of a model's gain (a warp, a loader, a preprocessing or a
weight file gone wrong) fails here, not only one that loses all of it. Regenerate the figures
after re-exporting weights, and say why in the commit:

    python tests/test_weights.py
"""

from __future__ import annotations

import functools

import pytest
import torch

import air_reg
from air_reg import metrics, zoo
from air_reg.data import PairDataModule

NUM_PAIRS = 100
REL_TOL = 0.10  # of the recorded reduction: 92.3 % may read 83.1 .. 100 %
# % MSE reduction vs the identity (1 - mse(warped, fixed) / mse(moving, fixed)), measured
# 2026-12-06 on the CPU with `python tests/test_weights.py`; identity MSE: MNIST 0.11168,
# Fashion-MNIST 0.09861.
RECORDED = {
    "dirnet_mnist": 84.17,
    "dirnet_fashion": 64.26,
    "air_mnist": 19.43,
    "air_fashion": 23.56,
    "mapt_mnist": 30.56,
    "mapt_fashion": 24.01,
    "mapt_tuned_mnist": 84.22,
    "mapt_tuned_fashion": 58.93,
    "air_unet_mnist": 92.32,
    "air_unet_fashion": 71.84,
    "voxelmorph_mnist": 91.30,
    "voxelmorph_fashion": 71.86,
    "air_match_synth": 56.74,  # zero-shot (never saw a digit); 6250 steps; its default
    # cascade (up to 6 passes, affine between, 0.25 px stop; 3 passes 54.01, one 48.80), 2026-12-06
}


@functools.cache
def _test_pairs(dataset: str, image_size: int) -> dict[str, torch.Tensor]:
    dm = PairDataModule(
        dataset=dataset,
        image_size=image_size,
        pairing="same_class",
        num_val_pairs=8,
        num_test_pairs=NUM_PAIRS,
    )
    dm.setup()
    return dm.dataset.__getitems__(dm.test_pairs.tolist())


def mse_reduction(name: str) -> float:
    """% MSE reduction of shipped model ``name`` (``air_unet_mnist``) on its test pairs."""
    model = air_reg.load_model(zoo.WEIGHTS_DIR / f"{name}.ckpt")
    data = model.build_config["data"]
    # trained on synthetic pairs (air_match_synth): zero-shot on MNIST's test pairs
    dataset, size = (data["dataset"], data["image_size"]) if "dataset" in data else ("mnist", 28)
    batch = _test_pairs(dataset, size)
    fixed, moving = batch["fixed"], batch["moving"]
    with torch.no_grad():
        warped = air_reg.warp(moving, model(fixed, moving))
    before = metrics.mse(moving, fixed).mean()
    return 100 * (1 - metrics.mse(warped, fixed).mean() / before).item()


def test_every_shipped_model_has_a_recorded_gain():
    assert set(RECORDED) == set(zoo.shipped())
    missing = [n for n in RECORDED if not (zoo.WEIGHTS_DIR / f"{n}.ckpt").is_file()]
    assert not missing, missing


@pytest.mark.slow  # 13 models x 100 pairs: ~35 s in all on 2 cores
@pytest.mark.parametrize("name", RECORDED)
def test_shipped_model_keeps_its_recorded_gain(name):
    if name.startswith("voxelmorph"):
        pytest.importorskip("voxelmorph")  # the peer's package: extra [peers]
    measured, recorded = mse_reduction(name), RECORDED[name]
    assert abs(measured - recorded) <= REL_TOL * recorded, (
        f"{name}: MSE reduction {measured:.2f} %, recorded {recorded:.2f} % (tolerance "
        f"{100 * REL_TOL:.0f} % relative); if the weights were re-exported on purpose, "
        "regenerate RECORDED with `python tests/test_weights.py`"
    )


if __name__ == "__main__":
    for name in zoo.shipped():
        print(f'    "{name}": {mse_reduction(name):.2f},')
