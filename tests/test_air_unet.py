"""AiR-UNet (``model=air_unet``): shapes at any size, the contract, identity at init, the
ablation switches, gradients into the attention, training and ``load_model``."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

import air_reg
from air_reg import checkpoint, speed
from air_reg.errors import ConfigError
from air_reg.models import contract
from air_reg.models.components.air_unet import AiRUNet
from air_reg.models.components.attention import ScaledDotProductAttention
from air_reg.train import train

SWITCHES = [
    {"attention": "none"},
    {"attention": "cross"},
    {"attention": "self+cross"},
    {"attention": "air"},
    {"scales": [2, 4]},
    {"scales": [1, 2, 4], "channels": [8, 16, 32]},
    {"decoder": "interpolate"},
    {"decoder": "interpolate", "attention": "none"},
    {"integration_steps": 0},
    {"channels": [8, 16, 32, 32], "decoder_channels": [16, 16, 32, 32], "scales": [4, 8]},
]


def pair(h: int, w: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(batch, 1, h, w), torch.rand(batch, 1, h, w)


@pytest.mark.parametrize("size", [(28, 28), (33, 47)])
@pytest.mark.parametrize(
    "switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_every_switch_builds_runs_and_meets_the_contract(switch, size):
    net = AiRUNet(image_size=size, **switch)
    contract.check_network(net)  # image_size, integration_steps, a dry run's flow shape
    assert net.image_size == size
    assert net.integration_steps == switch.get("integration_steps", 5)
    flow = net(*pair(*size, batch=3))
    assert flow.shape == (3, 2, *size)
    assert torch.isfinite(flow).all()


def test_attention_none_has_no_attention_and_the_default_has_it_at_one_quarter():
    plain = AiRUNet(attention="none")
    assert not any(isinstance(m, ScaledDotProductAttention) for m in plain.modules())
    net = AiRUNet()
    assert list(net.attend) == ["4"]
    assert net.attend["4"].pos.shape == (1, 32, 7, 7)  # 7x7 tokens on 28x28
    # 33x47 pads to 36x48 (a multiple of 4): 9x12 tokens
    assert AiRUNet(image_size=(33, 47)).attend["4"].pos.shape == (1, 32, 9, 12)
    # the shipped config's four levels pad 28x28 to 32x32: 8x8 tokens at 1/4
    four = AiRUNet(channels=[8, 16, 32, 32], decoder_channels=[16, 16, 32, 32])
    assert four.attend["4"].pos.shape == (1, 32, 8, 8)


def test_the_flow_starts_at_the_identity():
    fixed, moving = pair(28, 28, batch=4)
    flow = AiRUNet()(fixed, moving)
    assert flow.abs().max() < 1e-3, "the velocity head starts near zero"
    exact = AiRUNet(flow_init=0.0)(fixed, moving)
    assert exact.abs().max() == 0
    assert torch.allclose(air_reg.warp(moving, exact), moving, atol=1e-5)


def test_a_size_other_than_the_built_one_still_runs():
    # the position table is resized for another token grid (as voxelmorph.py pads any size)
    net = AiRUNet(image_size=28)
    assert net(*pair(40, 36)).shape == (2, 2, 40, 36)


@pytest.mark.parametrize("attention", ["cross", "self+cross", "air"])
def test_gradients_reach_every_attention_parameter(attention):
    net = AiRUNet(attention=attention, scales=[2, 4], flow_init=1e-2)
    fixed, moving = pair(28, 28, batch=4)
    loss = (air_reg.warp(moving, net(fixed, moving)) - fixed).square().mean()
    loss.backward()
    params = dict(net.attend.named_parameters())
    assert params
    dead = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient into {dead}"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "global"}, "attention must be one of"),
        ({"decoder": "transposed"}, "decoder must be one of"),
        ({"scales": [3]}, "scales"),
        ({"scales": [8]}, "scales"),
        ({"decoder": "interpolate", "scales": [2]}, "interpolate decoder"),
        ({"heads": 3}, "divisible by heads"),
        ({"channels": [8, 16], "decoder_channels": [16, 16, 32]}, "same number of levels"),
        ({"integration_steps": -1}, "integration_steps"),
        ({"padding": "wrap"}, "padding"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AiRUNet(**kwargs)


def test_accelerate_keeps_the_flow():
    net = AiRUNet(attention="air", scales=[2, 4]).eval()
    with torch.no_grad():
        net.head.weight.normal_(std=0.1)  # a non-trivial flow to compare
        fixed, moving = pair(28, 28, batch=3)
        before = net(fixed, moving)
        speed.accelerate(net, attention="auto", dropout="fast")
        after = net(fixed, moving)
    assert torch.allclose(before, after, atol=1e-4)


def test_it_builds_on_the_meta_device():
    # load_model first builds a stored config on the meta device when it holds a large int
    with torch.device("meta"):
        net = AiRUNet(image_size=(33, 47), scales=[2, 4])
    assert all(p.is_meta for p in net.parameters())


@pytest.mark.slow
def test_one_epoch_of_training_and_a_load_model_round_trip(tmp_path):
    overrides = [
        "model=air_unet",
        "trainer.max_epochs=1",
        "data.pairs_per_epoch=256",
        "data.num_test_pairs=64",
    ]
    metrics = train(compose_config("train", overrides, tmp_path))
    assert {"train/loss", "val/mse", "test/mse"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    model = air_reg.load_model(ckpt)
    assert isinstance(model.net, AiRUNet)
    assert model.image_size == (28, 28)
    assert model.integration_steps == 5
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = {k[4:]: v for k, v in stored["state_dict"].items() if k.startswith("net.")}
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, state[name]), name
    # the meta-device probe load_model uses for large configs fits these weights
    net_cfg, _ = checkpoint.network_config(stored["air_reg"])
    probe = checkpoint._instantiate(net_cfg, state, ckpt, meta=True)
    checkpoint._check_fit(probe, state, ckpt)
    fixed, moving = pair(28, 28, batch=4)
    with torch.no_grad():
        flow = model(fixed, moving)
    assert flow.shape == (4, 2, 28, 28)
    assert torch.isfinite(flow).all()
