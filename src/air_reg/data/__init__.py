"""Pair datasets and LightningDataModules, imported on first use: ``air_reg.data.readers`` and
``air_reg.data.preprocess`` stay free of Lightning (``register`` reads files through them)."""

import importlib

_WHERE = {
    "PairDataModule": "datamodule",
    "FolderDataModule": "folder",
    "SyntheticDataModule": "synthetic",
    "SynthDataModule": "synth_module",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"air_reg.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'air_reg.data' has no attribute {name!r}")
