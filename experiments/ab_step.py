"""Median time of one training step with whichever air_reg is first on PYTHONPATH.

    PYTHONPATH=<checkout>/src python experiments/ab_step.py mapt fast   # -> {"median_s": ...}

The paper's AiR-single (patch 2) or MAPT [2,4,7], batch 64, MSE + Adam, with PyTorch's
dropout (``torch``) or air-reg's fast masks (``fast``), attention kernel on auto. It runs on
checkouts from before the speed settings moved out of the models (``model.net.fast_dropout``)
and after (``air_reg.speed.accelerate``), so ``compare_commits.sh`` can time both.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from air_reg import warp
from air_reg.models.components.air import AiR
from air_reg.models.components.mapt import MAPT


def build(arch: str, fast: bool) -> torch.nn.Module:
    kw = {"image_size": 28, "dim": 16, "heads": 4, "depth": 1, "dropout": 0.5, "attn_dropout": 0}
    make = (lambda **k: AiR(patch_size=2, **k)) if arch == "air" else MAPT
    try:
        from air_reg import speed  # the speed door (since the `speed` config)
    except ImportError:  # older checkouts: the knobs were model arguments
        return make(fast_dropout=fast, attn_kernel="auto", **kw)
    return speed.accelerate(make(**kw), attention="auto", dropout="fast" if fast else "torch")


def main(arch: str, dropout: str, steps: int = 15) -> dict:
    torch.manual_seed(0)
    net = build(arch, dropout == "fast")
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    fixed, moving = torch.rand(64, 1, 28, 28), torch.rand(64, 1, 28, 28)

    def step() -> float:
        tic = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(warp(moving, net(fixed, moving)), fixed).backward()
        opt.step()
        return time.perf_counter() - tic

    for _ in range(3):  # warm-up (and the kernels' first load)
        step()
    times = sorted(step() for _ in range(steps))
    return {"median_s": times[len(times) // 2]}


if __name__ == "__main__":
    if (
        len(sys.argv) != 3
        or sys.argv[1] not in ("air", "mapt")
        or sys.argv[2]
        not in (
            "torch",
            "fast",
        )
    ):
        sys.exit("usage: ab_step.py air|mapt torch|fast")
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
