"""Why AiR training cannot get much faster on a CPU: the attention kernels, measured alone.

    python experiments/attention_kernels.py      # ~1 minute on 2 cores

Forward + backward of one attention call at AiR-single's shape (batch 64, 196 tokens), for
SDPA's fused kernel and attention written by hand (``softmax(QK^T / sqrt(d)) V``, the
materialised path), at several (heads, head size) splits. Writes
experiments/results/benchmark/attention_kernels.md.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmark.py; before torch starts

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from air_reg.utils import write_text  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "experiments/results/benchmark/attention_kernels.md"
BATCH, TOKENS, REPEATS, CALLS = 64, 196, 5, 10


def by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def ms_per_call(fn, heads: int, size: int) -> float:
    """Median over rounds of the mean forward + backward time of one call, in ms."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, heads, TOKENS, size, generator=g) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    fn(q, k, v).sum().backward()  # warm-up
    rounds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn(q, k, v).sum().backward()
        rounds.append((time.perf_counter() - start) / CALLS * 1e3)
    return statistics.median(rounds)


def main() -> None:
    rows = [
        "| heads x head size | scores per call | SDPA (fused) ms | by hand ms | by hand ÷ SDPA |",
        "|---|---|---|---|---|",
    ]
    for heads, size in ((4, 4), (4, 16), (2, 8), (1, 16)):
        fused = ms_per_call(F.scaled_dot_product_attention, heads, size)
        manual = ms_per_call(by_hand, heads, size)
        scores = BATCH * heads * TOKENS**2
        rows.append(
            f"| {heads} x {size} | {scores / 1e6:.1f} M | {fused:.1f} | {manual:.1f} | "
            f"{manual / fused:.1f}x |"
        )
    text = (
        "# Attention kernels alone\n\n"
        f"`python experiments/attention_kernels.py`: forward + backward of one call, batch "
        f"{BATCH}, {TOKENS} tokens (AiR-single, patch 2), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; medians of "
        f"{REPEATS} rounds of {CALLS} calls. The paper's config is 4 heads x 4.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    write_text(OUT, text)
    print(text)


if __name__ == "__main__":
    main()
