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
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from air_reg import warp
from air_reg.classical import demons, has_simpleitk
from air_reg.models.components.air import AiR
from air_reg.models.components.attention import MultiheadAttention
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.components.mapt import MAPT
from air_reg.utils import write_text, write_with

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")


@dataclass(frozen=True)
class Profile:
    """What one run measures; the defaults are the full run."""

    batch: int = 64  # training pairs per step
    infer_batch: int = 256  # pairs per batched inference call
    repeats: int = 5  # timed rounds after the warm-up
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
    ),
}
MAX_MB, MAX_STEP_S = 8000, 60  # skip a scaling point whose extrapolated cost exceeds either

# The paper's Transformer (Sec. 4.1); ff_dim None means 4 * dim ("matched widths").
PAPER = {"dim": 16, "heads": 4, "depth": 1, "dropout": 0.5, "ff_dim": None}
VARIANTS = {  # label -> overrides; the naive reference ties attention dropout to `dropout`
    "ours": {"impl": "sdpa", "attn_dropout": 0.0},
    "ours, fast_dropout": {"impl": "sdpa", "attn_dropout": 0.0, "fast_dropout": True},
    "ours, attn_dropout 0.5": {"impl": "sdpa", "attn_dropout": 0.5},
    "naive, matched widths": {"impl": "torch"},
    "naive, authors' build": {"impl": "torch", "ff_dim": 2048},
}
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
    return ARCHS[spec["arch"]](**{k: v for k, v in spec.items() if k != "arch"})


def describe(spec: dict) -> dict:
    """Table columns for a model spec."""
    if spec["arch"] == "DIRNet":
        return {"impl": "CNN", "ff": "-", "dropout": "-", "attn dropout": "-"}
    naive = spec.get("impl") == "torch"
    return {
        "impl": "nn.Transformer" if naive else "SDPA (ours)",
        "ff": spec.get("ff_dim") or 4 * spec["dim"],
        "dropout": spec["dropout"],
        "attn dropout": spec["dropout"] if naive else spec["attn_dropout"],
        "dropout mask": "rand_like" if spec.get("fast_dropout") else "bernoulli",
    }


# --- jobs: closures that run one training step or one batched inference ---------------------


def image_pairs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random (fixed, moving) images in [0, 1], the same in every run."""
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(2 * batch, 1, size, size, generator=g), 5, 1, 2)
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


def train_job(net: nn.Module, batch: int, *, bf16: bool = False) -> Callable[[], None]:
    """One full step: forward, warp, MSE, backward, Adam."""
    fixed, moving = image_pairs(batch, net.field.upsample.out_size[0])
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    net.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(warp(moving, net(fixed, moving)), fixed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer_job(net: nn.Module, batch: int) -> Callable[[], torch.Tensor]:
    fixed, moving = image_pairs(batch, net.field.upsample.out_size[0])
    net.eval()
    return torch.no_grad()(lambda: warp(moving, net(fixed, moving)))


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
    cmd = [sys.executable, __file__, "--child", json.dumps({"task": task, **kw})]
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


# --- sections ------------------------------------------------------------------------------


def reference_of(name: str) -> str | None:
    """The row that a model's speed-up is relative to: our variant of the same architecture."""
    arch = name.split(" ours")[0].split(" naive")[0]
    return f"{arch} ours" if name != f"{arch} ours" and name != "DIRNet" else None


def train_section(profile: Profile, specs: dict[str, dict]) -> list[dict]:
    jobs = {name: train_job(build(spec), profile.batch) for name, spec in specs.items()}
    times = interleave(jobs, profile.repeats, profile.warmup)
    rows = []
    for name, spec in specs.items():
        ref = reference_of(name)
        row = {"model": name, **describe(spec), **timing_row(times[name], profile.batch)}
        row["ours ÷ this (time)"] = speedup(times, name, ref) if ref in times else None
        fast = f"{ref}, fast_dropout" if ref else None
        if " naive" in name and fast in times:
            row["ours fast_dropout ÷ this (time)"] = speedup(times, name, fast)
        rows.append(row)
    return rows


def inference_section(profile: Profile, specs: dict[str, dict]) -> list[dict]:
    b, n = profile.infer_batch, profile.demons_pairs
    jobs = {name: infer_job(build(spec), b) for name, spec in specs.items()}
    if has_simpleitk():
        fixed, moving = image_pairs(n, 28)
        it = profile.demons_iterations
        jobs["SimpleITK Demons"] = lambda: demons(fixed, moving, iterations=it)
    else:
        log.warning("SimpleITK missing (pip install air-reg[classical]): no Demons row")
    times = interleave(jobs, profile.repeats, profile.warmup)
    rows = []
    for name, t in times.items():
        row = {"model": name, **timing_row(t, n if name == "SimpleITK Demons" else b)}
        if "SimpleITK Demons" in times and name != "SimpleITK Demons":
            row["÷ Demons (ms/pair)"] = statistics.median(
                (x / b) / (d / n) for x, d in zip(t, times["SimpleITK Demons"], strict=True)
            )
        rows.append(row)
    return rows


def memory_section(profile: Profile, specs: dict[str, dict]) -> list[dict]:
    if profile.memory_models is not None:
        specs = {k: v for k, v in specs.items() if k in profile.memory_models}
    rows, kws = [], [{"spec": spec, "batch": profile.batch} for spec in specs.values()]
    for name, res in zip(specs, in_children("memory", 600, kws), strict=True):
        mb = res.get("peak_mb")
        per_pair = None if mb is None else mb / profile.batch
        rows.append({"model": name, "peak MB": mb, "MB/pair": per_pair, "note": res.get("error")})
    ours = {r["model"]: r["peak MB"] for r in rows}
    for row in rows:
        ref = ours.get(reference_of(row["model"]) or "")
        row["this ÷ ours"] = row["peak MB"] / ref if ref and row["peak MB"] else None
    return rows


def too_costly(prev: dict | None, tokens: int) -> str | None:
    """Why a scaling point is skipped, extrapolating the last one as O(tokens^2), else None."""
    if not prev:
        return None
    if "error" in prev:
        return f"skipped: {prev['tokens']} tokens {prev['error']}"
    r = (tokens / prev["tokens"]) ** 2
    mb, secs = prev["peak_mb"] * r, prev["step_s"] * r
    if mb > MAX_MB or secs > MAX_STEP_S:
        return f"skipped: extrapolated {mb / 1e3:.1f} GB, {secs:.0f} s per step"
    return None


def scaling_section(profile: Profile) -> list[dict]:
    b, rows, prev = profile.scaling_batch, [], {}
    for size, patch in profile.scaling:
        tokens = (size // patch) ** 2
        log.info("scaling: %d tokens (%dx%d, patch %d)", tokens, size, size, patch)
        specs = {
            impl: air(image_size=size, patch_size=patch, **VARIANTS[variant])
            for impl, variant in (("ours", "ours"), ("naive", "naive, matched widths"))
            if impl == "ours" or profile.scaling_naive
        }
        notes = {impl: too_costly(prev.get(impl), tokens) for impl in specs}
        run = [impl for impl in specs if notes[impl] is None]
        kws = [{"spec": specs[impl], "batch": b} for impl in run]
        mem = dict(zip(run, in_children("memory", 300, kws), strict=True))
        for impl, res in mem.items():
            notes[impl] = res.get("error")
            prev[impl] = res | {"tokens": tokens}
        jobs = {impl: train_job(build(specs[impl]), b) for impl in run if notes[impl] is None}
        times = interleave(jobs, max(1, profile.repeats - 2), profile.warmup)
        for impl in specs:
            row = {"tokens": tokens, "image": size, "patch": patch, "impl": impl}
            if impl in times:
                row["ms/pair"] = timing_row(times[impl], b)["ms/pair"]
                row["MB/pair"] = mem[impl]["peak_mb"] / b
            if impl == "naive" and "naive" in times and "ours" in times:
                row["time ÷ ours"] = speedup(times, "naive", "ours")
                row["MB ÷ ours"] = mem["naive"]["peak_mb"] / max(mem["ours"]["peak_mb"], 1e-3)
            rows.append(row | {"note": notes[impl]})
    return rows


def growth_exponents(rows: list[dict]) -> list[dict]:
    """Log-log slopes of time and memory per pair against tokens, overall and at the top."""
    out = []
    for impl in ("ours", "naive"):
        pts = [r for r in rows if r["impl"] == impl and r.get("MB/pair")]
        if len(pts) < 2:
            continue
        row = {"impl": impl, "tokens fitted": f"{pts[0]['tokens']}-{pts[-1]['tokens']}"}
        for key in ("ms/pair", "MB/pair"):
            x = np.log([p["tokens"] for p in pts])
            y = np.log([max(p[key], 1e-6) for p in pts])
            row[f"{key} slope, all"] = float(np.polyfit(x, y, 1)[0])
            row[f"{key} slope, top 3"] = float(np.polyfit(x[-3:], y[-3:], 1)[0])
        out.append(row)
    return out


# --- levers, one at a time, on AiR-single p2 training ----------------------------------------


def unfused_forward(self: MultiheadAttention, x, memory=None):
    """Our attention's forward with three q/k/v projections (same weights) instead of one."""
    src = x if memory is None else memory
    w, b = self.in_proj.weight.split(x.shape[-1]), self.in_proj.bias.split(x.shape[-1])
    q, k, v = (F.linear(t, wi, bi) for t, wi, bi in zip((x, src, src), w, b, strict=True))
    q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in (q, k, v))
    p = self.attn_dropout if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    return self.out_proj(rearrange(out, "b h n e -> b n (h e)"))


def unfuse(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, MultiheadAttention):
            m.forward = types.MethodType(unfused_forward, m)
    return net


@torch.no_grad()
def eval_diff(make: Callable[[], nn.Module], bf16: bool = False) -> float:
    """Max |flow difference| from our baseline in eval mode, same weights, head scaled up.

    The head starts near zero, so both get the same random O(1) head to make flows comparable.
    """
    fixed, moving = image_pairs(8, 28)
    flows = []
    for net, half in ((build(air(**VARIANTS["ours"])), False), (make(), bf16)):
        nn.init.normal_(net.branch.head.weight, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            flows.append(net.eval()(fixed, moving).float())
    return (flows[0] - flows[1]).abs().max().item()


@dataclass
class Lever:
    make: Callable[[], nn.Module]  # a fresh network with the baseline's weights
    changes: str = "no"  # does the lever change what training computes?
    threads: int | None = None
    bf16: bool = False


def lever_section(profile: Profile, naive_speedup: float | None) -> list[dict]:
    def ours() -> nn.Module:
        return build(air(**VARIANTS["ours"]))

    n = torch.get_num_threads()
    levers = {
        f"ours (baseline: fused qkv, attn_dropout 0, {n} threads, fp32)": Lever(ours, "-"),
        "unfused q/k/v projections": Lever(lambda: unfuse(ours())),
        "attention dropout 0.5 (no flash kernel)": Lever(
            lambda: build(air(**VARIANTS["ours, attn_dropout 0.5"])), "yes: regularises"
        ),
        "threads 1": Lever(ours, threads=1),
        "threads 2 (a control when the default is 2)": Lever(ours, threads=2),
        "bf16 autocast": Lever(ours, "yes: bf16 rounding", bf16=True),
        "fast_dropout (dropout mask from rand_like)": Lever(
            lambda: build(air(**VARIANTS["ours, fast_dropout"])), "dropout RNG stream"
        ),
    }
    diffs = {
        label: with_threads(lv.threads or n, partial(eval_diff, lv.make, lv.bf16))()
        for label, lv in levers.items()
    }
    jobs = {
        label: with_threads(lv.threads or n, train_job(lv.make(), profile.batch, bf16=lv.bf16))
        for label, lv in levers.items()
    }
    times = interleave(jobs, profile.repeats, profile.warmup)
    baseline = next(iter(jobs))
    rows = [
        {
            "lever": "naive nn.Transformer -> SDPA (section 1)",
            "speed-up": naive_speedup,
            "changes results": "no (naive ties attention dropout)",
        }
    ]
    for label, lv in levers.items():
        row = {"lever": label, **timing_row(times[label], profile.batch)}
        row["speed-up"] = speedup(times, baseline, label)
        row["changes results"] = lv.changes
        row["eval max |Δ|"] = diffs[label]
        rows.append(row)
    rows.append(wait_policy_row(profile))
    rows.append(compile_row(profile, air(**VARIANTS["ours"])))
    return rows


def wait_policy_row(profile: Profile) -> dict:
    """libgomp reads OMP_WAIT_POLICY when it loads, so each setting runs in child processes,
    alternated; its default spins idle threads, which a loaded machine punishes."""
    row = {"lever": "OMP_WAIT_POLICY=PASSIVE (vs unset)", "changes results": "no"}
    if not profile.policy_rounds:
        return row | {"note": "not measured in this profile"}
    unset = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    envs = {"unset": unset, "PASSIVE": unset | {"OMP_WAIT_POLICY": "PASSIVE"}}
    specs = {k: air(**VARIANTS[k]) for k in ("ours", "naive, matched widths")}
    kw = {"specs": specs, "batch": profile.batch, "repeats": max(2, profile.repeats - 2)}
    runs = []  # per alternation: {policy: {model: median seconds}}
    for _ in range(profile.policy_rounds):
        runs.append({k: in_child("steps", 600, env=env, **kw) for k, env in envs.items()})
        if any("error" in t for t in runs[-1].values()):
            return row | {"note": "a child process failed"}
    ours = [r["unset"]["ours"] / r["PASSIVE"]["ours"] for r in runs]
    vs_naive = {
        k: statistics.median(r[k]["naive, matched widths"] / r[k]["ours"] for r in runs)
        for k in envs
    }
    note = "ours ÷ naive: " + ", ".join(f"{k} {v:.1f}x" for k, v in vs_naive.items())
    note += "; per-alternation speed-ups " + ", ".join(f"{r:.2f}" for r in ours)
    return row | {"speed-up": statistics.median(ours), "note": note}


def compile_row(profile: Profile, spec: dict) -> dict:
    row = {"lever": "torch.compile (forward + backward)", "changes results": "RNG stream"}
    if not profile.compile:
        return row | {"note": "not tried in this profile (compiling takes about a minute)"}
    kw = {"spec": spec, "batch": profile.batch, "repeats": profile.repeats}
    with tempfile.TemporaryDirectory() as cache:  # an empty inductor cache: a cold compile
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        res = in_child("compile", 150, env=env, **kw)
    if "error" in res:
        return row | {"note": f"compile {res['error']}: not measured"}
    return row | {"speed-up": res["speedup"], "note": f"compiled in {res['compile_s']:.0f} s"}


def profile_section(profile: Profile) -> list[dict]:
    """Top ops by self CPU time over a few training steps of AiR-single p2 (ours)."""
    step = train_job(build(air(**VARIANTS["ours"])), profile.batch)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(profile.profile_steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    n = profile.profile_steps
    return [
        {
            "op": e.key,
            "calls/step": e.count / n,
            "self ms/step": e.self_cpu_time_total / 1e3 / n,
            "% of self time": 100 * e.self_cpu_time_total / total,
        }
        for e in top
    ]


# --- report --------------------------------------------------------------------------------


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def md_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def targets(res: dict[str, list[dict]]) -> list[dict]:
    """The project's targets against what this run measured."""
    rows, train = [], {r["model"]: r for r in res["training"]}
    for arch in ("AiR-single p2", "MAPT [2,4,7]"):
        for variant, goal in (("naive, matched widths", 10), ("naive, authors' build", 25)):
            for ours in ("ours", "ours fast_dropout"):
                x = train.get(f"{arch} {variant}", {}).get(f"{ours} ÷ this (time)")
                if x is not None:
                    target = f"training {arch}: {ours} >= {goal}x {variant}"
                    rows.append({"target": target, "measured": f"{x:.1f}x", "met": x >= goal})
    for r in res["inference"]:
        x = r.get("÷ Demons (ms/pair)")
        if x is not None and r["model"].endswith(" ours"):
            target = f"inference {r['model']}: <= 1/100 of Demons' ms/pair"
            rows.append({"target": target, "measured": f"{x:.3g} x", "met": x <= 0.01})
    for r in res["exponents"]:
        if r["impl"] == "ours":
            x = r["MB/pair slope, top 3"]
            target = "memory per pair of ours no faster than linear in tokens (slope <= 1)"
            rows.append({"target": target, "measured": f"{x:.2f}", "met": x <= 1.05})
    return rows


def bars(ax, rows: list[dict], metric: str, title: str) -> None:
    rows = [r for r in rows if (r.get(metric) or 0) > 0]
    ax.barh([r["model"] for r in rows], [r[metric] for r in rows], color="tab:blue")
    ax.set(xscale="log" if rows else "linear", xlabel=metric, title=title)
    ax.tick_params(axis="x", which="minor", labelbottom=False)  # they overlap on short ranges
    ax.invert_yaxis()


def lines(ax, rows: list[dict], metric: str) -> None:
    for impl, style in (("ours", "o-"), ("naive", "s--")):
        pts = [r for r in rows if r["impl"] == impl and (r.get(metric) or 0) > 0]
        ax.plot([p["tokens"] for p in pts], [p[metric] for p in pts], style, label=impl)
        if pts:
            ax.set(xscale="log", yscale="log")
    ax.set(xlabel="tokens", ylabel=metric, title=f"AiR-single training step: {metric}")
    ax.legend()


def plot(path: Path, res: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    bars(axes[0, 0], res["training"], "pairs/s", "training throughput (log scale)")
    bars(axes[0, 1], res["inference"], "ms/pair", "batched inference vs Demons (log scale)")
    lines(axes[1, 0], res["scaling"], "ms/pair")
    lines(axes[1, 1], res["scaling"], "MB/pair")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


NOTES = {
    "training": "Full step: forward, warp, MSE, backward, Adam; batch {batch}. `ours ÷ this` is "
    "the median over rounds of this row's step time over ours (same architecture, same round).",
    "inference": "eval mode, `no_grad`, flow + warp, batch {infer_batch}; SimpleITK diffeomorphic "
    "Demons ({demons_iterations} iterations, its default threads) on {demons_pairs} pairs of "
    "the same images, interleaved with the learned models.",
    "memory": "Growth of the peak RSS (VmHWM, reset once imports, model and data exist) over one "
    "training step (batch {batch}) in a fresh process: activations, gradients, Adam state, "
    "library workspaces. 0 = below resolution (served from memory already resident).",
    "scaling": "AiR-single (dim 16, 4 heads, 1 block, dropout 0.5) training step, batch "
    "{scaling_batch}; ours with attn_dropout 0 (flash kernel), naive with attention dropout 0.5. "
    "A point is skipped when the previous one, extrapolated as tokens^2, exceeds "
    f"{MAX_MB / 1e3:.0f} GB or {MAX_STEP_S} s per step.",
    "exponents": "Least-squares slopes of log(per-pair cost) against log(tokens); `top 3` uses "
    "the three largest token counts measured (where attention dominates the fixed costs).",
    "levers": "AiR-single p2 training, batch {batch}, one lever at a time against the baseline "
    "in the same rounds; speed-up = median over rounds of baseline time / lever time. "
    "`eval max |Δ|`: largest flow difference against the baseline in eval mode, same weights.",
    "profile": "`torch.profiler` over {profile_steps} training steps of AiR-single p2 (ours), "
    "batch {batch}; top ops by self CPU time.",
}
TITLES = {
    "training": "1. Training throughput",
    "inference": "2. Batched inference and Demons",
    "memory": "3. Peak memory of a training step",
    "scaling": "4. Token-count scaling",
    "exponents": "4b. Growth exponents",
    "levers": "5. Levers",
    "profile": "6. Profile",
}


def report(name: str, profile: Profile, res: dict, loads: dict, took: dict) -> str:
    load = ", ".join(f"{k} {v[0]:.2f}" for k, v in loads.items())
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    command = "python experiments/benchmark.py" + {"full": ""}.get(name, f" --{name}")
    lines = [
        f"# Speed and memory benchmark ({name})",
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')}: torch {torch.__version__}, "
        f"Python {platform.python_version()}, {cpu_name()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY {policy}. Shared machine; "
        f"1-minute load average at each section start: {load}. Timings: medians of "
        f"{profile.repeats} interleaved rounds after {profile.warmup} warm-up call(s); "
        "`spread %` = (max - min) / median.",
        "",
        "## Targets",
        "",
        md_table(targets(res)) or "(none measured in this profile)",
    ]
    for key, title in TITLES.items():
        lines += ["", f"## {title}", "", NOTES[key].format(**profile.__dict__)]
        lines += [f"Took {took[key]:.0f} s." if key in took else "", ""]
        lines.append(md_table(res[key]) or "(nothing measured)")
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------


def run_sections(profile: Profile) -> tuple[dict, dict, dict]:
    specs, res, loads, took = model_specs(profile), {}, {}, {}
    sections = {
        "training": lambda: train_section(profile, specs),
        "inference": lambda: inference_section(profile, specs),
        "memory": lambda: memory_section(profile, specs),
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
