"""The brain benchmark's parts: the data builder (``python -m air_reg.data.brain``), its known
deformations and scoring (``air_reg.bench.brain``), the networks it trains, one tiny run."""

from __future__ import annotations

import csv
import hashlib
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from air_reg.bench import brain
from air_reg.bench.brain_report import run_methods, write_report


def digests(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def brain_root(tmp_path_factory):
    pytest.importorskip("nilearn")
    from air_reg.data import brain as builder

    root = tmp_path_factory.mktemp("brain")
    builder.main(["--out", str(root), "--figure", ""])
    return root


def test_the_builder_writes_the_slices_and_pairs_the_same_every_time(brain_root, tmp_path):
    from air_reg.data import brain as builder

    assert len(list((brain_root / "slices").glob("z*.npy"))) == 118
    with open(brain_root / "slices" / "pairs.csv", newline="") as fh:
        splits = [r["split"] for r in csv.DictReader(fh)]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 720, "val": 60, "test": 120}  # conf/data/brain.yaml's counts
    builder.main(["--out", str(tmp_path), "--figure", ""])
    assert digests(tmp_path) == digests(brain_root)  # deterministic: the same bytes
    assert "python -m air_reg.data.brain" in (brain_root / ".gitignore").read_text()


def test_the_builder_names_the_extra_it_needs(monkeypatch):
    from air_reg.data import brain as builder

    monkeypatch.setitem(sys.modules, "nilearn", None)  # as if not installed
    with pytest.raises(builder.MissingExtraError, match=r"air-reg\[brain\]"):
        builder.nilearn_files()


def test_a_missing_folder_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m air_reg.data.brain"):
        brain.load_split(tmp_path, "test")


def test_known_sets_score_zero_for_the_truth_and_the_displacement_for_nothing(brain_root):
    _, slices = brain.load_split(brain_root, "val")
    images = [slices[n] for n in sorted(slices)[:2]]
    known = brain.known_sets({"MNI152": images}, 1, torch.Generator().manual_seed(0))
    assert list(known) == ["MNI152, bspline", "MNI152, gaussian"]
    for fixed, _moving, targets in known.values():
        assert [f.shape for f in fixed] == [(233, 197)] * 2
        assert all(float(t.norm(dim=1).amax()) == pytest.approx(brain.MAX_PX) for t in targets)
        truth = brain.score_known([t[0].numpy() for t in targets], targets, fixed)
        assert max(r["epe"] for r in truth) < 1e-6
        assert max(r["folding"] for r in truth) == 0.0  # diffeomorphisms
        zero = brain.score_known([np.zeros((2, 233, 197), np.float32)] * 2, targets, fixed)
        assert min(r["epe"] for r in zero) > 0.5  # px, on the head


@pytest.mark.parametrize("net", brain.NETS)
def test_every_brain_network_builds_at_the_brain_training_size(net, make_cfg):
    if net == "brain_voxelmorph":
        pytest.importorskip("voxelmorph")
    cfg = make_cfg("train", [f"experiment={net}"])
    assert list(cfg.data.image_size) == [112, 96]
    assert cfg.data == make_cfg("train", ["data=brain"]).data  # one data config
    model = instantiate(cfg.model.net)
    with torch.no_grad():
        flow = model(torch.rand(1, 1, 112, 96), torch.rand(1, 1, 112, 96))
    assert flow.shape == (1, 2, 112, 96)
    assert torch.isfinite(flow).all()


@pytest.mark.slow
def test_model_free_refinement_through_register_beats_the_identity(brain_root, tmp_path):
    pairs, slices = brain.load_split(brain_root, "val")
    pairs = pairs[:2]
    fixed, moving = [slices[f] for f, _ in pairs], [slices[m] for _, m in pairs]
    labels = [[brain.labels_of(brain_root, p[i]) for p in pairs] for i in (0, 1)]
    known = brain.known_sets({"MNI152": fixed[:1]}, 1, torch.Generator().manual_seed(0))
    rows = brain.methods(3, [], ["none"], tmp_path / "no_weights")
    assert list(rows) == ["identity", "model-free refine 3"]
    results, per_pair = run_methods(rows, (fixed, moving, *labels), known)
    ours, identity = results["model-free refine 3"], results["identity"]
    assert ours["real"]["mse"] < identity["real"]["mse"]
    assert ours["MNI152, bspline"]["epe"] < identity["MNI152, bspline"]["epe"]
    table = write_report(tmp_path, results, known, per_pair, n_real=2, load=0.0, split="val",
                         command="test")  # fmt: skip
    assert "| identity |" in table
    assert "EPE MNI152, gaussian (1)" in table
    with open(tmp_path / "per_pair.csv", newline="") as fh:
        assert {r["method"] for r in csv.DictReader(fh)} == set(rows)
