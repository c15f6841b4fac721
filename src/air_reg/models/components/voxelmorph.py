"""VoxelMorph (Balakrishnan et al. 2019) as a peer: a thin adapter around the real package.

``voxelmorph.nn.models.VxmPairwise`` (voxelmorph >= 0.3, PyTorch) is imported only here and
only when the model is built: ``pip install air-reg[peers]``. Its displacement is already in
our convention: voxels (pixels), channel i along spatial axis i (2-D: channel 0 along rows),
``warped(p) = source(p + disp(p))``
with ``source`` the moving image (``grid_sample``, ``align_corners=True``); with
``integration_steps > 0`` it is the exponential of a stationary velocity (scaling and
squaring). The adapter only swaps the argument order, pads to what the UNet takes and crops.
Images or volumes: the rank of ``image_size`` ((H, W) or (D, H, W)) picks VxmPairwise's ``ndim``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import crop, pad_to_multiple
from air_reg.models.contract import spatial_size

INSTALL_HINT = "model=voxelmorph needs the voxelmorph package: pip install air-reg[peers]"
PADDINGS = ("replicate", "reflect", "constant")


def _voxelmorph():
    try:
        import voxelmorph
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return voxelmorph


def has_voxelmorph() -> bool:
    """Whether the voxelmorph package can be imported."""
    try:
        _voxelmorph()
    except ImportError:
        return False
    return True


class VoxelMorph(nn.Module):
    """``VxmPairwise`` (UNet on the concatenated pair, velocity head, integration), 2-D for an
    (H, W) ``image_size`` (an int: square), 3-D for a (D, H, W) one.

    ``nb_features``: the UNet's channels per level as voxelmorph spells them (the encoder's;
    the decoder mirrors them); each level pools by 2, so inputs are padded (``padding`` mode)
    to the next multiple of ``2**len(nb_features)`` and the flow is cropped back.
    ``integration_steps``: scaling-and-squaring steps (0: the head's output is the flow).
    ``any_size``: ``register`` runs it at a pair's own size (the contract's
    ``accepts_any_size``; a conv net trained on varied images, e.g. data=synth); off, pairs are
    resized to ``image_size`` as for a model trained on one dataset.
    """

    def __init__(
        self,
        *,
        image_size: int | Sequence[int] = 28,
        nb_features: Sequence[int] = (16, 32, 32, 32),
        integration_steps: int = 5,
        flow_initializer: float = 1e-5,
        padding: str = "replicate",
        any_size: bool = False,
    ) -> None:
        super().__init__()
        vxm = _voxelmorph()
        self.accepts_any_size = bool(any_size)
        features = tuple(nb_features)
        if not features or not all(isinstance(f, int) and f >= 0 for f in features):
            raise ConfigError(
                f"model.net.nb_features must be a list of channel counts (ints >= 0), one per "
                f"UNet level, e.g. [16, 32, 32, 32]; got {list(features)}"
            )
        if isinstance(integration_steps, bool) or not isinstance(integration_steps, int):
            raise ConfigError(f"integration_steps must be an int, got {integration_steps!r}")
        if integration_steps < 0:
            raise ConfigError(f"integration_steps must be >= 0, got {integration_steps}")
        if padding not in PADDINGS:
            raise ConfigError(f"model.net.padding must be one of {PADDINGS}, got {padding!r}")
        self.image_size = spatial_size(image_size)  # the contract (models/contract.py)
        self.ndim = len(self.image_size)  # 2: images, 3: volumes
        self.multiple = 2 ** len(features)  # each UNet level max-pools by 2
        self.padding = padding
        self.vxm = vxm.nn.models.VxmPairwise(
            ndim=self.ndim,
            source_channels=1,
            target_channels=1,
            nb_features=features,
            integration_steps=integration_steps,
            flow_initializer=flow_initializer,
            # it moves its flow layer `.to(device)`: the current default (meta when
            # load_model first checks a checkpoint's shapes) rather than its "cpu"
            device=torch.get_default_device(),
        )

    @property
    def integration_steps(self) -> int:
        return self.vxm.integration_steps

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if fixed.ndim != self.ndim + 2:
            raise ConfigError(
                f"this VoxelMorph is {self.ndim}-D (image_size {self.image_size}): it takes "
                f"(B, 1, {', '.join('DHW'[-self.ndim :])}) pairs, got {tuple(fixed.shape)}"
            )
        size = tuple(fixed.shape[2:])
        fixed, pads = pad_to_multiple(fixed, self.multiple, self.padding)
        moving, _ = pad_to_multiple(moving, self.multiple, self.padding)
        # voxelmorph caches its identity grid as a plain attribute, not a buffer: it would
        # stay on the device and dtype of the first call (the contract's CPU dry run)
        for module in self.vxm.modules():
            module.__dict__.pop("meshgrid", None)
        flow = self.vxm(moving, fixed)  # source = moving, target = fixed: (B, ndim, *padded)
        self.vxm.__dict__.pop("velocity", None)  # it keeps the last velocity (and its graph)
        return crop(flow, pads, size)
