"""The LightningModule ("system"): any flow network + warp + loss, metrics and optimisers."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from air_reg import metrics as M
from air_reg.errors import ConfigError, UserError
from air_reg.models import contract
from air_reg.models.components.spatial_transformer import warp

STAGES = ("train", "val", "test")
# Label metrics come last: logged only for batches with "fixed_labels"/"moving_labels",
# hd95 at test only (scipy, CPU); NaN (a pair sharing no label) is skipped (docs/metrics.md).
LABEL_METRICS = ("dice_labels", "hd95")
METRICS = ("mse", "psnr", "smooth_dice", "folding", "dice", "ncc", "ssim", "sdlogj", "epe")
METRICS += LABEL_METRICS
SUPERVISIONS = ("image", "labels", "field")  # what the loss compares (objective)


def cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_factor`` x lr, stepped every batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite (the message names the settings to change)."""


class RegistrationModule(L.LightningModule):
    """Unsupervised registration: minimise ``loss(warp(moving, flow), fixed) + w * reg(flow)``.

    ``net`` is any registration network (``air_reg.models.contract``), checked here.
    ``forward(fixed, moving)`` is inference only and returns the flow (B, 2, H, W) in pixels.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        loss: nn.Module,
        regularizer: nn.Module | None = None,
        reg_weight: float = 0.0,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        check_finite: bool = True,
        compile: bool = False,
        supervision: str = "image",
    ) -> None:
        super().__init__()
        contract.check_network(net)
        if supervision not in SUPERVISIONS:
            raise ConfigError(f"model.supervision must be one of {SUPERVISIONS}, got "
                              f"{supervision!r}")  # fmt: skip
        self.supervision = supervision
        self.save_hyperparameters(
            logger=False, ignore=["net", "loss", "regularizer", "optimizer", "scheduler"]
        )
        self.net, self.loss, self.regularizer = net, loss, regularizer
        self.reg_weight, self.check_finite = reg_weight, check_finite
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        nan = {k: "ignore" if k in LABEL_METRICS else "warn" for k in METRICS}
        self.metrics = nn.ModuleDict(
            {
                s: nn.ModuleDict({k: MeanMetric(nan_strategy=nan[k]) for k in METRICS})
                for s in ("val", "test")
            }
        )
        self.build_config: dict | None = None  # set by train.py; stored in checkpoints
        if compile:  # compile the network's forward only: state-dict keys stay the same
            self.net.forward = torch.compile(self.net.forward)

    @property
    def image_size(self) -> tuple[int, ...]:
        return contract.image_size(self.net)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.net(fixed, moving)

    def objective(self, fixed, moving, flow, batch=None) -> dict[str, torch.Tensor]:
        """``loss`` on what ``supervision`` compares (images; one-hot label maps, the moving
        one warped bilinearly; or the flow and the true one) + ``reg_weight`` x regulariser."""
        warped = warp(moving, flow)
        if self.supervision == "image":
            sim = self.loss(warped, fixed)
        else:
            labels = self.supervision == "labels"
            needs = ("fixed_labels", "moving_labels") if labels else ("flow",)
            missing = [k for k in needs if batch is None or batch.get(k) is None]
            if missing:
                raise ConfigError(f"model.supervision={self.supervision} needs batches with "
                                  f"{missing} (data=synth has them)")  # fmt: skip
            if self.supervision == "labels":
                f_lab, m_lab = batch["fixed_labels"].long(), batch["moving_labels"].long()
                k = int(max(f_lab.max(), m_lab.max())) + 1
                one_hot = lambda x: F.one_hot(x[:, 0], k).movedim(-1, 1).to(flow.dtype)  # noqa: E731
                sim = self.loss(warp(one_hot(m_lab), flow), one_hot(f_lab))
            else:
                sim = self.loss(flow, batch["flow"].to(flow.dtype))
        if self.regularizer is not None and self.reg_weight:
            reg = self.regularizer(flow)
        else:
            reg = sim.new_zeros(())
        return {"loss": sim + self.reg_weight * reg, "sim": sim, "reg": reg, "warped": warped}

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        fixed, moving = batch["fixed"], batch["moving"]
        flow = self.net(fixed, moving)
        out = self.objective(fixed, moving, flow, batch)
        bs = fixed.shape[0]
        on_step = stage == "train"
        for k in ("loss", "sim", "reg"):
            self.log(
                f"{stage}/{k}",
                out[k].detach(),
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=k == "loss",
                batch_size=bs,
                sync_dist=not on_step,
            )
        if stage != "train":
            labels = {k: batch.get(k) for k in ("fixed_labels", "moving_labels")}
            values = M.pair_metrics(
                fixed, out["warped"], flow, batch.get("flow"), full=stage == "test", **labels
            )
            for k, v in values.items():
                metric = self.metrics[stage][k]
                metric.update(v)
                self.log(f"{stage}/{k}", metric, on_epoch=True, prog_bar=k == "mse", batch_size=bs)
        return out["loss"]

    def training_step(self, batch, batch_idx):
        loss = self._common_step(batch, "train")
        if self.check_finite and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); the last good checkpoint is kept. "
                f"Lower model.optimizer.lr, add gradient clipping (trainer.gradient_clip_val) "
                f"or check the input images for NaN/inf."
            )
        return loss

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch["fixed"], batch["moving"])

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.build_config is not None:
            checkpoint["air_reg"] = self.build_config
        # The RNG state (dropout) lets a resumed run replay the interrupted epoch exactly.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.build_config = checkpoint.get("air_reg", self.build_config)
        rng = checkpoint.get("rng_state")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
