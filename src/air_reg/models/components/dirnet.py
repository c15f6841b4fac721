"""DIRNet (de Vos et al. 2017): the CNN baseline the paper compares against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models.components.spatial_transformer import FlowField, check_patch_sizes


class DIRNet(nn.Module):
    """Concatenated (fixed, moving) -> conv + ELU (+ BN) with pooling -> control-point grid.

    ``num_pools`` 2x2 average poolings bring the image to a control grid of spacing
    ``2**num_pools``; a zero-initialised 1x1 head gives control-point displacements in
    pixels, made dense by the shared ``FlowField`` (cubic B-spline as in de Vos et al. by
    default; ``bicubic`` as in the ports the AiR paper used). ``image_size``: an int
    (square) or (H, W), both sides divisible by the spacing.
    """

    def __init__(
        self,
        *,
        image_size: int | Sequence[int] = 28,
        channels: int = 64,
        num_convs: int = 4,
        num_pools: int = 2,
        batch_norm: bool = True,
        interpolation: str = "bspline",
        integration_steps: int = 0,
    ) -> None:
        super().__init__()
        spacing = 2**num_pools
        h, w = check_patch_sizes(  # an int is square
            image_size,
            [spacing],
            what="control-point spacing",
            knob="model.net.num_pools (spacing 2**num_pools)",
            powers_of_two=True,
        )
        if num_convs < num_pools:
            raise ConfigError(f"num_convs ({num_convs}) must be >= num_pools ({num_pools})")
        layers, c_in = [], 2
        for i in range(num_convs):
            layers += [nn.Conv2d(c_in, channels, 3, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(channels)] if batch_norm else []
            layers += [nn.ELU()]
            if i < num_pools:
                layers += [nn.AvgPool2d(2)]
            c_in = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 2, 1)  # control-point (dy, dx) in pixels
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.image_size = (h, w)  # the contract (models/contract.py)
        self.field = FlowField(
            coarse_size=(h // spacing, w // spacing),  # the control grid
            image_size=self.image_size,
            interpolation=interpolation,
            integration_steps=integration_steps,
        )

    @property
    def integration_steps(self) -> int:
        return self.field.integration_steps

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fixed, moving], dim=1)  # (B, 2, H, W)
        return self.field(self.head(self.features(x)))
