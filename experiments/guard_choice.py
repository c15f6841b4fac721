"""How the guard's edge rule was chosen (issue #31): ``NGF_GUARD_TOL``, on validation and tune
pairs only.

    python experiments/guard_choice.py      # ~1 min on 2 cores; writes results/guard_choice/

The guard (``air_reg.refine.keep_if_better``) gives a pair the identity unless its flow makes
it more similar by the similarity it was optimised for, loses no mutual information (by
``MI_GUARD_TOL``) and, for MSE-like similarities, leaves its edges no less aligned (NGF loss up
by at most ``NGF_GUARD_TOL``). Every set below is registered once with the guard off; each rule
is then applied to the same flows, per pair. Sets: 200 same-class validation pairs of MNIST and
Fashion-MNIST (foreground Dice: one-shot AiR-UNet and MAPT tuned, and AiR-UNet refined 50
steps), the same moving images under known 2 px fields (EPE), and, as contrast changes, those
fixed images inverted (1 - image, EPE); the families' tune split (36 pairs each, 160 x 208,
model-free ``refine_steps=60``). Each cell: the score with the rule, pairs given the identity,
pairs kept although the rule-free score says they got worse.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import air_reg
from air_reg import metrics as M
from air_reg.bench import families
from air_reg.bench.machine import run_header, write_report
from air_reg.bench.pairs import benchmark_batches, known_deformation_batches
from air_reg.losses import MSE, MutualInformation, NormalisedGradientFields
from air_reg.models.components.spatial_transformer import warp
from air_reg.refine.optimise import NGF_GUARD_TOL, guard_rejects, per_pair

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "air_reg" / "weights"
TOLS = (None, 0.0, 0.005, 0.01, 0.02, 0.05)  # None: no edge rule (MSE and MI only)


def measures(fixed, moving, flow, truth=None) -> dict[str, torch.Tensor]:
    """Per pair: MSE, MI (nats), NGF before (0) and after (1); the score before / after (EPE
    against ``truth``, else foreground Dice)."""
    warped = warp(moving, flow)
    mi = MutualInformation(normalised=False)
    out = {}
    ngf = NormalisedGradientFields()
    for name, fn in (
        ("mse", lambda a: per_pair(MSE(), a, fixed)),
        ("mi", lambda a: mi.mutual_information(a, fixed)),
        ("ngf", lambda a: per_pair(ngf, a, fixed)),
    ):
        out[name + "0"], out[name + "1"] = fn(moving), fn(warped)
    if truth is None:
        out["q0"], out["q1"] = M.dice(moving, fixed), M.dice(warped, fixed)
    else:
        out["q0"], out["q1"] = M.epe(torch.zeros_like(flow), truth), M.epe(flow, truth)
    return out


def sets() -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for data in ("mnist", "fashion"):
        pairs = benchmark_batches(data, "same_class", 200, split="val")[0]
        known = known_deformation_batches([pairs])[0]
        f, m = pairs["fixed"], pairs["moving"]
        for w in ("air_unet", "mapt_tuned"):
            net = air_reg.load_model(WEIGHTS / f"{w}_{data}.ckpt")
            with torch.no_grad():
                out[f"{data} one-shot {w} (Dice)"] = measures(f, m, net(f, m))
        refined = air_reg.load_model(WEIGHTS / f"air_unet_{data}.ckpt", refine_steps=50,
                                     guard=False)  # fmt: skip
        out[f"{data} refined 50 (Dice)"] = measures(f, m, refined(f, m))
        kf, km, truth = known["fixed"], known["moving"], known["flow"]
        out[f"{data} known 2 px (EPE)"] = measures(kf, km, refined(kf, km), truth)
        out[f"{data} inverted (EPE)"] = measures(1 - kf, km, refined(1 - kf, km), truth)
    free = air_reg.load_model(None, refine_steps=60, guard=False)
    for name in families.FAMILIES:
        b = families.family(name, 36, split="tune")[0]
        flow = free(b["fixed"], b["moving"])
        out[f"family {name} (EPE)"] = measures(b["fixed"], b["moving"], flow, b["flow"])
    return out


def cell(v: dict[str, torch.Tensor], tol: float | None, higher_is_better: bool) -> str:
    """The guard's rules (``guard_rejects``) with the edge rule at ``tol`` (None: without)."""
    rise = None if tol is None else v["ngf1"] - v["ngf0"]
    worse, lost, edges = guard_rejects(v["mse1"], v["mse0"], v["mi1"], v["mi0"], rise,
                                       NGF_GUARD_TOL if tol is None else tol)  # fmt: skip
    reject = worse | lost | edges
    score = torch.where(reject, v["q0"], v["q1"]).mean().item()
    worse = (v["q1"] < v["q0"]) if higher_is_better else (v["q1"] > v["q0"])
    return f"{score:.4f} / {int(reject.sum())} / {int((worse & ~reject).sum())}"


def main() -> None:
    start, head = time.time(), run_header()
    print(head)
    data = sets()
    rules = ["no edge rule" if t is None else f"NGF rise > {t}" for t in TOLS]
    lines = [
        f"# The guard's edge rule on validation and tune pairs ({head})",
        "",
        "`python experiments/guard_choice.py`. Each cell: score with the rule (Dice higher, EPE "
        "lower is better) / pairs given the identity / pairs kept that got worse. The "
        f"default: `NGF_GUARD_TOL` = {NGF_GUARD_TOL}.",
        "",
        "| set | identity | unguarded | " + " | ".join(rules) + " |",
        "|---" * (len(rules) + 3) + "|",
    ]
    for name, v in data.items():
        hib = "Dice" in name
        row = [name, f"{v['q0'].mean():.4f}", f"{v['q1'].mean():.4f}"]
        lines.append("| " + " | ".join(row + [cell(v, t, hib) for t in TOLS]) + " |")
    write_report(REPO / "experiments" / "results" / "guard_choice" / "README.md", lines, start)


if __name__ == "__main__":
    main()
