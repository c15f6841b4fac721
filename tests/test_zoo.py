"""The registry (air_reg.zoo) is the one list of methods: the weight files, the experiment
configs, register's default and the README's model table all agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from air_reg import zoo
from air_reg.config import CONFIG_DIR, compose_config
from air_reg.register import weights_name

README = Path(__file__).resolve().parents[1] / "README.md"


def test_shipped_files_are_the_registry():
    on_disk = sorted(p.stem for p in zoo.WEIGHTS_DIR.glob("*.ckpt"))
    assert on_disk == sorted(zoo.shipped())


@pytest.mark.parametrize("method", zoo.METHODS, ids=lambda m: m.weights)
def test_each_method_has_its_experiment_config(method):
    assert (Path(CONFIG_DIR) / "experiment" / f"{method.experiment}.yaml").is_file()
    for dataset in method.datasets:
        assert method.weights_path(dataset).is_file()


def test_lookup_by_label_or_weight_stem():
    assert zoo.method("AiR-UNet") is zoo.method("air_unet")
    assert zoo.label_of("voxelmorph_fashion") == "VoxelMorph"
    assert zoo.label_of("my_own") == "my_own"
    with pytest.raises(KeyError, match="AiR-UNet"):
        zoo.method("nope")


def test_register_default_is_the_registry_default(tmp_path):
    cfg = compose_config("register", ["fixed=a.png", "moving=b.png"], tmp_path)
    assert weights_name(cfg) == zoo.default_weights("mnist") == "air_unet_mnist"
    cfg = compose_config("register", ["fixed=a.png", "moving=b.png", "data=fashion"], tmp_path)
    assert weights_name(cfg) == zoo.default_weights("fashion")


def test_readme_lists_every_shipped_model():
    text = README.read_text()
    section = text.split("Shipped weights", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z_]+_(?:mnist|fashion))`", section))
    assert named == set(zoo.shipped())
