"""Similarities for images of different contrast: Mattes' Parzen-window mutual information and
normalised gradient fields. Values, exact gradients, per-pair independence, O(N) memory, and
refinement and its guard under a contrast change."""

from __future__ import annotations

import logging

import pytest
import torch

from air_reg import warp
from air_reg.errors import ConfigError
from air_reg.losses import MutualInformation, NormalisedGradientFields
from air_reg.models.components.spatial_transformer import CoarseToDense, integrate_velocity
from air_reg.refine import SIMILARITIES, RefineSettings, keep_if_better, refine

H, W = 64, 56
MI_KINDS = {
    "mi": MutualInformation(normalised=False),
    "mi-bspline": MutualInformation(normalised=False, fixed_window="bspline"),
    "nmi": MutualInformation(),
    "nmi-bspline": MutualInformation(fixed_window="bspline"),
    "mi-sampled": MutualInformation(normalised=False, sampling=0.5),
}


def smooth_images(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(n, 1, H, W) smooth textured images in [0, 1]: detail every 4 px (MI and NGF need
    structure; on smoother textures, 8 px, neither beats the identity at this size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 16, 14, generator=g, dtype=torch.float64)
    images = CoarseToDense(in_size=(16, 14), out_size=(H, W), mode="bicubic").double()(coarse)
    lo, hi = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
    return ((images - lo) / (hi - lo)).to(dtype)


def t2_like(x: torch.Tensor) -> torch.Tensor:
    """A non-monotonic remap: dark stays dark, then bright falls to dark (T1 -> T2-like)."""
    return torch.where(x < 0.2, x, 1.2 - x)


def known_field(n: int, magnitude: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    velocity = CoarseToDense(in_size=(4, 4), out_size=(H, W), mode="bspline")(
        torch.randn(n, 2, 4, 4, generator=g) * magnitude
    )
    return integrate_velocity(velocity, 7)


def epe(flow: torch.Tensor, target: torch.Tensor) -> float:
    inside = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # away from the border
    return (flow - target)[inside].norm(dim=1).mean().item()


# -- values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mi", MI_KINDS.values(), ids=MI_KINDS.keys())
def test_mi_is_highest_for_the_image_itself_and_falls_with_a_shift(mi):
    x = smooth_images(2)
    values = [mi.mutual_information(torch.roll(x, s, -1), x) for s in (0, 1, 3, 8)]
    for nearer, further in zip(values, values[1:], strict=False):
        assert (nearer > further).all()
    floor = 1.0 if mi.normalised else 0.0  # NMI of independent images is 1
    noise = mi.mutual_information(torch.rand_like(x), x)
    assert (noise - floor < 0.3 * (values[0] - floor)).all()


def test_mi_of_an_image_with_itself_is_at_most_its_entropy():
    x = smooth_images(2)
    bins = ((x - x.amin()) / (x.amax() - x.amin()) * 32).long().clamp(0, 31).flatten(1)
    p = torch.stack([torch.bincount(b, minlength=32) for b in bins]).double() / bins.shape[1]
    entropy = -torch.special.xlogy(p, p).sum(1)
    itself = MutualInformation(normalised=False).mutual_information(x.double(), x.double())
    assert (itself <= entropy + 1e-9).all()
    assert (itself > 0.6 * entropy).all()  # the cubic window blurs the moving histogram only


def test_mi_is_invariant_to_a_non_monotonic_remap_of_the_fixed_image():
    # 8 grey levels permuted (non-monotonic): the box window's joint histogram only permutes
    moving = smooth_images(2, seed=1)
    levels = (smooth_images(2, seed=2) * 7.999).floor()
    perm = torch.tensor([3.0, 7, 0, 5, 1, 6, 2, 4])
    fixed, remapped = levels / 7, perm[levels.long()] / 7
    mi = MutualInformation(normalised=False)
    torch.testing.assert_close(
        mi.mutual_information(moving, remapped), mi.mutual_information(moving, fixed)
    )


@pytest.mark.parametrize("mi", MI_KINDS.values(), ids=MI_KINDS.keys())
def test_mi_is_invariant_to_remaps_of_the_moving_image(mi):
    x = smooth_images(2, seed=3)
    same = mi.mutual_information(x, x)
    # affine and inverted: exactly (the cubic window is symmetric)
    torch.testing.assert_close(mi.mutual_information(3 * (1 - x) + 2, x), same)
    # monotonic and non-monotonic: up to the histogram's resolution, far above a shift's value
    shifted = mi.mutual_information(torch.roll(x, 3, -1), x)
    for remap in (x.sqrt(), t2_like(x)):
        value = mi.mutual_information(remap, x)
        assert (value > shifted).all()
        assert ((value - same).abs() < 0.15 * same).all()


def test_ngf_sees_edges_whatever_their_contrast():
    x = smooth_images(2, seed=4)
    ngf = NormalisedGradientFields()
    same = ngf(x, x)
    assert ngf(1 - x, x) == pytest.approx(same.item(), abs=1e-6)  # the sign of an edge
    assert ngf(5 * x, x) == pytest.approx(same.item(), abs=1e-6)  # and its strength
    assert ngf(torch.roll(x, 3, -1), x) > same + 0.05
    with pytest.raises(ConfigError, match="eta"):
        NormalisedGradientFields(eta=0)


def test_invalid_mi_settings_are_one_line_errors():
    for kwargs, word in (({"bins": 4}, "bins"), ({"sampling": 0}, "sampling"),
                         ({"fixed_window": "gauss"}, "fixed_window")):  # fmt: skip
        with pytest.raises(ConfigError, match=word):
            MutualInformation(**kwargs)


# -- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss",
    [MutualInformation(bins=8, normalised=False), MutualInformation(bins=8, normalised=False,
     fixed_window="bspline"), MutualInformation(bins=8), NormalisedGradientFields()],
    ids=["mi", "mi-bspline", "nmi", "ngf"],
)  # fmt: skip
def test_gradients_match_finite_differences(loss):
    g = torch.Generator().manual_seed(5)
    warped = torch.rand(2, 1, 10, 9, generator=g, dtype=torch.float64, requires_grad=True)
    fixed = torch.rand(2, 1, 10, 9, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w: loss(w, fixed), (warped,))


def test_mi_directional_derivative_on_a_larger_image():
    fixed, moving = smooth_images(1, 6, torch.float64), smooth_images(1, 7, torch.float64)
    direction = torch.randn(moving.shape, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)  # fmt: skip
    loss = MutualInformation()
    x = moving.clone().requires_grad_(True)
    loss(x, fixed).backward()
    h = 1e-6
    numeric = (loss(moving + h * direction, fixed) - loss(moving - h * direction, fixed)) / (2 * h)
    assert (x.grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-4)


@pytest.mark.parametrize("loss", [MutualInformation(), NormalisedGradientFields()],
                         ids=["mi", "ngf"])  # fmt: skip
def test_a_pairs_gradient_ignores_the_other_pairs(loss):
    fixed, moving = smooth_images(3, seed=8), smooth_images(3, seed=9)
    alone = moving[:1].clone().requires_grad_(True)
    loss(alone, fixed[:1]).backward()
    batch = moving.clone().requires_grad_(True)
    (3 * loss(batch, fixed)).backward()  # refine's B x mean: each pair its own objective
    torch.testing.assert_close(batch.grad[:1], alone.grad)


def test_mi_memory_is_linear_in_the_pixels():
    """A 512 x 512 pair's saved tensors stay within ~0.2 kB per pixel: a (N, bins, bins) float
    tensor would be 4 kB per pixel, the former Gaussian windows' (N, bins) x 2 about 0.3."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    fixed, moving = torch.rand(2, 1, 1, 512, 512).unbind(0)
    moving.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = MutualInformation()(moving, fixed)
    loss.backward()
    assert sum(saved) < 200 * 512 * 512
    assert torch.isfinite(moving.grad).all()


# -- refinement and the guard --------------------------------------------------------------------
def test_the_new_similarities_are_refinement_settings():
    assert {"mi", "ngf"} <= set(SIMILARITIES)
    assert RefineSettings(similarity="ngf").similarity == "ngf"
    assert isinstance(SIMILARITIES["mi"](), MutualInformation)


@pytest.mark.parametrize(("similarity", "gain"), [("mi", 0.5), ("ngf", 0.8)])
def test_refinement_recovers_a_known_field_under_a_contrast_change(similarity, gain):
    moving = smooth_images(2, seed=10)
    target = known_field(2, 1.5, seed=11)
    fixed = t2_like(warp(moving, target))
    out = refine(fixed, moving, None, RefineSettings(steps=40, similarity=similarity))
    assert epe(out, target) < gain * epe(torch.zeros_like(target), target)


def test_guard_never_lets_mse_make_a_contrast_change_pair_worse(caplog):
    moving = smooth_images(2, seed=12)
    target = known_field(2, 0.3, seed=13)  # nearly aligned
    fixed = t2_like(warp(moving, target))
    with caplog.at_level(logging.WARNING, logger="air_reg.refine.optimise"):
        out = refine(fixed, moving, None, RefineSettings(steps=40, similarity="mse"))
    assert epe(out, target) <= epe(torch.zeros_like(target), target) + 1e-6
    unguarded = refine(fixed, moving, None, RefineSettings(steps=40, guard=False))
    assert epe(unguarded, target) > epe(torch.zeros_like(target), target)  # what it prevents
    assert "refine.similarity=mi" in caplog.text


def test_guard_judges_mi_by_mi():
    moving = smooth_images(2, seed=14)
    target = known_field(2, 1.0, seed=15)
    fixed = t2_like(warp(moving, target))
    kept, worse = keep_if_better(target, fixed, moving, "mi")
    assert not worse.any()
    torch.testing.assert_close(kept, target)
    flipped, worse = keep_if_better(-target, fixed, moving, "mi")
    assert worse.all()
    assert not flipped.any()


def test_guard_returns_the_identity_where_edges_got_worse(caplog):
    # the 233 x 197 contrast pair of experiments/refine_matrix.py on which MSE refinement also
    # raised MI (EPE 2.70 -> 7.01 px): the edges (NGF) say no, the identity, a warning
    pytest.importorskip("nilearn")
    from air_reg import load_model
    from air_reg.bench import refine_matrix as rm
    from air_reg.metrics import epe as epe_px

    size = next(s for s in rm.SIZES if s.name == "233x197")
    pairs = rm.make_pairs(size, "contrast", 8)  # the run's 8 pairs, its third
    fixed, moving, target = (pairs[k][2:3] for k in ("fixed", "moving", "flow"))
    with caplog.at_level(logging.WARNING, logger="air_reg.refine.optimise"):
        flow = load_model(None, refine_steps=60)(fixed, moving)
    assert not flow.any()
    assert "edges less aligned (NGF)" in caplog.text
    unguarded = load_model(None, refine_steps=60, guard=False)(fixed, moving)
    assert epe_px(unguarded, target).item() > 2 * epe_px(flow, target).item()
    caplog.clear()
    same = rm.make_pairs(size, "same", 8)  # the same fields, same contrast: no word
    with caplog.at_level(logging.WARNING, logger="air_reg.refine.optimise"):
        load_model(None, refine_steps=60)(same["fixed"], same["moving"])
    assert "NGF" not in caplog.text


def test_the_guards_rules_name_each_refused_pair_once():
    """guard_rejects, which keep_if_better and experiments/guard_choice.py share: a pair is
    'worse' (not improved, or NaN), else 'lost' (MI down), else 'edges' (NGF up): disjoint."""
    from air_reg.refine.optimise import GUARD_TOL, MI_GUARD_TOL, NGF_GUARD_TOL, guard_rejects

    t = torch.tensor
    # pairs: improved and fine | not improved | NaN | MI lost | edges worse | MI lost + edges
    after = t([0.5, 1.0 - GUARD_TOL / 2, float("nan"), 0.5, 0.5, 0.5])
    before = t([1.0] * 6)
    mi_after = t([1.0, 1.0, 1.0, 1.0 - 2 * MI_GUARD_TOL, 1.0, 0.0])
    mi_before = t([1.0] * 6)
    rise = t([0.0, 1.0, 1.0, 1.0, 2 * NGF_GUARD_TOL, 1.0])
    worse, lost, edges = guard_rejects(after, before, mi_after, mi_before, rise)
    assert worse.tolist() == [False, True, True, False, False, False]
    assert lost.tolist() == [False, False, False, True, False, True]
    assert edges.tolist() == [False, False, False, False, True, False]
    assert not guard_rejects(after, before, mi_after, mi_before)[2].any()  # no NGF: no rule
    assert not guard_rejects(after, before, mi_after, mi_before, rise, ngf_tol=1.0)[2].any()
