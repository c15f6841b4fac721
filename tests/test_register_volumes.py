"""register on two NIfTI volumes (issue #34): the outputs of the interoperability issue in 3-D,
checked by SimpleITK, and clear errors for a 2-D model or a volume against an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config

from air_reg import metrics
from air_reg.errors import ConfigError
from air_reg.images import ImageError
from air_reg.models.components.spatial_transformer import integrate_velocity, warp
from air_reg.register import register

nib = pytest.importorskip("nibabel")
SIZE = (24, 28, 20)  # (X, Y, Z) voxels, stored as the array's axes
AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.5, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


def _volumes(tmp_path, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.nn.functional.avg_pool3d
    x = pool(torch.rand(1, 1, *SIZE, generator=g), 5, 1, 2)
    x = (x - x.min()) / (x.max() - x.min())
    flow = integrate_velocity(pool(torch.randn(1, 3, *SIZE, generator=g) * 25, 9, 1, 4), 5)
    for name, v in (("f", warp(x, flow)), ("m", x)):
        nib.save(nib.Nifti1Image(v[0, 0].numpy() * 800.0, AFFINE), tmp_path / f"{name}.nii.gz")
    return flow


def test_register_two_volumes_writes_what_other_tools_read(tmp_path):
    truth = _volumes(tmp_path)
    out = tmp_path / "out"
    register(compose_config("register", [
        f"fixed={tmp_path / 'f.nii.gz'}", f"moving={tmp_path / 'm.nii.gz'}", "weights=none",
        "refine_steps=40", "normalize=minmax", f"out_dir={out}"], tmp_path))  # fmt: skip
    flow = torch.from_numpy(np.load(out / "flow.npy"))[None]
    assert flow.shape == (1, 3, *SIZE)
    before = metrics.epe(torch.zeros_like(truth), truth).mean()
    assert metrics.epe(flow, truth).mean() < 0.6 * before
    warped = nib.load(out / "warped.nii.gz")
    np.testing.assert_allclose(warped.affine, AFFINE)  # the fixed header
    field = nib.load(out / "field.nii.gz")
    assert field.shape == (*SIZE, 1, 3)  # ITK's vector image: (X, Y, Z, t, 3)
    assert (out / "figure.png").is_file()
    sitk = pytest.importorskip("SimpleITK")
    moving = sitk.ReadImage(str(tmp_path / "m.nii.gz"), sitk.sitkFloat64)
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "field.nii.gz"), sitk.sitkVectorFloat64)
    )
    by_itk = sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform)).T  # (X, Y, Z)
    ours = np.asarray(warped.dataobj)
    inner = (slice(3, -3),) * 3  # ITK fills 0 outside, air-reg repeats the border
    np.testing.assert_allclose(by_itk[inner], ours[inner], atol=1e-2 * 800)


def test_a_2d_model_refuses_volumes_and_a_volume_refuses_an_image(tmp_path):
    _volumes(tmp_path)
    args = [f"fixed={tmp_path / 'f.nii.gz'}", f"moving={tmp_path / 'm.nii.gz'}"]
    with pytest.raises(ConfigError, match="2-D images and these are 3-D volumes.*weights=none"):
        register(compose_config("register", [*args, "normalize=minmax"], tmp_path))
    nib.save(nib.Nifti1Image(np.zeros((24, 28), np.float32), AFFINE), tmp_path / "s.nii.gz")
    moving = f"moving={tmp_path / 's.nii.gz'}"
    cfg = compose_config("register", [args[0], moving, "weights=none", "refine_steps=5"], tmp_path)
    with pytest.raises(ImageError, match="f.nii.gz is a 3-D volume .*s.nii.gz a 2-D image"):
        register(cfg)
    assert not (tmp_path / "warped.nii.gz").exists()
