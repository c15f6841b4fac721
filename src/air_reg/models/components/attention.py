"""Encoder-decoder Transformer built on ``scaled_dot_product_attention``.

Same maths as ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` (post-norm, ReLU
feed-forward) with differences that matter for speed: attention goes through
``F.scaled_dot_product_attention`` (fused kernels, no materialised N x N matrix when
attention dropout is off), and attention-probability dropout is its own setting
(``attn_dropout``) instead of being tied to the residual dropout. Plain PyTorch only:
``air_reg.speed.accelerate`` may swap air-reg's CPU kernels in for the
``ScaledDotProductAttention`` and ``nn.Dropout`` modules (same function).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from air_reg.errors import ConfigError


class ScaledDotProductAttention(nn.Module):
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` of (B, N, heads * d) projections -> (B, N, D),
    with dropout on the attention probabilities while training."""

    def __init__(self, *, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim {dim} must be divisible by heads {heads}")
        self.dim, self.heads, self.dropout = dim, heads, dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, h, N, e)
        return rearrange(out, "b h n e -> b n (h e)")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dropout={self.dropout}"


class MultiheadAttention(nn.Module):
    """Self- or cross-attention; ``in_proj`` stacks (q, k, v) like ``nn.MultiheadAttention``."""

    def __init__(self, *, dim: int, heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.attend = ScaledDotProductAttention(dim=dim, heads=heads, dropout=attn_dropout)
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        if memory is None:  # self-attention: one fused projection
            q, k, v = self.in_proj(x).chunk(3, dim=-1)  # 3 x (B, N, D)
        else:  # cross-attention: queries from x, keys/values from memory
            d = x.shape[-1]
            w, b = self.in_proj.weight, self.in_proj.bias
            q = F.linear(x, w[:d], b[:d])
            k, v = F.linear(memory, w[d:], b[d:]).chunk(2, dim=-1)
        return self.out_proj(self.attend(q, k, v))


def feed_forward(*, dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
    )


class EncoderLayer(nn.Module):
    def __init__(self, *, dim, heads, ff_dim, dropout, attn_dropout) -> None:
        super().__init__()
        self.attn = MultiheadAttention(dim=dim, heads=heads, attn_dropout=attn_dropout)
        self.ff = feed_forward(dim=dim, hidden=ff_dim, dropout=dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x)))
        return self.norm2(x + self.drop(self.ff(x)))


class DecoderLayer(nn.Module):
    def __init__(self, *, dim, heads, ff_dim, dropout, attn_dropout) -> None:
        super().__init__()
        attention = partial(MultiheadAttention, dim=dim, heads=heads, attn_dropout=attn_dropout)
        self.self_attn, self.cross_attn = attention(), attention()
        self.ff = feed_forward(dim=dim, hidden=ff_dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory)))
        return self.norm3(x + self.drop(self.ff(x)))


class Transformer(nn.Module):
    """Encoder over ``src`` tokens, decoder over ``tgt`` tokens attending to the encoder memory."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        heads: int,
        ff_dim: int,
        dropout: float,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        kw = {
            "dim": dim,
            "heads": heads,
            "ff_dim": ff_dim,
            "dropout": dropout,
            "attn_dropout": attn_dropout,
        }
        self.encoder = nn.ModuleList(EncoderLayer(**kw) for _ in range(depth))
        self.decoder = nn.ModuleList(DecoderLayer(**kw) for _ in range(depth))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder:
            src = layer(src)
        for layer in self.decoder:
            tgt = layer(tgt, src)
        return tgt  # (B, N, D)


class TorchTransformer(nn.Module):
    """Naive reference: ``nn.TransformerEncoder``/``nn.TransformerDecoder``, as the authors did.

    Attention-probability dropout equals ``dropout`` (PyTorch ties them). For the equivalence
    test and the speed benchmark (``use_reference``), not for training.
    """

    def __init__(self, *, dim, depth, heads, ff_dim, dropout) -> None:
        super().__init__()
        kw = {"d_model": dim, "nhead": heads, "dim_feedforward": ff_dim, "dropout": dropout}
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(batch_first=True, **kw),
            num_layers=depth,
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(batch_first=True, **kw), num_layers=depth
        )

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.decoder(tgt, self.encoder(src))


def use_reference(net: nn.Module) -> nn.Module:
    """Replace every ``Transformer`` inside ``net`` by a ``TorchTransformer`` of the same
    shape and weights (in place; returns ``net``)."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Transformer):
                layer = child.encoder[0]
                ref = TorchTransformer(
                    dim=layer.norm1.normalized_shape[0],
                    depth=len(child.encoder),
                    heads=layer.attn.attend.heads,
                    ff_dim=layer.ff[0].out_features,
                    dropout=layer.drop.p,
                )
                load_into_torch(ref, child)
                setattr(parent, name, ref)
    return net


def _attention_pairs(ours: MultiheadAttention, ref: nn.MultiheadAttention):
    yield ours.in_proj.weight, ref.in_proj_weight
    yield ours.in_proj.bias, ref.in_proj_bias
    yield from zip(ours.out_proj.parameters(), ref.out_proj.parameters(), strict=True)


def _parameter_pairs(ours: Transformer, ref: TorchTransformer):
    """(our tensor, the reference's tensor) for every parameter of two same-shaped models."""
    mods = lambda *ms: (p for m in ms for p in m.parameters())  # noqa: E731
    for a, b in zip(ours.encoder, ref.encoder.layers, strict=True):
        yield from _attention_pairs(a.attn, b.self_attn)
        yield from zip(
            mods(a.ff[0], a.ff[3], a.norm1, a.norm2),
            mods(b.linear1, b.linear2, b.norm1, b.norm2),
            strict=True,
        )
    for a, b in zip(ours.decoder, ref.decoder.layers, strict=True):
        yield from _attention_pairs(a.self_attn, b.self_attn)
        yield from _attention_pairs(a.cross_attn, b.multihead_attn)
        yield from zip(
            mods(a.ff[0], a.ff[3], a.norm1, a.norm2, a.norm3),
            mods(b.linear1, b.linear2, b.norm1, b.norm2, b.norm3),
            strict=True,
        )


@torch.no_grad()
def load_from_torch(dst: Transformer, src: TorchTransformer) -> None:
    """Copy a ``TorchTransformer``'s weights into a ``Transformer`` of the same shape."""
    for ours, ref in _parameter_pairs(dst, src):
        ours.copy_(ref)


@torch.no_grad()
def load_into_torch(dst: TorchTransformer, src: Transformer) -> None:
    """Copy a ``Transformer``'s weights into a ``TorchTransformer`` of the same shape."""
    for ours, ref in _parameter_pairs(src, dst):
        ref.copy_(ours)
