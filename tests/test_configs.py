"""Every ``experiment=`` config composes, instantiates and runs one training step.

The experiments are globbed from the package's conf folder, so a new one is covered without
touching this file. Data modules are built but not set up: MNIST / Fashion-MNIST are
downloaded and ``data=brain`` is prepared by ``python -m air_reg.data.brain``, neither is in
the repository; the network runs on synthetic pairs at the experiment's image size instead.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from air_reg import speed
from air_reg.config import CONFIG_DIR
from air_reg.data.synthetic import make_pairs

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
NEEDS = {"voxelmorph": "voxelmorph"}  # model.net target module -> the extra it imports


def _size(image_size) -> tuple[int, ...]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def test_the_glob_finds_the_experiments():
    assert len(EXPERIMENTS) >= 14
    assert {"mapt_tuned", "brain_mapt", "air_unet", "paper_air"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_instantiates_and_takes_a_step(experiment, make_cfg):
    cfg = make_cfg("train", [f"experiment={experiment}"])
    for name, module in NEEDS.items():
        if name in cfg.model.net._target_:
            pytest.importorskip(module)
    datamodule = instantiate(cfg.data)  # constructor checks only: no files read
    assert isinstance(datamodule, L.LightningDataModule)
    trainer = instantiate(cfg.trainer, logger=False)  # every trainer key is a Trainer argument
    assert isinstance(trainer, L.Trainer)
    model = instantiate(cfg.model)
    speed.accelerate(model.net, **speed.settings_of(cfg))  # as train.py does

    size = _size(cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    if len(size) == 2:
        h, w = size
        fixed, moving, flow, labels = make_pairs(2, max(h, w), 1.5, g)
        fixed, moving = fixed[..., :h, :w].contiguous(), moving[..., :h, :w].contiguous()
        flow, label = flow[..., :h, :w].contiguous(), labels[:, None, None, None] + 1
    else:  # volumes (data=synth3d): smooth random images, a small random field
        size = tuple(min(n, 16) for n in size)
        fixed = torch.nn.functional.avg_pool3d(torch.rand(2, 1, *size, generator=g), 3, 1, 1)
        moving, flow, label = fixed.roll(1, -1), 0.5 * torch.randn(2, 3, *size, generator=g), 1
    batch = {"flow": flow, "moving_labels": label * (moving > 0.5),
             "fixed_labels": label * (fixed > 0.5)}  # as data=synth's batches  # fmt: skip
    optimizer = model.optimizer_factory(params=model.parameters())
    if model.scheduler_factory is not None:
        scheduler = model.scheduler_factory(optimizer=optimizer, total_steps=10)
    model.train()
    out = model.objective(fixed, moving, model(fixed, moving), batch)
    assert torch.isfinite(out["loss"]), out["loss"]
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(gr).all() for gr in grads)
    optimizer.step()
    if model.scheduler_factory is not None:
        scheduler.step()
    model.eval()
    with torch.no_grad():
        flow = model(fixed, moving)
    assert flow.shape == (2, len(size), *size), (experiment, flow.shape)
    assert torch.isfinite(flow).all()


def test_brain_mapt_is_mapt_tuned_at_the_brain_size(make_cfg):
    """One tuned MAPT (model/mapt_tuned.yaml): the brain run changes only what its size needs."""
    digits = make_cfg("train", ["experiment=mapt_tuned"])
    brain = make_cfg("train", ["experiment=brain_mapt"])
    assert list(brain.model.net.patch_sizes) == [4, 8, 16]
    for cfg in (digits, brain):
        del cfg.model.net.patch_sizes  # the one model setting the brain run changes
        del cfg.model.net.image_size  # ${data.image_size}
    assert digits.model == brain.model
    assert digits.speed == brain.speed


@pytest.mark.parametrize("trainer", ["default", "gpu", "ddp"])
def test_the_budget_rides_on_any_trainer(trainer, make_cfg):
    """``trainer/budget`` merges onto the chosen trainer: trainer=gpu keeps the brain budget."""
    cfg = make_cfg("train", ["experiment=brain_air_unet", f"trainer={trainer}"])
    assert (cfg.trainer.max_time, cfg.trainer.max_epochs, cfg.trainer.min_epochs) == (
        "00:00:05:00",
        100000,
        0,
    )
    assert make_cfg("train", [f"trainer={trainer}"]).trainer.max_time is None


@pytest.mark.parametrize("trainer", ["default", "gpu", "ddp"])
def test_a_step_budget_is_a_plain_override_on_any_trainer(trainer, make_cfg):
    """``trainer.max_steps=N`` as Lightning users write it (no ``+``); -1 (no step limit)
    unless given."""
    assert make_cfg("train", [f"trainer={trainer}"]).trainer.max_steps == -1
    cfg = make_cfg("train", [f"trainer={trainer}", "trainer.max_steps=250"])
    assert cfg.trainer.max_steps == 250
