"""Real 2-D brain MRI at its own size: air-reg (one-shot, refined, model-free) vs ANTs SyN and
SimpleITK Demons on the same pairs, in the same run.

    python -m air_reg.data.brain         # once: data/brain_mni152/ from nilearn's wheel
    python experiments/brain_mri.py --train 00:00:05:00   # the networks first (5 min each)
    python experiments/brain_mri.py      # -> experiments/results/brain/
    python experiments/brain_mri.py --split val --out /tmp/brain_val   # how settings were chosen

Two kinds of held-out pairs at 233 x 197 (the slices' own size), none seen in training:
- real pairs: axial slices 2..6 apart (``pairs.csv``, split ``test``), scored by label Dice
  (grey and white matter), HD95, MSE and folding;
- known deformations: each test slice (and matplotlib's 256 x 256 head slice, never used for
  tuning) warped by a smooth random diffeomorphism of two kinds (a B-spline velocity and a
  Gaussian-smoothed one), scored by the end-point error on the head (where fixed > 0.02).
air-reg's rows go through ``air_reg.register.register`` -- the code of ``python -m
air_reg.register`` -- on folders of .npy pairs, its time being the computation it reports
(batched, pairs of one size at once); the peers are timed around their calls, pair by pair.
Writes table.md, results.csv, per_pair.csv and brain.png; the load average is logged. The
work: air_reg.bench.brain and air_reg.bench.brain_report.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from air_reg.bench import brain
from air_reg.bench.brain_report import figure, run_methods, write_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "brain"
log = logging.getLogger("brain_mri")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--steps", type=int, default=60, help="refine_steps of our rows")
    parser.add_argument("--seeds", type=int, default=2, help="known deformations per slice")
    parser.add_argument("--limit", type=int, default=None, help="first N pairs/slices (smoke)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="register overrides for our refined rows, e.g. refine.lr=0.5",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=["nets", "peers"],
        help="rows beside model-free refinement: nets, peers",
    )
    parser.add_argument(
        "--train",
        metavar="DD:HH:MM:SS",
        default=None,
        help="first train the four networks (NETS) for this budget each (00:00:05:00)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("air_reg").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    root = brain.data_root(REPO / "data" / "brain_mni152")
    if args.train:
        brain.train_networks(args.train, RESULTS / "runs", RESULTS / "weights")
    load = os.getloadavg()[0]
    log.info("load average %.2f at start, %d cores", load, os.cpu_count())

    pairs, slices = brain.load_split(root, args.split)
    if args.limit:
        pairs = pairs[: args.limit]
        slices = {n: slices[n] for n in sorted({n for p in pairs for n in p})}
    fixed = [slices[f] for f, _ in pairs]
    moving = [slices[m] for _, m in pairs]
    labels = [[brain.labels_of(root, p[i]) for p in pairs] for i in (0, 1)]
    sources = {"MNI152": [slices[n] for n in sorted(slices)]}
    if args.split == "test":
        sources["matplotlib s1045"] = [brain.extra_image(root)] * 4
    known = brain.known_sets(sources, args.seeds, torch.Generator().manual_seed(0))
    log.info("%d real pairs, known sets %s", len(pairs), {k: len(v[0]) for k, v in known.items()})

    rows = brain.methods(args.steps, args.set, args.only, RESULTS / "weights")
    results, per_pair = run_methods(rows, (fixed, moving, *labels), known)
    command = (
        f"python experiments/brain_mri.py --split {args.split} --steps {args.steps} "
        f"--seeds {args.seeds}"
    )
    print(write_report(args.out, results, known, per_pair, n_real=len(pairs), load=load,
                       split=args.split, command=command), end="")  # fmt: skip
    figure(args.out / "brain.png", fixed[0], moving[0], results)
    log.info("wrote %s (load average %.2f at the end)", args.out, os.getloadavg()[0])


if __name__ == "__main__":
    main()
