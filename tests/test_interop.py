"""Results other tools read: image geometry, ITK displacement fields, colour, other sizes.

The clients are the real ones: SimpleITK's ``DisplacementFieldTransform`` and antspyx's
``apply_transforms`` apply air-reg's exported field; a field ANTs made is read back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from air_reg.data.synthetic import known_flows
from air_reg.fields import read_field, write_itk_field
from air_reg.geometry import Geometry, moving_index, warp_through
from air_reg.losses import Diffusion
from air_reg.metrics import epe
from air_reg.models.components.spatial_transformer import identity_grid, warp
from air_reg.refine.flows import control_grid
from air_reg.register import register
from tests.conftest import compose_config

nib = pytest.importorskip("nibabel")
TOL = 1e-3  # intensity, bilinear, where the sample point lies inside the moving image
ANISOTROPIC = Geometry.of([0.5, 2.0], [10.0, -3.0], [[0.0, 1.0], [1.0, 0.0]])
ROTATED = Geometry.of([0.7, 1.3], [1.0, 2.0], [[0.8, 0.6], [-0.6, 0.8]])


def smooth_image(size, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, size[0] // 4, size[1] // 4, generator=g)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True).clamp(0, 1)


def field(size, px=3.0, seed=0) -> torch.Tensor:
    return known_flows(1, size, torch.Generator().manual_seed(seed), max_px=px)


def save_nifti(path, array: np.ndarray, geometry: Geometry):
    image = nib.Nifti1Image(array.astype(np.float32), geometry.affine())
    image.set_qform(geometry.affine(), code=1)
    image.set_sform(geometry.affine(), code=1)
    nib.save(image, path)
    return path


def inside(flow: torch.Tensor, shape, fixed_g=None, moving_g=None) -> np.ndarray:
    """(H, W) mask of the fixed pixels whose sample point lies in the moving image."""
    q = identity_grid(flow.shape[2:], flow.device, flow.dtype)[None] + flow
    if fixed_g is not None:
        q = moving_index(fixed_g, moving_g, q)
    ok = torch.ones(flow.shape[2:], dtype=torch.bool)
    for i, n in enumerate(shape):
        ok &= (q[0, i] >= 0) & (q[0, i] <= n - 1)
    return ok.numpy()


@pytest.mark.parametrize("geometry", [Geometry.pixels(2), ANISOTROPIC, ROTATED],
                         ids=["pixels", "anisotropic", "rotated"])  # fmt: skip
def test_exported_field_round_trips_within_a_hundredth_of_a_pixel(tmp_path, geometry):
    flow = field((40, 56), 4.0)
    write_itk_field(tmp_path / "f.nii.gz", flow, geometry)
    back = read_field(tmp_path / "f.nii.gz", geometry, (40, 56))
    assert (back - flow).abs().max() < 0.01
    header = nib.load(tmp_path / "f.nii.gz").header
    assert int(header["intent_code"]) == 1007  # NIFTI_INTENT_VECTOR
    assert header.get_data_shape() == (40, 56, 1, 1, 2)


@pytest.mark.parametrize("geometry", [Geometry.pixels(2), ANISOTROPIC, ROTATED],
                         ids=["pixels", "anisotropic", "rotated"])  # fmt: skip
def test_simpleitk_and_antspyx_apply_our_field_as_we_do(tmp_path, geometry):
    sitk = pytest.importorskip("SimpleITK")
    ants = pytest.importorskip("ants")
    moving, flow = smooth_image((40, 56)), field((40, 56), 4.0)
    ours = warp(moving, flow)[0, 0].numpy()
    save_nifti(tmp_path / "m.nii.gz", moving[0, 0].numpy(), geometry)
    write_itk_field(tmp_path / "f.nii.gz", flow, geometry)
    mask = inside(flow, (40, 56))
    image = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(tmp_path / "f.nii.gz"), sitk.sitkVectorFloat64)
    )
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear)).T
    assert np.abs(by_sitk - ours)[mask].max() < TOL
    a = ants.image_read(str(tmp_path / "m.nii.gz"))
    by_ants = ants.apply_transforms(a, a, [str(tmp_path / "f.nii.gz")], "linear").numpy()
    assert np.abs(by_ants - ours)[mask].max() < TOL


def test_a_field_ants_made_applies_in_air_reg_as_in_ants(tmp_path):
    ants = pytest.importorskip("ants")
    fixed = smooth_image((48, 48), seed=1)
    moving = warp(fixed, field((48, 48), 3.0, seed=2))
    save_nifti(tmp_path / "f.nii.gz", fixed[0, 0].numpy(), ANISOTROPIC)
    save_nifti(tmp_path / "m.nii.gz", moving[0, 0].numpy(), ANISOTROPIC)
    f, m = ants.image_read(str(tmp_path / "f.nii.gz")), ants.image_read(str(tmp_path / "m.nii.gz"))
    result = ants.registration(f, m, type_of_transform="SyNOnly", random_seed=0,
                               reg_iterations=(20, 10, 0))  # fmt: skip
    warp_file = next(t for t in result["fwdtransforms"] if t.endswith("Warp.nii.gz"))
    by_ants = ants.apply_transforms(f, m, [warp_file], "linear").numpy()
    flow = read_field(warp_file, ANISOTROPIC, (48, 48))
    ours = warp(moving, flow)[0, 0].numpy()
    mask = inside(flow, (48, 48))
    assert flow.abs().max() > 0.5  # ANTs moved something
    assert np.abs(by_ants - ours)[mask].max() < TOL


def test_a_moving_image_on_another_grid_is_sampled_through_physical_space(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    fixed_g = Geometry.of([1.0, 1.0], [0.0, 0.0], np.eye(2)[::-1])
    moving_g = Geometry.of([1.5, 0.8], [3.0, -2.0], np.eye(2)[::-1])
    moving, flow = smooth_image((36, 52), seed=3), field((40, 44), 2.0)
    ours = warp_through(moving, flow, fixed_g, moving_g)[0, 0].numpy()  # (40, 44)
    save_nifti(tmp_path / "m.nii.gz", moving[0, 0].numpy(), moving_g)
    save_nifti(tmp_path / "f.nii.gz", np.zeros((40, 44)), fixed_g)
    write_itk_field(tmp_path / "w.nii.gz", flow, fixed_g)
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(tmp_path / "w.nii.gz"), sitk.sitkVectorFloat64)
    )
    reference = sitk.ReadImage(str(tmp_path / "f.nii.gz"))
    image = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(image, reference, transform)).T
    mask = inside(flow, (36, 52), fixed_g, moving_g)
    assert mask.mean() > 0.5
    assert np.abs(by_sitk - ours)[mask].max() < TOL


def run_register(tmp_path, fixed, moving, *extra):
    args = [f"fixed={fixed}", f"moving={moving}", f"out_dir={tmp_path / 'out'}", "weights=none",
            "refine_steps=10", "figures=false", *extra]  # fmt: skip
    return register(compose_config("register", args, tmp_path))


@pytest.mark.slow
def test_register_keeps_a_nifti_header_and_writes_a_field_simpleitk_applies(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    fixed = smooth_image((40, 48), seed=4)
    moving = warp(fixed, field((40, 48), 2.0, seed=5))
    save_nifti(tmp_path / "f.nii.gz", 300 * fixed[0, 0].numpy(), ANISOTROPIC)
    save_nifti(tmp_path / "m.nii.gz", 300 * moving[0, 0].numpy(), ANISOTROPIC)
    result = run_register(tmp_path, tmp_path / "f.nii.gz", tmp_path / "m.nii.gz",
                          "normalize=minmax")  # fmt: skip
    out = tmp_path / "out"
    assert result["pairs"][0]["spacing"] == "0.5x2"
    written, given = nib.load(out / "warped.nii.gz"), nib.load(tmp_path / "f.nii.gz")
    for key in (
        "dim",
        "pixdim",
        "qform_code",
        "sform_code",
        "srow_x",
        "srow_y",
        "srow_z",
        "quatern_b",
        "quatern_c",
        "quatern_d",
        "qoffset_x",
        "qoffset_y",
        "xyzt_units",
    ):
        assert np.array_equal(written.header[key], given.header[key]), key  # fmt: skip
    np.testing.assert_array_equal(written.affine, given.affine)
    ours = np.asarray(written.dataobj)  # the moving values in their own units, warped
    image = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "field.nii.gz"), sitk.sitkVectorFloat64)
    )
    by_sitk = sitk.GetArrayFromImage(sitk.Resample(image, image, transform)).T
    flow = torch.from_numpy(np.load(out / "flow.npy"))[None]
    mask = inside(flow, (40, 48))
    assert np.abs(by_sitk - ours)[mask].max() < 300 * TOL
    assert result["mse_after"] < result["mse_before"]


@pytest.mark.slow
def test_register_starts_from_an_ants_field(tmp_path):
    moving = smooth_image((40, 40), seed=6)
    fixed = warp(moving, field((40, 40), 3.0, seed=7))
    save_nifti(tmp_path / "f.nii.gz", fixed[0, 0].numpy(), Geometry.pixels(2))
    save_nifti(tmp_path / "m.nii.gz", moving[0, 0].numpy(), Geometry.pixels(2))
    start = field((40, 40), 3.0, seed=7)  # the truth, as another tool's result
    write_itk_field(tmp_path / "start.nii.gz", start, Geometry.pixels(2))
    cold = run_register(tmp_path / "cold", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz")
    warm = run_register(tmp_path / "warm", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz",
                        f"init_flow={tmp_path / 'start.nii.gz'}")  # fmt: skip
    assert warm["mse_after"] < cold["mse_after"]


def test_a_colour_pair_is_registered_on_luminance_and_warped_in_colour(tmp_path):
    rgb = (np.stack([smooth_image((32, 32), seed=s)[0, 0].numpy() for s in (8, 9, 10)], -1)
           * 255).astype(np.uint8)  # fmt: skip
    shifted = np.roll(rgb, 2, axis=1)
    Image.fromarray(rgb).save(tmp_path / "f.png")
    Image.fromarray(shifted).save(tmp_path / "m.png")
    result = run_register(tmp_path, tmp_path / "f.png", tmp_path / "m.png")
    warped = np.asarray(Image.open(tmp_path / "out" / "warped.png"))
    assert warped.shape == (32, 32, 3)
    before = np.abs(shifted.astype(float) - rgb)[:, 4:-4].mean()
    after = np.abs(warped.astype(float) - rgb)[:, 4:-4].mean()
    assert after < 0.5 * before
    assert result["mse_after"] < result["mse_before"]


def test_regularisation_and_control_points_are_physical_on_anisotropic_pixels():
    flow = field((32, 32), 3.0)
    assert torch.equal(Diffusion((2.0, 2.0))(flow), Diffusion()(flow))  # isotropic: pixels
    assert not torch.allclose(Diffusion((0.5, 2.0))(flow), Diffusion()(flow))
    assert control_grid((64, 64), None, 4.0) == (16, 16)
    assert control_grid((64, 64), None, 4.0, (0.5, 2.0)) == (16, 64)  # as far apart in mm
    truth = torch.zeros_like(flow)
    mm = epe(flow, truth, spacing=(0.5, 2.0))
    want = (flow * torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)).norm(dim=1).mean()
    assert torch.allclose(mm, want[None])


@pytest.mark.slow
def test_register_reports_label_dice_and_tre_and_writes_labels_and_points(tmp_path):
    moving = smooth_image((48, 48), seed=11)
    truth = field((48, 48), 3.0, seed=12)
    fixed = warp(moving, truth)
    labels = (moving > moving.median()).float() + (moving > 0.8).float()  # 0, 1, 2
    fixed_labels = warp(labels, truth, mode="nearest")
    for name, image in (("f", fixed), ("m", moving)):
        save_nifti(tmp_path / f"{name}.nii.gz", image[0, 0].numpy(), Geometry.pixels(2))
    for name, image in (("fl", fixed_labels), ("ml", labels)):
        np.save(tmp_path / f"{name}.npy", image[0, 0].numpy().astype(np.uint8))
    p = np.array([[10.0, 12.0], [24.0, 30.0], [35.0, 8.0], [20.0, 20.0]])  # i, j
    q = p + truth[0, :, p[:, 0].astype(int), p[:, 1].astype(int)].T.numpy()
    for name, pts in (("fp", p), ("mp", q)):
        rows = "\n".join(f"P{k},{a},{b}" for k, (a, b) in enumerate(pts))
        (tmp_path / f"{name}.csv").write_text(f"name,i,j\n{rows}\n")
    result = run_register(
        tmp_path, tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", "refine_steps=40",
        f"fixed_labels={tmp_path / 'fl.npy'}", f"moving_labels={tmp_path / 'ml.npy'}",
        f"fixed_points={tmp_path / 'fp.csv'}", f"moving_points={tmp_path / 'mp.csv'}",
    )  # fmt: skip
    row = result["pairs"][0]
    assert float(row["tre_after_px"]) < 0.5 * float(row["tre_before_px"])
    assert float(row["tre_before_px"]) == pytest.approx(np.linalg.norm(q - p, axis=1).mean())
    assert float(row["tre_after_mm"]) == pytest.approx(float(row["tre_after_px"]))  # 1 mm px
    assert float(row["dice_after"]) > float(row["dice_before"])
    warped_labels = np.load(tmp_path / "out" / "labels.npy")
    assert warped_labels.dtype == np.uint8
    assert set(np.unique(warped_labels)) <= {0, 1, 2}
    mapped = np.loadtxt(tmp_path / "out" / "points.csv", delimiter=",", skiprows=1,
                        usecols=(1, 2))  # fmt: skip
    flow = np.load(tmp_path / "out" / "flow.npy")
    np.testing.assert_allclose(mapped, p + flow[:, p[:, 0].astype(int), p[:, 1].astype(int)].T,
                               atol=1e-5)  # fmt: skip
