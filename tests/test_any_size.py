"""Non-square images: every network takes ``image_size`` as an int (square) or (H, W)."""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import air_reg
from air_reg import losses
from air_reg.models import contract
from air_reg.models.components.air import AiR, AiRBranch
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.components.mapt import MAPT
from air_reg.models.registration_module import RegistrationModule

# (name, factory of (image_size) -> net, a non-square size it takes); tall and wide both
NETS = [
    ("AiR", lambda s: AiR(image_size=s, patch_size=4), (24, 36)),
    ("AiR-tall", lambda s: AiR(image_size=s, patch_size=2, stem_channels=4), (18, 10)),
    ("MAPT", lambda s: MAPT(image_size=s, patch_sizes=[2, 4, 6]), (24, 36)),
    ("DIRNet", lambda s: DIRNet(image_size=s, channels=8, num_pools=2), (20, 28)),
]
IDS = [name for name, _, _ in NETS]


@pytest.mark.parametrize(("name", "make", "size"), NETS, ids=IDS)
def test_non_square_nets_give_a_flow_of_the_image_size_near_identity(name, make, size):
    net = make(list(size)).eval()
    assert net.image_size == size
    contract.check_network(net)
    flow = net(torch.rand(3, 1, *size), torch.rand(3, 1, *size))
    assert flow.shape == (3, 2, *size)
    assert flow.abs().max() < 0.05, f"{name} does not start near the identity"


@pytest.mark.parametrize(("name", "make", "size"), NETS, ids=IDS)
def test_non_square_nets_train_one_step(name, make, size):
    net = make(size).train()
    fixed, moving = torch.rand(4, 1, *size), torch.rand(4, 1, *size)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = (air_reg.warp(moving, net(fixed, moving)) - fixed).square().mean()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert torch.isfinite(loss)
    assert grads
    assert all(torch.isfinite(g).all() for g in grads)
    opt.step()
    assert torch.isfinite(net(fixed, moving)).all()


def constant_head(net: nn.Module, dy: float, dx: float) -> nn.Module:
    """Zero every head's weight and put (dy, dx) in its bias: a constant flow (dy, dx)."""
    heads = [m.head for m in net.modules() if isinstance(getattr(m, "head", None), nn.Module)]
    with torch.no_grad():
        for head in heads:
            head.weight.zero_()
            head.bias.copy_(torch.tensor([dy, dx]))
    return net


@pytest.mark.parametrize(("name", "make", "size"), NETS, ids=IDS)
@pytest.mark.parametrize(("dy", "dx"), [(2, 0), (0, -3)])
def test_known_shift_through_a_non_square_net_moves_rows_then_columns(name, make, size, dy, dx):
    """warped(p) = moving(p + flow(p)), channel 0 rows: a net that outputs the constant
    (dy, dx) shifts the image dy rows and dx columns (compared away from the borders and,
    for DIRNet, from the control points whose B-splines miss neighbours outside the image)."""
    h, w = size
    net = constant_head(make(size), dy, dx).eval()
    moving = torch.rand(1, 1, h, w)
    with torch.no_grad():
        flow = net(torch.rand(1, 1, h, w), moving)
    m = 6 if name == "DIRNet" else 3  # margin
    inner = flow[..., m : h - m, m : w - m]
    assert torch.allclose(inner[:, 0], torch.full_like(inner[:, 0], dy), atol=1e-4)
    assert torch.allclose(inner[:, 1], torch.full_like(inner[:, 1], dx), atol=1e-4)
    warped = air_reg.warp(moving, flow)
    expected = moving[..., m + dy : h - m + dy, m + dx : w - m + dx]
    assert torch.allclose(warped[..., m : h - m, m : w - m], expected, atol=1e-4)


def test_token_grid_keeps_rows_and_columns_on_a_wide_image():
    """Patchify then unpatchify lays token (i, j) back at grid cell (i, j), not transposed."""
    branch = AiRBranch(image_size=(8, 12), patch_size=2)
    assert branch.grid == (4, 6)
    assert branch.pos.shape == (1, 24, 16)
    x = torch.arange(96.0).reshape(1, 1, 8, 12)
    tokens = branch.embed[0](x)  # (1, 24, 4): the patches, before the linear embedding
    grid = branch.to_grid(tokens)  # (1, 4, 4, 6)
    assert torch.equal(grid[0, 0], x[0, 0, ::2, ::2])  # first pixel of each patch


def test_mapt_fuses_every_branch_on_the_finest_non_square_grid():
    net = MAPT(image_size=(24, 36), patch_sizes=[2, 4, 6])
    assert [b.grid for b in net.branches] == [(12, 18), (6, 9), (4, 6)]
    assert all(up.out_size == (12, 18) for up in net.resample)
    assert net.field.upsample.in_size == (12, 18)
    assert DIRNet(image_size=(20, 28), num_pools=2).field.upsample.in_size == (5, 7)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: AiR(image_size=(30, 28), patch_size=4), r"4\] do not divide image size 30x28"),
        (lambda: AiR(image_size=(30, 28), patch_size=4), r"for 30x28 are \[1, 2\] \(set model"),
        (lambda: MAPT(image_size=(24, 36), patch_sizes=[2, 8]), r"\[1, 2, 3, 4, 6, 12\]"),
        (lambda: DIRNet(image_size=(20, 28), num_pools=3), r"spacings for 20x28 are \[1, 2, 4\]"),
        (lambda: AiR(image_size=(28, 7), patch_size=2), "pad the images"),
    ],
)
def test_a_patch_size_that_misses_one_side_names_the_valid_ones(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("size", [(28, 0), (28, 28, 1, 1), "28", 28.5])
def test_malformed_image_sizes_are_rejected(size):
    with pytest.raises(contract.ContractError, match="image size"):
        AiR(image_size=size)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: AiR(image_size=s, patch_size=4, stem_channels=4),
        lambda s: MAPT(image_size=s, patch_sizes=[2, 4, 7]),
        lambda s: DIRNet(image_size=s, channels=8),
    ],
    ids=["AiR", "MAPT", "DIRNet"],
)
def test_int_and_pair_give_the_same_square_net(make):
    nets = []
    for size in (28, [28, 28], (28, 28), OmegaConf.create([28, 28])):  # Hydra: a ListConfig
        torch.manual_seed(0)
        nets.append(make(size))
    ref = nets[0].state_dict()
    for net in nets[1:]:
        assert net.image_size == (28, 28)
        sd = net.state_dict()
        assert list(sd) == list(ref)
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_a_non_square_model_goes_through_the_lightning_system():
    module = RegistrationModule(
        net=AiR(image_size=(24, 36), patch_size=4),
        loss=losses.MSE(),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )
    assert module.image_size == (24, 36)
    fixed, moving = torch.rand(2, 1, 24, 36), torch.rand(2, 1, 24, 36)
    flow = module(fixed, moving)
    assert flow.shape == (2, 2, 24, 36)
    out = module.objective(fixed, moving, flow)
    assert out["warped"].shape == (2, 1, 24, 36)
    assert torch.isfinite(out["loss"])


@pytest.mark.slow
def test_a_non_square_model_fits_and_validates_with_lightning(tmp_path):
    import lightning as L

    pairs = [{"fixed": torch.rand(1, 20, 28), "moving": torch.rand(1, 20, 28)} for _ in range(4)]
    loader = torch.utils.data.DataLoader(pairs, batch_size=2)
    module = RegistrationModule(
        net=MAPT(image_size=(20, 28), patch_sizes=[2, 4]),
        loss=losses.MSE(),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )
    trainer = L.Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, loader)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
