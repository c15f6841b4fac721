"""air_reg.bench.speed: the timing rules, and the smoke profile writing every output."""

from __future__ import annotations

import csv

import pytest
import torch

from air_reg.bench.speed import PROFILES, run
from air_reg.bench.speed.gpu import ROWS, measure
from air_reg.bench.speed.models import air, build
from air_reg.bench.speed.report import TITLES
from air_reg.bench.speed.sections import growth_exponents, reference_of, too_costly
from air_reg.bench.speed.tables import csv_text, md_table
from air_reg.bench.speed.timing import interleave, speedup, timing_row, train_job


def test_growth_exponents_and_skip_rule():
    rows = [
        {"impl": "ours", "tokens": n, "ms/pair": n**2, "MB/pair": 3 * n} for n in (16, 64, 256)
    ]
    (fit,) = growth_exponents(rows)
    assert fit["ms/pair slope, top 3"] == pytest.approx(2)
    assert fit["MB/pair slope, all"] == pytest.approx(1)
    small = {"tokens": 1024, "peak_mb": 100.0, "step_s": 0.5}
    assert too_costly(small, 2048) is None
    assert too_costly(small | {"peak_mb": 1000.0}, 4096).startswith("skipped")
    assert too_costly({"tokens": 256, "error": "took over 300 s"}, 1024).startswith("skip")


def test_interleave_rotates_the_order_and_speedup_pairs_rounds():
    calls = []
    times = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a rotating start
    assert {k: len(t) for k, t in times.items()} == {"a": 3, "b": 3}
    assert speedup({"slow": [2.0, 6.0, 4.0], "fast": [1.0, 2.0, 1.0]}, "slow", "fast") == 3.0
    row = timing_row([0.5, 1.0, 2.0], pairs=10)
    assert row == {"pairs/s": 10.0, "ms/pair": 100.0, "spread %": 150.0}
    assert reference_of("MAPT [2,4,7] naive, matched widths") == "MAPT [2,4,7] ours"
    assert reference_of("MAPT [2,4,7] ours") is None


def test_tables_keep_first_seen_columns_and_blank_missing_cells():
    rows = [{"model": "a", "pairs/s": 1234.5}, {"model": "b", "note": None, "x": 0.012345}]
    assert md_table(rows).splitlines() == [
        "| model | pairs/s | note | x |",
        "|---|---|---|---|",
        "| a | 1234 |  |  |",
        "| b |  |  | 0.0123 |",
    ]
    assert csv_text(rows).splitlines()[0] == "model,pairs/s,note,x"


def test_a_spec_builds_the_same_weights_every_time_and_trains():
    net, again = build(air()), build(air())
    pairs = zip(net.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    before = [p.detach().clone() for p in net.parameters()]
    train_job(net, batch=2)()
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))


@pytest.mark.slow
def test_gpu_throughput_table_on_the_cpu():
    how = {"device": "cpu", "steps": 1, "repeats": 1, "warmup": 1}
    some = {k: ROWS[k] for k in ("AiR-single p2", "DIRNet")}  # a transformer and the CNN
    header, rows = measure(batches=(2,), infer_batches=(3,), rows=some, **how)
    assert header == ["model", "train b2 pairs/s", "infer b3 pairs/s", "spread % (max)"]
    assert [r[0] for r in rows] == list(some)
    # whole pairs/s (a loaded CPU can round a step at batch 2 to 0), spread in per cent
    assert all(float(cell.replace(",", "")) >= 0 for r in rows for cell in r[1:])


@pytest.mark.slow
def test_smoke_run_writes_every_section_table_csv_and_plot(tmp_path):
    res = run("smoke", tmp_path)
    text = (tmp_path / "benchmark.md").read_text()
    assert "`python experiments/benchmark.py --smoke`" in text
    for title in TITLES.values():
        assert f"## {title}" in text, title
    assert set(res) == {*TITLES, "exponents"}
    for name in res:
        assert (tmp_path / f"{name}.csv").exists(), name
    # the smoke profile measures no memory rows and one scaling point (nothing to fit)
    assert PROFILES["smoke"].memory_models == ()
    for name in ("training", "inference", "sizes", "scaling", "levers", "profile"):
        rows = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
        assert rows, f"{name}.csv is empty"
    training = {r["model"]: r for r in csv.DictReader((tmp_path / "training.csv").open())}
    assert float(training["AiR-single p2 naive, matched widths"]["ours ÷ this (time)"]) > 0
    scaling = list(csv.DictReader((tmp_path / "scaling.csv").open()))
    assert float(scaling[0]["ms/pair"]) > 0
    assert float(scaling[0]["MB/pair"]) >= 0  # a child process measured it
    sizes = list(csv.DictReader((tmp_path / "sizes.csv").open()))
    assert not sizes[0]["note"], sizes[0]["note"]  # the memory child did not fail
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000
