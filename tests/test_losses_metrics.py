"""Losses and metrics: minima on identical images, finite gradients, hand-computed values."""

import math

import pytest
import torch

from air_reg import losses, metrics
from air_reg.errors import ConfigError

SIMILARITIES = [losses.MSE(), losses.NCC(), losses.LocalNCC(window=5)]
REGULARIZERS = [
    losses.Diffusion(),
    losses.BendingEnergy(),
    losses.NegativeJacobian(),
    losses.DiffusionFold(),
]


@pytest.mark.parametrize("loss", SIMILARITIES, ids=lambda m: type(m).__name__)
def test_similarity_is_minimal_on_identical_images(loss):
    x = torch.rand(2, 1, 16, 16)
    # LocalNCC's eps (1e-5, against window variances ~0.08^2) keeps it a hair above 0
    assert loss(x, x).item() == pytest.approx(0.0, abs=5e-3)
    assert loss(torch.rand(2, 1, 16, 16), x).item() > 0.05


@pytest.mark.parametrize("loss", SIMILARITIES, ids=lambda m: type(m).__name__)
def test_similarity_gradients_are_finite(loss):
    w = torch.rand(2, 1, 16, 16, requires_grad=True)
    loss(w, torch.rand(2, 1, 16, 16)).backward()
    assert torch.isfinite(w.grad).all()
    assert w.grad.abs().sum() > 0


@pytest.mark.parametrize("reg", REGULARIZERS, ids=lambda m: type(m).__name__)
def test_regularizers_vanish_on_zero_and_constant_flow(reg):
    assert reg(torch.zeros(1, 2, 8, 8)).item() == 0
    assert reg(torch.full((1, 2, 8, 8), 3.0)).item() == 0
    flow = torch.randn(1, 2, 8, 8, requires_grad=True)
    reg(flow).backward()
    assert torch.isfinite(flow.grad).all()


def test_bending_energy_ignores_affine_flow():
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    flow = torch.stack([0.1 * ys + 0.2 * xs, -0.3 * xs])[None]
    assert losses.BendingEnergy()(flow).item() == pytest.approx(0, abs=1e-10)
    assert losses.Diffusion()(flow).item() > 0


def test_metrics_against_hand_computed_values():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert metrics.mse(a, b).item() == pytest.approx(0.25)
    assert metrics.psnr(a, b).item() == pytest.approx(10 * math.log10(4))
    w = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    # (2 * 1 + s) / (1.25 + 1 + s)
    assert metrics.smooth_dice(w, b).item() == pytest.approx((2 + 1e-3) / (2.25 + 1e-3))
    assert metrics.dice(w, b).item() == pytest.approx(1.0)  # 0.5 is not > 0.5
    assert metrics.ncc(b, b).item() == pytest.approx(1.0)
    assert metrics.ncc(b, 1 - b).item() == pytest.approx(-1.0)


def test_folding_and_jacobian():
    zero = torch.zeros(1, 2, 6, 6)
    assert torch.allclose(metrics.jacobian_determinant(zero), torch.ones(1, 6, 6))
    assert metrics.folding(zero).item() == 0
    ys, _ = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    flip = torch.stack([-2 * ys, torch.zeros(6, 6)])[None]  # y -> -y: det = -1 everywhere
    assert metrics.folding(flip).item() == 100
    assert metrics.epe(zero, torch.ones(1, 2, 6, 6)).item() == pytest.approx(math.sqrt(2))


def test_negative_jacobian_penalises_only_folds():
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    penalty = losses.NegativeJacobian(fold_margin=0.05)
    shrink = torch.stack([-0.5 * ys, -0.5 * xs])[None]  # det = 0.25 everywhere: no fold
    assert penalty(shrink).item() == 0
    flip = torch.stack([-2 * ys, torch.zeros(6, 6)])[None]  # det = -1: 0.05 - (-1) per pixel
    assert penalty(flip).item() == pytest.approx(1.05)


def test_diffusion_fold_adds_the_weighted_fold_term_only_where_it_folds():
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    reg = losses.DiffusionFold(fold_weight=3.0, fold_margin=0.05)
    shrink = torch.stack([-0.5 * ys, -0.5 * xs])[None]  # no fold: plain diffusion
    assert reg(shrink).item() == pytest.approx(losses.Diffusion()(shrink).item())
    flip = torch.stack([-2 * ys, torch.zeros(6, 6)])[None]
    expected = losses.Diffusion()(flip).item() + 3.0 * 1.05
    assert reg(flip).item() == pytest.approx(expected)
    with pytest.raises(ConfigError, match="fold_weight"):
        losses.DiffusionFold(fold_weight=-1)


def test_the_diffusion_fold_config_builds_the_module(tmp_path):
    from conftest import compose_config
    from hydra.utils import instantiate

    cfg = compose_config("train", ["model=air_unet", "model/regularizer=diffusion_fold"], tmp_path)
    reg = instantiate(cfg.model.regularizer)
    assert isinstance(reg, losses.DiffusionFold)
    assert reg.fold_weight == 20.0
    assert reg.fold.fold_margin == 0.05


def test_epe_over_a_mask_counts_only_its_pixels():
    flow, target = torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4)
    target[:, 0, :2] = 3.0  # top half off by 3 px, bottom half exact
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2] = True  # pair 0: the top half only; pair 1: no pixel
    assert metrics.epe(flow, target).tolist() == [1.5, 1.5]
    masked = metrics.epe(flow, target, mask)
    assert masked[0].item() == 3.0
    assert masked[1].isnan()
