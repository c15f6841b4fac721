"""Table 1 as written, trained to convergence: DIRNet, AiR-single and AiR-MAPT until the
validation MSE plateaus, then scored on the fixed test pairs of the 5-minute tables.

    python experiments/converge.py --datasets mnist --models mapt   # one run, then --reuse
    python experiments/converge.py                       # paper settings, both datasets, CPU
    python experiments/converge.py --variant both --accelerator gpu   # + the authors' code's
    python experiments/converge.py --variant both --score-only   # score runs made apart
    python experiments/converge.py --datasets mnist --resume --max-steps 40000  # go on

Plateau rule (``air_reg.callbacks.plateaued``, config callbacks=plateau): at every validation
(every ``--val-every`` steps), once at least ``--min-steps`` steps are done, stop when the best
validation MSE so far is less than ``--min-delta`` (relative) below the best one at or before
step (1 - ``--patience-fraction``) x the current step. ``--max-steps`` and ``--max-time`` (per
run) cap it; ``--resume`` goes on with runs a cap stopped, from their last.ckpt, and the caps
then count the whole run. Variants and scoring: air_reg.bench.convergence. Writes to
experiments/results/converged/ (README.md there describes each file).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from air_reg import zoo
from air_reg.bench.convergence import NAMES, VARIANTS, Caps, score_dataset, train_all, write_curves
from air_reg.classical import has_simpleitk
from air_reg.utils import write_text

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("converge")
DATASETS = zoo.DATASETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="paper")
    parser.add_argument("--max-steps", type=int, default=40000, help="cap per run")
    parser.add_argument("--max-time", default="00:02:00:00", help="cap per run, DD:HH:MM:SS")
    parser.add_argument("--min-steps", type=int, default=3000, help="no plateau stop before")
    parser.add_argument("--val-every", type=int, default=250, help="steps between validations")
    parser.add_argument("--patience-fraction", type=float, default=0.25)
    parser.add_argument("--min-delta", type=float, default=0.01, help="relative improvement")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--test-pairs", type=int, default=1000)
    parser.add_argument("--val-pairs", type=int, default=1000)
    parser.add_argument("--folding-note", type=float, default=1.0, help="note rows above this %%")
    parser.add_argument("--no-demons", action="store_true", help="skip the SimpleITK row")
    parser.add_argument("--reuse", action="store_true", help="keep runs that have a stop.json")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with runs that stopped at a cap, from their last.ckpt, under these caps "
        "(counted over the whole run); runs that plateaued are kept",
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="train nothing: score the runs that have a stop.json (after split runs)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/converged")
    args = parser.parse_args()
    args.max_steps = -(-args.max_steps // args.val_every) * args.val_every  # ends on a validation
    if args.resume and args.score_only:
        parser.error("--resume trains and --score-only does not: choose one")
    caps = Caps(**{f.name: getattr(args, f.name) for f in fields(Caps)})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    use_demons = has_simpleitk() and not args.no_demons
    if not use_demons:
        log.warning("no Demons row (SimpleITK missing or --no-demons)")
    rule = (
        f"validation every {args.val_every} steps; stop at the first validation at step s >= "
        f"{args.min_steps} where the best val MSE so far is less than {100 * args.min_delta:g} % "
        f"below the best at or before step {1 - args.patience_fraction:g} s; caps "
        + (
            "per run in the runs tables (runs made apart, scored here with --score-only)"
            if args.score_only
            else f"{args.max_steps} steps and {args.max_time} (DD:HH:MM:SS) per run"
        )
    )
    apart = (
        " (scores the runs made apart, e.g. by `bash experiments/converge_cpu.sh`; each "
        "run's caps and threads are in the runs tables)"
    )
    report = [
        "# Table 1 trained to convergence\n\n",
        f"Command: `python experiments/converge.py {shlex.join(sys.argv[1:])}`"
        + (apart if args.score_only else "")
        + "\n\n",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, accelerator {args.accelerator}; load average at start "
        f"{os.getloadavg()[0]:.1f}. Trained on same-class pairs; {args.test_pairs} same-class "
        f"test pairs (reproduce.py's, same seeds).\n\nPlateau rule: {rule}.\n",
    ]
    started = time.time()
    for data in args.datasets:
        runs = train_all(data, variants, args.models, caps, args.out, reuse=args.reuse,
                         resume=args.resume, score_only=args.score_only)  # fmt: skip
        if not runs:
            log.warning("no runs for %s: nothing to score", data)
            continue
        report += score_dataset(data, runs, caps, args.out, use_demons)
        report.append(write_curves(args.out, data, runs))
    report.append(f"\nTotal wall time: {(time.time() - started) / 60:.1f} min.\n")
    write_text(args.out / "results.md", "".join(report))
    log.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()
