"""Shapes, parameter counts and invariants of the networks and the spatial-transformer stage."""

import copy

import pytest
import torch

from air_reg import speed, warp
from air_reg.models.components.air import AiR
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.components.mapt import MAPT
from air_reg.models.components.spatial_transformer import (
    INTERPOLATIONS,
    CoarseToDense,
    integrate_velocity,
    interpolation_matrix,
)
from air_reg.speed.dropout import FastDropout


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# Counts by hand for dim 16, ff 64: encoder layer 3,280, decoder layer 4,400, head 34,
# embedding p*p*16 + 16 (a conv stem: see its row), positions (size/p)^2 * 16; MAPT adds
# its 3 mixing weights.
@pytest.mark.parametrize(
    ("net", "size", "params"),
    [
        (lambda: AiR(image_size=28, patch_size=2), 28, 10_930),
        (lambda: AiR(image_size=28, patch_size=7), 28, 8_770),
        # conv stem 8 ch x 2 (80 + 584) and a 2x2 patch conv 8 -> 16 (528) replace the 80
        (lambda: AiR(image_size=28, patch_size=2, stem_channels=8), 28, 12_042),
        (lambda: AiR(image_size=64, patch_size=8, dim=32), 64, 33_890),
        (lambda: MAPT(image_size=28, patch_sizes=[2, 4, 7]), 28, 28_473),
        (lambda: MAPT(image_size=64, patch_sizes=[8, 16, 32]), 64, 46_041),
        (lambda: DIRNet(image_size=28), 28, 112_386),
    ],
)
def test_shape_and_parameter_count(net, size, params):
    model = net()
    fixed, moving = torch.rand(3, 1, size, size), torch.rand(3, 1, size, size)
    flow = model(fixed, moving)
    assert flow.shape == (3, 2, size, size)
    assert torch.isfinite(flow).all()
    assert n_params(model) == params


@pytest.mark.parametrize("net", [AiR, MAPT, DIRNet])
def test_networks_start_near_identity(net):
    model = net(image_size=28).eval()
    flow = model(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28))
    assert flow.abs().max() < 0.05


def test_zero_flow_is_identity():
    moving = torch.rand(2, 3, 17, 23)
    assert torch.allclose(warp(moving, torch.zeros(2, 2, 17, 23)), moving, atol=1e-6)


@pytest.mark.parametrize(("dy", "dx"), [(1, 0), (0, -2), (3, 2)])
def test_integer_shift_is_reproduced(dy, dx):
    moving = torch.rand(1, 1, 20, 20)
    flow = torch.zeros(1, 2, 20, 20)
    flow[:, 0], flow[:, 1] = dy, dx
    warped = warp(moving, flow)
    # warped(p) = moving(p + flow): compare on the region that stays inside the image
    ys, xs = slice(max(0, -dy), 20 - max(0, dy)), slice(max(0, -dx), 20 - max(0, dx))
    expected = moving[..., max(0, dy) : 20 + min(0, dy), max(0, dx) : 20 + min(0, dx)]
    assert torch.allclose(warped[..., ys, xs], expected, atol=1e-5)


def test_warp_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same"):
        warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 9, 8))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_interpolation_preserves_constants(mode):
    m = interpolation_matrix(7, 28, mode)
    assert m.shape == (28, 7)
    assert torch.allclose(m.sum(1), torch.ones(28), atol=1e-5)


def test_bspline_is_a_partition_of_unity_inside():
    m = interpolation_matrix(7, 28, "bspline")
    inner = m.sum(1)[8:20]  # away from the borders, all four basis functions are present
    assert torch.allclose(inner, torch.ones_like(inner), atol=1e-5)


@pytest.mark.parametrize("mode", INTERPOLATIONS)
def test_coarse_to_dense_reproduces_constant_field(mode):
    up = CoarseToDense(in_size=(14, 14), out_size=(28, 28), mode=mode)
    dense = up(torch.full((1, 2, 14, 14), 1.5))
    centre = dense[..., 6:22, 6:22]
    assert torch.allclose(centre, torch.full_like(centre, 1.5), atol=1e-4)


def test_patch_size_that_does_not_divide_is_rejected_with_valid_list():
    with pytest.raises(
        ValueError, match=r"valid patch sizes for 28x28 are \[1, 2, 4, 7, 14, 28\]"
    ):
        AiR(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="do not divide"):
        MAPT(image_size=28, patch_sizes=[2, 3])


def test_integration_of_zero_velocity_is_zero():
    assert integrate_velocity(torch.zeros(1, 2, 8, 8), 5).abs().max() == 0


def test_fast_dropout_changes_nothing_in_eval_mode():
    torch.manual_seed(0)
    plain = MAPT(image_size=28, dim=16)
    fast = speed.accelerate(copy.deepcopy(plain), attention="sdpa", dropout="fast")
    assert any(isinstance(m, FastDropout) for m in fast.modules())
    assert plain.state_dict().keys() == fast.state_dict().keys()  # same keys: checkpoints load
    fixed, moving = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    assert torch.equal(plain.eval()(fixed, moving), fast.eval()(fixed, moving))
