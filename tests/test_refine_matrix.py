"""The refinement-speed matrix (air_reg.bench.refine_matrix): pairs in our warp convention with
the same anatomy and fields in both families, a real contrast change, the ratio helper, missing
packages left out, and a tiny run's rows and tables."""

from __future__ import annotations

import logging
import math

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("nilearn")

from air_reg import warp  # noqa: E402
from air_reg.bench import refine_matrix as rm  # noqa: E402
from air_reg.errors import ConfigError  # noqa: E402

TINY = rm.Size("24x24", (24, 24), "mnist", 1.5, 2)


@pytest.mark.parametrize("source", rm.SOURCES)
def test_pairs_share_moving_images_and_fields_and_differ_in_contrast(source):
    size = rm.Size("t", (32, 40), source, 3.0, 2)
    same, contrast = (rm.make_pairs(size, f, 2, seed=0) for f in rm.FAMILIES)
    assert same["fixed"].shape == same["moving"].shape == (2, 1, 32, 40)
    assert same["flow"].shape == (2, 2, 32, 40)
    assert torch.equal(same["fixed"], warp(same["moving"], same["flow"]))
    assert torch.equal(same["moving"], contrast["moving"])
    assert torch.equal(same["flow"], contrast["flow"])
    assert same["source"] == contrast["source"]
    assert not torch.allclose(same["fixed"], contrast["fixed"], atol=0.05)
    peak = same["flow"].norm(dim=1).flatten(1).amax(1)
    assert torch.allclose(peak, torch.full((2,), 3.0), atol=1e-4)
    for b in (same, contrast):
        assert b["fixed"].min() >= 0
        assert b["fixed"].max() <= 1
    again = rm.make_pairs(size, "same", 2, seed=0)
    assert torch.equal(again["fixed"], same["fixed"])
    assert not torch.equal(rm.make_pairs(size, "same", 2, seed=1)["flow"], same["flow"])


@pytest.mark.parametrize("source", ["mnist", "skimage"])
def test_the_contrast_renderer_keeps_shape_and_range_and_breaks_monotonicity(source):
    x = torch.linspace(0, 1, 24 * 24).view(1, 24, 24) ** 2
    g = torch.Generator().manual_seed(3)
    for _ in range(4):  # both of remap's kinds, several gammas
        y, name = rm.render_contrast(x, source, g)
        assert y.shape == x.shape
        assert y.min() >= 0
        assert y.max() <= 1
        assert name in ("inverted", "folded")
        corr = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
        assert corr < 0.5, (name, corr)  # not the same contrast up to a monotone map


def test_ratio_is_the_median_of_per_round_ratios():
    times = {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 3.0]}
    assert rm.ratio(times, "a", "b") == 2.0  # median of 2, 4, 2 (not 4 / 1)
    assert math.isnan(rm.ratio(times, "a", "missing"))
    assert math.isnan(rm.ratio(times, "missing", "b"))


def test_a_missing_package_leaves_its_row_out(monkeypatch, caplog):
    monkeypatch.setattr(rm, "has_ants", lambda: False)
    monkeypatch.setattr(rm, "has_simpleitk", lambda: False)
    with caplog.at_level(logging.WARNING, logger=rm.__name__):
        fns = rm.make_methods("same", ["identity", "syn", "demons"], 2, 1)
    assert list(fns) == ["identity"]
    assert "syn: its package is missing" in caplog.text
    with pytest.raises(ConfigError, match="unknown method"):
        rm.make_methods("same", ["bogus"], 2, 1)


def test_ants_runs_with_our_settings_and_with_antspyx_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(rm, "has_ants", lambda: True)
    monkeypatch.setattr(rm, "ants_syn", lambda f, m, **kw: calls.append(kw))
    for family in ("same", "contrast"):
        for fn in rm.make_methods(family, ["syn", "syn_quick"], 2, 1).values():
            fn(None, None)
    ours_same, quick_same, ours_contrast, quick_contrast = calls
    assert "syn_metric" not in ours_same  # classical.SYN_DEFAULTS: CC
    assert ours_contrast["syn_metric"] == "mattes"
    for quick in (quick_same, quick_contrast):  # the configuration, either family
        assert quick["reg_iterations"] == (40, 20, 0)
        assert quick["syn_metric"] == "mattes"
    assert rm.label_of("syn_quick", "same").startswith("ANTs SyNOnly, antspyx defaults")


def test_a_tiny_run_gives_every_row_with_its_fields():
    threads = torch.get_num_threads()
    rows = rm.run([TINY], 1, methods=["identity", "refine"], steps=2, threads=1)
    assert torch.get_num_threads() == threads  # restored
    keys = [(r["family"], r["method"], r["mode"]) for r in rows]
    assert keys == [(f, m, mode) for f in rm.FAMILIES for m, mode in
                    [("identity", "-"), ("refine", "single"), ("refine", "batched")]]  # fmt: skip
    for r in rows:
        assert tuple(r) == rm.FIELDS
        assert r["size"] == "24x24"
        assert 0 <= r["epe"] < 3
        assert math.isnan(r["x_ants"])  # no ANTs row in this run
    timed = [r for r in rows if r["mode"] != "-"]
    assert all(r["ms"] > 0 for r in timed)
    assert all(r["pairs"] == 1 for r in rows)  # one round: pair 0 scored in every row
    batched = [r for r in timed if r["mode"] == "batched"]
    assert [r["batch"] for r in batched] == [2, 2]
    assert all(math.isnan(r["ms"]) for r in rows if r["method"] == "identity")
    text = rm.table(rows)
    assert text.count("\n") == 2 + len(rows)
    assert "batched x2" in text
    assert "| refine MSE ÷ Demons, same contrast | 28x28 | - |" in rm.targets(rows)
    with pytest.raises(ConfigError, match="n must be >= 1"):
        rm.run([TINY], 0)
