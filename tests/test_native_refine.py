"""Refinement at the images' own size: pyramid, spacing in pixels, affine stage, model-free
registration, the guard (never worse than doing nothing) and one preset for API and CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config

import air_reg
from air_reg import warp
from air_reg.checkpoint import shipped_weights
from air_reg.errors import ConfigError
from air_reg.images import write_image
from air_reg.losses import MSE, MutualInformation
from air_reg.metrics import folding
from air_reg.models.components.spatial_transformer import CoarseToDense, integrate_velocity
from air_reg.refine import (
    LEGACY_DEFAULTS,
    RefineSettings,
    Registrar,
    affine_flow,
    control_grid,
    estimate_affine,
    field_size,
    pyramid,
    refine,
)
from air_reg.register import register
from air_reg.train import train

H, W = 72, 60  # not a multiple of the 28 x 28 models, nor square


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, H, W) smooth textured images in [0, 1] (sums of random blobs)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 9, 8, generator=g)
    images = CoarseToDense(in_size=(9, 8), out_size=(H, W), mode="bicubic")(coarse)
    lo, hi = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
    return (images - lo) / (hi - lo)


def known_pairs(n: int, magnitude: float = 1.5, seed: int = 0):
    """(fixed, moving, flow): moving warped by a smooth diffeomorphism of up to a few px."""
    moving = smooth_images(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    velocity = CoarseToDense(in_size=(4, 4), out_size=(H, W), mode="bspline")(
        torch.randn(n, 2, 4, 4, generator=g) * magnitude
    )
    flow = integrate_velocity(velocity, 7)
    return warp(moving, flow), moving, flow


def epe(flow, target) -> float:
    inside = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # away from the border
    return (flow - target)[inside].norm(dim=1).mean().item()


# -- the optimisation ----------------------------------------------------------------------
def test_pyramid_and_control_grid_sizes():
    assert pyramid((233, 197), 3) == [(58, 49), (116, 98), (233, 197)]
    assert pyramid((28, 28), 3) == [(28, 28)]  # 14 < min_size 16: one level
    assert control_grid((28, 28), None, 4) == (7, 7)  # the former 7 x 7 preset on digits
    assert control_grid((233, 197), None, 8) == (30, 25)
    assert control_grid((28, 28), None, "auto") == (7, 7)  # 4 px
    assert control_grid((233, 197), None, "auto") == (29, 24)  # 24 along the short side
    with pytest.raises(ConfigError, match="not both"):
        control_grid((28, 28), 7, 4)


def test_native_refinement_lowers_the_loss_recovers_the_field_and_does_not_fold():
    fixed, moving, flow = known_pairs(3)
    out = refine(fixed, moving, None, RefineSettings(steps=30))  # the default preset
    assert out.shape == (3, 2, H, W)
    assert MSE()(warp(moving, out), fixed) < 0.2 * MSE()(moving, fixed)
    assert epe(out, flow) < 0.35 * epe(torch.zeros_like(flow), flow)
    assert folding(out).max() == 0


def test_a_coarser_field_grid_recovers_the_field_as_well():
    """field_stride 2: the smooth field on a half-size grid, the images at full size."""
    assert field_size((72, 60), 2) == (36, 30)
    assert field_size((28, 28), 2) == (28, 28)  # 14 < min_size: full size
    fixed, moving, flow = known_pairs(2, seed=4)
    settings = LEGACY_DEFAULTS.replace(steps=30, spacing=6, levels=2, integration_steps=4, lr=0.5)
    full = epe(refine(fixed, moving, None, settings), flow)
    coarse = refine(fixed, moving, None, settings.replace(field_stride=2))
    assert coarse.shape == (2, 2, H, W)
    assert epe(coarse, flow) < 1.2 * full + 0.02


def test_the_auto_stride_keeps_two_field_points_a_control_spacing():
    """field_stride auto: 2 ** k field points per control spacing at least 2; a level too
    small for its stride takes the stride halved (not the full size)."""
    from air_reg.refine.flows import auto_stride

    assert auto_stride((233, 197), None, "auto") == 4  # 8.2 px
    assert auto_stride((160, 208), None, "auto") == 2  # 6.7 px
    assert auto_stride((512, 512), None, "auto") == 8  # 21.3 px
    assert auto_stride((28, 28), None, "auto") == 2  # 4 px
    assert auto_stride((91, 109, 91), None, "auto") == 2  # volumes: unchanged
    assert auto_stride((64, 64), None, 16.0) == 8
    assert auto_stride((64, 64), 4, None) == 8  # 16 px between 4 control points
    assert auto_stride((64, 64), None, None) == 1  # a value per pixel
    assert field_size((58, 49), 4) == (29, 25)  # 15 x 13 < min_size: stride 2
    assert field_size((28, 28), 8) == (28, 28)
    assert RefineSettings(field_stride="auto").stride_for((233, 197)) == 4
    assert RefineSettings().stride_for((233, 197)) == 2  # the default preset keeps 2
    with pytest.raises(ConfigError, match="field_stride"):
        RefineSettings(field_stride="fast")


def test_default_preset_on_digits_is_one_level_on_the_former_grid():
    """On 28 x 28 the native preset (spacing 4, 3 levels, stride 2) is the 7 x 7 grid."""
    g = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(2, 1, 28, 28, generator=g), torch.rand(2, 1, 28, 28, generator=g)
    new = RefineSettings(steps=5, guard=False)
    same = {k: getattr(new, k) for k in ("lr", "lr_decay", "reg_weight")}  # the same objective
    old = RefineSettings.preset("diffeomorphic", steps=5, **same)
    torch.testing.assert_close(refine(fixed, moving, None, new), refine(fixed, moving, None, old))


def test_affine_stage_recovers_a_known_affine_map():
    moving = smooth_images(2, seed=3)
    theta = torch.tensor([[[1.06, 0.05, 2.0], [-0.04, 0.95, -1.5]]]).repeat(2, 1, 1)
    fixed = warp(moving, affine_flow(theta, (H, W)))
    found = estimate_affine(fixed, moving, steps=150, levels=2)
    assert (found[:, :, :2] - theta[:, :, :2]).abs().max() < 0.01
    assert (found[:, :, 2] - theta[:, :, 2]).abs().max() < 0.2  # pixels


def test_the_affine_stage_is_kept_only_where_it_moves_a_pixel_beyond_the_threshold():
    moving = smooth_images(2, seed=3)
    theta = torch.tensor(
        [[[1.06, 0.05, 6.0], [-0.04, 0.95, -5.0]], [[1.0, 0.0, 0.8], [0.0, 1.0, -0.6]]]
    )  # > 5 px: kept; 1 px: not
    fixed = warp(moving, affine_flow(theta, (H, W)))
    settings = RefineSettings(steps=10, affine_steps=30, affine_min_px=0.0, guard=False)
    plain = refine(fixed, moving, None, settings.replace(affine_steps=0))
    always = refine(fixed, moving, None, settings)
    chosen = refine(fixed, moving, None, settings.replace(affine_min_px=5.0))
    torch.testing.assert_close(chosen[:1], always[:1])  # the large motion keeps its affine
    torch.testing.assert_close(chosen[1:], plain[1:])  # the aligned pair runs as without one
    assert not torch.equal(always[1:], plain[1:])
    both_small = refine(moving, moving, None, settings.replace(affine_min_px=5.0))
    assert torch.equal(both_small, refine(moving, moving, None, settings.replace(affine_steps=0)))
    # an image against itself: the stage's gradient is exactly zero, the identity stays
    assert torch.equal(estimate_affine(moving, moving, steps=30),
                       torch.eye(2, 3).expand(2, 2, 3))  # fmt: skip


def test_mutual_information_registers_images_of_inverted_contrast():
    fixed, moving, flow = known_pairs(2, seed=5)
    settings = LEGACY_DEFAULTS.replace(
        steps=40, spacing=12, levels=2, lr=0.5, reg_weight=0.001, similarity="mi"
    )
    out = refine(fixed, 1 - moving, None, settings)
    assert epe(out, flow) < 0.6 * epe(torch.zeros_like(flow), flow)
    mi = MutualInformation()
    assert mi(warp(1 - moving, out), fixed) < mi(1 - moving, fixed)


def test_guard_returns_the_identity_for_images_registered_to_themselves():
    images = smooth_images(2)
    zero = torch.zeros(2, 2, H, W)
    assert torch.equal(refine(images, images, None, RefineSettings(steps=20)), zero)
    # a start worse than doing nothing is not where the optimisation begins
    bad = torch.full((2, 2, H, W), 3.0)
    assert torch.equal(refine(images, images, bad, RefineSettings(steps=5)), zero)


# -- load_model's Registrar and the CLI -------------------------------------------------------
def test_model_free_refiner_needs_steps_and_registers_any_size():
    with pytest.raises(ConfigError, match="refine_steps"):
        air_reg.load_model(None)
    model = air_reg.load_model(None, refine_steps=20)
    assert isinstance(model, Registrar)
    assert model.net is None
    assert model.accepts_any_size
    assert model.image_size is None
    fixed, moving, flow = known_pairs(2)
    out = model(fixed, moving)
    assert epe(out, flow) < 0.5 * epe(torch.zeros_like(flow), flow)


def test_shipped_model_refines_at_the_images_own_size():
    model = air_reg.load_model(shipped_weights("mapt_tuned_mnist"), refine_steps=20)
    assert model.image_size == (28, 28)
    fixed, moving, flow = known_pairs(2)
    out = model(fixed, moving)
    assert out.shape == (2, 2, H, W)  # not the model's 28 x 28
    assert epe(out, flow) < 0.5 * epe(torch.zeros_like(flow), flow)


def _write_pair(folder, fixed, moving):
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "f.png", fixed)
    write_image(folder / "m.png", moving)
    return [f"fixed={folder / 'f.png'}", f"moving={folder / 'm.png'}"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["refine_steps=10"],
        ["weights=mapt_mnist"],
        ["weights=dirnet_fashion", "refine_steps=5"],
        ["weights=none", "refine_steps=10"],
    ],  # fmt: skip
)
def test_register_an_image_to_itself_gives_the_identity(tmp_path, extra):
    image = smooth_images(1, seed=7)[0]
    out = register(compose_config("register", [*_write_pair(tmp_path, image, image), *extra,
                                               "figures=false"], tmp_path))  # fmt: skip
    flow = np.load(tmp_path / "flow.npy")
    assert flow.shape == (2, H, W)
    assert np.abs(flow).mean() <= 0.05
    assert out["pairs"][0]["identity"] == 1


@pytest.mark.slow
def test_api_and_cli_give_the_same_flow_for_the_same_settings(tmp_path):
    fixed, moving, _ = known_pairs(1, seed=9)
    args = _write_pair(tmp_path, fixed[0], moving[0])
    register(compose_config("register", [*args, "weights=mapt_tuned_mnist", "refine_steps=8",
                                         "figures=false"], tmp_path))  # fmt: skip
    cli = torch.from_numpy(np.load(tmp_path / "flow.npy"))
    model = air_reg.load_model(shipped_weights("mapt_tuned_mnist"), refine_steps=8)
    images = [
        air_reg.images.read_image(tmp_path / n) for n in ("f.png", "m.png")
    ]  # 8-bit, as read
    api = model(*images)[0]
    torch.testing.assert_close(api, cli, atol=1e-5, rtol=0)


def test_train_refuses_model_none(tmp_path):
    with pytest.raises(ConfigError, match="nothing to train"):
        train(compose_config("train", ["model=none"], tmp_path))
