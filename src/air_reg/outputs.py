"""What ``register`` writes for a pair, in the field's formats, and what it measures with it.

Per pair: the warped moving image in the fixed file's format (a NIfTI keeps the fixed header
and the moving values in their units; a colour image keeps its channels), the flow (``.npy``,
fixed pixels), the ITK displacement field (``.nii.gz``, LPS mm: ``air_reg.fields``) and a
figure; with label maps, the warped labels and label Dice before and after; with landmarks,
the fixed points mapped to the moving image and the target registration error before and
after, in pixels and millimetres (``air_reg.mapping``, ``air_reg.points``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from air_reg.data.image_file import output_suffix, write_like
from air_reg.errors import ConfigError, DataError
from air_reg.fields import write_itk_field
from air_reg.images import save_npy, write_image
from air_reg.mapping import read_labels, warp_labels, write_labels
from air_reg.metrics import label_dice
from air_reg.points import map_points, read_points, tre, write_points

log = logging.getLogger(__name__)
LANDMARK_FIELDS = ("dice_before", "dice_after", "tre_before_px", "tre_after_px",
                   "tre_before_mm", "tre_after_mm")  # fmt: skip


def paths_for(out_dir: Path, name: str, folders: bool, suffix: str = ".png") -> dict[str, Path]:
    """Where a pair's results go: the warped image (in the fixed file's format: ``suffix``),
    the flow (.npy, pixels), the ITK displacement field (.nii.gz) and the figure."""
    if folders:  # one file per pair in each of warped/ flow/ field/ figures/
        return {
            "warped": out_dir / "warped" / f"{name}{suffix}",
            "flow": out_dir / "flow" / f"{name}.npy",
            "field": out_dir / "field" / f"{name}.nii.gz",
            "figure": out_dir / "figures" / f"{name}.png",
        }
    return {
        "warped": out_dir / f"warped{suffix}",
        "flow": out_dir / "flow.npy",
        "field": out_dir / "field.nii.gz",
        "figure": out_dir / "figure.png",
    }


def write_pair_outputs(paths: dict[str, Path], pair, warped, flow, itk_field: bool) -> None:
    """The warped moving image in the fixed file's format (a NIfTI or .npy: the moving values
    in their units; a colour image: every channel; else the normalised grey image as an 8-bit
    PNG), the flow, and the ITK field (``itk_field``)."""
    fixed_file, moving_file = pair.fixed_file, pair.moving_file
    if fixed_file.is_nifti or fixed_file.suffix == ".npy":
        raw = torch.from_numpy(moving_file.values)[None, None]
        values = pair.warp(raw, flow)[0, 0].numpy()
        write_like(paths["warped"], values, fixed_file, dtype_from=moving_file)
    elif moving_file.colour is not None:
        colour = torch.from_numpy(moving_file.colour).permute(2, 0, 1)[None]  # (1, 3, h, w)
        values = pair.warp(colour, flow)[0].permute(1, 2, 0).numpy()
        write_like(paths["warped"], values, fixed_file)
    else:
        write_image(paths["warped"], warped)
    save_npy(paths["flow"], flow[0])  # (2, H, W) pixels, channel 0 rows
    if itk_field:
        write_itk_field(paths["field"], flow, fixed_file.geometry)


def has_nibabel() -> bool:
    """Whether the ITK field can be written (a warning, once per run, when not)."""
    try:
        import nibabel  # noqa: F401
    except ImportError:
        log.warning("the ITK displacement field (field.nii.gz) needs nibabel: pip install "
                    "'air-reg[nifti]'; writing flow.npy only")  # fmt: skip
        return False
    return True


@dataclass(frozen=True)
class Landmarks:
    """``register``'s label maps (``fixed_labels``/``moving_labels``) and landmark CSVs
    (``fixed_points``/``moving_points``: corresponding rows), any of them None."""

    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_points: Path | None = None
    moving_points: Path | None = None

    @classmethod
    def of(cls, cfg) -> Landmarks:
        get = lambda k: Path(str(cfg[k])).expanduser() if cfg.get(k) else None  # noqa: E731
        return cls(*(get(k) for k in ("fixed_labels", "moving_labels", "fixed_points",
                                      "moving_points")))  # fmt: skip

    def __bool__(self) -> bool:
        return any(vars(self).values())

    def check(self) -> None:
        """Each kind needs both sides (one line naming the missing one)."""
        for kind in ("labels", "points"):
            f, m = getattr(self, f"fixed_{kind}"), getattr(self, f"moving_{kind}")
            if (f is None) != (m is None):
                missing = "fixed" if f is None else "moving"
                raise ConfigError(f"{kind} need both sides: set {missing}_{kind}=... too")

    def measure(self, out_dir: Path, pair, flow: torch.Tensor) -> tuple[dict, dict]:
        """(summary columns, {output name: writer}): label Dice and TRE before and after, the
        warped labels and the mapped points; everything read and checked before writing."""
        row, writes = {}, {}
        fixed_g, moving_g = pair.fixed_file.geometry, pair.moving_file.geometry
        if self.fixed_labels is not None:
            fixed_l, moving_l = read_labels(self.fixed_labels), read_labels(self.moving_labels)
            warped = warp_labels(moving_l.values, flow, fixed_g, moving_g,
                                 name=str(self.moving_labels))  # fmt: skip
            on_fixed = warp_labels(moving_l.values, torch.zeros_like(flow), fixed_g, moving_g,
                                   name=str(self.moving_labels))  # fmt: skip
            t = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None, None]  # noqa: E731
            for when, labels in (("before", on_fixed), ("after", warped)):
                dice = label_dice(t(fixed_l.values), t(labels), t(moving_l.values))
                row[f"dice_{when}"] = float(dice.nanmean())
            path = out_dir / f"labels{output_suffix(moving_l.file)}"
            writes[path] = lambda p, v=warped: write_labels(p, v, moving_l, pair.fixed_file)
        if self.fixed_points is not None:
            f_size, m_size = pair.fixed.shape[2:], pair.moving_native.shape[2:]
            points, p = read_points(self.fixed_points, fixed_g, f_size, image="fixed image")
            _, q = read_points(self.moving_points, moving_g, m_size, image="moving image")
            if len(p) != len(q):
                raise DataError(f"{self.fixed_points} has {len(p)} points but "
                                f"{self.moving_points} has {len(q)}: landmarks pair up by "
                                f"row")  # fmt: skip
            mapped = map_points(p, flow, fixed_g, moving_g)
            start = map_points(p, torch.zeros_like(flow), fixed_g, moving_g)
            for when, where in (("before", start), ("after", mapped)):
                px, mm = tre(where, q, moving_g)
                row[f"tre_{when}_px"], row[f"tre_{when}_mm"] = float(px.mean()), float(mm.mean())
            path = out_dir / "points.csv"
            writes[path] = lambda p_: write_points(p_, points, mapped, moving_g)
        return row, writes
