"""The registry (air_reg.zoo) is the one list of methods: the weight files, the experiment
configs, register's default and the README's model table all agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import air_reg
from air_reg import metrics, zoo
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
    assert weights_name(cfg) == zoo.default_weights() == "air_match_synth"
    cfg = compose_config("register", ["fixed=a.png", "moving=b.png", "data=fashion"], tmp_path)
    assert weights_name(cfg) == zoo.default_weights("fashion") == "air_unet_fashion"
    cfg = compose_config("register", ["fixed=a.png", "moving=b.png", "data=mnist"], tmp_path)
    assert weights_name(cfg) == "air_unet_mnist"


def test_the_default_model_runs_at_any_size_and_was_trained_on_synthetic_pairs():
    model = air_reg.load_model(zoo.WEIGHTS_DIR / f"{zoo.default_weights()}.ckpt")
    assert model.accepts_any_size
    assert model.build_config["data"]["_target_"].endswith("SynthDataModule")
    assert zoo.DEFAULT.weights_path(zoo.SYNTH).stat().st_size < 20e6  # issue #32: <= 20 MB
    assert zoo.DEFAULT not in zoo.DATASET_METHODS  # reproduce.py trains the others per dataset


def test_readme_lists_every_shipped_model():
    text = README.read_text()
    section = text.split("Shipped weights", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z_]+_(?:mnist|fashion|synth))`", section))
    assert named == set(zoo.shipped())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small", "large", "contrast"])
def test_the_default_model_registers_images_it_never_saw(name):
    """register's default, one-shot with its guard, on held-out photographs and MNI152 slices
    under known fields (air_reg.bench.families): closer to the truth than doing nothing."""
    from air_reg.bench.families import family
    from air_reg.refine.optimise import keep_if_better

    model = air_reg.load_model(zoo.WEIGHTS_DIR / f"{zoo.default_weights()}.ckpt")
    assert model.guard_similarity == "mi"  # trained across contrasts: MSE would refuse right flows
    batch = family(name, 4, (64, 80), seed=1, split="test")[0]
    with torch.no_grad():
        flow = model(batch["fixed"], batch["moving"])
    guarded = keep_if_better(flow, batch["fixed"], batch["moving"], model.guard_similarity)[0]
    before = metrics.epe(torch.zeros_like(flow), batch["flow"]).mean()
    assert metrics.epe(guarded, batch["flow"]).mean() < 0.8 * before
    assert metrics.folding(guarded).mean() <= 0.1  # % of pixels (issue #32: <= 0.1 %)


def test_a_dataset_trained_model_guards_by_mse():
    assert air_reg.load_model(zoo.WEIGHTS_DIR / "air_unet_mnist.ckpt").guard_similarity == "mse"
