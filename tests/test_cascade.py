"""The cascade's affine option (``apply_repeatedly(..., affine=True)``, ``cascade_affine``):
``fit_affine`` recovers an affine field, robustly, in 2-D and 3-D, and a network's
``default_cascade`` is what ``load_model`` applies unless told otherwise; one-shot, the
``prealign`` affine stage before the network."""

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
from air_reg.refine import keep_if_better, optimise, registrar
from air_reg.refine.flows import FIT_POINTS, affine_flow, apply_repeatedly, compose, fit_affine
from air_reg.refine.registrar import Registrar
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


def _rotated_pair(size: tuple[int, int], degrees: float, shift: tuple[float, float]):
    """A smooth random image and it under a rotation about the centre plus a shift (px): the
    true flow ``affine_flow(theta)`` and the pair (fixed, moving), fixed = moving warped."""
    g = torch.Generator().manual_seed(7)
    moving = torch.nn.functional.avg_pool2d(torch.rand(1, 1, *size, generator=g), 9, 1, 4)
    moving = (moving - moving.min()) / (moving.max() - moving.min())
    a = torch.tensor(degrees).deg2rad()
    theta = torch.tensor([[[a.cos(), -a.sin(), shift[0]], [a.sin(), a.cos(), shift[1]]]])
    flow = affine_flow(theta, size)
    return warp(moving, flow), moving, flow


def test_prealign_aligns_a_large_rigid_motion_before_the_network():
    """One-shot with ``prealign``: the network sees the moving image after a mutual-information
    affine stage, and the flow is composed with it (``after_affine``); kept only where the
    network's own first pass sees more than ``PREALIGN_AGREE_PX`` of affine motion too."""
    fixed, moving, flow = _rotated_pair((160, 192), 10.0, (9.0, -7.0))
    zeros = torch.zeros(1, 2, 160, 192)
    net = Sequence(0.6 * flow, zeros)  # first pass: a large motion, then nothing left
    with torch.no_grad():
        got = Registrar(net, prealign=15)(fixed, moving)
    assert torch.equal(net.seen[0], moving)  # the check: the unaligned pair
    assert not torch.equal(net.seen[1], moving)  # then the pair aligned by the affine
    inner = (slice(None), slice(None), slice(20, -20), slice(20, -20))
    error = (got - flow)[inner].norm(dim=1).mean()
    assert error < 0.1 * flow[inner].norm(dim=1).mean()  # the affine found (of ~17 px)
    # the network sees little motion (a contrast change the MI affine may misread): no affine
    blind = Sequence(zeros, zeros)
    assert not Registrar(blind, prealign=15)(fixed, moving).any()
    assert len(blind.seen) == 1  # its first pass was the check, and is not run again
    cascaded = Sequence(zeros, zeros, zeros)  # with passes to go: on from the first one
    assert not Registrar(cascaded, cascade=2, prealign=15)(fixed, moving).any()
    assert len(cascaded.seen) == 2
    torch.testing.assert_close(cascaded.seen[1], moving)  # the second pass, unaligned pair
    # the network's first pass sees part of the motion: the affine is kept above
    # PREALIGN_AGREE_PX (4.5 px; 8 px before 2026-12-07) of affine motion seen, not below
    reach = optimise.affine_reach(fit_affine(flow), (160, 192)).item()
    for seen, kept in ((6.0, True), (4.0, False)):
        part = Sequence(seen / reach * flow, zeros)
        with torch.no_grad():
            out = Registrar(part, prealign=15)(fixed, moving)
        torch.testing.assert_close(out, got if kept else seen / reach * flow)
    assert registrar.PREALIGN_AGREE_PX == 4.5
    without = Registrar(Sequence(zeros))(fixed, moving)
    assert not without.any()  # prealign 0 (a Registrar's default): the network alone
    # one_shot (register's path for pairs of any size) does the same through network_flow
    net = Sequence(0.6 * flow, zeros)
    net.image_size, net.accepts_any_size = (160, 192), True
    assert torch.allclose(Registrar(net, prealign=15).one_shot(fixed, moving), got)


def test_prealign_leaves_small_images_and_aligned_pairs_alone():
    fixed, moving, _ = _rotated_pair((96, 120), 10.0, (9.0, -7.0))  # short side < 128
    assert min(fixed.shape[2:]) < optimise.PREALIGN_MIN_SIDE
    assert optimise.prealign_affine(fixed, moving, 15) is None
    fixed, moving, _ = _rotated_pair((160, 192), 0.5, (1.0, 0.5))  # under 8 px everywhere
    assert optimise.prealign_affine(fixed, moving, 15) is None
    assert optimise.prealign_affine(moving, moving, 15) is None  # an image on itself


def test_prealign_is_the_networks_own_unless_told():
    path = shipped_weights(default_weights())
    assert air_reg.load_model(path).prealign == 15  # AiR-Match on images
    assert air_reg.load_model(path, prealign=0).prealign == 0
    assert air_reg.load_model(shipped_weights("air_unet_mnist")).prealign == 0
    assert contract.default_prealign(None) == 0
    for bad_value in (-1, 1.5, True):
        bad = nn.Identity()
        bad.default_prealign = bad_value
        with pytest.raises(contract.ContractError, match="default_prealign"):
            contract.default_prealign(bad)
        with pytest.raises(ConfigError, match="prealign"):
            Registrar(nn.Identity(), prealign=bad_value)


def test_prealign_in_a_batch_is_each_pair_alone():
    """A batch mixing a large motion and an aligned pair: each pair's flow is the one it gets
    alone (the network's check runs on the pairs the affine would move)."""
    model = air_reg.load_model(shipped_weights(default_weights()))
    fixed, moving, _ = _rotated_pair((160, 192), 12.0, (10.0, -8.0))
    pairs = [(fixed, moving), (moving, moving)]
    with torch.no_grad():
        alone = [model(f, m) for f, m in pairs]
        both = model(torch.cat([fixed, moving]), torch.cat([moving, moving]))
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], alone[i], atol=1e-3, rtol=0)
    assert alone[0].abs().amax() > 8  # the large motion was registered, not left alone


def test_a_batch_reaches_the_network_a_few_pairs_a_call(monkeypatch):
    """On CPU a ``Registrar`` gives its network at most ``CPU_CALL_PIXELS`` pixels a call (the
    features of a large batch leave the caches: docs/speed.md, "Inference"); the flows are
    those of the whole batch in one call, pair for pair."""
    model = air_reg.load_model(shipped_weights(default_weights()))
    g = torch.Generator().manual_seed(4)
    images = torch.nn.functional.avg_pool2d(torch.rand(6, 1, 40, 48, generator=g), 5, 1, 2)
    fixed, moving = images[:3], images[3:]
    with torch.no_grad():
        whole = model(fixed, moving)
    monkeypatch.setattr(registrar, "CPU_CALL_PIXELS", 2 * 40 * 48 + 1)
    calls = []
    hook = model.net.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    with torch.no_grad():
        chunked = model(fixed, moving)
    hook.remove()
    ones = calls.index(1)  # pairs 0-1 (all their passes), then pair 2 alone
    assert set(calls[:ones]) == {2}
    assert set(calls[ones:]) == {1}
    torch.testing.assert_close(chunked, whole, atol=1e-3, rtol=0)  # float order only
    assert registrar.pairs_per_call(fixed) == 2
    monkeypatch.undo()  # the default: 3 pairs of 160 x 208, 167 of 28 x 28, 1 of 512 x 512
    assert registrar.pairs_per_call(torch.zeros(9, 1, 160, 208)) == 3
    assert registrar.pairs_per_call(torch.zeros(500, 1, 28, 28)) == 167
    assert registrar.pairs_per_call(torch.zeros(2, 1, 512, 512)) == 1


def test_coarse_size_from_the_long_side():
    assert registrar.COARSE_SIDE == 256
    assert registrar.coarse_size((512, 512)) == (256, 256)
    assert registrar.coarse_size((320, 416)) == (197, 256)
    assert registrar.coarse_size((160, 208)) is None  # shrunk by less than a quarter
    assert registrar.coarse_size((1024, 200)) == (655, 128)  # the affine stage still runs
    assert registrar.coarse_size((300, 300, 300)) is None  # volumes: not measured


def test_one_shot_on_large_images_runs_coarse_first(monkeypatch):
    """An any-size network on a pair larger than ``COARSE_SIDE``: first the pair shrunk to
    ``coarse_size`` (affine stage and cascade there), its flow brought to full size, then the
    network at full size on the moving image warped by it, the two composed."""
    g = torch.Generator().manual_seed(3)
    fixed, moving = torch.nn.functional.avg_pool2d(
        torch.rand(2, 1, 320, 416, generator=g), 9, 1, 4
    )
    small = torch.zeros(1, 2, 197, 256)
    small[:, 0], small[:, 1] = 4.0, -5.0  # a shift in coarse pixels: > COARSE_MIN_PX at full size
    step = torch.zeros(1, 2, 320, 416)
    step[:, 1] = 0.25  # what the full-size pass adds
    net = Sequence(small, step)
    net.image_size, net.accepts_any_size = (128, 128), True
    with torch.no_grad():
        flow = Registrar(net)(fixed[None], moving[None])
    assert [tuple(x.shape[2:]) for x in net.seen] == [(197, 256), (320, 416)]
    coarse = torch.stack(
        [torch.full((320, 416), 4.0 * 320 / 197), torch.full((320, 416), -5.0 * 416 / 256)]
    )
    torch.testing.assert_close(net.seen[1], warp(moving[None], coarse[None]))
    torch.testing.assert_close(
        flow[0], coarse + torch.stack([torch.zeros(320, 416), torch.full((320, 416), 0.25)])
    )
    # a coarse flow that moves no pixel by more than COARSE_MIN_PX (4.5 px): the pair at its
    # own size alone, as without the stage
    net = Sequence(small / 4, step)
    net.image_size, net.accepts_any_size = (128, 128), True
    with torch.no_grad():
        torch.testing.assert_close(Registrar(net)(fixed[None], moving[None]), step)
    assert [tuple(x.shape[2:]) for x in net.seen] == [(197, 256), (320, 416)]
    torch.testing.assert_close(net.seen[1], moving[None])
    monkeypatch.setattr(registrar, "COARSE_SIDE", None)  # off: the pair at its own size only
    net = Sequence(step)
    net.image_size, net.accepts_any_size = (128, 128), True
    with torch.no_grad():
        torch.testing.assert_close(Registrar(net)(fixed[None], moving[None]), step)
    assert [tuple(x.shape[2:]) for x in net.seen] == [(320, 416)]


@pytest.mark.slow
def test_the_shipped_model_registers_a_large_rotation_on_a_large_image(monkeypatch):
    # 5 degrees about the centre and (6, -4) px at 320 x 416 (up to 30 px): coarse first, the
    # one-shot lands within 0.5 px (0.1), closer than at its own size only (3.8)
    fixed, moving, flow = _rotated_pair((320, 416), 5.0, (6.0, -4.0))
    model = air_reg.load_model(shipped_weights(default_weights()))
    inner = (slice(None), slice(None), slice(40, -40), slice(40, -40))

    def error() -> float:
        with torch.no_grad():
            return (model(fixed, moving) - flow)[inner].norm(dim=1).mean().item()

    coarse_first = error()
    monkeypatch.setattr(registrar, "COARSE_SIDE", None)
    assert coarse_first < 0.5
    assert error() > 2 * coarse_first
