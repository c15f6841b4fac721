"""The speed door: air_reg.speed.accelerate swaps kernel-backed modules into plain models."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import torch
from conftest import needs_kernel
from torch import nn

from air_reg import speed
from air_reg.models.components.attention import ScaledDotProductAttention
from air_reg.models.components.mapt import MAPT
from air_reg.speed import kernels
from air_reg.speed.attention import KernelAttention
from air_reg.speed.dropout import FastDropout

MODELS = Path(speed.__file__).resolve().parents[1] / "models"


def test_model_code_does_not_know_the_kernels():
    for path in MODELS.rglob("*.py"):
        text = path.read_text()
        imports = r"^\s*(from|import)\s+air_reg\.speed|^\s*from\s+air_reg\s+import\s+speed"
        assert not re.search(imports, text, re.MULTILINE), path


def test_accelerate_swaps_modules_and_keeps_parameters_and_keys():
    torch.manual_seed(0)
    net = MAPT(image_size=28, patch_sizes=[4, 7])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    speed.accelerate(net, attention="auto", dropout="fast")
    kinds = [type(m) for m in net.modules()]
    assert ScaledDotProductAttention not in kinds
    assert nn.Dropout not in kinds
    assert kinds.count(KernelAttention) == 2 * 3  # per branch: 1 encoder + 2 decoder attentions
    fused = [m for m in net.modules() if isinstance(m, FastDropout) and m.relu]
    assert len(fused) == 2 * 2  # each feed-forward's ReLU + dropout became one pass
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_speed_settings_default_and_report_the_paths_taken():
    assert speed.settings_of(None) == {"attention": "auto", "dropout": "torch"}
    kernels._calls.clear()
    net = speed.accelerate(MAPT(image_size=28, patch_sizes=[7]), attention="sdpa")
    net(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28))
    report = speed.report({"attention": "sdpa", "dropout": "torch"})
    assert report["kernels"] == "not used"
    assert report["calls"] == {"attention": {"sdpa": 3}}


@needs_kernel
def test_off_linux_the_pytorch_path_runs_with_one_notice(monkeypatch, caplog):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(kernels, "_failure", [])
    kernels.library.cache_clear()
    try:
        net = speed.accelerate(MAPT(image_size=28, patch_sizes=[7]), dropout="fast").train()
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                net(torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)).sum().backward()
        notices = [r.getMessage() for r in caplog.records if "Linux only" in r.getMessage()]
        assert len(notices) == 1
        assert "unavailable" in speed.report({"attention": "auto", "dropout": "fast"})["kernels"]
    finally:
        kernels.library.cache_clear()
        kernels._failure.clear()
