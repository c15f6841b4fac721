"""Round trips with the real clients (SimpleITK, antspyx): how closely they apply air-reg's
exported field, how closely air-reg applies ANTs' field, and the field's own round trip.
``experiments/interop_roundtrip.py`` prints the table; ``tests/test_interop.py`` holds the
same comparisons to their tolerances."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from air_reg.data.synthetic import known_flows
from air_reg.fields import nifti_image, read_field, write_itk_field
from air_reg.geometry import Geometry
from air_reg.models.components.spatial_transformer import identity_grid, warp

GEOMETRIES = {
    "pixels (PNG-like)": Geometry.pixels(2),
    "0.5 x 2 mm, axes swapped": Geometry.of([0.5, 2.0], [10.0, -3.0], [[0.0, 1.0], [1.0, 0.0]]),
    "0.7 x 1.3 mm, rotated": Geometry.of([0.7, 1.3], [1.0, 2.0], [[0.8, 0.6], [-0.6, 0.8]]),
}


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, size[0] // 4, size[1] // 4, generator=g)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True).clamp(0, 1)


def _save(nib, path, array, geometry):
    nib.save(nifti_image(array.astype(np.float32), geometry), path)


def _inside(flow, shape):
    q = identity_grid(flow.shape[2:], flow.device, flow.dtype)[None] + flow
    ok = torch.ones(flow.shape[2:], dtype=torch.bool)
    for i, n in enumerate(shape):
        ok &= (q[0, i] >= 0) & (q[0, i] <= n - 1)
    return ok.numpy()


def roundtrip(size=(64, 80), max_px=5.0, seed=0) -> list[dict]:
    """One row per geometry: the field's own round trip (px) and the largest intensity gap
    (images in [0, 1], bilinear, where the sample point is inside the moving image) between
    air-reg's warp and SimpleITK's / antspyx's application of the exported field, and between
    ANTs' application of its own SyN field and air-reg's application of that field."""
    import ants
    import nibabel as nib
    import SimpleITK as sitk

    rows = []
    moving = _image(size, seed)
    flow = known_flows(1, size, torch.Generator().manual_seed(seed), max_px=max_px)
    ours = warp(moving, flow)[0, 0].numpy()
    mask = _inside(flow, size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, geometry in GEOMETRIES.items():
            _save(nib, tmp / "m.nii.gz", moving[0, 0].numpy(), geometry)
            write_itk_field(tmp / "f.nii.gz", flow, geometry)
            back = read_field(tmp / "f.nii.gz", geometry, size)
            image = sitk.ReadImage(str(tmp / "m.nii.gz"))
            field = sitk.ReadImage(str(tmp / "f.nii.gz"), sitk.sitkVectorFloat64)
            by_sitk = sitk.Resample(image, image, sitk.DisplacementFieldTransform(field))
            a = ants.image_read(str(tmp / "m.nii.gz"))
            by_ants = ants.apply_transforms(a, a, [str(tmp / "f.nii.gz")], "linear").numpy()
            fixed = warp(moving, flow)  # a pair for ANTs' own field
            _save(nib, tmp / "fx.nii.gz", fixed[0, 0].numpy(), geometry)
            fa = ants.image_read(str(tmp / "fx.nii.gz"))
            syn = ants.registration(fa, a, type_of_transform="SyNOnly", random_seed=0)
            warp_file = next(t for t in syn["fwdtransforms"] if t.endswith("Warp.nii.gz"))
            ants_flow = read_field(warp_file, geometry, size)
            by_ants_own = ants.apply_transforms(fa, a, [warp_file], "linear").numpy()
            ours_of_ants = warp(moving, ants_flow)[0, 0].numpy()
            ants_mask = _inside(ants_flow, size)
            gap = lambda a, b, m: float(np.abs(a - b)[m].max())  # noqa: E731
            rows.append({
                "geometry": name,
                "field round trip, px": float((back - flow).abs().max()),
                "SimpleITK vs air-reg": gap(sitk.GetArrayFromImage(by_sitk).T, ours, mask),
                "antspyx vs air-reg": gap(by_ants, ours, mask),
                "ANTs' field: air-reg vs ANTs": gap(ours_of_ants, by_ants_own, ants_mask),
                "ANTs' field, largest px": float(ants_flow.norm(dim=1).max()),
            })  # fmt: skip
    return rows
