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
                f"are allowed. Refusing to load it."
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
    except Exception as err:
        raise CheckpointError(
            f"{path} could not be read as a checkpoint (corrupt, truncated or not a "
            f"PyTorch file): {str(err).splitlines()[0]}; retrain or re-download it"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "air_reg" not in ckpt:
        raise CheckpointError(
            f"{path} is not an air-reg checkpoint (no model record); use a .ckpt written "
            f"by `python -m air_reg.train`"
        )
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the ``RegistrationModule`` stored in ``path``, in eval mode on ``device``.

    ``model(fixed, moving)`` takes (B, 1, H, W) images in [0, 1] and returns the flow
    (B, 2, H, W) in pixels (channel 0 rows, channel 1 columns), on the fixed grid.
    """
    ckpt = read_checkpoint(path)
    record = ckpt["air_reg"]
    _check_targets(record["model"])
    module = instantiate(record["model"])
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: the weights do not fit the model its config describes (from another "
            f"model or version?): {str(err).splitlines()[0]}"
        ) from err
    module.build_config = record
    return module.eval().to(device)
