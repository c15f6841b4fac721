"""``python -m air_reg.apply``: a saved field applied to an image, a label map and points."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

import air_reg
from air_reg.apply import apply
from air_reg.data.synthetic import known_flows
from air_reg.errors import ConfigError, UserError
from air_reg.fields import write_itk_field
from air_reg.geometry import Geometry
from air_reg.images import save_npy
from air_reg.mapping import warp_labels
from air_reg.points import map_points

SIZE = (24, 30)
TOL_8BIT = 0.5 / 255 + 1e-4


def flow_of(size=SIZE, seed=0) -> torch.Tensor:
    return known_flows(1, size, torch.Generator().manual_seed(seed), magnitude=2.0)


def run(tmp_path: Path, *overrides: str) -> dict:
    return apply(compose_config("apply", list(overrides), tmp_path / "hydra"))


def png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def pngs(tmp_path):
    """fixed.png, moving.png (grey), labels.png (uint8), points.csv (x, y), flow.npy."""
    rng = np.random.default_rng(0)
    grey = (rng.random(SIZE) * 255).astype(np.uint8)
    labels = np.zeros(SIZE, np.uint8)
    labels[5:15, 8:20], labels[16:22, 3:12] = 1, 2
    flow = flow_of()
    save_npy(tmp_path / "flow.npy", flow[0])
    (tmp_path / "points.csv").write_text("name,x,y\na,3,4\nb,27,2\nc,12.5,20.25\n")
    return {
        "fixed": png(tmp_path / "fixed.png", grey[::-1].copy()),
        "moving": png(tmp_path / "moving.png", grey),
        "labels": png(tmp_path / "labels.png", labels),
        "flow": flow,
        "grey": grey,
        "label_values": labels,
    }


def test_apply_png_image_labels_and_points(tmp_path, pngs):
    out = tmp_path / "out"
    result = run(
        tmp_path,
        f"field={tmp_path / 'flow.npy'}",
        f"fixed={pngs['fixed']}",
        f"image={pngs['moving']}",
        f"labels={pngs['labels']}",
        f"points={tmp_path / 'points.csv'}",
        f"out_dir={out}",
    )
    assert sorted(Path(p).name for p in result["outputs"]) == [
        "labels.png",
        "points.csv",
        "warped.png",
    ]
    flow = pngs["flow"]
    moving = torch.from_numpy(pngs["grey"] / 255.0).float()[None, None]
    want = air_reg.warp(moving, flow)[0, 0].numpy()
    got = np.asarray(Image.open(out / "warped.png")) / 255.0
    assert np.abs(got - want).max() <= TOL_8BIT
    labels = np.asarray(Image.open(out / "labels.png"))
    assert labels.dtype == np.uint8
    px = Geometry.pixels(2)
    assert np.array_equal(labels, warp_labels(pngs["label_values"], flow, px, px))
    rows = rows_of(out / "points.csv")
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    ij = np.array([[4.0, 3.0], [2.0, 27.0], [20.25, 12.5]])  # (row, column) = (y, x)
    want = map_points(ij, flow, px, px)[:, ::-1]
    np.testing.assert_allclose(xy, want, atol=1e-6)
    x, y = 3 + flow[0, 1, 4, 3].item(), 4 + flow[0, 0, 4, 3].item()  # at a pixel centre
    np.testing.assert_allclose(xy[0], [x, y], atol=1e-6)
    # and back: the mapped points as inverse_points return to the input
    back = run(
        tmp_path,
        f"field={tmp_path / 'flow.npy'}",
        f"fixed={pngs['fixed']}",
        f"inverse_points={out / 'points.csv'}",
        f"out_dir={tmp_path / 'back'}",
    )
    rows = rows_of(Path(back["outputs"][0]))
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    np.testing.assert_allclose(xy, [[3, 4], [27, 2], [12.5, 20.25]], atol=1e-3)


def test_apply_colour_png_gives_rgb(tmp_path, pngs):
    rgb = (np.random.default_rng(1).random((*SIZE, 3)) * 255).astype(np.uint8)
    png(tmp_path / "colour.png", rgb)
    out = tmp_path / "out"
    run(
        tmp_path,
        f"field={tmp_path / 'flow.npy'}",
        f"fixed={pngs['fixed']}",
        f"image={tmp_path / 'colour.png'}",
        f"out_dir={out}",
    )
    with Image.open(out / "warped.png") as image:
        assert image.mode == "RGB"
        got = np.asarray(image) / 255.0
    for c in range(3):
        moving = torch.from_numpy(rgb[..., c] / 255.0).float()[None, None]
        want = air_reg.warp(moving, pngs["flow"])[0, 0].numpy()
        assert np.abs(got[..., c] - want).max() <= TOL_8BIT
    run(
        tmp_path,
        f"field={tmp_path / 'flow.npy'}",
        f"fixed={pngs['fixed']}",
        f"image={tmp_path / 'colour.png'}",
        "channel=green",
        f"out_dir={out}",
    )
    with Image.open(out / "warped.png") as image:
        assert image.mode == "L"  # one channel asked: grey out


def test_apply_nifti_keeps_the_fixed_header_and_matches_air_reg_warp(tmp_path):
    """An ITK field (write_itk_field) on an anisotropic 2-D NIfTI: the warped image keeps the
    fixed image's affine and equals air_reg.warp with the flow; labels keep their dtype."""
    nib = pytest.importorskip("nibabel")
    affine = np.diag([0.5, 2.0, 1.0, 1.0])
    affine[:3, 3] = [-12.0, 7.0, 3.0]
    rng = np.random.default_rng(2)
    fixed, moving = rng.random(SIZE).astype(np.float32), rng.random(SIZE).astype(np.float32)
    labels = rng.integers(0, 5, SIZE).astype(np.int16)
    for name, array in (("fixed", fixed), ("moving", moving), ("labels", labels)):
        nib.save(nib.Nifti1Image(array, affine), tmp_path / f"{name}.nii.gz")
    geometry = Geometry.from_affine(affine, 2)
    assert geometry.spacing == (0.5, 2.0)
    flow = flow_of()
    write_itk_field(tmp_path / "field.nii.gz", flow, geometry)
    (tmp_path / "pts.csv").write_text("i,j\n3,4\n10.5,20\n")
    out = tmp_path / "out"
    run(
        tmp_path,
        f"field={tmp_path / 'field.nii.gz'}",
        f"fixed={tmp_path / 'fixed.nii.gz'}",
        f"image={tmp_path / 'moving.nii.gz'}",
        f"labels={tmp_path / 'labels.nii.gz'}",
        f"points={tmp_path / 'pts.csv'}",
        f"out_dir={out}",
    )
    warped = nib.load(out / "warped.nii.gz")
    np.testing.assert_allclose(warped.affine, nib.load(tmp_path / "fixed.nii.gz").affine)
    want = air_reg.warp(torch.from_numpy(moving)[None, None], flow)[0, 0].numpy()
    got = np.asarray(warped.dataobj)
    assert got.shape == SIZE
    np.testing.assert_allclose(got[2:-2, 2:-2], want[2:-2, 2:-2], atol=1e-5)
    out_labels = nib.load(out / "labels.nii.gz")
    assert out_labels.get_data_dtype() == np.int16
    np.testing.assert_allclose(out_labels.affine, affine)
    rows = rows_of(out / "points.csv")
    ij = np.array([[float(r["i"]), float(r["j"])] for r in rows])
    np.testing.assert_allclose(
        ij, [[3, 4], [10.5, 20]] + interp_at(flow, ij_in=[[3, 4], [10.5, 20]]), atol=1e-4
    )


def interp_at(flow: torch.Tensor, ij_in) -> np.ndarray:
    """The flow at (N, 2) points by grid_sample (an independent bilinear interpolation)."""
    p = torch.tensor(ij_in, dtype=torch.float32)
    h, w = flow.shape[-2:]
    grid = torch.stack([p[:, 1] / (w - 1) * 2 - 1, p[:, 0] / (h - 1) * 2 - 1], -1)[None, None]
    out = torch.nn.functional.grid_sample(flow, grid, align_corners=True)  # (1, 2, 1, N)
    return out[0, :, 0].T.numpy()


def test_png_field_from_write_itk_field_equals_air_reg_warp(tmp_path, pngs):
    pytest.importorskip("nibabel")
    write_itk_field(tmp_path / "field.nii.gz", pngs["flow"], Geometry.pixels(2))
    out = tmp_path / "out"
    run(
        tmp_path,
        f"field={tmp_path / 'field.nii.gz'}",
        f"fixed={pngs['fixed']}",
        f"image={pngs['moving']}",
        f"out_dir={out}",
    )
    moving = torch.from_numpy(pngs["grey"] / 255.0).float()[None, None]
    want = air_reg.warp(moving, pngs["flow"])[0, 0].numpy()
    got = np.asarray(Image.open(out / "warped.png")) / 255.0
    assert np.abs(got - want)[1:-1, 1:-1].max() <= TOL_8BIT


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("field", r"field .* is \(2, 10, 10\) but the fixed image needs \(2, 24, 30\)"),
        ("points", r"row 2 \(x=30\.6, y=1\) lies outside the fixed image \(24 x 30 pixels"),
        ("labels", r"holds non-integer values \(e\.g\. 0\.5\)"),
        ("inverse_points", "need columns"),
        ("image", r"image=.* is 3-D but the fixed image is 2-D"),
    ],
)
def test_a_bad_input_writes_nothing(tmp_path, pngs, bad, match):
    args = {"field": tmp_path / "flow.npy", "fixed": pngs["fixed"], "image": pngs["moving"]}
    if bad == "field":
        save_npy(tmp_path / "small.npy", np.zeros((2, 10, 10), np.float32))
        args["field"] = tmp_path / "small.npy"
    elif bad == "points":
        args["points"] = tmp_path / "p.csv"
        args["points"].write_text("x,y\n1,1\n30.6,1\n")
    elif bad == "labels":
        args["labels"] = tmp_path / "l.npy"
        np.save(args["labels"], np.full(SIZE, 0.5, np.float32))
    elif bad == "image":
        args["image"] = tmp_path / "volume.npy"
        np.save(args["image"], np.zeros((*SIZE, 4), np.float32))
    else:
        args["inverse_points"] = tmp_path / "p.csv"
        args["inverse_points"].write_text("u,v\n1,1\n")
    args["labels"] = args.get("labels", pngs["labels"])
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        run(tmp_path, *(f"{k}={v}" for k, v in args.items()), f"out_dir={out}")
    assert not out.exists()


def test_nothing_asked_names_the_options(tmp_path, pngs):
    with pytest.raises(ConfigError, match="image=.*labels=.*points=.*inverse_points="):
        run(tmp_path, f"field={tmp_path / 'flow.npy'}", f"fixed={pngs['fixed']}")


@pytest.mark.slow
def test_command_line_bad_input_is_one_line(tmp_path, pngs):
    args = [
        f"field={tmp_path / 'flow.npy'}",
        f"fixed={pngs['fixed']}",
        f"labels={tmp_path / 'fixed.png'}",
        f"out_dir={tmp_path / 'out'}",
    ]
    ok = subprocess.run(
        [sys.executable, "-m", "air_reg.apply", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote labels.png" in ok.stderr + ok.stdout
    args[2] = f"points={tmp_path / 'nope.csv'}"
    bad = subprocess.run(
        [sys.executable, "-m", "air_reg.apply", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    shown = bad.stdout + bad.stderr
    assert "Traceback" not in shown
    assert len([line for line in shown.splitlines() if "nope.csv does not exist" in line]) == 1
    assert not (tmp_path / "out" / "points.csv").exists()
