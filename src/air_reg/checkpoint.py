"""Rebuild a trained model from its checkpoint file alone, safely, without Lightning."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from air_reg import speed
from air_reg.models import contract

# A checkpoint's stored config may only name classes from these packages, and from the
# module prefixes listed in $AIR_REG_TRUST (comma-separated, e.g. "mylab.nets."): loading a
# checkpoint never runs code from elsewhere (tensors are read with ``weights_only=True`` too).
SAFE_TARGETS = ("air_reg.", "torch.optim.", "torch.nn.")
TRUST_ENV = "AIR_REG_TRUST"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # shipped checkpoints (package data)
# Speed settings that older checkpoints stored in the network's config (now ``speed.*``).
LEGACY_NET_KEYS = ("impl", "fast_dropout", "attn_kernel")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not an air-reg model."""


def trusted_prefixes() -> tuple[str, ...]:
    """``SAFE_TARGETS`` and the prefixes named in ``$AIR_REG_TRUST``."""
    extra = os.environ.get(TRUST_ENV, "")
    return SAFE_TARGETS + tuple(p.strip() for p in extra.split(",") if p.strip())


def _check_targets(node, where: str) -> None:
    if isinstance(node, dict):
        target = node.get("_target_")
        trusted = trusted_prefixes()
        if target is not None and not str(target).startswith(trusted):
            module = str(target).rpartition(".")[0] or str(target)
            raise CheckpointError(
                f"checkpoint config names {target!r} at {where}, outside the trusted "
                f"{', '.join(trusted)}, so it was not loaded. If you trust that code, name its "
                f"module in {TRUST_ENV} (e.g. export {TRUST_ENV}={module}.)"
            )
        for key, value in node.items():
            _check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_targets(value, f"{where}[{i}]")


class TrainedModel(nn.Module):
    """A trained registration network as ``load_model`` returns it (eval mode, no Lightning).

    ``model(fixed, moving)`` is ``net(fixed, moving)``: the flow (B, 2, H, W) in pixels;
    ``build_config`` is the checkpoint's record (model and data configs, versions).
    """

    def __init__(self, net: nn.Module, build_config: dict) -> None:
        super().__init__()
        self.net, self.build_config = net, build_config

    @property
    def image_size(self) -> tuple[int, int]:
        return contract.image_size(self.net)

    @property
    def integration_steps(self) -> int:
        return contract.integration_steps(self.net)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.net(fixed, moving)


def network_config(record: dict) -> tuple[dict, dict]:
    """The network's config from a checkpoint record, and the speed settings it trained with
    (older records kept ``impl``/``fast_dropout``/``attn_kernel`` in the network's config)."""
    net_cfg = record.get("model", {}).get("net")
    if not isinstance(net_cfg, dict) or "_target_" not in net_cfg:
        raise CheckpointError(
            "the checkpoint's record has no network config (model.net); use a .ckpt written "
            "by `python -m air_reg.train`"
        )
    net_cfg = dict(net_cfg)
    legacy = {k: net_cfg.pop(k) for k in LEGACY_NET_KEYS if k in net_cfg}
    if legacy.get("impl", "sdpa") != "sdpa":
        raise CheckpointError(
            f"this checkpoint was trained with the reference nn.Transformer (impl="
            f"{legacy['impl']!r}), which air-reg no longer builds; retrain it"
        )
    speed = record.get("speed") or {
        "attention": {"cpu": "kernel"}.get(legacy.get("attn_kernel"), "auto"),
        "dropout": "fast" if legacy.get("fast_dropout") else "torch",
    }
    return net_cfg, speed


def shipped_weights(name: str) -> Path:
    """``air_reg/weights/<name>.ckpt``; the error lists what is shipped."""
    path = WEIGHTS_DIR / f"{name}.ckpt"
    if not path.is_file():
        shipped = sorted(p.stem for p in WEIGHTS_DIR.glob("*.ckpt"))
        raise CheckpointError(
            f"no shipped weights {path.name}: choose weights=<name> among {shipped or 'none'} "
            f"or pass ckpt_path=<run dir>/checkpoints/last.ckpt (from `python -m air_reg.train`)"
        )
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, read with ``weights_only=True``; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass the path of a .ckpt written by "
            f"`python -m air_reg.train` (see <run dir>/checkpoints/)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own text suggests weights_only=False: not for us
        reason = "not a zip archive" if "zip" in str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} could not be read as a safe checkpoint (corrupt, truncated, not a "
            f"PyTorch file, or holding pickled objects: {reason}); retrain or re-download it"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "air_reg" not in ckpt:
        raise CheckpointError(
            f"{path} is not an air-reg checkpoint (no model record); use a .ckpt written "
            f"by `python -m air_reg.train`"
        )
    return ckpt


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    attention: str = "auto",
    refine_steps: int = 0,
    cascade: int = 1,
    **refine_kwargs,
):
    """Rebuild the network stored in ``path`` as a ``TrainedModel``, eval mode, on ``device``.

    ``model(fixed, moving)`` takes (B, 1, H, W) images in [0, 1] and returns the flow
    (B, 2, H, W) in pixels (channel 0 rows, channel 1 columns), on the fixed grid.
    ``attention`` is the CLI's ``speed.attention`` (``air_reg.speed``).
    ``refine_steps > 0`` (or ``cascade > 1``) returns an ``air_reg.refine.Refiner`` with the
    same contract, which optimises each pair's flow for that many steps after the network
    (``refine_kwargs``: lr, reg_weight, integration_steps, grid, optimizer, ...).
    """
    ckpt = read_checkpoint(path)
    record = ckpt["air_reg"]
    _check_targets(record.get("model"), "model")  # before anything in it is read
    net_cfg, _ = network_config(record)
    net = instantiate(net_cfg)
    weights = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise CheckpointError(
            f"{path}: the weights do not fit the model its config describes (edited, or from "
            f"another model or version): {detail}; use the checkpoint written with that config "
            f"or retrain"
        ) from err
    speed.accelerate(net, attention=attention)
    module = TrainedModel(net, record).eval().to(device)
    if refine_steps or cascade > 1:
        from air_reg.refine import Refiner

        return Refiner(module, steps=refine_steps, cascade=cascade, **refine_kwargs)
    return module


def load_configured(path: str | Path, cfg):
    """``load_model`` with an entry point's device and refinement settings (eval, register)."""
    return load_model(
        path,
        device=cfg.device,
        attention=speed.settings_of(cfg)["attention"],
        refine_steps=cfg.refine_steps,
        cascade=cfg.cascade,
        **cfg.refine,
    )
