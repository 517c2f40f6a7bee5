"""Unlearning a pipeline's own CLIP: its text encoder (diffusers) or vision tower (LLaVA) as an OpenCLIP model.

SLUG needs both towers (the forget loss compares image and text embeddings), but a pipeline holds one, and
sometimes only part of it (SD 2.x keeps 23 of ViT-H-14's 24 text blocks, no projection). So the OpenCLIP
architecture the tower came from is built (with its pretrained weights: the other tower and the missing
blocks come from there) and the pipeline's tensors are loaded over it through :mod:`.mapping`. The result
goes to ``GradientCollector.from_clip(...)``, or use :class:`PipelineGradientCollector` in a config::

    model:
      class_path: slug_lightning.hf.PipelineGradientCollector
      init_args:
        pipeline: /path/to/stable-diffusion-2-1     # a diffusers pipeline directory
        kind: diffusers
        model_name: ViT-H-14
        pretrained: laion2b_s32b_b79k
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from slug_lightning.errors import UserError
from slug_lightning.gradients import GradientCollector
from slug_lightning.hf.checkpoints import read_tower
from slug_lightning.hf.export import diffusers_reach, llava_reach
from slug_lightning.hf.mapping import Reach
from slug_lightning.layers import LANGUAGE, VISION
from slug_lightning.models import LoadedCLIP, load_clip

log = logging.getLogger(__name__)
KINDS = ("diffusers", "llava")


class HFTokenizer:
    """A Hugging Face ``CLIPTokenizer`` as the callable the package expects: ``list[str] → [n, context]`` ids.

    Pads to ``context_length`` and truncates, keeping the end-of-text token, as the pipeline itself does.
    """

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(
            texts, padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        ).input_ids


def load_pipeline_clip(
    pipeline: str | Path, kind: str, model_name: str, pretrained: str | None = None, component: str | None = None
) -> tuple[LoadedCLIP, Reach]:
    """An OpenCLIP model whose ``kind`` tower holds the pipeline's weights.

    Args:
        pipeline: A diffusers pipeline directory (``kind="diffusers"``), or a LLaVA model directory or the
            CLIP directory an original-LLaVA config names (``kind="llava"``).
        kind: ``"diffusers"`` (the text encoder) or ``"llava"`` (the vision tower).
        model_name: The OpenCLIP architecture of that tower (SD 2.x: ``ViT-H-14``; LLaVA-1.5:
            ``ViT-L-14-336-quickgelu``, whose QuickGELU the OpenAI weights need).
        pretrained: Its OpenCLIP weights (tag or file), for the other tower and anything the pipeline lacks.
        component: Subdirectory of ``pipeline`` holding the tower (default: ``text_encoder`` for diffusers,
            the directory itself for LLaVA).

    Returns:
        The loaded model (tokenizer: the pipeline's own ``tokenizer/`` for diffusers, else OpenCLIP's), and
        what of the tower the pipeline uses.

    Raises:
        UserError: for an unknown kind, a missing tower, or a pipeline tower that does not fit the
            architecture (width, heads, activation ...).
    """
    from slug_lightning.hf import require
    from slug_lightning.hf.convert import check_config_fits, load_into_open_clip

    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    transformers = require("transformers", "diffusion" if kind == "diffusers" else "vlm")
    pipeline = Path(pipeline)
    tower = LANGUAGE if kind == "diffusers" else VISION
    component = ("text_encoder" if kind == "diffusers" else "") if component is None else component
    loaded = load_clip(model_name, pretrained)
    _, tensors, config = read_tower(pipeline / component, tower)
    if kind == "diffusers":
        reach = diffusers_reach(pipeline, component)
        hf_config = transformers.CLIPTextConfig.from_dict(config)
    else:
        reach = llava_reach(pipeline / component)
        hf_config = transformers.CLIPVisionConfig.from_dict(config.get("vision_config", config))
    check_config_fits(loaded.model, hf_config, tower)
    names = set(load_into_open_clip(loaded.model, tensors, tower))
    own = [
        n
        for n, _ in loaded.model.named_parameters()
        if n != "logit_scale" and n.startswith("visual.") == (tower == VISION)
    ]
    kept = [n for n in own if n not in names]
    if kept:
        shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
        log.info("The pipeline holds no %s; they keep the weights of %s (%s).", shown, model_name, pretrained)
    tokenizer_dir = pipeline / "tokenizer"
    if kind == "diffusers" and tokenizer_dir.is_dir():
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
        loaded.tokenizer = HFTokenizer(tokenizer, loaded.model.context_length)
    return loaded, reach


def blocks_of(model, tower: str) -> int:
    """Residual blocks of an OpenCLIP model's tower."""
    return len(model.visual.transformer.resblocks if tower == VISION else model.transformer.resblocks)


class PipelineGradientCollector(GradientCollector):
    """A :class:`~slug_lightning.GradientCollector` over a pipeline's own CLIP tower (see :func:`load_pipeline_clip`).

    By default the candidate layers are restricted to those the pipeline uses: the other tower and every
    part of this tower that cannot change the pipeline's output (SD 2.x: the last text block and the
    projection; LLaVA-1.5: the last vision block, ``ln_post`` and the projection) are excluded, so the
    chosen edit always reaches the pipeline.

    Args:
        pipeline: The pipeline directory.
        kind: ``"diffusers"`` or ``"llava"``.
        model_name: OpenCLIP architecture of the pipeline's tower.
        pretrained: OpenCLIP weights for the other tower and what the pipeline lacks.
        component: Subdirectory with the tower (default: ``text_encoder`` / the directory itself).
        restrict_to_pipeline: Exclude the candidates the pipeline cannot feel (see above).
        include: Extra candidate patterns (as in ``GradientCollector``).
        exclude: More patterns to exclude.
    """

    def __init__(
        self,
        pipeline: str,
        kind: Literal["diffusers", "llava"] = "diffusers",
        model_name: str = "ViT-H-14",
        pretrained: str | None = None,
        component: str | None = None,
        restrict_to_pipeline: bool = True,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        loaded, reach = load_pipeline_clip(pipeline, kind, model_name, pretrained, component)
        exclude = list(exclude)
        if restrict_to_pipeline:
            patterns = reach.exclude_patterns(blocks_of(loaded.model, reach.tower))
            exclude += [p for p in patterns if p not in exclude]
            log.info("Candidates restricted to what %s uses: exclude %s", reach.what, patterns)
        super().__init__(
            model_name=model_name,
            pretrained=pretrained,
            include=include,
            exclude=exclude,
            _clip=(loaded.model, loaded.preprocess, loaded.tokenizer),
        )
        self.pipeline, self.kind, self.reach = str(Path(pipeline).resolve()), kind, reach

    def identity(self) -> dict:
        """The model identity, with the pipeline the tower came from (its directory's name: the identity is shipped
        in the run's files, which must not carry local paths)."""
        return {**super().identity(), "pipeline": Path(self.pipeline).name, "kind": self.kind}
