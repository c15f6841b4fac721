"""The speed report: the targets, one titled section per table, and the plot."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from air_reg.bench.machine import cpu_name
from air_reg.utils import write_with

from .profiles import MAX_MB, MAX_STEP_S, Profile
from .tables import md_table

COMMAND = "python experiments/benchmark.py"  # how the report says it was made


def targets(res: dict[str, list[dict]]) -> list[dict]:
    """The project's targets against what this run measured."""
    rows, train = [], {r["model"]: r for r in res["training"]}
    for arch in ("AiR-single p2", "MAPT [2,4,7]"):
        for variant, goal in (("naive, matched widths", 10), ("naive, authors' build", 25)):
            for ours in ("ours", "ours fast dropout"):
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


NOTES = {
    "training": "Full step: forward, warp, MSE, backward, Adam; batch {batch}. `ours ÷ this` is "
    "the median over rounds of this row's step time over ours (same architecture, same round).",
    "inference": "eval mode, `no_grad`, flow + warp, batch {infer_batch}; SimpleITK diffeomorphic "
    "Demons ({demons_iterations} iterations, its default threads) on {demons_pairs} pairs of "
    "the same images, interleaved with the learned models.",
    "memory": "Growth of the peak RSS (VmHWM, reset once imports, model and data exist) over one "
    "training step (batch {batch}) in a fresh process: activations, gradients, Adam state, "
    "library workspaces. 0 = below resolution (served from memory already resident).",
    "sizes": "Training throughput (a full step as in section 1; ours, attn_dropout 0) and peak "
    "memory (as in section 3, a fresh process per row) at larger images beside the first "
    "side's rows, interleaved in the same rounds, each at its own batch (chosen far below 8 GB "
    "and a few seconds a step). Patch sizes (in the names) grow with the image, so AiR-single "
    "keeps 196-256 tokens and the rows compare per-pixel costs (embedding, coarse-to-dense, "
    "warp); `tokens` sums MAPT's branches, and finer patches at 128, where the profile has "
    "them, show what 4x the tokens cost. `ms/pair ÷`: median over rounds of this row's ms/pair "
    "over the same model's first row. `batch in 8 GB (est.)`: 8 GB / (peak MB / batch), "
    "conservative (the peak's fixed part is counted per pair).",
    "scaling": "AiR-single (dim 16, 4 heads, 1 block, dropout 0.5) training step, batch "
    "{scaling_batch}; ours with attn_dropout 0 (air-reg's kernel), naive with attention "
    "dropout 0.5. "
    "A point is skipped when the previous one, extrapolated as tokens^2, exceeds "
    f"{MAX_MB / 1e3:.0f} GB or {MAX_STEP_S} s per step.",
    "exponents": "Least-squares slopes of log(per-pair cost) against log(tokens); `top 3` uses "
    "the three largest token counts measured (where attention dominates the fixed costs).",
    "levers": "AiR-single p2 training, batch {batch}, one lever at a time against the baseline "
    "in the same rounds; speed-up = median over rounds of baseline time / lever time. "
    "`eval max |Δ|`: largest flow difference against the baseline in eval mode, same weights.",
    "profile": "`torch.profiler` over {profile_steps} training steps, batch {batch}, of "
    "AiR-single p2 as the paper configs run it (`bernoulli_` dropout masks) and of MAPT with "
    "`fast dropout`; top ops by self CPU time.",
}
TITLES = {
    "training": "1. Training throughput",
    "inference": "2. Batched inference and Demons",
    "memory": "3. Peak memory of a training step",
    "sizes": "3b. Larger images: 28, 128 and 256 pixels a side",
    "scaling": "4. Token-count scaling",
    "exponents": "4b. Growth exponents",
    "levers": "5. Levers",
    "profile": "6. Profile",
}


def report(name: str, profile: Profile, res: dict, loads: dict, took: dict) -> str:
    """``benchmark.md``: the machine, the targets, then every section's note and table."""
    load = ", ".join(f"{k} {v[0]:.2f}" for k, v in loads.items())
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    command = COMMAND + {"full": ""}.get(name, f" --{name}")
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


def _bars(ax, rows: list[dict], metric: str, title: str) -> None:
    rows = [r for r in rows if (r.get(metric) or 0) > 0]
    ax.barh([r["model"] for r in rows], [r[metric] for r in rows], color="tab:blue")
    ax.set(xscale="log" if rows else "linear", xlabel=metric, title=title)
    ax.tick_params(axis="x", which="minor", labelbottom=False)  # they overlap on short ranges
    ax.invert_yaxis()


def _lines(ax, rows: list[dict], metric: str) -> None:
    for impl, style in (("ours", "o-"), ("naive", "s--")):
        pts = [r for r in rows if r["impl"] == impl and (r.get(metric) or 0) > 0]
        ax.plot([p["tokens"] for p in pts], [p[metric] for p in pts], style, label=impl)
        if pts:
            ax.set(xscale="log", yscale="log")
    ax.set(xlabel="tokens", ylabel=metric, title=f"AiR-single training step: {metric}")
    ax.legend()


def plot(path: Path, res: dict[str, list[dict]]) -> None:
    """``benchmark.png``: throughput, inference against Demons, and scaling in time and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    _bars(axes[0, 0], res["training"], "pairs/s", "training throughput (log scale)")
    _bars(axes[0, 1], res["inference"], "ms/pair", "batched inference vs Demons (log scale)")
    _lines(axes[1, 0], res["scaling"], "ms/pair")
    _lines(axes[1, 1], res["scaling"], "MB/pair")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
