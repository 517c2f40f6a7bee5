"""LightningDataModules: LAION-style shards (forget/retain/training pairs) and labelled evaluation sets.
Import as ``slug_lightning.datamodules``. (The demo world generator is :mod:`slug_lightning.demo`.)"""

from slug_lightning.datamodules.labelled import LabelledImages, ZeroShotDataModule
from slug_lightning.datamodules.laion import LaionDataModule, PairStream
from slug_lightning.labelled_sets import LabelledSet

__all__ = ["LabelledImages", "LabelledSet", "LaionDataModule", "PairStream", "ZeroShotDataModule"]
