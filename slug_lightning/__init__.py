"""slug_lightning: SLUG (Single Layer Unlearning Gradient) for OpenCLIP models, on PyTorch Lightning.

Importing the package registers its model configs (``slug-tiny``) with open_clip, so
``open_clip.create_model("slug-tiny", pretrained=...)`` works wherever this package is imported.
"""

from importlib import resources
from pathlib import Path

import open_clip

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)

from slug_lightning.clip_module import CLIPContrastive  # noqa: E402
from slug_lightning.concepts import Concept  # noqa: E402
from slug_lightning.evaluation import ZeroShotModule  # noqa: E402
from slug_lightning.gradient_store import GradientStore  # noqa: E402
from slug_lightning.gradients import GradientCollector  # noqa: E402
from slug_lightning.models import load_clip  # noqa: E402
from slug_lightning.trainer import SlugTrainer  # noqa: E402

__version__ = "0.1.0"


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
    "SlugTrainer",
    "ZeroShotModule",
    "config_path",
    "load_clip",
]
