"""air_reg.speed.refine_loop on volumes with mutual information: the fused level loop
(``csrc/refine_loop3d.cpp`` with ``csrc/mi.h``) computes what autograd computes through the
per-op objective with ``MutualInformation()``, and refine takes it for MI volumes."""

import pytest
import torch
from conftest import needs_kernel

from air_reg.errors import UserError
from air_reg.losses import MSE, MutualInformation
from air_reg.models.components.spatial_transformer import CoarseToDense, warp
from air_reg.refine import RefineSettings, affine_flow, refine
from air_reg.refine.flows import after_affine
from air_reg.speed import kernels, refine_loop
from air_reg.speed import warp as warp_ops

WEIGHTS = {"reg_weight": 2.0, "fold_weight": 20.0, "fold_margin": 0.05}  # refine's for mi
SIZE, FIELD, GRID = (12, 14, 16), (6, 7, 8), (4, 5, 5)


@pytest.fixture
def threads(monkeypatch):
    """Sets torch's thread count for one test (a volume's slices over them), then restores it."""
    monkeypatch.setattr(refine_loop, "_MIN_SLICES", 2)
    monkeypatch.setattr(refine_loop, "_oversubscribed", lambda: False)
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _fused_runs() -> int:
    return kernels.calls().get("refine_level", {}).get("fused", 0)


def _volumes(b: int, size=SIZE, seed: int = 0):
    """(fixed, moving of another contrast, true flow): smooth volumes under a smooth field."""
    g = torch.Generator().manual_seed(seed)
    smooth = CoarseToDense(in_size=(4, 5, 4), out_size=size, mode="bicubic")
    images = smooth(torch.rand(b, 1, 4, 5, 4, generator=g)).clamp(0, 1)
    flow = CoarseToDense(in_size=(3, 3, 3), out_size=size, mode="bicubic")(
        1.5 * torch.randn(b, 3, 3, 3, 3, generator=g)
    )
    return warp(images, flow), (1 - images) ** 2, flow  # a monotone contrast change


def _mi_gradient(b, squarings, affine, seed, amplitude=2.0, mi=None, flat=False):
    """(fused gradient, autograd's) of refine's MI objective at one level, one Adam step from
    a control grid of ``amplitude`` x N(0, 1); ``flat``: many voxels tie at the min and max."""
    mi = mi or MutualInformation()
    g = torch.Generator().manual_seed(seed)
    fixed, moving, _ = _volumes(b, seed=seed)
    if flat:
        moving = moving.clamp(0.2, 0.6)
    up = CoarseToDense(in_size=GRID, out_size=FIELD, mode="bspline")
    param = amplitude * torch.randn(b, 3, *GRID, generator=g)
    theta = None
    if affine:
        theta = torch.eye(3, 4).repeat(b, 1, 1) + 0.05 * torch.randn(b, 3, 4, generator=g)
    scale = tuple(f / n for f, n in zip(FIELD, SIZE, strict=True))
    ref = param.clone().requires_grad_(True)
    with warp_ops.torch_ops():  # refine's per-op objective (the reference)
        field = up(ref) * torch.tensor(scale).view(1, 3, 1, 1, 1)
        flow = after_affine(warp_ops.integrate(field, squarings) if squarings else field, theta)
        loss = mi(warp_ops.warp_by_coarse_flow(moving, flow), fixed)
        (b * (loss + warp_ops.penalty(flow, **WEIGHTS))).backward()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    extra = {}
    if affine:
        extra = {"affine": affine_flow(theta, FIELD), "matrix": theta[:, :, :3] - torch.eye(3)}
    slices, rows, cols = up.matrices
    t = refine_loop.adam_level(
        param.clone(), m, v, 0, fixed, moving, slices=slices, rows=rows, cols=cols, scale=scale,
        squarings=squarings, steps=1, lr=0.5, decay=0.1, similarity=mi, **WEIGHTS, **extra,
    )  # fmt: skip
    assert t == 1
    return m / 0.1, ref.grad  # Adam's first step: m = 0.1 grad


@needs_kernel
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("squarings", [0, 3])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_mi_gradient_equals_autograd(b, squarings, affine, n_threads, threads):
    threads(n_threads)  # B == 1 and 2 threads: the slices split, histograms and sums per thread
    fused, grad = _mi_gradient(b, squarings, affine, seed=b + squarings)
    assert grad.abs().max() > 0
    torch.testing.assert_close(fused, grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("mi", [MutualInformation(normalised=False), MutualInformation(bins=16)])
def test_mattes_mi_and_other_bins(mi, threads):
    threads(1)
    fused, grad = _mi_gradient(1, 3, False, seed=5, mi=mi)
    torch.testing.assert_close(fused, grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("n_threads", [1, 2])
def test_mi_gradient_with_ties_at_the_min_and_max(n_threads, threads):
    threads(n_threads)
    fused, grad = _mi_gradient(1, 3, False, seed=6, amplitude=1.0, flat=True)
    torch.testing.assert_close(fused, grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("with_affine", [False, True])
def test_refine_mi_fused_equals_the_per_op_path(with_affine, threads):
    threads(1)
    fixed, moving, flow = _volumes(1, size=(20, 22, 18), seed=1)
    theta = None
    if with_affine:
        theta = torch.tensor([[[1.03, 0.02, 0.0, 0.5], [-0.02, 0.98, 0.01, -0.4],
                               [0.0, 0.01, 1.01, 0.3]]])  # fmt: skip
    # From a generic start (at the identity grid_sample's one-sided slopes differ; see
    # test_refine_loop_3d.py).
    start = 0.5 * flow + 0.3
    settings = RefineSettings(steps=5, similarity="mi", guard=False, min_size=8)
    before = _fused_runs()
    fused = refine(fixed, moving, start, settings, affine=theta)
    assert _fused_runs() == before + 2  # 20 x 22 x 18 over min_size 8: two levels
    with refine_loop.per_op():
        per_op = refine(fixed, moving, start, settings, affine=theta)
    assert _fused_runs() == before + 2
    assert (fused - start).abs().max() > 0.1  # it moved
    assert (fused - per_op).abs().max() < 1e-3
    assert (fused - per_op).norm(dim=1).mean() < 1e-4


@needs_kernel
def test_fused_mi_registers_the_known_field_across_contrasts(threads):
    threads(1)
    fixed, moving, flow = _volumes(1, size=(40, 44, 36), seed=4)
    before = _fused_runs()
    out = refine(fixed, moving, None, RefineSettings(steps=25, similarity="mi"))
    assert _fused_runs() > before
    inner = (slice(None), slice(None), *[slice(5, -5)] * 3)
    start, after = flow[inner].norm(dim=1).mean(), (out - flow)[inner].norm(dim=1).mean()
    assert after < 0.4 * start  # measured: 1.78 -> 0.60 px


@needs_kernel
def test_mi_pairs_in_a_batch_are_independent(threads):
    threads(2)  # pairs over the threads
    fixed, moving, _ = _volumes(2, seed=2)
    settings = RefineSettings(steps=4, similarity="mi", min_size=6)
    batch = refine(fixed, moving, None, settings)
    threads(1)
    alone = refine(fixed[1:], moving[1:], None, settings)
    assert torch.equal(batch[1:], alone)  # its own min, max and histogram
    assert not torch.equal(batch[1], batch[0])


@needs_kernel
def test_which_similarities_the_volume_loop_takes():
    assert refine_loop.supports(MutualInformation(), 3)
    assert refine_loop.supports(MSE(), 3)
    assert not refine_loop.supports(MutualInformation(sampling=0.5), 3)
    assert not refine_loop.supports(MutualInformation(fixed_window="bspline"), 3)
    assert not refine_loop.supports(MSE(), 4)
    fixed, moving, _ = _volumes(1)
    up = CoarseToDense(in_size=GRID, out_size=FIELD, mode="bspline")
    slices, rows, cols = up.matrices
    param = torch.zeros(1, 3, *GRID)
    with pytest.raises(UserError, match="MutualInformation"):
        refine_loop.adam_level(param, param.clone(), param.clone(), 0, fixed, moving,
                               slices=slices, rows=rows, cols=cols, scale=(0.5, 0.5, 0.5),
                               squarings=0, steps=1, lr=0.5, decay=0.1, **WEIGHTS,
                               similarity=MutualInformation(sampling=0.5))  # fmt: skip
