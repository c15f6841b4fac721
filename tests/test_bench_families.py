"""The 2-D families with known fields (air_reg.bench.families): seeded, in our warp convention,
within their stated magnitudes, a real contrast change, disjoint tune and test sources; and the
benchmark command's smoke run."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("nilearn")

from air_reg import metrics as M  # noqa: E402
from air_reg import warp  # noqa: E402
from air_reg.bench import families as fam  # noqa: E402
from air_reg.bench.family_bench import timed_pair, timed_scores  # noqa: E402
from air_reg.data import brain, synthetic  # noqa: E402
from air_reg.errors import ConfigError  # noqa: E402

SMALL = (48, 64)
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "refine_families.py"


@pytest.fixture(scope="module")
def batches():
    """Every family, 10 test pairs (each source once, MNI152 twice), at the default size."""
    return {name: fam.family(name, 10, seed=0)[0] for name in fam.FAMILIES}


def test_the_same_seed_gives_the_same_tensors_and_another_seed_others(batches):
    again = fam.family("large", 3, seed=0)[0]
    for key in ("fixed", "moving", "flow", "edges"):
        assert torch.equal(again[key], batches["large"][key][:3]), key
    assert again["source"] == batches["large"]["source"][:3]
    other = fam.family("large", 3, seed=1)[0]
    assert not torch.equal(other["flow"], again["flow"])


def test_batches_split_the_same_pairs(batches):
    parts = fam.family("contrast", 10, seed=0, batch_size=4)
    assert [len(b["fixed"]) for b in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([b["moving"] for b in parts]), batches["contrast"]["moving"])


def test_fixed_is_the_moving_image_warped_by_the_flow(batches):
    for name, b in batches.items():
        assert b["fixed"].shape == (10, 1, *fam.SIZE)
        assert b["flow"].shape == (10, 2, *fam.SIZE)
        assert b["fixed"].dtype == b["moving"].dtype == b["flow"].dtype == torch.float32
        assert torch.equal(b["fixed"], warp(b["moving_in_fixed_contrast"], b["flow"])), name
        if name != "contrast":
            assert torch.equal(b["moving"], b["moving_in_fixed_contrast"])
        for key in ("fixed", "moving"):
            assert b[key].min() >= 0, (name, key)
            assert b[key].max() <= 1, (name, key)


def test_magnitudes_are_within_the_stated_ranges(batches):
    for name, (lo, hi) in (("small", fam.SMALL_PX), ("contrast", fam.CONTRAST_PX)):
        peak = batches[name]["flow"].norm(dim=1).flatten(1).amax(1)
        assert (peak >= lo - 1e-4).all(), (name, peak)
        assert (peak <= hi + 1e-4).all(), (name, peak)
    mean = batches["large"]["flow"].norm(dim=1).mean()
    assert 5 < mean < 20, mean  # identity's EPE: an affine motion of ~10 px, not a small one
    for name, b in batches.items():
        assert M.folding(b["flow"]).max() == 0, name  # diffeomorphic
        assert b["edges"].any(dim=(1, 2, 3)).all()
        assert (b["edges"] <= b["inside"]).all()


def test_wider_shifts_move_the_large_family_further_and_only_it(batches):
    """``shift_px`` widens the large family's affine shifts (experiments/attention_reach.py):
    8 px is the family as it is; 32 moves every pair further on average; the other families
    ignore it."""
    as_is = fam.family("large", 4, SMALL, seed=0, split="tune")[0]
    eight = fam.family("large", 4, SMALL, seed=0, split="tune", shift_px=8.0)[0]
    wide = fam.family("large", 4, SMALL, seed=0, split="tune", shift_px=32.0)[0]
    assert torch.equal(as_is["flow"], eight["flow"])
    assert wide["flow"].norm(dim=1).mean() > 1.5 * as_is["flow"].norm(dim=1).mean()
    small = fam.family("small", 2, SMALL, seed=0, split="tune", shift_px=32.0)[0]
    assert torch.equal(
        small["flow"], fam.family("small", 2, SMALL, seed=0, split="tune")[0]["flow"]
    )


def test_the_affine_part_is_exact():
    a, t = synthetic.random_affines(2, torch.Generator().manual_seed(0))
    zero = torch.zeros(2, 2, 5, 7)
    flow = synthetic.affine_after(zero, a, t)
    centre = torch.tensor([2.0, 3.0]).view(1, 2, 1, 1)
    p = synthetic.identity_grid((5, 7))[None]
    expected = torch.einsum("bij,bjhw->bihw", a, p - centre) + centre + t.view(2, 2, 1, 1) - p
    torch.testing.assert_close(flow, expected)
    assert (torch.linalg.det(a) > 0).all()


def test_the_contrast_family_changes_the_intensity_order(batches):
    def corr(b):  # per pair, fixed vs the moving image warped by the true flow, on the head
        back = warp(b["moving"], b["flow"])  # for MNI152 (the air is black in both contrasts)
        out = []
        for f, m, source in zip(b["fixed"], back, b["source"], strict=True):
            keep = f > 0.05 if source.startswith(fam.MNI) else torch.ones_like(f, dtype=bool)
            out.append(torch.corrcoef(torch.stack([f[keep], m[keep]]))[0, 1])
        return torch.stack(out)

    assert (corr(batches["small"]) > 0.999).all()
    changed = corr(batches["contrast"])
    assert (changed < 0.5).all(), changed
    kinds = batches["contrast"]["contrast"]
    assert set(kinds) == {"t2-like", "inverted", "folded"}, kinds
    t2 = torch.tensor([k == "t2-like" for k in kinds])
    assert (changed[t2] < 0).all(), changed  # CSF bright, white matter dark: T1 reversed


def test_tune_and_test_sources_are_disjoint():
    assert not set(fam.SKIMAGE["tune"]) & set(fam.SKIMAGE["test"])
    assert not set(fam.MNI_Z["tune"]) & set(fam.MNI_Z["test"])
    gap = min(abs(a - b) for a in fam.MNI_Z["tune"] for b in fam.MNI_Z["test"])
    assert gap >= 10
    # the brain benchmark's blocks (air_reg.data.brain): tune = validation, test = test
    _, _, wm = fam.mni_volumes()
    first, last = brain.brain_range(wm * 255, 2.0)
    split = {z: brain.block_split(i) for i, z in enumerate(range(first, last + 1))}
    assert {split[z] for z in fam.MNI_Z["tune"]} == {"val"}
    assert {split[z] for z in fam.MNI_Z["test"]} == {"test"}
    assert sorted(fam.MNI_Z["test"]) == sorted(z for z, s in split.items() if s == "test")
    tune = fam.family("small", 9, SMALL, split="tune")[0]["source"]
    test = fam.family("small", 9, SMALL, split="test")[0]["source"]
    assert not set(tune) & set(test)


def test_any_size_and_clear_errors():
    b = fam.family("large", 2, SMALL)[0]
    assert b["fixed"].shape == (2, 1, *SMALL)
    with pytest.raises(ConfigError, match="unknown family"):
        fam.family("huge", 2)
    with pytest.raises(ConfigError, match="split"):
        fam.family("small", 2, split="val")


def test_the_command_runs_on_two_pairs(tmp_path):
    spec = importlib.util.spec_from_file_location("refine_families", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.main(["--pairs", "2", "--size", "48", "64", "--steps", "5",
                        "--methods", "identity", "refine", "--out", str(tmp_path)])  # fmt: skip
    assert len(rows) == 2 * 2 * len(fam.FAMILIES)
    with open(tmp_path / "results.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    table = (tmp_path / "table.md").read_text()
    assert "identity" in table
    assert "refine 5 (MSE, the default preset)" in table
    assert "load average" in (tmp_path / "README.md").read_text()
    identity = [r for r in rows if r["method"] == "identity"]
    truth = {r["family"]: r["epe"] for r in identity}
    assert truth["large"] > truth["small"] > 0


def test_learned_models_get_a_one_shot_and_a_refined_row():
    from air_reg.bench.family_bench import label_of, make_method

    fixed, moving = torch.rand(1, 1, 40, 52), torch.rand(1, 1, 40, 52)
    one_shot = make_method("net:air_unet_mnist", "small")
    with torch.no_grad():
        assert one_shot(fixed, moving).shape == (1, 2, 40, 52)  # resized as register does
    assert label_of("net:air_unet_mnist") == "air_unet_mnist one-shot"
    label = label_of("net+refine:logs/x/run1/checkpoints/last.ckpt", 60)
    assert label == "run1 + refine 60 (MI on contrast)"


def test_batched_one_shot_rows_give_each_model_its_epe_and_time():
    from air_reg.bench.family_bench import batched

    table = batched(["air_match_synth", "air_unet_mnist"], ["small"], 2, (32, 40), rounds=1)
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [r[1].strip() for r in rows] == ["air_match_synth", "air_unet_mnist"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_timed_pairs_rotate_the_order_and_score_every_pair():
    """``family_bench.timed_pair`` runs each method once a pair, the order rotated by the
    turn; ``timed_scores`` (the choice scripts') scores every pair of a batch with them."""
    order = []

    def method(name, shift):
        def run(fixed, moving):
            order.append(name)
            return torch.full((len(fixed), 2, *fixed.shape[2:]), shift)

        return run

    fns = {"a": method("a", 0.0), "b": method("b", 1.0), "c": method("c", 2.0)}
    one = torch.zeros(1, 1, 8, 8)
    assert list(timed_pair(fns, one, one, 1)) == ["b", "c", "a"]
    assert order == ["b", "c", "a"]
    images = torch.zeros(2, 1, 8, 8)
    edges = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    batch = {"fixed": images, "moving": images, "flow": torch.zeros(2, 2, 8, 8), "edges": edges}
    order.clear()
    scores = timed_scores(fns, batch)
    assert order == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"]  # warm-up, pairs 0, 1
    assert scores["c"]["epe"] == pytest.approx([2 * 2**0.5] * 2)
    assert scores["a"]["epe"] == [0.0, 0.0]
    assert all(len(v) == 2 for s in scores.values() for v in s.values())
