"""AiR-UNet: AiR cross-attention on conv-feature tokens, decoded to a full-resolution flow.

In the spirit of TransMorph (Chen et al. 2022): a small conv encoder, shared by both images,
gives features at 1/1, 1/2, ..., 1/2**L of the image; at the chosen scales the fixed image's
tokens attend to the moving image's tokens (the paper's cross-attention, queries on the fixed
grid); a conv decoder with skips (fixed and moving features at every scale) gives a velocity
at full resolution, integrated by scaling and squaring. Where MAPT reads one displacement per
patch and interpolates it, here the attention finds the coarse correspondence and the decoder
refines it pixel by pixel.

Queries come from the fixed image because the flow lives on the fixed grid
(``warped(p) = moving(p + flow(p))``): the token at ``p`` asks where its content is in the
moving image, and the answer is already where the flow is read (``query: fixed`` of the tuned
MAPT).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from air_reg.errors import ConfigError
from air_reg.models.components.attention import (
    DecoderLayer,
    MultiheadAttention,
    Transformer,
    feed_forward,
)
from air_reg.models.components.spatial_transformer import crop, integrate_velocity, pad_to_multiple
from air_reg.models.contract import as_size

ATTENTIONS = ("none", "cross", "self+cross", "air")
DECODERS = ("conv", "interpolate")
PADDINGS = ("replicate", "reflect", "constant")


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + LeakyReLU(0.2), as in VoxelMorph's UNet."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class CrossLayer(nn.Module):
    """Post-norm cross-attention (queries ``x``, keys/values ``memory``) + feed-forward."""

    def __init__(self, *, dim, heads, ff_dim, dropout, attn_dropout) -> None:
        super().__init__()
        self.cross_attn = MultiheadAttention(dim=dim, heads=heads, attn_dropout=attn_dropout)
        self.ff = feed_forward(dim=dim, hidden=ff_dim, dropout=dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.cross_attn(x, memory)))
        return self.norm2(x + self.drop(self.ff(x)))


class GridAttention(nn.Module):
    """Fixed-image tokens of a (B, C, h, w) feature grid attend to the moving image's.

    ``mode``: ``cross`` (cross-attention + feed-forward), ``self+cross`` (AiR's decoder
    layer: self-attention over the fixed tokens, then cross-attention to the moving ones) or
    ``air`` (AiR's whole Transformer: an encoder layer over the moving tokens first). One
    learned position table for both images, resized (bicubic) for grids of another size.
    """

    def __init__(
        self, *, mode: str, grid: tuple[int, int], dim: int, heads: int, depth: int, **kw
    ) -> None:
        super().__init__()
        self.mode = mode
        self.pos = nn.Parameter(torch.randn(1, dim, *grid) * 0.02)  # (1, C, h, w)
        if mode == "air":
            self.transformer = Transformer(dim=dim, depth=depth, heads=heads, **kw)
        else:
            layer = CrossLayer if mode == "cross" else DecoderLayer
            self.layers = nn.ModuleList(layer(dim=dim, heads=heads, **kw) for _ in range(depth))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        h, w = fixed.shape[-2:]
        pos = self.pos
        if pos.shape[-2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        f, m = (rearrange(x + pos, "b c h w -> b (h w) c") for x in (fixed, moving))  # (B, N, C)
        if self.mode == "air":
            f = self.transformer(m, f)  # encoder over moving, decoder (queries) over fixed
        else:
            for layer in self.layers:
                f = layer(f, m)
        return rearrange(f, "b (h w) c -> b c h w", h=h)


class AiRUNet(nn.Module):
    """Shared conv encoder -> AiR attention at ``scales`` -> conv decoder -> velocity -> flow.

    ``channels``: encoder channels per level (level ``i`` at 1/2**i of the image; each image
    gets them, so the skips carry twice as many); ``decoder_channels``: the decoder's, per
    level, finest first. ``scales``: the downsampling factors (powers of two, up to
    2**(len(channels) - 1)) at which the fixed tokens attend to the moving ones (ignored with
    ``attention: none``); the attention dimension there is that level's channels.
    ``attention``: ``none`` (a plain conv UNet, the ablation's "no attention" row),
    ``cross``, ``self+cross`` or ``air`` (see ``GridAttention``). ``decoder``: ``conv``
    (upsampling convs with skips, full-resolution head) or ``interpolate`` (a head at the
    coarsest level, upsampled bicubically: MAPT's coarse field, for the ablation). Inputs are
    padded (``padding`` mode) to a multiple of 2**(len(channels) - 1) and the velocity is
    cropped back before integration.
    """

    def __init__(
        self,
        *,
        image_size: int | Sequence[int] = 28,
        channels: Sequence[int] = (8, 16, 32),
        decoder_channels: Sequence[int] = (16, 16, 32),
        attention: str = "self+cross",
        scales: Sequence[int] = (4,),
        decoder: str = "conv",
        heads: int = 4,
        depth: int = 1,
        ff_mult: int = 2,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        integration_steps: int = 5,
        flow_init: float = 1e-5,
        padding: str = "replicate",
    ) -> None:
        super().__init__()
        channels, dec = [int(c) for c in channels], [int(c) for c in decoder_channels]
        levels = len(channels) - 1
        if not channels or min(channels) < 1 or len(dec) != len(channels) or min(dec) < 1:
            raise ConfigError(
                f"model.net.channels and decoder_channels need one positive int per level "
                f"(the same number of levels), got {channels} and {dec}"
            )
        if attention not in ATTENTIONS:
            raise ConfigError(
                f"model.net.attention must be one of {ATTENTIONS}, got {attention!r}"
            )
        if decoder not in DECODERS:
            raise ConfigError(f"model.net.decoder must be one of {DECODERS}, got {decoder!r}")
        if padding not in PADDINGS:
            raise ConfigError(f"model.net.padding must be one of {PADDINGS}, got {padding!r}")
        if isinstance(integration_steps, bool) or not isinstance(integration_steps, int):
            raise ConfigError(f"integration_steps must be an int, got {integration_steps!r}")
        if integration_steps < 0:
            raise ConfigError(f"integration_steps must be >= 0, got {integration_steps}")
        valid = [2**i for i in range(levels + 1)] if decoder == "conv" else [2**levels]
        scales = sorted({int(s) for s in scales}) if attention != "none" else []
        if any(s not in valid for s in scales):
            raise ConfigError(
                f"model.net.scales {scales} must be among {valid} (powers of two up to "
                f"2**(len(channels) - 1); the interpolate decoder uses the coarsest only)"
            )
        dims = [channels[s.bit_length() - 1] for s in scales]  # attention dims: level channels
        if any(c % heads for c in dims):
            raise ConfigError(
                f"the channels at scales {scales} ({dims}) must be divisible by heads {heads}"
            )
        self.image_size = as_size(image_size)  # the contract (models/contract.py)
        self.integration_steps = integration_steps
        self.multiple, self.padding, self.decoder = 2**levels, padding, decoder
        self.encoder = nn.ModuleList([conv_block(1, channels[0])])
        for c_in, c_out in zip(channels, channels[1:], strict=False):
            self.encoder.append(
                nn.Sequential(conv_block(c_in, c_out, 2), conv_block(c_out, c_out))
            )
        grid = [-(-n // self.multiple) * self.multiple for n in self.image_size]  # padded
        self.attend = nn.ModuleDict()  # keyed by scale: "4" runs on the 1/4 features
        for s in scales:
            c = channels[s.bit_length() - 1]
            self.attend[str(s)] = GridAttention(
                mode=attention,
                grid=(grid[0] // s, grid[1] // s),
                dim=c,
                heads=heads,
                depth=depth,
                ff_dim=ff_mult * c,
                dropout=dropout,
                attn_dropout=attn_dropout,
            )
        # decoder level i takes the upsampled level i+1 and both images' features at level i
        self.up = nn.ModuleList([conv_block(2 * channels[-1], dec[-1])])
        if decoder == "conv":
            for i in reversed(range(levels)):
                self.up.append(conv_block(dec[i + 1] + 2 * channels[i], dec[i]))
        self.head = nn.Conv2d(self.up[-1][0].out_channels, 2, 3, padding=1)  # velocity (dy, dx)
        nn.init.normal_(self.head.weight, std=flow_init)  # start near the identity
        nn.init.zeros_(self.head.bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        b, h, w = fixed.shape[0], *fixed.shape[-2:]
        # (2B, 1, H', W'): one encoder pass for both images, padded to the multiple
        x, pads = pad_to_multiple(torch.cat([fixed, moving]), self.multiple, self.padding)
        padded = tuple(x.shape[-2:])
        skips = []  # per level, finest first: (fixed, moving) features, each (B, C_i, ...)
        for i, stage in enumerate(self.encoder):
            x = stage(x)  # (2B, C_i, H / 2**i, W / 2**i)
            f, m = x[:b], x[b:]
            if str(2**i) in self.attend:
                f = self.attend[str(2**i)](f, m)  # fixed features that have seen the moving
            skips.append((f, m))
        y = self.up[0](torch.cat(skips[-1], dim=1))
        for block, (f, m) in zip(self.up[1:], reversed(skips[:-1]), strict=False):
            y = F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, f, m], dim=1))
        velocity = self.head(y)  # (B, 2, H', W') in pixels
        if self.decoder == "interpolate":
            size = padded  # the padded size
            velocity = F.interpolate(velocity, size=size, mode="bicubic", align_corners=False)
        velocity = crop(velocity, pads, (h, w))
        if self.integration_steps:
            return integrate_velocity(velocity, self.integration_steps)
        return velocity
