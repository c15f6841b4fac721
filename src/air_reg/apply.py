"""Apply a saved field to other files: ``python -m air_reg.apply field=flow.npy fixed=a.png
image=b.png``.

``field`` (register's ``flow.npy`` or an ITK displacement field NIfTI) is read on ``fixed``'s
grid; then ``image`` (warped bilinearly, in its own format and pixel type, a NIfTI with the
fixed image's header), ``labels`` (nearest neighbour, integers kept), ``points`` (fixed-image
points to the moving image) and ``inverse_points`` (moving-image points to the fixed image),
as asked (``air_reg.mapping``). Every input is read and checked before anything is written,
so a bad one leaves ``out_dir`` as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig

from air_reg.config import CONFIG_DIR
from air_reg.data.image_file import ImageFile, output_suffix, read_image_file, write_like
from air_reg.errors import ConfigError, DataError
from air_reg.fields import read_field
from air_reg.mapping import nifti_grid, read_labels, warp_image, warp_labels, write_labels
from air_reg.points import invert_points, map_points, outside, read_points, write_points
from air_reg.utils import check_writable, run_cli

log = logging.getLogger(__name__)
TARGETS = ("image", "labels", "points", "inverse_points")


def _path(value) -> Path:
    return Path(str(value)).expanduser()


def apply(cfg: DictConfig) -> dict:
    """Compute every asked result in memory, then write them; returns the written paths."""
    if not any(cfg.get(k) for k in TARGETS):
        raise ConfigError(
            f"nothing to apply the field to: set one or more of "
            f"{', '.join(k + '=...' for k in TARGETS)}"
        )
    fixed = read_image_file(_path(cfg.fixed))
    size, f_geom = fixed.values.shape, fixed.geometry
    flow = read_field(_path(cfg.field), f_geom, size)  # (1, D, *size) fixed pixels
    writes: dict[str, Callable[[Path], object]] = {}  # output name -> its writer
    moving = None
    if cfg.get("moving"):
        moving = _same_dim(cfg, "moving", read_image_file(_path(cfg.moving)), f_geom)
    if cfg.get("image"):
        channel = cfg.get("channel")
        image = _same_dim(cfg, "image", read_image_file(_path(cfg.image), channel), f_geom)
        values = image.colour if image.colour is not None and channel is None else image.values
        warped = warp_image(values, flow, f_geom, image.geometry)
        like = nifti_grid(fixed) if image.is_nifti else image  # NIfTI: the fixed's header
        writes[f"warped{output_suffix(image)}"] = partial(
            write_like, values=warped, like=like, dtype_from=image
        )
        moving = moving or image
    if cfg.get("labels"):
        labels = read_labels(_path(cfg.labels))
        _same_dim(cfg, "labels", labels.file, f_geom)
        warped = warp_labels(labels.values, flow, f_geom, labels.file.geometry, name=cfg.labels)
        writes[f"labels{output_suffix(labels.file)}"] = partial(
            write_labels, values=warped, labels=labels, fixed=fixed
        )
        moving = moving or labels.file
    moving = moving or fixed  # a moving image on the fixed's grid (PNG pairs)
    m_geom, m_size = moving.geometry, moving.values.shape[: f_geom.ndim]
    if cfg.get("points"):
        points, index = read_points(_path(cfg.points), f_geom, size, image="fixed image")
        mapped = map_points(index, flow, f_geom, m_geom)
        _warn_outside("points.csv", mapped, m_size, "moving")
        writes["points.csv"] = partial(write_points, points=points, index=mapped, geometry=m_geom)
    if cfg.get("inverse_points"):
        points, index = read_points(
            _path(cfg.inverse_points), m_geom, m_size, image="moving image"
        )
        back = invert_points(index, flow, f_geom, m_geom)
        _warn_outside("inverse_points.csv", back, size, "fixed")
        writes["inverse_points.csv"] = partial(
            write_points, points=points, index=back, geometry=f_geom
        )
    out_dir = check_writable(_path(cfg.out_dir))  # only now: a bad input leaves it as it was
    for name, write in writes.items():
        write(out_dir / name)
    log.info("Applied %s: wrote %s to %s", cfg.field, " ".join(writes), out_dir)
    return {"outputs": [str(out_dir / n) for n in writes], "output_dir": str(out_dir)}


def _same_dim(cfg: DictConfig, key: str, file: ImageFile, f_geom) -> ImageFile:
    """``file`` (``cfg[key]``), refused unless of the fixed image's dimension."""
    if file.values.ndim != f_geom.ndim or file.geometry.ndim != f_geom.ndim:
        raise DataError(
            f"{key}={cfg[key]} is {file.values.ndim}-D but the fixed image is "
            f"{f_geom.ndim}-D; give a {f_geom.ndim}-D {key} on the moving side"
        )
    return file


def _warn_outside(name: str, index, size: tuple[int, ...], image: str) -> None:
    off = int(outside(index, size).sum())
    if off:
        log.warning(
            "%d of %d point(s) in %s land outside the %s image (%s pixels)",
            off,
            len(index),
            name,
            image,
            " x ".join(map(str, size)),
        )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="apply")
def main(cfg: DictConfig) -> None:
    run_cli(apply, cfg)


if __name__ == "__main__":
    main()
