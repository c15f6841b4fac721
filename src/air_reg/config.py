"""Compose the shipped Hydra configs from Python (tests, experiment scripts, notebooks)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # package data


def compose_config(
    name: str = "train",
    overrides: list[str] | None = None,
    output_dir: str | Path = "outputs",
    cpu: bool = True,
) -> DictConfig:
    """``air_reg/conf/<name>.yaml`` with ``overrides``, writing under ``output_dir``.

    Outside a Hydra app there is no run folder, so ``paths.output_dir`` is set here;
    ``cpu=True`` also forces one CPU device and quiet trainers (tests, scripts).
    """
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name=name, overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()
    output_dir = Path(output_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        if cpu and "trainer" in cfg:
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.devices = 1
            cfg.trainer.enable_model_summary = False
    return cfg
