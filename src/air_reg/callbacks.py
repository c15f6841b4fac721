"""Lightning callbacks and logger factories: validation image grids, W&B without an account."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from air_reg.models.components.spatial_transformer import warp

log = logging.getLogger(__name__)


def grid_image(size: tuple[int, int], step: int = 4) -> torch.Tensor:
    """(1, 1, H, W) image of lines every ``step`` pixels; warping it draws the deformation."""
    img = torch.zeros(1, 1, *size)
    img[..., ::step, :] = 1
    img[..., :, ::step] = 1
    return img


@torch.no_grad()
def pair_grid(fixed, moving, flow) -> torch.Tensor:
    """(3, H', W') image: one row per pair, columns fixed | moving | warped | deformation."""
    warped = warp(moving, flow)
    lines = warp(grid_image(fixed.shape[-2:]).to(flow).expand(len(flow), -1, -1, -1), flow)
    tiles = torch.stack([fixed, moving, warped, lines], 1).flatten(0, 1)  # (4B, 1, H, W)
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
