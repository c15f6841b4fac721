"""GPU throughput (pairs/s) of AiR-single and MAPT training and batched inference.

    python experiments/gpu_throughput.py      # ~1 minute on an H100; writes OUT (below)
    python experiments/gpu_throughput.py --device cpu --batches 4 --infer-batches 8 --steps 1 \
        --repeats 1                                                   # smoke test, any machine

The models are benchmark.py's (``benchmark_jobs.air``/``mapt``/``build``: the paper's
Transformer, seeded weights). A training step is forward, warp, MSE, backward and Adam, as
``benchmark_jobs.train_job``, but with the data on the device. Each timed call runs ``--steps``
steps and ends with ``torch.cuda.synchronize()``; all calls are interleaved after a warm-up
(``benchmark_jobs.interleave``) and the median round counts. Float32 runs keep PyTorch's
defaults (no TF32 in matmuls, TF32 in cuDNN convolutions).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark_jobs import VARIANTS, air, build, infer_job, interleave, mapt, timing_row, train_job

from air_reg.utils import write_text

log = logging.getLogger("gpu_throughput")
OUT = Path(__file__).resolve().parents[1] / "experiments/results/benchmark/gpu_throughput.md"
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


def measure(args) -> tuple[list[str], list[list[str]]]:
    columns = [f"train b{b}" for b in args.batches] + [f"infer b{b}" for b in args.infer_batches]
    jobs, pairs = {}, {}
    for label, (spec, bf16) in ROWS.items():
        train_net, infer_net = build(spec).to(args.device), build(spec).to(args.device)
        for b in args.batches:
            step = train_job(train_net, b, bf16=bf16, device=args.device)
            jobs[label, f"train b{b}"], pairs[label, f"train b{b}"] = step, b
        for b in args.infer_batches:
            step = infer_job(infer_net, b, bf16=bf16, device=args.device)
            jobs[label, f"infer b{b}"], pairs[label, f"infer b{b}"] = step, b
    timed = {k: synced(step, args.steps, args.device) for k, step in jobs.items()}
    start = time.perf_counter()
    times = interleave(timed, args.repeats, args.warmup)
    log.info("timed %d jobs in %.0f s", len(jobs), time.perf_counter() - start)
    header = ["model", *(f"{c} pairs/s" for c in columns), "spread % (max)"]
    big = f"train b{max(args.batches)}"
    if args.device == "cuda":
        header.append(f"peak MiB, {big}")
    rows = []
    for label in ROWS:
        stats = [timing_row(times[label, c], args.steps * pairs[label, c]) for c in columns]
        row = [label, *(f"{s['pairs/s']:,.0f}" for s in stats)]
        row.append(f"{max(s['spread %'] for s in stats):.0f}")
        if args.device == "cuda":
            row.append(f"{peak_mib(jobs[label, big]):,.0f}")
        rows.append(row)
    return header, rows


def report(args, header: list[str], rows: list[list[str]]) -> str:
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        cpu = platform.processor() or platform.machine()
        device = f"CPU ({cpu}), {torch.get_num_threads()} threads"
    lines = [
        "# GPU throughput: AiR-single and MAPT",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {device}; torch {torch.__version__}. "
        f"Each cell: median over {args.repeats} interleaved rounds (after {args.warmup} warm-up) "
        f"of {args.steps} steps; a training step is forward + warp + MSE + backward + Adam; "
        "inference is forward + warp without gradients. 28x28 pairs, the paper's Transformer "
        "(dim 16, 4 heads, depth 1, dropout 0.5, no attention dropout), SDPA attention.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--infer-batches", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each job first")
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu for a smoke run")
    text = report(args, *measure(args))
    write_text(args.out, text)
    log.info("wrote %s\n%s", args.out, text)


if __name__ == "__main__":
    main()
