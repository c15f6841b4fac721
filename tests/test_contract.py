"""The registration-network contract: checked with messages, and a user's own network trains,
evaluates and registers through the entry points (its module and config outside air-reg)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from conftest import compose_config
from torch import nn

import air_reg
from air_reg.checkpoint import CheckpointError
from air_reg.eval import evaluate
from air_reg.images import write_image
from air_reg.models import contract
from air_reg.models.components.air import AiR
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.components.mapt import MAPT
from air_reg.models.registration_module import RegistrationModule
from air_reg.register import register
from air_reg.train import train


class Shapeless(nn.Module):
    def forward(self, fixed, moving):
        return torch.zeros(fixed.shape[0], 2, *fixed.shape[-2:])


class WrongShape(Shapeless):
    image_size = (8, 6)

    def forward(self, fixed, moving):
        return torch.zeros(fixed.shape[0], 2, 4, 4)


class OneInput(Shapeless):
    image_size = 8

    def forward(self, x):
        return x


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (Shapeless(), "has no `image_size`"),
        (WrongShape(), r"must return the flow \(B, 2, H, W\) = \(1, 2, 8, 6\)"),
        (OneInput(), r"forward must take \(fixed, moving\)"),
        (nn.Linear(2, 2), r"forward must take \(fixed, moving\)"),
    ],
)
def test_a_network_that_breaks_the_contract_is_refused_at_construction(net, message):
    with pytest.raises(contract.ContractError, match=message):
        RegistrationModule(net=net, loss=nn.MSELoss(), optimizer=torch.optim.Adam)


@pytest.mark.parametrize("size", [5, (7, 9), [7, 9]])
def test_image_sizes_normalise_to_height_width(size):
    expected = (size, size) if isinstance(size, int) else tuple(size)
    assert contract.as_size(size) == expected
    with pytest.raises(contract.ContractError, match="two positive integers"):
        contract.as_size((0, 3))
    with pytest.raises(contract.ContractError, match="int or"):
        contract.as_size("28")


@pytest.mark.parametrize("make", [AiR, MAPT, DIRNet])
def test_shipped_networks_meet_the_contract(make):
    net = make(image_size=28, integration_steps=3)
    contract.check_network(net)
    assert contract.image_size(net) == (28, 28)
    assert contract.integration_steps(net) == 3


USER_NET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's own network: one conv over the (fixed, moving) pair -> a flow in pixels."""

    def __init__(self, *, image_size: int = 28, width: int = 8):
        super().__init__()
        self.image_size = (image_size, image_size)
        self.body = nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 3, padding=1)
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, fixed, moving):
        return self.body(torch.cat([fixed, moving], dim=1))
'''

USER_CONFIG = """
# model=tinynet: air-reg's training system around the user's network (docs/extending.md)
defaults:
  - _system
  - _self_

net:
  _target_: user_nets_for_test.TinyNet
  image_size: ${data.image_size}
"""


@pytest.mark.slow
def test_a_users_own_network_trains_evaluates_and_registers(tmp_path, monkeypatch):
    (tmp_path / "user_nets_for_test.py").write_text(textwrap.dedent(USER_NET))
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "tinynet.yaml").write_text(USER_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AIR_REG_TRUST", raising=False)
    run = tmp_path / "run"
    overrides = [
        f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
        "model=tinynet",
        "data=synthetic",
        "data.num_images=64",
        "trainer.max_epochs=1",
    ]
    metrics = train(compose_config("train", overrides, run))
    assert torch.isfinite(torch.tensor(metrics["test/mse"]))
    ckpt = run / "checkpoints" / "last.ckpt"

    with pytest.raises(CheckpointError, match="AIR_REG_TRUST=user_nets_for_test"):
        air_reg.load_model(ckpt)
    monkeypatch.setenv("AIR_REG_TRUST", "user_nets_for_test.")
    model = air_reg.load_model(ckpt)
    assert type(model.net).__name__ == "TinyNet"
    assert model.image_size == (28, 28)

    summary = evaluate(
        compose_config("eval", [f"ckpt_path={ckpt}", "num_pairs=8"], tmp_path / "e")
    )
    assert summary["model"]["mse"]["mean"] <= summary["identity"]["mse"]["mean"] + 1e-6

    images = torch.rand(2, 1, 1, 28, 28)
    for name, image in zip(("a.png", "b.png"), images, strict=True):
        write_image(tmp_path / name, image)
    out = register(
        compose_config(
            "register",
            [f"fixed={tmp_path / 'a.png'}", f"moving={tmp_path / 'b.png'}", f"ckpt_path={ckpt}"],
            tmp_path / "r",
        )
    )
    assert out["num_pairs"] == 1
    assert (tmp_path / "r" / "flow.npy").is_file()
    sys.modules.pop("user_nets_for_test", None)
