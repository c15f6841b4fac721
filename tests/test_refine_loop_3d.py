"""air_reg.speed.refine_loop on volumes: a pyramid level of refine's Adam loop in one C++ call
(``csrc/refine_loop3d.cpp``) computes what autograd and ``_Adam`` compute through the per-op
objective, and refine takes it for MSE volumes."""

import pytest
import torch
from conftest import needs_kernel

from air_reg.errors import UserError
from air_reg.losses import MSE
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


def _objective(param, fixed, moving, up, scale, squarings, theta, weights=None):
    """refine's per-op objective at one level, in torch ops (the reference)."""
    with warp_ops.torch_ops():
        field = up(param) * torch.tensor(scale).view(1, 3, 1, 1, 1)
        flow = warp_ops.integrate(field, squarings) if squarings else field
        flow = after_affine(flow, theta)
        loss = MSE()(warp_ops.warp_by_coarse_flow(moving, flow), fixed)
        loss = loss + warp_ops.penalty(flow, **(weights or WEIGHTS))
    return len(fixed) * loss


def _volumes(b: int, size=(20, 22, 18), seed: int = 0, peak: float = 2.0):
    """(fixed, moving, true flow): smooth volumes, the moving one warped by a smooth field."""
    g = torch.Generator().manual_seed(seed)
    images = CoarseToDense(in_size=(5, 6, 5), out_size=size, mode="bicubic")(
        torch.rand(b, 1, 5, 6, 5, generator=g)
    ).clamp(0, 1)
    flow = CoarseToDense(in_size=(3, 3, 3), out_size=size, mode="bicubic")(
        peak * torch.randn(b, 3, 3, 3, 3, generator=g)
    )
    return warp(images, flow), images, flow


@needs_kernel
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("squarings", [0, 3])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_one_step_equals_autograd_and_adam(b, squarings, affine, n_threads, threads, monkeypatch):
    threads(n_threads)
    monkeypatch.setattr(refine_loop, "_MIN_SLICES", 2)  # B == 1: the slices over 2 threads,
    monkeypatch.setattr(refine_loop, "_oversubscribed", lambda: False)  # however busy
    g = torch.Generator().manual_seed(b + squarings)
    size, field, grid = (14, 16, 12), (8, 9, 7), (5, 6, 4)
    fixed, moving = torch.rand(b, 1, *size, generator=g), torch.rand(b, 1, *size, generator=g)
    up = CoarseToDense(in_size=grid, out_size=field, mode="bspline")
    param = 2 * torch.randn(b, 3, *grid, generator=g)  # large enough to fold somewhere
    theta = None
    if affine:
        theta = torch.eye(3, 4).repeat(b, 1, 1) + 0.05 * torch.randn(b, 3, 4, generator=g)
    scale = tuple(f / n for f, n in zip(field, size, strict=True))
    ref = param.clone().requires_grad_(True)
    adam = _Adam(ref)  # the reference: from a state of earlier steps
    adam.m.copy_(1e-3 * torch.randn(ref.shape, generator=g))
    adam.v.copy_(1e-6 * torch.rand(ref.shape, generator=g))
    adam.t = 5
    m0 = adam.m.clone()
    m, v = m0.clone(), adam.v.clone()
    _objective(ref, fixed, moving, up, scale, squarings, theta).backward()
    grad = ref.grad.clone()
    assert grad.abs().max() > 0
    adam.step(0.5)
    ours = param.clone()
    extra = {}
    if affine:
        extra = {"affine": affine_flow(theta, field), "matrix": theta[:, :, :3] - torch.eye(3)}
    slices, rows, cols = up.matrices
    t = refine_loop.adam_level(
        ours, m, v, 5, fixed, moving, slices=slices, rows=rows, cols=cols, scale=scale,
        squarings=squarings, steps=1, lr=0.5, decay=0.1, **WEIGHTS, **extra,
    )  # fmt: skip
    assert t == adam.t == 6
    fused_grad = m.sub(m0).div(0.1).add(m0)  # m moved by 0.1 * (grad - m)
    torch.testing.assert_close(fused_grad, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())
    torch.testing.assert_close(v, adam.v, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("amplitude", [0.5, 12.0])
def test_one_volume_over_two_threads_equals_autograd(amplitude, threads, monkeypatch):
    """A team of two shares one volume's 24 field slices; a squaring's scatter goes straight
    into the shared gradient in two phases (halves of 6 slices) when its field moves points at
    most 2 slices, else through a buffer per thread (amplitude 12: the last squaring's does)."""
    threads(2)
    monkeypatch.setattr(refine_loop, "_oversubscribed", lambda: False)  # however busy
    g = torch.Generator().manual_seed(5)
    size, field, grid = (48, 20, 18), (24, 10, 9), (8, 5, 5)
    fixed, moving = _volumes(1, size=size, seed=4)[:2]
    up = CoarseToDense(in_size=grid, out_size=field, mode="bspline")
    param = amplitude * torch.randn(1, 3, *grid, generator=g)
    scale = tuple(f / n for f, n in zip(field, size, strict=True))
    velocity = up(param) * torch.tensor(scale).view(1, 3, 1, 1, 1)  # field voxels
    last = warp_ops.integrate(velocity / 2, 2)  # what the third squaring samples
    assert (last[:, 0].abs().amax() > 2) == (amplitude > 1)
    ref = param.clone().requires_grad_(True)
    _objective(ref, fixed, moving, up, scale, 3, None).backward()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    slices, rows, cols = up.matrices
    refine_loop.adam_level(
        param.clone(), m, v, 0, fixed, moving, slices=slices, rows=rows, cols=cols,
        scale=scale, squarings=3, steps=1, lr=0.5, decay=0.1, **WEIGHTS,
    )  # fmt: skip
    grad = ref.grad
    torch.testing.assert_close(m / 0.1, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())


@needs_kernel
def test_fold_term_is_in_the_gradient(threads):
    """A folding field: the fold penalty's gradient dominates and still matches autograd."""
    threads(1)
    g = torch.Generator().manual_seed(3)
    size, field, grid = (12, 12, 12), (6, 6, 6), (4, 4, 4)
    fixed = moving = torch.zeros(1, 1, *size)  # no image term
    up = CoarseToDense(in_size=grid, out_size=field, mode="bspline")
    param = 6 * torch.randn(1, 3, *grid, generator=g)
    scale, weights = (0.5, 0.5, 0.5), {**WEIGHTS, "reg_weight": 0.0}
    ref = param.clone().requires_grad_(True)
    _objective(ref, fixed, moving, up, scale, 0, None, weights).backward()
    assert ref.grad.abs().max() > 1e-3  # it folds: the fold term is there
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    slices, rows, cols = up.matrices
    refine_loop.adam_level(param.clone(), m, v, 0, fixed, moving, slices=slices, rows=rows,
                           cols=cols, scale=scale, squarings=0, steps=1, lr=0.5, decay=0.1,
                           **weights)  # fmt: skip
    torch.testing.assert_close(m / 0.1, ref.grad, rtol=1e-4, atol=1e-4 * ref.grad.abs().max())


@needs_kernel
@pytest.mark.parametrize("with_affine", [False, True])
def test_refine_fused_equals_the_torch_path(with_affine, threads):
    threads(1)
    fixed, moving, flow = _volumes(1, size=(36, 40, 32))
    theta = None
    if with_affine:
        theta = torch.tensor([[[1.03, 0.02, 0.0, 0.5], [-0.02, 0.98, 0.01, -0.4],
                               [0.0, 0.01, 1.01, 0.3]]])  # fmt: skip
    # From a generic start: at the identity every sample sits on a voxel, where the slope is
    # one-sided and grid_sample's rounding picks either side (the loop: always the next
    # voxel), so the two paths take different (equally valid) first steps there.
    start, settings = 0.5 * flow + 0.3, RefineSettings(steps=8, guard=False)
    before = _fused_runs()
    fused = refine(fixed, moving, start, settings, affine=theta)
    assert _fused_runs() == before + 2  # 36 x 40 x 32: two levels
    with refine_loop.per_op():
        per_op = refine(fixed, moving, start, settings, affine=theta)
    assert _fused_runs() == before + 2
    assert (fused - start).abs().max() > 0.5  # it moved
    # Measured: 1.5e-3 px apart at most, 2e-5 on average; a wrong term is > 0.1.
    assert (fused - per_op).abs().max() < 1e-2
    assert (fused - per_op).norm(dim=1).mean() < 1e-4


@needs_kernel
def test_refine_fused_from_the_identity_registers_as_the_torch_path(threads):
    threads(1)
    fixed, moving, flow = _volumes(1, size=(36, 40, 32))
    settings = RefineSettings(steps=8)
    fused = refine(fixed, moving, None, settings)
    with refine_loop.per_op():
        per_op = refine(fixed, moving, None, settings)
    errors = [(x - flow).norm(dim=1).mean().item() for x in (fused, per_op)]
    assert errors[0] < 0.6 * flow.norm(dim=1).mean()
    assert errors[0] < 1.1 * errors[1]  # measured: 1.13 vs 1.10 px


@needs_kernel
def test_pairs_in_a_batch_are_independent(threads):
    threads(2)  # pairs over the threads
    fixed, moving, _ = _volumes(2, seed=1)
    settings = RefineSettings(steps=4, min_size=8)
    batch = refine(fixed, moving, None, settings)
    threads(1)
    alone = refine(fixed[1:], moving[1:], None, settings)
    assert torch.equal(batch[1:], alone)  # the same floats: nothing is shared between pairs
    assert not torch.equal(batch[1], batch[0])


@needs_kernel
def test_identity_stays_identity(threads, monkeypatch):
    threads(2)
    monkeypatch.setattr(refine_loop, "_MIN_SLICES", 2)  # one volume's slices over two threads
    monkeypatch.setattr(refine_loop, "_oversubscribed", lambda: False)
    _, moving, _ = _volumes(1, seed=2)
    out = refine(moving, moving.clone(), None, RefineSettings(steps=4, min_size=8))
    assert torch.equal(out, torch.zeros_like(out))


@needs_kernel
@pytest.mark.slow
def test_fused_registers_the_known_field(threads):
    threads(2)
    fixed, moving, flow = _volumes(1, size=(40, 44, 36), seed=4)
    out = refine(fixed, moving, None, RefineSettings(steps=25))
    inner = (slice(None), slice(None), *[slice(5, -5)] * 3)
    before, after = flow[inner].norm(dim=1).mean(), (out - flow)[inner].norm(dim=1).mean()
    assert after < 0.3 * before


@needs_kernel
def test_bad_shapes_raise():  # which similarities it takes: test_refine_loop3d_mi.py
    fixed, moving, _ = _volumes(1)
    up = CoarseToDense(in_size=(4, 4, 4), out_size=(10, 11, 9), mode="bspline")
    slices, rows, cols = up.matrices
    param = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(UserError, match="volume shapes"):
        refine_loop.adam_level(param[:, :2], param.clone(), param.clone(), 0, fixed, moving,
                               slices=slices, rows=rows, cols=cols, scale=(0.5, 0.5, 0.5),
                               squarings=0, steps=1, lr=0.5, decay=0.1, **WEIGHTS)  # fmt: skip
