"""Scale-out on the CPU: 2-process DDP (gloo) and a Hydra multirun sweep, via the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TINY = [
    "data=synthetic",
    "data.num_images=384",
    "model.net.patch_size=4",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "air_reg.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_ddp_ranks_agree_and_sync_metrics_like_one_process(tmp_path):
    single, ddp, ddp_test = tmp_path / "single", tmp_path / "ddp", tmp_path / "ddp_test"
    _run(*TINY, f"hydra.run.dir={single}")
    _run(
        *TINY,
        "trainer=ddp_cpu",
        f"hydra.run.dir={ddp}",
        "+callbacks.digest._target_=conftest.RankWeightDigest",
        f"+callbacks.digest.folder={ddp / 'digest'}",
    )
    rank0, rank1 = ((ddp / "digest" / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0 == rank1  # DDP kept the two replicas identical
    # Scoring the single-process checkpoint with 2 ranks (disjoint halves of the same test
    # pairs, metrics synced across ranks) must give the single-process number.
    ckpt = single / "checkpoints" / "last.ckpt"
    _run(*TINY, "trainer=ddp_cpu", "train=false", f"ckpt_path={ckpt}", f"hydra.run.dir={ddp_test}")
    expected = json.loads((single / "metrics.json").read_text())
    got = json.loads((ddp_test / "metrics.json").read_text())
    for key in ("test/mse", "test/smooth_dice", "test/folding"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_multirun_sweep_of_four_tiny_jobs(tmp_path):
    _run(
        "-m",
        *TINY,
        "model.net.patch_size=4,7",
        "model.reg_weight=0.0,0.1",
        f"hydra.sweep.dir={tmp_path}",
    )
    results = sorted(tmp_path.glob("*/metrics.json"))
    assert len(results) == 4
    for path in results:
        assert "val/mse" in json.loads(path.read_text())


@pytest.mark.parametrize(
    ("option", "plugin"),
    [
        ("hparams_search=mapt_grid", None),
        ("hparams_search=mapt_optuna", "optuna"),
        ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher"),
    ],
)
def test_sweep_and_launcher_configs_compose(option, plugin):
    from hydra import compose, initialize_config_dir

    from air_reg.config import CONFIG_DIR

    if plugin:
        pytest.importorskip(plugin)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[option], return_hydra_config=True)
    if option.startswith("hparams"):
        assert cfg.hydra.sweeper.params
        assert cfg.model.net._target_.endswith("MAPT")
    else:
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
