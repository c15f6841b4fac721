"""MutualInformation's value path without autograd (``histogram``) against its autograd path,
and the guard that uses it."""

import logging

import pytest
import torch

from air_reg.losses import MSE, MutualInformation, NormalisedGradientFields
from air_reg.models.components.spatial_transformer import warp
from air_reg.refine import keep_if_better, per_pair
from air_reg.refine.optimise import GUARD_TOL, MI_GUARD_TOL, similarity_module

SHAPES = [(3, 1, 30, 40), (2, 1, 10, 12, 14)]


def _images(shape, seed=0):
    """A fixed image with ties (10 levels) and a moving one related to it; pair 0 of the moving
    rounded (ties at its min and max), the last pair of 3 constant."""
    g = torch.Generator().manual_seed(seed)
    fixed = (torch.rand(shape, generator=g) * 10).round()
    moving = torch.rand(shape, generator=g) + 0.3 * fixed
    moving[0] = moving[0].round()
    if shape[0] > 2:
        moving[2] = 0.5
    return moving, fixed


def _autograd(mi, moving, fixed):
    return mi.mutual_information(moving.clone().requires_grad_(True), fixed).detach()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bins", [5, 16, 32, 64])
@pytest.mark.parametrize("normalised", [True, False])
@pytest.mark.parametrize("fixed_window", ["box", "bspline"])
@pytest.mark.parametrize("sampling", [1.0, 0.3])
def test_values_match_the_autograd_path(shape, bins, normalised, fixed_window, sampling):
    mi = MutualInformation(bins, normalised=normalised, fixed_window=fixed_window,
                           sampling=sampling)  # fmt: skip
    moving, fixed = _images(shape)
    expected = _autograd(mi, moving, fixed)
    with torch.no_grad():
        value = mi.mutual_information(moving, fixed)
    assert value.dtype == expected.dtype
    assert value.shape == (shape[0],)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mi.mutual_information(moving, fixed), value)  # no grad needed
    assert mi(moving, fixed).item() == pytest.approx(-expected.mean().item(), abs=1e-5)


@pytest.mark.parametrize("fixed_window", ["box", "bspline"])
def test_histogram_is_a_distribution_and_constant_images_have_no_information(fixed_window):
    moving, fixed = _images((3, 1, 20, 20))
    mi = MutualInformation(16, normalised=False, fixed_window=fixed_window)
    joint = mi.histogram(moving, fixed)
    assert joint.shape == (3, 16, 16)
    assert joint.dtype == torch.float64
    torch.testing.assert_close(joint.sum((1, 2)), torch.ones(3, dtype=torch.float64))
    assert (joint >= 0).all()
    constant = mi.mutual_information(moving[2:], fixed[2:])  # moving[2] is constant
    assert constant.abs().item() < 1e-6
    both = mi.mutual_information(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8))
    assert both.abs().item() < 1e-6


def test_a_non_finite_image_gives_nan_for_its_pair_only():
    moving, fixed = _images((3, 1, 20, 20))
    moving[1, 0, 3, 4] = float("nan")
    value = MutualInformation().mutual_information(moving, fixed)
    assert value[1].isnan()
    assert not value[[0, 2]].isnan().any()


def test_gradient_path_unchanged_when_grad_is_needed():
    moving, fixed = _images((2, 1, 16, 16))
    moving.requires_grad_(True)
    loss = MutualInformation()(moving, fixed)
    loss.backward()
    assert moving.grad is not None
    assert moving.grad.abs().sum() > 0


@pytest.mark.parametrize("similarity", [MutualInformation(), MutualInformation(normalised=False),
                                        MutualInformation(16), MSE(),
                                        NormalisedGradientFields()])  # fmt: skip
def test_per_pair_is_each_pair_alone(similarity):
    moving, fixed = _images((3, 1, 24, 24))
    alone = torch.stack([similarity(moving[i : i + 1], fixed[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(per_pair(similarity, moving, fixed), alone, rtol=1e-5, atol=1e-6)


def _shift_flow(b, size, shift):
    flow = torch.zeros(b, 2, *size)
    flow[:, 1] = shift
    return flow


@pytest.mark.parametrize("similarity", ["mi", MutualInformation(16), "mse", "ncc"])
def test_guard_decisions_match_per_pair_values(similarity, caplog):
    """keep_if_better (shared histograms for MI) decides and warns as the per-pair values say."""
    g = torch.Generator().manual_seed(1)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 40, 40, generator=g), 5, 1, 2)
    moving = base.repeat(4, 1, 1, 1)
    fixed = warp(moving, _shift_flow(4, (40, 40), 2.0))  # fixed(p) = moving(p + 2 columns)
    flow = _shift_flow(4, (40, 40), 0.0)
    flow[0, 1], flow[1, 1], flow[2, 1] = 2.0, -3.0, 1.5  # right, wrong, partly; pair 3 zero
    sim = similarity_module(similarity)
    warped = warp(moving, flow)
    after, before = per_pair(sim, warped, fixed), per_pair(sim, moving, fixed)
    mi = MutualInformation(normalised=False)
    lost = mi.mutual_information(warped, fixed) < mi.mutual_information(moving, fixed) - (
        MI_GUARD_TOL
    )
    by_similarity = (after > before - GUARD_TOL) | after.isnan()
    with caplog.at_level(logging.WARNING):
        kept, worse = keep_if_better(flow, fixed, moving, similarity)
    assert worse.tolist() == (by_similarity | lost).tolist()
    assert ("guard:" in caplog.text) == bool((lost & ~by_similarity).any())
    assert worse.tolist()[:2] == [False, True]
    torch.testing.assert_close(kept[~worse], flow[~worse])
    assert (kept[worse] == 0).all()
