"""experiments/ holds thin command lines over ``air_reg``: no script imports another, each
imports the package, each of them answers --help; and reproduce.py runs end to end."""

from __future__ import annotations

import ast
import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
SCRIPTS = sorted(EXPERIMENTS.glob("*.py"))
# Scripts another change is still moving into the package (issue 30); each leaves this set as
# soon as it is thin. Empty means every script follows the rule.
STILL_BEING_MOVED: set[str] = set()
# The scripts whose command lines this suite runs (--help): the benchmark ones have their own.
COMMANDS = (
    "reproduce", "converge", "refine_benchmark", "brain_mri", "refine_speed", "refine_families",
    "refine_matrix", "zero_shot", "interop_roundtrip", "refine_floor", "loop_ab",
)  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    """The top-level names a script imports ("air_reg", "torch", ...); "." for relative ones."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def touches_sys_path(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(
        isinstance(n, ast.Attribute) and n.attr == "path" and getattr(n.value, "id", "") == "sys"
        for n in ast.walk(tree)
    )


def test_the_experiment_scripts_import_the_package_and_never_each_other():
    siblings = {p.stem for p in SCRIPTS}
    broken = {}
    for path in SCRIPTS:
        imports = imported_modules(path)
        problems = sorted(imports & siblings) + (["relative import"] if "." in imports else [])
        if "air_reg" not in imports:
            problems.append("no air_reg import")
        if touches_sys_path(path):
            problems.append("sys.path")
        if problems:
            broken[path.name] = problems
    assert set(broken) <= STILL_BEING_MOVED, {
        k: v for k, v in broken.items() if k not in STILL_BEING_MOVED
    }
    stale = STILL_BEING_MOVED - set(broken)
    assert not stale, f"{sorted(stale)} follow the rule now: take them out of STILL_BEING_MOVED"


def test_every_script_answers_help():
    """Each command line parses (its imports resolve, no work starts): ``<script> --help`` run
    as ``__main__`` in one child process, so the package is imported once, not once a script."""
    code = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), f'{path} --help: exit {exit.code}'\n"
        "    print(f'== {path} answered')\n"
    )
    paths = [str(EXPERIMENTS / f"{name}.py") for name in COMMANDS]
    proc = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, cwd=REPO,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in paths:
        assert f"== {path} answered" in proc.stdout
    assert proc.stdout.count("usage:") == len(paths)


def test_the_shell_queues_parse():
    for script in EXPERIMENTS.glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0, script


def test_the_brain_builder_is_a_package_command():
    proc = subprocess.run(
        [sys.executable, "-m", "air_reg.data.brain", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "python -m air_reg.data.brain" in proc.stdout


@pytest.mark.slow
def test_reproduce_runs_end_to_end_on_a_step_budget(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "reproduce.py"), "--profile=smoke", "--datasets=mnist",
         "--methods", "AiR-UNet", "--no-demons", "--no-ants", "--max-steps=4",
         "--test-pairs=8", f"--out={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for pairing in ("random", "same_class", "known"):
        with open(tmp_path / f"table_mnist_{pairing}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert {r["method"] for r in rows} == {"Original", "AiR-UNet"}
        assert {int(r["n"]) for r in rows} == {8}
        assert ("epe" in {r["metric"] for r in rows}) == (pairing == "known")
        assert (tmp_path / f"per_pair_mnist_{pairing}.csv").exists()
    assert (tmp_path / "fig3_mnist.png").stat().st_size > 0
    assert "training budget 4 steps per model" in (tmp_path / "results.md").read_text()
    best = sorted((tmp_path / "runs/mnist/air_unet/checkpoints").glob("*.ckpt"))
    assert best, "no checkpoint"


def test_reproduce_refuses_to_ship_the_weights_of_several_seeds(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "reproduce.py"), "--seeds", "1", "2",
         "--ship-weights", f"--out={tmp_path / 'x'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "which seed's weights?" in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is written
