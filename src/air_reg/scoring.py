"""Score registration methods on the same pairs: per-pair metrics, then mean +- std.

Batches with "fixed_labels"/"moving_labels" also get label Dice, HD95 and the dataset's DSC30.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from air_reg import metrics as M
from air_reg.models.components.spatial_transformer import warp

# A method maps (fixed, moving) batches to a flow (B, 2, H, W) in pixels.
Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# NaN = no label shared by the pair (docs/metrics.md): such pairs are left out of the summary.
NAN_SKIPPED = ("dice_labels", "hd95")
DATASET_LEVEL = {"dsc30": ("dice_labels", M.dsc30)}  # name: (per-pair metric, reduction)
PER_LABEL = "_dice_per_label"  # collected (B, K), reported as dice_label_1 .. dice_label_K


def identity_method(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """No registration: the "Original" row."""
    return fixed.new_zeros(fixed.shape[0], fixed.ndim - 2, *fixed.shape[2:])  # 2-D or 3-D


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
            metrics = M.pair_metrics(fixed, warped, flow, batch.get("flow"))
            labels = [batch.get(k) for k in ("fixed_labels", "moving_labels")]
            if any(x is not None for x in labels):  # + Dice of each label, (B, K)
                per_label, label_means = M.label_metrics(*labels, flow)
                metrics |= label_means | {PER_LABEL: per_label}
            for k, v in metrics.items():
                values[name].setdefault(k, []).append(v.cpu())
    per_pair = {n: _columns(d) for n, d in values.items()}
    ms = {n: 1000 * s / max(pairs, 1) for n, s in seconds.items()}
    return per_pair, ms


def _columns(values: dict[str, list]) -> dict[str, torch.Tensor]:
    """Concatenated per-pair metrics; the (B, K) per-label Dice as columns dice_label_<k>
    (batches with fewer labels padded with NaN: absent)."""
    out = {k: torch.cat(v) for k, v in values.items() if k != PER_LABEL}
    if PER_LABEL in values:
        k_max = max(t.shape[1] for t in values[PER_LABEL])
        pad = [F.pad(t, (0, k_max - t.shape[1]), value=float("nan")) for t in values[PER_LABEL]]
        for k, column in enumerate(torch.cat(pad).unbind(1), start=1):
            out[f"dice_label_{k}"] = column
    return out


def _mean_std(k: str, v: torch.Tensor) -> dict:
    v = v.double()
    if k in NAN_SKIPPED or k.startswith("dice_label_"):
        v = v[~v.isnan()]
    return {"mean": v.mean().item(), "std": v.std().item(), "n": len(v)}


def summarise(per_pair: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, dict]]:
    """``{method: {metric: {"mean", "std", "n"}}}`` (std over pairs, unbiased).

    Dataset-level numbers (``dsc30``) have the value as "mean" and ``std: None``.
    """
    summary = {}
    for name, metrics in per_pair.items():
        summary[name] = {k: _mean_std(k, v) for k, v in metrics.items()}
        for key, (source, reduce) in DATASET_LEVEL.items():
            if source in metrics:
                v = metrics[source]
                n = int((~v.isnan()).sum())
                summary[name][key] = {"mean": reduce(v).item(), "std": None, "n": n}
    return summary


def markdown_table(summary: dict, ms_per_pair: dict[str, float] | None = None) -> str:
    """Methods as columns, metrics as rows, ``mean ± std`` cells (Table 1's layout).

    Dataset-level rows (``dsc30``) show their one value.
    """
    names = list(summary)
    keys = list(dict.fromkeys(k for s in summary.values() for k in s))
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        cells = [_cell(summary[n][k]) if k in summary[n] else "" for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if ms_per_pair:
        lines.append("| ms/pair | " + " | ".join(f"{ms_per_pair[n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def _cell(entry: dict) -> str:
    if entry["std"] is None:  # a dataset-level number
        return f"{entry['mean']:.4f}"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


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
