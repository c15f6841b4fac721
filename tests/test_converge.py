"""experiments/converge.py: the plateau rule on synthetic curves, its callback in a real
Trainer (plateau, the step cap, the time cap), the flow resizing, and one tiny run."""

from __future__ import annotations

import csv
import importlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


@pytest.fixture(scope="module")
def converge():
    sys.path.insert(0, str(EXPERIMENTS))  # converge.py imports its sibling reproduce.py
    try:
        yield importlib.import_module("converge")
    finally:
        sys.path.remove(str(EXPERIMENTS))


def first_stop(plateaued, curve, *, every=250, last=40000, **rule):
    """The first validation step at which ``plateaued`` says stop (None: never)."""
    steps, values = [], []
    for s in range(every, last + 1, every):
        steps.append(s)
        values.append(curve(s))
        if plateaued(steps, values, **rule):
            return s
    return None


def test_rule_stops_on_a_plateau(converge):
    def curve(s):
        return 0.03 + 0.05 * math.exp(-s / 1000)  # flat after a few thousand steps

    def gain(s):  # relative fall of the best over the last quarter (validations every 250)
        ref = curve((0.75 * s) // 250 * 250)
        return (ref - curve(s)) / ref

    stop = first_stop(converge.plateaued, curve, min_steps=1000)
    assert stop is not None
    assert stop < 40000
    assert gain(stop) < 0.01 <= gain(stop - 250)  # stops at the first validation under 1 %


def test_rule_does_not_stop_while_still_improving(converge):
    # a power law: slow, but the best keeps falling 2.9 % per last quarter, at any length
    assert first_stop(converge.plateaued, lambda s: s**-0.1, min_steps=1000) is None
    assert first_stop(converge.plateaued, lambda s: 1 / (1 + s / 100), min_steps=0) is None


def test_rule_respects_min_steps_and_needs_a_reference(converge):
    flat = first_stop(converge.plateaued, lambda s: 0.05, min_steps=3000)
    assert flat == 3000  # flat from the start: stops at the first validation allowed
    assert not converge.plateaued([250], [0.05])  # nothing at or before 0.75 x 250
    assert not converge.plateaued([250, 500], [0.05, 0.05], min_steps=501)
    assert converge.plateaued([250, 500], [0.05, 0.05], min_steps=500)


def test_rule_uses_the_best_value_not_the_last(converge):
    steps = [100, 200, 300, 400, 500]
    # an up-tick at the end is no improvement: best 0.05 before step 375 and since
    assert converge.plateaued(steps, [0.10, 0.06, 0.05, 0.05, 0.08])
    # the best fell 33 % after step 375, even though the last value is the worst since 200
    assert not converge.plateaued(steps, [0.10, 0.06, 0.06, 0.04, 0.07])
    assert not converge.plateaued(steps, [0.10, 0.06, 0.05, 0.05, 0.0495], min_delta=0.005)
    assert converge.plateaued([100, 200, 300], [0.1, float("nan"), 0.0995])  # NaN skipped


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


def fit(converge, tmp_path, curve, *, sleep=0.0, max_steps=1000, max_time=None, min_steps=50):
    callback = converge.PlateauStopping(folder=tmp_path, min_steps=min_steps)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        max_time=max_time,
        callbacks=[callback],
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


def test_callback_stops_training_on_a_plateau(converge, tmp_path):
    stop, rows = fit(converge, tmp_path, lambda s: 0.03 + 0.05 * math.exp(-s / 30))
    assert stop["reason"] == "plateau"
    assert 50 <= stop["steps"] < 1000
    assert [int(r["step"]) for r in rows] == list(range(10, stop["steps"] + 1, 10))
    assert stop["best_step"] == stop["steps"]  # a decreasing curve: the best is the last
    assert float(rows[-1]["wall_s"]) >= float(rows[0]["wall_s"]) >= 0


def test_callback_reports_the_step_cap(converge, tmp_path):
    stop, rows = fit(converge, tmp_path, lambda s: 1 / (1 + s), max_steps=60)
    assert (stop["reason"], stop["steps"], len(rows)) == ("max_steps", 60, 6)


def test_callback_reports_the_time_cap(converge, tmp_path):
    stop, _ = fit(converge, tmp_path, lambda s: 1 / (1 + s), sleep=0.02, max_time={"seconds": 1})
    assert stop["reason"] == "max_time"
    assert 0 < stop["steps"] < 1000


def test_downsampled_flow_is_in_the_small_grids_pixels(converge):
    flow = torch.zeros(1, 2, 64, 64)
    flow[:, 0], flow[:, 1] = 3.2, -6.4  # rows, columns, in 64-grid pixels
    small = converge.downsample_flow(flow, (28, 28))
    assert small.shape == (1, 2, 28, 28)
    assert torch.allclose(small[:, 0], torch.tensor(3.2 * 28 / 64))
    assert torch.allclose(small[:, 1], torch.tensor(-6.4 * 28 / 64))

    def zero(fixed, moving):  # a 64x64 "model"
        assert fixed.shape[-2:] == (64, 64)
        return fixed.new_zeros(fixed.shape[0], 2, 64, 64)

    out = converge.at_size(zero, 64)(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 2, 28, 28)
    assert not out.any()


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_converge_tiny_run_writes_tables_curves_and_results(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(EXPERIMENTS / "converge.py"),
            "--datasets=mnist",
            "--models=air",
            "--variant=both",
            "--max-steps=4",
            "--val-every=2",
            "--min-steps=100",  # both runs end at the step cap, so --resume goes on below
            "--test-pairs=8",
            "--val-pairs=16",
            "--no-demons",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for tag, methods in [
        ("mnist", {"Original", "AiR-single", "AiR-single authors-64"}),
        ("mnist_64", {"Original", "AiR-single authors-64"}),
    ]:
        with open(tmp_path / f"table_{tag}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert {r["method"] for r in rows} == methods
        assert {"mse", "folding", "sdlogj"} <= {r["metric"] for r in rows}
        assert all(r["n"] == "8" for r in rows)
        assert (tmp_path / f"per_pair_{tag}.csv").exists()
        table = (tmp_path / f"table_{tag}.md").read_text()
        assert "| folding % | SDlogJ |" in table
        assert "| note |" in table
    with open(tmp_path / "curves_mnist.csv", newline="") as fh:
        curve = list(csv.DictReader(fh))
    assert {(r["variant"], r["step"]) for r in curve} == {
        (v, s) for v in ("paper", "authors") for s in ("2", "4")
    }
    assert (tmp_path / "curves_mnist.png").stat().st_size > 0
    results = (tmp_path / "results.md").read_text()
    assert "Plateau rule:" in results
    assert "| AiR-single authors-64 | 4 |" in results
    stop = json.loads((tmp_path / "runs/mnist/paper_air/stop.json").read_text())
    assert (stop["max_steps"], stop["max_time"]) == (4, "00:02:00:00")
    assert stop["threads"] == torch.get_num_threads()

    # --score-only: trains nothing (no run for mapt), scores what is there
    runs_before = sorted(p.name for p in (tmp_path / "runs/mnist").iterdir())
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "converge.py"), "--datasets=mnist", "--models",
         "air", "mapt", "--score-only", "--test-pairs=8", "--no-demons", f"--out={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no finished run" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs/mnist").iterdir()) == runs_before
    with open(tmp_path / "table_mnist.csv", newline="") as fh:
        assert {r["method"] for r in csv.DictReader(fh)} == {"Original", "AiR-single"}
    results = (tmp_path / "results.md").read_text()
    assert "caps per run in the runs tables" in results
    assert "scores the runs made apart" in results  # the runs came from elsewhere
    assert "| AiR-single | 4 |" in results
    assert "| 4, 00:02:00:00 |" in results  # the run's own caps

    # --resume: the capped run goes on from its last.ckpt to the new cap, curve and clock
    # kept; a run that plateaued is kept as it is
    before = read_rows(tmp_path / "runs/mnist/paper_air/curve.csv")
    plateaued = tmp_path / "runs/mnist/authors_air/stop.json"
    plateaued.write_text(json.dumps(json.loads(plateaued.read_text()) | {"reason": "plateau"}))
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "converge.py"), "--datasets=mnist", "--models=air",
         "--variant=both", "--resume", "--max-steps=8", "--val-every=2", "--min-steps=100",
         "--test-pairs=8", "--val-pairs=16", "--no-demons", f"--out={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs/mnist/paper_air"
    after = read_rows(run / "curve.csv")
    assert [r["step"] for r in after] == ["2", "4", "6", "8"]
    assert after[:2] == before  # the first leg's rows, as they were
    assert float(after[2]["wall_s"]) > float(before[-1]["wall_s"])  # the clock goes on
    stop = json.loads((run / "stop.json").read_text())
    assert (stop["reason"], stop["steps"], stop["max_steps"]) == ("max_steps", 8, 8)
    assert stop["wall_s"] >= float(after[-1]["wall_s"])
    assert stop["earlier_legs"] == [
        {"steps": 4, "reason": "max_steps", "max_steps": 4, "max_time": "00:02:00:00",
         "threads": torch.get_num_threads(), "resumed_at": 4}
    ]  # fmt: skip
    assert (run / "csv/metrics_to_step_4.csv").exists()  # the first leg's Lightning log kept
    assert json.loads(plateaued.read_text())["steps"] == 4  # not trained further
    results = (tmp_path / "results.md").read_text()
    assert "| AiR-single | 8 |" in results
    assert "| AiR-single authors-64 | 4 |" in results


@pytest.mark.parametrize(
    ("experiment", "extra", "grid"),
    [
        ("authors_air", [], (8, 8)),
        ("authors_mapt", [], (8, 8)),
        ("paper_dirnet", ["data.image_size=64", "model.net.num_pools=3"], (8, 8)),
    ],
)
def test_authors_configs_build_at_64(make_cfg, experiment, extra, grid):
    from hydra.utils import instantiate

    cfg = make_cfg("train", [f"experiment={experiment}", "data=fashion", *extra])
    assert cfg.data.image_size == 64  # the experiment's size wins over data=fashion's 28
    net = instantiate(cfg.model).net
    fixed = moving = torch.rand(2, 1, 64, 64)
    assert net(fixed, moving).shape == (2, 2, 64, 64)
    assert net.field.upsample.in_size == grid  # the coarse field: 8x8, as in their code
    if experiment == "authors_mapt":  # the authors' code: 3,941,385 (scalar mixing weights)
        assert sum(p.numel() for p in net.parameters()) == 3_941_001
        assert torch.allclose(net.weights, torch.tensor([0.7, 0.2, 0.1]))


def test_cpu_script_names_real_runs(converge):
    """experiments/converge_cpu.sh: bash accepts it, and each queued run names a dataset,
    variant and model that converge.py knows, with a DD:HH:MM:SS cap; every paper run is in
    the first leg, and every run of the second leg resumes one of the first with a longer cap."""
    script = EXPERIMENTS / "converge_cpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    runs = [
        line.split()[1:]
        for line in script.read_text().splitlines()
        if line.strip().startswith("run ")
    ]
    first = {(d, v, m): cap for d, v, m, cap, *flags in runs if not flags}
    second = {(d, v, m): cap for d, v, m, cap, *flags in runs if flags == ["--resume"]}
    assert (len(first), len(second)) == (9, 4)
    assert len(first) + len(second) == len(runs)  # no other flags, no run twice in a leg
    for (data, variant, model), cap in [*first.items(), *second.items()]:
        assert data in converge.DATASETS
        assert model in converge.VARIANTS[variant]
        assert len(cap.split(":")) == 4
        assert all(part.isdigit() for part in cap.split(":"))
    paper = {(d, m) for d, v, m in first if v == "paper"}
    assert paper == {(d, m) for d in converge.DATASETS for m in converge.NAMES}
    for run, cap in second.items():  # caps count the whole run: a resumed one needs more
        assert cap > first[run], run
    usage = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True)
    assert usage.returncode == 2
    assert "usage:" in usage.stderr


def test_resume_and_score_only_conflict(converge, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["converge.py", "--resume", "--score-only"])
    with pytest.raises(SystemExit) as exc:
        converge.main()
    assert exc.value.code == 2
    assert "--resume trains and --score-only does not" in capsys.readouterr().err
