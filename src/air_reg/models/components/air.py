"""AiR: Attention for Image Registration (Wang & Delingette), single-Transformer network."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from einops.layers.torch import Rearrange
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models.components.attention import Transformer
from air_reg.models.components.spatial_transformer import FlowField, check_patch_sizes
from air_reg.models.contract import as_size

QUERIES = ("moving", "fixed")


def conv_stem(channels: int, layers: int) -> nn.Sequential:
    """3x3 conv + GELU layers at full resolution: (B, 1, H, W) -> (B, channels, H, W)."""
    if channels < 1 or layers < 1:
        raise ConfigError(f"stem needs channels >= 1 and layers >= 1, got {channels}, {layers}")
    mods, c_in = [], 1
    for _ in range(layers):
        mods += [nn.Conv2d(c_in, channels, 3, padding=1), nn.GELU()]
        c_in = channels
    return nn.Sequential(*mods)


class AiRBranch(nn.Module):
    """Patch tokens of both images -> Transformer -> per-patch displacement (B, 2, H/p, W/p).

    ``query="moving"`` is the paper's wiring: the encoder attends over the fixed image and
    the decoder over the moving image with cross-attention to that memory. ``"fixed"`` is
    what the authors' code does in practice (encoder on moving, decoder on fixed). Either
    way the output is read on the shared patch grid.

    ``stem_channels > 0`` (not in the paper) puts a small conv stem before the patch
    embedding, so each token sees a neighbourhood wider than its patch: distinctive keys for
    the cross-attention to match. ``0`` is the paper's linear patch embedding.
    ``attn_dropout`` (dropout on the attention probabilities) is not in the paper: 0.
    """

    def __init__(
        self,
        *,
        image_size: int | Sequence[int] = 28,
        patch_size: int = 2,
        dim: int = 16,
        depth: int = 1,
        heads: int = 4,
        ff_dim: int | None = None,
        dropout: float = 0.5,
        attn_dropout: float = 0.0,
        query: str = "moving",
        stem_channels: int = 0,
        stem_layers: int = 2,
    ) -> None:
        super().__init__()
        h, w = check_patch_sizes(image_size, [patch_size])  # an int is square
        if query not in QUERIES:
            raise ConfigError(f"query must be one of {QUERIES}, got {query!r}")
        self.grid = (h // patch_size, w // patch_size)  # token grid (rows, columns)
        self.query = query
        # One embedding and one position table for both images (as in the authors' code).
        if stem_channels:
            self.embed = nn.Sequential(
                conv_stem(stem_channels, stem_layers),
                nn.Conv2d(stem_channels, dim, patch_size, stride=patch_size),  # patch embedding
                Rearrange("b d h w -> b (h w) d"),
            )
        else:
            self.embed = nn.Sequential(
                Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
                nn.Linear(patch_size * patch_size, dim),
            )
        self.pos = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02)
        self.transformer = Transformer(
            dim=dim,
            depth=depth,
            heads=heads,
            ff_dim=ff_dim or 4 * dim,
            dropout=dropout,
            attn_dropout=attn_dropout,
        )
        self.head = nn.Linear(dim, 2)  # per-token (dy, dx) in pixels
        nn.init.normal_(self.head.weight, std=1e-5)  # start near the identity
        nn.init.zeros_(self.head.bias)
        self.to_grid = Rearrange("b (h w) c -> b c h w", h=self.grid[0])

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        f, m = self.embed(fixed) + self.pos, self.embed(moving) + self.pos  # (B, N, D)
        src, tgt = (f, m) if self.query == "moving" else (m, f)
        return self.to_grid(self.head(self.transformer(src, tgt)))  # (B, 2, H/p, W/p)


def check_branch_kwargs(owner: type, kwargs: dict, fixed: Sequence[str] = ()) -> None:
    """Refuse settings that neither ``owner`` nor ``AiRBranch`` takes (``fixed``: branch
    arguments that ``owner`` sets itself), naming the ones they do."""
    branch = [n for n in inspect.signature(AiRBranch).parameters if n not in fixed]
    unknown = sorted(set(kwargs) - set(branch))
    if unknown:
        params = inspect.signature(owner).parameters.values()
        own = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
        raise ConfigError(
            f"{owner.__name__} has no setting(s) {unknown} (model.net.*); its settings are "
            f"{sorted({*own, *branch})}"
        )


class AiR(nn.Module):
    """Single-scale AiR: ``forward(fixed, moving) -> flow`` (B, 2, H, W) in pixels.

    ``image_size`` is an int (square) or (H, W); ``patch_size`` must divide both sides.
    """

    def __init__(
        self,
        *,
        image_size: int | Sequence[int] = 28,
        patch_size: int = 2,
        interpolation: str = "bicubic",
        integration_steps: int = 0,
        **branch_kwargs,
    ) -> None:
        super().__init__()
        check_branch_kwargs(AiR, branch_kwargs)
        self.branch = AiRBranch(image_size=image_size, patch_size=patch_size, **branch_kwargs)
        self.image_size = as_size(image_size)  # (H, W): the contract (models/contract.py)
        self.field = FlowField(
            coarse_size=self.branch.grid,
            image_size=self.image_size,
            interpolation=interpolation,
            integration_steps=integration_steps,
        )

    @property
    def integration_steps(self) -> int:
        return self.field.integration_steps

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.field(self.branch(fixed, moving))
