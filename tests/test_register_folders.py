"""Folder registration that meets faults: bad pairs midway, a kill, a resumed run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from PIL import Image

from air_reg.images import ImageError
from air_reg.pairlog import PROGRESS
from air_reg.register import register


def folders(root: Path, n: int, bad: dict[int, str] | None = None) -> tuple[Path, Path]:
    """fixed/ and moving/ with n pairs of 28x28 PNGs; ``bad``: pair index -> kind of fault."""
    rng = np.random.default_rng(0)
    fixed, moving = root / "fixed", root / "moving"
    fixed.mkdir(parents=True)
    moving.mkdir()
    for i in range(n):
        name = f"p{i:04d}.png"
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(fixed / name)
        kind = (bad or {}).get(i)
        if kind == "text":
            (moving / name).write_text("not an image")
        elif kind == "size":
            Image.fromarray(np.zeros((20, 20), np.uint8)).save(moving / name)
        else:
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(moving / name)
    return fixed, moving


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run(tmp_path: Path, fixed: Path, moving: Path, *extra: str) -> dict:
    out = [f"fixed={fixed}", f"moving={moving}", "figures=false", "batch_size=4", *extra]
    return register(compose_config("register", out, tmp_path / "out"))


def test_bad_pairs_midway_are_recorded_and_the_rest_registered(tmp_path):
    fixed, moving = folders(tmp_path, 10, bad={3: "text", 6: "size"})
    result = run(tmp_path, fixed, moving)
    assert (result["num_pairs"], result["failed"]) == (9, 1)
    summary = rows(tmp_path / "out" / "summary.csv")
    assert [r["name"] for r in summary] == [f"p{i:04d}" for i in range(10)]
    errors = {r["name"]: r["error"] for r in summary if r["error"]}
    assert set(errors) == {"p0003"}
    assert "ImageError" in errors["p0003"]
    assert [r["name"] for r in rows(tmp_path / "out" / "failures.csv")] == ["p0003"]
    assert len(list((tmp_path / "out" / "flow").glob("*.npy"))) == 9
    # a 20 x 20 moving image is sampled through physical space: the flow on the fixed grid
    assert np.load(tmp_path / "out" / "flow" / "p0006.npy").shape == (2, 28, 28)


def test_on_error_stop_raises_but_the_summary_lists_every_pair(tmp_path):
    fixed, moving = folders(tmp_path, 10, bad={5: "text"})
    with pytest.raises(ImageError, match="p0005"):
        run(tmp_path, fixed, moving, "on_error=stop")
    summary = {r["name"]: r["error"] for r in rows(tmp_path / "out" / "summary.csv")}
    assert len(summary) == 10
    assert not summary["p0000"]  # registered before the fault
    assert "ImageError" in summary["p0005"]
    assert summary["p0009"].startswith("not registered: the run stopped")


@pytest.mark.slow
def test_the_cli_exits_non_zero_with_a_one_line_count(tmp_path):
    fixed, moving = folders(tmp_path, 6, bad={2: "text"})
    cmd = [
        *(sys.executable, "-m", "air_reg.register", f"fixed={fixed}", f"moving={moving}"),
        *(f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'h'}", "figures=false"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "1 of 6 pair(s) failed, the others are registered" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_killed_folder_run_resumes_where_it_stopped(tmp_path):
    fixed, moving = folders(tmp_path, 150)
    out = tmp_path / "out"
    cmd = [
        *(sys.executable, "-m", "air_reg.register", f"fixed={fixed}", f"moving={moving}"),
        *(f"out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}", "batch_size=1"),
    ]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:  # kill it once some pairs are done, mid-run
        done = (out / PROGRESS).read_text().count("\n") - 1 if (out / PROGRESS).exists() else 0
        if done >= 20 or child.poll() is not None:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "summary.csv").exists()
    first = {r["name"] for r in rows(out / PROGRESS)}
    assert 20 <= len(first) < 150

    result = run(tmp_path, fixed, moving, "resume=true", f"out_dir={out}")
    assert (result["num_pairs"], result["failed"]) == (150, 0)
    assert len(rows(out / "summary.csv")) == 150
    # a pair done before the kill has the flow of a fresh run (batch 1 vs 4: float rounding)
    fresh = run(tmp_path / "again", fixed, moving)
    name = sorted(first)[0]
    again = tmp_path / "again" / "out" / "flow" / f"{name}.npy"
    np.testing.assert_allclose(np.load(out / "flow" / f"{name}.npy"), np.load(again), atol=1e-5)
    assert fresh["num_pairs"] == 150


def test_a_torn_progress_line_is_ignored_and_its_pair_redone(tmp_path):
    fixed, moving = folders(tmp_path, 5)
    run(tmp_path, fixed, moving)
    log = tmp_path / "out" / PROGRESS
    text = log.read_text()
    log.write_text(text[: -len(text.splitlines()[-1]) // 2 - 1])  # half of the last line
    result = run(tmp_path, fixed, moving, "resume=true")
    assert result["num_pairs"] == 5
    assert len(rows(tmp_path / "out" / "summary.csv")) == 5


def test_pairs_made_worse_than_the_input_are_flagged(tmp_path, monkeypatch, caplog):
    import torch

    import air_reg.register as reg_mod

    fixed, moving = folders(tmp_path, 4)

    def inverted(model, fixed, moving, *args):  # a "registration" making every pair worse
        return [(torch.zeros_like(m), torch.zeros(1, 2, *m.shape[-2:])) for m in moving]

    monkeypatch.setattr(reg_mod, "register_batch", inverted)
    with caplog.at_level("WARNING"):
        result = run(tmp_path, fixed, moving)
    assert result["worse"] == 4
    assert all(r["worse"] == "1" for r in rows(tmp_path / "out" / "summary.csv"))
    assert "4 of 4 pair(s) are less similar after registration than before" in caplog.text
