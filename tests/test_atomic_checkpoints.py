"""Checkpoints are written atomically: a failure or a kill mid-write leaves the old file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from air_reg.atomic_checkpoint import AtomicCheckpointIO
from air_reg.train import train
from air_reg.utils import remove_stale_temporaries


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _version(counter: int, numel: int = 1000) -> dict:
    payload = torch.arange(numel, dtype=torch.float32) + counter
    return {"counter": counter, "payload": payload, "crc": zlib.crc32(payload.numpy().tobytes())}


def _check_complete(path: Path) -> int:
    """Load ``path`` safely, check it is one whole version, return its counter."""
    ckpt = torch.load(path, weights_only=True)
    assert zlib.crc32(ckpt["payload"].numpy().tobytes()) == ckpt["crc"]
    assert ckpt["payload"][0].item() == ckpt["counter"]
    return ckpt["counter"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, error):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_version(1), path)

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise error

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(type(error)):
        io.save_checkpoint(_version(2), path)
    monkeypatch.undo()
    assert _check_complete(path) == 1
    assert _temporaries(tmp_path) == []
    assert io.load_checkpoint(path)["counter"] == 1  # Lightning's loader reads it too


def test_new_checkpoint_replaces_the_old_with_the_umask_mode(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"  # the folder is made
    io.save_checkpoint(_version(1), path)
    io.save_checkpoint(_version(2), path)
    assert _check_complete(path) == 2
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _temporaries(path.parent) == []
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(_version(3), path, storage_options={"x": 1})


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp_cpu", "gpu", "ddp", "multinode"])
def test_every_trainer_config_writes_through_the_plugin(tmp_path, trainer):
    cfg = compose_config("train", [f"trainer={trainer}"], tmp_path)
    assert [p._target_ for p in cfg.trainer.plugins] == [
        "air_reg.atomic_checkpoint.AtomicCheckpointIO"
    ]
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        return  # composes; Lightning cannot build a GPU trainer here
    strategy = instantiate(cfg.trainer).strategy  # DDP's too: Lightning hands it the plugin
    assert isinstance(strategy.checkpoint_io, AtomicCheckpointIO)


# The child saves ever newer versions (8 MB each) onto one path, as fast as it can.
WRITER = """
import sys, zlib, torch
from air_reg.utils import save_torch
path, counter = sys.argv[1], int(sys.argv[2])
payload = torch.randn(2_000_000)
while True:
    payload[0] = counter
    crc = zlib.crc32(payload.numpy().tobytes())
    save_torch(path, {"counter": counter, "payload": payload, "crc": crc})
    if counter == int(sys.argv[2]):
        print("saved", flush=True)
    counter += 1
"""


@pytest.mark.slow
def test_kill_during_writes_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    counter, mid_write = 0, 0
    for kill in range(10):  # 5 kills; more only while none has landed mid-write
        if kill >= 5 and mid_write:
            break
        child = subprocess.Popen(
            [sys.executable, str(script), str(path), str(counter + 1)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "saved"  # it is in its write loop
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        left = _temporaries(tmp_path)  # the temporary a kill during a write leaves
        mid_write += bool(left)
        # never taken for a checkpoint: Lightning's ckpt_path=last looks for last*.ckpt
        assert all(n.startswith(".last.ckpt.") and Path(n).suffix == ".tmp" for n in left)
        newer = _check_complete(path)
        assert newer > counter  # a whole version, newer than the last child's
        counter = newer
    assert mid_write, "no kill landed during a write; the test proved nothing"
    AtomicCheckpointIO().save_checkpoint(_version(counter + 1), path)
    assert _temporaries(tmp_path) == []  # the killed writers' leftovers are gone
    assert remove_stale_temporaries(path) == []


@pytest.mark.slow
def test_training_writes_last_ckpt_through_the_plugin_and_resumes(tmp_path, monkeypatch):
    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    run = ["data=synthetic", "data.num_images=256", "model.net.patch_size=4"]
    train(compose_config("train", [*run, "trainer.max_epochs=1", "test=false"], tmp_path))
    folder = tmp_path / "checkpoints"
    assert "last.ckpt" in saved
    assert _temporaries(folder) == []
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 0

    overrides = [*run, "trainer.max_epochs=2", "test=false", "ckpt_path=last"]
    train(compose_config("train", overrides, tmp_path))
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 1
    assert _temporaries(folder) == []
