"""refine's affine stage (``estimate_affine``): on large volumes its pyramid starts from the
images halved to at most ``max_voxels`` voxels, which leaves 2-D images up to 512 x 512 alone
and still recovers a known affine."""

import pytest
import torch

from air_reg.models.components.spatial_transformer import CoarseToDense, warp
from air_reg.refine import affine_flow
from air_reg.refine.flows import pyramid
from air_reg.refine.optimise import AFFINE_MAX_VOXELS, _affine_top, estimate_affine


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
