"""The registry of air-reg's methods: each shipped or benchmarked model once.

``register``'s default model, the benchmarks (``air_reg.bench``), the tests and the README's
model list all read this table; nothing else names a method's label, experiment config or
weight file. A shipped checkpoint is ``air_reg/weights/<weights>_<dataset>.ckpt``; the
``synth`` dataset is ``data=synth`` (synthetic pairs only: a model for images it never saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # shipped checkpoints (package data)
DATASETS = ("mnist", "fashion")  # the datasets the paper's shipped weights were trained on
SYNTH = "synth"  # data=synth: no real image; the zero-shot model's


@dataclass(frozen=True)
class Method:
    """One learned method: its table label, the ``experiment=`` config that trains it, the
    stem of its shipped weight files and the datasets shipped."""

    label: str  # the column / row name in every table ("AiR-UNet")
    experiment: str  # conf/experiment/<experiment>.yaml
    weights: str  # air_reg/weights/<weights>_<dataset>.ckpt
    datasets: tuple[str, ...] = DATASETS  # shipped for these; () = benchmarked, not shipped
    extra: str | None = None  # the pip extra it needs (voxelmorph: peers)

    def weights_name(self, dataset: str) -> str:
        """``<weights>_<dataset>``: the ``weights=`` name of its shipped checkpoint."""
        return f"{self.weights}_{dataset}"

    def weights_path(self, dataset: str) -> Path:
        return WEIGHTS_DIR / f"{self.weights_name(dataset)}.ckpt"


METHODS: tuple[Method, ...] = (
    Method("DIRNet", "paper_dirnet", "dirnet"),
    Method("AiR-single", "paper_air", "air"),
    Method("AiR-MAPT", "paper_mapt", "mapt"),
    Method("AiR-MAPT tuned", "mapt_tuned", "mapt_tuned"),
    Method("AiR-UNet", "air_unet", "air_unet"),
    Method("AiR-UNet no attention", "air_unet_no_attention", "air_unet_no_attention", ()),
    Method("AiR-UNet coarse decoder", "air_unet_coarse", "air_unet_coarse", ()),
    Method("VoxelMorph", "voxelmorph", "voxelmorph", extra="peers"),
    Method("AiR-Match", "air_match_synth", "air_match", (SYNTH,)),  # issue #32
)
BY_LABEL = {m.label: m for m in METHODS}
# Trained per dataset (the paper's Table 1 and the reproduction): all but the synthetic-trained.
DATASET_METHODS = tuple(m for m in METHODS if SYNTH not in m.datasets)
BY_WEIGHTS = {m.weights: m for m in METHODS}
DEFAULT = BY_LABEL["AiR-Match"]  # register's default: any 2-D pair, any size (docs/zero_shot.md)
DATASET_DEFAULT = BY_LABEL["AiR-UNet"]  # register data=mnist|fashion: the best on that dataset


def method(name: str) -> Method:
    """The method with this label ("AiR-UNet") or weight stem ("air_unet")."""
    found = BY_LABEL.get(name) or BY_WEIGHTS.get(name)
    if found is None:
        known = ", ".join(m.label for m in METHODS)
        raise KeyError(f"no method {name!r}; the registry has {known}")
    return found


def default_weights(dataset: str | None = None) -> str:
    """The ``weights=`` name ``register`` uses when none is given: ``air_match_synth``, the
    model trained on synthetic pairs for any image; ``air_unet_<dataset>`` for a dataset's
    own images (``register data=fashion``)."""
    if dataset is None or dataset == SYNTH:
        return DEFAULT.weights_name(SYNTH)
    return DATASET_DEFAULT.weights_name(dataset)


def shipped() -> list[str]:
    """Every shipped ``weights=`` name, in registry order."""
    return [m.weights_name(d) for m in METHODS for d in m.datasets]


def label_of(weights: str) -> str:
    """The table label of a weight stem or ``weights=`` name (``air_unet_mnist`` ->
    ``AiR-UNet``); the name itself when the registry does not know it."""
    for m in METHODS:
        if weights == m.weights or weights in (m.weights_name(d) for d in (*DATASETS, SYNTH)):
            return m.label
    return weights
