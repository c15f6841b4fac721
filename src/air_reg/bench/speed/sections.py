"""Sections 1-4 of the speed report: training, inference, memory, larger images, scaling.

Each function measures one section and returns its table as a list of row dicts.
"""

from __future__ import annotations

import logging
import statistics

import numpy as np

from air_reg.classical import demons, has_simpleitk

from .children import in_children
from .models import VARIANTS, air, build, describe, mapt
from .profiles import MAX_MB, MAX_STEP_S, Profile
from .timing import image_pairs, infer_job, interleave, speedup, timing_row, train_job

log = logging.getLogger(__name__)


def reference_of(name: str) -> str | None:
    """The row that a model's speed-up is relative to: our variant of the same architecture."""
    arch = name.split(" ours")[0].split(" naive")[0]
    return f"{arch} ours" if name != f"{arch} ours" and name != "DIRNet" else None


def train_section(profile: Profile, specs: dict[str, dict]) -> list[dict]:
    """1. Training throughput of every spec, and each one's time over ours."""
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
    """2. Batched inference of every spec beside SimpleITK's Demons on the same images."""
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
    """3. Peak memory of one training step, a fresh process per spec."""
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
    """3b. Training throughput and peak memory at larger images beside 28 x 28, interleaved."""
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
    """4. AiR-single's training time and memory per pair as the token count grows."""
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
    """4b. Log-log slopes of time and memory per pair against tokens, overall and at the top."""
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
