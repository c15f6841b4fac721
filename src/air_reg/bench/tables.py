"""The benchmark tables: a scored run as markdown and CSV, the mean ± spread over seeds, and the
compact tables of docs/results.md with the paper's quality bar.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import torch

from air_reg.scoring import markdown_table, summarise, write_per_pair_csv

# docs/results.md's compact tables: metric -> (label, decimals)
COMPACT_ROWS = {
    "mse": ("MSE", 4),
    "psnr": ("PSNR (dB)", 2),
    "smooth_dice": ("smooth Dice", 3),
    "dice": ("Dice (fg > 0.5)", 3),
    "folding": ("folding %", 2),
}
# The paper's MAPT gains over Original (Table 1: MSE 0.0647 -> 0.027, PSNR 12.941 -> 17.311 dB,
# smooth Dice 0.756 -> 0.827): the bar our models are held to.
PAPER_GAIN = {"mse": 0.027 / 0.0647 - 1, "psnr": 17.311 - 12.941, "smooth_dice": 0.827 - 0.756}


def checkpoint_name(source: str) -> str:
    """A checkpoint's short name in a table: the weights name, or its run folder's
    (``logs/.../<run>/checkpoints/last.ckpt`` -> ``<run>``), else the file's stem."""
    path = Path(source)
    if path.suffix != ".ckpt":
        return source
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def write_tables(out: Path, tag: str, per_pair: dict, ms: dict) -> str:
    """``table_<tag>.md`` (methods as columns), ``table_<tag>.csv`` (method, metric, mean,
    std, n) and ``per_pair_<tag>.csv`` in ``out``; returns the markdown table."""
    summary = summarise(per_pair)
    table = markdown_table(summary, ms)
    (out / f"table_{tag}.md").write_text(table)
    with open(out / f"table_{tag}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "metric", "mean", "std", "n"])
        for method, metrics in summary.items():
            for k, v in metrics.items():
                writer.writerow([method, k, f"{v['mean']:.6g}", f"{v['std']:.6g}", v["n"]])
    write_per_pair_csv(out / f"per_pair_{tag}.csv", per_pair)
    return table


def seed_table(summary: dict, groups: dict[str, list[str]]) -> str:
    """Markdown: each metric's mean over a method's seed rows ± the std over those seeds
    (``groups``: method -> its rows in ``summary``); rows outside ``groups`` by their mean.
    The std over pairs is not reported: the spread here is what another seed would change."""
    single = [n for n in summary if not any(n in rows for rows in groups.values())]
    names = [*single, *groups]
    head = ["metric", *(f"{g} ({len(groups[g])} seeds)" if g in groups else g for g in names)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for metric in dict.fromkeys(k for row in summary.values() for k in row):
        cells = [metric]
        for name in names:
            rows = [r for r in groups.get(name, [name]) if metric in summary[r]]
            means = torch.tensor([summary[r][metric]["mean"] for r in rows])
            if len(means) == 0:
                cells.append("")
            elif len(means) == 1:
                cells.append(f"{means.item():.4f}")
            else:
                cells.append(f"{means.mean().item():.4f} ± {means.std().item():.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_table_csv(path: Path) -> dict[str, dict[str, tuple[float, float, int]]]:
    """A ``table_<tag>.csv`` of ``write_tables``: method -> metric -> (mean, std, n)."""
    out: dict[str, dict] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            out.setdefault(r["method"], {})[r["metric"]] = (
                float(r["mean"]),
                float(r["std"]),
                int(r["n"]),
            )
    return out


def compact_table(results: dict) -> str:
    """docs/results.md's layout: methods as columns, ``COMPACT_ROWS`` as rows, mean ± std."""
    methods = list(results)
    lines = ["| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for metric, (label, d) in COMPACT_ROWS.items():
        cells = [f"{results[m][metric][0]:.{d}f} ± {results[m][metric][1]:.{d}f}" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_bar(results: dict, method: str) -> str:
    """``method``'s gains over Original beside the paper's MAPT gains, and whether each bar
    is met (folding: under 0.1 %)."""
    orig, ours = results["Original"], results[method]
    got = {
        "mse": ours["mse"][0] / orig["mse"][0] - 1,
        "psnr": ours["psnr"][0] - orig["psnr"][0],
        "smooth_dice": ours["smooth_dice"][0] - orig["smooth_dice"][0],
    }
    rows = [
        f"| MSE | {got['mse']:+.1%} | {PAPER_GAIN['mse']:+.1%} | "
        f"{got['mse'] <= PAPER_GAIN['mse']} |",
        f"| PSNR | {got['psnr']:+.2f} dB | {PAPER_GAIN['psnr']:+.2f} dB | "
        f"{got['psnr'] >= PAPER_GAIN['psnr']} |",
        f"| smooth Dice | {got['smooth_dice']:+.3f} | {PAPER_GAIN['smooth_dice']:+.3f} | "
        f"{got['smooth_dice'] >= PAPER_GAIN['smooth_dice']} |",
        f"| folding % | {ours['folding'][0]:.3f} | < 0.1 | {ours['folding'][0] < 0.1} |",
    ]
    head = f"| {method} vs Original | ours | paper's MAPT | bar met |\n|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


@contextlib.contextmanager
def csv_rows(path: Path, fields):
    """A sink writing each call's rows to the CSV at ``path`` at once (floats to 5 significant
    digits), so a run cut short keeps the rows it made."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()

        def sink(rows: list[dict]) -> None:
            w.writerows({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in r.items()}
                        for r in rows)  # fmt: skip
            fh.flush()

        yield sink
