"""One-shot vs cascade vs instance-optimisation refinement vs Demons and ANTs SyN, same pairs.

    python experiments/refine_benchmark.py            # shipped air_unet and voxelmorph, 200 pairs
    python experiments/refine_benchmark.py --weights mapt_tuned --pairs 50 --steps 10 50
    python experiments/refine_benchmark.py --checkpoints <run>/checkpoints/last.ckpt  # zero-shot

For each dataset and each shipped model (``--weights``: air_reg/weights/<name>_<data>.ckpt;
AiR-UNet and the VoxelMorph peer by default): the model one-shot, in a cascade and refined by
N steps, beside SimpleITK's Demons and ANTs SyN, on same-class test pairs (Dice, MSE, folding,
SDlogJ, ms/pair) and on pairs with a KNOWN deformation (a test image warped by a smooth random
diffeomorphism: end-point error). Writes experiments/results/refine/: table_<data>.md,
table_<data>_known.md, results.csv, results.md and quality_vs_time.png.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path

import air_reg
from air_reg import zoo
from air_reg.bench.pairs import benchmark_batches, known_deformation_batches
from air_reg.bench.refinement import methods_for, plot_quality_vs_time, refine_preset
from air_reg.classical import ants_syn, demons, has_ants, has_simpleitk
from air_reg.scoring import markdown_table, score, summarise
from air_reg.utils import write_text

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("refine_benchmark")
KEYS = ("dice", "mse", "folding", "sdlogj", "epe")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion"])
    parser.add_argument(
        "--weights",
        nargs="+",
        default=["air_unet", "voxelmorph"],
        help="shipped models: air_reg/weights/<name>_<data>.ckpt",
    )
    parser.add_argument("--checkpoints", nargs="+", default=[], type=Path,
                        help="more models by .ckpt path, the same on every dataset (zero-shot: "
                        "e.g. logs/foundation/air_match_synth/checkpoints/last.ckpt)")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=200, help="pairs refined at once")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 35, 50, 100])
    parser.add_argument("--cascades", type=int, nargs="*", default=[2])
    parser.add_argument("--preset", default="default", help="conf/refinement/<preset>.yaml")
    parser.add_argument("--magnitude", type=float, default=2.0, help="known warps, pixels")
    parser.add_argument("--no-ants", action="store_true", help="skip the ANTs SyN row")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "refine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    peers = {}
    if has_simpleitk():
        peers["Demons"] = demons
    if has_ants() and not args.no_ants:
        peers["ANTs SyN"] = ants_syn
    load = os.getloadavg()[0]
    preset = refine_preset(args.preset)
    rows, report = [], [f"load average at start {load:.1f}; refinement preset {preset}\n"]
    for data in args.datasets:
        methods = {}
        for name in args.weights:
            model = air_reg.load_model(zoo.WEIGHTS_DIR / f"{name}_{data}.ckpt")
            label = zoo.label_of(name) if len(args.weights) > 1 else ""
            methods.update(methods_for(model, args.steps, args.cascades, preset, label))
        for path in args.checkpoints:  # trained elsewhere (data=synth): zero-shot here
            model = air_reg.load_model(path)
            name = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
            methods.update(methods_for(model, args.steps, args.cascades, preset, name))
        methods.update(peers)
        batches = benchmark_batches(data, "same_class", args.pairs, batch_size=args.batch)
        known = known_deformation_batches(batches, args.magnitude)
        for kind, bs in (("same_class", batches), ("known", known)):
            per_pair, ms = score(methods, bs)
            summary = summarise(per_pair)
            table = markdown_table(
                {n: {k: s[k] for k in KEYS if k in s} for n, s in summary.items()}, ms
            )
            tag = f"{data}" if kind == "same_class" else f"{data}_known"
            write_text(args.out / f"table_{tag}.md", table)
            report += [f"\n## {data}, {kind} pairs\n", table]
            rows += [
                {"data": data, "pairs": kind, "method": name, "ms_per_pair": ms[name],
                 **{k: s[k]["mean"] for k in KEYS if k in s}}
                for name, s in summary.items()
            ]  # fmt: skip
    with open(args.out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["data", "pairs", "method", "ms_per_pair", *KEYS])
        writer.writeheader()
        writer.writerows(rows)
    plot_quality_vs_time(rows, args.out / "quality_vs_time.png")
    write_text(args.out / "results.md", "".join(report))
    log.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()
