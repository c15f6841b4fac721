"""Lightning callbacks and logger factories: validation image grids, stopping at a plateau of
the validation metric, W&B without an account."""

from __future__ import annotations

import csv
import logging
import math
import netrc
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from air_reg.models.components.spatial_transformer import warp
from air_reg.utils import write_json, write_text

log = logging.getLogger(__name__)


def grid_image(size: tuple[int, ...], step: int = 4) -> torch.Tensor:
    """(1, 1, *size) image of lines (planes in 3-D) every ``step`` pixels along the last two
    axes; warping it draws the deformation."""
    img = torch.zeros(1, 1, *size)
    img[..., ::step, :] = 1
    img[..., :, ::step] = 1
    return img


@torch.no_grad()
def pair_grid(fixed, moving, flow) -> torch.Tensor:
    """(3, H', W') image: one row per pair, columns fixed | moving | warped | deformation;
    for volumes (B, 1, D, H, W), their middle slice along the first axis."""
    warped = warp(moving, flow)
    lines = warp(grid_image(fixed.shape[2:]).to(flow).expand(len(flow), -1, *fixed.shape[2:]),
                 flow)  # fmt: skip
    tiles = torch.stack([fixed, moving, warped, lines], 1).flatten(0, 1)  # (4B, 1, *spatial)
    if tiles.ndim == 5:  # a volume: its middle slice
        tiles = tiles[:, :, tiles.shape[2] // 2]
    return make_grid(tiles.clamp(0, 1).cpu(), nrow=4, padding=2, pad_value=0.5)


class ImageGridLogger(L.Callback):
    """Logs fixed | moving | warped | deformation grids of the first validation batch.

    Rank zero only; W&B and TensorBoard get the image, and a PNG is always written to
    ``<run dir>/images/`` so CSV-only runs have it too.
    """

    def __init__(self, num_pairs: int = 6) -> None:
        self.num_pairs = num_pairs

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if batch_idx != 0 or trainer.sanity_checking:
            return
        n = self.num_pairs
        fixed, moving = batch["fixed"][:n], batch["moving"][:n]
        image = pair_grid(fixed, moving, pl_module(fixed, moving))
        epoch = trainer.current_epoch
        folder = Path(trainer.default_root_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(image, folder / f"val_epoch{epoch:03d}.png")
        for logger in trainer.loggers:
            name = type(logger).__name__
            if name == "WandbLogger":
                logger.log_image(key="val/pairs", images=[image], step=trainer.global_step)
            elif name == "TensorBoardLogger":
                logger.experiment.add_image("val/pairs", image, trainer.global_step)


def plateaued(steps, values, *, fraction=0.25, min_delta=0.01, min_steps=0) -> bool:
    """True when the best of ``values`` improved by less than ``min_delta`` (relative) over
    the last ``fraction`` of the run and ``steps[-1] >= min_steps`` (non-finite: skipped).

    The reference is the best value at or before step (1 - ``fraction``) x ``steps[-1]``, so
    the patience grows with the run: a slow power-law fall never stops, a flat tail does.
    """
    pts = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if not pts or steps[-1] < min_steps:
        return False
    cutoff = (1 - fraction) * steps[-1]
    before = [v for s, v in pts if s <= cutoff]
    if not before:
        return False  # nothing to compare with yet
    best_before, best_now = min(before), min(v for _, v in pts)
    return best_before - best_now < min_delta * best_before


def read_curve(folder: str | Path) -> list[tuple[int, float, float]]:
    """The (step, wall s, value) rows a ``PlateauStopping`` wrote to ``<folder>/curve.csv``."""
    with open(Path(folder) / "curve.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(int(r["step"]), float(r["wall_s"]), float(r["val_mse"])) for r in rows]


class PlateauStopping(L.Callback):
    """Stops training when ``plateaued`` says the validation ``monitor`` has levelled off.

    Records (step, wall s, ``monitor``) at every validation to ``<folder>/curve.csv``; on fit
    end writes ``<folder>/stop.json``: why it stopped (plateau, max_steps, max_time or other),
    the steps, the wall time and the best step, value and checkpoint. ``resume_step`` /
    ``resume_wall_s``: a run resumed from a checkpoint keeps its curve up to that step and its
    clock goes on, so the rule and the caps count the whole run. Config: callbacks=plateau.
    """

    def __init__(
        self,
        *,
        folder: str | Path,
        monitor: str = "val/mse",
        fraction: float = 0.25,
        min_delta: float = 0.01,
        min_steps: int = 0,
        resume_step: int | None = None,
        resume_wall_s: float = 0.0,
    ) -> None:
        self.folder, self.monitor = Path(folder), monitor
        self.rule = {"fraction": fraction, "min_delta": min_delta, "min_steps": min_steps}
        self.rows: list[tuple[int, float, float]] = []
        self.start, self.stopped, self.offset = None, False, 0.0
        if resume_step is not None:  # a resumed run: its curve so far, its clock goes on
            self.rows = [r for r in read_curve(self.folder) if r[0] <= resume_step]
            self.offset = resume_wall_s

    def on_train_start(self, trainer, pl_module):
        self.start = time.monotonic() - self.offset

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        self.rows.append((trainer.global_step, time.monotonic() - self.start, value))
        steps, _, values = zip(*self.rows, strict=True)
        if plateaued(steps, values, **self.rule):
            self.stopped = trainer.should_stop = True
        stop = ": plateau, stopping" if self.stopped else ""
        log.info(
            "step %d %s %.5f (best %.5f)%s", steps[-1], self.monitor, value, min(values), stop
        )
        if trainer.is_global_zero:
            lines = ["step,wall_s,val_mse"] + [f"{s},{w:.2f},{v:.6g}" for s, w, v in self.rows]
            write_text(self.folder / "curve.csv", "\n".join(lines) + "\n")

    def on_fit_end(self, trainer, pl_module):
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if self.stopped:
            reason = "plateau"
        elif trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            reason = "max_steps"
        elif timer is not None and (timer.time_remaining() or 0) <= 0:
            reason = "max_time"
        else:
            reason = "other"
        best = min(self.rows, key=lambda r: r[2]) if self.rows else (0, 0.0, math.nan)
        ckpt = trainer.checkpoint_callback
        info = {
            "reason": reason,
            "steps": trainer.global_step,
            "wall_s": time.monotonic() - self.start if self.start else 0.0,
            "best_step": best[0],
            "best_val_mse": best[2],
            "best_ckpt": ckpt.best_model_path if ckpt else "",
            "rule": self.rule,
        }
        if trainer.is_global_zero:
            write_json(self.folder / "stop.json", info)


def wandb_logged_in() -> bool:
    """True when W&B credentials are available (env var or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(*, mode: str = "auto", **kwargs):
    """A ``WandbLogger`` that runs offline unless the user has logged in (``mode=auto``)."""
    from lightning.pytorch.loggers import WandbLogger

    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    if mode == "offline":
        log.info("W&B runs offline (no login found); upload later with `wandb sync <dir>`")
    return WandbLogger(offline=mode == "offline", **kwargs)
