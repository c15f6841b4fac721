"""The N-D core (#34): warp, integration, similarities, regularisers and metrics on volumes
(B, C, D, H, W) with flows (B, 3, D, H, W), in the same code path as images."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from air_reg import losses, metrics
from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import (
    CoarseToDense,
    FlowField,
    crop,
    identity_grid,
    integrate_velocity,
    pad_to_multiple,
    resize_flow,
    warp,
)

SIZE = (12, 14, 10)  # (D, H, W)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(34)


def affine_flow(a: torch.Tensor, t=(0.0, 0.0, 0.0), size=SIZE) -> torch.Tensor:
    """(1, 3, *size) displacement of p -> a p + t, i.e. (a - I) p + t."""
    p = identity_grid(size, dtype=torch.float64)  # (3, *size)
    disp = torch.einsum("ij,j...->i...", a.double() - torch.eye(3, dtype=torch.float64), p)
    return (disp + torch.tensor(t, dtype=torch.float64).view(3, 1, 1, 1))[None]


def test_identity_grid_3d():
    grid = identity_grid((2, 3, 4))
    assert grid.shape == (3, 2, 3, 4)
    assert grid[:, 1, 2, 3].tolist() == [1, 2, 3]


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 0), (0, 0, 3), (1, -2, 3)])
def test_warp_integer_shift_is_a_roll(shift, gen):
    moving = torch.rand(2, 2, *SIZE, generator=gen)
    flow = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(2, 3, *SIZE)
    warped = warp(moving, flow)
    rolled = moving.roll([-s for s in shift], dims=(2, 3, 4))  # warped(p) = moving(p + s)
    inside = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, SIZE, strict=True))
    assert torch.allclose(warped[(..., *inside)], rolled[(..., *inside)], atol=1e-5)
    nearest = warp(moving, flow, mode="nearest")
    assert torch.equal(nearest[(..., *inside)], rolled[(..., *inside)])


def test_warp_zero_flow_is_the_image(gen):
    moving = torch.rand(1, 3, *SIZE, generator=gen)
    flow = torch.zeros(1, 3, *SIZE)
    assert torch.allclose(warp(moving, flow), moving, atol=1e-6)
    assert torch.equal(warp(moving, flow, mode="nearest"), moving)


def test_warp_3d_matches_2d_slice_by_slice(gen):
    """A flow with no depth component, constant along depth, warps each slice as in 2-D."""
    moving = torch.rand(1, 1, *SIZE, generator=gen)
    flow2 = torch.randn(1, 2, *SIZE[1:], generator=gen) * 2
    flow3 = torch.cat([torch.zeros(1, 1, *SIZE), flow2[:, :, None].expand(1, 2, *SIZE)], 1)
    warped = warp(moving, flow3)
    for z in (0, 5, SIZE[0] - 1):
        assert torch.allclose(warped[:, :, z], warp(moving[:, :, z], flow2), atol=1e-5)


def test_integrate_zero_and_constant_velocity():
    zero = torch.zeros(1, 3, *SIZE)
    assert torch.equal(integrate_velocity(zero, 7), zero)
    v = torch.tensor([0.5, -1.25, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, *SIZE).contiguous()
    assert torch.allclose(integrate_velocity(v, 6), v, atol=1e-5)  # exp of a translation


def test_jacobian_of_affine_map_is_its_determinant():
    a = torch.tensor([[1.1, 0.2, 0.0], [0.1, 0.9, -0.3], [0.05, 0.2, 1.2]])
    flow = affine_flow(a, t=(0.5, -1.0, 2.0))
    jac = metrics.jacobian_determinant(flow)
    assert jac.shape == (1, *SIZE)
    assert torch.allclose(jac, torch.linalg.det(a.double()).expand_as(jac), atol=1e-9)
    assert metrics.folding(flow).item() == 0
    assert metrics.sd_log_jacobian(flow).item() == pytest.approx(0, abs=1e-9)


def test_jacobian_3d_matches_2d_for_an_in_plane_flow(gen):
    flow2 = torch.randn(2, 2, *SIZE[1:], generator=gen)
    flow3 = torch.cat([torch.zeros(2, 1, *SIZE), flow2[:, :, None].expand(2, 2, *SIZE)], 1)
    expected = metrics.jacobian_determinant(flow2)[:, None].expand(2, *SIZE)
    assert torch.allclose(metrics.jacobian_determinant(flow3), expected, atol=1e-5)


def test_folding_of_a_folding_field():
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0]))  # det -1 everywhere
    assert metrics.folding(affine_flow(mirror)).tolist() == [100.0]
    flow = torch.zeros(1, 3, *SIZE)
    flow[:, 2, :, :, 4:6] = torch.tensor([0.0, -3.0])  # column 5 jumps behind column 4
    fold = metrics.folding(flow).item()
    assert 0 < fold < 100
    assert losses.NegativeJacobian()(flow) > 0


def test_similarities_by_hand(gen):
    a, b = torch.rand(2, 1, *SIZE, generator=gen), torch.rand(2, 1, *SIZE, generator=gen)
    assert losses.MSE()(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    dims = (1, 2, 3, 4)
    ac, bc = a - a.mean(dims, keepdim=True), b - b.mean(dims, keepdim=True)
    cc = (ac * bc).sum(dims) / (ac.square().sum(dims) * bc.square().sum(dims)).sqrt()
    assert losses.NCC()(a, b).item() == pytest.approx((1 - cc).mean().item(), rel=1e-5)
    assert losses.NCC()(a, 3 * a + 1).item() == pytest.approx(0, abs=1e-5)
    assert losses.LocalNCC(window=3)(a, 2 * a - 0.5).item() == pytest.approx(0, abs=1e-3)


def test_local_ncc_3d_by_hand(gen):
    """Windowed means over the voxels inside the image (count_include_pad=False), by loops."""
    size = (4, 5, 3)
    a, b = torch.rand(1, 1, *size, generator=gen), torch.rand(1, 1, *size, generator=gen)
    x, y = a[0, 0].double(), b[0, 0].double()
    total = 0.0
    for p in itertools.product(*(range(n) for n in size)):
        box = tuple(slice(max(0, q - 1), q + 2) for q in p)
        u, v = x[box].flatten(), y[box].flatten()
        cross = (u * v).mean() - u.mean() * v.mean()
        var_u, var_v = (u * u).mean() - u.mean() ** 2, (v * v).mean() - v.mean() ** 2
        total += 1 - (cross**2 / (var_u * var_v + 1e-5)).item()
    value = losses.LocalNCC(window=3)(a, b).item()
    assert value == pytest.approx(total / math.prod(size), rel=1e-4)


def test_mutual_information_3d_invariances(gen):
    x = torch.rand(2, 1, *SIZE, generator=gen)
    x = F.avg_pool3d(x, 3, stride=1, padding=1)  # smooth: a spread, non-uniform histogram
    y = torch.rand(2, 1, *SIZE, generator=gen)
    for mi in (losses.MutualInformation(), losses.MutualInformation(normalised=False)):
        with_itself = mi.mutual_information(x, x)
        inverted = mi.mutual_information(1 - x, x)
        assert torch.allclose(inverted, with_itself, rtol=0.02)
        assert (mi.mutual_information(y, x) < with_itself * 0.9).all()
        # MI sees the voxels, not the layout: the volume as a (D H, W) image gives the same
        flat = mi.mutual_information(x.reshape(2, 1, -1, SIZE[2]), y.reshape(2, 1, -1, SIZE[2]))
        assert torch.equal(mi.mutual_information(x, y), flat)


def test_diffusion_and_bending_on_a_linear_field():
    g = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1], [0.25, 0.05, 0.2]])  # d flow_i / d p_j
    flow = affine_flow(torch.eye(3) + g).float()
    expected = sum(g[:, j].square().mean().item() for j in range(3))  # per axis: mean over i
    assert losses.Diffusion()(flow).item() == pytest.approx(expected, rel=1e-5)
    s = torch.tensor([0.5, 1.0, 2.0])
    weighted = sum(((g[:, j] * s / s[j]) ** 2).mean().item() for j in range(3))
    assert losses.Diffusion(spacing=(0.5, 1.0, 2.0))(flow).item() == pytest.approx(
        weighted, rel=1e-5
    )
    assert losses.Diffusion(spacing=(2.0, 2.0, 2.0))(flow).item() == pytest.approx(
        expected, rel=1e-5
    )
    assert losses.BendingEnergy()(flow).item() == pytest.approx(0, abs=1e-8)


def test_bending_on_a_quadratic_field():
    p = identity_grid(SIZE, dtype=torch.float64)
    flow = torch.zeros(1, 3, *SIZE, dtype=torch.float64)
    flow[0, 0] = 0.5 * p[1] ** 2  # second difference along H: 1 (component 0 of 3)
    flow[0, 2] = p[0] * p[2]  # mixed D-W difference: 1 (component 2), counted twice
    # each term is a mean over the 3 components: 1/3 (pure) + 2 x 1/3 (mixed)
    assert losses.BendingEnergy()(flow).item() == pytest.approx(1 / 3 + 2 * (1 / 3))


def test_negative_jacobian_and_fold_term_3d():
    a = torch.diag(torch.tensor([0.5, 0.4, 0.1]))  # det 0.02 < margin 0.05
    flow = affine_flow(a).float()
    assert losses.NegativeJacobian(0.05)(flow).item() == pytest.approx(0.03, abs=1e-6)
    fold = losses.DiffusionFold(fold_weight=10.0)(flow)
    assert fold.item() == pytest.approx(losses.Diffusion()(flow).item() + 0.3, rel=1e-5)


def _cube(corner, side=4, size=SIZE) -> torch.Tensor:
    labels = torch.zeros(1, 1, *size)
    labels[(0, 0, *(slice(c, c + side) for c in corner))] = 1
    return labels


def test_label_dice_on_cubes():
    fixed = _cube((2, 3, 2))
    shifted = _cube((3, 3, 2))  # overlap 3 x 4 x 4 = 48 of 64 each
    dsc = metrics.label_dice(fixed, shifted)
    assert dsc.shape == (1, 1)
    assert dsc.item() == pytest.approx(2 * 48 / 128)
    assert metrics.label_dice(fixed, fixed).item() == 1


def test_label_hd95_on_cubes():
    fixed = _cube((2, 3, 2), side=5)
    assert metrics.label_hd95(fixed, fixed).item() == 0
    for shift in ((2, 0, 0), (0, 0, 3)):
        moved = _cube(tuple(c + s for c, s in zip((2, 3, 2), shift, strict=True)), side=5)
        hd100 = metrics.label_hd95(fixed, moved, percent=100).item()
        assert hd100 == pytest.approx(max(shift))  # the face moved by the shift
        assert 0 < metrics.label_hd95(fixed, moved).item() <= hd100
    lost = metrics.label_hd95(fixed, torch.zeros_like(fixed), fixed).item()
    assert lost == pytest.approx(math.sqrt(sum((n - 1) ** 2 for n in SIZE)))


def test_label_hd95_matches_brute_force(gen):
    from scipy import ndimage

    f = (torch.rand(1, 1, 8, 9, 7, generator=gen) > 0.6).float()
    w = (torch.rand(1, 1, 8, 9, 7, generator=gen) > 0.6).float()
    a, b = f[0, 0].bool().numpy(), w[0, 0].bool().numpy()
    ba, bb = (m & ~ndimage.binary_erosion(m, border_value=0) for m in (a, b))
    pa, pb = np.argwhere(ba), np.argwhere(bb)
    dist = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))  # (boundary a, boundary b)
    directed = [np.percentile(dist.min(1), 95, method="inverted_cdf"),
                np.percentile(dist.min(0), 95, method="inverted_cdf")]  # fmt: skip
    assert metrics.label_hd95(f, w).item() == pytest.approx(max(directed), rel=1e-6)


def test_pair_metrics_3d(gen):
    fixed = torch.rand(2, 1, *SIZE, generator=gen)
    flow = torch.randn(2, 3, *SIZE, generator=gen) * 0.3
    labels = _cube((2, 3, 2)).expand(2, 1, *SIZE)
    out = metrics.pair_metrics(
        fixed, warp(fixed, flow), flow, flow, True, fixed_labels=labels, moving_labels=labels
    )
    assert out["epe"].tolist() == [0, 0]
    assert out["folding"].shape == out["hd95"].shape == out["ssim"].shape == (2,)
    assert all(v.isfinite().all() for v in out.values())


def test_resize_flow_3d(gen):
    const = torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1, 1).expand(1, 3, 6, 7, 5)
    up = resize_flow(const, (12, 14, 20))
    assert torch.allclose(up, torch.tensor([2.0, -4.0, 12.0]).view(1, 3, 1, 1, 1).expand_as(up))
    flow = torch.randn(1, 3, 6, 7, 5, generator=gen)
    trilinear = F.interpolate(flow, size=SIZE, mode="trilinear", align_corners=False)
    scale = torch.tensor([2.0, 2.0, 2.0]).view(1, 3, 1, 1, 1)
    assert torch.allclose(resize_flow(flow, SIZE), trilinear * scale)
    # shrinking is antialiased separably: an in-plane field shrinks as each 2-D slice does
    plane = torch.randn(1, 2, 1, 14, 10, generator=gen).expand(1, 2, 4, 14, 10)
    down = resize_flow(torch.cat([torch.zeros(1, 1, 4, 14, 10), plane], 1), (4, 7, 5))
    assert torch.allclose(down[:, 1:, 2], resize_flow(plane[:, :, 0], (7, 5)), atol=1e-6)
    assert torch.equal(down[:, 0], torch.zeros(1, 4, 7, 5))


def test_coarse_to_dense_and_flow_field_3d(gen):
    coarse = torch.randn(2, 3, 3, 7, 5, generator=gen)
    dense = CoarseToDense(in_size=(3, 7, 5), out_size=SIZE, mode="bilinear")(coarse)
    trilinear = F.interpolate(coarse, size=SIZE, mode="trilinear", align_corners=False)
    assert torch.allclose(dense, trilinear, atol=1e-5)
    field = FlowField(coarse_size=(3, 7, 5), image_size=SIZE, integration_steps=4)
    assert field(coarse * 0.1).shape == (2, 3, *SIZE)
    with pytest.raises(ConfigError, match="2 or 3 sides"):
        CoarseToDense(in_size=(3, 7), out_size=SIZE)


def test_pad_to_multiple_and_crop_3d(gen):
    x = torch.rand(1, 2, *SIZE, generator=gen)
    padded, pads = pad_to_multiple(x, 8)
    assert padded.shape[2:] == (16, 16, 16)
    assert pads == (3, 3, 1, 1, 2, 2)  # F.pad order: W, H, then D
    assert torch.equal(crop(padded, pads, SIZE), x)


def test_bad_ranks_and_channels_are_refused():
    vol, img = torch.rand(1, 1, 6, 6, 6), torch.rand(1, 1, 6, 6)
    with pytest.raises(ConfigError, match=r"\(B, 3, D, H, W\)"):
        warp(vol, torch.zeros(1, 2, 6, 6, 6))  # a 2-channel flow on a volume
    with pytest.raises(ConfigError, match="one channel per spatial axis"):
        warp(torch.rand(1, 1, 2, 6, 6, 6), torch.zeros(1, 4, 2, 6, 6, 6))  # 4-D
    with pytest.raises(ConfigError, match="same"):
        warp(img, torch.zeros(1, 3, 6, 6, 6))
    with pytest.raises(ConfigError, match="2-D only"):
        warp(vol, torch.zeros(1, 3, 6, 6, 6), mode="bicubic")
    with pytest.raises(ConfigError, match="3 sides"):
        resize_flow(torch.zeros(1, 3, 6, 6, 6), (12, 12))
    with pytest.raises(ConfigError, match=r"\(B, C, D, H, W\)"):
        losses.LocalNCC()(torch.rand(1, 1, 36), torch.rand(1, 1, 36))
    with pytest.raises(ConfigError, match="one per spatial axis"):
        losses.Diffusion(spacing=(1.0, 2.0))(torch.zeros(1, 3, 6, 6, 6))
    with pytest.raises(ConfigError, match="one channel per spatial axis"):
        losses.BendingEnergy()(torch.zeros(1, 3, 6, 6))
    with pytest.raises(ConfigError, match="2 pixels or more"):
        metrics.jacobian_determinant(torch.zeros(1, 3, 1, 6, 6))
    with pytest.raises(ConfigError, match=r"\(B, 1, D, H, W\)"):
        metrics.label_dice(torch.zeros(1, 6, 6, 6), torch.zeros(1, 6, 6, 6))
    with pytest.raises(ConfigError, match="one shape"):
        metrics.label_dice(torch.zeros(1, 1, 6, 6, 6), torch.zeros(1, 1, 6, 6))


def test_gradients_flow_in_3d(gen):
    fixed = torch.rand(1, 1, *SIZE, generator=gen)
    moving = warp(fixed, torch.randn(1, 3, *SIZE, generator=gen))
    velocity = (torch.randn(1, 3, *SIZE, generator=gen) * 0.5).requires_grad_()
    flow = integrate_velocity(velocity, 4)
    warped = warp(moving, flow)
    terms = [
        losses.MSE()(warped, fixed),
        losses.NCC()(warped, fixed),
        losses.LocalNCC(window=5)(warped, fixed),
        losses.MutualInformation()(warped, fixed),
        losses.NormalisedGradientFields()(warped, fixed),
        losses.Diffusion(spacing=(1.0, 1.0, 2.0))(flow),
        losses.BendingEnergy()(flow),
        losses.DiffusionFold()(flow),
    ]
    for term in terms:
        (grad,) = torch.autograd.grad(term, velocity, retain_graph=True)
        assert grad.isfinite().all()
        assert grad.abs().sum() > 0, term


def test_warp_by_coarse_flow_takes_a_volume_through_the_torch_ops():
    from air_reg.speed.warp import warp_by_coarse_flow

    g = torch.Generator().manual_seed(3)
    moving = torch.rand(1, 1, 8, 10, 12, generator=g)
    flow = torch.randn(1, 3, 4, 5, 6, generator=g)
    expected = warp(moving, resize_flow(flow, (8, 10, 12)))
    torch.testing.assert_close(warp_by_coarse_flow(moving, flow), expected)
