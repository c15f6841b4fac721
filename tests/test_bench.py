"""The benchmark building blocks (``air_reg.bench``): the benchmark pairs, known deformations,
the tables' exact cells, ``train_for`` on a step budget and the weight export."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import air_reg
from air_reg import metrics as M
from air_reg.bench.pairs import benchmark_batches, known_deformation_batches
from air_reg.bench.tables import compact_table, quality_bar, seed_table, write_tables
from air_reg.bench.training import KEEP, budget_overrides, export, train_for
from air_reg.data.synthetic import known_flows
from air_reg.scoring import identity_method, score


def test_the_benchmark_pairs_are_the_same_in_any_process_state():
    first = benchmark_batches("mnist", "same_class", 6, batch_size=4)
    torch.manual_seed(123)  # the global RNG has no say in which pairs are drawn
    torch.rand(1000)
    again = benchmark_batches("mnist", "same_class", 6, batch_size=4)
    assert [len(b["fixed"]) for b in first] == [4, 2]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["fixed"], b["fixed"])
        assert torch.equal(a["moving"], b["moving"])
    val = benchmark_batches("mnist", "same_class", 6, batch_size=6, split="val")
    assert not torch.equal(val[0]["fixed"], torch.cat([b["fixed"] for b in first]))
    with pytest.raises(ValueError, match="split"):
        benchmark_batches("mnist", "same_class", 6, split="train")


def test_known_deformations_are_seeded_folding_free_and_scored_by_their_epe():
    moving = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    batches = [{"moving": moving[:3]}, {"moving": moving[3:]}]
    known = known_deformation_batches(batches, 2.0)
    again = known_deformation_batches(batches, 2.0)
    assert all(torch.equal(a["flow"], b["flow"]) for a, b in zip(known, again, strict=True))
    assert not torch.equal(known[0]["flow"][0], known[0]["flow"][1])  # one draw per pair
    flow = torch.cat([b["flow"] for b in known])  # (5, 2, 28, 28)
    assert flow.shape == (5, 2, 28, 28)
    assert float(M.folding(flow).max()) == 0.0  # scaling and squaring: no folding
    magnitude = flow.norm(dim=1).flatten(1).mean(1)  # (5,) mean displacement, px
    assert (magnitude > 0.3).all()
    assert (magnitude < 6).all()

    def truth(fixed, moving):  # the method that knows the answer (scoring warms up on [:2])
        return next(
            b["flow"][: len(fixed)] for b in known if b["fixed"].data_ptr() == fixed.data_ptr()
        )

    per_pair, _ = score({"Original": identity_method, "truth": truth}, known, progress=False)
    assert torch.allclose(per_pair["Original"]["epe"], magnitude, atol=1e-5)  # EPE of zero flow
    assert per_pair["truth"]["epe"].max() < 1e-6


def test_known_flows_scaled_to_a_largest_displacement():
    g = torch.Generator().manual_seed(0)
    for kind in ("bspline", "gaussian"):
        flow = known_flows(3, (80, 76), g, kind=kind, max_px=6.0)
        assert flow.shape == (3, 2, 80, 76)
        largest = flow.norm(dim=1).flatten(1).amax(1)
        assert torch.allclose(largest, torch.full((3,), 6.0))  # each flow its own maximum
    with pytest.raises(ValueError, match="bspline"):
        known_flows(1, 8, g, kind="sine")


def test_write_tables_writes_its_exact_cells(tmp_path):
    per_pair = {
        "Original": {"mse": torch.tensor([0.1, 0.3]), "folding": torch.tensor([0.0, 0.0])},
        "AiR-UNet": {"mse": torch.tensor([0.01, 0.03]), "folding": torch.tensor([0.0, 0.5])},
    }
    table = write_tables(tmp_path, "mnist_random", per_pair, {"Original": 0.0, "AiR-UNet": 1.5})
    assert table.splitlines() == [
        "| metric | Original | AiR-UNet |",
        "|---|---|---|",
        "| mse | 0.2000 ± 0.1414 | 0.0200 ± 0.0141 |",
        "| folding | 0.0000 ± 0.0000 | 0.2500 ± 0.3536 |",
        "| ms/pair | 0.000 | 1.500 |",
    ]
    assert (tmp_path / "table_mnist_random.md").read_text() == table
    with open(tmp_path / "table_mnist_random.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["method", "metric", "mean", "std", "n"]
    assert rows[1] == ["Original", "mse", "0.2", "0.141421", "2"]
    assert rows[4] == ["AiR-UNet", "folding", "0.25", "0.353553", "2"]
    with open(tmp_path / "per_pair_mnist_random.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4  # one row per (method, pair)


def test_seed_table_gives_the_mean_and_spread_over_seeds():
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


def test_quality_bar_checks_the_gains_against_the_papers():
    base = {"dice": (0.4, 0.01, 10), "folding": (0.0, 0.0, 10)}
    results = {
        "Original": {"mse": (0.1, 0.01, 10), "psnr": (10.0, 0.01, 10),
                     "smooth_dice": (0.5, 0.01, 10), **base},
        # MSE -70 %, PSNR +5.0 dB, smooth Dice +0.05, folding 0.2 %: two bars missed
        "AiR-UNet": {"mse": (0.03, 0.01, 10), "psnr": (15.0, 0.01, 10),
                     "smooth_dice": (0.55, 0.01, 10), **base, "folding": (0.2, 0.0, 10)},
    }  # fmt: skip
    bar = quality_bar(results, "AiR-UNet")
    assert "| MSE | -70.0% | -58.3% | True |" in bar
    assert "| PSNR | +5.00 dB | +4.37 dB | True |" in bar
    assert "| smooth Dice | +0.050 | +0.071 | False |" in bar
    assert "| folding % | 0.200 | < 0.1 | False |" in bar
    table = compact_table(results)
    assert "| MSE | 0.1000 ± 0.0100 | 0.0300 ± 0.0100 |" in table
    assert "| folding % | 0.00 ± 0.00 | 0.20 ± 0.00 |" in table


def test_a_budget_is_a_time_or_a_number_of_steps():
    assert budget_overrides("00:00:05:00") == ["trainer.max_time=00:00:05:00"]
    assert budget_overrides(300) == ["++trainer.max_steps=300", "trainer.max_time=null"]
    assert budget_overrides(None) == []


@pytest.mark.slow
def test_train_for_a_number_of_steps_then_export(tmp_path):
    overrides = ["data.num_val_pairs=8", "data.pairs_per_epoch=16", "data.batch_size=8"]
    ckpt = train_for("paper_air", "mnist", 4, tmp_path / "run", overrides)
    assert ckpt.name.startswith("epoch_")  # the best by validation MSE
    full = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert full["global_step"] == 4  # 2 epochs of 2 steps, then the step cap
    record = json.loads((tmp_path / "run" / "run_record.json").read_text())
    assert record is not None
    export(ckpt, tmp_path / "shipped.ckpt")
    shipped = torch.load(tmp_path / "shipped.ckpt", map_location="cpu", weights_only=True)
    assert set(shipped) <= set(KEEP)
    assert "optimizer_states" not in shipped
    model = air_reg.load_model(tmp_path / "shipped.ckpt")
    pair = torch.rand(2, 1, 28, 28)
    assert model(pair, pair).shape == (2, 2, 28, 28)


def test_a_reports_header_and_footer_say_when_where_and_how_long(tmp_path, capsys):
    import re
    import time

    from air_reg.bench.machine import cpu_name, run_header, write_report

    head = run_header()
    assert cpu_name() in head
    assert "torch threads, load " in head
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d, ", head)
    path = tmp_path / "out" / "README.md"
    text = write_report(path, ["# a table", "| a |"], time.time() - 3)
    assert path.read_text() == text
    assert text in capsys.readouterr().out
    assert text.startswith("# a table\n| a |\n\n")
    assert re.search(r"\n[34] s, load \d+\.\d\d at the end\.\n$", text)
