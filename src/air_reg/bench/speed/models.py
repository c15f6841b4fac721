"""The benchmarked networks: the paper's Transformer in our build and the naive reference."""

from __future__ import annotations

import torch
from torch import nn

from air_reg import speed
from air_reg.models.components.air import AiR
from air_reg.models.components.attention import use_reference
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.components.mapt import MAPT
from air_reg.speed.attention import auto_uses_kernel

from .profiles import Profile

# The paper's Transformer (Sec. 4.1); ff_dim None means 4 * dim ("matched widths").
PAPER = {"dim": 16, "heads": 4, "depth": 1, "dropout": 0.5, "ff_dim": None}
# label -> overrides. `attention`/`dropout_masks` are the speed settings (speed.accelerate);
# `reference`: nn.Transformer instead of ours (use_reference), which ties attention dropout
# to `dropout`.
VARIANTS = {
    "ours": {"attn_dropout": 0.0},  # speed.attention=auto: air-reg's CPU kernel
    "ours, fast dropout": {"attn_dropout": 0.0, "dropout_masks": "fast"},
    "ours, SDPA attention": {"attn_dropout": 0.0, "attention": "sdpa"},
    "ours, attn_dropout 0.5": {"attn_dropout": 0.5},
    "naive, matched widths": {"reference": True},
    "naive, authors' build": {"reference": True, "ff_dim": 2048},
}
SETTINGS = ("attention", "dropout_masks", "reference")  # spec keys that are not the net's
ARCHS = {"AiR-single": AiR, "MAPT": MAPT, "DIRNet": DIRNet}


def air(**kw) -> dict:
    """A spec (plain dict, JSON for child processes) of the paper's AiR-single, patch 2."""
    return {"arch": "AiR-single", "image_size": 28, "patch_size": 2, **PAPER, **kw}


def mapt(**kw) -> dict:
    """A spec of the paper's MAPT, patches [2, 4, 7]."""
    return {"arch": "MAPT", "image_size": 28, "patch_sizes": [2, 4, 7], **PAPER, **kw}


def model_specs(profile: Profile) -> dict[str, dict]:
    """Sections 1-2's rows: every architecture x variant (and DIRNet) the profile keeps."""
    specs = {
        f"{name} {variant}": make(**kw)
        for name, make in (("AiR-single p2", air), ("MAPT [2,4,7]", mapt))
        for variant, kw in VARIANTS.items()
    }
    specs["DIRNet"] = {"arch": "DIRNet", "image_size": 28}
    return {k: v for k, v in specs.items() if profile.models is None or k in profile.models}


def build(spec: dict) -> nn.Module:
    """The network of a spec, seeded: every variant of one architecture has the same weights."""
    torch.manual_seed(0)
    kw = {k: v for k, v in spec.items() if k != "arch" and k not in SETTINGS}
    if spec.get("reference"):
        kw.pop("attn_dropout", None)
    net = ARCHS[spec["arch"]](**kw)
    if spec.get("reference"):
        return use_reference(net)
    attention, dropout = spec.get("attention", "auto"), spec.get("dropout_masks", "torch")
    return speed.accelerate(net, attention=attention, dropout=dropout)


def describe(spec: dict) -> dict:
    """Table columns for a model spec."""
    if spec["arch"] == "DIRNet":
        return {"impl": "CNN", "ff": "-", "dropout": "-", "attn dropout": "-"}
    naive = bool(spec.get("reference"))
    kernel = spec.get("attention", "auto") != "sdpa" and auto_uses_kernel(
        spec["dim"] // spec["heads"], spec.get("attn_dropout", 0.0)
    )  # what speed.attention=auto picks on these CPU float32 inputs (KernelAttention)
    return {
        "impl": "nn.Transformer" if naive else "ours, air-reg kernel" if kernel else "ours, SDPA",
        "ff": spec.get("ff_dim") or 4 * spec["dim"],
        "dropout": spec["dropout"],
        "attn dropout": spec["dropout"] if naive else spec["attn_dropout"],
        "dropout mask": ("kernel" if speed.kernels.available() else "int16")
        if spec.get("dropout_masks") == "fast"
        else "bernoulli",
    }
