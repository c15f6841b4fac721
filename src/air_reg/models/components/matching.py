"""Attention as matching (GMFlow, Xu et al. 2022): the flow is read from softmax weights.

A fixed-image feature attends to moving-image features; the attention-weighted mean of the
candidates' coordinates, minus the query's own, is its displacement. ``global_match`` takes
every moving position as a candidate (chunked over query rows so memory stays bounded),
``local_match`` the (2r+1)^2 window (volumes: (2r+1)^3) around the query. ``MatchingLayer``
is GMFlow's Transformer block (self-attention in each image, cross-attention to the other
with shared weights) and ``FlowPropagation`` its self-attention smoothing of the coarse flow.
Features are (B, C, h, w) or (B, C, d, h, w), flows (B, 2, h, w) or (B, 3, d, h, w): one
code path for both.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from air_reg.errors import ConfigError
from air_reg.models.components.attention import MultiheadAttention, feed_forward
from air_reg.models.components.spatial_transformer import identity_grid


def sine_position_encoding(dim: int, size: tuple[int, ...], device=None) -> torch.Tensor:
    """DETR/GMFlow's sine encoding (1, dim, *size) of pixel indices, (H, W) or (D, H, W):
    2 * (dim // (2 * ndim)) channels per axis (2-D: dim/2 for rows, dim/2 for columns),
    interleaved sin/cos at geometric frequencies, zeros in any channels left over (3-D)."""
    n = len(size)
    if n == 2 and dim % 4:
        raise ConfigError(f"the sine position encoding needs a dim divisible by 4, got {dim}")
    quarter = dim // (2 * n)  # frequencies per axis
    if quarter < 1:
        raise ConfigError(f"the {n}-D sine position encoding needs a dim >= {2 * n}, got {dim}")
    freq = 10000.0 ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    grid = identity_grid(size, device=device, dtype=torch.float32) + 1  # (n, *size)
    parts = []
    for axis in grid:
        angle = axis[None] * freq.view(-1, *(1,) * n)  # (quarter, *size)
        parts.append(torch.stack([angle.sin(), angle.cos()], 1).flatten(0, 1))  # (2 quarter, ...)
    left = dim - 2 * n * quarter  # 3-D: dim = 64 leaves 4 channels
    if left:
        parts.append(grid.new_zeros(left, *size))
    return torch.cat(parts)[None]


# soft_attend without gradients on CPU: at most this many scores a chunk (8 MB). A pass of
# AiR-Match at 512 x 512 (4,096 tokens at 1/8: 16.7 M scores a matrix, 67 MB, beyond the
# caches) 1.33x faster, 384 x 384 and 768 x 768 1.23x; up to 1,448 tokens (e.g. 256 x 256: one
# chunk) nothing changes (experiments/cascade_speed.py --tables large)
INFER_SCORES = 2**21


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1) @ v


def soft_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale, max_tokens: int | None = None
) -> torch.Tensor:
    """``softmax(q k^T * scale) v``: (B, N, D), (B, M, D), (B, M, E) -> (B, N, E).

    Above ``max_tokens**2`` scores per batch element the query rows go in chunks of at most
    that many scores (recomputed in the backward pass, ``checkpoint``), so memory stays that
    of a ``max_tokens`` x ``max_tokens`` matrix at any size. Without gradients on CPU the
    chunks hold at most ``INFER_SCORES``, so each chunk's scores stay in the caches from the
    product through the softmax to the weighted sum (the same numbers, row by row). ``scale``
    may be a tensor.
    """
    n, m = q.shape[1], k.shape[1]
    grad = torch.is_grad_enabled()
    limit = None if max_tokens is None else max_tokens**2
    if not grad and q.device.type == "cpu":
        limit = INFER_SCORES if limit is None else min(limit, INFER_SCORES)
    rows = n if limit is None else max(1, limit // m)
    if rows >= n:
        return _attend(q, k, v, scale)
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
    """Flow (B, n, *grid) in grid pixels from features (B, C, *grid), grid (h, w) or
    (d, h, w): each fixed position's softmax over ALL moving positions, read as the mean
    candidate coordinate minus its own.

    ``score``: ``dot`` (``f . m``, GMFlow's) or ``l2`` (``-|f - m|^2 / 2``: the same up to a
    per-key ``-|m|^2 / 2``, so that an identical feature always scores highest), times
    ``scale``; ``prior``: minus ``prior * |d|^2 / 2`` for a displacement d (a Gaussian prior
    on it: ties, as in a flat region, resolve to zero). Both may be tensors."""
    b, grid = fixed.shape[0], tuple(fixed.shape[2:])
    coords = identity_grid(grid, device=fixed.device, dtype=fixed.dtype).flatten(1).T  # (N, n)
    coords = coords - coords.mean(0)  # centred: smaller prior terms, the same softmax
    q, k = (x.flatten(2).transpose(1, 2) for x in (fixed, moving))  # (B, N, C)
    # extra channels, so the chunked attention needs no bias: q' . k' = scale * (q . k -
    # [l2] |k|^2 / 2) - prior * (|p_k|^2 / 2 - p_q . p_k), the same softmax as the scores above
    ones = q.new_ones(*q.shape[:2], 1)  # (B, N, 1)
    pos = coords.expand(b, -1, -1)  # (B, N, n)
    q_extra, k_extra = [q * scale], [k]
    if score == "l2":
        q_extra.append(ones * (-0.5 * scale))
        k_extra.append(k.square().sum(-1, keepdim=True))
    if isinstance(prior, torch.Tensor) or prior:
        q_extra += [pos * prior, ones * (-0.5 * prior)]
        k_extra += [pos, pos.square().sum(-1, keepdim=True)]
    q, k = torch.cat(q_extra, dim=-1), torch.cat(k_extra, dim=-1)
    target = soft_attend(q, k, pos, scale=1.0, max_tokens=max_tokens)
    return (target - coords).transpose(1, 2).reshape(b, len(grid), *grid)


LOCAL_SCORES = 2**25  # local_match: at most about this many scores at once (128 MB a copy)


def local_match(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    radius: int,
    scale,
    score: str = "l2",
    prior=0.0,
    max_scores: int = LOCAL_SCORES,
) -> torch.Tensor:
    """Flow (B, n, *grid) in grid pixels from features (B, C, *grid), grid (h, w) or
    (d, h, w): each fixed position's softmax over the (2r+1)^n moving positions around it
    (replicate-padded), read as the weighted mean offset; ``score``, ``scale`` and ``prior``
    as in ``global_match``.

    The scores are (B, *grid, (2r+1)^n): above ``max_scores`` of them the grid goes in slabs
    along its first axis (recomputed in the backward pass, ``checkpoint``), each slab the same
    computation on its rows, so memory stays that of ``max_scores`` (a 2 mm brain volume at
    full resolution with r = 3: 411 M scores, 1.6 GB a copy, unchunked)."""
    grid = tuple(fixed.shape[2:])
    n, k = len(grid), 2 * radius + 1
    padded = F.pad(moving, (radius,) * (2 * n), mode="replicate")  # (B, C, *(grid + 2r))
    kw = {"radius": radius, "scale": scale, "score": score, "prior": prior}
    per_row = fixed.shape[0] * math.prod(grid[1:]) * k**n  # scores per row of the first axis
    rows = max(1, max_scores // per_row)
    if rows >= grid[0]:
        return _local_scores(fixed, padded, **kw)
    grad = torch.is_grad_enabled()
    out = []
    for r0 in range(0, grid[0], rows):
        r1 = min(r0 + rows, grid[0])
        args = (fixed[:, :, r0:r1], padded[:, :, r0 : r1 + 2 * radius])
        if grad:
            out.append(checkpoint(_local_scores, *args, use_reentrant=False, **kw))
        else:
            out.append(_local_scores(*args, **kw))
    return torch.cat(out, dim=2)


class LocalMatch(nn.Module):
    """``local_match`` as a module (no parameters), so that ``air_reg.speed.accelerate`` can
    put its CPU kernel in its place for inference (``speed.local_match``): the same maths."""

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, **kw) -> torch.Tensor:
        return local_match(fixed, moving, **kw)


def _local_scores(fixed: torch.Tensor, padded: torch.Tensor, *, radius, scale, score, prior):
    """``local_match`` on features (B, C, *grid) and the moving ones padded by ``radius``."""
    grid = tuple(fixed.shape[2:])
    n, k = len(grid), 2 * radius + 1
    # channels last, one shifted product per offset: the sums run over contiguous memory,
    # and there is no (B, C, K, *grid) copy as F.unfold would make
    last = (0, *range(2, n + 2), 1)
    padded, fixed = (x.permute(*last).contiguous() for x in (padded, fixed))
    windows = [  # one (slice per axis) window per offset, row-major
        (slice(None), *(slice(o, o + g) for o, g in zip(offset, grid, strict=True)))
        for offset in itertools.product(range(k), repeat=n)
    ]
    half = padded.square().sum(-1) * 0.5 if score == "l2" else None  # (B, *(grid + 2r))
    if torch.is_grad_enabled() and (fixed.requires_grad or padded.requires_grad):
        scores = torch.stack([(fixed * padded[win]).sum(-1) for win in windows], dim=-1)
        if half is not None:  # -|f - m|^2 / 2 = f . m - |m|^2 / 2 - |f|^2 / 2 (the last: none)
            scores = scores - torch.stack([half[win] for win in windows], dim=-1)
    else:  # the same numbers through one product buffer and one (K, B, *grid) block: no
        # churn of K small tensors (glibc's heap kept GBs of them resident on volumes)
        planes = fixed.new_empty(len(windows), *fixed.shape[:-1])
        product = torch.empty_like(fixed)
        for plane, win in zip(planes, windows, strict=True):
            torch.sum(torch.mul(fixed, padded[win], out=product), -1, out=plane)
            if half is not None:
                plane.sub_(half[win])
        scores = planes.movedim(0, -1).contiguous()  # (B, *grid, K)
    offsets = identity_grid((k,) * n, device=fixed.device, dtype=fixed.dtype).flatten(1) - radius
    scores = scores * scale - prior * 0.5 * offsets.square().sum(0)  # (B, *grid, K)
    weights = torch.softmax(scores, dim=-1)  # offsets row-major
    axes = "dhw"[-n:]  # 2-D: "bhwk,ck->bchw"
    return torch.einsum(f"b{axes}k,ck->bc{axes}", weights, offsets)  # (B, n, *grid)


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
        # tokens: (B, N, C) fixed features, flow: (B, n, *grid) with N = prod(grid)
        q, k = self.q_proj(tokens), self.k_proj(tokens)
        values = flow.flatten(2).transpose(1, 2)  # (B, N, n)
        scale = 1 / math.sqrt(tokens.shape[-1])
        out = soft_attend(q, k, values, scale=scale, max_tokens=max_tokens)
        return out.transpose(1, 2).reshape(flow.shape)
