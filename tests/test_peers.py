"""Peers from their own packages: VoxelMorph (``model=voxelmorph``) and ANTs SyN
(``classical.ants_syn``). Each part skips when its package (extra ``peers``) is missing."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest
import torch
from conftest import compose_config

import air_reg
from air_reg import classical, warp
from air_reg.data.synthetic import make_flows
from air_reg.errors import ConfigError
from air_reg.eval import evaluate
from air_reg.images import write_image
from air_reg.models import contract
from air_reg.models.components import voxelmorph as vxm_adapter
from air_reg.register import register
from air_reg.train import train


@pytest.fixture
def vxm():
    return pytest.importorskip("voxelmorph")


@pytest.fixture
def ants():
    return pytest.importorskip("ants")


def texture(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A smooth multi-frequency image in [0, 1], evaluated at any (row, col) points."""
    tau = 2 * torch.pi
    return (
        0.5
        + 0.2 * torch.sin(tau * rows / 17 + 0.3) * torch.cos(tau * cols / 13)
        + 0.15 * torch.sin(tau * (rows + cols) / 23)
        + 0.1 * torch.cos(tau * (cols - 2 * rows) / 29)
    )


def warped_pair(h: int, w: int, magnitude: float = 2.0, seed: int = 0):
    """(fixed, moving, flow) with fixed(p) = moving(p + flow(p)) exactly (no interpolation)."""
    flow = make_flows(1, max(h, w), magnitude, torch.Generator().manual_seed(seed))
    flow = flow[:, :, :h, :w].double()  # (1, 2, H, W)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    moving = texture(rows, cols)
    fixed = texture(rows + flow[0, 0], cols + flow[0, 1])
    return fixed[None, None].float(), moving[None, None].float(), flow.float()


# VoxelMorph ----------------------------------------------------------------------------------


def constant_velocity(net, dy: float, dx: float) -> None:
    """Make the velocity head output (dy, dx) everywhere (its input no longer matters)."""
    head = net.vxm.flow_layer.conv0
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([dy, dx]))


def test_voxelmorph_flow_is_our_convention_on_a_known_shift(vxm):
    net = vxm_adapter.VoxelMorph(image_size=32).eval()
    shift = (1.0, -3.0)  # rows, columns: unequal (swaps show), whole pixels (exact sampling)
    constant_velocity(net, *shift)
    rows, cols = torch.meshgrid(
        torch.arange(32.0), torch.arange(32.0), indexing="ij"
    )  # (32, 32) each
    fixed = texture(rows, cols)[None, None]
    moving = texture(rows - shift[0], cols - shift[1])[None, None]  # moving(p) = fixed(p - s)
    with torch.no_grad():
        flow = net(fixed, moving)  # (1, 2, 32, 32)
        # the package's own warp of its source (= our moving) by its own displacement
        disp, theirs = net.vxm(moving, fixed, return_warped_source=True)
    # away from the border, where integration samples voxelmorph's zero padding
    inside = (..., slice(8, -8), slice(8, -8))
    assert torch.allclose(flow[inside][0, 0], torch.full((16, 16), shift[0]), atol=1e-4)
    assert torch.allclose(flow[inside][0, 1], torch.full((16, 16), shift[1]), atol=1e-4)
    assert torch.allclose(flow, disp)  # 32 = 2**4: no padding, the package's field as it is
    assert torch.allclose(warp(moving, flow)[inside], fixed[inside], atol=1e-3)
    assert torch.allclose(warp(moving, flow)[inside], theirs[inside], atol=1e-4)
    assert not torch.allclose(warp(moving, flow.flip(1))[inside], fixed[inside], atol=1e-2)


def test_voxelmorph_integrates_a_velocity(vxm):
    net = vxm_adapter.VoxelMorph(image_size=32, integration_steps=5).eval()
    torch.nn.init.normal_(net.vxm.flow_layer.conv0.weight, std=0.5)  # a non-constant velocity
    fixed, moving = torch.rand(2, 1, 1, 32, 32)
    with torch.no_grad():
        velocity = net.vxm(moving, fixed, return_field_type="velocity")
        flow = net(fixed, moving)
    expected = air_reg.models.components.spatial_transformer.integrate_velocity(velocity, 5)
    assert net.integration_steps == 5
    assert not torch.allclose(flow, velocity, atol=1e-3)  # it is integrated...
    inside = (..., slice(3, -3), slice(3, -3))  # (their zero padding, our border padding)
    assert torch.allclose(flow[inside], expected[inside], atol=1e-3)  # ...as we would


@pytest.mark.parametrize("size", [(28, 28), (33, 47), (16, 16)])
def test_voxelmorph_shapes_any_size_and_starts_near_identity(vxm, size):
    net = vxm_adapter.VoxelMorph(image_size=size)
    fixed, moving = torch.rand(2, 3, 1, *size)
    flow = net(fixed, moving)
    assert flow.shape == (3, 2, *size)
    assert flow.abs().max() < 1e-2  # the velocity head starts near zero
    flow.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_voxelmorph_meets_the_contract(vxm):
    net = vxm_adapter.VoxelMorph(image_size=(33, 47), integration_steps=7)
    contract.check_network(net)
    assert contract.image_size(net) == (33, 47)
    assert contract.integration_steps(net) == 7
    assert contract.integration_steps(vxm_adapter.VoxelMorph(integration_steps=0)) == 0


def test_voxelmorph_builds_on_the_meta_device_and_follows_moves(vxm):
    with torch.device("meta"):  # as load_model checks a checkpoint's shapes
        net = vxm_adapter.VoxelMorph(image_size=28)
    assert {p.device.type for p in net.parameters()} == {"meta"}
    net = vxm_adapter.VoxelMorph(image_size=28)
    x = torch.rand(1, 1, 28, 28)
    net(x, x)  # caches voxelmorph's identity grid in float32 (on the GPU: its device)
    net.double()
    assert net(x.double(), x.double()).dtype == torch.float64
    # a grid left on another device (as after the contract's CPU dry run, on a GPU) is not used
    stale = torch.empty(2, 32, 32, device="meta")
    net.vxm.velocity_field_integrator.transformer.meshgrid = stale
    assert torch.isfinite(net(x.double(), x.double())).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_voxelmorph_runs_on_cuda_after_a_cpu_dry_run(vxm):
    net = vxm_adapter.VoxelMorph(image_size=28)
    contract.check_network(net)  # the CPU dry run the training system does
    x = torch.rand(2, 1, 28, 28, device="cuda")
    assert net.cuda()(x, x).device.type == "cuda"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nb_features": []}, "nb_features"),
        ({"nb_features": [16, 2.5]}, "nb_features"),
        ({"integration_steps": -1}, "integration_steps"),
        ({"padding": "wrap"}, "padding"),
    ],
)
def test_voxelmorph_bad_settings_are_config_errors(vxm, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        vxm_adapter.VoxelMorph(**kwargs)


def test_voxelmorph_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "voxelmorph", None)  # `import voxelmorph` fails
    assert not vxm_adapter.has_voxelmorph()
    with pytest.raises(ImportError, match=r"pip install air-reg\[peers\]"):
        vxm_adapter.VoxelMorph()


@pytest.mark.slow
def test_voxelmorph_trains_evaluates_registers_and_reloads(vxm, tmp_path):
    run = tmp_path / "run"
    overrides = [
        "model=voxelmorph",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "data.pairs_per_epoch=128",
        "data.num_val_pairs=32",
        "data.num_test_pairs=32",
    ]
    metrics = train(compose_config("train", overrides, run))
    assert torch.isfinite(torch.tensor(metrics["test/mse"]))
    ckpt = run / "checkpoints" / "last.ckpt"

    model = air_reg.load_model(ckpt)
    assert type(model.net) is vxm_adapter.VoxelMorph
    assert model.image_size == (28, 28)
    assert model.integration_steps == 5
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, state[f"net.{k}"]) for k, v in model.net.state_dict().items())
    fixed, moving = torch.rand(2, 4, 1, 28, 28)
    with torch.no_grad():
        assert model(fixed, moving).shape == (4, 2, 28, 28)

    summary = evaluate(compose_config("eval", [f"ckpt_path={ckpt}", "num_pairs=16"], tmp_path))
    assert summary["model"]["mse"]["mean"] <= summary["identity"]["mse"]["mean"] + 1e-4
    for name, image in zip(("a.png", "b.png"), (fixed[:1], moving[:1]), strict=True):
        write_image(tmp_path / name, image)
    pair = [f"fixed={tmp_path / 'a.png'}", f"moving={tmp_path / 'b.png'}", f"ckpt_path={ckpt}"]
    assert register(compose_config("register", pair, tmp_path / "r"))["num_pairs"] == 1


# ANTs SyN ------------------------------------------------------------------------------------


def test_ants_transforms_convert_to_our_warp_convention(ants, tmp_path):
    """Our flow, through our warp, resamples as ANTs itself does: an affine transform whose
    rows and columns move differently, with points mapped outside the image."""
    h, w = 20, 27
    moving = torch.rand(1, 1, h, w)
    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=2,
        matrix=np.array([[1.05, 0.1], [-0.05, 0.95]]),
        translation=(1.5, -3.25),
    )
    path = str(tmp_path / "affine.mat")
    ants.write_transform(tx, path)
    fix_img = ants.from_numpy(np.zeros((h, w), np.float32))
    mov_img = ants.from_numpy(moving[0, 0].numpy())
    flow = classical.transforms_to_flow(ants, fix_img, [path])[None]  # (1, 2, H, W)
    reference = ants.apply_transforms(fix_img, mov_img, [path], interpolator="linear").numpy()
    target = flow + air_reg.models.components.spatial_transformer.identity_grid((h, w))
    inside = ((target[:, 0] >= 0) & (target[:, 0] <= h - 1)) & (
        (target[:, 1] >= 0) & (target[:, 1] <= w - 1)
    )
    assert (~inside).any()  # points mapped outside the image occur...
    assert inside.float().mean() > 0.5  # ...and inside
    ours = warp(moving, flow, padding_mode="zeros")[:, 0]
    assert torch.allclose(ours[inside], torch.from_numpy(reference)[None][inside], atol=1e-4)
    assert flow.abs().max() > 2  # a real map...
    assert flow.flatten(2).std(2).min() > 0.1  # ...that varies in both channels
    # outside the image too, p + flow(p) is the affine map: its second differences vanish
    assert target.diff(n=2, dim=-1).abs().max() < 1e-4
    assert target.diff(n=2, dim=-2).abs().max() < 1e-4


def test_ants_syn_recovers_a_known_smooth_deformation(ants):
    fixed, moving, true = warped_pair(64, 64, magnitude=2.0)
    assert true.norm(dim=1).mean() > 1.0  # a real deformation
    flow = classical.ants_syn(fixed, moving)
    epe = (flow - true).norm(dim=1)[0]  # (H, W)
    assert epe.mean() < 0.5
    assert epe[6:-6, 6:-6].mean() < 0.25  # inside, where moving holds what fixed shows
    assert ((warp(moving, flow) - fixed) ** 2).mean() < 0.1 * ((moving - fixed) ** 2).mean()


def test_ants_syn_identity_and_shapes(ants):
    fixed, moving, _ = warped_pair(20, 24, magnitude=1.0)
    images = torch.cat([fixed, moving]).double()  # (2, 1, 20, 24): two pairs of one image
    flow = classical.ants_syn(images, images)
    assert flow.shape == (2, 2, 20, 24)
    assert flow.dtype == torch.float64
    assert flow.abs().mean() < 0.05


@pytest.mark.parametrize(
    "shapes",
    [
        ((1, 28, 28), (1, 28, 28)),
        ((1, 2, 28, 28), (1, 2, 28, 28)),
        ((1, 1, 28, 28), (1, 1, 28, 27)),
    ],
)
def test_ants_syn_refuses_bad_shapes_with_the_fix(shapes):
    fixed, moving = (torch.rand(*s) for s in shapes)
    with pytest.raises(ConfigError, match=r"\(B, 1, H, W\).*image\[None, None\]"):
        classical.ants_syn(fixed, moving)


def test_ants_syn_refuses_unknown_settings(ants):
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ConfigError, match="reg_iteration"):
        classical.ants_syn(x, x, reg_iteration=(10,))  # a typo antspyx would swallow


def test_ants_syn_sets_itk_threads_once(ants, monkeypatch, caplog):
    monkeypatch.setattr(classical, "_ITK_THREADS", {"value": None})
    monkeypatch.delenv(classical.THREADS_ENV, raising=False)
    classical._set_threads(None)  # default: the cores this process may use
    assert os.environ[classical.THREADS_ENV] == str(classical._available_cores())
    with caplog.at_level(logging.WARNING, logger="air_reg.classical"):
        classical._set_threads(int(os.environ[classical.THREADS_ENV]) + 1)
    assert "new process" in caplog.text  # ITK read it already: said, not silently ignored
    monkeypatch.setattr(classical, "_ITK_THREADS", {"value": None})
    classical._set_threads(1)
    assert os.environ[classical.THREADS_ENV] == "1"
    with pytest.raises(ConfigError, match="num_threads"):
        classical._set_threads(0)


def test_ants_syn_leaves_no_transform_files(ants, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    x = torch.rand(2, 1, 16, 16)
    classical.ants_syn(x, x.flip(-1), reg_iterations=(5, 5))
    assert list(tmp_path.iterdir()) == []


def test_ants_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)
    assert not classical.has_ants()
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ImportError, match=r"pip install air-reg\[peers\]"):
        classical.ants_syn(x, x)
