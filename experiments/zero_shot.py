"""The zero-shot benchmark of issue #32, one command: models trained on synthetic pairs only
(and the shipped dataset-trained ones) on data no model trained on, beside ANTs SyN, Demons,
model-free refinement and the identity, the same pairs for every method.

    python experiments/zero_shot.py                     # -> experiments/results/zero_shot/
    python experiments/zero_shot.py --quick    # 3 pairs a family at 96 x 128, 20 digit pairs
    python experiments/zero_shot.py --batched-only  # families/batched.md alone, ~2 min

Families (``air_reg.bench.families``, held-out sources: scikit-image's images and MNI152
slices under small, large (affine + deformable) and contrast-change known fields): EPE,
folding, ms per pair, one-shot and refined (refine_families.py --models). Digits (MNIST and
Fashion-MNIST same-class test pairs and the same images under known warps): Dice, EPE
(refine_benchmark.py --checkpoints). ANTs uses Mattes MI on the contrast family.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from air_reg import zoo
from air_reg.bench import families
from air_reg.bench.family_bench import batched

ABLATIONS = ("air_match_local_synth", "voxelmorph_synth")  # experiments/train_foundation.sh

REPO = Path(__file__).resolve().parents[1]
# The shipped default (register's), then its ablations at the same budget (6250 steps of the
# same synthetic pairs): the global match replaced by a local window, and the plain U-Net
# (their weights at step 6250, kept in git; training went on to 8750: results/zero_shot/
# budget_8750/).
MODELS = [str(zoo.WEIGHTS_DIR / f"{zoo.default_weights()}.ckpt")] + [
    str(REPO / "experiments" / "results" / "foundation" / e / "checkpoints" / "step6250.ckpt")
    for e in ABLATIONS
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help=".ckpt paths trained elsewhere")
    p.add_argument("--shipped", nargs="+", default=["air_unet_mnist"], help="shipped weights")
    p.add_argument("--quick", action="store_true")
    only = "only the batched one-shot table (families/batched.md), ~2 min"
    p.add_argument("--batched-only", action="store_true", help=only)
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "zero_shot")
    args = p.parse_args()
    models = [m for m in args.models if Path(m).is_file()]
    for missing in sorted(set(args.models) - set(models)):
        print(
            f"zero_shot: {missing} not found (train it: experiments/train_foundation.sh), "
            "row left out",
            file=sys.stderr,
        )
    quick = ["--quick", "--pairs", "3"] if args.quick else []
    # ANTs both ways: its affine stage helps large motions, and hurts contrast changes
    methods = ["identity", "refine", "refine_mi", "syn", "syn_affine", "demons"]
    # the U-Net ablation also at AiR-Match's inference (up to 6 passes, the affine fit between
    # them, a pair stopping once a pass moved it < 0.25 px)
    cascaded = [m for m in models if "voxelmorph" in m]
    cascaded = ["--cascaded", *cascaded] if cascaded else []
    if not args.batched_only:
        run("refine_families.py", [*quick, "--methods", *methods, "--models", *models,
                                   *args.shipped, *cascaded,
                                   "--out", str(args.out / "families")])  # fmt: skip
    # one-shot, the family's pairs in one call (register on a folder): ms per pair, batched
    n, size = (3, (96, 128)) if args.quick else (18, families.SIZE)
    table = batched(models + args.shipped, list(families.FAMILIES), n, size)
    (args.out / "families" / "batched.md").write_text(
        f"# One-shot, batched ({n} pairs a call, {size[0]} x {size[1]}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {torch.get_num_threads()} torch threads, load "
        f"{os.getloadavg()[0]:.2f})\n\n" + table
    )
    print(table)
    if args.batched_only:
        return
    digits = ["--pairs", "20", "--batch", "20", "--no-ants"] if args.quick else []
    digits += ["--checkpoints", *models] if models else []
    run("refine_benchmark.py", [*digits, "--weights", "air_unet", "--steps", "50",
                                "--cascades", "--out", str(args.out / "digits")])  # fmt: skip


def run(script: str, argv: list[str]) -> None:
    """One of the benchmark scripts beside this one, as its own process."""
    subprocess.run([sys.executable, str(Path(__file__).parent / script), *argv], check=True)


if __name__ == "__main__":
    main()
