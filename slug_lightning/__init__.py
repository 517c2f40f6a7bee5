"""slug_lightning: SLUG (Single Layer Unlearning Gradient) for OpenCLIP models, on PyTorch Lightning.

The public names below are imported on first use, so that ``import slug_lightning`` and the command line's
``--help`` do not pay for torch, Lightning and open_clip until something needs them. The package's model configs
(``slug-tiny``) are registered with open_clip as soon as :mod:`slug_lightning.models` is imported (every loading
path does); call :func:`register_model_configs` to use them through open_clip directly.

Example::

    import slug_lightning

    result = slug_lightning.unlearn("configs/demo/unlearn.yaml", output_dir="runs/mine")
    run = slug_lightning.load_run("runs/mine")
"""

from __future__ import annotations

import importlib
from importlib import resources
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "CLIPContrastive": "slug_lightning.clip_module",
    "Concept": "slug_lightning.concepts",
    "GradientCollector": "slug_lightning.gradients",
    "GradientStore": "slug_lightning.gradient_store",
    "LoadedRun": "slug_lightning.api",
    "SlugTrainer": "slug_lightning.trainer",
    "UnlearnResult": "slug_lightning.api",
    "ZeroShotModule": "slug_lightning.evaluation",
    "load_clip": "slug_lightning.models",
    "load_run": "slug_lightning.api",
    "register_model_configs": "slug_lightning.models",
    "unlearn": "slug_lightning.api",
}

if TYPE_CHECKING:
    from slug_lightning.api import LoadedRun, UnlearnResult, load_run, unlearn
    from slug_lightning.clip_module import CLIPContrastive
    from slug_lightning.concepts import Concept
    from slug_lightning.evaluation import ZeroShotModule
    from slug_lightning.gradient_store import GradientStore
    from slug_lightning.gradients import GradientCollector
    from slug_lightning.models import load_clip, register_model_configs
    from slug_lightning.trainer import SlugTrainer


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'slug_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def config_path(name: str) -> str:
    """Path of a packaged config, e.g. ``config_path("demo/unlearn.yaml")``."""
    path = resources.files("slug_lightning.configs").joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(f"No packaged config {name!r}.")
    return str(path)


__all__ = [
    "CLIPContrastive",
    "Concept",
    "GradientCollector",
    "GradientStore",
    "LoadedRun",
    "SlugTrainer",
    "UnlearnResult",
    "ZeroShotModule",
    "__version__",
    "config_path",
    "load_clip",
    "load_run",
    "register_model_configs",
    "unlearn",
]
