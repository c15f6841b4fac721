"""Speed and memory of our AiR/MAPT against the naive ``nn.Transformer`` reference, in one run.

    python experiments/benchmark.py --quick   # about a minute: small batches, fewer sizes
    python experiments/benchmark.py           # the full run: <= ~10 minutes on 2 CPU cores

The machine is shared and noisy, so every comparison is measured in the same run, interleaved
(round-robin with a rotating start, after a warm-up), as the median of several repeats; speed-ups
are medians of per-round time ratios, which pair measurements taken seconds apart. Peak memory is
the growth of the peak RSS over one training step in a fresh child process per configuration.
The run restarts itself with OMP_WAIT_POLICY=PASSIVE unless that is set (or --omp-default):
libgomp's default spin-waiting turns 2-thread timings on a loaded 2-core machine into a
measure of the other users' load (section 5 shows by how much).
Writes benchmark.md, one CSV per section and benchmark.png to
experiments/results/benchmark/<full|quick>/ (or --out DIR).

This file is the entry point (and the child processes' ``--child`` entry); the pieces live
beside it: benchmark_jobs.py (profiles, model specs, timed jobs, child processes),
benchmark_sections.py (one function per report section) and benchmark_report.py (tables,
targets, plot).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from benchmark_jobs import CHILD_TASKS, PROFILES, Profile, model_specs
from benchmark_report import csv_text, plot, report
from benchmark_sections import (
    growth_exponents,
    inference_section,
    lever_section,
    memory_section,
    profile_section,
    scaling_section,
    size_section,
    train_section,
)

from air_reg.utils import write_text

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")


def run_sections(profile: Profile) -> tuple[dict, dict, dict]:
    specs, res, loads, took = model_specs(profile), {}, {}, {}
    sections = {
        "training": lambda: train_section(profile, specs),
        "inference": lambda: inference_section(profile, specs),
        "memory": lambda: memory_section(profile, specs),
        "sizes": lambda: size_section(profile),
        "scaling": lambda: scaling_section(profile),
        "levers": lambda: lever_section(profile, naive_speedup(res["training"])),
        "profile": lambda: profile_section(profile),
    }
    for key, fn in sections.items():
        loads[key] = os.getloadavg()
        log.info("section %s (load %.2f)", key, loads[key][0])
        start = time.perf_counter()
        res[key] = fn()
        took[key] = time.perf_counter() - start
    loads["end"] = os.getloadavg()
    res["exponents"] = growth_exponents(res["scaling"])
    return res, loads, took


def naive_speedup(rows: list[dict]) -> float | None:
    row = next((r for r in rows if r["model"] == "AiR-single p2 naive, matched widths"), {})
    return row.get("ours ÷ this (time)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute")
    parser.add_argument("--smoke", action="store_true", help="seconds; for the tests")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument(
        "--omp-default", action="store_true", help="keep libgomp's default OMP_WAIT_POLICY"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:  # a fresh process: its peak RSS belongs to one configuration
        task = json.loads(args.child)
        print(json.dumps(CHILD_TASKS[task.pop("task")](**task)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = args.out or REPO / "experiments" / "results" / "benchmark" / name
    profile = PROFILES[name]
    res, loads, took = run_sections(profile)
    for key, rows in res.items():
        write_text(out / f"{key}.csv", csv_text(rows))
    write_text(out / "benchmark.md", report(name, profile, res, loads, took))
    plot(out / "benchmark.png", res)
    log.info("wrote %s in %.0f s", out / "benchmark.md", sum(took.values()))


if __name__ == "__main__":
    if not {"--omp-default", "--child"} & set(sys.argv) and "OMP_WAIT_POLICY" not in os.environ:
        # libgomp reads the policy when torch loads it: restart with it set (children inherit)
        env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    main()
