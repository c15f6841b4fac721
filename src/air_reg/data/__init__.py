"""Pair datasets and LightningDataModules."""

from air_reg.data.datamodule import PairDataModule
from air_reg.data.folder import FolderDataModule
from air_reg.data.synthetic import SyntheticDataModule

__all__ = ["FolderDataModule", "PairDataModule", "SyntheticDataModule"]
