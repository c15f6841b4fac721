"""End to end: configs compose and instantiate, training runs, eval and load_model work."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import air_reg
from air_reg import losses
from air_reg.eval import evaluate
from air_reg.train import train

MODELS = ["air", "mapt", "dirnet"]
DATA = ["mnist", "fashion", "synthetic"]


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_data_pairing_instantiates(make_cfg, model, data):
    cfg = make_cfg("train", [f"model={model}", f"data={data}"])
    module = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    size = datamodule.image_size
    flow = module(torch.rand(2, 1, size, size), torch.rand(2, 1, size, size))
    assert flow.shape == (2, 2, size, size)


@pytest.mark.parametrize(
    ("option", "part", "expected"),
    [
        ("model/loss=ncc", "loss", losses.NCC),
        ("model/loss=lncc", "loss", losses.LocalNCC),
        ("model/regularizer=bending", "regularizer", losses.BendingEnergy),
        ("model/regularizer=diffusion", "regularizer", losses.Diffusion),
    ],
)
def test_group_options_compose_into_the_chosen_module(make_cfg, option, part, expected):
    module = instantiate(make_cfg("train", [option, "model.reg_weight=0.1"]).model)
    chosen = getattr(module, part)
    assert type(chosen) is expected
    a, b = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    if part == "loss":  # a similarity: ~0 for identical images, more for different ones
        assert chosen(a, a) < 0.01 < chosen(a, b)
    else:  # a regulariser: 0 for a constant flow, more for a random one
        assert chosen(torch.ones(2, 2, 28, 28)) == 0 < chosen(torch.randn(2, 2, 28, 28))


def test_trainer_option_composes_a_cpu_trainer(make_cfg):
    trainer = instantiate(make_cfg("train", ["trainer=cpu"]).trainer)
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"


def test_fast_dev_run_trains_end_to_end(make_cfg):
    cfg = make_cfg("train", ["debug=fdr", "data=mnist"])
    metrics = train(cfg)
    assert {"train/loss", "val/mse", "test/mse", "test/smooth_dice"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short synthetic training run: its folder and its checkpoint."""
    from conftest import compose_config

    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        "train",
        ["data=synthetic", "model=dirnet", "trainer.max_epochs=4", "model.optimizer.lr=1e-3"],
        out,
    )
    metrics = train(cfg)
    return out, metrics


def test_training_writes_checkpoints_logs_and_record(trained_run):
    out, metrics = trained_run
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    record = json.loads((out / "run_record.json").read_text())
    assert record["config"]["model"]["net"]["_target_"].endswith("DIRNet")
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert json.loads((out / "metrics.json").read_text())["test/mse"] == metrics["test/mse"]


def test_load_model_round_trips(trained_run):
    out, _ = trained_run
    model = air_reg.load_model(out / "checkpoints" / "last.ckpt")
    assert not model.training
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    again = instantiate(ckpt["air_reg"]["model"])
    again.load_state_dict(ckpt["state_dict"])
    fixed, moving = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    flow = model(fixed, moving)
    assert flow.shape == (3, 2, 28, 28)
    assert torch.allclose(flow, again.eval()(fixed, moving))


def test_eval_scores_model_and_identity_on_the_same_pairs(trained_run, make_cfg):
    out, _ = trained_run
    cfg = make_cfg("eval", [f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"])
    summary = evaluate(cfg)
    assert set(summary) == {"identity", "model"}
    assert summary["identity"]["mse"]["n"] == summary["model"]["mse"]["n"] > 0
    # the synthetic pairs have a known flow: a trained model must beat the identity
    assert summary["model"]["epe"]["mean"] < summary["identity"]["epe"]["mean"]
    assert summary["model"]["mse"]["mean"] < summary["identity"]["mse"]["mean"]
    written = Path(cfg.paths.output_dir)
    saved = json.loads((written / "summary.json").read_text())["summary"]
    assert saved["model"]["mse"]["mean"] == pytest.approx(summary["model"]["mse"]["mean"])
    assert (written / "per_pair.csv").read_text().count("\n") == 1 + 2 * summary["model"]["mse"][
        "n"
    ]


def test_eval_scores_the_synthetic_model_on_digit_pairs_at_their_size(make_cfg):
    """A new user's zero-shot check: ``eval weights=air_match_synth data=fashion``. The
    model's record says ``minmax`` (for ``register``'s files) and 128 x 128 (its training
    size), yet the idx pairs are [0, 1] as they are and the network takes any size: it runs
    on them at 28 x 28, and beats the identity."""
    cfg = make_cfg("eval", ["weights=air_match_synth", "data=fashion", "num_pairs=24"])
    summary = evaluate(cfg)
    assert summary["model"]["mse"]["n"] == 24
    assert summary["model"]["mse"]["mean"] < summary["identity"]["mse"]["mean"]
