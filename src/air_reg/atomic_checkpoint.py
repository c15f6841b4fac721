"""Lightning checkpoints written atomically: a kill at any moment leaves the old file or the
new one, never half of one (``trainer.plugins`` in ``conf/trainer/default.yaml``).

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction without ``fsync``;
``AtomicCheckpointIO`` saves through ``air_reg.utils.save_torch``: a temporary file in the
target's folder, fsynced, then renamed onto the target. Its names
(``.last.ckpt.<pid>.<random>.tmp``) never match Lightning's ``last*.ckpt``, so
``ckpt_path=last`` cannot pick one up. Under DDP only rank 0 writes (Lightning's strategy
decides); remote paths (``s3://...``) go through Lightning's own writer.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from air_reg.utils import save_torch

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (temporary file, fsync, rename)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        local = "://" not in str(path) or str(path).startswith("file://")
        if storage_options is not None or not local:
            super().save_checkpoint(checkpoint, path, storage_options)  # refuses storage_options
            return
        log.debug("Saving checkpoint atomically: %s", path)
        save_torch(str(path).removeprefix("file://"), checkpoint)
