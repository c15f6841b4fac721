"""The shipped AiR-Match one-shot (its cascade of up to 6 passes) with the fixed images encoded
once (``contract.fixed_state``, the default) against once a pass (the network without the
option), interleaved in one run, on the held-out families (issue #32's time target).

    python experiments/cascade_speed.py      # ~2 min on 2 cores; results/cascade_speed/

Both rows are the same computation: the flows must be equal (checked, ``torch.equal``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import air_reg
from air_reg import zoo
from air_reg.bench import families
from air_reg.bench.machine import run_header, write_report
from air_reg.bench.refinement import interleaved_times
from air_reg.refine.flows import apply_repeatedly

REPO = Path(__file__).resolve().parents[1]


class EveryPass(torch.nn.Module):
    """``net`` without ``encode_fixed``: the cascade encodes the fixed images every pass."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, fixed, moving):
        return self.net(fixed, moving)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=18, help="pairs a family, one batch")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    start, head = time.time(), run_header()
    lines = [f"# The cascade with the fixed images encoded once or every pass ({head})", "",
             f"`python experiments/cascade_speed.py --pairs {args.pairs} --rounds {args.rounds}`: "
             "the shipped default model one-shot on the held-out families (160 x 208), one "
             "call a family, the two rows interleaved, median over rounds; flows torch.equal.",
             ""]  # fmt: skip
    reg = air_reg.load_model(zoo.WEIGHTS_DIR / f"{zoo.default_weights()}.ckpt")
    passes, affine, tol = reg.cascade, reg.cascade_affine, reg.cascade_tol
    nets = {"fixed encoded once": reg.net, "fixed encoded every pass": EveryPass(reg.net)}
    lines += ["| family | pairs | fixed encoded once, ms/pair | every pass, ms/pair | ratio |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name in families.FAMILIES:
        batch = families.family(name, args.pairs, split="test")[0]
        f, m = batch["fixed"], batch["moving"]
        rows = {k: (lambda n=n, f=f, m=m: apply_repeatedly(n, f, m, passes, affine, tol))
                for k, n in nets.items()}  # fmt: skip
        with torch.no_grad():
            for fn in rows.values():
                fn()  # warm-up
            times, flows = interleaved_times(rows, args.rounds, len(f), lambda flow: flow)
        if not torch.equal(*flows.values()):
            raise SystemExit(f"{name}: the two rows' flows differ")
        once, every = (statistics.median(times[k]) for k in nets)
        lines.append(f"| {name} | {len(f)} | {once:.1f} | {every:.1f} | {every / once:.2f} |")
    write_report(REPO / "experiments" / "results" / "cascade_speed" / "README.md", lines, start)


if __name__ == "__main__":
    main()
