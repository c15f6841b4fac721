"""Memory and time of ``python -m air_reg.register`` on large folders (a child process each).

    python experiments/register_scale.py          # 1,000, 10,000 pairs of 28x28; 100 of 256x256
    python experiments/register_scale.py --quick  # 100, 1,000 pairs of 28x28; 10 of 256x256

Generates random PNG pairs in a temporary folder, registers them with the default shipped
model (figures off: one matplotlib figure per pair would dominate the time), and reports the
child's peak RSS (``ru_maxrss``), wall time and pairs/s. Memory should not grow with the
number of pairs: images are read one batch at a time. Writes
experiments/results/reliability/register_scale.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "results" / "reliability" / "register_scale.md"
# A fresh process per run, so that its RUSAGE_CHILDREN peak is that one register run's.
LAUNCHER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
    "text=True); sys.stderr.write(r.stderr[-4000:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def make_pairs(root: Path, n: int, size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    fixed, moving = root / "fixed", root / "moving"
    fixed.mkdir(parents=True)
    moving.mkdir()
    for i in range(n):
        for folder in (fixed, moving):
            pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"p{i:05d}.png")
    return fixed, moving


def measure(n: int, size: int, batch: int) -> dict:
    """Register n pairs of size x size in a child process; its peak RSS, time, rate."""
    with tempfile.TemporaryDirectory() as tmp:
        fixed, moving = make_pairs(Path(tmp), n, size)
        cmd = [
            *(sys.executable, "-m", "air_reg.register", f"fixed={fixed}", f"moving={moving}"),
            *(f"out_dir={tmp}/out", f"hydra.run.dir={tmp}/h", "figures=false"),
            f"batch_size={batch}",
        ]
        tic = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True
        )
        seconds = time.perf_counter() - tic
        if proc.returncode != 0:
            raise RuntimeError(f"register failed on {n} pairs:\n{proc.stderr[-2000:]}")
        peak_kb = int(proc.stdout.strip().splitlines()[-1])
        done = len(Path(f"{tmp}/out/summary.csv").read_text().splitlines()) - 1
    return {
        "pairs": n,
        "size": f"{size}x{size}",
        "batch": batch,
        "registered": done,
        "peak RSS MB": round(peak_kb / 1024, 1),
        "wall s": round(seconds, 1),
        "pairs/s (incl. start-up)": round(n / seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    runs = (
        [(10, 256), (100, 28), (1000, 28)] if args.quick else [(100, 256), (1000, 28), (10000, 28)]
    )
    rows = [measure(n, size, batch=32) for n, size in runs]
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    text = (
        "# `register` on large folders\n\n"
        f"`python experiments/register_scale.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}. Default shipped model (mapt_tuned_mnist, run at "
        "28x28; 256x256 pairs are resampled to it and the flow brought back), figures off, "
        "batch 32, one child process per row; peak RSS of that child (ru_maxrss).\n\n"
        + "\n".join(table)
        + "\n"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
