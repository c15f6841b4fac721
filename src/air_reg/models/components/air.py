"""AiR: Attention for Image Registration (Wang & Delingette), single-Transformer network.

Images or volumes: an (H, W) ``image_size`` cuts p x p patches, a (D, H, W) one cubic p^3
patches (the same linear patch embedding of p^n voxels, position embeddings over the token
grid, a head of n displacements per token upsampled by ``CoarseToDense``)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from einops.layers.torch import Rearrange
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models.components.attention import Transformer
from air_reg.models.components.spatial_transformer import FlowField, check_patch_sizes
from air_reg.models.contract import spatial_size

QUERIES = ("moving", "fixed")
CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


def patch_image_size(image_size, patch_sizes) -> tuple[int, ...]:
    """The (H, W) or (D, H, W) of ``image_size`` (int: square 2-D); raise if a patch size does
    not divide every side, listing the valid ones."""
    size = spatial_size(image_size)
    if len(size) == 2:
        return check_patch_sizes(image_size, patch_sizes)
    bad = [p for p in patch_sizes if int(p) <= 0 or any(n % int(p) for n in size)]
    if bad:
        shown = "x".join(map(str, size))
        valid = [d for d in range(1, min(size) + 1) if all(n % d == 0 for n in size)]
        raise ConfigError(
            f"patch size(s) {bad} do not divide volume size {shown}; valid patch sizes for "
            f"{shown} are {valid} (set model.net.patch_size(s) or resize/pad the volumes)"
        )
    return size


def conv_stem(channels: int, layers: int, ndim: int = 2) -> nn.Sequential:
    """3x3 (3x3x3) conv + GELU layers at full resolution: (B, 1, *size) -> (B, channels, *size)."""
    if channels < 1 or layers < 1:
        raise ConfigError(f"stem needs channels >= 1 and layers >= 1, got {channels}, {layers}")
    mods, c_in = [], 1
    for _ in range(layers):
        mods += [CONVS[ndim](c_in, channels, 3, padding=1), nn.GELU()]
        c_in = channels
    return nn.Sequential(*mods)


class AiRBranch(nn.Module):
    """Patch tokens of both images -> Transformer -> per-patch displacement (B, 2, H/p, W/p),
    or (B, 3, D/p, H/p, W/p) for a (D, H, W) ``image_size`` (cubic patches).

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
        size = patch_image_size(image_size, [patch_size])  # an int is square 2-D
        if query not in QUERIES:
            raise ConfigError(f"query must be one of {QUERIES}, got {query!r}")
        n = len(size)
        self.grid = tuple(s // patch_size for s in size)  # token grid ((slices,) rows, columns)
        self.query = query
        axes = " ".join("dhw"[-n:])  # the token grid's einops axes, 2-D: "h w"
        # One embedding and one position table for both images (as in the authors' code).
        if stem_channels:
            self.embed = nn.Sequential(
                conv_stem(stem_channels, stem_layers, n),
                CONVS[n](stem_channels, dim, patch_size, stride=patch_size),  # patch embedding
                Rearrange(f"b c {axes} -> b ({axes}) c"),
            )
        else:
            cut = {f"p{i}": patch_size for i in range(n)}  # 2-D: "b c (h p0) (w p1) -> ..."
            sides = " ".join(f"({a} p{i})" for i, a in enumerate("dhw"[-n:]))
            self.embed = nn.Sequential(
                Rearrange(f"b c {sides} -> b ({axes}) ({' '.join(cut)} c)", **cut),
                nn.Linear(patch_size**n, dim),
            )
        self.pos = nn.Parameter(torch.randn(1, math.prod(self.grid), dim) * 0.02)
        self.transformer = Transformer(
            dim=dim,
            depth=depth,
            heads=heads,
            ff_dim=ff_dim or 4 * dim,
            dropout=dropout,
            attn_dropout=attn_dropout,
        )
        self.head = nn.Linear(dim, n)  # per-token ([dz,] dy, dx) in pixels
        nn.init.normal_(self.head.weight, std=1e-5)  # start near the identity
        nn.init.zeros_(self.head.bias)
        sides = dict(zip(axes.split(), self.grid, strict=True))  # the grid's sides by axis
        self.to_grid = Rearrange(f"b ({axes}) c -> b c {axes}", **sides)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        f, m = self.embed(fixed) + self.pos, self.embed(moving) + self.pos  # (B, N, D)
        src, tgt = (f, m) if self.query == "moving" else (m, f)
        return self.to_grid(self.head(self.transformer(src, tgt)))  # (B, n, *size / p)


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
    """Single-scale AiR: ``forward(fixed, moving) -> flow`` (B, 2, H, W) in pixels, or
    (B, 3, D, H, W) in voxels for volumes.

    ``image_size`` is an int (square), (H, W) or (D, H, W); ``patch_size`` must divide every
    side (volumes: cubic p^3 patches).
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
        self.image_size = spatial_size(image_size)  # (H, W) or (D, H, W): the contract
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
