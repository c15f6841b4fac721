"""A folder of one's own non-square PNGs with label maps: train, eval (label metrics), register."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from test_folder_data import H, W, blob, png_folder

import air_reg
from air_reg.data.preprocess import Preprocessing, pad_offsets
from air_reg.data.readers import suffix_of
from air_reg.eval import eval_datamodule, evaluate
from air_reg.register import register
from air_reg.train import train


@pytest.mark.slow
def test_a_folder_of_non_square_pngs_with_labels_trains_evaluates_and_registers(tmp_path):
    data = png_folder(tmp_path / "images", n=24)
    overrides = [
        "data=folder",
        f"data.path={data}",
        "data.batch_size=8",
        "model=dirnet",
        "model.net.channels=16",
        "model.optimizer.lr=1e-3",
        "trainer.max_epochs=2",
    ]
    run = tmp_path / "run"
    metrics = train(compose_config("train", overrides, run))
    assert {"test/mse", "test/dice_labels", "test/hd95"} <= set(metrics)
    record = json.loads((run / "run_record.json").read_text())
    assert record["config"]["data"]["image_size"] == [H, W]  # the images' own size
    ckpt = run / "checkpoints" / "last.ckpt"

    summary = evaluate(compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path / "eval"))
    for method in ("identity", "model"):
        assert {"dice_labels", "hd95", "dsc30", "dice_label_1", "dice_label_2"} <= set(
            summary[method]
        )
    assert 0 < summary["identity"]["dice_labels"]["mean"] < 1
    per_pair = (tmp_path / "eval" / "per_pair.csv").read_text().splitlines()[0]
    assert "dice_labels" in per_pair
    assert "hd95" in per_pair

    a, b = data / "img0.png", data / "img1.png"
    out = register(
        compose_config(
            "register", [f"fixed={a}", f"moving={b}", f"ckpt_path={ckpt}"], tmp_path / "r"
        )
    )
    assert out["num_pairs"] == 1
    assert out["pairs"][0]["height"] == H
    assert out["pairs"][0]["width"] == W


def mixed_folder(root: Path, n: int = 12) -> Path:
    """Sub-folder a/: 8-bit PNGs, 20 x 28; b/: 2-D NIfTI floats up to ~700, 22 x 26 (nibabel).
    Each image has one hot pixel, so percentile and min-max normalisation differ."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(3)
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        image, _ = blob(rng, 20, 28)
        image[rng.integers(20), rng.integers(28)] = 255
        Image.fromarray(image).save(root / "a" / f"a{i}.png")
        image = blob(rng, 22, 26)[0].astype(np.float32) * 2.5 + rng.random((22, 26)) * 20
        image[rng.integers(22), rng.integers(26)] = 700
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), root / "b" / f"b{i}.nii.gz")
    return root


@pytest.mark.slow
def test_eval_and_register_give_the_same_flow_for_a_padded_percentile_model(tmp_path):
    """The issue's guarantee: a model trained with data=folder (percentile normalisation,
    pad_to) gives the same flow for the same pair through eval and through register."""
    data = mixed_folder(tmp_path / "images")
    overrides = [
        *("data=folder", f"data.path={data}", "data.normalize=percentile"),
        *("data.percentiles=[2,98]", "data.pad_to=8", "data.pairing=group"),
        *("data.batch_size=4", "data.train_fraction=0.6", "model=dirnet"),
        *("model.net.channels=8", "model.optimizer.lr=1e-2", "trainer.max_epochs=1"),
        *("+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1", "test=false"),
    ]
    run = tmp_path / "run"
    train(compose_config("train", overrides, run))
    ckpt = run / "checkpoints" / "last.ckpt"
    model = air_reg.load_model(ckpt)
    assert tuple(model.image_size) == (24, 32)  # padded: 22 -> 24 rows, 28 -> 32 columns

    # eval's pairs: the data module rebuilt from the stored record, padded images, one flow each
    dm = eval_datamodule(compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path / "e"), model)
    names, pairs = dm._data["names"], dm.test_pairs.tolist()
    assert {names[f][0] for f, _ in pairs} == {"a", "b"}  # PNG and NIfTI pairs both tested
    images = dm._data["images"]
    with torch.no_grad():
        eval_flows = model(images[[f for f, _ in pairs]], images[[m for _, m in pairs]])

    # register: the same pairs from the files, folders paired by name
    for k, (f, m) in enumerate(pairs):
        for side, i in (("fixed", f), ("moving", m)):
            (tmp_path / side).mkdir(exist_ok=True)
            shutil.copy(data / names[i], tmp_path / side / f"p{k}{suffix_of(Path(names[i]))}")
    out = tmp_path / "reg"
    args = [f"fixed={tmp_path / 'fixed'}", f"moving={tmp_path / 'moving'}", f"ckpt_path={ckpt}"]
    register(compose_config("register", [*args, "refine.guard=false", "figures=false",
                                         f"out_dir={out}"], tmp_path / "r"))  # fmt: skip
    worst, moved = 0.0, 0.0
    for k, (f, _) in enumerate(pairs):
        flow = torch.from_numpy(np.load(out / "flow" / f"p{k}.npy"))  # (2, h, w) the image's
        h, w = flow.shape[-2:]
        assert (h, w) == ((20, 28) if names[f].startswith("a") else (22, 26))
        top, left = pad_offsets((h, w), (24, 32))
        on_image = eval_flows[k, :, top : top + h, left : left + w]
        worst = max(worst, (on_image - flow).abs().max().item())
        moved = max(moved, flow.abs().max().item())
    assert worst <= 1e-5, f"eval and register flows differ by {worst:.3g} px"
    assert moved > 1e-2, "the flows are too small for the comparison to mean anything"

    # the comparison has teeth: min-max instead of percentile, or resizing instead of
    # padding (what register did before the record), give other flows for a NIfTI pair
    k = next(k for k, (f, _) in enumerate(pairs) if names[f].startswith("b"))
    files = [tmp_path / side / f"p{k}.nii.gz" for side in ("fixed", "moving")]
    flow = torch.from_numpy(np.load(out / "flow" / f"p{k}.npy"))[None]
    trained = Preprocessing.of_model(model)
    for other in (
        Preprocessing("minmax", sizing="pad", size=(24, 32)),
        Preprocessing("percentile", trained.percentiles, sizing="resize", size=(24, 32)),
    ):
        with torch.no_grad():
            other_flow = model(*(other.to_model(other.load(f), (24, 32)) for f in files))
        assert (other.from_model(other_flow, (22, 26)) - flow).abs().max() > 1e-4, other
