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
    assert air_reg.load_model(path).cascade == 3
    assert air_reg.load_model(path).cascade_affine
    one = air_reg.load_model(path, cascade=1, cascade_affine=False)
    assert (one.cascade, one.cascade_affine, one.settings) == (1, False, None)
    digits = air_reg.load_model(shipped_weights("air_unet_mnist"))
    assert (digits.cascade, digits.cascade_affine) == (1, False)
    assert contract.default_cascade(None) == (1, False)
    bad = nn.Identity()
    bad.default_cascade = (0, True)
    with pytest.raises(contract.ContractError, match="default_cascade"):
        contract.default_cascade(bad)


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
