"""Benchmark building blocks: profiles, model specs, timed jobs and child processes."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from air_reg import speed, warp
from air_reg.models import contract
from air_reg.models.components.air import AiR
from air_reg.models.components.attention import use_reference
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.components.mapt import MAPT
from air_reg.speed.attention import auto_uses_kernel

SCRIPT = Path(__file__).with_name("benchmark.py")  # children run its --child entry
log = logging.getLogger("benchmark")


@dataclass(frozen=True)
class Profile:
    """What one run measures; the defaults are the full run."""

    batch: int = 64  # training pairs per step
    infer_batch: int = 256  # pairs per batched inference call
    repeats: int = 7  # timed rounds after the warm-up
    warmup: int = 1  # untimed calls of every configuration first
    scaling: tuple[tuple[int, int], ...] = ((28, 7), (32, 4), (64, 4), (64, 2), (128, 2))
    scaling_batch: int = 8  # (image size, patch size) pairs above
    scaling_naive: bool = True  # also the naive reference (a child process per point)
    demons_pairs: int = 16
    demons_iterations: int = 100
    models: tuple[str, ...] | None = None  # sections 1-2; None: all
    memory_models: tuple[str, ...] | None = None  # section 3, a child process each; None: all
    policy_rounds: int = 2  # OMP_WAIT_POLICY lever: alternations of two child processes
    compile: bool = True
    profile_steps: int = 3
    # section 3b, training at larger images: (side, AiR-single patch, MAPT patches, batch).
    # Patches grow with the side, so AiR-single keeps 196-256 tokens and the rows compare
    # per-pixel costs; the last point (1,024 tokens at 128) shows what finer patches cost.
    sizes: tuple[tuple[int, int, tuple[int, ...], int], ...] = (
        (28, 2, (2, 4, 7), 64),
        (128, 8, (8, 16, 32), 64),
        (256, 16, (16, 32, 64), 64),
        (128, 4, (4, 8, 16), 16),
    )
    size_models: tuple[str, ...] = ("AiR-single", "MAPT")


AIR_ROWS = ("AiR-single p2 ours", "AiR-single p2 naive, matched widths")
PROFILES = {
    "full": Profile(),
    "quick": Profile(
        batch=16,
        infer_batch=64,
        repeats=2,
        scaling=((28, 7), (64, 4)),
        scaling_batch=4,
        demons_pairs=4,
        memory_models=AIR_ROWS,
        policy_rounds=1,
        compile=False,
        sizes=((28, 2, (2, 4, 7), 16), (128, 8, (8, 16, 32), 16), (256, 16, (16, 32, 64), 16)),
    ),
    # For tests/test_benchmark.py: every code path in seconds, numbers meaningless.
    "smoke": Profile(
        batch=2,
        infer_batch=4,
        repeats=1,
        warmup=0,
        scaling=((28, 7),),
        scaling_batch=2,
        scaling_naive=False,
        demons_pairs=2,
        demons_iterations=5,
        models=AIR_ROWS,
        memory_models=(),
        policy_rounds=0,
        compile=False,
        profile_steps=1,
        sizes=((28, 7, (7,), 2),),  # one tiny point
        size_models=("AiR-single",),
    ),
}
MAX_MB, MAX_STEP_S = 8000, 60  # skip a scaling point whose extrapolated cost exceeds either

# The paper's Transformer (Sec. 4.1); ff_dim None means 4 * dim ("matched widths").
PAPER = {"dim": 16, "heads": 4, "depth": 1, "dropout": 0.5, "ff_dim": None}
# label -> overrides. `attention`/`dropout` are the speed settings (air_reg.speed.accelerate);
# `reference`: nn.Transformer instead of ours (use_reference), which ties attention dropout
# to `dropout`.
VARIANTS = {
    "ours": {"attn_dropout": 0.0},  # speed.attention=auto: air-reg's CPU kernel
    "ours, fast dropout": {"attn_dropout": 0.0, "dropout_masks": "fast"},
    "ours, SDPA attention": {"attn_dropout": 0.0, "attention": "sdpa"},
    "ours, attn_dropout 0.5": {"attn_dropout": 0.5},
    "naive, matched widths": {"reference": True},
    "naive, authors' build": {"reference": True, "ff_dim": 2048},
}
SETTINGS = ("attention", "dropout_masks", "reference")  # spec keys that are not the net's
ARCHS = {"AiR-single": AiR, "MAPT": MAPT, "DIRNet": DIRNet}


def air(**kw) -> dict:
    return {"arch": "AiR-single", "image_size": 28, "patch_size": 2, **PAPER, **kw}


def mapt(**kw) -> dict:
    return {"arch": "MAPT", "image_size": 28, "patch_sizes": [2, 4, 7], **PAPER, **kw}


def model_specs(profile: Profile) -> dict[str, dict]:
    specs = {
        f"{name} {variant}": make(**kw)
        for name, make in (("AiR-single p2", air), ("MAPT [2,4,7]", mapt))
        for variant, kw in VARIANTS.items()
    }
    specs["DIRNet"] = {"arch": "DIRNet", "image_size": 28}
    return {k: v for k, v in specs.items() if profile.models is None or k in profile.models}


def build(spec: dict) -> nn.Module:
    torch.manual_seed(0)  # same weights for every variant of one architecture
    kw = {k: v for k, v in spec.items() if k != "arch" and k not in SETTINGS}
    if spec.get("reference"):
        kw.pop("attn_dropout", None)
    net = ARCHS[spec["arch"]](**kw)
    if spec.get("reference"):
        return use_reference(net)
    attention, dropout = spec.get("attention", "auto"), spec.get("dropout_masks", "torch")
    return speed.accelerate(net, attention=attention, dropout=dropout)


def describe(spec: dict) -> dict:
    """Table columns for a model spec."""
    if spec["arch"] == "DIRNet":
        return {"impl": "CNN", "ff": "-", "dropout": "-", "attn dropout": "-"}
    naive = bool(spec.get("reference"))
    kernel = spec.get("attention", "auto") != "sdpa" and auto_uses_kernel(
        spec["dim"] // spec["heads"], spec.get("attn_dropout", 0.0)
    )  # what speed.attention=auto picks on these CPU float32 inputs (KernelAttention)
    return {
        "impl": "nn.Transformer" if naive else "ours, air-reg kernel" if kernel else "ours, SDPA",
        "ff": spec.get("ff_dim") or 4 * spec["dim"],
        "dropout": spec["dropout"],
        "attn dropout": spec["dropout"] if naive else spec["attn_dropout"],
        "dropout mask": ("kernel" if speed.kernels.available() else "int16")
        if spec.get("dropout_masks") == "fast"
        else "bernoulli",
    }


# --- jobs: closures that run one training step or one batched inference ---------------------


def image_pairs(batch: int, size: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random (fixed, moving) images in [0, 1] of side ``size`` or (H, W), the same in
    every run."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(2 * batch, 1, h, w, generator=g), 5, 1, 2)
    return x[:batch].contiguous(), x[batch:].contiguous()


def with_threads(n: int, fn: Callable) -> Callable:
    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def _pairs_for(net: nn.Module, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(device) for t in image_pairs(batch, contract.image_size(net)))


def train_job(
    net: nn.Module, batch: int, *, bf16: bool = False, device: str = "cpu"
) -> Callable[[], None]:
    """One full step: forward, warp, MSE, backward, Adam (``net`` already on ``device``)."""
    fixed, moving = _pairs_for(net, batch, device)
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    net.train()

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(warp(moving, net(fixed, moving)), fixed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer_job(
    net: nn.Module, batch: int, *, bf16: bool = False, device: str = "cpu"
) -> Callable[[], torch.Tensor]:
    """One batched inference call: flow + warp without gradients."""
    fixed, moving = _pairs_for(net, batch, device)
    net.eval()

    @torch.no_grad()
    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return warp(moving, net(fixed, moving))

    return step


def interleave(jobs: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every job, round-robin with a rotating start, after a warm-up."""
    for job in jobs.values():
        for _ in range(warmup):
            job()
    names, times = list(jobs), {k: [] for k in jobs}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            jobs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def speedup(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of time(slow) / time(fast)."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True))


def timing_row(t: list[float], pairs: int) -> dict:
    med = statistics.median(t)
    return {
        "pairs/s": pairs / med,
        "ms/pair": 1e3 * med / pairs,
        "spread %": 100 * (max(t) - min(t)) / med,
    }


# --- child processes: peak memory and torch.compile, each in a fresh interpreter ------------


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


CHILD_TASKS = {"memory": child_memory, "compile": child_compile, "steps": child_steps}
CHILD_WORKERS = 2  # memory children run two at a time: their peaks are their own


def in_child(task: str, timeout: float, env: dict | None = None, **kw) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--child", json.dumps({"task": task, **kw})]
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
    with ThreadPoolExecutor(CHILD_WORKERS) as pool:
        return list(pool.map(lambda kw: in_child(task, timeout, **kw), kws))
