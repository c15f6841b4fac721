"""experiments/benchmark.py: its smoke profile runs every section and writes every output."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # benchmark.py imports its sibling modules
    spec = importlib.util.spec_from_file_location("experiments_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.sections = importlib.import_module("benchmark_sections")
    module.reporting = importlib.import_module("benchmark_report")
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(SCRIPT.parent))


def test_growth_exponents_and_skip_rule(bench):
    rows = [
        {"impl": "ours", "tokens": n, "ms/pair": n**2, "MB/pair": 3 * n} for n in (16, 64, 256)
    ]
    (fit,) = bench.sections.growth_exponents(rows)
    assert fit["ms/pair slope, top 3"] == pytest.approx(2)
    assert fit["MB/pair slope, all"] == pytest.approx(1)
    small = {"tokens": 1024, "peak_mb": 100.0, "step_s": 0.5}
    too_costly = bench.sections.too_costly
    assert too_costly(small, 2048) is None
    assert too_costly(small | {"peak_mb": 1000.0}, 4096).startswith("skipped")
    assert too_costly({"tokens": 256, "error": "took over 300 s"}, 1024).startswith("skip")


@pytest.mark.slow
def test_smoke_run_writes_tables_csvs_and_plot(bench, tmp_path):
    bench.main(["--smoke", "--out", str(tmp_path)])
    text = (tmp_path / "benchmark.md").read_text()
    for title in bench.reporting.TITLES.values():
        assert f"## {title}" in text, title
    for name in ("training", "inference", "sizes", "scaling", "levers", "profile"):
        rows = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
        assert rows, f"{name}.csv is empty"
    training = {r["model"]: r for r in csv.DictReader((tmp_path / "training.csv").open())}
    assert float(training["AiR-single p2 naive, matched widths"]["ours ÷ this (time)"]) > 0
    scaling = list(csv.DictReader((tmp_path / "scaling.csv").open()))
    assert float(scaling[0]["ms/pair"]) > 0
    assert float(scaling[0]["MB/pair"]) >= 0
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000
