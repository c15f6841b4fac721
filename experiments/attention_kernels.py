"""The attention kernels alone: PyTorch's SDPA, air-reg's small-head kernel, and by hand.

    python experiments/attention_kernels.py      # ~1 minute on 2 cores

Forward + backward of one attention call at AiR-single's shape (batch 64, 196 tokens), for
SDPA's fused kernel, air-reg's CPU kernel (``speed.attention=kernel``, speed/attention.py) and
attention written by hand (``softmax(QK^T / sqrt(d)) V``, the materialised path), at several
(heads, head size) splits. Writes experiments/results/benchmark/attention_kernels.md.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmark.py; before torch starts

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

from air_reg.speed import attention as cpu_attention  # noqa: E402
from air_reg.speed import kernels  # noqa: E402
from air_reg.utils import write_text  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "experiments/results/benchmark/attention_kernels.md"
BATCH, TOKENS, REPEATS, CALLS = 64, 196, 5, 10


def by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def air_reg_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The kernel on (B, N, h * d) projections, as MultiheadAttention calls it."""
    h = q.shape[1]
    q, k, v = (rearrange(t, "b h n e -> b n (h e)") for t in (q, k, v))
    return cpu_attention.attention(q, k, v, h)


def inputs(fn, heads: int, size: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, heads, TOKENS, size, generator=g) for _ in range(3))
    if fn is air_reg_kernel:  # the layout it reads, made outside the timed calls
        q, k, v = (rearrange(t, "b h n e -> b n h e").contiguous() for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return tuple(t.requires_grad_(True) for t in (q, k, v))


def ms_per_call(fns: dict, heads: int, size: int) -> dict[str, float]:
    """Median over interleaved rounds of the mean forward + backward time of one call, in ms."""
    args = {name: inputs(fn, heads, size) for name, fn in fns.items()}
    for name, fn in fns.items():
        fn(*args[name]).sum().backward()  # warm-up
    rounds = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                fn(*args[name]).sum().backward()
            rounds[name].append((time.perf_counter() - start) / CALLS * 1e3)
    return {name: statistics.median(r) for name, r in rounds.items()}


def main() -> None:
    rows = [
        "| heads x head size | scores per call | SDPA (fused) ms | air-reg kernel ms | "
        "by hand ms | SDPA ÷ air-reg | by hand ÷ SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    fns = {"sdpa": F.scaled_dot_product_attention, "by hand": by_hand}
    if kernels.available():
        fns["air-reg"] = air_reg_kernel
    for heads, size in ((4, 4), (4, 16), (2, 8), (1, 16)):
        ms = ms_per_call(fns, heads, size)
        fused, manual, kernel = ms["sdpa"], ms["by hand"], ms.get("air-reg", float("nan"))
        scores = BATCH * heads * TOKENS**2
        rows.append(
            f"| {heads} x {size} | {scores / 1e6:.1f} M | {fused:.1f} | {kernel:.1f} | "
            f"{manual:.1f} | {fused / kernel:.1f}x | {manual / fused:.1f}x |"
        )
    text = (
        "# Attention kernels alone\n\n"
        f"`python experiments/attention_kernels.py`: forward + backward of one call, batch "
        f"{BATCH}, {TOKENS} tokens (AiR-single, patch 2), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; medians of "
        f"{REPEATS} interleaved rounds of {CALLS} calls. The paper's config is 4 heads x 4. "
        "air-reg's kernel reads (B, N, heads x size) projections (the layout "
        "MultiheadAttention has); `nan`: it could not be built here. `speed.attention=auto` uses "
        "it for head sizes up to 8. "
        "\n\n" + "\n".join(rows) + "\n"
    )
    write_text(OUT, text)
    print(text)


if __name__ == "__main__":
    main()
