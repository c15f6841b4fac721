"""Instance optimisation (refine), flow composition (apply_repeatedly: the CLI's cascade) and
the Registrar that refines a network's flow."""

import pytest
import torch
from conftest import Sequence

from air_reg import warp
from air_reg.data.synthetic import make_flows, make_pairs
from air_reg.losses import MSE, Diffusion
from air_reg.metrics import folding
from air_reg.models.components.air import AiR
from air_reg.models.components.spatial_transformer import CoarseToDense, integrate_velocity
from air_reg.models.registration_module import RegistrationModule
from air_reg.refine import (
    LEGACY_DEFAULTS,
    RefineSettings,
    Registrar,
    apply_repeatedly,
    compose,
    refine,
    velocity_from_flow,
)

SIZE = 28
# One level, one value per pixel, reg_weight 0.05, no fold penalty, no guard: the objective
# that ``objective`` below computes.
PLAIN = LEGACY_DEFAULTS


def synthetic_pairs(n: int, magnitude: float = 1.5, seed: int = 0):
    """(fixed, moving, flow) with fixed = moving warped by a smooth random flow."""
    return make_pairs(n, SIZE, magnitude, torch.Generator().manual_seed(seed))[:3]


def objective(fixed, moving, flow, reg_weight=0.05) -> torch.Tensor:
    """Sum over pairs of MSE + reg_weight * Diffusion, one pair at a time."""
    return sum(
        MSE()(warp(moving[i : i + 1], flow[i : i + 1]), fixed[i : i + 1])
        + reg_weight * Diffusion()(flow[i : i + 1])
        for i in range(len(fixed))
    )


def affine_field(a, t) -> torch.Tensor:
    """Displacement f(p) = A p + t on the grid, (1, 2, SIZE, SIZE); p = (row, col)."""
    axis = torch.arange(SIZE, dtype=torch.float32)
    p = torch.stack(torch.meshgrid(axis, axis, indexing="ij"))  # (2, H, W)
    a, t = torch.tensor(a), torch.tensor(t)
    return (torch.einsum("ij,jhw->ihw", a, p) + t[:, None, None])[None]


# -- refine ------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_refinement_lowers_the_loss(optimizer):
    fixed, moving, _ = synthetic_pairs(4)
    zero = torch.zeros(4, 2, SIZE, SIZE)
    flow = refine(fixed, moving, zero, PLAIN.replace(steps=20, optimizer=optimizer))
    assert not flow.requires_grad
    assert objective(fixed, moving, flow) < 0.5 * objective(fixed, moving, zero)


def test_pairs_are_refined_independently_of_the_batch():
    fixed, moving, _ = synthetic_pairs(3)
    settings = PLAIN.replace(steps=15)
    batch = refine(fixed, moving, None, settings)
    alone = refine(fixed[:1], moving[:1], None, settings)
    # sum of per-pair means: pair 0's gradient does not depend on the batch size, up to the
    # float32 rounding of the 1 / B normalisations (Adam's normalised steps magnify it a bit)
    assert torch.allclose(batch[:1], alone, atol=5e-4)
    assert not torch.allclose(batch[1:2], alone, atol=5e-2)  # pairs 0 and 1 differ


def test_zero_steps_return_the_initial_flow_and_grids_fit_exactly():
    fixed, moving, flow = synthetic_pairs(2)
    assert torch.equal(refine(fixed, moving, flow, PLAIN.replace(steps=0)), flow)
    # A field the 7x7 B-spline grid can represent is recovered by the least-squares fit.
    up = CoarseToDense(in_size=(7, 7), out_size=(SIZE, SIZE), mode="bspline")
    smooth = up(torch.randn(2, 2, 7, 7))
    out = refine(fixed, moving, smooth, PLAIN.replace(steps=0, grid=7))
    assert torch.allclose(out, smooth, atol=1e-4)


def test_refinement_runs_under_inference_mode():
    fixed, moving, _ = synthetic_pairs(2)
    with torch.inference_mode():
        flow = refine(fixed, moving, None, PLAIN.replace(steps=10))
    zero = torch.zeros_like(flow)
    assert objective(fixed, moving, flow) < objective(fixed, moving, zero)


def test_diffeomorphic_refinement_does_not_fold_a_large_field():
    # magnitude 5: displacements up to ~7 px on 28x28; the true flow itself folds
    fixed, moving, truth = synthetic_pairs(6, magnitude=5.0)
    assert folding(truth).max() > 0
    flow = refine(fixed, moving, None, RefineSettings.preset("diffeomorphic", steps=50))
    assert folding(flow).max() == 0
    before = objective(fixed, moving, torch.zeros_like(flow), reg_weight=0)
    assert objective(fixed, moving, flow, reg_weight=0) < 0.1 * before
    # the same problem without integration or regularisation does fold
    plain = refine(fixed, moving, None, PLAIN.replace(steps=50, reg_weight=0.0))
    assert folding(plain).max() > 0


def test_fold_penalty_removes_folds_of_a_plain_field():
    fixed, moving, _ = synthetic_pairs(6, magnitude=5.0)
    plain = refine(fixed, moving, None, PLAIN.replace(steps=50, reg_weight=0.0))
    penalised = refine(
        fixed, moving, None, PLAIN.replace(steps=50, reg_weight=0.0, fold_weight=20.0)
    )
    assert folding(penalised).mean() < 0.5 * folding(plain).mean()


def test_velocity_from_flow_inverts_scaling_and_squaring():
    flow = make_flows(4, SIZE, 3.0, torch.Generator().manual_seed(1))
    velocity = velocity_from_flow(flow, 7)
    first_order = (integrate_velocity(flow, 7) - flow).abs().mean()
    assert (integrate_velocity(velocity, 7) - flow).abs().mean() < 0.3 * first_order


def test_bad_arguments_are_rejected():
    fixed, moving, _ = synthetic_pairs(1)
    with pytest.raises(ValueError, match="optimizer"):
        PLAIN.replace(optimizer="sgd")
    with pytest.raises(ValueError, match="k >= 1"):
        apply_repeatedly(Sequence(), fixed, moving, 0)
    with pytest.raises(ValueError, match="k >= 1"):
        Registrar(Sequence(), PLAIN, cascade=0)


# -- composition and apply_repeatedly (cascade) ----------------------------------------------
def test_constant_shifts_compose_to_their_sum():
    f1 = torch.tensor([1.5, -2.0])[None, :, None, None].expand(2, 2, SIZE, SIZE)
    f2 = torch.tensor([-0.5, 3.0])[None, :, None, None].expand(2, 2, SIZE, SIZE)
    assert torch.allclose(compose(f1, f2), f1 + f2)


def test_affine_fields_compose_as_phi1_after_phi2():
    # f1 = A1 p + t1, f2 = A2 p + t2: total(p) = f2(p) + f1(p + f2(p)), bilinear-exact inside
    a1, t1 = [[0.05, -0.1], [0.08, 0.02]], [1.0, -0.5]
    a2, t2 = [[-0.06, 0.0], [0.1, 0.04]], [0.5, 1.0]
    f1, f2 = affine_field(a1, t1), affine_field(a2, t2)
    p = affine_field([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])  # the positions themselves
    q = p + f2  # where the second warp samples
    t = torch.tensor(t1)[None, :, None, None]
    expected = f2 + torch.einsum("ij,bjhw->bihw", torch.tensor(a1), q) + t  # f2 + f1(q)
    inside = (slice(None), slice(None), slice(6, 22), slice(6, 22))  # p + f2(p) stays inside
    assert torch.allclose(compose(f1, f2)[inside], expected[inside], atol=1e-4)
    # the other order, f1(p) + f2(p + f1(p)), is a different field
    assert not torch.allclose(compose(f2, f1)[inside], expected[inside], atol=1e-2)
    # and warping twice equals warping once by the composition (linear image: exact)
    ramp = (p[:, :1] + 2 * p[:, 1:]) / (3 * SIZE)  # (1, 1, H, W)
    twice = warp(warp(ramp, f1), f2)
    assert torch.allclose(twice[inside], warp(ramp, compose(f1, f2))[inside], atol=1e-5)


def test_apply_repeatedly_composes_and_warps_the_original_image():
    fixed, moving, _ = synthetic_pairs(2)
    f1 = make_flows(2, SIZE, 1.0, torch.Generator().manual_seed(2))
    f2 = make_flows(2, SIZE, 1.0, torch.Generator().manual_seed(3))
    net = Sequence(f1, f2)
    total = apply_repeatedly(net, fixed, moving, 2)
    assert torch.allclose(total, f2 + warp(f1, f2))
    assert torch.equal(net.seen[0], moving)
    assert torch.allclose(net.seen[1], warp(moving, f1))


def test_applying_once_is_the_network_flow():
    net = AiR(image_size=SIZE, patch_size=7).eval()
    fixed, moving, _ = synthetic_pairs(2)
    with torch.no_grad():
        assert torch.equal(apply_repeatedly(net, fixed, moving, 1), net(fixed, moving))


# -- Registrar ------------------------------------------------------------------------------
def test_registrar_leaves_the_network_untouched():
    net = AiR(image_size=SIZE, patch_size=7)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    refiner = Registrar(net, PLAIN.replace(steps=10)).train()
    assert not net.training  # dropout stays off even in train mode
    fixed, moving, _ = synthetic_pairs(3)
    flow = refiner(fixed, moving)
    assert flow.shape == (3, 2, SIZE, SIZE)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        start = net(fixed, moving)
    assert objective(fixed, moving, flow) < objective(fixed, moving, start)


def test_registrar_wraps_a_module_and_keeps_it_diffeomorphic():
    net = AiR(image_size=SIZE, patch_size=7, integration_steps=5)
    module = RegistrationModule(net=net, loss=MSE(), optimizer=torch.optim.Adam)
    refiner = Registrar(module, PLAIN.replace(steps=5, grid=7, integration_steps=None))
    assert refiner.integration_steps == 5
    fixed, moving, _ = synthetic_pairs(2)
    with torch.inference_mode():
        flow = refiner(fixed, moving)
    assert flow.shape == (2, 2, SIZE, SIZE)
    assert torch.isfinite(flow).all()
