"""LightningDataModules: LAION-style shards (forget/retain/training pairs), labelled evaluation sets, and the
demo world generator. Import as ``slug_lightning.datamodules``."""

from slug_lightning.datamodules.labelled import LabelledImages, LabelledSet, ZeroShotDataModule
from slug_lightning.datamodules.laion import LaionDataModule, PairStream, expand_shards

__all__ = ["LabelledImages", "LabelledSet", "LaionDataModule", "PairStream", "ZeroShotDataModule", "expand_shards"]
