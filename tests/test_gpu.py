"""CUDA checks: the same flows as on the CPU, finite gradients, and training through Hydra.

Skipped without a CUDA device; ``experiments/gpu_check.sh`` runs them on a GPU machine.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

import air_reg
from air_reg.config import compose_config
from air_reg.models.components.air import AiR
from air_reg.models.components.dirnet import DIRNet
from air_reg.models.components.mapt import MAPT
from air_reg.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NETS = {  # small 28x28 networks covering every code path the GPU takes
    "air": lambda: AiR(image_size=28, patch_size=2, attn_dropout=0.0),  # the shipped config
    "air-stem-diffeo": lambda: AiR(  # conv stem, attention dropout, scaling and squaring
        image_size=28, patch_size=4, stem_channels=8, attn_dropout=0.5, integration_steps=7
    ),
    "mapt": lambda: MAPT(image_size=28, patch_sizes=[2, 4, 7], attn_dropout=0.0),
    "dirnet": lambda: DIRNet(image_size=28),
}


@pytest.fixture
def no_tf32():
    """Full float32 in CUDA matmuls and convolutions (cuDNN uses TF32 by default)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def images(batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random (fixed, moving) images in [0, 1], (B, 1, 28, 28) each, on the CPU."""
    x = F.avg_pool2d(torch.rand(2 * batch, 1, 28, 28), 5, 1, 2)
    return x[:batch], x[batch:]


@torch.no_grad()
def loud(net: torch.nn.Module, fixed, moving) -> torch.nn.Module:
    """Rescale the near-zero flow heads to flows of about a pixel (else any two flows match)."""
    heads = [m for name, m in net.named_modules() if name.endswith("head")]
    for head in heads:
        torch.nn.init.normal_(head.weight)
    scale = net(fixed, moving).abs().mean()
    for head in heads:
        head.weight.div_(scale)
    return net


@pytest.mark.parametrize("name", NETS)
def test_eval_flow_on_cuda_matches_cpu(name, no_tf32):
    fixed, moving = images()
    net = loud(NETS[name]().eval(), fixed, moving)
    with torch.no_grad():
        expected = net(fixed, moving)
        flow = net.cuda()(fixed.cuda(), moving.cuda())
    assert flow.is_cuda
    assert expected.abs().mean() > 0.5, "flows too small for the comparison to mean anything"
    err = (flow.cpu() - expected).abs().max().item()
    assert err < 1e-4, f"{name}: CUDA and CPU flows differ by {err:.2e} px"


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", NETS)
def test_training_step_on_cuda_gives_finite_grads_for_every_parameter(name, bf16):
    net = NETS[name]().cuda().train()
    fixed, moving = (t.cuda() for t in images(16))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = F.mse_loss(air_reg.warp(moving, net(fixed, moving)), fixed)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert p.grad.is_cuda, f"{name}: gradient of {pname} not on the GPU"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    heads = [p.grad for n, p in net.named_parameters() if "head.weight" in n]
    assert heads, "no flow head found"
    assert all(g.abs().sum() > 0 for g in heads), "the flow heads learn nothing"


def test_warp_and_its_gradients_on_cuda_match_cpu():
    moving = torch.rand(4, 3, 28, 32)
    # Whole pixels plus a fraction in [0.1, 0.9]: no sample sits on a pixel edge, where the
    # bilinear gradient jumps and rounding could pick either side; some leave the image.
    flow = torch.randint(-6, 6, (4, 2, 28, 32)) + 0.1 + 0.8 * torch.rand(4, 2, 28, 32)
    target = torch.rand(4, 3, 28, 32)
    results = []
    for device in ("cpu", "cuda"):
        m, f = (t.detach().to(device).requires_grad_() for t in (moving, flow))
        warped = air_reg.warp(m, f)
        (warped - target.to(device)).square().sum().backward()
        results.append([t.detach().cpu() for t in (warped, m.grad, f.grad)])
    for what, cpu, cuda in zip(("warped", "d/dmoving", "d/dflow"), *results, strict=True):
        err = (cuda - cpu).abs().max().item()
        assert err < 1e-4 * max(1.0, cpu.abs().max().item()), f"{what} differs by {err:.2e}"


def test_cli_training_on_gpu_writes_a_checkpoint_that_loads_on_cpu(tmp_path, no_tf32):
    args = [
        "trainer=gpu",
        "data=mnist",
        "data.pairs_per_epoch=2048",
        "data.num_val_pairs=256",
        "data.num_test_pairs=512",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "air_reg.train", *args],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]  # tensors on their saved device
    assert all(t.is_cuda for t in state.values()), "the run did not train on the GPU"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["test/mse"]), metrics
    assert list((tmp_path / "images").glob("val_epoch*.png")), "no validation image grid"

    model = air_reg.load_model(ckpt)  # CPU by default
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    fixed, moving = images(4)
    with torch.no_grad():
        flow = model(fixed, moving)
        on_gpu = air_reg.load_model(ckpt, device="cuda")(fixed.cuda(), moving.cuda())
    assert flow.shape == (4, 2, 28, 28)
    assert torch.isfinite(flow).all()
    assert (on_gpu.cpu() - flow).abs().max() < 1e-4


def gpu_config(overrides: list[str], out) -> DictConfig:
    """The real ``train`` config on one GPU, quiet, writing under ``out``."""
    cfg = compose_config("train", ["trainer=gpu", *overrides], out, cpu=False)
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


SHORT = ["data=synthetic", "data.num_images=256", "+trainer.limit_train_batches=4"]
SHORT += ["+trainer.limit_val_batches=1", "trainer.max_epochs=1", "test=false"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["speed.dropout=fast"],  # FastDropout: torch's fused kernel on CUDA
        ["model=mapt", "speed.dropout=fast"],
        ["model.compile=true", "trainer.precision=bf16-mixed"],  # the README's GPU recipe
    ],
    ids=["air-fast_dropout", "mapt-fast_dropout", "air-compile-bf16"],
)
def test_lightning_trains_on_cuda(tmp_path, overrides):
    cfg = gpu_config([*SHORT, *overrides], tmp_path)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]), metrics
    assert math.isfinite(metrics["val/mse"]), metrics
    net = instantiate(cfg.model.net).cuda().train()  # the net alone: not compiled again
    fixed, moving = (t.cuda() for t in images())
    with torch.no_grad():  # dropout is on in training mode: two calls differ
        assert not torch.equal(net(fixed, moving), net(fixed, moving))
