"""The cascade's affine option (``apply_repeatedly(..., affine=True)``, ``cascade_affine``):
``fit_affine`` recovers an affine field, robustly, in 2-D and 3-D, and a network's
``default_cascade`` is what ``load_model`` applies unless told otherwise."""

from __future__ import annotations

import pytest
import torch
from conftest import Sequence
from torch import nn

import air_reg
from air_reg.checkpoint import shipped_weights
from air_reg.errors import ConfigError
from air_reg.models import contract
from air_reg.models.components.spatial_transformer import warp
from air_reg.refine import keep_if_better
from air_reg.refine.flows import FIT_POINTS, affine_flow, apply_repeatedly, compose, fit_affine
from air_reg.zoo import default_weights


def _theta(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, d + 1)
    return eye + 0.05 * torch.randn(2, d, d + 1, generator=g) * torch.tensor([1.0] * d + [60.0])


@pytest.mark.parametrize("size", [(40, 52), (12, 14, 16), (300, 260)])
def test_fit_affine_recovers_an_affine_field(size):
    # (300, 260) has more than FIT_POINTS pixels: fitted on a subgrid, still exact
    theta = _theta(len(size), 0)
    fitted = fit_affine(affine_flow(theta, size))
    assert torch.allclose(fitted, theta, atol=1e-4)
    assert FIT_POINTS < 300 * 260
    assert fitted.shape == (2, len(size), len(size) + 1)


def test_fit_affine_ignores_a_region_the_flow_gets_wrong():
    theta = _theta(2, 1)
    flow = affine_flow(theta, (64, 64))
    wrong = flow.clone()
    wrong[:, :, :16] = torch.randn(2, 2, 16, 64, generator=torch.Generator().manual_seed(5)) * 20
    robust = affine_flow(fit_affine(wrong), (64, 64))
    plain = affine_flow(fit_affine(wrong, iterations=0), (64, 64))  # least squares alone
    err = lambda f: (f - flow).norm(dim=1).mean().item()  # noqa: E731
    assert err(robust) < 0.25 * err(plain)
    assert err(robust) < 0.3


def test_affine_cascade_starts_each_pass_from_the_fit():
    moving = torch.rand(2, 1, 24, 30, generator=torch.Generator().manual_seed(0))
    first = affine_flow(_theta(2, 2), (24, 30)) + 0.3 * torch.randn(2, 2, 24, 30)
    second = 0.2 * torch.randn(2, 2, 24, 30)
    net = Sequence(first, second)
    total = apply_repeatedly(net, moving, moving, 2, affine=True)
    start = affine_flow(fit_affine(first), (24, 30))
    assert torch.allclose(net.seen[1], warp(moving, start))
    assert torch.allclose(total, compose(start, second))
    # without the option: the plain composition, as before
    plain = apply_repeatedly(Sequence(first, second), moving, moving, 2)
    assert torch.allclose(plain, compose(first, second))


def test_default_cascade_is_read_from_the_network_and_overridden_by_the_switches():
    path = shipped_weights(default_weights())
    default = air_reg.load_model(path)
    assert (default.cascade, default.cascade_affine, default.cascade_tol) == (6, True, 0.25)
    one = air_reg.load_model(path, cascade=1, cascade_affine=False, cascade_tol=0)
    assert (one.cascade, one.cascade_affine, one.cascade_tol, one.settings) == (1, False, 0, None)
    digits = air_reg.load_model(shipped_weights("air_unet_mnist"))
    assert (digits.cascade, digits.cascade_affine, digits.cascade_tol) == (1, False, 0.0)
    assert contract.default_cascade(None) == (1, False, 0.0)
    two = nn.Identity()
    two.default_cascade = (3, True)  # a 2-tuple: no early stop
    assert contract.default_cascade(two) == (3, True, 0.0)
    for bad_value in [(0, True), (3, True, -1.0), (3, True, 0.5, 1)]:
        bad = nn.Identity()
        bad.default_cascade = bad_value
        with pytest.raises(contract.ContractError, match="default_cascade"):
            contract.default_cascade(bad)


def test_cascade_tol_stops_each_pair_once_a_pass_moves_it_little():
    # pair 0 keeps moving by 1 px a pass, pair 1 stops after its second pass moved it 0.1 px
    moving = torch.rand(2, 1, 16, 18, generator=torch.Generator().manual_seed(1))
    big, small = torch.zeros(2, 16, 18), torch.zeros(2, 16, 18)
    big[0], small[0] = 1.0, 0.1  # shifts along rows

    class Steps(nn.Module):  # the flow it returns depends on how many pairs it is given
        def __init__(self):
            super().__init__()
            self.batches = []

        def forward(self, fixed, moving):
            self.batches.append(len(fixed))
            if len(self.batches) == 1:
                return torch.stack([big, big])
            return torch.stack([big, small])[: len(fixed)]

    net = Steps()
    flow = apply_repeatedly(net, moving, moving, 4, tol=0.25)
    assert net.batches == [2, 2, 1, 1]  # pair 1 left after pass 2
    torch.testing.assert_close(flow[0, 0], torch.full((16, 18), 4.0))  # 4 passes of 1 px
    torch.testing.assert_close(flow[1, 0], torch.full((16, 18), 1.1))  # 1 + 0.1, then stopped
    always = apply_repeatedly(Steps(), moving, moving, 4)  # tol 0: every pass for every pair
    torch.testing.assert_close(always[1, 0], torch.full((16, 18), 1.3))
    with pytest.raises(ConfigError, match="cascade_tol"):
        apply_repeatedly(net, moving, moving, 2, tol=-1)


def test_the_default_model_keeps_an_image_on_itself_and_finds_a_shift():
    model = air_reg.load_model(shipped_weights(default_weights()))
    g = torch.Generator().manual_seed(3)
    image = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 72, 88, generator=g), 5, 1, 2)
    shift = torch.tensor([3.0, -4.0]).view(1, 2, 1, 1).expand(1, 2, 72, 88)
    fixed = warp(image, shift)  # fixed(p) = image(p + shift)
    with torch.no_grad():
        itself = keep_if_better(model(image, image), image, image, model.guard_similarity)[0]
        found = model(fixed, image)
    assert not itself.any()  # the guard (as register runs it): the identity, exactly
    assert (found - shift)[..., 12:-12, 12:-12].norm(dim=1).mean() < 0.5  # px, of 5
