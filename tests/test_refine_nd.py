"""The refinement's flow algebra on volumes (issue #34): one code path for 2-D and 3-D."""

from __future__ import annotations

import torch

from air_reg.models.components.spatial_transformer import CoarseToDense, integrate_velocity, warp
from air_reg.refine.flows import (
    affine_flow,
    after_affine,
    compose,
    control_grid,
    fit_coarse,
    pyramid,
    velocity_from_flow,
)

SIZE = (10, 12, 14)  # (D, H, W)


def test_pyramid_and_control_grid_in_3d():
    assert pyramid((64, 80, 48), 3, 16) == [(32, 40, 24), (64, 80, 48)]  # 12 < 16: stop
    assert pyramid((64, 64, 64), 3, 16) == [(16, 16, 16), (32, 32, 32), (64, 64, 64)]
    assert control_grid((40, 48, 56), 5, None) == (5, 5, 5)
    assert control_grid((40, 48, 56), None, 8.0) == (5, 6, 7)


def test_a_3d_affine_moves_each_voxel_by_its_matrix_about_the_centre():
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = torch.tensor([[1.1, 0.0, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 0.9]])
    theta[0, :, 3] = torch.tensor([1.0, -2.0, 0.5])
    flow = affine_flow(theta, SIZE)  # (1, 3, D, H, W)
    assert flow.shape == (1, 3, *SIZE)
    p = torch.tensor([3.0, 7.0, 2.0])
    c = torch.tensor([(n - 1) / 2 for n in SIZE])
    expected = (theta[0, :, :3] - torch.eye(3)) @ (p - c) + theta[0, :, 3]
    torch.testing.assert_close(flow[0, :, 3, 7, 2], expected)


def test_after_affine_composes_like_warping_twice_in_3d():
    g = torch.Generator().manual_seed(0)
    theta = torch.cat([torch.eye(3) + 0.03 * torch.randn(3, 3, generator=g),
                       torch.randn(3, 1, generator=g)], 1)[None]  # fmt: skip
    small = 0.5 * torch.randn(1, 3, *SIZE, generator=g)
    closed = after_affine(small, theta)
    torch.testing.assert_close(after_affine(torch.zeros_like(small), theta),
                               affine_flow(theta, SIZE))  # fmt: skip
    # an affine field is linear, so sampling it (trilinear) is exact inside: the same map
    numeric = compose(affine_flow(theta, SIZE), small)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(closed[inner], numeric[inner], atol=1e-4, rtol=0)


def test_fit_coarse_recovers_a_3d_control_grid():
    up = CoarseToDense(in_size=(4, 5, 6), out_size=SIZE, mode="bspline")
    grid = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fit_coarse(up(grid), up), grid, atol=1e-4, rtol=1e-4)


def test_velocity_from_flow_inverts_the_integration_in_3d():
    g = torch.Generator().manual_seed(2)
    velocity = torch.nn.functional.avg_pool3d(torch.randn(2, 3, *SIZE, generator=g), 3, 1, 1)
    flow = integrate_velocity(velocity, 4)
    back = velocity_from_flow(flow, 4)
    assert (integrate_velocity(back, 4) - flow).abs().max() < 1e-3
    assert warp(torch.rand(1, 1, *SIZE), flow[:1]).shape == (1, 1, *SIZE)


def _smooth_volume_pair(size=(24, 28, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.nn.functional.avg_pool3d
    x = pool(torch.rand(1, 1, *size, generator=g), 5, 1, 2)
    x = (x - x.min()) / (x.max() - x.min())
    flow = integrate_velocity(pool(torch.randn(1, 3, *size, generator=g) * 25, 9, 1, 4), 5)
    return warp(x, flow), x, flow  # fixed, moving, the true flow


def test_refine_registers_a_volume_and_never_makes_it_worse():
    from air_reg import metrics
    from air_reg.refine import RefineSettings, refine

    fixed, moving, truth = _smooth_volume_pair()
    flow = refine(fixed, moving, None, RefineSettings(steps=10))
    assert flow.shape == truth.shape
    before = metrics.epe(torch.zeros_like(truth), truth).mean()
    assert metrics.epe(flow, truth).mean() < 0.7 * before
    assert metrics.folding(flow).max() == 0
    same = refine(moving, moving, None, RefineSettings(steps=5))  # to itself: the identity
    assert same.abs().max() < 0.05


def test_the_affine_stage_finds_a_3d_translation():
    from air_reg.refine.optimise import estimate_affine

    fixed, moving, _ = _smooth_volume_pair(seed=1)
    shifted = torch.roll(moving, (2, -1, 1), (2, 3, 4))  # moving(p) = shifted(p + t), t = (2,-1,1)
    theta = estimate_affine(moving, shifted, steps=30, levels=2)
    assert theta.shape == (1, 3, 4)
    torch.testing.assert_close(theta[0, :, 3], torch.tensor([2.0, -1.0, 1.0]), atol=0.4, rtol=0)
