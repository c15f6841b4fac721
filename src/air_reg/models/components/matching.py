"""Attention as matching (GMFlow, Xu et al. 2022): the flow is read from softmax weights.

A fixed-image feature attends to moving-image features; the attention-weighted mean of the
candidates' coordinates, minus the query's own, is its displacement. ``global_match`` takes
every moving position as a candidate (chunked over query rows so memory stays bounded),
``local_match`` the (2r+1)^2 window around the query. ``MatchingLayer`` is GMFlow's
Transformer block (self-attention in each image, cross-attention to the other with shared
weights) and ``FlowPropagation`` its self-attention smoothing of the coarse flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from air_reg.errors import ConfigError
from air_reg.models.components.attention import MultiheadAttention, feed_forward
from air_reg.models.components.spatial_transformer import identity_grid


def sine_position_encoding(dim: int, size: tuple[int, int], device=None) -> torch.Tensor:
    """DETR/GMFlow's 2-D sine encoding (1, dim, H, W) of pixel indices: dim/2 channels each
    for rows and columns, interleaved sin/cos at geometric frequencies; any (H, W)."""
    if dim % 4:
        raise ConfigError(f"the sine position encoding needs a dim divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 10000.0 ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows, cols = identity_grid(size, device=device, dtype=torch.float32) + 1  # (H, W) each
    parts = []
    for axis in (rows, cols):
        angle = axis[None] * freq[:, None, None]  # (dim/4, H, W)
        parts.append(torch.stack([angle.sin(), angle.cos()], 1).flatten(0, 1))  # (dim/2, H, W)
    return torch.cat(parts)[None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1) @ v


def soft_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale, max_tokens: int | None = None
) -> torch.Tensor:
    """``softmax(q k^T * scale) v``: (B, N, D), (B, M, D), (B, M, E) -> (B, N, E).

    Above ``max_tokens**2`` scores per batch element the query rows go in chunks of at most
    that many scores (recomputed in the backward pass, ``checkpoint``), so memory stays that
    of a ``max_tokens`` x ``max_tokens`` matrix at any size. ``scale`` may be a tensor.
    """
    n, m = q.shape[1], k.shape[1]
    rows = n if max_tokens is None else max(1, max_tokens**2 // m)
    if rows >= n:
        return _attend(q, k, v, scale)
    grad = torch.is_grad_enabled()
    out = [
        checkpoint(_attend, c, k, v, scale, use_reentrant=False)
        if grad
        else _attend(c, k, v, scale)
        for c in q.split(rows, dim=1)
    ]
    return torch.cat(out, dim=1)


def global_match(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    scale,
    score: str = "l2",
    prior=0.0,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Flow (B, 2, h, w) in grid pixels from features (B, C, h, w): each fixed position's
    softmax over ALL moving positions, read as the mean candidate coordinate minus its own.

    ``score``: ``dot`` (``f . m``, GMFlow's) or ``l2`` (``-|f - m|^2 / 2``: the same up to a
    per-key ``-|m|^2 / 2``, so that an identical feature always scores highest), times
    ``scale``; ``prior``: minus ``prior * |d|^2 / 2`` for a displacement d (a Gaussian prior
    on it: ties, as in a flat region, resolve to zero). Both may be tensors."""
    b, _, h, w = fixed.shape
    coords = identity_grid((h, w), device=fixed.device, dtype=fixed.dtype).flatten(1).T  # (N, 2)
    coords = coords - coords.mean(0)  # centred: smaller prior terms, the same softmax
    q, k = (x.flatten(2).transpose(1, 2) for x in (fixed, moving))  # (B, N, C)
    # extra channels, so the chunked attention needs no bias: q' . k' = scale * (q . k -
    # [l2] |k|^2 / 2) - prior * (|p_k|^2 / 2 - p_q . p_k), the same softmax as the scores above
    ones = q.new_ones(*q.shape[:2], 1)  # (B, N, 1)
    pos = coords.expand(b, -1, -1)  # (B, N, 2)
    q_extra, k_extra = [q * scale], [k]
    if score == "l2":
        q_extra.append(ones * (-0.5 * scale))
        k_extra.append(k.square().sum(-1, keepdim=True))
    if isinstance(prior, torch.Tensor) or prior:
        q_extra += [pos * prior, ones * (-0.5 * prior)]
        k_extra += [pos, pos.square().sum(-1, keepdim=True)]
    q, k = torch.cat(q_extra, dim=-1), torch.cat(k_extra, dim=-1)
    target = soft_attend(q, k, pos, scale=1.0, max_tokens=max_tokens)
    return (target - coords).transpose(1, 2).reshape(b, 2, h, w)


def local_match(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    radius: int,
    scale,
    score: str = "l2",
    prior=0.0,
) -> torch.Tensor:
    """Flow (B, 2, h, w) in grid pixels from features (B, C, h, w): each fixed position's
    softmax over the (2r+1)^2 moving positions around it (replicate-padded), read as the
    weighted mean offset; ``score``, ``scale`` and ``prior`` as in ``global_match``."""
    h, w = fixed.shape[-2:]
    k = 2 * radius + 1
    padded = F.pad(moving, (radius,) * 4, mode="replicate")  # (B, C, h + 2r, w + 2r)
    # channels last, one shifted product per offset: the sums run over contiguous memory,
    # and there is no (B, C, K, h, w) copy as F.unfold would make
    padded, fixed = (x.permute(0, 2, 3, 1).contiguous() for x in (padded, fixed))
    windows = [(slice(i, i + h), slice(j, j + w)) for i in range(k) for j in range(k)]
    scores = torch.stack([(fixed * padded[:, r, c]).sum(-1) for r, c in windows], dim=-1)
    if score == "l2":  # -|f - m|^2 / 2 = f . m - |m|^2 / 2 - |f|^2 / 2 (the last: no matter)
        half = padded.square().sum(-1) * 0.5  # (B, h + 2r, w + 2r)
        scores = scores - torch.stack([half[:, r, c] for r, c in windows], dim=-1)
    offsets = identity_grid((k, k), device=fixed.device, dtype=fixed.dtype).flatten(1) - radius
    scores = scores * scale - prior * 0.5 * offsets.square().sum(0)  # (B, h, w, K)
    weights = torch.softmax(scores, dim=-1)  # offsets row-major
    return torch.einsum("bhwk,ck->bchw", weights, offsets)  # (B, 2, h, w)


class MatchingLayer(nn.Module):
    """GMFlow's Transformer block on (2B, N, C) tokens, fixed then moving: self-attention in
    each image, cross-attention to the other (one set of weights, both directions), then a
    feed-forward; post-norm residuals as in ``attention.py``."""

    def __init__(self, *, dim: int, heads: int, ff_dim: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim=dim, heads=heads)
        self.cross_attn = MultiheadAttention(dim=dim, heads=heads)
        self.ff = feed_forward(dim=dim, hidden=ff_dim, dropout=0.0)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x))
        other = x.roll(x.shape[0] // 2, dims=0)  # (moving, fixed): each image sees the other
        x = self.norm2(x + self.cross_attn(x, other))
        return self.norm3(x + self.ff(x))


class FlowPropagation(nn.Module):
    """GMFlow's propagation: the flow at each fixed position becomes the softmax-weighted
    mean of the flows at positions with similar fixed features (fills in textureless areas)."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        for proj in (self.q_proj, self.k_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self, tokens: torch.Tensor, flow: torch.Tensor, *, max_tokens: int | None = None
    ) -> torch.Tensor:
        b, _, h, w = flow.shape  # tokens: (B, N, C) fixed features, flow: (B, 2, h, w)
        q, k = self.q_proj(tokens), self.k_proj(tokens)
        values = flow.flatten(2).transpose(1, 2)  # (B, N, 2)
        scale = 1 / math.sqrt(tokens.shape[-1])
        out = soft_attend(q, k, values, scale=scale, max_tokens=max_tokens)
        return out.transpose(1, 2).reshape(b, 2, h, w)
