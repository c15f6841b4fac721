"""Sections 5-6 of the speed report: one lever at a time on AiR-single, and a profile."""

from __future__ import annotations

import os
import statistics
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from air_reg.models.components.attention import MultiheadAttention

from .children import in_child
from .models import VARIANTS, air, build, mapt
from .profiles import Profile
from .timing import image_pairs, interleave, speedup, timing_row, train_job, with_threads


def unfused_forward(self: MultiheadAttention, x, memory=None):
    """Our attention's forward with three q/k/v projections (same weights) instead of one."""
    src = x if memory is None else memory
    w, b = self.in_proj.weight.split(x.shape[-1]), self.in_proj.bias.split(x.shape[-1])
    q, k, v = (F.linear(t, wi, bi) for t, wi, bi in zip((x, src, src), w, b, strict=True))
    return self.out_proj(self.attend(q, k, v))


def unfuse(net: nn.Module) -> nn.Module:
    """``net`` with every attention's fused q/k/v projection split into three."""
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
    """5. Each lever's speed-up over our baseline in the same rounds, and what it changes."""

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
    """``torch.compile``'s speed-up and cold compile time, in a child with an empty cache."""
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
    """6. Top ops by self CPU time over a few training steps: AiR-single p2 as the paper configs
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
