"""How the default preset's affine stage was chosen (issue #31), on the tune split only: the
threshold ``refine.affine_min_px`` on three tune sets, then the step count ``affine_steps`` on
36 tune pairs a family.

    python experiments/affine_choice.py      # ~6 min on 2 cores; prints both tables

Tune sets (never the test sources): the large-motion family of ``air_reg.bench.families``
(``split="tune"``, 9 pairs at 160 x 208); the MNI152 tune slices (z 77-86) at 233 x 197 under
``known_flows`` fields of 5 px; scikit-image's tune images cropped at 512 x 512 under 8 px
fields. Then 36 pairs of the small and large families (``split="tune"``, ``seed=1``).
Model-free ``refine_steps=60``, EPE px over every pixel (docs/protocol.md, "Large motions").
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from air_reg.bench import families as fam
from air_reg.bench.machine import run_header
from air_reg.refine import RefineSettings, refine
from air_reg.refine.flows import affine_flow
from air_reg.refine.optimise import estimate_affine


def tune_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(fixed, moving, true flow) of the three threshold sets."""
    g = torch.Generator().manual_seed(11)
    mni = fam.mni_known("tune", g)
    crops = fam.skimage_known("tune", g)
    large = fam.family("large", 9, split="tune")[0]
    return {
        "families large (9, 160 x 208)": (large["fixed"], large["moving"], large["flow"]),
        "MNI152 slices, 5 px fields (10, 233 x 197)": mni,
        "scikit-image crops, 8 px fields (8, 512 x 512)": crops,
    }  # fmt: skip


def epe(fixed, moving, flow, settings: RefineSettings) -> list[float]:
    """Per pair, one pair a call (as register runs it)."""
    out = []
    for i in range(len(fixed)):
        got = refine(fixed[i : i + 1], moving[i : i + 1], None, settings)
        out.append(float((got - flow[i : i + 1]).norm(dim=1).mean()))
    return out


def main() -> None:
    start = time.time()
    print(run_header() + "\n")
    print("| tune set | largest move of a 10-step affine (px) | no affine | kept > 5 px | "
          "kept > 8 px |\n|---|---|---|---|---|")  # fmt: skip
    for name, (fixed, moving, flow) in tune_sets().items():
        theta = estimate_affine(fixed, moving, steps=10)
        moves = affine_flow(theta, tuple(fixed.shape[2:])).norm(dim=1).flatten(1).amax(1)
        row = [statistics.mean(epe(fixed, moving, flow, RefineSettings(steps=60, affine_steps=0)))]
        for px in (5.0, 8.0):
            s = RefineSettings(steps=60, affine_steps=10, affine_min_px=px)
            row.append(statistics.mean(epe(fixed, moving, flow, s)))
        print(f"| {name} | {moves.min():.1f}-{moves.max():.1f} | "
              + " | ".join(f"{x:.3f}" for x in row) + " |", flush=True)  # fmt: skip
    print("\n| family (36 tune pairs, seed 1) | affine_steps | EPE mean | median | "
          "pairs worse than the identity |\n|---|---|---|---|---|")  # fmt: skip
    for name in ("large", "small"):
        b = fam.family(name, 36, split="tune", seed=1)[0]
        ident = b["flow"].norm(dim=1).flatten(1).mean(1).tolist()
        for steps in (0, 10, 30, 100):
            e = epe(
                b["fixed"], b["moving"], b["flow"], RefineSettings(steps=60, affine_steps=steps)
            )
            worse = sum(x > i for x, i in zip(e, ident, strict=True))
            print(f"| {name} | {steps} | {statistics.mean(e):.3f} | "
                  f"{statistics.median(e):.3f} | {worse} |", flush=True)  # fmt: skip
    print(f"\n{time.time() - start:.0f} s, load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
