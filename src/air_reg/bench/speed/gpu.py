"""GPU throughput (pairs/s) of AiR-single and MAPT training and batched inference.

The models are the CPU benchmark's (``models.air``/``mapt``/``build``: the paper's Transformer,
seeded weights). A training step is ``timing.train_job`` with the data on the device. Each
timed call runs ``steps`` steps and ends with ``torch.cuda.synchronize()``; all calls are
interleaved after a warm-up (``timing.interleave``) and the median round counts. Float32 runs
keep PyTorch's defaults (no TF32 in matmuls, TF32 in cuDNN convolutions).
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable

import torch

from .models import VARIANTS, air, build, mapt
from .timing import infer_job, interleave, timing_row, train_job

log = logging.getLogger(__name__)
OURS = VARIANTS["ours"]  # SDPA attention (the CPU kernel is CPU-only), no attention dropout
ROWS = {  # label -> (spec, bf16 autocast)
    "AiR-single p2": (air(**OURS), False),
    "AiR-single p2, bf16 autocast": (air(**OURS), True),
    "AiR-single p2, naive nn.Transformer": (air(**VARIANTS["naive, matched widths"]), False),
    "MAPT [2,4,7]": (mapt(**OURS), False),
    "MAPT [2,4,7], bf16 autocast": (mapt(**OURS), True),
    "DIRNet": ({"arch": "DIRNet", "image_size": 28}, False),
}


def synced(step: Callable[[], None], steps: int, device: str) -> Callable[[], None]:
    """``steps`` calls of ``step``, then wait for the GPU: one timed call."""

    def run() -> None:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def peak_mib(step: Callable[[], None]) -> float:
    """Peak GPU memory of one call above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(
    *,
    device: str = "cuda",
    batches: tuple[int, ...] = (64, 512),
    infer_batches: tuple[int, ...] = (512, 4096),
    steps: int = 10,
    repeats: int = 5,
    warmup: int = 2,
    rows: dict[str, tuple[dict, bool]] = ROWS,
) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: pairs/s of every row (label -> (spec, bf16)) at every
    batch."""
    columns = [f"train b{b}" for b in batches] + [f"infer b{b}" for b in infer_batches]
    jobs, pairs = {}, {}
    for label, (spec, bf16) in rows.items():
        train_net, infer_net = build(spec).to(device), build(spec).to(device)
        for b in batches:
            jobs[label, f"train b{b}"] = train_job(train_net, b, bf16=bf16, device=device)
            pairs[label, f"train b{b}"] = b
        for b in infer_batches:
            jobs[label, f"infer b{b}"] = infer_job(infer_net, b, bf16=bf16, device=device)
            pairs[label, f"infer b{b}"] = b
    timed = {k: synced(step, steps, device) for k, step in jobs.items()}
    start = time.perf_counter()
    times = interleave(timed, repeats, warmup)
    log.info("timed %d jobs in %.0f s", len(jobs), time.perf_counter() - start)
    header = ["model", *(f"{c} pairs/s" for c in columns), "spread % (max)"]
    big = f"train b{max(batches)}"
    if device == "cuda":
        header.append(f"peak MiB, {big}")
    table = []
    for label in rows:
        stats = [timing_row(times[label, c], steps * pairs[label, c]) for c in columns]
        row = [label, *(f"{s['pairs/s']:,.0f}" for s in stats)]
        row.append(f"{max(s['spread %'] for s in stats):.0f}")
        if device == "cuda":
            row.append(f"{peak_mib(jobs[label, big]):,.0f}")
        table.append(row)
    return header, table


def report(
    header: list[str], rows: list[list[str]], *, device: str, steps: int, repeats: int, warmup: int
) -> str:
    """``gpu_throughput.md``: the device, the method, and the table."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        cpu = platform.processor() or platform.machine()
        where = f"CPU ({cpu}), {torch.get_num_threads()} threads"
    lines = [
        "# GPU throughput: AiR-single and MAPT",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {where}; torch {torch.__version__}. "
        f"Each cell: median over {repeats} interleaved rounds (after {warmup} warm-up) "
        f"of {steps} steps; a training step is forward + warp + MSE + backward + Adam; "
        "inference is forward + warp without gradients. 28x28 pairs, the paper's Transformer "
        "(dim 16, 4 heads, depth 1, dropout 0.5, no attention dropout), SDPA attention.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    return "\n".join(lines)
