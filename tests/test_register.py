"""``python -m air_reg.register``: two files, two folders, inputs of another size."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from PIL import Image

import air_reg
from air_reg.data.synthetic import SyntheticDataModule
from air_reg.images import read_image, save_npy, write_image
from air_reg.register import register, resize_flow, weights_name
from air_reg.train import train
from air_reg.viz import pair_figure

# A short synthetic DIRNet run that does learn (~10 s on 2 busy cores).
CKPT_OVERRIDES = [
    "data=synthetic",
    "model=dirnet",
    "model.net.channels=32",
    "model.optimizer.lr=1e-3",
    "trainer.max_epochs=3",
    "test=false",
    "+callbacks.model_checkpoint.save_top_k=0",
]
TOL_8BIT = 0.5 / 255 + 1e-4  # the warped PNG is rounded to 8 bits


def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train once per session (shared through the session's base temp dir); its last.ckpt."""
    out = tmp_path_factory.getbasetemp() / "register_ckpt"
    ckpt = out / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        train(compose_config("train", CKPT_OVERRIDES, out))
    return ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


def synthetic_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fixed, moving), each (n, 1, 28, 28): held-out shapes with known smooth warps."""
    images, _, _, k = SyntheticDataModule(num_images=n, image_size=28, seed=123).load()
    return images[:k], images[k:]


def run_register(tmp_path: Path, fixed, moving, ckpt: Path | None, *extra: str) -> dict:
    overrides = [f"fixed={fixed}", f"moving={moving}"] + [f"ckpt_path={ckpt}"] * bool(ckpt)
    return register(compose_config("register", [*overrides, *extra], tmp_path))


def expected_warp(moving_path: Path, flow_path: Path) -> torch.Tensor:
    """air_reg.warp of the moving file by the saved flow: what warped.png must hold."""
    flow = torch.from_numpy(np.load(flow_path))[None]  # (1, 2, H, W)
    return air_reg.warp(read_image(moving_path), flow)


@pytest.mark.slow
def test_two_pngs_end_to_end(tmp_path, ckpt):
    fixed, moving = synthetic_pairs(4)
    write_image(tmp_path / "f.png", fixed[0])
    write_image(tmp_path / "m.png", moving[0])
    result = run_register(tmp_path, tmp_path / "f.png", tmp_path / "m.png", ckpt)
    for name in ("warped.png", "flow.npy", "figure.png", "summary.csv"):
        assert (tmp_path / name).is_file(), name
    flow = np.load(tmp_path / "flow.npy")
    assert flow.shape == (2, 28, 28)
    assert flow.dtype == np.float32
    warped = read_image(tmp_path / "warped.png")
    diff = (warped - expected_warp(tmp_path / "m.png", tmp_path / "flow.npy")).abs().max()
    assert diff <= TOL_8BIT
    # at the model's own size the saved flow is exactly the model's output
    model = air_reg.load_model(ckpt)
    with torch.no_grad():
        direct = model(read_image(tmp_path / "f.png"), read_image(tmp_path / "m.png"))
    assert torch.allclose(torch.from_numpy(flow), direct[0], atol=1e-5)
    assert result["num_pairs"] == 1
    assert result["mse_after"] < result["mse_before"]
    assert result["smooth_dice_after"] > result["smooth_dice_before"]
    assert result["seconds"] > 0


@pytest.mark.slow
def test_two_folders_paired_by_name_in_batches(tmp_path, ckpt):
    fixed, moving = synthetic_pairs(4)
    for i in range(3):
        write_image(tmp_path / "fixed" / f"case{i}.png", fixed[i])
        write_image(tmp_path / "moving" / f"case{i}.png", moving[i])
    save_npy(tmp_path / "fixed" / "case3.npy", fixed[3, 0])  # (H, W) floats in [0, 1]
    save_npy(tmp_path / "moving" / "case3.npy", moving[3, 0])
    (tmp_path / "fixed" / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "out"
    result = run_register(
        tmp_path, tmp_path / "fixed", tmp_path / "moving", ckpt, f"out_dir={out}", "batch_size=3"
    )
    assert result["num_pairs"] == 4  # batches of 3 and 1
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == [f"case{i}" for i in range(4)]
    for i in range(4):
        ext = "npy" if i == 3 else "png"  # the warped image in the input's format
        warped = read_image(out / "warped" / f"case{i}.{ext}")
        want = expected_warp(tmp_path / "moving" / f"case{i}.{ext}", out / "flow" / f"case{i}.npy")
        assert (warped - want).abs().max() <= (1e-6 if i == 3 else TOL_8BIT)
        assert (out / "figures" / f"case{i}.png").is_file()
    assert result["mse_after"] < result["mse_before"]


@pytest.mark.slow
def test_inputs_twice_the_model_size_are_resampled(tmp_path, ckpt):
    fixed, moving = synthetic_pairs(4)
    big = lambda x: F.interpolate(x[:1], scale_factor=2, mode="bilinear")  # noqa: E731
    write_image(tmp_path / "f.png", big(fixed))
    write_image(tmp_path / "m.png", big(moving))
    result = run_register(tmp_path, tmp_path / "f.png", tmp_path / "m.png", ckpt, "figures=false")
    flow = np.load(tmp_path / "flow.npy")
    assert flow.shape == (2, 56, 56)
    warped = read_image(tmp_path / "warped.png")
    assert warped.shape == (1, 1, 56, 56)
    assert (warped - expected_warp(tmp_path / "m.png", tmp_path / "flow.npy")).abs().max() <= (
        TOL_8BIT
    )
    assert result["mse_after"] < result["mse_before"]
    # displacements are in the input's pixels: about twice those found at 28 x 28
    model = air_reg.load_model(ckpt)
    with torch.no_grad():
        small = model(fixed[:1], moving[:1])[0]
    big_flow = torch.from_numpy(flow)
    assert (big_flow.abs().mean() / small.abs().mean()).item() == pytest.approx(2, rel=0.25)


def test_resize_flow_scales_displacements_per_axis():
    flow = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(1, 2, 28, 28)
    up = resize_flow(flow, (56, 84))  # rows x2, columns x3
    assert up.shape == (1, 2, 56, 84)
    assert torch.allclose(up[0, 0], torch.full((56, 84), 3.0))
    assert torch.allclose(up[0, 1], torch.full((56, 84), -6.0))
    down = resize_flow(flow, (14, 14))
    assert torch.allclose(down, torch.tensor([0.75, -1.0]).view(1, 2, 1, 1).expand_as(down))


def smooth_field(h: int, w: int) -> torch.Tensor:
    """(1, 2, h, w) pixels: one smooth field (in units of the image size) sampled at h x w."""
    y, x = ((torch.arange(n) + 0.5) / n for n in (h, w))  # pixel centres in (0, 1)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    d = torch.stack([0.05 * torch.sin(2 * math.pi * xx), 0.04 * torch.cos(2 * math.pi * yy)])
    return (d * torch.tensor([h, w]).view(2, 1, 1))[None]


@pytest.mark.parametrize("size", [(56, 84), (14, 21)], ids=["up", "down"])
def test_resize_flow_matches_the_field_sampled_at_the_new_size(size):
    """Right scale AND right pixel-centre geometry: a 0.5-pixel offset would be caught."""
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))  # borders extrapolate
    error = (resize_flow(smooth_field(28, 28), size) - smooth_field(*size))[inner]
    assert error.abs().max() < 0.03  # pixels; align_corners=True would give ~0.05-0.2


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[0, 255]], np.uint8), [0.0, 1.0]),
        (np.array([[0, 65535]], np.uint16), [0.0, 1.0]),
        (np.array([[0.25, 1.0]], np.float64), [0.25, 1.0]),
    ],
    ids=["uint8", "uint16", "float"],
)
def test_read_npy_scales_to_unit_range(tmp_path, array, expected):
    save_npy(tmp_path / "a.npy", array)
    image = read_image(tmp_path / "a.npy")
    assert image.shape == (1, 1, 1, 2)
    assert image.dtype == torch.float32
    assert image.flatten().tolist() == pytest.approx(expected)


def test_png_round_trip_is_exact_to_8_bits(tmp_path):
    image = torch.rand(1, 1, 9, 7)
    write_image(tmp_path / "x.png", image)
    assert (read_image(tmp_path / "x.png") - image).abs().max() <= TOL_8BIT
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left behind


def test_pair_figure_draws_one_row_per_pair(tmp_path):
    images, flow = torch.rand(3, 1, 20, 24), torch.randn(3, 2, 20, 24)
    path = pair_figure(images, images, images, flow, tmp_path / "fig.png", titles=["a", "b", "c"])
    with Image.open(path) as fig:
        width, height = fig.size
    assert height > width / 2  # three rows of five panels
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def nifti(path: Path, array: np.ndarray) -> Path:
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), path)
    return path


def test_2d_nifti_registers_as_the_same_pixels_saved_as_npy(tmp_path):
    """register reads every format data=folder reads: a 2-D NIfTI (nibabel) pairs by its name
    without the double suffix, and gives the flow its pixels give as .npy."""
    fixed, moving = synthetic_pairs(2)
    for side, images in (("fixed", fixed), ("moving", moving)):
        (tmp_path / side).mkdir()
        nifti(tmp_path / side / "brain.nii.gz", images[0, 0].numpy())
        nifti(tmp_path / side / "plain.nii", images[1, 0].numpy())
        save_npy(tmp_path / side / "same.npy", images[0, 0])
    out = tmp_path / "out"
    result = run_register(tmp_path, tmp_path / "fixed", tmp_path / "moving", None,
                          "weights=dirnet_mnist", "figures=false", f"out_dir={out}")  # fmt: skip
    assert [r["name"] for r in result["pairs"]] == ["brain", "plain", "same"]
    assert result["failed"] == 0
    flows = {n: np.load(out / "flow" / f"{n}.npy") for n in ("brain", "plain", "same")}
    assert flows["brain"].shape == (2, 28, 28)
    np.testing.assert_array_equal(flows["brain"], flows["same"])


def test_register_prints_the_summary_and_writes_the_config_to_the_run_folder(tmp_path, caplog):
    fixed, moving = synthetic_pairs(1)
    write_image(tmp_path / "f.png", fixed[0])
    write_image(tmp_path / "m.png", moving[0])
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="air_reg.register"):
        run_register(tmp_path, tmp_path / "f.png", tmp_path / "m.png", None,
                     "weights=dirnet_mnist", f"out_dir={out}")  # fmt: skip
    config = (out / "config.yaml").read_text()
    assert "fixed:" in config
    assert "refine:" in config
    assert "refine:" not in caplog.text  # the 40-line config is not in the terminal
    assert "1 pair(s): MSE" in caplog.text
    assert (
        f"wrote warped.png flow.npy field.nii.gz figure.png summary.csv config.yaml to {out}"
        in caplog.text
    )
    assert len(caplog.records) <= 3


def test_model_none_still_registers_model_free_with_a_deprecation_warning(tmp_path, caplog):
    cfg = compose_config("register", ["fixed=a.png", "moving=b.png", "model=none"], tmp_path)
    with caplog.at_level("WARNING"):
        assert weights_name(cfg) == "none"
    assert "model=none is deprecated; use weights=none" in caplog.text
    cfg = compose_config("register", ["fixed=a.png", "moving=b.png", "weights=none"], tmp_path)
    caplog.clear()
    assert weights_name(cfg) == "none"
    assert "deprecated" not in caplog.text
