"""Measurements that need a fresh interpreter: peak memory, ``torch.compile``, thread policy.

A child's peak RSS belongs to one configuration only, ``torch.compile`` starts from an empty
cache, and libgomp reads ``OMP_WAIT_POLICY`` once when it loads. Each child runs
``children.main`` with one JSON task and prints one JSON line back.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .models import build
from .timing import interleave, speedup, train_job

ENTRY = "import sys; from air_reg.bench.speed.children import main; main(sys.argv[1])"
WORKERS = 2  # memory children run two at a time: their peaks are their own


def peak_rss_mb() -> float:
    """Peak RSS of this process's memory: VmHWM on Linux, else ``ru_maxrss``.

    ``ru_maxrss`` also counts the parent's RSS at the fork before ``exec``, which can hide a
    child's own peak; VmHWM is the address space's own mark, and ``clear_refs`` can reset it.
    """
    with contextlib.suppress(OSError, IndexError):
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> None:
    """Lower the peak-RSS mark to the current RSS (Linux >= 4.0), forgetting import peaks."""
    with contextlib.suppress(OSError):  # elsewhere the baseline stays the peak so far
        Path("/proc/self/clear_refs").write_text("5")


def child_memory(spec: dict, batch: int) -> dict:
    """Peak-RSS growth over one training step, after imports, model and data exist."""
    step = train_job(build(spec), batch)
    reset_peak_rss()
    base = peak_rss_mb()
    start = time.perf_counter()
    step()
    return {"peak_mb": peak_rss_mb() - base, "step_s": time.perf_counter() - start}


def child_compile(spec: dict, batch: int, repeats: int) -> dict:
    """Compile time of ``torch.compile`` and its speed-up over eager, measured side by side."""
    eager, compiled = train_job(build(spec), batch), train_job(torch.compile(build(spec)), batch)
    start = time.perf_counter()
    compiled()  # compiles forward and backward
    compile_s = time.perf_counter() - start
    times = interleave({"eager": eager, "compiled": compiled}, repeats, warmup=1)
    return {"compile_s": compile_s, "speedup": speedup(times, "eager", "compiled")}


def child_steps(specs: dict[str, dict], batch: int, repeats: int) -> dict:
    """Median training-step seconds of each spec, interleaved, in this process's environment."""
    jobs = {name: train_job(build(spec), batch) for name, spec in specs.items()}
    return {k: statistics.median(t) for k, t in interleave(jobs, repeats, warmup=1).items()}


TASKS = {"memory": child_memory, "compile": child_compile, "steps": child_steps}


def main(task_json: str) -> None:
    """The child's side: run one task, print its result as the last line of stdout."""
    task = json.loads(task_json)
    print(json.dumps(TASKS[task.pop("task")](**task)))


def in_child(task: str, timeout: float, env: dict | None = None, **kw) -> dict:
    """Run ``TASKS[task](**kw)`` in a fresh interpreter; ``{"error": ...}`` if it fails."""
    cmd = [sys.executable, "-c", ENTRY, json.dumps({"task": task, **kw})]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=True, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"took over {timeout:.0f} s"}
    except subprocess.CalledProcessError as err:
        lines = err.stderr.strip().splitlines() or ["no output"]
        return {"error": f"failed: {lines[-1][:120]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_children(task: str, timeout: float, kws: list[dict]) -> list[dict]:
    """``in_child`` for each keyword set, ``WORKERS`` at a time, results in order."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda kw: in_child(task, timeout, **kw), kws))
