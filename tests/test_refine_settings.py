"""Refinement settings as one object (RefineSettings), load_model's one return type
(Registrar), and the former names that still work with a DeprecationWarning."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import yaml
from conftest import compose_config
from hydra.utils import instantiate

import air_reg
from air_reg import losses, speed
from air_reg.checkpoint import (
    load_configured,
    network_config,
    read_checkpoint,
    shipped_weights,
)
from air_reg.errors import ConfigError
from air_reg.images import resize
from air_reg.models.components.mapt import MAPT
from air_reg.models.components.spatial_transformer import resize_flow
from air_reg.refine import (
    LEGACY_DEFAULTS,
    PRESET_DIR,
    RefineSettings,
    RefineSettingsError,
    Registrar,
    apply_repeatedly,
    refine,
)
from air_reg.speed import warp as warp_ops

NOT_IN_PRESET = {"steps", "regularizer"}  # the CLI's refine_steps; a module


def pairs(n: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g), torch.rand(n, 1, h, w, generator=g)


# -- the settings object -------------------------------------------------------------------
def test_defaults_are_the_default_preset_file():
    block = yaml.safe_load((PRESET_DIR / "default.yaml").read_text())["refine"]
    defaults = RefineSettings()
    assert set(block) == set(RefineSettings.names()) - NOT_IN_PRESET  # the file lists them all
    assert {k: getattr(defaults, k) for k in block} == block
    assert RefineSettings.preset("default") == defaults


@pytest.mark.parametrize("path", sorted(PRESET_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_lists_every_setting_and_builds(path):
    text = yaml.safe_load(path.read_text())
    assert set(text["refine"]) == set(RefineSettings.names()) - NOT_IN_PRESET
    assert text["refine_steps"] == 0  # the switch: off unless asked for
    assert RefineSettings.preset(path.stem).as_dict() == text["refine"]


def test_unknown_names_are_one_error_line_listing_the_valid_names():
    for make in (
        lambda: RefineSettings(learning_rate=0.1),
        lambda: RefineSettings().replace(learning_rate=0.1),
        lambda: RefineSettings.from_config({"learning_rate": 0.1}),
        lambda: air_reg.load_model(None, refine_steps=5, learning_rate=0.1),
    ):
        with pytest.raises(RefineSettingsError) as err:
            make()
        message = str(err.value)
        assert "\n" not in message
        assert "'learning_rate'" in message
        assert all(name in message for name in RefineSettings.names())
    assert issubclass(RefineSettingsError, ConfigError)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"levels": 0}, "refine.levels must be an integer >= 1, got 0"),
        ({"optimizer": "sgd"}, "refine.optimizer must be one of"),
        ({"similarity": "dice"}, "refine.similarity must be one of"),
        ({"spacing": -2}, "refine.spacing must be > 0"),
        ({"grid": 7}, "not both"),  # with the default spacing=auto
        ({"steps": -1}, "refine.steps must be an integer >= 0"),
        ({"guard": "yes"}, "refine.guard must be true or false"),
        ({"grid_mode": "nearest"}, "refine.grid_mode must be one of"),
    ],
)
def test_bad_values_are_refused_when_made(change, match):
    with pytest.raises(ConfigError, match=match) as err:
        RefineSettings(**change)
    assert "\n" not in str(err.value)


def test_settings_are_frozen_and_replace_makes_a_checked_copy():
    settings = RefineSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lr = 0.1
    changed = settings.replace(lr=0.1, steps=7)
    assert (changed.lr, changed.steps, settings.lr, settings.steps) == (0.1, 7, 0.5, 50)
    assert hash(changed) != hash(settings)
    with pytest.raises(ConfigError):
        settings.replace(lr=-1.0)
    assert LEGACY_DEFAULTS.step_size == 0.5  # lr=None: Adam's default step
    assert LEGACY_DEFAULTS.replace(optimizer="lbfgs").step_size == 1.0


def test_the_cli_spellings_reach_the_settings(tmp_path):
    """refine_steps=, cascade= and refine.*= of eval/register go through from_config."""
    cfg = compose_config(
        "eval",
        ["weights=none", "data=mnist", "refine_steps=7", "refine.lr=0.25", "refine.levels=2"],
        tmp_path,
    )
    model = load_configured(None, cfg)
    assert model.settings == RefineSettings(steps=7, lr=0.25, levels=2)
    cfg = compose_config(
        "eval", ["refinement=diffeomorphic", "refine_steps=3", "cascade=2"], tmp_path
    )
    model = load_configured(shipped_weights("mapt_tuned_mnist"), cfg)
    assert model.cascade == 2
    assert model.settings == RefineSettings.preset("diffeomorphic", steps=3)
    cfg = compose_config("eval", [], tmp_path)
    assert load_configured(shipped_weights("mapt_tuned_mnist"), cfg).settings is None


# -- load_model: one return type -----------------------------------------------------------
def test_load_model_returns_a_registrar_in_every_case():
    path = shipped_weights("mapt_tuned_mnist")
    plain = air_reg.load_model(path)
    refined = air_reg.load_model(path, refine_steps=60)
    free = air_reg.load_model(None, refine_steps=10, lr=0.2)
    for model in (plain, refined, free):
        assert type(model) is Registrar
        assert not model.training
    assert plain.settings is None
    assert not plain.accepts_any_size
    assert plain.image_size == refined.image_size == (28, 28)
    assert plain.integration_steps == 7  # the network's own
    assert plain.build_config["model"]["net"]["_target_"].endswith("MAPT")
    assert refined.settings == RefineSettings.preset("default", steps=60)
    assert refined.accepts_any_size
    assert refined.build_config == plain.build_config
    assert free.net is None
    assert free.build_config is None
    assert free.settings == RefineSettings(steps=10, lr=0.2)
    with pytest.raises(ConfigError, match="refine_steps"):
        air_reg.load_model(None)


def test_the_plain_model_is_the_network_bit_for_bit():
    """What ``load_model(path)`` returns gives the stored network's flow exactly."""
    path = shipped_weights("air_unet_mnist")
    ckpt = read_checkpoint(path)
    net_cfg, _ = network_config(ckpt["air_reg"])
    net = instantiate(net_cfg)
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items() if k[:4] == "net."})
    speed.accelerate(net, attention="auto")  # as load_model does (the kernels round otherwise)
    fixed, moving = pairs(3, 28, 28)
    with torch.no_grad():
        assert torch.equal(air_reg.load_model(path)(fixed, moving), net.eval()(fixed, moving))


def test_the_refining_model_is_refine_from_the_networks_flow():
    """``load_model(path, refine_steps=N)``: the network at its size, its flow brought to the
    images' size, then ``refine`` with the preset -- one pipeline, step by step."""
    path = shipped_weights("mapt_tuned_mnist")
    model = air_reg.load_model(path, refine_steps=10)
    fixed, moving = pairs(2, 40, 36, seed=1)
    with torch.no_grad():
        start = model.net(resize(fixed, (28, 28)), resize(moving, (28, 28)))
    start = resize_flow(start, (40, 36))
    expected = refine(fixed, moving, start, RefineSettings(steps=10))
    assert torch.equal(model(fixed, moving), expected)


def test_the_affine_stage_runs_once_before_the_network():
    seen = []

    class Recorder(torch.nn.Module):
        image_size = (28, 28)

        def forward(self, fixed, moving):
            seen.append(moving)
            return torch.zeros(len(fixed), 2, 28, 28)

    fixed, moving = pairs(1, 32, 32, seed=2)
    model = Registrar(
        Recorder(), RefineSettings(steps=0, affine_steps=5, affine_min_px=0.0, integration_steps=0)
    )
    model(fixed, moving)
    assert len(seen) == 1
    assert not torch.equal(seen[0], resize(moving, (28, 28)))  # it saw the aligned image


# -- former names --------------------------------------------------------------------------
def test_former_spellings_still_work_with_a_deprecation_warning():
    flow = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    with pytest.deprecated_call(match="fold_margin"):
        old = losses.NegativeJacobian(eps=0.2)
    assert old(flow) == losses.NegativeJacobian(fold_margin=0.2)(flow)
    with pytest.deprecated_call(match="fold_margin"):
        old = losses.DiffusionFold(fold_weight=3.0, margin=0.2)
    assert old(flow) == losses.DiffusionFold(fold_weight=3.0, fold_margin=0.2)(flow)
    with pytest.deprecated_call(match="fold_margin"):
        old = warp_ops.penalty(flow, 0.1, 2.0, margin=0.2)
    assert old == warp_ops.penalty(flow, 0.1, 2.0, 0.2)
    image = torch.rand(2, 1, 16, 16)
    with pytest.deprecated_call(match="warp_by_coarse_flow"):
        old = warp_ops.upwarp(image, flow)
    assert torch.equal(old, warp_ops.warp_by_coarse_flow(image, flow))
    with pytest.deprecated_call(match="mix_weights"):
        net = MAPT(image_size=28, patch_sizes=(4, 7), weights=[3.0, 1.0], dim=8, heads=2)
    assert torch.allclose(net.mix_weights, torch.tensor([0.75, 0.25]))
    with pytest.deprecated_call(match="mix_weights"):
        assert torch.equal(net.weights, net.mix_weights)


def test_former_refine_names_still_work_with_a_deprecation_warning():
    import air_reg.checkpoint
    import air_reg.refine

    fixed, moving = pairs(2, 20, 20, seed=4)
    with pytest.deprecated_call(match="RefineSettings"):
        old = refine(fixed, moving, steps=5, lr=0.2)  # keywords: the former defaults
    assert torch.equal(old, refine(fixed, moving, None, LEGACY_DEFAULTS.replace(steps=5, lr=0.2)))
    with pytest.deprecated_call(match="RefineSettings.preset"):
        preset = air_reg.refine.load_preset("diffeomorphic")
    assert preset == RefineSettings.preset("diffeomorphic").as_dict()
    with pytest.deprecated_call(match="apply_repeatedly"):
        cascade = air_reg.refine.cascade
    net = Registrar(None, RefineSettings(steps=1))  # any module with forward(fixed, moving)
    assert torch.equal(cascade(net, fixed, moving, 1), apply_repeatedly(net, fixed, moving, 1))
    with pytest.deprecated_call(match="names"):
        assert "fold_margin" in air_reg.refine.SETTINGS
    with pytest.deprecated_call(match="Registrar"):
        refiner = air_reg.refine.Refiner(None, steps=5, lr=0.2)
    assert refiner.settings == LEGACY_DEFAULTS.replace(steps=5, lr=0.2)
    assert isinstance(air_reg.load_model(None, refine_steps=1), air_reg.refine.Refiner)
    assert not isinstance(
        air_reg.load_model(shipped_weights("mapt_mnist")), air_reg.refine.Refiner
    )
    with pytest.deprecated_call(match="Registrar"):
        assert issubclass(air_reg.checkpoint.TrainedModel, Registrar)


@pytest.mark.parametrize("name", ["mapt_mnist", "mapt_tuned_mnist", "air_unet_mnist"])
def test_shipped_checkpoints_with_former_names_load_without_a_warning(name):
    """MAPT checkpoints store ``weights`` (now ``mix_weights``): mapped on loading, silently."""
    record = read_checkpoint(shipped_weights(name))["air_reg"]
    net_cfg, _ = network_config(record)
    assert "weights" not in net_cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model = air_reg.load_model(shipped_weights(name))
    if name.startswith("mapt"):
        assert "mix_weights" in net_cfg
        assert torch.allclose(model.net.mix_weights.sum(), torch.tensor(1.0))


def test_reg_weight_auto_goes_with_the_similarity():
    assert RefineSettings().reg_weight == "auto"
    assert RefineSettings().regularisation_weight == 0.002  # MSE's (brain MRI validation)
    assert RefineSettings(similarity="mi").regularisation_weight == 2.0  # MI's (families tune)
    assert RefineSettings(similarity="ngf").regularisation_weight == 0.002
    assert RefineSettings(similarity="mi", reg_weight=0.01).regularisation_weight == 0.01
    with pytest.raises(ConfigError, match="reg_weight must be >= 0 or auto"):
        RefineSettings(reg_weight="big")
