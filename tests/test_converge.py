"""The plateau rule (``air_reg.callbacks``) on synthetic curves, its callback in a real Trainer
(plateau, the step cap, the time cap), its config, and the convergence benchmark's parts
(``air_reg.bench.convergence``): flows brought back to 28x28, a tiny run that resumes."""

from __future__ import annotations

import csv
import json
import math
import time

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

from air_reg.bench import convergence
from air_reg.callbacks import PlateauStopping, plateaued, read_curve


def first_stop(curve, *, every=250, last=40000, **rule):
    """The first validation step at which ``plateaued`` says stop (None: never)."""
    steps, values = [], []
    for s in range(every, last + 1, every):
        steps.append(s)
        values.append(curve(s))
        if plateaued(steps, values, **rule):
            return s
    return None


def test_rule_stops_on_a_plateau():
    def curve(s):
        return 0.03 + 0.05 * math.exp(-s / 1000)  # flat after a few thousand steps

    def gain(s):  # relative fall of the best over the last quarter (validations every 250)
        ref = curve((0.75 * s) // 250 * 250)
        return (ref - curve(s)) / ref

    stop = first_stop(curve, min_steps=1000)
    assert stop is not None
    assert stop < 40000
    assert gain(stop) < 0.01 <= gain(stop - 250)  # stops at the first validation under 1 %


def test_rule_does_not_stop_while_still_improving():
    # a power law: slow, but the best keeps falling 2.9 % per last quarter, at any length
    assert first_stop(lambda s: s**-0.1, min_steps=1000) is None
    assert first_stop(lambda s: 1 / (1 + s / 100), min_steps=0) is None


def test_rule_respects_min_steps_and_needs_a_reference():
    assert first_stop(lambda s: 0.05, min_steps=3000) == 3000  # the first validation allowed
    assert not plateaued([250], [0.05])  # nothing at or before 0.75 x 250
    assert not plateaued([250, 500], [0.05, 0.05], min_steps=501)
    assert plateaued([250, 500], [0.05, 0.05], min_steps=500)


def test_rule_uses_the_best_value_not_the_last():
    steps = [100, 200, 300, 400, 500]
    # an up-tick at the end is no improvement: best 0.05 before step 375 and since
    assert plateaued(steps, [0.10, 0.06, 0.05, 0.05, 0.08])
    # the best fell 33 % after step 375, even though the last value is the worst since 200
    assert not plateaued(steps, [0.10, 0.06, 0.06, 0.04, 0.07])
    assert not plateaued(steps, [0.10, 0.06, 0.05, 0.05, 0.0495], min_delta=0.005)
    assert plateaued([100, 200, 300], [0.1, float("nan"), 0.0995])  # NaN skipped


class CurveModule(L.LightningModule):
    """Logs ``val/mse = curve(global_step)``; 10 training steps per epoch (one validation)."""

    def __init__(self, curve, sleep: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.curve, self.sleep = curve, sleep

    def training_step(self, batch, batch_idx):
        time.sleep(self.sleep)
        return (self.w - batch).square().sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/mse", float(self.curve(self.global_step)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.zeros(10, 1), batch_size=1)

    def val_dataloader(self):
        return DataLoader(torch.zeros(1, 1), batch_size=1)


def fit(tmp_path, curve, *, sleep=0.0, max_steps=1000, max_time=None, min_steps=50):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        max_time=max_time,
        callbacks=[PlateauStopping(folder=tmp_path, min_steps=min_steps)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(CurveModule(curve, sleep))
    stop = json.loads((tmp_path / "stop.json").read_text())
    with open(tmp_path / "curve.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return stop, rows


def test_callback_stops_training_on_a_plateau(tmp_path):
    stop, rows = fit(tmp_path, lambda s: 0.03 + 0.05 * math.exp(-s / 30))
    assert stop["reason"] == "plateau"
    assert 50 <= stop["steps"] < 1000
    assert [int(r["step"]) for r in rows] == list(range(10, stop["steps"] + 1, 10))
    assert stop["best_step"] == stop["steps"]  # a decreasing curve: the best is the last
    assert float(rows[-1]["wall_s"]) >= float(rows[0]["wall_s"]) >= 0
    assert [r[0] for r in read_curve(tmp_path)] == [int(r["step"]) for r in rows]


def test_callback_reports_the_step_cap(tmp_path):
    stop, rows = fit(tmp_path, lambda s: 1 / (1 + s), max_steps=60)
    assert (stop["reason"], stop["steps"], len(rows)) == ("max_steps", 60, 6)


def test_callback_reports_the_time_cap(tmp_path):
    stop, _ = fit(tmp_path, lambda s: 1 / (1 + s), sleep=0.02, max_time={"seconds": 1})
    assert stop["reason"] == "max_time"
    assert 0 < stop["steps"] < 1000


def test_resumed_callback_keeps_its_curve_up_to_the_resume_step(tmp_path):
    (tmp_path / "curve.csv").write_text("step,wall_s,val_mse\n10,1.0,0.5\n20,2.0,0.4\n30,3,0.3\n")
    callback = PlateauStopping(folder=tmp_path, resume_step=20, resume_wall_s=2.5)
    assert callback.rows == [(10, 1.0, 0.5), (20, 2.0, 0.4)]  # step 30 came after the save
    assert callback.offset == 2.5


def test_plateau_config_adds_the_callback_to_the_default_ones(make_cfg, tmp_path):
    cfg = make_cfg("train", ["callbacks=plateau", "callbacks.plateau.min_steps=7"])
    assert {"model_checkpoint", "last_checkpoint", "plateau"} <= set(cfg.callbacks)
    callback = instantiate(cfg.callbacks.plateau)
    assert isinstance(callback, PlateauStopping)
    assert callback.folder == tmp_path  # the run folder
    assert callback.monitor == cfg.optimized_metric == "val/mse"
    assert callback.rule == {"fraction": 0.25, "min_delta": 0.01, "min_steps": 7}


def test_downsampled_flow_is_in_the_small_grids_pixels():
    flow = torch.zeros(1, 2, 64, 64)
    flow[:, 0], flow[:, 1] = 3.2, -6.4  # rows, columns, in 64-grid pixels
    small = convergence.downsample_flow(flow, (28, 28))
    assert small.shape == (1, 2, 28, 28)
    assert torch.allclose(small[:, 0], torch.tensor(3.2 * 28 / 64))
    assert torch.allclose(small[:, 1], torch.tensor(-6.4 * 28 / 64))

    def zero(fixed, moving):  # a 64x64 "model"
        assert fixed.shape[-2:] == (64, 64)
        return fixed.new_zeros(fixed.shape[0], 2, 64, 64)

    out = convergence.at_size(zero, 64)(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 2, 28, 28)
    assert not out.any()


def test_markdown_rows_note_folding_and_runs_without_a_plateau():
    cell = lambda m: {"mean": m, "std": 0.0, "n": 4}  # noqa: E731
    summary = {
        "Original": {"mse": cell(0.1), "folding": cell(0.0)},
        "AiR-single": {"mse": cell(0.05), "folding": cell(2.0)},
    }
    runs = {"AiR-single": {"steps": 400, "wall_s": 120.0, "reason": "max_steps"}}
    lines = convergence.markdown_rows(summary, {"Original": 0.01, "AiR-single": 1.5}, runs, 1.0)
    assert lines.splitlines()[2].startswith("| Original | 0.1000 ± 0.0000 | +0.0 % |")
    assert lines.splitlines()[3] == (
        "| AiR-single | 0.0500 ± 0.0000 | -50.0 % |  |  |  | 2.0000 ± 0.0000 |  | 1.500 | 400 "
        "| 2.0 | max_steps | folding > 1 %; no plateau (max_steps) |"
    )


@pytest.mark.parametrize(
    ("experiment", "extra", "grid"),
    [
        ("authors_air", [], (8, 8)),
        ("authors_mapt", [], (8, 8)),
        ("paper_dirnet", ["data.image_size=64", "model.net.num_pools=3"], (8, 8)),
    ],
)
def test_authors_configs_build_at_64(make_cfg, experiment, extra, grid):
    cfg = make_cfg("train", [f"experiment={experiment}", "data=fashion", *extra])
    assert cfg.data.image_size == 64  # the experiment's size wins over data=fashion's 28
    net = instantiate(cfg.model).net
    fixed = moving = torch.rand(2, 1, 64, 64)
    assert net(fixed, moving).shape == (2, 2, 64, 64)
    assert net.field.upsample.in_size == grid  # the coarse field: 8x8, as in their code
    if experiment == "authors_mapt":  # the authors' code: 3,941,385 (scalar mixing weights)
        assert sum(p.numel() for p in net.parameters()) == 3_941_001
        assert torch.allclose(net.mix_weights, torch.tensor([0.7, 0.2, 0.1]))


@pytest.mark.slow
def test_a_capped_run_resumes_with_its_curve_clock_and_legs(tmp_path):
    """A real run through ``callbacks=plateau`` stops at the step cap; ``resume`` goes on from
    its last.ckpt to a new cap, the first leg's curve and clock kept; a plateaued run is kept."""
    caps = convergence.Caps(max_steps=4, min_steps=100, val_every=2, val_pairs=16, test_pairs=8)
    runs = convergence.train_all("mnist", ["paper"], ["air"], caps, tmp_path)
    run = tmp_path / "runs/mnist/paper_air"
    before = read_curve(run)
    assert [r[0] for r in before] == [2, 4]
    assert (runs["AiR-single"]["reason"], runs["AiR-single"]["steps"]) == ("max_steps", 4)
    assert runs["AiR-single"]["net"].image_size == (28, 28)

    longer = convergence.Caps(**{**vars(caps), "max_steps": 8})
    runs = convergence.train_all("mnist", ["paper"], ["air"], longer, tmp_path, resume=True)
    after = read_curve(run)
    assert [r[0] for r in after] == [2, 4, 6, 8]
    assert after[:2] == before  # the first leg's rows, as they were
    assert after[2][1] > before[-1][1]  # the clock goes on
    stop = json.loads((run / "stop.json").read_text())
    assert (stop["reason"], stop["steps"], stop["max_steps"]) == ("max_steps", 8, 8)
    assert stop["earlier_legs"] == [
        {"steps": 4, "reason": "max_steps", "max_steps": 4, "max_time": "00:02:00:00",
         "threads": torch.get_num_threads(), "resumed_at": 4}
    ]  # fmt: skip
    assert (run / "csv/metrics_to_step_4.csv").exists()  # the first leg's Lightning log kept

    (run / "stop.json").write_text(json.dumps(stop | {"reason": "plateau"}))
    convergence.train_all("mnist", ["paper"], ["air"], longer, tmp_path, resume=True)
    assert json.loads((run / "stop.json").read_text())["steps"] == 8  # not trained further

    report = convergence.score_dataset("mnist", runs, caps, tmp_path, use_demons=False)
    assert "| AiR-single |" in "".join(report)
    with open(tmp_path / "table_mnist.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"Original", "AiR-single"}
    assert {r["n"] for r in rows} == {"8"}
    assert "| AiR-single | 8 |" in convergence.write_curves(tmp_path, "mnist", runs)
    assert (tmp_path / "curves_mnist.png").stat().st_size > 0
