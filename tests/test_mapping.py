"""``air_reg.mapping``: a field applied to images, label maps and points; TRE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import air_reg
from air_reg.data.synthetic import known_flows
from air_reg.errors import DataError, UserError
from air_reg.geometry import Geometry
from air_reg.mapping import read_labels, warp_image, warp_labels, write_labels
from air_reg.metrics import epe
from air_reg.models.components.spatial_transformer import identity_grid
from air_reg.points import (
    interpolate,
    invert_points,
    map_points,
    points_csv,
    read_points,
    to_physical,
    tre,
)

PX = Geometry.pixels(2)
# anisotropic, rotated, shifted grids (fixed and moving differ)
FIXED = Geometry.of([0.5, 2.0], [10.0, -5.0], [[0.0, 1.0], [1.0, 0.0]])
MOVING = Geometry.of([0.7, 1.5], [9.0, -3.0], [[0.1, 0.995], [0.995, -0.1]])


def field(size=(32, 40), magnitude=2.0, seed=0) -> torch.Tensor:
    """A smooth diffeomorphism (1, 2, *size) in pixels."""
    return known_flows(1, size, torch.Generator().manual_seed(seed), magnitude=magnitude)


def points(n=60, size=(32, 40), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 2)) * (np.array(size) - 1)


def test_warp_image_is_air_reg_warp_on_one_grid():
    flow = field()
    img = np.random.default_rng(1).random((32, 40)).astype(np.float32)
    ref = air_reg.warp(torch.from_numpy(img)[None, None], flow)[0, 0].numpy()
    assert np.array_equal(warp_image(img, flow, PX, PX), ref)  # bit-identical
    colour = np.stack([img, 1 - img, img**2], -1)  # (H, W, 3): every channel
    out = warp_image(colour, flow, PX, PX)
    assert out.shape == (32, 40, 3)
    assert np.array_equal(out[..., 1], warp_image(colour[..., 1].copy(), flow, PX, PX))


def test_warp_image_through_another_grid_matches_the_physical_points():
    """A moving image that is a linear function of physical position warps to that function
    at the fixed pixels' mapped physical points."""
    flow = field()
    size = (60, 50)
    mi = identity_grid(size).double().reshape(2, -1).T.numpy()
    xyz = to_physical(mi, MOVING)
    ramp = (xyz @ [0.3, -0.2] + 1.0).reshape(size)  # linear in mm: bilinear is exact
    out = warp_image(ramp, flow, FIXED, MOVING)
    p = identity_grid((32, 40)).double().reshape(2, -1).T.numpy()
    q = map_points(p, flow, FIXED, MOVING)
    inside = ((q > 0) & (q < np.array(size) - 1)).all(1)
    want = to_physical(q, MOVING) @ [0.3, -0.2] + 1.0
    assert inside.mean() > 0.3
    np.testing.assert_allclose(out.reshape(-1)[inside], want[inside], atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
def test_warp_labels_gives_integers_and_equals_nearest_warp(dtype):
    flow = field(magnitude=3.0)
    labels = np.random.default_rng(2).integers(0, 7, (32, 40)).astype(dtype)
    out = warp_labels(labels, flow, PX, PX)
    ref = air_reg.warp(torch.from_numpy(labels.astype(np.float32))[None, None], flow, "nearest")
    assert out.dtype == dtype
    assert np.array_equal(out, ref[0, 0].numpy().astype(dtype))
    assert not np.array_equal(out, labels)  # the field did move them


def test_warp_labels_refuses_non_integer_values():
    labels = np.zeros((8, 8), np.float32)
    labels[2, 3] = 0.5
    with pytest.raises(UserError, match=r"lab\.nii\.gz holds non-integer values \(e\.g\. 0\.5\)"):
        warp_labels(labels, torch.zeros(1, 2, 8, 8), PX, PX, name="lab.nii.gz")


def test_warp_labels_refuses_channels_and_non_numbers():
    flow = torch.zeros(1, 2, 8, 8)
    with pytest.raises(UserError, match=r"2-D images, got an array of shape \(8, 8, 3\)"):
        warp_labels(np.zeros((8, 8, 3), np.uint8), flow, PX, PX)
    with pytest.raises(UserError, match="holds <U1 values"):
        warp_labels(np.full((8, 8), "a"), flow, PX, PX)


def test_label_png_round_trip_keeps_dtype_and_palette(tmp_path):
    values = np.random.default_rng(3).integers(0, 4, (16, 20)).astype(np.uint8)
    image = Image.fromarray(values)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    image.save(tmp_path / "lab.png")
    labels = read_labels(tmp_path / "lab.png")
    assert labels.values.dtype == np.uint8
    assert np.array_equal(labels.values, values)  # the indices, not the luminance
    write_labels(tmp_path / "out.png", labels.values, labels, labels.file)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "P"
        assert np.array_equal(np.asarray(out), values)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match="colour image"):
        read_labels(tmp_path / "rgb.png")


def test_map_points_is_p_plus_flow_at_pixel_centres_exactly():
    flow = field()  # float32, as register writes it
    ij = np.array([[0, 0], [3, 4], [10, 20], [31, 39], [31, 0]], dtype=np.float64)
    want = ij + flow[0][:, ij[:, 0].astype(int), ij[:, 1].astype(int)].T.double().numpy()
    assert np.array_equal(map_points(ij, flow, PX, PX), want)


def test_interpolate_is_bilinear_between_pixels():
    f = torch.arange(12.0).reshape(1, 1, 3, 4)  # f(i, j) = 4 i + j: linear
    p = np.array([[0.5, 0.25], [1.75, 2.5], [-0.4, 3.3]])
    want = 4 * np.clip(p[:, 0], 0, 2) + np.clip(p[:, 1], 0, 3)
    np.testing.assert_allclose(interpolate(f[0], p)[:, 0], want, atol=1e-12)


@pytest.mark.parametrize(("fixed", "moving"), [(PX, PX), (FIXED, MOVING)])
def test_forward_then_inverse_points_return_to_themselves(fixed, moving):
    flow = field(magnitude=4.0)
    p = points(200)
    back = invert_points(map_points(p, flow, fixed, moving), flow, fixed, moving)
    assert np.abs(back - p).max() < 1e-3


def test_three_d_points_and_labels():
    size = (10, 12, 8)
    gen = torch.Generator().manual_seed(0)
    flow = torch.nn.functional.avg_pool3d(torch.randn(1, 3, *size, generator=gen), 3, 1, 1)
    geom = Geometry.of([1.5, 1.0, 2.0], [5.0, -3.0, 2.0], np.eye(3))
    p = np.random.default_rng(0).random((20, 3)) * (np.array(size) - 1)
    q = map_points(p, flow, geom, geom)
    assert np.abs(invert_points(q, flow, geom, geom) - p).max() < 1e-3
    labels = np.random.default_rng(1).integers(0, 4, size).astype(np.uint8)
    out = warp_labels(labels, flow, geom, geom)
    ijk = np.rint(identity_grid(size).numpy() + flow[0].numpy()).astype(int)  # nearest
    ijk = [np.clip(ijk[a], 0, size[a] - 1) for a in range(3)]
    assert out.dtype == np.uint8
    assert (out == labels[tuple(ijk)]).mean() > 0.99  # ties at .5 may round either way


def test_inverse_points_name_the_rows_that_do_not_converge():
    yx = identity_grid((32, 32)).double() - 15.5
    theta = 8.0 * torch.exp(-((yx.norm(dim=0) / 6) ** 2))  # a tight swirl: folds when sampled
    c, s = theta.cos(), theta.sin()
    flow = torch.stack([c * yx[0] - s * yx[1], s * yx[0] + c * yx[1]])[None] - yx
    q = np.array([[2.0, 2.0], *(np.random.default_rng(0).random((40, 2)) * 10 + 11)])
    with pytest.raises(DataError, match=r"point\(s\) \(rows \d") as err:
        invert_points(q, flow, PX, PX)
    assert "rows 1," not in str(err.value)  # the point far from the swirl converged


def test_tre_equals_the_end_point_error_at_the_landmarks():
    """Landmarks moved by a known field, mapped by an estimate of it: the TRE at each is the
    estimate's end-point error there."""
    true, est = field(seed=0), field(seed=0) + 0.4 * field(seed=1)
    ij = np.random.default_rng(4).integers(0, [32, 40], (30, 2))
    ij = np.unique(ij, axis=0).astype(np.float64)
    target = map_points(ij, true, PX, PX)
    px, mm = tre(map_points(ij, est, PX, PX), target, PX)
    mask = torch.zeros(1, 1, 32, 40, dtype=torch.bool)
    mask[0, 0, ij[:, 0].astype(int), ij[:, 1].astype(int)] = True
    assert abs(px.mean() - epe(est, true, mask).item()) < 0.01
    np.testing.assert_allclose(px, mm)  # unit spacing
    _, mm = tre(np.array([[1.0, 1.0]]), np.array([[0.0, 0.0]]), FIXED)
    np.testing.assert_allclose(mm, [np.hypot(0.5, 2.0)])


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def test_png_points_x_is_the_column_and_y_the_row(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["name", "x", "y"], [["a", 7, 3]])
    _, index = read_points(path, PX, (32, 40))
    assert index.tolist() == [[3.0, 7.0]]


def test_physical_and_index_columns_agree(tmp_path):
    flow = field()
    p = points(10)
    xy = to_physical(p, FIXED)
    names = [f"lm{k}" for k in range(10)]
    by_index = write_csv(tmp_path / "ij.csv", ["name", "i", "j"], zip(names, *p.T, strict=True))
    by_mm = write_csv(tmp_path / "xy.csv", ["id", "x", "y", "name"],
                      zip(range(10), *xy.T, names, strict=True))  # fmt: skip
    (a, ia), (b, ib) = (read_points(f, FIXED, (32, 40)) for f in (by_index, by_mm))
    np.testing.assert_allclose(ia, p, atol=1e-9)
    np.testing.assert_allclose(ib, p, atol=1e-9)
    q = map_points(ia, flow, FIXED, MOVING)
    out_i, out_x = (tmp_path / "oi.csv", tmp_path / "ox.csv")
    out_i.write_text(points_csv(a, q, MOVING))
    out_x.write_text(points_csv(b, q, MOVING))
    assert out_x.read_text().splitlines()[0] == "id,x,y,name"  # the input's columns, in order
    assert out_x.read_text().splitlines()[1].endswith(",lm0")  # other columns unchanged
    qi = np.loadtxt(out_i, delimiter=",", skiprows=1, usecols=(1, 2))
    qx = np.loadtxt(out_x, delimiter=",", skiprows=1, usecols=(1, 2))
    np.testing.assert_allclose(qi, q, atol=1e-5)
    np.testing.assert_allclose(qx, to_physical(q, MOVING), atol=1e-5)


@pytest.mark.parametrize(
    ("header", "rows", "match"),
    [
        (["i", "j"], [[1, 1], [40.6, 2]], r"row 2 \(i=40\.6, j=2\) lies outside .*32 x 40 pixels"),
        (["x", "y"], [[-0.6, 0]], r"row 1 \(x=-0\.6, y=0\) lies outside"),
        (["i", "j", "x", "y"], [[1, 1, 1, 1]], "both x,y and i,j"),
        (["a", "b"], [[1, 1]], "need columns x,y .* or i,j"),
        (["x", "y", "z"], [[1, 1, 0]], "a z column"),
        (["i", "j"], [[1, "abc"]], "row 1: .* not numbers"),
    ],
)
def test_bad_points_are_one_line_errors(tmp_path, header, rows, match):
    path = write_csv(tmp_path / "p.csv", header, rows)
    with pytest.raises(UserError, match=match):
        read_points(path, PX, (32, 40))


def test_points_half_a_pixel_beyond_the_grid_are_accepted(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["i", "j"], [[-0.5, 39.5], [31.5, 0]])
    assert read_points(path, PX, (32, 40))[1].shape == (2, 2)
