"""refine's affine stage (``estimate_affine``): on large volumes its pyramid starts from the
images halved to at most ``max_voxels`` voxels, which leaves 2-D images up to 512 x 512 alone
and still recovers a known affine; on 2-D images each level runs in one C++ call
(``refine_loop.adam_affine_level``), autograd's and Adam's maths."""

import contextlib

import pytest
import torch
from conftest import needs_kernel

from air_reg.errors import UserError
from air_reg.losses import MSE, MutualInformation
from air_reg.models.components.spatial_transformer import CoarseToDense, warp
from air_reg.refine import affine_flow
from air_reg.refine.flows import pyramid
from air_reg.refine.optimise import (
    AFFINE_LR,
    AFFINE_MAX_VOXELS,
    _affine_top,
    affine_reach,
    estimate_affine,
)
from air_reg.speed import kernels, refine_loop


@pytest.mark.parametrize("size", [(512, 512), (256, 300), (28, 28), (99, 117)])
def test_images_up_to_512_squared_are_never_shrunk(size):
    assert _affine_top(size, AFFINE_MAX_VOXELS, 16) == size


def test_a_1mm_brain_volume_starts_from_4mm():
    top = _affine_top((197, 233, 189), AFFINE_MAX_VOXELS, 16)
    assert top == (49, 58, 47)  # 134 k voxels: what pyramid's halvings give, 2 of them
    assert top == pyramid((197, 233, 189), 3, 16)[0]
    assert _affine_top((99, 117, 95), AFFINE_MAX_VOXELS, 16) == (50, 58, 48)  # 2 mm
    assert _affine_top((197, 233, 189), None, 16) == (197, 233, 189)
    assert _affine_top((40, 40, 40), 10, 16) == (20, 20, 20)  # no side below min_size


def _pair(theta: torch.Tensor, size=(40, 44, 36)):
    """(fixed, moving): a smooth volume and itself under ``theta``."""
    g = torch.Generator().manual_seed(0)
    smooth = CoarseToDense(in_size=(5, 6, 5), out_size=size, mode="bicubic")
    moving = smooth(torch.rand(1, 1, 5, 6, 5, generator=g)).clamp(0, 1)
    return warp(moving, affine_flow(theta, size)), moving


def test_the_capped_stage_recovers_a_known_affine():
    torch.manual_seed(0)
    theta = torch.tensor([[[1.04, 0.03, 0.0, 1.5], [-0.02, 0.97, 0.02, -2.0],
                           [0.01, 0.0, 1.02, 1.0]]])  # fmt: skip
    fixed, moving = _pair(theta)
    size = tuple(fixed.shape[2:])
    found = {cap: estimate_affine(fixed, moving, steps=60, min_size=8, max_voxels=cap)
             for cap in (None, 8000)}  # fmt: skip
    inner = (slice(None), slice(None), *[slice(6, -6)] * 3)
    errors = {cap: (affine_flow(t, size) - affine_flow(theta, size))[inner].norm(dim=1).mean()
              for cap, t in found.items()}  # fmt: skip
    assert affine_flow(theta, size)[inner].norm(dim=1).mean() > 2.5  # px to recover
    # Measured: 0.046 px from (20, 22, 18) (0.001 px at full size): the deformable stage after
    # it takes the rest.
    assert errors[8000] < 0.1
    assert errors[None] < 0.01


def test_2d_results_do_not_depend_on_the_cap():
    g = torch.Generator().manual_seed(1)
    fixed, moving = torch.rand(2, 1, 48, 40, generator=g), torch.rand(2, 1, 48, 40, generator=g)
    a = estimate_affine(fixed, moving, steps=5)
    b = estimate_affine(fixed, moving, steps=5, max_voxels=None)
    assert torch.equal(a, b)


# -- the fused 2-D stage (speed.refine_loop.adam_affine_level, csrc/affine_loop.cpp) ----------
def _adam_reference(matrix, shift, m, v, t, f, mv, scale, steps, lr, similarity):
    """``steps`` of estimate_affine's torch loop from a given Adam state: autograd through
    ``warp`` (grid_sample) and torch.optim.Adam's update, written out on the six numbers."""
    matrix, shift, m, v = (x.clone() for x in (matrix, shift, m, v))
    for k in range(steps):
        a = matrix.clone().requires_grad_(True)
        s = shift.clone().requires_grad_(True)
        theta = torch.cat([a, (s * torch.tensor(scale))[:, :, None]], 2)
        loss = similarity(warp(mv, affine_flow(theta, tuple(f.shape[2:]))), f)
        (len(f) * loss).backward()
        g = torch.cat([a.grad.flatten(1), s.grad], 1)
        step = t + k + 1
        m = m.lerp(g, 0.1)
        v = v * 0.999 + 0.001 * g * g
        denom = v.sqrt() / (1 - 0.999**step) ** 0.5 + 1e-8
        lrs = torch.tensor([lr[0]] * 4 + [lr[1]] * 2)
        new = torch.cat([matrix.flatten(1), shift], 1) - lrs / (1 - 0.9**step) * m / denom
        matrix, shift = new[:, :4].view(-1, 2, 2), new[:, 4:]
    return matrix, shift, m, v


@needs_kernel
@pytest.mark.parametrize("similarity", [MSE(), MutualInformation()], ids=["mse", "mi"])
def test_the_fused_level_is_autograd_and_adam(similarity):
    g = torch.Generator().manual_seed(3)
    size, full = (30, 26), (60, 52)
    f = CoarseToDense(in_size=(5, 4), out_size=size, mode="bicubic")(
        torch.rand(2, 1, 5, 4, generator=g)).clamp(0, 1)  # fmt: skip
    mv = warp(f, 1.5 * torch.randn(2, 2, 1, 1, generator=g).expand(2, 2, *size))
    matrix = torch.eye(2) + 0.05 * torch.randn(2, 2, 2, generator=g)
    shift = 3 * torch.randn(2, 2, generator=g) + 0.37  # off the integer positions
    m, v = 1e-3 * torch.randn(2, 6, generator=g), 1e-5 * torch.rand(2, 6, generator=g) + 1e-6
    scale = (size[0] / full[0], size[1] / full[1])
    want = _adam_reference(matrix, shift, m, v, 7, f, mv, scale, 3, AFFINE_LR, similarity)
    got = [x.clone() for x in (matrix, shift, m, v)]
    t = refine_loop.adam_affine_level(*got, 7, f, mv, scale=scale, steps=3, lr=AFFINE_LR,
                                      similarity=similarity)  # fmt: skip
    assert t == 10
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-6)
    assert not torch.equal(got[0], matrix)  # it moved


@needs_kernel
def test_the_fused_stage_recovers_a_known_2d_affine_as_the_torch_one():
    theta = torch.tensor([[[1.05, 0.04, 2.5], [-0.03, 0.96, -3.0]]])
    g = torch.Generator().manual_seed(0)
    size = (64, 56)
    moving = CoarseToDense(in_size=(6, 5), out_size=size, mode="bicubic")(
        torch.rand(1, 1, 6, 5, generator=g)).clamp(0, 1)  # fmt: skip
    fixed = warp(moving, affine_flow(theta, size))
    before = kernels.calls().get("affine_level", {}).get("fused", 0)
    fused = estimate_affine(fixed, moving, steps=60)
    assert kernels.calls()["affine_level"]["fused"] == before + len(pyramid(size, 3, 16))
    with refine_loop.per_op():
        ref = estimate_affine(fixed, moving, steps=60)
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    truth = affine_flow(theta, size)
    err = {k: (affine_flow(t, size) - truth)[inner].norm(dim=1).mean()
           for k, t in (("fused", fused), ("torch", ref))}  # fmt: skip
    assert truth[inner].norm(dim=1).mean() > 3.0
    assert err["fused"] < 0.1, err
    assert err["torch"] < 0.1, err


@needs_kernel
def test_the_fused_level_names_bad_shapes():
    f = torch.rand(1, 1, 20, 20)
    with pytest.raises(UserError, match="shapes do not fit"):
        refine_loop.adam_affine_level(torch.eye(2)[None], torch.zeros(1, 3), torch.zeros(1, 6),
                                      torch.zeros(1, 6), 0, f, f, scale=(1.0, 1.0), steps=1,
                                      lr=AFFINE_LR)  # fmt: skip


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_min_px_stops_nearly_aligned_pairs_after_the_coarsest_level(fused):
    g = torch.Generator().manual_seed(2)
    size = (64, 56)
    moving = CoarseToDense(in_size=(6, 5), out_size=size, mode="bicubic")(
        torch.rand(2, 1, 6, 5, generator=g)).clamp(0, 1)  # fmt: skip
    theta = torch.tensor([[[1.08, 0.06, 6.0], [-0.05, 0.94, -5.0]],
                          [[1.0, 0.0, 0.5], [0.0, 1.0, -0.4]]])  # fmt: skip
    fixed = warp(moving, affine_flow(theta, size))
    path = contextlib.nullcontext() if fused else refine_loop.per_op()
    with path:
        free = estimate_affine(fixed, moving, steps=20)
        gated = estimate_affine(fixed, moving, steps=20, min_px=5.0)
        before = kernels.calls().get("affine_level", {}).get("fused", 0)
        alone = estimate_affine(fixed[1:], moving[1:], steps=20, min_px=5.0)
        levels = kernels.calls().get("affine_level", {}).get("fused", 0) - before
    torch.testing.assert_close(gated[:1], free[:1])  # the large motion runs every level
    assert torch.equal(gated[1:], torch.eye(2, 3)[None])  # the 0.6 px one: the identity
    assert torch.equal(alone, torch.eye(2, 3)[None])
    assert levels == (1 if fused else 0)  # alone, it stopped after the coarsest level


@pytest.mark.parametrize("size", [(160, 208), (28, 28), (40, 44, 36)])
def test_the_largest_displacement_is_read_at_the_corners(size):
    g = torch.Generator().manual_seed(0)
    nd = len(size)
    theta = torch.cat([torch.eye(nd) + 0.1 * torch.randn(4, nd, nd, generator=g),
                       5 * torch.randn(4, nd, 1, generator=g)], 2)  # fmt: skip
    everywhere = affine_flow(theta, size).norm(dim=1).flatten(1).amax(1)
    torch.testing.assert_close(affine_reach(theta, size), everywhere)
