"""One-shot vs cascade vs instance-optimisation refinement vs Demons and ANTs SyN, same pairs.

    python experiments/refine_benchmark.py            # shipped air_unet and voxelmorph, 200 pairs
    python experiments/refine_benchmark.py --weights mapt_tuned --pairs 50 --steps 10 50

For each dataset and each shipped model (``--weights``: air_reg/weights/<name>_<data>.ckpt;
AiR-UNet and the VoxelMorph peer by default): the model one-shot, in a cascade and refined by
N steps, beside SimpleITK's Demons and ANTs SyN, on same-class test pairs (Dice, MSE, folding,
SDlogJ, ms/pair) and on pairs with a KNOWN deformation (a test image warped by a smooth random
diffeomorphism: end-point error). Writes experiments/results/refine/: table_<data>.md,
table_<data>_known.md, results.csv and quality_vs_time.png.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import air_reg
from air_reg.checkpoint import WEIGHTS_DIR
from air_reg.classical import ants_syn, demons, has_ants, has_simpleitk
from air_reg.config import compose_config
from air_reg.data.synthetic import make_flows
from air_reg.scoring import markdown_table, score, summarise
from air_reg.models.components.spatial_transformer import integrate_velocity, warp
from air_reg.refine import Refiner, cascade, load_preset
from air_reg.utils import write_text, write_with

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("refine_benchmark")
KEYS = ("dice", "mse", "folding", "sdlogj", "epe")


def test_pairs_batches(data: str, n: int, batch: int) -> list[dict]:
    """The first ``n`` same-class test pairs of ``data``, in batches."""
    cfg = compose_config(
        "train",
        [
            f"data={data}",
            "data.pairing=same_class",
            f"data.num_test_pairs={n}",
            f"data.eval_batch_size={batch}",
        ],
        REPO / "outputs",
    )
    dm = instantiate(cfg.data)
    dm.setup("test")
    return list(dm.test_dataloader())


def known_deformation_batches(batches: list[dict], magnitude: float, seed: int = 0) -> list[dict]:
    """The same moving images, each with a fixed image made by a known smooth diffeomorphism."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        moving = b["moving"]
        velocity = make_flows(len(moving), moving.shape[-1], magnitude, g)
        flow = integrate_velocity(velocity, 7)  # (B, 2, H, W), folding-free
        out.append({"fixed": warp(moving, flow), "moving": moving, "flow": flow})
    return out


def refine_preset(name: str = "default") -> dict:
    """The refinement settings of ``conf/refinement/<name>.yaml``: ``default`` is what eval,
    register and load_model use (one source of truth); the 2026-11-26 tables used the former
    ``diffeomorphic`` preset (``--preset diffeomorphic``)."""
    return load_preset(name)


def methods_for(
    model, steps: list[int], cascades: list[int], preset: dict, label: str = ""
) -> dict:
    """One model one-shot, in cascades and refined; row names start with ``label``."""
    prefix = f"{label} " if label else ""
    methods = {f"{prefix}one-shot": model}
    for k in cascades:
        methods[f"{prefix}cascade x{k}"] = lambda f, m, k=k: cascade(model, f, m, k)
    for n in steps:
        methods[f"{prefix}refined {n}"] = Refiner(model, steps=n, **preset)
    return methods


def plot(rows: list[dict], path: Path) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion"])
    parser.add_argument(
        "--weights",
        nargs="+",
        default=["air_unet", "voxelmorph"],
        help="shipped models: air_reg/weights/<name>_<data>.ckpt",
    )
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=200, help="pairs refined at once")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 35, 50, 100])
    parser.add_argument("--cascades", type=int, nargs="+", default=[2])
    parser.add_argument("--preset", default="default", help="conf/refinement/<preset>.yaml")
    parser.add_argument("--magnitude", type=float, default=2.0, help="known warps, pixels")
    parser.add_argument("--no-ants", action="store_true", help="skip the ANTs SyN row")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "refine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    peers = {}
    if has_simpleitk():
        peers["Demons"] = demons
    if has_ants() and not args.no_ants:
        peers["ANTs SyN"] = ants_syn
    # reproduce imports this module, so not at the top; experiments/ is on the path here
    from reproduce import SHIPPED

    labels = {name: label for label, name in SHIPPED.items()}  # air_unet -> "AiR-UNet", ...
    load = os.getloadavg()[0]
    preset = refine_preset(args.preset)
    rows, report = [], [f"load average at start {load:.1f}; refinement preset {preset}\n"]
    for data in args.datasets:
        methods = {}
        for name in args.weights:
            model = air_reg.load_model(WEIGHTS_DIR / f"{name}_{data}.ckpt")
            label = labels.get(name, name) if len(args.weights) > 1 else ""
            methods.update(methods_for(model, args.steps, args.cascades, preset, label))
        methods.update(peers)
        batches = test_pairs_batches(data, args.pairs, args.batch)
        for kind, bs in (
            ("same_class", batches),
            ("known", known_deformation_batches(batches, args.magnitude)),
        ):
            per_pair, ms = score(methods, bs)
            summary = summarise(per_pair)
            table = markdown_table(
                {n: {k: s[k] for k in KEYS if k in s} for n, s in summary.items()}, ms
            )
            tag = f"{data}" if kind == "same_class" else f"{data}_known"
            write_text(args.out / f"table_{tag}.md", table)
            report += [f"\n## {data}, {kind} pairs\n", table]
            for name, s in summary.items():
                rows.append(
                    {
                        "data": data,
                        "pairs": kind,
                        "method": name,
                        "ms_per_pair": ms[name],
                        **{k: s[k]["mean"] for k in KEYS if k in s},
                    }
                )
    with open(args.out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["data", "pairs", "method", "ms_per_pair", *KEYS])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "quality_vs_time.png")
    write_text(args.out / "results.md", "".join(report))
    log.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()
