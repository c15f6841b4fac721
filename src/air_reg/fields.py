"""Displacement fields in the field's formats: air-reg's ``.npy`` and ITK's NIfTI.

ITK (SimpleITK's ``DisplacementFieldTransform``, ANTs' ``antsApplyTransforms`` and antspyx's
``apply_transforms``, 3D Slicer) reads a displacement field as a NIfTI image on the fixed
image's grid whose voxels hold vectors (``intent_code`` 1007, NIFTI_INTENT_VECTOR; the
components along a fifth axis) in physical LPS millimetres: the point ``x`` of the fixed image
maps to ``x + d(x)`` in the moving image's space. ``write_itk_field`` writes air-reg's flow so
(``Geometry.to_physical``), ``read_field`` reads it back, or an ANTs field, as a flow in fixed
pixels (``init_flow=``, ``apply``). The header holds the fixed image's geometry as NIfTI's
RAS affine (both qform and sform, code 1: scanner); the vectors stay LPS, as ITK writes them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from air_reg.data.readers import NIFTI_SUFFIXES, suffix_of
from air_reg.errors import DataError
from air_reg.geometry import Geometry
from air_reg.images import ImageError, save_npy
from air_reg.utils import write_with

VECTOR_INTENT = 1007  # NIFTI_INTENT_VECTOR
FIELD_SUFFIXES = (".npy", *NIFTI_SUFFIXES)


def _nibabel(path: Path):
    try:
        import nibabel
    except ImportError as err:
        raise ImageError(
            f"{path}: ITK displacement fields (NIfTI) need nibabel: pip install 'air-reg[nifti]'"
        ) from err
    return nibabel


def write_itk_field(path: str | Path, flow: torch.Tensor, geometry: Geometry) -> Path:
    """Write ``flow`` (1, D, *spatial) or (D, *spatial), fixed pixels, as an ITK displacement
    field NIfTI on the fixed ``geometry`` (float64 LPS mm vectors, vector intent)."""
    path = Path(path)
    _nibabel(path)  # the install hint when it is missing
    flow = flow if flow.ndim == geometry.ndim + 2 else flow[None]
    d = geometry.ndim
    if flow.shape[1] != d:
        raise DataError(
            f"a {d}-D geometry needs a flow with {d} channels, got {tuple(flow.shape)}"
        )
    vectors = geometry.to_physical(flow.double())[0].numpy()  # (D, *spatial), LPS mm
    data = np.moveaxis(vectors, 0, -1)  # (*spatial, D)
    data = data.reshape(*data.shape[:d], *(1,) * (3 - d), 1, d)  # (X, Y, Z, T=1, D)
    image = nifti_image(data, geometry)
    image.header.set_intent(VECTOR_INTENT, (), name="air-reg displacement")
    write_nifti(path, image)
    return path


def nifti_image(data: np.ndarray, geometry: Geometry):
    """A nibabel image of ``data`` on ``geometry``: its affine as qform and sform (code 1,
    scanner), millimetres."""
    import nibabel

    image = nibabel.Nifti1Image(data, geometry.affine())
    image.set_qform(geometry.affine(), code=1)
    image.set_sform(geometry.affine(), code=1)
    image.header.set_xyzt_units("mm")
    return image


def write_nifti(path: Path, image) -> None:
    """A nibabel image to ``path`` (``.nii`` or ``.nii.gz``), atomically."""
    data = image.to_bytes()  # one .nii file's bytes
    if suffix_of(path) == ".nii.gz":
        data = gzip.compress(data, compresslevel=6)
    write_with(path, lambda tmp: tmp.write_bytes(data))


def read_field(path: str | Path, geometry: Geometry, size: tuple[int, ...]) -> torch.Tensor:
    """A saved field as a flow (1, D, *size) in pixels of the fixed grid (``geometry``,
    ``size``): air-reg's ``.npy`` ((D, *size) pixels) or an ITK displacement-field NIfTI
    (ours or ANTs'), whose grid must be the fixed image's (one-line error otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"field {path} does not exist; pass the flow.npy or field.nii.gz that "
                        f"register wrote")  # fmt: skip
    suffix = suffix_of(path)
    if suffix == ".npy":
        flow = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        want = (len(size), *size)
        if tuple(flow.shape) != want:
            raise DataError(f"field {path} is {tuple(flow.shape)} but the fixed image needs "
                            f"{want} (D, *size) in pixels; use the field written for this "
                            f"fixed image")  # fmt: skip
        return flow[None]
    if suffix not in NIFTI_SUFFIXES:
        raise DataError(f"field {path}: unsupported type; use one of {FIELD_SUFFIXES}")
    nib = _nibabel(path)
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float64)
    d = len(size)
    if data.ndim != 5 or data.shape[-1] != d or data.shape[3] != 1:
        raise DataError(f"field {path} has shape {data.shape}, not an ITK displacement field "
                        f"(X, Y, Z, 1, {d}); export it as a vector NIfTI (ANTs' *Warp.nii.gz "
                        f"are)")  # fmt: skip
    data = data[..., 0, :]  # (X, Y, Z, D): the time axis dropped
    if d == 2:
        data = data[:, :, 0]  # (X, Y, 2)
    if tuple(data.shape[:d]) != tuple(size):
        raise DataError(f"field {path} covers {data.shape[:d]} voxels but the fixed image is "
                        f"{tuple(size)}; the field must be on the fixed image's grid")  # fmt: skip
    field_geometry = Geometry.from_affine(image.affine, d)
    if not field_geometry.same_grid(geometry, tol=1e-3):
        raise DataError(f"field {path} lies on another grid than the fixed image (its spacing "
                        f"{field_geometry.spacing}, origin {field_geometry.origin}; the image's "
                        f"{geometry.spacing}, {geometry.origin}); use the field made for this "
                        f"fixed image")  # fmt: skip
    vectors = torch.from_numpy(np.moveaxis(data, -1, 0).copy())[None]  # (1, D, *size) LPS mm
    return geometry.from_physical(vectors).float()


def write_flow(path: str | Path, flow: torch.Tensor) -> Path:
    """air-reg's own format: (D, *spatial) float32 pixels, channel i along axis i."""
    return save_npy(path, flow[0] if flow.ndim > 3 and flow.shape[0] == 1 else flow)
