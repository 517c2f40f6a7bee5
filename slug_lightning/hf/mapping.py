"""Exact parameter mappings between OpenCLIP CLIP towers and the Hugging Face CLIP layout (METHOD §10).

Names on the Hugging Face side are *canonical*: those of ``transformers.CLIPModel``
(``text_model.encoder.layers.0.self_attn.q_proj.weight``, ``vision_model.pre_layrnorm.weight``,
``text_projection.weight``, ``visual_projection.weight``, ``logit_scale``). A real checkpoint stores a tower
under some prefix (``text_model.`` in a diffusers text encoder saved by transformers 4, nothing in one
saved by transformers 5, ``model.vision_tower.vision_model.`` in a LLaVA model): :mod:`.checkpoints` finds
it and swaps the canonical ``text_model.``/``vision_model.`` for it.

The two layouts differ in four ways, all handled here:

- names (``ln_pre`` ↔ ``pre_layrnorm``, ``c_fc`` ↔ ``fc1``, ``resblocks`` ↔ ``encoder.layers`` ...);
- fused attention: OpenCLIP keeps ``in_proj_weight`` ``[3w, w]`` (and ``in_proj_bias``), Hugging Face keeps
  ``q_proj``, ``k_proj``, ``v_proj`` of ``[w, w]`` each: the rows of the fused tensor in that order;
- projections: OpenCLIP multiplies ``x @ proj`` (``[width, embed]``), Hugging Face uses ``nn.Linear``
  (``[embed, width]``), so ``visual.proj`` and ``text_projection`` are transposed;
- what is not a tensor at all (the causal mask, EOT pooling, the activation function) lives in the
  configs: see :mod:`.convert`.

Everything here is a pure function over names and tensors (no ``transformers`` import).

Example::

    >>> hf_names("visual.transformer.resblocks.3.attn.in_proj_weight")[1]
    ('vision_model.encoder.layers.3.self_attn.k_proj.weight', 'k')
    >>> hf_names("text_projection")
    [('text_projection.weight', 'T')]
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from slug_lightning.errors import UserError
from slug_lightning.layers import LANGUAGE, VISION, tower_of

TEXT_ROOT, VISION_ROOT = "text_model.", "vision_model."
TEXT_PROJECTION, VISUAL_PROJECTION = "text_projection.weight", "visual_projection.weight"

# Per residual block: OpenCLIP suffix -> Hugging Face suffix. The fused attention is split separately.
_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_QKV = ("q_proj", "k_proj", "v_proj")  # the row order of OpenCLIP's (torch's) fused in_proj

# Outside the blocks: OpenCLIP name -> (Hugging Face name, transposed?).
_TEXT_OTHER = {
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "ln_final.weight": ("text_model.final_layer_norm.weight", False),
    "ln_final.bias": ("text_model.final_layer_norm.bias", False),
    "text_projection": (TEXT_PROJECTION, True),
}
_VISION_OTHER = {
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", False),
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", False),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", False),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", False),
    "visual.proj": (VISUAL_PROJECTION, True),
}
_SHARED = {"logit_scale": ("logit_scale", False)}  # both store log(1/temperature)
_BLOCK_NAME = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK_NAME = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")


def _tower(open_clip_name: str) -> str:
    """:func:`slug_lightning.layers.tower_of`, except that ``logit_scale`` and ``logit_bias`` (neither tower's
    there) go with the language tower here, as the Hugging Face CLIP keeps ``logit_scale`` beside its text side."""
    try:
        return tower_of(open_clip_name)
    except ValueError:
        return LANGUAGE


def hf_names(open_clip_name: str) -> list[tuple[str, str | None]]:
    """The canonical Hugging Face tensor(s) an OpenCLIP parameter becomes, and how.

    Args:
        open_clip_name: A parameter name of an OpenCLIP ``CLIP`` (text tower at the top level).

    Returns:
        ``[(hf_name, how)]`` where ``how`` is None (same tensor), ``"T"`` (transposed), or ``"q"``/``"k"``/
        ``"v"`` (that third of the rows of a fused attention projection).

    Raises:
        UserError: for a parameter with no Hugging Face CLIP counterpart (attention pooling, layer scale,
            a ``text.`` custom text tower ...), which this mapping cannot carry.
    """
    for table in (_TEXT_OTHER, _VISION_OTHER, _SHARED):
        if open_clip_name in table:
            target, transposed = table[open_clip_name]
            return [(target, "T" if transposed else None)]
    match = _BLOCK_NAME.match(open_clip_name)
    if match:
        root = VISION_ROOT if match.group(1) else TEXT_ROOT
        prefix = f"{root}encoder.layers.{match.group(2)}."
        suffix = match.group(3)
        if suffix in _BLOCK:
            return [(prefix + _BLOCK[suffix], None)]
        if suffix in _FUSED:
            return [(f"{prefix}self_attn.{part}.{_FUSED[suffix]}", part[0]) for part in _QKV]
    raise UserError(
        f"OpenCLIP parameter {open_clip_name!r} has no counterpart in the Hugging Face CLIP layout. Only the "
        "plain CLIP architecture maps exactly (ViT towers with a pre-LN, class-token pooling and projections, "
        "a causal text transformer with EOT pooling): not attention pooling, layer scale, or custom text towers."
    )


def _take(tensor: Tensor, how: str | None) -> Tensor:
    if how is None:
        return tensor
    if how == "T":
        return tensor.T
    index = "qkv".index(how)
    rows = tensor.shape[0] // 3
    return tensor[index * rows : (index + 1) * rows]


def to_hf(state_dict: Mapping[str, Tensor], towers: Iterable[str] = (LANGUAGE, VISION)) -> dict[str, Tensor]:
    """Map OpenCLIP tensors (a whole state dict or any part of it, e.g. a delta) to canonical HF names.

    Args:
        state_dict: OpenCLIP name → tensor. Buffers without a counterpart (``attn_mask``) are skipped.
        towers: Keep only these towers (``"language"``, ``"vision"``); ``logit_scale`` goes with the text.

    Returns:
        Canonical HF name → tensor (contiguous copies; fused projections split, projections transposed).

    Raises:
        UserError: for a parameter of a kept tower that has no HF counterpart.
    """
    towers = set(towers)
    result = {}
    for name, tensor in state_dict.items():
        if name == "attn_mask" or _tower(name) not in towers:
            continue
        for hf_name, how in hf_names(name):
            result[hf_name] = _take(tensor, how).contiguous().clone()
    return result


def open_clip_name(hf_name: str) -> tuple[str, str | None]:
    """The OpenCLIP parameter a canonical HF tensor comes from, and how (the inverse of :func:`hf_names`).

    Raises:
        UserError: for a name outside the CLIP layout.
    """
    for table in (_TEXT_OTHER, _VISION_OTHER, _SHARED):
        for name, (target, transposed) in table.items():
            if target == hf_name:
                return name, "T" if transposed else None
    match = _HF_BLOCK_NAME.match(hf_name)
    if match:
        prefix = f"{'visual.' if match.group(1) == 'vision_model' else ''}transformer.resblocks.{match.group(2)}."
        suffix = match.group(3)
        for source, target in _BLOCK.items():
            if target == suffix:
                return prefix + source, None
        for part in _QKV:
            for source, kind in _FUSED.items():
                if suffix == f"self_attn.{part}.{kind}":
                    return prefix + source, part[0]
    raise UserError(f"{hf_name!r} is not a tensor of the Hugging Face CLIP layout.")


def from_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map canonical HF CLIP tensors (any subset) back to OpenCLIP names, fusing q/k/v projections.

    Tensors that are not weights (``position_ids`` buffers) are skipped.

    Raises:
        UserError: if a layer has some but not all of its q/k/v projections, or a name is outside the layout.
    """
    result: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for hf_name, tensor in state_dict.items():
        if hf_name.endswith("position_ids"):
            continue
        name, how = open_clip_name(hf_name)
        if how in ("q", "k", "v"):
            fused.setdefault(name, {})[how] = tensor
        else:
            result[name] = (tensor.T if how == "T" else tensor).contiguous().clone()
    for name, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise UserError(f"{name!r} needs all of q_proj, k_proj and v_proj; got only {sorted(parts)}.")
        result[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return result


@dataclass(frozen=True)
class Reach:
    """Which parts of a CLIP tower a pipeline actually uses.

    Args:
        tower: ``"language"`` (a diffusion text encoder) or ``"vision"`` (a VLM's vision tower).
        layers: How many residual blocks, from the first, feed the pipeline. SD 2.x: 23 of ViT-H-14's 24
            text blocks (it conditions on the penultimate layer); LLaVA-1.5: 23 of ViT-L-14-336's 24
            vision blocks (``vision_feature_layer = -2``).
        final_norm: Whether the tower's final LayerNorm (``ln_final`` / ``ln_post``) is applied (SD: yes,
            on the penultimate layer's output; LLaVA: no).
        projection: Whether the projection into the joint space is used (SD 1/2, LLaVA: no).
        what: The pipeline, for messages.
    """

    tower: str
    layers: int
    final_norm: bool
    projection: bool
    what: str = "the target pipeline"

    def reaches(self, open_clip_name: str) -> bool:
        """Whether changing this OpenCLIP parameter can change the pipeline's output."""
        if _tower(open_clip_name) != self.tower or open_clip_name == "logit_scale":
            return False
        match = _BLOCK_NAME.match(open_clip_name)
        if match:
            return int(match.group(2)) < self.layers
        if open_clip_name in ("text_projection", "visual.proj"):
            return self.projection
        if open_clip_name.startswith(("ln_final.", "visual.ln_post.")):
            return self.final_norm
        return True  # embeddings, patch conv, pre-LN

    def unreachable(self, names: Iterable[str]) -> list[str]:
        """The names (in order) that cannot change the pipeline's output."""
        return [name for name in names if not self.reaches(name)]

    def exclude_patterns(self, total_layers: int) -> list[str]:
        """``exclude`` patterns for ``GradientCollector`` that leave only candidates this pipeline uses.

        Args:
            total_layers: Residual blocks of the OpenCLIP tower (24 for ViT-H-14 text, ViT-L-14 vision).

        Example::

            >>> Reach("language", layers=23, final_norm=True, projection=False).exclude_patterns(24)
            ['visual.*', 'transformer.resblocks.23.*', 'text_projection']
        """
        if self.tower == LANGUAGE:
            patterns = ["visual.*"]
            blocks, projection, final = "transformer.resblocks", "text_projection", "ln_final.*"
        else:
            patterns = ["transformer.*", "ln_final.*", "text_projection"]
            blocks, projection, final = "visual.transformer.resblocks", "visual.proj", "visual.ln_post.*"
        patterns += [f"{blocks}.{i}.*" for i in range(self.layers, total_layers)]
        if not self.final_norm:
            patterns.append(final)
        if not self.projection:
            patterns.append(projection)
        return patterns


# A tensor that exists exactly once per tower in every HF layout, whatever prefix the tower sits under.
_MARKER = {LANGUAGE: "embeddings.token_embedding.weight", VISION: "embeddings.patch_embedding.weight"}
_ROOT = {LANGUAGE: TEXT_ROOT, VISION: VISION_ROOT}
_PROJECTION = {LANGUAGE: TEXT_PROJECTION, VISION: VISUAL_PROJECTION}


@dataclass(frozen=True)
class Layout:
    """Where a CLIP tower sits in a Hugging Face checkpoint: the key prefix of the tower and its projection.

    ``CLIPModel``: ``text_model.`` / ``text_projection.weight``; a diffusers text encoder saved by
    transformers 4: ``text_model.``, by transformers 5: ``""`` (no projection); a LLaVA model:
    ``vision_tower.vision_model.`` or ``model.vision_tower.vision_model.`` or ``model.vision_tower.``.
    """

    tower: str
    prefix: str
    projection: str | None = None
    logit_scale: str | None = None

    @classmethod
    def find(cls, keys: Iterable[str], tower: str) -> Layout:
        """Locate ``tower`` among the tensor names of a checkpoint.

        Raises:
            UserError: if the tower is absent or present more than once.
        """
        keys = list(keys)
        marker = _MARKER[tower]
        prefixes = [
            k[: -len(marker)] for k in keys if k.endswith(marker) and (k == marker or k[-len(marker) - 1] == ".")
        ]
        if len(prefixes) != 1:
            what = "no" if not prefixes else f"{len(prefixes)} ({', '.join(map(repr, prefixes))})"
            raise UserError(
                f"Found {what} CLIP {tower} tower in these weights (looked for a tensor named "
                f"'*{marker}'); expected exactly one."
            )
        prefix = prefixes[0]
        # The projection sits beside the tower module (CLIPModel, CLIPTextModelWithProjection ...).
        outer = prefix[: -len(_ROOT[tower])] if prefix.endswith(_ROOT[tower]) else None
        projection = outer + _PROJECTION[tower] if outer is not None and outer + _PROJECTION[tower] in keys else None
        logit_scale = outer + "logit_scale" if outer is not None and outer + "logit_scale" in keys else None
        return cls(tower, prefix, projection, logit_scale)

    def key(self, canonical: str) -> str | None:
        """The checkpoint key of a canonical name of this tower (None: this checkpoint does not hold it)."""
        if canonical == _PROJECTION[self.tower]:
            return self.projection
        if canonical == "logit_scale":
            return self.logit_scale
        root = _ROOT[self.tower]
        if not canonical.startswith(root):
            raise UserError(f"{canonical!r} is not a tensor of the {self.tower} tower.")
        return self.prefix + canonical[len(root) :]

    def canonical(self, keys: Iterable[str]) -> dict[str, str]:
        """Checkpoint key → canonical name, for every key of this tower among ``keys``."""
        result = {}
        for key in keys:
            if key in (self.projection, self.logit_scale):
                result[key] = _PROJECTION[self.tower] if key == self.projection else "logit_scale"
            elif key.startswith(self.prefix) and not key.endswith("position_ids"):
                rest = key[len(self.prefix) :]
                if rest.startswith(
                    ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "final_layer_norm.")
                ):
                    result[key] = _ROOT[self.tower] + rest
        return result
