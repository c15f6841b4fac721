"""The refinement switch in its three places: the Python API, eval and register."""

import json

import pytest
import torch
from conftest import compose_config
from test_register import synthetic_pairs, trained_checkpoint

import air_reg
from air_reg import metrics
from air_reg.eval import evaluate
from air_reg.images import write_image
from air_reg.refine import Refiner
from air_reg.register import register


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def test_load_model_with_refine_steps_keeps_the_contract_and_lowers_mse(ckpt):
    fixed, moving = synthetic_pairs(6)
    plain = air_reg.load_model(ckpt)
    refined = air_reg.load_model(ckpt, refine_steps=30)
    assert isinstance(refined, Refiner)
    assert refined.image_size == plain.image_size
    flow = refined(fixed, moving)
    assert flow.shape == (len(fixed), 2, 28, 28)
    before = metrics.mse(air_reg.warp(moving, plain(fixed, moving)), fixed).mean()
    after = metrics.mse(air_reg.warp(moving, flow), fixed).mean()
    assert after < before
    assert metrics.folding(flow).max() == 0  # the default preset is diffeomorphic


def test_eval_with_refinement_scores_better_than_one_shot(ckpt, tmp_path):
    def run(name, *extra):
        cfg = compose_config(
            "eval", [f"ckpt_path={ckpt}", "num_pairs=32", *extra], tmp_path / name
        )
        return evaluate(cfg)["model"]["mse"]["mean"]

    assert run("refined", "refine_steps=20") < run("plain")
    saved = json.loads((tmp_path / "refined" / "summary.json").read_text())
    assert saved["config"]["refine_steps"] == 20


def test_register_with_refinement(ckpt, tmp_path):
    fixed, moving = synthetic_pairs(2)
    write_image(tmp_path / "f.png", fixed[0])
    write_image(tmp_path / "m.png", moving[0])
    out = register(
        compose_config(
            "register",
            [
                f"fixed={tmp_path / 'f.png'}",
                f"moving={tmp_path / 'm.png'}",
                f"ckpt_path={ckpt}",
                "refine_steps=20",
                "cascade=2",
            ],
            tmp_path,
        )
    )
    assert out["num_pairs"] == 1
    assert (tmp_path / "flow.npy").is_file()
    assert torch.isfinite(torch.tensor(out["pairs"][0]["mse_after"]))
