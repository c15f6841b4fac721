"""``FastDropout`` (``speed.dropout=fast``): the paper's dropout, cheaper to draw on CPU.

Each element is kept with probability 1 - p' and scaled by 1 / (1 - p), where p' is p rounded
to a multiple of 2^-16 (exact for the paper's 0.5; 0.1 -> 0.1000061): the distribution of
``nn.Dropout`` up to that rounding, the same eval output, another random stream (so seeded
runs change). On CPU ``bernoulli_`` draws and converts one random number per element,
serially, and the mask is then converted and multiplied in further passes: at the paper's
sizes ``bernoulli_`` alone is 30 % of an AiR training step (``experiments/benchmark.py``, profile).

- With air-reg's CPU kernels (``csrc/dropout.cpp``, float32, eager mode): one pass per call,
  the mask a pure function of (seed, element index) (SplitMix64), the seed one draw from
  torch's generator (so ``seed_everything`` repeats runs, on any number of threads). No mask
  is stored: the backward regenerates it. The feed-forward's ReLU is applied in the same pass
  (``relu=True``), and its backward needs only the output.
- Otherwise (no compiler, other dtypes such as bf16 autocast, ``torch.compile``): masks from
  16-bit random integers, one 64-bit draw per four elements (another stream again).
- CUDA and other devices: PyTorch's dropout (fused on CUDA).

``air_reg.speed.accelerate`` puts ``FastDropout`` in place of the models' ``nn.Dropout``; where
a model has ``nn.ReLU`` then ``nn.Dropout`` in an ``nn.Sequential`` (the feed-forward), the
pair becomes ``nn.Identity`` then ``FastDropout(relu=True)``: the same function.

Earlier versions drew the CPU masks with ``rand_like``, then from the 16-bit integers alone:
the same distribution, other streams.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from air_reg.speed import kernels

_MIN_SHARE = 1 << 15  # elements per thread below which more threads cost more than they save


def _levels(p: float) -> int:
    """p as a multiple of 2^-16: an element is dropped when its 16 random bits are below this."""
    return round(p * 2**16)


def _in_shares(n: int, call) -> None:
    """``call(threads, t0, t1)`` over n elements, on up to torch's number of threads."""
    threads = max(1, min(torch.get_num_threads(), n // _MIN_SHARE))
    kernels.run_shares(lambda t0, t1: call(threads, t0, t1), threads)


def _dropout_into(out: torch.Tensor, x: torch.Tensor, seed: int, p: float, relu: bool) -> None:
    """out = mask(seed) * x / (1 - p) (``relu``: of max(x, 0)); contiguous float32 tensors."""
    n, fn = x.numel(), kernels.library().air_dropout
    args = (x.data_ptr(), out.data_ptr(), n, seed, _levels(p), 1 / (1 - p), int(relu))
    _in_shares(n, lambda *share: fn(*args, *share))


def _relu_dropout_grad_into(dx: torch.Tensor, y: torch.Tensor, dy: torch.Tensor, p: float):
    """dx = dy / (1 - p) where the output y > 0, else 0."""
    n, fn = y.numel(), kernels.library().air_relu_dropout_bwd
    args = (y.data_ptr(), dy.data_ptr(), dx.data_ptr(), n, 1 / (1 - p))
    _in_shares(n, lambda *share: fn(*args, *share))


class _KernelDropout(torch.autograd.Function):
    """Dropout (``relu``: of max(x, 0)) with csrc/dropout.cpp; the mask is never stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, relu: bool) -> torch.Tensor:
        x = x.detach().contiguous()  # a name keeps a copy alive: the kernel gets raw pointers
        y = torch.empty_like(x)
        seed = int(torch.empty((), dtype=torch.int64).random_())  # torch's generator: seeded
        _dropout_into(y, x, seed, p, relu)
        if relu:
            ctx.save_for_backward(y)
        ctx.seed, ctx.p, ctx.relu = seed, p, relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dx = torch.empty_like(grad)
        if ctx.relu:  # d/dx = mask / (1 - p) where x > 0, i.e. where the output is > 0
            _relu_dropout_grad_into(dx, *ctx.saved_tensors, grad, ctx.p)
        else:  # the same mask (same seed) applied to the gradient
            _dropout_into(dx, grad, ctx.seed, ctx.p, relu=False)
        return dx, None, None


def _int16_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
    bits = words.random_(-(2**63), None).view(torch.int16)[:n].view(x.shape)  # uniform
    keep = bits >= _levels(p) - 2**15  # True with probability 1 - p'
    return x * keep.to(x.dtype).mul_(1 / (1 - p))


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether ``FastDropout`` runs csrc/dropout.cpp on ``x`` (CPU float32, eager, built)."""
    return kernels.why_not(x) is None and kernels.available()


class FastDropout(nn.Dropout):
    """Inverted dropout with cheap masks (module docstring); ``relu=True`` applies a ReLU first."""

    def __init__(self, p: float = 0.5, *, relu: bool = False) -> None:
        super().__init__(p)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and uses_kernel(x):
            kernels.count("dropout", "kernel")
            return _KernelDropout.apply(x, self.p, self.relu)
        x = F.relu(x) if self.relu else x
        if not self.training or self.p == 0 or x.device.type != "cpu":
            if self.training and self.p:
                kernels.count("dropout", "torch")
            return F.dropout(x, self.p, self.training)
        kernels.count("dropout", "int16 masks")
        if self.p == 1:
            return x * 0
        return _int16_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}"
