"""Label metrics (Dice per label, HD95, DSC30): hand-computed values, empty cases, wiring."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from air_reg import metrics, scoring, warp
from air_reg.models.registration_module import LABEL_METRICS


def square(top: int, left: int, size: int = 10, label: int = 1, out=None) -> torch.Tensor:
    """A (1, 1, 20, 20) label map (or ``out``) with a size x size square of ``label``."""
    out = torch.zeros(1, 1, 20, 20) if out is None else out
    out[..., top : top + size, left : left + size] = label
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_square_shifted_by_k_pixels(k, axis):
    fixed = square(5, 5)
    moving = square(5 + k, 5) if axis == "rows" else square(5, 5 + k)
    # overlap 10 x (10 - k) of 100 + 100 pixels; the far edges are k apart
    assert metrics.label_dice(fixed, moving).item() == pytest.approx(2 * 10 * (10 - k) / 200)
    assert metrics.label_hd95(fixed, moving).item() == pytest.approx(k)
    assert metrics.label_hd95(moving, fixed).item() == pytest.approx(k)  # symmetric


def test_two_labels_give_per_label_and_mean_values():
    fixed = square(0, 0, size=4, label=2, out=square(5, 3))
    moving = square(1, 0, size=4, label=2, out=square(5, 5))  # label 1 by 2 px, label 2 by 1
    per_label = metrics.label_dice(fixed, moving)
    assert per_label.shape == (1, 2)
    assert per_label[0].tolist() == pytest.approx([0.8, 2 * 12 / 32])
    assert metrics.mean_over_labels(per_label).item() == pytest.approx((0.8 + 0.75) / 2)
    hd = metrics.label_hd95(fixed, moving)
    assert hd[0].tolist() == pytest.approx([2.0, 1.0])
    assert metrics.mean_over_labels(hd).item() == pytest.approx(1.5)


def test_identical_maps_give_dice_one_and_hd95_zero():
    labels = torch.randint(0, 5, (3, 1, 16, 16)).float()
    assert torch.equal(metrics.label_dice(labels, labels), torch.ones(3, 4))
    assert torch.equal(metrics.label_hd95(labels, labels), torch.zeros(3, 4))


def test_labels_missing_in_a_map_are_nan_and_left_out_of_the_mean():
    fixed = square(0, 0, size=4, label=2, out=square(5, 3))  # labels 1 and 2
    moving = square(5, 5)  # label 2 missing: no registration can match it
    dsc = metrics.label_dice(fixed, moving, num_labels=3)  # label 3: absent from both
    assert dsc[0, 0].item() == pytest.approx(0.8)
    assert dsc[0, 1:].isnan().all()
    assert metrics.mean_over_labels(dsc).item() == pytest.approx(0.8)
    hd = metrics.label_hd95(fixed, moving, num_labels=3)
    assert hd[0, 0].item() == pytest.approx(2.0)
    assert hd[0, 1:].isnan().all()
    # in fixed and moving but lost by the warp: Dice 0, HD95 the image diagonal
    lost = torch.zeros_like(moving)
    assert metrics.label_dice(fixed, lost, moving)[0].tolist()[0] == 0
    assert metrics.label_hd95(fixed, lost, moving)[0, 0].item() == pytest.approx(
        math.hypot(19, 19)
    )
    # a pair sharing no label has no mean
    assert metrics.mean_over_labels(metrics.label_dice(square(0, 0, label=2), moving)).isnan()


def test_dsc30_is_the_30_percent_quantile_over_pairs():
    values = torch.tensor([0.9, 0.5, 0.7, 0.1, 0.3])
    # sorted 0.1 0.3 0.5 0.7 0.9: position 0.3 * 4 = 1.2 -> 0.3 + 0.2 * 0.2
    assert metrics.dsc30(values).item() == pytest.approx(0.34)
    assert metrics.dsc30(values).item() == pytest.approx(np.quantile(values.numpy(), 0.3))
    assert metrics.dsc30(torch.cat([values, torch.tensor([math.nan])])).item() == pytest.approx(
        0.34
    )


def test_pair_metrics_with_labels_and_an_identity_flow():
    fixed_labels, moving_labels = square(5, 5), square(5, 7)
    img, flow = fixed_labels / 2, torch.zeros(1, 2, 20, 20)
    labels = {"fixed_labels": fixed_labels, "moving_labels": moving_labels}
    out = metrics.pair_metrics(img, img, flow, **labels)
    assert out["dice_labels"].item() == pytest.approx(0.8)
    assert out["hd95"].item() == pytest.approx(2.0)
    cheap = metrics.pair_metrics(img, img, flow, full=False, **labels)
    assert "dice_labels" in cheap
    assert "hd95" not in cheap  # validation: cheap metrics only
    with pytest.raises(ValueError, match="pass all three"):
        metrics.pair_metrics(img, img, None, **labels)


def test_nearest_warp_keeps_labels_integer_and_bilinear_is_refused():
    labels = torch.randint(0, 6, (2, 1, 16, 16)).float()
    flow = 3 * torch.randn(2, 2, 16, 16)
    warped = warp(labels, flow, mode="nearest")
    assert torch.equal(warped, warped.round())
    assert set(warped.unique().tolist()) <= set(labels.unique().tolist())
    assert metrics.label_dice(labels, warped).shape == (2, 5)
    with pytest.raises(ValueError, match="mode='nearest'"):
        metrics.label_dice(labels, warp(labels, flow))


OLD_KEYS = ["mse", "psnr", "smooth_dice", "folding", "dice", "ncc", "ssim", "sdlogj", "epe"]


def test_pair_metrics_without_labels_is_unchanged():
    fixed, warped = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    flow, target = 0.3 * torch.randn(3, 2, 16, 16), torch.randn(3, 2, 16, 16)
    out = metrics.pair_metrics(fixed, warped, flow, target)
    assert list(out) == OLD_KEYS
    expected = {
        "mse": metrics.mse(warped, fixed),
        "psnr": metrics.psnr(warped, fixed),
        "smooth_dice": metrics.smooth_dice(warped, fixed),
        "folding": metrics.folding(flow),
        "dice": metrics.dice(warped, fixed),
        "ncc": metrics.ncc(warped, fixed),
        "ssim": metrics.ssim(warped, fixed),
        "sdlogj": metrics.sd_log_jacobian(flow),
        "epe": metrics.epe(flow, target),
    }
    assert all(torch.equal(out[k], expected[k]) for k in OLD_KEYS)
    cheap = ["mse", "psnr", "smooth_dice", "folding"]
    assert list(metrics.pair_metrics(fixed, warped, flow, full=False)) == cheap
    no_flow = ["mse", "psnr", "smooth_dice", "dice", "ncc", "ssim"]
    assert list(metrics.pair_metrics(fixed, warped)) == no_flow


def test_sd_log_jacobian_is_unchanged_without_folds_and_clips_folds():
    smooth = 0.1 * torch.randn(2, 2, 16, 16)
    assert metrics.folding(smooth).max() == 0
    old = metrics.jacobian_determinant(smooth).abs().clamp(min=1e-9).log().flatten(1).std(1)
    assert torch.equal(metrics.sd_log_jacobian(smooth), old)
    rough = 3 * torch.randn(2, 2, 16, 16)
    assert metrics.folding(rough).min() > 0
    jac = metrics.jacobian_determinant(rough)
    expected = jac.clamp(1e-9, 1e9).log().flatten(1).std(1)  # a fold counts as log 1e-9
    assert torch.allclose(metrics.sd_log_jacobian(rough), expected)
    assert (expected > jac.abs().clamp(min=1e-9).log().flatten(1).std(1)).all()


def shift_method(fixed, moving):
    """The true flow of ``moving = fixed`` shifted 2 px along columns."""
    flow = fixed.new_zeros(fixed.shape[0], 2, *fixed.shape[-2:])
    flow[:, 1] = 2.0
    return flow


def test_score_and_summary_carry_label_metrics(tmp_path):
    fixed_labels = torch.cat([square(5, 5), square(5, 5, label=2), square(5, 5)])
    # pair 1 shifted 2 px, pair 2 shares no label, pair 3 shifted 1 px
    moving_labels = torch.cat([square(5, 7), square(5, 5), square(5, 6)])
    batch = {
        "fixed": fixed_labels / 2,
        "moving": moving_labels / 2,
        "fixed_labels": fixed_labels,
        "moving_labels": moving_labels,
    }
    methods = {"identity": scoring.identity_method, "shift": shift_method}
    per_pair, _ = scoring.score(methods, [batch], progress=False)
    assert per_pair["identity"]["dice_labels"][0].item() == pytest.approx(0.8)
    assert per_pair["identity"]["hd95"][0].item() == pytest.approx(2.0)
    assert per_pair["shift"]["dice_labels"][0].item() == pytest.approx(1.0)
    assert per_pair["shift"]["hd95"][0].item() == pytest.approx(0.0)
    assert per_pair["shift"]["dice_labels"][1].isnan()
    summary = scoring.summarise(per_pair)  # the unscored pair 2 is left out
    assert summary["identity"]["dice_labels"]["mean"] == pytest.approx(0.85)
    assert summary["identity"]["dice_labels"]["n"] == 2
    assert summary["identity"]["hd95"]["mean"] == pytest.approx(1.5)
    # 30 % quantile of (0.8, 0.9) and of (1.0, 0.9): 0.83 and 0.93
    assert summary["identity"]["dsc30"] == {"mean": pytest.approx(0.83), "std": None, "n": 2}
    assert summary["shift"]["dsc30"]["mean"] == pytest.approx(0.93)
    table = scoring.markdown_table(summary, {"identity": 1.0, "shift": 1.0})
    assert "| dsc30 | 0.8300 | 0.9300 |" in table
    scoring.write_per_pair_csv(tmp_path / "p.csv", per_pair)
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header.endswith("dice_labels,hd95,dice_label_1,dice_label_2")
    per_label = per_pair["identity"]["dice_label_1"]  # label 1: pairs 1 and 3; 2: none scored
    assert per_label[0].item() == pytest.approx(0.8)
    assert per_label[1].isnan()
    assert per_label[2].item() == pytest.approx(0.9)
    assert per_pair["identity"]["dice_label_2"].isnan().all()
    assert summary["identity"]["dice_label_1"]["mean"] == pytest.approx(0.85)
    assert summary["identity"]["dice_label_1"]["n"] == 2
    json.dumps(summary)  # None and NaN serialise


def test_score_without_labels_has_no_label_rows():
    batch = {"fixed": torch.rand(2, 1, 16, 16), "moving": torch.rand(2, 1, 16, 16)}
    per_pair, _ = scoring.score({"identity": scoring.identity_method}, [batch], progress=False)
    summary = scoring.summarise(per_pair)
    assert list(summary["identity"]) == OLD_KEYS[:-1]  # no target flow: no epe
    assert "dsc30" not in scoring.markdown_table(summary)


@pytest.mark.filterwarnings("ignore:You are trying to")  # self.log without a Trainer
@pytest.mark.parametrize(
    ("stage", "logged"), [("val", {"dice_labels"}), ("test", {"dice_labels", "hd95"})]
)
def test_module_logs_label_metrics_only_for_labelled_batches(make_cfg, stage, logged):
    module = instantiate(make_cfg("train", ["model=dirnet", "data=mnist"]).model)
    images = {"fixed": torch.rand(2, 1, 28, 28), "moving": torch.rand(2, 1, 28, 28)}
    labels = torch.randint(0, 3, (2, 1, 28, 28)).float()
    with torch.no_grad():
        module._common_step(images, stage)
        assert not any(module.metrics[stage][k].update_called for k in LABEL_METRICS)
        module._common_step(images | {"fixed_labels": labels, "moving_labels": labels}, stage)
    called = {k for k in LABEL_METRICS if module.metrics[stage][k].update_called}
    assert called == logged


def test_import_stays_light():
    code = (
        "import json, sys, air_reg.metrics; "
        "print(json.dumps([m for m in ('scipy', 'torchmetrics') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
