"""Rebuild a trained model from its checkpoint file alone, safely."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

# A checkpoint's stored config may only name classes from these packages: loading a
# checkpoint never runs arbitrary code (tensors are read with ``weights_only=True`` too).
SAFE_TARGETS = ("air_reg.", "torch.optim.", "torch.nn.")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not an air-reg model."""


def _check_targets(node, where: str = "model") -> None:
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(SAFE_TARGETS):
            raise CheckpointError(
                f"checkpoint config names {target!r} at {where}; only {SAFE_TARGETS} "
                f"are allowed, so it was not loaded. Use a checkpoint written by "
                f"`python -m air_reg.train` from a source you trust"
            )
        for key, value in node.items():
            _check_targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_targets(value, f"{where}[{i}]")


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
    refine_steps: int = 0,
    cascade: int = 1,
    **refine_kwargs,
):
    """Rebuild the ``RegistrationModule`` stored in ``path``, in eval mode on ``device``.

    ``model(fixed, moving)`` takes (B, 1, H, W) images in [0, 1] and returns the flow
    (B, 2, H, W) in pixels (channel 0 rows, channel 1 columns), on the fixed grid.
    ``refine_steps > 0`` (or ``cascade > 1``) returns an ``air_reg.refine.Refiner`` with the
    same contract, which optimises each pair's flow for that many steps after the network
    (``refine_kwargs``: lr, reg_weight, integration_steps, grid, optimizer, ...).
    """
    ckpt = read_checkpoint(path)
    record = ckpt["air_reg"]
    _check_targets(record["model"])
    module = instantiate(record["model"])
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise CheckpointError(
            f"{path}: the weights do not fit the model its config describes (edited, or from "
            f"another model or version): {detail}; use the checkpoint written with that config "
            f"or retrain"
        ) from err
    module.build_config = record
    module = module.eval().to(device)
    if refine_steps or cascade > 1:
        from air_reg.refine import Refiner

        return Refiner(module, steps=refine_steps, cascade=cascade, **refine_kwargs)
    return module


def load_configured(path: str | Path, cfg):
    """``load_model`` with an entry point's device and refinement settings (eval, register)."""
    return load_model(
        path,
        device=cfg.device,
        refine_steps=cfg.refine_steps,
        cascade=cfg.cascade,
        **cfg.refine,
    )
