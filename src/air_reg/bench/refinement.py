"""Refinement benchmarks (``experiments/refine_benchmark.py``, ``refine_speed.py``): a model
one-shot, in a cascade and refined, and the speed of model-free refinement.

The one place the benchmarks reach into ``air_reg.refine``: ``RefineSettings``,
``apply_repeatedly``, ``Registrar`` and ``refine``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from air_reg.refine import RefineSettings, Registrar, apply_repeatedly, refine
from air_reg.speed import warp as fast
from air_reg.utils import write_with

log = logging.getLogger(__name__)


def refine_preset(name: str = "default") -> RefineSettings:
    """The refinement settings of ``conf/refinement/<name>.yaml``: ``default`` is what eval,
    register and load_model use (one source of truth); the 2026-11-26 tables used the former
    ``diffeomorphic`` preset."""
    return RefineSettings.preset(name)


def methods_for(
    model, steps: list[int], cascades: list[int], preset: RefineSettings, label: str = ""
) -> dict:
    """One model one-shot, in cascades of k and refined by n steps; row names start with
    ``label``."""
    prefix = f"{label} " if label else ""
    methods = {f"{prefix}one-shot": model}
    for k in cascades:
        methods[f"{prefix}cascade x{k}"] = lambda f, m, k=k: apply_repeatedly(model, f, m, k)
    for n in steps:
        methods[f"{prefix}refined {n}"] = Registrar(model, preset.replace(steps=n))
    return methods


def model_free(fixed: torch.Tensor, moving: torch.Tensor, steps: int, settings: RefineSettings):
    """Model-free refinement of (B, 1, H, W) pairs with a preset's ``settings``: the flows
    (B, 2, H, W)."""
    return refine(fixed, moving, None, settings.replace(steps=steps))


def torch_ops(fn: Callable) -> Callable:
    """``fn`` with air-reg's kernels swapped for the same maths in torch's ops."""

    def run():
        with fast.torch_ops():
            return fn()

    return run


def interleaved_times(rows: dict[str, Callable], rounds: int, per: int, score: Callable):
    """Time each of ``rows`` once a round, the order rotating every round (the host is shared
    and noisy): ``({row: [ms per item per round]}, {row: score(its last output)})``."""
    times = {name: [] for name in rows}
    scores = {}
    for r in range(rounds):
        names = list(rows)[r % len(rows) :] + list(rows)[: r % len(rows)]
        for name in names:
            tic = time.perf_counter()
            out = rows[name]()
            times[name].append(1000 * (time.perf_counter() - tic) / per)
            scores[name] = score(out)
        log.info("round %d: %s", r, {n: round(t[-1]) for n, t in times.items()})
    return times, scores


def plot_quality_vs_time(rows: list[dict], path: Path) -> None:
    """Foreground Dice against ms per pair (log), one colour per dataset, rows annotated."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for data in sorted({r["data"] for r in rows}):
        pts = [r for r in rows if r["data"] == data and r["pairs"] == "same_class"]
        ax.plot([r["ms_per_pair"] for r in pts], [r["dice"] for r in pts], "o", label=data)
        for r in pts:
            ax.annotate(r["method"], (r["ms_per_pair"], r["dice"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("ms per pair (log)")
    ax.set_ylabel("foreground Dice")
    ax.legend()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
