"""Compact results tables (docs/results.md) and the quality-bar check from reproduce.py CSVs.

    python experiments/readme_tables.py                       # experiments/results/full
    python experiments/readme_tables.py experiments/results/quick

Reads table_<data>_<pairing>.csv (written by reproduce.py) and prints, in markdown, the compact
tables docs/results.md shows and the gains of our models (tuned MAPT, AiR-UNet) over "Original"
against the paper's MAPT gains (Table 1: MSE 0.0647 -> 0.027, PSNR 12.941 -> 17.311 dB, smooth
Dice 0.756 -> 0.827).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {  # metric -> (label, decimals)
    "mse": ("MSE", 4),
    "psnr": ("PSNR (dB)", 2),
    "smooth_dice": ("smooth Dice", 3),
    "dice": ("Dice (fg > 0.5)", 3),
    "folding": ("folding %", 2),
}
TITLES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}
PAPER_GAIN = {"mse": 0.027 / 0.0647 - 1, "psnr": 17.311 - 12.941, "smooth_dice": 0.827 - 0.756}
OURS = ("AiR-MAPT tuned", "AiR-UNet")  # the models whose gains are checked against the bar


def read(path: Path) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> metric -> (mean, std, n)."""
    out: dict[str, dict] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            out.setdefault(r["method"], {})[r["metric"]] = (
                float(r["mean"]),
                float(r["std"]),
                int(r["n"]),
            )
    return out


def table(results: dict) -> str:
    methods = list(results)
    lines = ["| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for metric, (label, d) in ROWS.items():
        cells = [f"{results[m][metric][0]:.{d}f} ± {results[m][metric][1]:.{d}f}" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gains(results: dict, method: str) -> str:
    """``method`` against Original, beside the paper's MAPT gains (the quality bar)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=REPO / "experiments/results/full")
    args = parser.parse_args()
    for data, title in TITLES.items():
        for pairing in ("same_class", "random"):
            path = args.folder / f"table_{data}_{pairing}.csv"
            if not path.exists():
                continue
            results = read(path)
            n = next(iter(results.values()))["mse"][2]
            kind = "same class" if pairing == "same_class" else "random"
            print(f"**{title}, {kind} test pairs** ({n:,} pairs; mean ± std)\n")
            print(table(results))
            for method in OURS:
                if method in results and "Original" in results:
                    print(gains(results, method))


if __name__ == "__main__":
    main()
