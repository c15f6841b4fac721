"""The refinement switch in its three places (the Python API, eval, register), each held to
what refinement should buy on pairs with a KNOWN deformation (``make_pairs``: fixed =
warp(moving, flow), seeded).

The end-point error is read where the fixed image has an edge (|gradient| > 0.05, ~27 % of
the pixels): motion is observable only there; in the flat background every flow gives the same
image, so the error there measures the regulariser, not the registration. The network is
test_register's short synthetic DIRNet run: its one-shot flow is a weak start, which the
refinement must improve on.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from test_register import trained_checkpoint

import air_reg
from air_reg import metrics
from air_reg.data.synthetic import make_pairs
from air_reg.eval import evaluate
from air_reg.images import write_image
from air_reg.register import register

STEPS = 30


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def known():
    """(fixed, moving, true flow): 8 shapes on 28 x 28, smooth warps of std 1.5 px, seed 0."""
    fixed, moving, flow, _ = make_pairs(8, 28, 1.5, torch.Generator().manual_seed(0))
    return fixed, moving, flow


def edge_epe(flow: torch.Tensor, true: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Per-pair mean end-point error (B,) in px over the pixels where ``fixed`` has an edge."""
    grad = F.pad((fixed[..., 1:, :] - fixed[..., :-1, :]).abs(), (0, 0, 0, 1))
    grad = grad + F.pad((fixed[..., :, 1:] - fixed[..., :, :-1]).abs(), (0, 1, 0, 0))
    edge = (grad > 0.05).float()  # (B, 1, H, W)
    error = (flow - true).square().sum(1, keepdim=True).sqrt()
    return (error * edge).flatten(1).sum(1) / edge.flatten(1).sum(1)


def test_load_model_refinement_recovers_a_known_deformation(ckpt, known):
    """Measured (edge-band EPE, 8 pairs, seed 0): identity 0.782 px, one-shot 0.577 px,
    refined 30 steps 0.290 px (0.50 x one-shot, 0.37 x identity; better on all 8 pairs),
    model-free 30 steps 0.346 px (0.44 x identity). Seeds 1 and 2 give 0.38 / 0.53 x one-shot
    and 0.26 / 0.37 x identity. Margins: 0.65 x one-shot, 0.5 x identity, 0.6 x identity."""
    fixed, moving, true = known
    plain = air_reg.load_model(ckpt)
    refined = air_reg.load_model(ckpt, refine_steps=STEPS)
    assert refined.image_size == plain.image_size
    with torch.no_grad():
        one_shot = plain(fixed, moving)
    flow = refined(fixed, moving)
    model_free = air_reg.load_model(None, refine_steps=STEPS)(fixed, moving)
    assert flow.shape == (len(fixed), 2, 28, 28)

    identity_epe = edge_epe(torch.zeros_like(true), true, fixed)
    one_shot_epe, refined_epe = edge_epe(one_shot, true, fixed), edge_epe(flow, true, fixed)
    assert one_shot_epe.mean() < identity_epe.mean()  # the network learnt something
    assert refined_epe.mean() < 0.65 * one_shot_epe.mean(), (refined_epe, one_shot_epe)
    assert refined_epe.mean() < 0.5 * identity_epe.mean(), (refined_epe, identity_epe)
    assert (refined_epe < one_shot_epe).all(), (refined_epe, one_shot_epe)  # every pair
    assert edge_epe(model_free, true, fixed).mean() < 0.6 * identity_epe.mean()
    assert metrics.folding(flow).max() == 0  # the default preset is diffeomorphic


def test_eval_with_refinement_scores_better_than_one_shot(ckpt, tmp_path):
    """eval on the checkpoint's own synthetic test pairs, which carry the true flow. Measured
    (32 pairs, whole-image EPE): one-shot 0.696 px, refined 20 steps 0.457 px (0.66 x); MSE
    0.00159 -> 0.000037 (0.023 x). Margins: EPE < 0.8 x, MSE < 0.1 x the one-shot's."""

    def run(name, *extra):
        cfg = compose_config(
            "eval", [f"ckpt_path={ckpt}", "num_pairs=32", *extra], tmp_path / name
        )
        return evaluate(cfg)["model"]

    plain, refined = run("plain"), run("refined", "refine_steps=20")
    assert refined["mse"]["mean"] < 0.1 * plain["mse"]["mean"], (refined["mse"], plain["mse"])
    assert refined["epe"]["mean"] < 0.8 * plain["epe"]["mean"], (refined["epe"], plain["epe"])
    saved = json.loads((tmp_path / "refined" / "summary.json").read_text())
    assert saved["config"]["refine_steps"] == 20


def test_register_refines_as_load_model_does(ckpt, known, tmp_path):
    """register on 8-bit PNGs of the first known pair (the hardest of the 8) gives
    load_model's refined flow and what it buys. Measured (edge-band EPE): identity 1.171 px,
    one-shot 0.865 px, refined 30 steps 0.676 px (0.78 x one-shot, 0.58 x identity); register
    vs load_model 0.0045 px (the PNGs' 8-bit rounding). Margins: 0.9 x, 0.7 x, 0.05 px."""
    fixed, moving, true = known
    fixed, moving, true = fixed[:1], moving[:1], true[:1]
    write_image(tmp_path / "f.png", fixed[0])
    write_image(tmp_path / "m.png", moving[0])

    def run(name, *extra):
        overrides = [f"fixed={tmp_path / 'f.png'}", f"moving={tmp_path / 'm.png'}"]
        overrides += [f"ckpt_path={ckpt}", *extra]
        out = register(compose_config("register", overrides, tmp_path / name))
        assert out["num_pairs"] == 1
        return torch.from_numpy(np.load(tmp_path / name / "flow.npy"))[None]

    one_shot = edge_epe(run("plain"), true, fixed)
    flow = run("refined", f"refine_steps={STEPS}")
    api = air_reg.load_model(ckpt, refine_steps=STEPS)(fixed, moving)
    assert edge_epe(flow, api, fixed) < 0.05  # the CLI's settings are the API's
    refined, identity = edge_epe(flow, true, fixed), edge_epe(torch.zeros_like(true), true, fixed)
    assert refined < 0.9 * one_shot, (refined, one_shot)
    assert refined < 0.7 * identity, (refined, identity)
