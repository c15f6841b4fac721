"""MAPT: Multi-scale Attention Parallel Transformer (N AiR branches with different patch sizes),
on images or, with a (D, H, W) ``image_size``, volumes (cubic patches in every branch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from air_reg import deprecation
from air_reg.errors import ConfigError
from air_reg.models.components.air import AiRBranch, check_branch_kwargs, patch_image_size
from air_reg.models.components.spatial_transformer import CoarseToDense, FlowField


class MAPT(nn.Module):
    """Parallel AiR branches; their coarse fields are resampled to the finest branch grid
    and summed with normalised weights, then made dense by the shared ``FlowField``.

    ``mix_weights`` sets the initial (``learn_weights=True``, softmax-normalised so they stay
    positive and sum to 1) or fixed (normalised once) mixing weights; default uniform.
    ``image_size`` is an int (square), (H, W) or (D, H, W); every patch size must divide every
    side.
    ``weights`` is the former name of ``mix_weights`` (``load_model`` maps it in stored
    configs; elsewhere it warns).
    """

    def __init__(
        self,
        *,
        image_size: int | Sequence[int] = 28,
        patch_sizes: Sequence[int] = (2, 4, 7),
        mix_weights: Sequence[float] | None = None,
        learn_weights: bool = True,
        interpolation: str = "bicubic",
        branch_interpolation: str = "bicubic",
        integration_steps: int = 0,
        weights: Sequence[float] | None = None,
        **branch_kwargs,
    ) -> None:
        super().__init__()
        weights = deprecation.renamed("MAPT", "weights", "mix_weights", weights, mix_weights)
        check_branch_kwargs(MAPT, branch_kwargs, fixed=("patch_size",))
        patch_sizes = [int(p) for p in patch_sizes]
        size = patch_image_size(image_size, patch_sizes)  # (H, W) or (D, H, W); int: square
        if weights is None:
            weights = [1.0] * len(patch_sizes)
        if len(weights) != len(patch_sizes) or min(weights) <= 0:
            raise ConfigError(
                f"model.net.mix_weights {list(weights)} must be positive, one per patch size "
                f"{patch_sizes}"
            )
        self.patch_sizes = patch_sizes
        self.branches = nn.ModuleList(
            AiRBranch(image_size=image_size, patch_size=p, **branch_kwargs) for p in patch_sizes
        )
        grid = tuple(n // min(patch_sizes) for n in size)  # the finest branch grid
        self.resample = nn.ModuleList(
            CoarseToDense(in_size=b.grid, out_size=grid, mode=branch_interpolation)
            for b in self.branches
        )
        w = torch.tensor(weights, dtype=torch.float32)
        if learn_weights:
            self.weight_logits = nn.Parameter(w.log())
        else:
            self.register_buffer("fixed_weights", w / w.sum())
        self.image_size = size  # the contract (models/contract.py)
        self.field = FlowField(
            coarse_size=grid,
            image_size=self.image_size,
            interpolation=interpolation,
            integration_steps=integration_steps,
        )

    @property
    def integration_steps(self) -> int:
        return self.field.integration_steps

    @property
    def mix_weights(self) -> torch.Tensor:
        """The normalised mixing weights (positive, summing to 1)."""
        if hasattr(self, "weight_logits"):
            return self.weight_logits.softmax(0)
        return self.fixed_weights

    @property
    def weights(self) -> torch.Tensor:
        """Deprecated name of ``mix_weights``."""
        deprecation.warn("MAPT.weights is deprecated; use MAPT.mix_weights")
        return self.mix_weights

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        w = self.mix_weights
        coarse = sum(
            w[i] * up(branch(fixed, moving))  # (B, n, *size / pmin)
            for i, (branch, up) in enumerate(zip(self.branches, self.resample, strict=True))
        )
        return self.field(coarse)
