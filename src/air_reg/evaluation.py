"""Score registration methods on the same pairs: per-pair metrics, then mean +- std."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from air_reg import metrics as M
from air_reg.models.components.spatial_transformer import warp

# A method maps (fixed, moving) batches to a flow (B, 2, H, W) in pixels.
Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def identity_method(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """No registration: the "Original" row."""
    return fixed.new_zeros(fixed.shape[0], 2, *fixed.shape[-2:])


@torch.no_grad()
def score(
    methods: dict[str, Method], batches: Iterable[dict], progress: bool = True
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Per-pair metrics ``{method: {metric: (P,)}}`` and each method's ms per pair."""
    values: dict[str, dict[str, list]] = {name: {} for name in methods}
    seconds = dict.fromkeys(methods, 0.0)
    pairs = 0
    batches = tqdm(batches, desc="scoring pairs", disable=not progress, unit="batch")
    for i, batch in enumerate(batches):
        fixed, moving = batch["fixed"], batch["moving"]
        pairs += fixed.shape[0]
        for name, method in methods.items():
            if i == 0:  # untimed warm-up call (lazy init, allocator, threads)
                method(fixed[:2], moving[:2])
            start = time.perf_counter()
            flow = method(fixed, moving)
            seconds[name] += time.perf_counter() - start
            warped = warp(moving, flow)
            for k, v in M.pair_metrics(fixed, warped, flow, batch.get("flow")).items():
                values[name].setdefault(k, []).append(v.cpu())
    per_pair = {n: {k: torch.cat(v) for k, v in d.items()} for n, d in values.items()}
    ms = {n: 1000 * s / max(pairs, 1) for n, s in seconds.items()}
    return per_pair, ms


def summarise(per_pair: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, dict]]:
    """``{method: {metric: {"mean", "std", "n"}}}`` (std over pairs, unbiased)."""
    return {
        name: {
            k: {"mean": v.double().mean().item(), "std": v.double().std().item(), "n": len(v)}
            for k, v in metrics.items()
        }
        for name, metrics in per_pair.items()
    }


def markdown_table(summary: dict, ms_per_pair: dict[str, float] | None = None) -> str:
    """Methods as columns, metrics as rows, ``mean ± std`` cells (Table 1's layout)."""
    names = list(summary)
    keys = list(dict.fromkeys(k for s in summary.values() for k in s))
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        cells = [
            f"{summary[n][k]['mean']:.4f} ± {summary[n][k]['std']:.4f}" if k in summary[n] else ""
            for n in names
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if ms_per_pair:
        lines.append("| ms/pair | " + " | ".join(f"{ms_per_pair[n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_per_pair_csv(path, per_pair: dict[str, dict[str, torch.Tensor]]) -> None:
    """One row per (method, pair) with every metric as a column."""
    keys = list(dict.fromkeys(k for d in per_pair.values() for k in d))
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "pair", *keys])
        for name, d in per_pair.items():
            n = len(next(iter(d.values())))
            for i in range(n):
                writer.writerow(
                    [name, i, *(f"{d[k][i].item():.6g}" if k in d else "" for k in keys)]
                )
