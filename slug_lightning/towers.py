"""A CLIP tower as a chain of stages, so a probe can start at the stage its edit changes.

Each tower of an OpenCLIP model is the chain

    input → stem → block 0 → … → block L−1 → pool → project → features

(vision: pixels → patch embedding, class token, positions, ``ln_pre`` → residual blocks → ``ln_post`` and
token pooling → ``visual.proj``; language: tokens → token and positional embeddings → residual blocks →
``ln_final`` and end-of-text pooling → ``text_projection``). Editing one weight changes the output of its
stage and everything after it, never what comes before. A probe of SLUG therefore only has to run the
stages from the edited one on, over the inputs that stage saw at θ⁰, which a cache holds
(:class:`~slug_lightning.evaluation.ZeroShotEvaluator`).

:func:`tower_stages` recognises the standard OpenCLIP towers (``VisionTransformer``; the text tower of
``CLIP`` and ``CustomTextCLIP``'s ``TextTransformer`` without class token or padding mask). For anything
else it returns None and the evaluator recomputes the whole tower; it also checks, on real inputs, that
running the stages equals ``encode_image``/``encode_text`` before trusting them (:func:`check_stages`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slug_lightning.layers import LANGUAGE, VISION, LayerStats

# A stage maps (hidden, tokens) → hidden. Only the language pool stage reads the tokens (it pools at the
# end-of-text position); for the vision tower they are None.
Stage = Callable[[Tensor, Tensor | None], Tensor]


@dataclass
class TowerStages:
    """The stages of one tower, and where each of its parameters enters.

    Attributes:
        tower: ``"vision"`` or ``"language"``.
        stages: ``stages[0]`` is the stem, ``1..L`` the residual blocks, then pool, then project.
        stage_of: Parameter name → index of the first stage whose output it changes.
    """

    tower: str
    stages: list[Stage]
    stage_of: Callable[[str], int]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def run(self, hidden: Tensor, start: int, stop: int | None = None, tokens: Tensor | None = None) -> Tensor:
        """Run stages ``start .. stop-1`` (to the end by default) on ``hidden``, the input of ``start``."""
        for stage in self.stages[start:stop]:
            hidden = stage(hidden, tokens)
        return hidden


def _block_stage(block: nn.Module, batch_first: bool, attn_mask: Callable[[], Tensor | None]) -> Stage:
    def run(hidden: Tensor, tokens: Tensor | None) -> Tensor:
        # The cache holds batch-first hidden states; older towers run their blocks sequence-first.
        if not batch_first:
            return block(hidden.transpose(0, 1), attn_mask=attn_mask()).transpose(0, 1)
        return block(hidden, attn_mask=attn_mask())

    return run


def _stage_lookup(prefix: str, num_blocks: int, pool_names: Sequence[str], project_names: Sequence[str]):
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")

    def stage_of(name: str) -> int:
        match = block.match(name)
        if match:
            return 1 + int(match.group(1))
        if name in project_names:
            return num_blocks + 2
        if any(name.startswith(p) for p in pool_names):
            return num_blocks + 1
        return 0  # embeddings, conv1, ln_pre, ...: everything is recomputed from the input

    return stage_of


def vision_stages(model: nn.Module) -> TowerStages | None:
    """The stages of ``model.visual`` if it is an OpenCLIP ``VisionTransformer``, else None."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer) or not hasattr(visual, "_embeds") or not hasattr(visual, "_pool"):
        return None
    transformer = visual.transformer
    blocks = list(transformer.resblocks)

    def project(pooled: Tensor, tokens: Tensor | None) -> Tensor:
        return pooled if visual.proj is None else pooled @ visual.proj

    stages: list[Stage] = [lambda images, tokens: visual._embeds(images)]
    stages += [_block_stage(b, transformer.batch_first, lambda: None) for b in blocks]
    stages += [lambda hidden, tokens: visual._pool(hidden)[0], project]
    return TowerStages(
        VISION,
        stages,
        _stage_lookup(
            "visual.", len(blocks), pool_names=("visual.ln_post", "visual.attn_pool"), project_names=("visual.proj",)
        ),
    )


def text_stages(model: nn.Module) -> TowerStages | None:
    """The stages of the text tower of an OpenCLIP ``CLIP`` or plain ``CustomTextCLIP``, else None."""
    from open_clip.transformer import TextTransformer, text_global_pool

    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        # A class token or a padding mask makes the attention mask depend on the batch: not staged.
        if text.cls_emb is not None or text.use_pad_mask:
            return None
        owner, prefix, pool_type, eos_id = text, "text.", text.pool_type, getattr(text, "eos_id", None)
    elif all(hasattr(model, a) for a in ("token_embedding", "transformer", "ln_final", "text_projection")):
        owner, prefix = model, ""
        pool_type, eos_id = getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None)
    else:
        return None
    transformer = owner.transformer
    blocks = list(transformer.resblocks)

    def stem(tokens: Tensor, _: Tensor | None) -> Tensor:
        cast = transformer.get_cast_dtype()
        hidden = owner.token_embedding(tokens).to(cast)
        return hidden + owner.positional_embedding[: hidden.shape[1]].to(cast)

    def pool(hidden: Tensor, tokens: Tensor | None) -> Tensor:
        return text_global_pool(owner.ln_final(hidden), tokens, pool_type, eos_token_id=eos_id)

    def project(pooled: Tensor, tokens: Tensor | None) -> Tensor:
        projection = owner.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    stages: list[Stage] = [stem]
    stages += [_block_stage(b, transformer.batch_first, lambda: owner.attn_mask) for b in blocks]
    stages += [pool, project]
    project_names = tuple(
        n for n in (f"{prefix}text_projection", f"{prefix}text_projection.weight", f"{prefix}text_projection.bias")
    )
    return TowerStages(
        LANGUAGE,
        stages,
        _stage_lookup(prefix, len(blocks), pool_names=(f"{prefix}ln_final",), project_names=project_names),
    )


def tower_stages(model: nn.Module) -> dict[str, TowerStages]:
    """The staged towers of ``model`` that this module recognises, by tower name (maybe none)."""
    found = {VISION: vision_stages(model), LANGUAGE: text_stages(model)}
    return {tower: stages for tower, stages in found.items() if stages is not None}


@torch.no_grad()
def in_forward_order(layers: list[LayerStats], stages: dict[str, TowerStages]) -> list[LayerStats]:
    """The vision tower's layers, then the language tower's, each in the order the forward pass meets them.

    Probes then move each tower's cache forward only (parameter order puts ``visual.proj`` before
    ``visual.conv1``). Layers of a tower that is not staged keep their parameter order.
    """

    def depth(layer: LayerStats) -> tuple[bool, int]:
        tower = stages.get(layer.tower)
        return layer.tower != VISION, tower.stage_of(layer.name) if tower is not None else 0

    return sorted(layers, key=depth)


def check_stages(model: nn.Module, stages: TowerStages, inputs: Tensor, atol: float = 1e-5) -> bool:
    """Whether running every stage on ``inputs`` reproduces the model's own encoder (within ``atol``
    after normalisation). Guards the cache against towers that look standard but are not."""
    encode = model.encode_image if stages.tower == VISION else model.encode_text
    tokens = inputs if stages.tower == LANGUAGE else None
    expected = F.normalize(encode(inputs).float(), dim=-1)
    staged = F.normalize(stages.run(inputs, 0, tokens=tokens).float(), dim=-1)
    return expected.shape == staged.shape and bool(torch.allclose(expected, staged, atol=atol, rtol=0))
