"""air-reg's CPU attention kernel for small heads (``speed.attention`` = ``auto`` or ``kernel``).

The paper's AiR has 4 heads of size 4. PyTorch's fused CPU attention is tuned for heads of
64-128; at size 4 a training step spends most of its time there. ``csrc/small_head_attention.cpp``
computes the same exact softmax attention (no approximation; its float32 error against a
float64 reference is no larger than SDPA's) with the head size as a compile-time constant
and SIMD lanes over queries or keys, forward and backward, in O(N) memory, reading the q/k/v
projections in place. It is built with the machine's C++ compiler (see ``kernels``); without
one, ``auto`` falls back to ``F.scaled_dot_product_attention`` with one warning.
``KernelAttention`` is what ``air_reg.speed.accelerate`` puts in place of the models' plain
``ScaledDotProductAttention``: the same maths, the path chosen per call.

Scope: CPU float32 tensors, head size 1/2/4/8/16, as many keys as queries, no mask, no
attention dropout, eager mode (under ``torch.compile`` SDPA is used).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from air_reg.errors import ConfigError
from air_reg.models.components.attention import ScaledDotProductAttention
from air_reg.speed import kernels

HEAD_SIZES = (1, 2, 4, 8, 16)  # what the kernel takes (speed.attention=kernel)
AUTO_HEAD_SIZES = (1, 2, 4, 8)  # where speed.attention=auto uses it: faster than SDPA
# (experiments/attention_kernels.py at commit d20ba67, since removed; at 16 its accumulators
# no longer fit in registers)
MODES = ("auto", "kernel", "sdpa")  # the ``speed.attention`` choices


def applicable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> str | None:
    """Why (B, N, heads * d) inputs cannot go through the kernel (None when they can)."""
    if q.dim() != 3 or not q.shape == k.shape == v.shape:
        shapes = ", ".join(str(list(t.shape)) for t in (q, k, v))
        return f"q, k, v must be (B, N, heads * d) of one shape (got {shapes})"
    if q.shape[-1] % heads or q.shape[-1] // heads not in HEAD_SIZES:
        return f"head size {q.shape[-1]} / {heads} is not one of {HEAD_SIZES}"
    return kernels.why_not(q, k, v)


def auto_uses_kernel(head_size: int, dropout_p: float) -> bool:
    """Whether ``speed.attention=auto`` picks this kernel (for inputs it can take): no attention
    dropout, a head size where it beats SDPA, and it builds here."""
    return not dropout_p and head_size in AUTO_HEAD_SIZES and kernels.available()


def _launch(views, lse: torch.Tensor, heads: int, d: int, backward: bool) -> None:
    """Run the forward or backward over all (batch x head) slices on torch's threads."""
    slices, n = lse.shape
    threads = max(1, min(torch.get_num_threads(), slices))
    lib = kernels.library()
    fn = lib.air_attn_bwd if backward else lib.air_attn_fwd
    work = torch.empty(threads * lib.air_attn_work_floats(n, d, int(backward)))

    def shares(t0: int, t1: int) -> int:  # threads t0 .. t1 - 1 of `threads`
        args = (slices, n, heads, d, d**-0.5, work.data_ptr(), threads, t0, t1)
        return fn(views, lse.data_ptr(), *args)

    if any(kernels.run_shares(shares, threads)):
        raise RuntimeError(f"small-head attention kernel rejected head size {d}")


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _SmallHeadAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, heads):
        q, k, v = (_unit_stride(t.detach()) for t in (q, k, v))
        (b, n, c), d = q.shape, q.shape[-1] // heads
        out, lse = q.new_empty(b, n, c), q.new_empty(b * heads, n)
        _launch(kernels.View.array(q, k, v, out), lse, heads, d, backward=False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.heads = heads
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = _unit_stride(grad)  # a name keeps a copy alive: the views hold raw pointers
        grads = [torch.empty_like(out) for _ in range(3)]
        views = kernels.View.array(q, k, v, out, grad, *grads)
        _launch(views, lse, ctx.heads, q.shape[-1] // ctx.heads, backward=True)
        return (*grads, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` of (B, N, heads * d) tensors -> (B, N, heads * d).

    Head h uses channels h * d .. h * d + d - 1, as ``rearrange(t, "b n (h d) -> b h n d")``.
    Same result as ``F.scaled_dot_product_attention`` on those heads up to float32 rounding.
    Raises ``ValueError`` for inputs it cannot take (see ``applicable``) and
    ``KernelUnavailable`` when it cannot be built here.
    """
    why = applicable(q, k, v, heads)
    if why:
        raise ValueError(f"the small-head attention kernel cannot take these inputs: {why}")
    return apply(q, k, v, heads)


def apply(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``attention`` for inputs already found ``applicable`` (as KernelAttention does)."""
    return _SmallHeadAttention.apply(q, k, v, heads)


class KernelAttention(ScaledDotProductAttention):
    """``ScaledDotProductAttention`` that runs air-reg's kernel where it applies.

    ``mode``: ``auto`` (the kernel for CPU float32 inputs, head size up to 8, no attention
    dropout, eager mode, when it builds here; else SDPA), ``kernel`` (insists: an error where
    it cannot run) or ``sdpa`` (always SDPA). Each call is counted in ``kernels.calls()``.
    """

    def __init__(self, *, dim: int, heads: int, dropout: float = 0.0, mode: str = "auto"):
        super().__init__(dim=dim, heads=heads, dropout=dropout)
        if mode not in MODES:
            raise ConfigError(f"speed.attention must be one of {MODES}, got {mode!r}")
        if mode == "kernel" and dropout:
            raise ConfigError(
                "speed.attention=kernel has no attention dropout: set "
                "model.net.attn_dropout=0 or speed.attention=auto"
            )
        if mode == "kernel" and dim // heads not in HEAD_SIZES:
            raise ConfigError(
                f"speed.attention=kernel needs a head size (dim / heads = {dim // heads}) in "
                f"{HEAD_SIZES}; use speed.attention=auto or sdpa"
            )
        self.mode = mode

    @classmethod
    def replacing(cls, plain: ScaledDotProductAttention, mode: str) -> KernelAttention:
        return cls(dim=plain.dim, heads=plain.heads, dropout=plain.dropout, mode=mode)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if self._use_kernel(q, k, v, p):
            kernels.count("attention", "kernel")
            return apply(q, k, v, self.heads)
        kernels.count("attention", "sdpa")
        return super().forward(q, k, v)

    def _use_kernel(self, q, k, v, dropout_p: float) -> bool:
        if self.mode == "sdpa" or dropout_p:
            return False
        if self.mode == "kernel":
            why = applicable(q, k, v, self.heads)
            if why:
                raise ConfigError(f"speed.attention=kernel cannot run here: {why}; use auto")
            kernels.library()  # raises KernelUnavailable with the compiler's message
            return True
        if applicable(q, k, v, self.heads):  # first: never build for GPU inputs
            return False
        return auto_uses_kernel(q.shape[-1] // self.heads, dropout_p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"
