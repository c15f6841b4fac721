"""The benchmark's measurements, one function per report section."""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from benchmark_jobs import (
    MAX_MB,
    MAX_STEP_S,
    VARIANTS,
    Profile,
    air,
    build,
    describe,
    image_pairs,
    in_child,
    in_children,
    infer_job,
    interleave,
    mapt,
    speedup,
    timing_row,
    train_job,
    with_threads,
)
from torch import nn

from air_reg.classical import demons, has_simpleitk
from air_reg.models.components.attention import MultiheadAttention

log = logging.getLogger("benchmark")


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
        fast = f"{ref}, fast dropout" if ref else None
        if " naive" in name and fast in times:
            row["ours fast dropout ÷ this (time)"] = speedup(times, name, fast)
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


def size_specs(profile: Profile) -> dict[tuple[str, int], tuple[dict, int]]:
    """Section 3b's rows: (model, side) -> (spec, batch), every point and model of the profile."""
    out = {}
    for side, patch, patches, batch in profile.sizes:
        made = {
            "AiR-single": (f"p{patch}", air(image_size=side, patch_size=patch)),
            "MAPT": (str(list(patches)), mapt(image_size=side, patch_sizes=list(patches))),
        }
        for arch in profile.size_models:
            label, spec = made[arch]
            out[f"{arch} {label}", side] = spec | VARIANTS["ours"], batch
    return out


def size_section(profile: Profile) -> list[dict]:
    """Training throughput and peak memory at larger images beside 28 x 28, interleaved."""
    specs = size_specs(profile)
    kws = [{"spec": spec, "batch": b} for spec, b in specs.values()]
    mem = dict(zip(specs, in_children("memory", 300, kws), strict=True))  # before timing
    jobs = {name: train_job(build(spec), b) for name, (spec, b) in specs.items()}
    times = interleave(jobs, profile.repeats, profile.warmup)
    first = {}  # arch -> its first row (the profile's first side), the reference of `÷`
    rows = []
    for (model, side), (spec, b) in specs.items():
        name, patches = (model, side), spec.get("patch_sizes") or [spec["patch_size"]]
        ref, ref_b = first.setdefault(spec["arch"], (name, b))
        tokens = sum((side // p) ** 2 for p in patches)  # attention runs per branch
        row = {"model": model, "image": f"{side}x{side}", "tokens": tokens, "batch": b}
        row |= timing_row(times[name], b)
        per_pair = ((t / b) / (r / ref_b) for t, r in zip(times[name], times[ref], strict=True))
        row[f"ms/pair ÷ {ref[1]}x{ref[1]}"] = statistics.median(per_pair)
        mb = mem[name].get("peak_mb")
        row |= {"peak MB": mb, "MB/pair": None if mb is None else mb / b}
        row["batch in 8 GB (est.)"] = int(MAX_MB * b / mb) if mb else None
        rows.append(row | {"note": mem[name].get("error")})
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
    return self.out_proj(self.attend(q, k, v))


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
        "SDPA instead of air-reg's attention kernel": Lever(
            lambda: build(air(**VARIANTS["ours, SDPA attention"])), "no (float32 rounding)"
        ),
        "attention dropout 0.5 (SDPA's unfused path)": Lever(
            lambda: build(air(**VARIANTS["ours, attn_dropout 0.5"])), "yes: regularises"
        ),
        "threads 1": Lever(ours, threads=1),
        "threads 2 (a control when the default is 2)": Lever(ours, threads=2),
        "bf16 autocast": Lever(ours, "yes: bf16 rounding", bf16=True),
        "fast dropout (counter-based masks in air-reg's kernel)": Lever(
            lambda: build(air(**VARIANTS["ours, fast dropout"])), "dropout RNG stream"
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
    """Top ops by self CPU time over a few training steps: AiR-single p2 as the paper configs
    run it (``bernoulli_`` masks) and MAPT with ``fast dropout`` (the fastest MAPT)."""
    runs = {
        "AiR-single p2 ours": air(**VARIANTS["ours"]),
        "MAPT [2,4,7] ours, fast dropout": mapt(**VARIANTS["ours, fast dropout"]),
    }
    rows, n = [], profile.profile_steps
    for name, spec in runs.items():
        step = train_job(build(spec), profile.batch)
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        rows += [
            {
                "model": name,
                "op": e.key,
                "calls/step": e.count / n,
                "self ms/step": e.self_cpu_time_total / 1e3 / n,
                "% of self time": 100 * e.self_cpu_time_total / total,
            }
            for e in top
        ]
    return rows
