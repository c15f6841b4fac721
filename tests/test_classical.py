"""SimpleITK diffeomorphic Demons: field conventions and that it registers."""

import sys

import pytest
import torch

from air_reg import warp
from air_reg.data.synthetic import make_pairs
from air_reg.metrics import folding, mse

sitk = pytest.importorskip("SimpleITK")

from air_reg import classical  # noqa: E402

SIZE = 28


def synthetic_pairs(n: int, magnitude: float = 1.5, seed: int = 0):
    """(fixed, moving, flow) with fixed = moving warped by a smooth random flow."""
    return make_pairs(n, SIZE, magnitude, torch.Generator().manual_seed(seed))[:3]


def sitk_resample(moving: torch.Tensor, field) -> torch.Tensor:
    """SimpleITK's own linear resampling of a (H, W) image through a displacement field."""
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))  # the transform takes a copy
    image = classical.to_sitk_image(moving)
    out = sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return torch.from_numpy(sitk.GetArrayFromImage(out))


def test_demons_field_converts_to_our_warp_convention():
    fixed, moving, _ = synthetic_pairs(1, magnitude=2.0)
    f = classical.demons_filter(iterations=30)
    field = f.Execute(classical.to_sitk_image(fixed[0, 0]), classical.to_sitk_image(moving[0, 0]))
    flow = classical.field_to_flow(field)[None]  # (1, 2, H, W)
    reference = sitk_resample(moving[0, 0], field)
    assert flow.abs().max() > 0.5  # a real deformation, so a wrong convention would show
    assert torch.allclose(warp(moving, flow)[0, 0], reference, atol=1e-4)
    # swapping (x, y) for (rows, cols) would not match
    assert not torch.allclose(warp(moving, flow.flip(1))[0, 0], reference, atol=1e-2)


def test_hand_built_field_rows_and_columns():
    # 1.5 px down the rows, -2.25 px along the columns, and a shear: components differ
    moving = torch.rand(1, 1, SIZE, SIZE)
    flow = torch.zeros(1, 2, SIZE, SIZE)
    flow[:, 0] = 1.5
    flow[:, 1] = -2.25 + 0.05 * torch.arange(SIZE, dtype=torch.float32)[:, None]
    field = classical.flow_to_field(flow[0])
    assert torch.equal(classical.field_to_flow(field), flow[0])
    reference = sitk_resample(moving[0, 0], field)
    inside = (slice(0, SIZE - 2), slice(3, SIZE - 1))  # p + flow(p) inside: no padding differences
    assert torch.allclose(warp(moving, flow)[0, 0][inside], reference[inside], atol=1e-4)


def test_demons_improves_mse_without_folding():
    fixed, moving, _ = synthetic_pairs(2)
    flow = classical.demons(fixed, moving, iterations=50)
    assert flow.shape == (2, 2, SIZE, SIZE)
    assert (mse(warp(moving, flow), fixed) < 0.2 * mse(moving, fixed)).all()
    assert folding(flow).max() == 0


def test_missing_simpleitk_gives_an_install_hint(monkeypatch):
    assert classical.has_simpleitk()
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # makes `import SimpleITK` fail
    assert not classical.has_simpleitk()
    with pytest.raises(ImportError, match=r"pip install air-reg\[classical\]"):
        classical.demons(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
