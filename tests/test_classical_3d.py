"""The classical peers on volumes: SimpleITK Demons and ANTs SyN return (B, 3, D, H, W) flows
in our convention (channel i along axis i, voxels), with anisotropic shifts that would show a
swapped axis."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from air_reg import classical, warp
from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import identity_grid

SIZE = (20, 24, 18)  # (D, H, W): all sides differ
SHIFT = (2.0, 0.0, -1.0)  # voxels along D, H, W
INNER = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))


def blobs(size=SIZE, seed: int = 0) -> torch.Tensor:
    """(1, 1, D, H, W) smooth random volume in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *(max(2, s // 4) for s in size), generator=g)
    x = F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)
    return (x - x.min()) / (x.max() - x.min())


def shifted_pair():
    """(fixed, moving, flow): fixed = moving warped by a constant anisotropic shift."""
    moving = blobs()
    flow = torch.tensor(SHIFT).view(1, 3, 1, 1, 1).expand(1, 3, *SIZE).clone()
    return warp(moving, flow), moving, flow


def mean_shift(flow: torch.Tensor) -> torch.Tensor:
    return flow[INNER].mean((0, 2, 3, 4))  # (3,)


def test_sitk_field_round_trip_and_resampling_match_our_warp():
    sitk = pytest.importorskip("SimpleITK")
    g = torch.Generator().manual_seed(1)
    flow = F.interpolate(torch.randn(1, 3, 3, 4, 3, generator=g), size=SIZE, mode="trilinear")
    flow[:, 0] += 1.5  # the three channels differ
    spacing = (2.0, 1.0, 1.5)
    field = classical.flow_to_field(flow[0], spacing)
    assert field.GetSpacing() == (1.5, 1.0, 2.0)  # ITK's (x, y, z): our axes reversed
    assert torch.allclose(classical.field_to_flow(field), flow[0], atol=1e-6)
    moving = blobs(seed=2)
    image = classical.to_sitk_image(moving[0, 0], spacing)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    out = sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ref = torch.from_numpy(sitk.GetArrayFromImage(out))
    ours = warp(moving, flow)[0, 0]
    target = flow[0] + identity_grid(SIZE)
    hi = torch.tensor(SIZE).view(3, 1, 1, 1) - 1
    inside = ((target >= 0) & (target <= hi)).all(0)  # no padding differences there
    assert inside.float().mean() > 0.5
    assert torch.allclose(ours[inside], ref[inside], atol=1e-4)
    swapped = warp(moving, flow.flip(1))[0, 0]
    assert not torch.allclose(swapped[inside], ref[inside], atol=1e-2)


def test_demons_3d_recovers_an_anisotropic_shift():
    pytest.importorskip("SimpleITK")
    fixed, moving, _ = shifted_pair()
    flow = classical.demons(fixed, moving, iterations=40, smoothing_sigma=1.5)
    assert flow.shape == (1, 3, *SIZE)
    assert torch.allclose(mean_shift(flow), torch.tensor(SHIFT), atol=0.15)
    # a pyramid, and physical spacing: the flow stays in voxels
    for kwargs in ({"levels": 2}, {"spacing": (2.0, 1.0, 1.5)}):
        flow = classical.demons(fixed, moving, iterations=30, smoothing_sigma=1.5, **kwargs)
        assert torch.allclose(mean_shift(flow), torch.tensor(SHIFT), atol=0.2), kwargs


def test_ants_affine_transform_converts_to_our_warp_in_3d(tmp_path):
    ants = pytest.importorskip("ants")
    matrix = np.array([[1.05, 0.1, 0.0], [-0.05, 0.95, 0.02], [0.0, 0.03, 1.0]])
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=matrix, translation=(1.5, -3.25, 0.5))  # fmt: skip
    path = str(tmp_path / "affine.mat")
    ants.write_transform(tx, path)
    moving = blobs(seed=3)
    fix_img = ants.from_numpy(np.zeros(SIZE, np.float32))
    flow = classical.transforms_to_flow(ants, fix_img, [path])[None]  # (1, 3, D, H, W)
    assert flow.shape == (1, 3, *SIZE)
    mov_img = ants.from_numpy(moving[0, 0].numpy())
    ref = ants.apply_transforms(fix_img, mov_img, [path], interpolator="linear").numpy()
    target = flow + identity_grid(SIZE)
    hi = torch.tensor(SIZE).view(1, 3, 1, 1, 1) - 1
    inside = ((target >= 0) & (target <= hi)).all(1)
    assert (~inside).any()
    assert inside.float().mean() > 0.5
    ours = warp(moving, flow, padding_mode="zeros")[:, 0]
    assert torch.allclose(ours[inside], torch.from_numpy(ref)[None][inside], atol=1e-4)
    for dim in (-1, -2, -3):  # affine outside the image too: no second differences
        assert target.diff(n=2, dim=dim).abs().max() < 1e-3


def test_ants_ramps_sampled_coarsely_stay_exact(tmp_path, monkeypatch):
    ants = pytest.importorskip("ants")
    tx = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=np.eye(3) * 1.02,
        translation=(0.7, -1.3, 2.1),
    )  # fmt: skip
    path = str(tmp_path / "affine.mat")
    ants.write_transform(tx, path)
    fix_img = ants.from_numpy(np.zeros(SIZE, np.float32), spacing=(2.0, 1.0, 1.5))
    fine = classical.transforms_to_flow(ants, fix_img, [path])
    monkeypatch.setattr(classical, "RAMP_VOXELS", 4000)  # forces a ramp step > 1
    coarse = classical.transforms_to_flow(ants, fix_img, [path])
    assert torch.allclose(fine, coarse, atol=1e-4)
    assert fine.abs().max() > 1


def test_ants_syn_3d_recovers_an_anisotropic_shift():
    pytest.importorskip("ants")
    fixed, moving, _ = shifted_pair()
    flow = classical.ants_syn(fixed, moving, reg_iterations=(30, 20, 10))
    assert flow.shape == (1, 3, *SIZE)
    assert flow.dtype == fixed.dtype
    assert torch.allclose(mean_shift(flow), torch.tensor(SHIFT), atol=0.25)


def test_3d_bad_spacing_and_shapes_are_refused():
    pytest.importorskip("SimpleITK")
    x = blobs()
    with pytest.raises(ConfigError, match="spacing needs 3 positive"):
        classical.demons(x, x, iterations=1, spacing=(1.0, 1.0))
    with pytest.raises(ConfigError, match=r"\(B, 1, D, H, W\)"):
        classical.demons(x, x[..., :-1], iterations=1)
    with pytest.raises(ConfigError, match="levels"):
        classical.demons(x, x, iterations=1, levels=0)
