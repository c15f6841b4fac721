"""GPU throughput (pairs/s) of AiR-single and MAPT training and batched inference.

    python experiments/gpu_throughput.py      # ~1 minute on an H100; writes --out
    python experiments/gpu_throughput.py --device cpu --batches 4 --infer-batches 8 --steps 1 \
        --repeats 1                                                   # smoke test, any machine

What is timed and how: ``air_reg.bench.speed.gpu``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from air_reg.bench.speed import gpu
from air_reg.utils import write_text

OUT = Path(__file__).resolve().parent / "results" / "benchmark" / "gpu_throughput.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--infer-batches", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each job first")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu for a smoke run")
    how = {"device": args.device, "steps": args.steps, "repeats": args.repeats}
    how["warmup"] = args.warmup
    header, rows = gpu.measure(batches=args.batches, infer_batches=args.infer_batches, **how)
    text = gpu.report(header, rows, **how)
    write_text(args.out, text)
    logging.info("wrote %s\n%s", args.out, text)


if __name__ == "__main__":
    main()
