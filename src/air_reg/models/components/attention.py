"""Encoder-decoder Transformer built on ``scaled_dot_product_attention``.

Same maths as ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` (post-norm, ReLU
feed-forward) with differences that matter for speed: attention goes through
``F.scaled_dot_product_attention`` (fused kernels, no materialised N x N matrix when
attention dropout is off) or, for small heads on CPU, air-reg's own kernel (``attn_kernel``,
see ``cpu_attention``), and attention-probability dropout is its own setting
(``attn_dropout``) instead of being tied to the residual dropout.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from air_reg.models.components import cpu_attention, kernels
from air_reg.models.components.dropout import FastDropout, make_dropout


def check_attn_kernel(kernel: str, *, dim: int, heads: int, attn_dropout: float) -> None:
    """Reject an ``attn_kernel`` setting that cannot work, naming the fix."""
    if kernel not in cpu_attention.KERNELS:
        raise ValueError(f"attn_kernel must be one of {cpu_attention.KERNELS}, got {kernel!r}")
    if kernel != "cpu":
        return
    if attn_dropout:
        raise ValueError(
            "attn_kernel=cpu has no attention dropout: set attn_dropout=0 or attn_kernel=auto"
        )
    if dim // heads not in cpu_attention.HEAD_SIZES:
        raise ValueError(
            f"attn_kernel=cpu needs a head size (dim / heads = {dim // heads}) in "
            f"{cpu_attention.HEAD_SIZES}; use attn_kernel=auto or sdpa"
        )


class MultiheadAttention(nn.Module):
    """Self- or cross-attention; ``in_proj`` stacks (q, k, v) like ``nn.MultiheadAttention``.

    ``attn_kernel``: ``sdpa`` (PyTorch's ``scaled_dot_product_attention``), ``cpu``
    (air-reg's small-head kernel, head sizes up to 16; an error where it cannot run) or
    ``auto`` (that kernel for CPU float32 inputs, head size up to 8, no attention dropout,
    when it builds here; else SDPA).
    """

    def __init__(
        self, *, dim: int, heads: int, attn_dropout: float = 0.0, attn_kernel: str = "auto"
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        check_attn_kernel(attn_kernel, dim=dim, heads=heads, attn_dropout=attn_dropout)
        self.heads, self.attn_dropout, self.attn_kernel = heads, attn_dropout, attn_kernel
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of (B, N, D) projections -> (B, N, D), before ``out_proj``."""
        p = self.attn_dropout if self.training else 0.0
        if self._use_cpu_kernel(q, k, v, p):
            return cpu_attention.apply(q, k, v, self.heads)
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, h, N, e)
        return rearrange(out, "b h n e -> b n (h e)")

    def _use_cpu_kernel(self, q, k, v, dropout_p: float) -> bool:
        if self.attn_kernel == "sdpa" or dropout_p:
            return False
        if self.attn_kernel == "cpu":
            why = cpu_attention.applicable(q, k, v, self.heads)
            if why:
                raise ValueError(f"attn_kernel=cpu cannot run here: {why}; use attn_kernel=auto")
            kernels.library()  # raises KernelUnavailable with the compiler's message
            return True
        if cpu_attention.applicable(q, k, v, self.heads):  # first: never build for GPU inputs
            return False
        return cpu_attention.auto_uses_kernel(q.shape[-1] // self.heads, dropout_p)


class FeedForward(nn.Sequential):
    def __init__(self, *, dim: int, hidden: int, dropout: float, fast: bool = False) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.ReLU(), make_dropout(dropout, fast), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear1, _, drop, linear2 = self
        if isinstance(drop, FastDropout):  # it applies the ReLU in the same pass
            return linear2(drop(linear1(x), relu=True))
        return super().forward(x)


class EncoderLayer(nn.Module):
    def __init__(
        self, *, dim, heads, ff_dim, dropout, attn_dropout, fast_dropout=False, attn_kernel="auto"
    ) -> None:
        super().__init__()
        self.attn = MultiheadAttention(
            dim=dim, heads=heads, attn_dropout=attn_dropout, attn_kernel=attn_kernel
        )
        self.ff = FeedForward(dim=dim, hidden=ff_dim, dropout=dropout, fast=fast_dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = make_dropout(dropout, fast_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x)))
        return self.norm2(x + self.drop(self.ff(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, *, dim, heads, ff_dim, dropout, attn_dropout, fast_dropout=False, attn_kernel="auto"
    ) -> None:
        super().__init__()
        attention = partial(
            MultiheadAttention,
            dim=dim,
            heads=heads,
            attn_dropout=attn_dropout,
            attn_kernel=attn_kernel,
        )
        self.self_attn, self.cross_attn = attention(), attention()
        self.ff = FeedForward(dim=dim, hidden=ff_dim, dropout=dropout, fast=fast_dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.drop = make_dropout(dropout, fast_dropout)

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
        attn_dropout: float,
        fast_dropout: bool = False,
        attn_kernel: str = "auto",
    ) -> None:
        super().__init__()
        kw = {
            "dim": dim,
            "heads": heads,
            "ff_dim": ff_dim,
            "dropout": dropout,
            "attn_dropout": attn_dropout,
            "fast_dropout": fast_dropout,
            "attn_kernel": attn_kernel,
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

    Attention-probability dropout equals ``dropout`` (PyTorch ties them). Used by the
    equivalence test and the speed benchmark, not for training by default.
    """

    def __init__(
        self,
        *,
        dim,
        depth,
        heads,
        ff_dim,
        dropout,
        attn_dropout=None,
        fast_dropout=False,
        attn_kernel="auto",
    ) -> None:
        super().__init__()
        if fast_dropout:
            raise ValueError("fast_dropout needs impl=sdpa (nn.Transformer has its own dropout)")
        if attn_kernel == "cpu":
            raise ValueError("attn_kernel=cpu needs impl=sdpa (nn.Transformer has its own)")
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


def _copy_attention(dst: MultiheadAttention, src: nn.MultiheadAttention) -> None:
    dst.in_proj.weight.copy_(src.in_proj_weight)
    dst.in_proj.bias.copy_(src.in_proj_bias)
    dst.out_proj.load_state_dict(src.out_proj.state_dict())


@torch.no_grad()
def load_from_torch(dst: Transformer, src: TorchTransformer) -> None:
    """Copy a ``TorchTransformer``'s weights into a ``Transformer`` of the same shape."""
    for ours, ref in zip(dst.encoder, src.encoder.layers, strict=True):
        _copy_attention(ours.attn, ref.self_attn)
        ours.ff[0].load_state_dict(ref.linear1.state_dict())
        ours.ff[3].load_state_dict(ref.linear2.state_dict())
        ours.norm1.load_state_dict(ref.norm1.state_dict())
        ours.norm2.load_state_dict(ref.norm2.state_dict())
    for ours, ref in zip(dst.decoder, src.decoder.layers, strict=True):
        _copy_attention(ours.self_attn, ref.self_attn)
        _copy_attention(ours.cross_attn, ref.multihead_attn)
        ours.ff[0].load_state_dict(ref.linear1.state_dict())
        ours.ff[3].load_state_dict(ref.linear2.state_dict())
        for i in (1, 2, 3):
            getattr(ours, f"norm{i}").load_state_dict(getattr(ref, f"norm{i}").state_dict())
