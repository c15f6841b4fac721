"""Train a registration model: ``python -m air_reg.train model=mapt data=fashion``."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from air_reg import __version__, speed
from air_reg.config import CONFIG_DIR
from air_reg.errors import ConfigError
from air_reg.utils import check_writable, run_cli, run_record, write_json

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a callbacks/logger group."""
    if not group:
        return []
    return [
        instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c
    ]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) the configured model; returns the final metrics as floats."""
    log.info("Composed config:\n%s", OmegaConf.to_yaml(cfg))
    if cfg.model.get("net") is None:
        raise ConfigError(
            "model=none is registration without a network: nothing to train; register "
            "without one with `python -m air_reg.register weights=none refine_steps=50 ...` "
            "(or `python -m air_reg.eval weights=none data=mnist refine_steps=50`)"
        )
    output_dir = check_writable(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = instantiate(cfg.data)
    if cfg.data.get("image_size") is None:  # data=folder: the images' own size, once read
        with open_dict(cfg):
            cfg.data.image_size = list(datamodule.image_size)
    model: L.LightningModule = instantiate(cfg.model)
    settings = speed.settings_of(cfg)
    speed.accelerate(model.net, **settings)
    model.build_config = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "speed": settings,
        "air_reg_version": __version__,
    }
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False,
    )
    record = run_record(cfg, {"data_checksums": datamodule.file_checksums()})
    record["speed"] = speed.report(settings)
    log.info("Speed: %s", {k: v for k, v in record["speed"].items() if k != "calls"})
    if trainer.is_global_zero:
        write_json(output_dir / "run_record.json", record)

    metrics: dict[str, float] = {}
    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        if cfg.get("train"):
            callback = trainer.checkpoint_callback
            ckpt = callback.best_model_path if callback else ""
        else:  # test-only run: score the given checkpoint
            ckpt = cfg.get("ckpt_path") or ""
        if not ckpt:
            log.warning("No checkpoint to test; testing the current weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt or None)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        record["speed"]["calls"] = speed.report(settings)["calls"]  # which path each op took
        write_json(output_dir / "run_record.json", record)
        write_json(output_dir / "metrics.json", metrics)
        log.info("Run folder: %s", output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_cli(train, cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
