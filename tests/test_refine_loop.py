"""air_reg.speed.refine_loop: a pyramid level of refine's Adam loop in one C++ call computes
what autograd and ``_Adam`` compute through the per-op objective, and refine takes it only
where it computes the same maths."""

import contextlib

import pytest
import torch
from conftest import needs_kernel
from torch import nn

from air_reg.errors import UserError
from air_reg.losses import MSE, MutualInformation
from air_reg.models.components.spatial_transformer import CoarseToDense, warp
from air_reg.refine import RefineSettings, affine_flow, refine
from air_reg.refine.flows import after_affine
from air_reg.refine.optimise import _Adam
from air_reg.speed import kernels, refine_loop
from air_reg.speed import warp as warp_ops

WEIGHTS = {"reg_weight": 0.002, "fold_weight": 20.0, "fold_margin": 0.05}


@pytest.fixture
def threads():
    """Sets torch's thread count for one test, then restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _fused_runs() -> int:
    return kernels.calls().get("refine_level", {}).get("fused", 0)


def _objective(
    param, fixed, moving, up, scale, squarings, theta, similarity=None, weights=None, ops=True
):
    """refine's per-op objective at one level, in torch ops (the reference; ``ops`` False: over
    speed.warp's kernels, whose warp is the fused loop's to the last bit)."""
    with warp_ops.torch_ops() if ops else contextlib.nullcontext():
        field = up(param) * torch.tensor(scale).view(1, 2, 1, 1)
        flow = warp_ops.integrate(field, squarings) if squarings else field
        flow = after_affine(flow, theta)
        loss = (similarity or MSE())(warp_ops.warp_by_coarse_flow(moving, flow), fixed)
        loss = loss + warp_ops.penalty(flow, **(weights or WEIGHTS))
    return len(fixed) * loss


def _pair(b: int, size=(48, 40), seed: int = 0):
    """(fixed, moving, true flow): smooth images, the moving one warped by a smooth field."""
    g = torch.Generator().manual_seed(seed)
    images = CoarseToDense(in_size=(7, 6), out_size=size, mode="bicubic")(
        torch.rand(b, 1, 7, 6, generator=g)
    ).clamp(0, 1)
    flow = CoarseToDense(in_size=(4, 4), out_size=size, mode="bicubic")(
        2 * torch.randn(b, 2, 4, 4, generator=g)
    )
    return warp(images, flow), images, flow


@needs_kernel
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("squarings", [0, 4])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_one_step_equals_autograd_and_adam(b, squarings, affine, n_threads, threads):
    threads(n_threads)  # B == 1 on 2 threads: the pair's rows split between them
    g = torch.Generator().manual_seed(b + squarings)
    (h, w), (fh, fw), (gh, gw) = (40, 36), (20, 18), (7, 6)
    fixed, moving = torch.rand(b, 1, h, w, generator=g), torch.rand(b, 1, h, w, generator=g)
    up = CoarseToDense(in_size=(gh, gw), out_size=(fh, fw), mode="bspline")
    param = 3 * torch.randn(b, 2, gh, gw, generator=g)  # large enough to fold somewhere
    theta = None
    if affine:
        theta = torch.eye(2, 3).repeat(b, 1, 1) + 0.05 * torch.randn(b, 2, 3, generator=g)
    scale = (fh / h, fw / w)
    # the reference: one autograd pass and _Adam's step, from a state of earlier steps
    ref = param.clone().requires_grad_(True)
    adam = _Adam(ref)
    adam.m.copy_(1e-3 * torch.randn(ref.shape, generator=g))
    adam.v.copy_(1e-6 * torch.rand(ref.shape, generator=g))
    adam.t = 5
    m0 = adam.m.clone()
    m, v = m0.clone(), adam.v.clone()
    _objective(ref, fixed, moving, up, scale, squarings, theta).backward()
    grad = ref.grad.clone()
    adam.step(0.5)  # step 0 of the cosine schedule: lr itself
    ours = param.clone()
    extra = {}
    if affine:
        extra = {"affine": affine_flow(theta, (fh, fw)), "matrix": theta[:, :, :2] - torch.eye(2)}
    t = refine_loop.adam_level(
        ours, m, v, 5, fixed, moving, rows=up.rows, cols=up.cols, scale=scale,
        squarings=squarings, steps=1, lr=0.5, decay=0.1, **WEIGHTS, **extra,
    )  # fmt: skip
    assert t == adam.t == 6
    # m moved by 0.1 * (grad - m): the fused gradient is autograd's
    fused_grad = m.sub(m0).div(0.1).add(m0)
    torch.testing.assert_close(fused_grad, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())
    torch.testing.assert_close(v, adam.v, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("amplitude", [0.5, 30.0])
def test_one_pair_over_two_threads_equals_autograd(amplitude, threads):
    """A team of two shares one pair's 80 field rows; a squaring's scatter goes straight into
    the shared gradient in two phases (halves of 20 rows) when its field moves points at most 9
    rows, else through a buffer per thread (amplitude 30: the last squaring's does)."""
    threads(2)
    g = torch.Generator().manual_seed(11)
    (h, w), (fh, fw), (gh, gw) = (160, 144), (80, 72), (12, 11)
    fixed, moving = _pair(1, size=(h, w), seed=3)[:2]
    up = CoarseToDense(in_size=(gh, gw), out_size=(fh, fw), mode="bspline")
    param = amplitude * torch.randn(1, 2, gh, gw, generator=g)
    scale = (fh / h, fw / w)
    velocity = up(param) * torch.tensor(scale).view(1, 2, 1, 1)  # field px
    last = warp_ops.integrate(velocity / 2, 3)  # what the fourth squaring samples
    assert (last[:, 0].abs().amax() > 9) == (amplitude > 1)
    ref = param.clone().requires_grad_(True)
    _objective(ref, fixed, moving, up, scale, 4, None).backward()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    refine_loop.adam_level(
        param.clone(), m, v, 0, fixed, moving, rows=up.rows, cols=up.cols, scale=scale,
        squarings=4, steps=1, lr=0.5, decay=0.1, **WEIGHTS,
    )  # fmt: skip
    grad = ref.grad
    torch.testing.assert_close(m / 0.1, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("with_affine", [False, True])
def test_refine_fused_equals_the_per_op_kernels(with_affine):
    fixed, moving, _ = _pair(2)
    theta = None
    if with_affine:
        theta = torch.tensor([[[1.05, 0.02, 0.5], [-0.03, 0.97, -0.4]]]).repeat(2, 1, 1)
    settings = RefineSettings(steps=60)
    before = _fused_runs()
    fused = refine(fixed, moving, None, settings, affine=theta)
    assert _fused_runs() == before + 2  # 48 x 40: two levels
    with refine_loop.per_op():
        per_op = refine(fixed, moving, None, settings, affine=theta)
    assert _fused_runs() == before + 2
    assert fused.abs().max() > 0.5  # it moved
    # Measured: 1e-6 px apart after 180 Adam steps (2e-6 at 233 x 197); a wrong term is >1e-2.
    assert (fused - per_op).abs().max() < 1e-4


@needs_kernel
def test_pairs_in_a_batch_are_independent(threads):
    threads(1)
    fixed, moving, _ = _pair(3, seed=1)
    settings = RefineSettings(steps=20)
    batch = refine(fixed, moving, None, settings)
    alone = refine(fixed[:1], moving[:1], None, settings)
    assert torch.equal(batch[:1], alone)  # the same floats: nothing is shared between pairs
    assert not torch.equal(batch[1], batch[0])


@needs_kernel
def test_fused_registers_the_known_field(threads):
    threads(2)  # one pair's rows over two threads
    fixed, moving, flow = _pair(1, size=(64, 56), seed=2)
    out = refine(fixed, moving, None, RefineSettings(steps=60))
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    before, after = flow[inner].norm(dim=1).mean(), (out - flow)[inner].norm(dim=1).mean()
    assert after < 0.3 * before


MI_WEIGHTS = {**WEIGHTS, "reg_weight": 2.0}  # refine's auto weight for mi


def _mi_gradient(b, size, field, grid, squarings, affine, seed, amplitude=3.0, ops=True, nmi=True):
    """(fused gradient, autograd's) of refine's MI objective at one level, one step, from a
    control grid of ``amplitude`` x N(0, 1) (``nmi`` False: Mattes' MI, not normalised)."""
    mi = MutualInformation(normalised=nmi)
    g = torch.Generator().manual_seed(seed)
    smooth = CoarseToDense(in_size=(9, 8), out_size=size, mode="bicubic")
    fixed = smooth(torch.rand(b, 1, 9, 8, generator=g))
    moving = smooth(torch.rand(b, 1, 9, 8, generator=g))
    if not ops:  # flat regions: many pixels tie at the min and at the max
        moving = moving.clamp(0.3, 0.7)
    up = CoarseToDense(in_size=grid, out_size=field, mode="bspline")
    param = amplitude * torch.randn(b, 2, *grid, generator=g)
    theta = None
    if affine:
        theta = torch.eye(2, 3).repeat(b, 1, 1) + 0.05 * torch.randn(b, 2, 3, generator=g)
    scale = (field[0] / size[0], field[1] / size[1])
    ref = param.clone().requires_grad_(True)
    _objective(ref, fixed, moving, up, scale, squarings, theta, mi, MI_WEIGHTS, ops).backward()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    extra = {}
    if affine:
        extra = {"affine": affine_flow(theta, field), "matrix": theta[:, :, :2] - torch.eye(2)}
    refine_loop.adam_level(
        param.clone(), m, v, 0, fixed, moving, rows=up.rows, cols=up.cols, scale=scale,
        squarings=squarings, steps=1, lr=0.5, decay=0.1, similarity=mi,
        **MI_WEIGHTS, **extra,
    )  # fmt: skip
    return m / 0.1, ref.grad  # Adam's first step: m = 0.1 grad


@needs_kernel
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("squarings", [0, 4])
@pytest.mark.parametrize("affine", [False, True])
def test_mi_gradient_equals_autograd(b, squarings, affine, threads):
    threads(1)
    fused, grad = _mi_gradient(b, (40, 36), (20, 18), (7, 6), squarings, affine, b + squarings)
    # Measured: within 2e-5 of the largest entry (float32 histograms summed in another order);
    # leaving out the min/max mapping's terms is 50-80 % of it.
    torch.testing.assert_close(fused, grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("squarings", [0, 4])
def test_mi_gradient_of_one_pair_over_two_threads(squarings, threads):
    threads(2)  # 80 field rows: the pair's rows split, histograms and sums per thread
    fused, grad = _mi_gradient(1, (160, 144), (80, 72), (12, 11), squarings, False, 7)
    torch.testing.assert_close(fused, grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize(("amplitude", "nmi"), [(0.0, True), (1.0, True), (1.0, False)])
def test_mi_gradient_with_ties_and_at_the_identity(amplitude, nmi, threads):
    threads(1)
    # Against autograd over the kernels: torch's grid_sample lands a hair off the integer
    # positions of the identity (its one-sided slopes then differ, 65 % of the gradient).
    fused, grad = _mi_gradient(2, (48, 40), (24, 20), (7, 6), 4, False, 3, amplitude, False, nmi)
    assert grad.abs().max() > 0
    torch.testing.assert_close(fused, grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("with_affine", [False, True])
def test_refine_mi_fused_equals_the_per_op_kernels(with_affine):
    fixed, moving, _ = _pair(2)
    theta = None
    if with_affine:
        theta = torch.tensor([[[1.05, 0.02, 0.5], [-0.03, 0.97, -0.4]]]).repeat(2, 1, 1)
    settings = RefineSettings(steps=30, similarity="mi")
    before = _fused_runs()
    fused = refine(fixed, moving, None, settings, affine=theta)
    assert _fused_runs() == before + 2  # 48 x 40: two levels
    with refine_loop.per_op():
        per_op = refine(fixed, moving, None, settings, affine=theta)
    assert fused.abs().max() > 0.5  # it moved
    # Measured: 1.9e-6 px apart after 90 Adam steps (the per-op path is the reference).
    assert (fused - per_op).abs().max() < 1e-4


@needs_kernel
def test_mi_pairs_in_a_batch_are_independent(threads):
    threads(1)
    fixed, moving, _ = _pair(3, seed=1)
    settings = RefineSettings(steps=20, similarity="mi")
    batch = refine(fixed, moving, None, settings)
    alone = refine(fixed[1:2], moving[1:2], None, settings)
    assert torch.equal(batch[1:2], alone)  # its own min, max and histogram
    assert not torch.equal(batch[1], batch[0])


class _Stiffness(nn.Module):
    """Another regularizer than the kernels' pixel Diffusion."""

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        return flow.square().mean()


@needs_kernel
@pytest.mark.parametrize(
    "change",
    [
        {"similarity": "ncc"},
        {"similarity": "lncc"},
        {"similarity": "ngf"},
        {"similarity": MutualInformation(sampling=0.5)},  # a subset of the pixels
        {"similarity": MutualInformation(fixed_window="bspline")},
        {"optimizer": "lbfgs"},
        {"optimizer": "lbfgs", "similarity": "mi"},
        {"spacing": None},  # one value per pixel, no control grid
        {"regularizer": _Stiffness()},
    ],
)
def test_other_settings_take_the_per_op_path(change):
    fixed, moving, _ = _pair(1)
    before, ops = _fused_runs(), kernels.calls().get("penalty", {})
    refine(fixed, moving, None, RefineSettings(steps=2, **change))
    assert _fused_runs() == before
    assert kernels.calls().get("penalty", {}) != ops  # the per-op objective ran


@needs_kernel
def test_anisotropic_spacing_and_the_switches_take_the_per_op_path():
    fixed, moving, _ = _pair(1)
    before = _fused_runs()
    refine(fixed, moving, None, RefineSettings(steps=2), spacing=(1.0, 2.0))  # mm diffusion
    with refine_loop.per_op():
        refine(fixed, moving, None, RefineSettings(steps=2))
    with warp_ops.torch_ops():
        refine(fixed, moving, None, RefineSettings(steps=2))
    refine(fixed.double(), moving.double(), None, RefineSettings(steps=2))
    assert _fused_runs() == before
    refine(fixed, moving, None, RefineSettings(steps=2))
    assert _fused_runs() == before + 2


@needs_kernel
def test_the_identity_pair_stays_the_identity():
    fixed, _, _ = _pair(2)
    before = _fused_runs()
    out = refine(fixed, fixed, None, RefineSettings(steps=30))
    assert _fused_runs() > before
    assert out.abs().max() == 0


@needs_kernel
def test_shapes_that_do_not_fit_are_refused():
    up = CoarseToDense(in_size=(5, 5), out_size=(20, 18), mode="bspline")
    param = torch.zeros(1, 2, 5, 6)  # the grid is 5 x 5
    with pytest.raises(UserError, match="shapes do not fit"):
        refine_loop.adam_level(
            param, param.clone(), param.clone(), 0, torch.zeros(1, 1, 40, 36),
            torch.zeros(1, 1, 40, 36), rows=up.rows, cols=up.cols, scale=(0.5, 0.5),
            squarings=0, steps=1, lr=0.5, decay=0.1, **WEIGHTS,
        )  # fmt: skip
