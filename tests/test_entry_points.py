"""Entry-point defaults: shipped weights by name, data location, a light `register` import."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from conftest import compose_config

from air_reg.checkpoint import CheckpointError, network_config, shipped_weights
from air_reg.data import idx
from air_reg.eval import evaluate
from air_reg.register import weights_name


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "air_match_synth"),  # trained on synthetic pairs: any 2-D pair (issue #32)
        (["data=mnist"], "air_unet_mnist"),  # the best on a dataset's own images
        (["data=fashion"], "air_unet_fashion"),
        (["weights=mapt_tuned_mnist"], "mapt_tuned_mnist"),
        (["weights=dirnet_mnist"], "dirnet_mnist"),
        (["model=mapt", "data=fashion"], "mapt_fashion"),  # deprecated, still works
        (["model=air_unet"], "air_unet_mnist"),  # the config's name, not the class's (AiRUNet)
        (["model=voxelmorph", "data=fashion"], "voxelmorph_fashion"),
    ],
)
def test_register_picks_shipped_weights(tmp_path, overrides, expected, caplog):
    cfg = compose_config("register", ["fixed=a.png", "moving=b.png", *overrides], tmp_path)
    with caplog.at_level(logging.WARNING):
        assert weights_name(cfg) == expected
    assert shipped_weights(expected).is_file()
    assert ("deprecated" in caplog.text) == any(o.startswith("model=") for o in overrides)


def test_unknown_weights_list_the_shipped_ones():
    with pytest.raises(CheckpointError, match="mapt_tuned_mnist"):
        shipped_weights("nope")


@pytest.mark.slow
def test_eval_takes_a_shipped_model_by_name(tmp_path):
    summary = evaluate(compose_config("eval", ["weights=air_mnist", "num_pairs=64"], tmp_path))
    assert summary["model"]["mse"]["mean"] < summary["identity"]["mse"]["mean"]
    with pytest.raises(CheckpointError, match="ckpt_path=.* or weights=<name>"):
        evaluate(compose_config("eval", [], tmp_path))


def test_data_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(idx.DATA_ENV, str(tmp_path))
    assert idx.default_data_root() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="AIR_REG_DATA"):
        idx.load_dataset("mnist", download=False)


def test_register_starts_without_lightning_torchmetrics_or_matplotlib():
    code = (
        "import json, sys, air_reg.register; "
        "print(json.dumps([m for m in ('lightning', 'torchmetrics', 'matplotlib') "
        "if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_older_records_migrate_and_the_reference_transformer_is_refused():
    net = {"_target_": "air_reg.models.components.air.AiR", "patch_size": 2}
    old = {"model": {"net": {**net, "impl": "sdpa", "fast_dropout": True, "attn_kernel": "cpu"}}}
    assert network_config(old) == (net, {"attention": "kernel", "dropout": "fast"})
    new = {"model": {"net": net}, "speed": {"attention": "sdpa", "dropout": "torch"}}
    assert network_config(new) == (net, new["speed"])
    with pytest.raises(CheckpointError, match="reference nn.Transformer"):
        network_config({"model": {"net": {**net, "impl": "torch"}}})
