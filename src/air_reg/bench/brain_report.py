"""The brain benchmark's run and report: every method on the real and the known pairs, then
table.md, results.csv, per_pair.csv and brain.png (``air_reg.bench.brain`` has the parts)."""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from air_reg.bench.brain import mean, score_known, score_real
from air_reg.models.components.spatial_transformer import warp

log = logging.getLogger(__name__)


def run_methods(methods: dict, real: tuple, known: dict) -> tuple[dict, list[dict]]:
    """Each method on the real pairs ``(fixed, moving, fixed labels, moving labels)`` and on
    each known set ``(fixed, moving, targets)``: ``{method: {set: {metric: mean, "ms"}}}``
    (plus the first real pair's flow under "example") and the per-pair rows."""
    fixed, moving, f_labels, m_labels = real
    results, per_pair = {}, []
    for name, run in methods.items():
        res = {}
        flows, seconds = run(fixed, moving)
        rows = score_real(flows, fixed, moving, f_labels, m_labels)
        res["real"] = {k: mean(rows, k) for k in rows[0]} | {"ms": 1000 * seconds / len(flows)}
        per_pair += [{"method": name, "set": "real", "pair": i, **r} for i, r in enumerate(rows)]
        first_flows = flows[:1]
        for set_name, (kf, km, targets) in known.items():
            flows, seconds = run(kf, km)
            rows = score_known(flows, targets, kf)
            res[set_name] = {k: mean(rows, k) for k in rows[0]} | {
                "ms": 1000 * seconds / len(flows)
            }
            per_pair += [{"method": name, "set": set_name, "pair": i, **r}
                         for i, r in enumerate(rows)]  # fmt: skip
        res["example"] = first_flows[0]
        results[name] = res
        log.info("%s: %s", name, {k: v for k, v in res.items() if k != "example"})
    return results, per_pair


def write_report(out: Path, results: dict, known: dict, per_pair: list[dict], *, n_real: int,
                 load: float, split: str, command: str) -> str:  # fmt: skip
    """table.md, results.csv and per_pair.csv in ``out``; returns table.md's text."""
    names = list(results)
    lines = [
        f"# Brain MRI at 233 x 197 ({split} split), {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`{command}`; {os.cpu_count()} CPU cores, load average {load:.2f} at "
        "start. ms/pair: air-reg's rows are the computation `register` reports (batched); "
        "the peers' their calls, pair by pair.",
        "",
        f"## Real pairs (slices 2..6 apart, {n_real} pairs): label Dice, HD95 (px), folding (%)",
        "",
        "| method | Dice GM | Dice WM | Dice (mean) | HD95 | MSE | folding % | ms/pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = results[n]["real"]
        lines.append(
            f"| {n} | {r['dice_gm']:.4f} | {r['dice_wm']:.4f} | {r['dice']:.4f} | "
            f"{r['hd95']:.3f} | {r['mse']:.5f} | {r['folding']:.3f} | {r['ms']:.1f} |"
        )
    lines += ["", "## Known smooth deformations (max 6 px): end-point error on the head (px)", ""]
    sets = list(known)
    lines.append("| method | " + " | ".join(f"EPE {s} ({len(known[s][0])})" for s in sets)
                 + " | folding % (max) | ms/pair |")  # fmt: skip
    lines.append("|---" * (len(sets) + 3) + "|")
    for n in names:
        r = results[n]
        fold = max(r[s]["folding"] for s in sets)
        ms = sum(r[s]["ms"] for s in sets) / len(sets)
        lines.append(f"| {n} | " + " | ".join(f"{r[s]['epe']:.4f}" for s in sets)
                     + f" | {fold:.3f} | {ms:.1f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "set", "metric", "value"])
        for n in names:
            for s, r in results[n].items():
                if s != "example":
                    writer.writerows([n, s, k, f"{v:.6g}"] for k, v in r.items())
    with open(out / "per_pair.csv", "w", newline="") as fh:
        keys = list(dict.fromkeys(k for r in per_pair for k in r))
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(per_pair)
    return text


def figure(path: Path, fixed: np.ndarray, moving: np.ndarray, results: dict) -> None:
    """Fixed, moving and each method's warped first pair, with |warped - fixed| below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [n for n in results if n != "identity"]
    fig = Figure(figsize=(2.2 * (len(shown) + 2), 5.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(shown) + 2)
    m_t = torch.from_numpy(moving)[None, None]
    axes[0, 0].imshow(fixed, cmap="gray")
    axes[0, 0].set_title("fixed", fontsize=8)
    axes[0, 1].imshow(moving, cmap="gray")
    axes[0, 1].set_title("moving", fontsize=8)
    axes[1, 1].imshow(np.abs(moving - fixed), cmap="magma", vmin=0, vmax=0.5)
    axes[1, 1].set_title("|moving - fixed|", fontsize=8)
    for j, n in enumerate(shown, start=2):
        flow = torch.from_numpy(results[n]["example"])[None]
        warped = warp(m_t, flow)[0, 0].numpy()
        axes[0, j].imshow(warped, cmap="gray")
        axes[0, j].set_title(n, fontsize=7)
        axes[1, j].imshow(np.abs(warped - fixed), cmap="magma", vmin=0, vmax=0.5)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
