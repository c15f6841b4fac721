"""air_reg.speed.warp: the refinement's warps and penalties on the kernels equal the torch ops."""

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernel

from air_reg.losses import Diffusion, NegativeJacobian
from air_reg.models.components.spatial_transformer import integrate_velocity, resize_flow, warp
from air_reg.refine import RefineSettings, refine
from air_reg.speed import kernels
from air_reg.speed import warp as warp_ops


def _grad(fn, x: torch.Tensor, weight: torch.Tensor):
    """(fn(x), d(sum(fn(x) * weight))/dx)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad


# (B, C, H, W) of the image, (h, w) of the flow: halving, odd sizes, same size, a 1-row-ish field
SIZES = [(3, 1, 33, 29, 17, 15), (2, 2, 20, 20, 20, 20), (1, 1, 16, 40, 5, 7), (2, 1, 9, 64, 2, 2)]


@needs_kernel
@pytest.mark.parametrize(("b", "c", "h", "w", "fh", "fw"), SIZES)
def test_warp_by_coarse_flow_equals_warp_of_the_resized_flow(b, c, h, w, fh, fw):
    g = torch.Generator().manual_seed(0)
    moving = torch.rand(b, c, h, w, generator=g)
    flow = 4 * torch.randn(b, 2, fh, fw, generator=g)  # reaches past the border: clipped
    weight = torch.randn(b, c, h, w, generator=g)
    before = kernels.calls().get("warp_by_coarse_flow", {}).get("kernel", 0)
    out, grad = _grad(lambda f: warp_ops.warp_by_coarse_flow(moving, f), flow, weight)
    assert kernels.calls()["warp_by_coarse_flow"]["kernel"] == before + 1
    ref_out, ref_grad = _grad(lambda f: warp(moving, resize_flow(f, (h, w))), flow, weight)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item())
    assert ref_grad.abs().max() > 0  # the check can fail: the gradient is not all zeros


@needs_kernel
@pytest.mark.parametrize("size", [(17, 15), (2, 2), (40, 9)])
def test_integrate_equals_scaling_and_squaring(size):
    g = torch.Generator().manual_seed(1)
    velocity = 3 * torch.randn(2, 2, *size, generator=g)
    weight = torch.randn(2, 2, *size, generator=g)
    out, grad = _grad(lambda v: warp_ops.integrate(v, 4), velocity, weight)
    ref_out, ref_grad = _grad(lambda v: integrate_velocity(v, 4), velocity, weight)
    assert torch.allclose(out, ref_out, atol=1e-4)  # four squarings of rounding
    assert torch.allclose(grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("size", [(17, 15), (2, 2), (3, 30)])
@pytest.mark.parametrize("weights", [(0.3, 20.0), (0.0, 5.0), (1.0, 0.0)])
def test_penalty_equals_diffusion_plus_negative_jacobian(size, weights):
    reg, fold = weights
    g = torch.Generator().manual_seed(2)
    flow = 1.5 * torch.randn(3, 2, *size, generator=g)  # folds in places: both terms active

    def reference(f):
        return reg * Diffusion()(f) + fold * NegativeJacobian(0.05)(f)

    one = torch.ones(())
    value, grad = _grad(lambda f: warp_ops.penalty(f, reg, fold, 0.05), flow, one)
    ref_value, ref_grad = _grad(reference, flow, one)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5 * max(ref_grad.abs().max().item(), 1e-6))


def test_what_the_kernels_cannot_take_runs_the_torch_ops():
    moving = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    flow = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    before = kernels.calls().get("warp_by_coarse_flow", {}).get("torch", 0)
    out = warp_ops.warp_by_coarse_flow(moving, flow)  # float64: torch
    assert torch.equal(out, warp(moving, resize_flow(flow, (12, 12))))
    grad_moving = moving.float().requires_grad_(True)  # a moving image that needs a gradient
    warp_ops.warp_by_coarse_flow(grad_moving, flow.float()).sum().backward()
    assert grad_moving.grad is not None
    assert grad_moving.grad.abs().sum() > 0
    larger = torch.randn(2, 2, 24, 24)  # a flow larger than the image: torch (antialiased)
    assert warp_ops.warp_by_coarse_flow(moving.float(), larger).shape == (2, 1, 12, 12)
    assert kernels.calls()["warp_by_coarse_flow"]["torch"] == before + 3


def _smooth_pair(g: torch.Generator):
    """Smooth (2, 1, 40, 36) images and a moving image shifted by a known constant flow."""
    noise = torch.rand(2, 1, 10, 9, generator=g)
    fixed = F.interpolate(noise, size=(40, 36), mode="bicubic", align_corners=False).clamp(0, 1)
    shift = 2 * torch.randn(2, 2, 1, 1, generator=g).expand(2, 2, 40, 36)
    return fixed, warp(fixed, -shift), shift


@needs_kernel
def test_refine_gives_the_same_result_with_kernels_and_torch_ops():
    fixed, moving, shift = _smooth_pair(torch.Generator().manual_seed(3))
    settings = RefineSettings(steps=20, guard=False)
    start = torch.full_like(shift, 0.25)  # off the pixel grid (see the next test)
    ours = refine(fixed, moving, start, settings)
    with warp_ops.torch_ops():
        ref = refine(fixed, moving, start, settings)
    assert (ours - start).abs().max() > 0.5  # it moved
    assert (ours - ref).abs().max() < 1e-4  # 80 Adam steps, float32 rounding apart


@needs_kernel
def test_from_the_identity_the_kernels_register_as_well_as_the_torch_ops():
    # At exactly integer sampling positions (the identity) bilinear sampling has no slope,
    # only one-sided ones: the kernels take the forward difference, torch the one its
    # coordinate rounding lands on, which varies by row; from there the paths part slightly.
    fixed, moving, shift = _smooth_pair(torch.Generator().manual_seed(3))
    settings = RefineSettings(steps=20)
    ours = refine(fixed, moving, None, settings)
    with warp_ops.torch_ops():
        ref = refine(fixed, moving, None, settings)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))  # away from the border
    err, ref_err = ((f - shift)[inner].norm(dim=1).mean().item() for f in (ours, ref))
    assert err < 0.3
    assert ref_err < 0.3
    assert err == pytest.approx(ref_err, abs=0.03)


def test_penalty_with_another_regularizer_runs_it_in_torch_ops():
    from air_reg.losses import BendingEnergy

    flow = torch.randn(2, 2, 12, 10, generator=torch.Generator().manual_seed(4))
    before = kernels.calls().get("penalty", {}).get("torch", 0)
    value = warp_ops.penalty(flow, 0.5, 3.0, 0.05, BendingEnergy())
    expected = 0.5 * BendingEnergy()(flow) + 3.0 * NegativeJacobian(0.05)(flow)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert kernels.calls()["penalty"]["torch"] == before + 1
