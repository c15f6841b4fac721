"""The experiment scripts run end to end on tiny settings and write what they promise."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from air_reg.classical import has_ants

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def write_table(path: Path, rows: dict[str, dict[str, float]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "metric", "mean", "std", "n"])
        for method, metrics in rows.items():
            for metric, mean in metrics.items():
                writer.writerow([method, metric, mean, 0.01, 10])


def test_readme_tables_checks_the_bar_against_the_papers_gains(tmp_path):
    base = {"dice": 0.4, "folding": 0.0}
    write_table(
        tmp_path / "table_mnist_same_class.csv",
        {
            "Original": {"mse": 0.1, "psnr": 10.0, "smooth_dice": 0.5, **base},
            # MSE -60 % (paper -58.3 %), PSNR +4.0 dB (paper +4.37), smooth Dice +0.1 (+0.071)
            "AiR-MAPT tuned": {"mse": 0.04, "psnr": 14.0, "smooth_dice": 0.6, **base},
            # MSE -70 %, PSNR +5.0 dB, smooth Dice +0.05, folding 0.2 %: two bars missed
            "AiR-UNet": {"mse": 0.03, "psnr": 15.0, "smooth_dice": 0.55, **base, "folding": 0.2},
        },
    )
    out = run("readme_tables.py", str(tmp_path))
    tuned, unet = out.split("| AiR-MAPT tuned vs Original |")[1].split("| AiR-UNet vs Original |")
    assert "| MSE | -70.0% | -58.3% | True |" in unet
    assert "| PSNR | +5.00 dB | +4.37 dB | True |" in unet
    assert "| smooth Dice | +0.050 | +0.071 | False |" in unet
    assert "| folding % | 0.200 | < 0.1 | False |" in unet
    assert "| MSE | -60.0% | -58.3% | True |" in tuned
    assert "**MNIST, same class test pairs** (10 pairs; mean ± std)" in out
    assert "| MSE | -60.0% | -58.3% | True |" in out
    assert "| PSNR | +4.00 dB | +4.37 dB | False |" in out
    assert "| smooth Dice | +0.100 | +0.071 | True |" in out
    assert "| MSE | 0.1000 ± 0.0100 | 0.0400 ± 0.0100 |" in out


@pytest.mark.slow
def test_reproduce_smoke_profile_trains_scores_and_writes_tables(tmp_path):
    run(
        "reproduce.py",
        "--profile=smoke",
        "--datasets=mnist",
        "--methods",
        "AiR-MAPT tuned",
        "VoxelMorph",
        "--no-demons",
        "--refine=2",
        "--test-pairs=8",
        f"--out={tmp_path}",
    )
    peers = {"ANTs SyN"} if has_ants() else set()  # the ANTs row whenever antspyx is there
    learned = {"AiR-MAPT tuned", "VoxelMorph"}
    for pairing in ("random", "same_class", "known"):
        with open(tmp_path / f"table_mnist_{pairing}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        methods = {r["method"] for r in rows}
        assert methods == {"Original", *learned, *(f"{m} + refine 2" for m in learned), *peers}
        assert {int(r["n"]) for r in rows} == {8}
        assert ("epe" in {r["metric"] for r in rows}) == (pairing == "known")
        assert (tmp_path / f"per_pair_mnist_{pairing}.csv").exists()
    assert (tmp_path / "fig3_mnist.png").stat().st_size > 0
    assert "AiR-MAPT tuned" in (tmp_path / "results.md").read_text()


def test_seed_table_gives_the_mean_and_spread_over_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    from reproduce import seed_table

    def cell(mean):
        return {"mean": mean, "std": 0.5, "n": 100}  # the std over pairs is not reported

    summary = {
        "Original": {"mse": cell(0.1)},
        "VoxelMorph seed 1": {"mse": cell(0.02), "dsc30": {"mean": 0.9, "std": None, "n": 9}},
        "VoxelMorph seed 2": {"mse": cell(0.04), "dsc30": {"mean": 0.7, "std": None, "n": 9}},
        "AiR-UNet seed 1": {"mse": cell(0.03)},
    }
    groups = {
        "VoxelMorph": ["VoxelMorph seed 1", "VoxelMorph seed 2"],
        "AiR-UNet": ["AiR-UNet seed 1"],
    }
    lines = seed_table(summary, groups).splitlines()
    assert lines[0] == "| metric | Original | VoxelMorph (2 seeds) | AiR-UNet (1 seeds) |"
    assert lines[2] == "| mse | 0.1000 | 0.0300 ± 0.0141 | 0.0300 |"  # std of (0.02, 0.04)
    assert lines[3] == "| dsc30 |  | 0.8000 ± 0.1414 |  |"  # absent where a row lacks it


@pytest.mark.slow
def test_reproduce_trains_every_method_once_per_seed(tmp_path):
    out = tmp_path / "out"
    run("reproduce.py", "--profile=smoke", "--datasets=mnist", "--methods", "AiR-MAPT tuned",
        "--seeds", "3", "4", "--no-demons", "--no-ants", "--test-pairs=8",
        f"--out={out}")  # fmt: skip
    for pairing in ("random", "same_class", "known"):
        with open(out / f"table_mnist_{pairing}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert {r["method"] for r in rows} == {
            "Original", "AiR-MAPT tuned seed 3", "AiR-MAPT tuned seed 4"
        }  # fmt: skip
        mse = {r["method"]: float(r["mean"]) for r in rows if r["metric"] == "mse"}
        assert mse["AiR-MAPT tuned seed 3"] != mse["AiR-MAPT tuned seed 4"]  # not one model
        seeds = (out / f"seeds_mnist_{pairing}.md").read_text()
        assert "| metric | Original | AiR-MAPT tuned (2 seeds) |" in seeds
    assert sorted(p.name for p in (out / "runs/mnist").iterdir()) == [
        "mapt_tuned_3",
        "mapt_tuned_4",
    ]
    assert "over seeds 3 4" in (out / "results.md").read_text()
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "reproduce.py"), "--seeds", "1", "2",
         "--ship-weights", f"--out={tmp_path / 'x'}"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "which seed's weights?" in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is written


@pytest.mark.slow
def test_refine_benchmark_writes_tables_csv_and_plot(tmp_path):
    run(
        "refine_benchmark.py",
        "--datasets=mnist",
        "--pairs=8",
        "--batch=8",
        "--steps",
        "2",
        "--cascades",
        "2",
        "--weights",
        "air_unet",
        "mapt_tuned",
        f"--out={tmp_path}",
    )
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    methods = {r["method"] for r in rows}
    for model in ("AiR-UNet", "AiR-MAPT tuned"):  # every model's rows, each named by it
        assert {f"{model} one-shot", f"{model} cascade x2", f"{model} refined 2"} <= methods
    if has_ants():
        assert "ANTs SyN" in methods
    assert {r["pairs"] for r in rows} == {"same_class", "known"}
    assert all(float(r["ms_per_pair"]) > 0 for r in rows)
    assert (tmp_path / "quality_vs_time.png").stat().st_size > 0
    assert "refinement preset" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_brain_experiment_prepares_the_slices_and_writes_its_tables(tmp_path, monkeypatch):
    pytest.importorskip("nilearn")
    run("brain_data.py", f"--out={tmp_path / 'brain'}")
    assert len(list((tmp_path / "brain" / "slices").glob("z*.npy"))) == 118
    monkeypatch.setenv("AIR_REG_BRAIN", str(tmp_path / "brain"))
    out = tmp_path / "out"
    printed = run("brain_mri.py", "--split=val", "--limit=2", "--seeds=1", "--steps=3",
                  "--only", "none", f"--out={out}")  # fmt: skip
    assert "model-free refine 3" in printed
    table = (out / "table.md").read_text()
    assert "| identity |" in table
    assert "EPE MNI152, gaussian" in table
    with open(out / "per_pair.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"identity", "model-free refine 3"}
    assert (out / "brain.png").stat().st_size > 0


@pytest.mark.parametrize(
    "net", ["brain_mapt", "brain_dirnet", "brain_air_unet", "brain_voxelmorph"]
)
def test_every_brain_network_builds_at_the_brain_training_size(net, tmp_path, monkeypatch):
    import torch
    from conftest import compose_config
    from hydra.utils import instantiate

    if net == "brain_voxelmorph":
        pytest.importorskip("voxelmorph")
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # undone after the test
    from brain_mri import NETS

    assert net in NETS  # experiments/brain_mri.py trains and scores it
    cfg = compose_config("train", [f"experiment={net}"], tmp_path)
    assert list(cfg.data.image_size) == [112, 96]
    assert cfg.data == compose_config("train", ["data=brain"], tmp_path).data  # one data config
    model = instantiate(cfg.model.net)
    with torch.no_grad():
        flow = model(torch.rand(1, 1, 112, 96), torch.rand(1, 1, 112, 96))
    assert flow.shape == (1, 2, 112, 96)
    assert torch.isfinite(flow).all()


@pytest.mark.slow
def test_tune_air_unet_scores_variants_on_validation_pairs(tmp_path):
    run("tune_air_unet.py", "--variants", "base", "--budget=00:00:00:03", "--pairs=16",
        f"--out={tmp_path}")  # fmt: skip
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"Original", "base"}
    assert float(rows["Original"]["epe"]) > 0  # the known deformations are not the identity
    assert float(rows["base"]["mse"]) > 0
    assert "| base |" in (tmp_path / "table_fashion.md").read_text()
