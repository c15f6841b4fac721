"""Score a trained checkpoint on its test pairs: ``python -m air_reg.eval ckpt_path=...``
(or ``weights=<name>`` for a shipped one).

The test pairs come from the data config the checkpoint recorded, so they are read,
normalised and sized as in training (``air_reg.data.preprocess``); a ``data=`` given on the
command line must preprocess the images as that record says.
"""

from __future__ import annotations

import logging

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from air_reg.checkpoint import CheckpointError, load_configured, shipped_weights
from air_reg.config import CONFIG_DIR
from air_reg.data.preprocess import Preprocessing
from air_reg.errors import ConfigError
from air_reg.models.contract import spatial_size
from air_reg.scoring import (
    identity_method,
    markdown_table,
    score,
    summarise,
    write_per_pair_csv,
)
from air_reg.utils import (
    check_writable,
    run_cli,
    run_record,
    write_json,
    write_text,
    write_with,
)

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    """Score the checkpoint and the identity on the same test pairs; write the summary."""
    output_dir = check_writable(cfg.paths.output_dir)
    if not cfg.get("ckpt_path") and not cfg.get("weights"):
        raise CheckpointError(
            "nothing to evaluate: pass ckpt_path=<run dir>/checkpoints/last.ckpt or "
            "weights=<name> of a shipped model (e.g. weights=mapt_tuned_mnist)"
        )
    model_free = not cfg.get("ckpt_path") and cfg.weights == "none"
    if model_free and not cfg.get("data"):
        raise ConfigError("weights=none (model-free) has no stored data config: add data=mnist")
    path = None if model_free else cfg.ckpt_path or shipped_weights(cfg.weights)
    model = load_configured(path, cfg)
    datamodule = eval_datamodule(cfg, model)
    device = torch.device(cfg.device)
    batches = ({k: v.to(device) for k, v in b.items()} for b in datamodule.test_dataloader())
    name = "model-free" if model_free else "model"
    per_pair, ms = score({"identity": identity_method, name: model}, batches)
    summary = summarise(per_pair)
    table = markdown_table(summary, ms)
    log.info("Test pairs (%s):\n%s", datamodule.hparams.get("dataset"), table)
    write_json(
        output_dir / "summary.json", {"summary": summary, "ms_per_pair": ms, **run_record(cfg)}
    )
    write_text(output_dir / "summary.md", table)
    write_with(output_dir / "per_pair.csv", lambda p: write_per_pair_csv(p, per_pair))
    log.info("Wrote %s", output_dir)
    return summary


def eval_datamodule(cfg: DictConfig, model):
    """The data module of the test pairs, set up: built from the data config ``model`` recorded
    (``cfg.data`` when given, which must preprocess the images as that record says), with
    ``num_pairs`` test pairs and the ``batch_size`` of ``cfg``."""
    record = getattr(model, "build_config", None) or {}
    data_cfg = cfg.get("data") or OmegaConf.create(record["data"])
    if cfg.get("data") and record.get("data"):
        _check_preprocessing(Preprocessing.of(cfg.data), Preprocessing.of(record["data"]),
                             reads_files=_reads_files(cfg.data))  # fmt: skip
    data_cfg.num_test_pairs = cfg.get("num_pairs")  # null = one pair per test image
    if cfg.get("batch_size"):
        data_cfg.eval_batch_size = cfg.batch_size
    datamodule = instantiate(data_cfg)
    data_size = spatial_size(datamodule.image_size)
    any_size = getattr(model, "net_takes_any_size", False)  # e.g. AiR-Match: the data's size
    if model.image_size is not None and data_size != tuple(model.image_size) and not any_size:
        size = "x".join(map(str, model.image_size))
        raise ConfigError(
            f"the model was trained on {size} images but the data are "
            f"{'x'.join(map(str, data_size))}; set data.image_size=[{size.replace('x', ',')}]"
        )
    datamodule.setup("test")
    return datamodule


def _reads_files(data) -> bool:
    """Whether a data config's module reads image files, and so normalises them
    (``FolderDataModule``); the idx datasets and the generated ones are [0, 1] as they are."""
    return str(data.get("_target_") or "").endswith("FolderDataModule")


def _check_preprocessing(
    given: Preprocessing, trained: Preprocessing, *, reads_files: bool = True
) -> None:
    """Refuse a ``data=`` that normalises or sizes the images otherwise than training did
    (normalisation only where ``reads_files``: elsewhere the images are [0, 1] as they are,
    e.g. MNIST pairs for the synthetic-trained model, whose record says ``minmax`` for
    ``register``'s files)."""
    fixes = []
    if reads_files:
        if given.normalize != trained.normalize:
            fixes.append(f"data.normalize={trained.normalize}")
        elif trained.normalize == "percentile" and given.percentiles != trained.percentiles:
            p_lo, p_hi = trained.percentiles
            fixes.append(f"data.percentiles=[{p_lo},{p_hi}]")
    if (given.sizing == "pad") != (trained.sizing == "pad"):
        fixes.append(f"data.pad_to={trained.pad_to}" if trained.pad_to else "data.pad_to=null")
    if fixes:
        raise ConfigError(
            f"the model was trained on images normalised or sized otherwise than this data= "
            f"gives them; add {' '.join(fixes)}, or leave data= out to use its stored data config"
        )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
