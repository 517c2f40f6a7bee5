"""Carrying SLUG edits into Hugging Face pipelines: Stable Diffusion text encoders, LLaVA vision towers.

- :mod:`~slug_lightning.hf.mapping`: exact name/tensor mappings between OpenCLIP and the Hugging Face CLIP
  layout (pure, needs neither ``transformers`` nor ``diffusers``), and which layers a pipeline uses.
- :mod:`~slug_lightning.hf.convert`: HF CLIP models built from OpenCLIP ones and back (needs
  ``transformers``).
- :mod:`~slug_lightning.hf.checkpoints`: reading and writing HF weight directories (safetensors, shards).
- :mod:`~slug_lightning.hf.export`: a run's edit delivered into a pipeline (behind ``export-diffusers`` and
  ``export-llava``, whose command lines are :mod:`slug_lightning.commands.export`).
- :mod:`~slug_lightning.hf.loading`: unlearn a pipeline's own CLIP (``PipelineGradientCollector``).
- :mod:`~slug_lightning.hf.evaluate`: forgetting measured in the pipelines (behind ``eval-diffusion`` and
  ``eval-vlm``, whose command lines are :mod:`slug_lightning.commands.evaluate_hf`).

Nothing here is imported by ``import slug_lightning``; ``transformers`` and ``diffusers`` are optional
extras (``pip install "slug-lightning[diffusion]"`` / ``"[vlm]"``) imported only when used.
"""

from slug_lightning.extras import require

# How unchanged files of a pipeline get into an export: links into the input, or copies.
LINK_MODES = ("symlink", "hardlink", "copy")
# What eval-vlm asks about each identity image.
DEFAULT_QUESTION = "Who is in this image? Answer with the person's name."

__all__ = ["DEFAULT_QUESTION", "LINK_MODES", "require"]


def __getattr__(name: str):
    # `class_path: slug_lightning.hf.PipelineGradientCollector` in configs, without importing every submodule
    # (or transformers) when only the mappings are wanted.
    if name == "PipelineGradientCollector":
        from slug_lightning.hf.loading import PipelineGradientCollector

        return PipelineGradientCollector
    if name == "apply_edit":
        from slug_lightning.hf.export import apply_edit

        return apply_edit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
