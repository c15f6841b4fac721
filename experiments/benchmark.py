"""Speed and memory of our AiR/MAPT against the naive ``nn.Transformer`` reference, in one run.

    python experiments/benchmark.py --quick   # about a minute: small batches, fewer sizes
    python experiments/benchmark.py           # the full run: <= ~10 minutes on 2 CPU cores

Every comparison is measured in the same run, interleaved, as the median of several repeats;
peak memory is measured in a fresh child process per configuration (``air_reg.bench.speed``
holds the machinery and says how). The run restarts itself with OMP_WAIT_POLICY=PASSIVE unless
that is set (or --omp-default): libgomp's default spin-waiting turns 2-thread timings on a
loaded 2-core machine into a measure of the other users' load (section 5 shows by how much).
Writes benchmark.md, one CSV per section and benchmark.png to
experiments/results/benchmark/<full|quick|smoke>/ (or --out DIR).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from air_reg.bench.speed import run

RESULTS = Path(__file__).resolve().parent / "results" / "benchmark"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute")
    parser.add_argument("--smoke", action="store_true", help="seconds; for the tests")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument(
        "--omp-default", action="store_true", help="keep libgomp's default OMP_WAIT_POLICY"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    run(name, args.out or RESULTS / name)


if __name__ == "__main__":
    if "--omp-default" not in sys.argv and "OMP_WAIT_POLICY" not in os.environ:
        # libgomp reads the policy when torch loads it: restart with it set (children inherit)
        env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
