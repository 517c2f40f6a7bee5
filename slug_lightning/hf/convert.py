"""Hugging Face CLIP models from OpenCLIP ones and back, with configs that make the outputs equal.

The tensors move by :mod:`.mapping`; what is not a tensor is set here: the activation (QuickGELU for the
OpenAI weights, exact GELU for LAION's), LayerNorm eps, heads, MLP width, context length and image size,
and the token ids the text tower pools at (OpenCLIP pools at the EOT token, the highest id, by argmax;
``CLIPTextModel`` pools at the first ``eos_token_id``, so that id is set to EOT).

Needs ``transformers`` (the ``[diffusion]`` or ``[vlm]`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from slug_lightning.errors import UserError
from slug_lightning.hf import require
from slug_lightning.hf.mapping import Layout, from_hf, to_hf
from slug_lightning.layers import LANGUAGE, VISION

SOT, EOT = 49406, 49407  # the ids of <start_of_text> and <end_of_text> in CLIP's BPE vocabulary


def _activation(blocks: nn.Module, what: str) -> str:
    import open_clip

    act = blocks[0].mlp.gelu
    if isinstance(act, open_clip.transformer.QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise UserError(f"The {what} tower uses {act!r}; only QuickGELU and exact GELU have a Hugging Face CLIP twin.")


def check_plain_clip(model: nn.Module) -> None:
    """Raise unless ``model`` is an OpenCLIP CLIP whose towers the Hugging Face CLIP layout reproduces.

    Raises:
        UserError: for custom text towers, attention pooling, layer scale, missing pre-LN, pooling other
            than the class token / EOT token, or a text tower without the causal mask.
    """
    import open_clip
    from open_clip.transformer import VisionTransformer

    problems = []
    if type(model) is not open_clip.model.CLIP:
        problems.append(f"it is a {type(model).__name__}, not a plain open_clip CLIP")
    else:
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            problems.append(f"its vision tower is a {type(visual).__name__}, not a ViT")
        else:
            if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
                problems.append("its vision tower does not pool the class token after ln_post")
            if isinstance(visual.ln_pre, nn.Identity):
                problems.append("its vision tower has no ln_pre")
        if model.text_pool_type != "argmax" or model.attn_mask is None:
            problems.append("its text tower is not causal with EOT (argmax) pooling")
        blocks = [*model.transformer.resblocks, *getattr(getattr(model.visual, "transformer", None), "resblocks", [])]
        if any(not isinstance(b.ls_1, nn.Identity) or not isinstance(b.ls_2, nn.Identity) for b in blocks):
            problems.append("it uses layer scale")
        if any(getattr(b.attn, "in_proj_weight", None) is None for b in blocks):
            problems.append("its attention is not torch's fused MultiheadAttention")
    if problems:
        raise UserError("This OpenCLIP model has no exact Hugging Face CLIP twin: " + "; ".join(problems) + ".")


def text_config(model: nn.Module, layers: int | None = None):
    """A ``CLIPTextConfig`` for the text tower of OpenCLIP ``model``.

    Args:
        model: An OpenCLIP CLIP (see :func:`check_plain_clip`).
        layers: Keep only the first ``layers`` blocks (SD 2.x keeps 23 of 24); default all.
    """
    transformers = require("transformers", "diffusion")
    check_plain_clip(model)
    block = model.transformer.resblocks[0]
    total = len(model.transformer.resblocks)
    return transformers.CLIPTextConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.transformer.width,
        intermediate_size=block.mlp.c_fc.out_features,
        projection_dim=model.text_projection.shape[1],
        num_hidden_layers=total if layers is None else _check_layers(layers, total, "text"),
        num_attention_heads=block.attn.num_heads,
        max_position_embeddings=model.context_length,
        hidden_act=_activation(model.transformer.resblocks, "text"),
        layer_norm_eps=model.ln_final.eps,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=0,  # OpenCLIP pads with 0; SD 2.x's tokenizer pads with "!" (id 0) too
    )


def vision_config(model: nn.Module, layers: int | None = None):
    """A ``CLIPVisionConfig`` for the vision tower of OpenCLIP ``model`` (first ``layers`` blocks)."""
    transformers = require("transformers", "vlm")
    check_plain_clip(model)
    visual = model.visual
    block = visual.transformer.resblocks[0]
    total = len(visual.transformer.resblocks)
    image, patch = visual.image_size, visual.patch_size
    if image[0] != image[1] or patch[0] != patch[1]:
        raise UserError(f"Hugging Face CLIP needs square images and patches; this model has {image} and {patch}.")
    return transformers.CLIPVisionConfig(
        hidden_size=visual.transformer.width,
        intermediate_size=block.mlp.c_fc.out_features,
        projection_dim=visual.proj.shape[1],
        num_hidden_layers=total if layers is None else _check_layers(layers, total, "vision"),
        num_attention_heads=block.attn.num_heads,
        num_channels=visual.conv1.in_channels,
        image_size=image[0],
        patch_size=patch[0],
        hidden_act=_activation(visual.transformer.resblocks, "vision"),
        layer_norm_eps=visual.ln_pre.eps,
    )


def _check_layers(layers: int, total: int, what: str) -> int:
    if not 1 <= layers <= total:
        raise UserError(f"layers must be between 1 and the {total} blocks of the {what} tower, got {layers}.")
    return layers


def _load_canonical(hf_model: nn.Module, tower: str, canonical: Mapping[str, Tensor]) -> None:
    own = hf_model.state_dict()
    layout = Layout.find(own, tower)
    wanted = layout.canonical(own)
    state = {key: canonical[name] for key, name in wanted.items() if name in canonical}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise UserError(f"The OpenCLIP model lacks tensors the Hugging Face model needs: {missing[:3]}.")
    hf_model.load_state_dict(state, strict=False)


def to_hf_text(model: nn.Module, projection: bool = False, layers: int | None = None) -> nn.Module:
    """The text tower of OpenCLIP ``model`` as a ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``).

    ``CLIPTextModelWithProjection(ids).text_embeds`` equals ``model.encode_text(ids)``; with ``layers=k``,
    ``CLIPTextModel(ids).last_hidden_state`` equals ``ln_final`` of the k-th block's output (SD 2.x).
    """
    transformers = require("transformers", "diffusion")
    config = text_config(model, layers)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    hf_model = cls(config)
    _load_canonical(hf_model, LANGUAGE, to_hf(model.state_dict(), towers=[LANGUAGE]))
    return hf_model.eval()


def to_hf_vision(model: nn.Module, projection: bool = False, layers: int | None = None) -> nn.Module:
    """The vision tower of OpenCLIP ``model`` as a ``CLIPVisionModel`` (or ``...WithProjection``).

    ``CLIPVisionModelWithProjection(pixels).image_embeds`` equals ``model.encode_image(pixels)``.
    """
    transformers = require("transformers", "vlm")
    config = vision_config(model, layers)
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    hf_model = cls(config)
    _load_canonical(hf_model, VISION, to_hf(model.state_dict(), towers=[VISION]))
    return hf_model.eval()


def to_hf_clip(model: nn.Module) -> nn.Module:
    """OpenCLIP ``model`` as a ``transformers.CLIPModel`` (both towers, projections, logit scale)."""
    transformers = require("transformers", "vlm")
    config = transformers.CLIPConfig(
        text_config=text_config(model).to_dict(),
        vision_config=vision_config(model).to_dict(),
        projection_dim=model.text_projection.shape[1],
    )
    hf_model = transformers.CLIPModel(config)
    hf_model.load_state_dict(to_hf(model.state_dict()), strict=False)
    missing = (
        set(hf_model.state_dict())
        - set(to_hf(model.state_dict()))
        - {k for k in hf_model.state_dict() if k.endswith("position_ids")}
    )
    if missing:
        raise UserError(f"The OpenCLIP model lacks tensors the Hugging Face model needs: {sorted(missing)[:3]}.")
    return hf_model.eval()


def check_config_fits(model: nn.Module, hf_config, tower: str) -> None:
    """Raise unless a HF CLIP text/vision config describes (a prefix of) OpenCLIP ``model``'s tower.

    Raises:
        UserError: naming each field that differs (width, heads, activation, ...), e.g. an OpenAI tower
            (QuickGELU) given to ``ViT-L-14-336`` instead of ``ViT-L-14-336-quickgelu``.
    """
    own = (text_config if tower == LANGUAGE else vision_config)(model)
    fields = ["hidden_size", "intermediate_size", "num_attention_heads", "hidden_act", "layer_norm_eps"]
    if tower == LANGUAGE:
        fields += ["vocab_size", "max_position_embeddings"]
    else:
        fields += ["image_size", "patch_size", "num_channels"]
    problems = [
        f"{f}: pipeline {getattr(hf_config, f)!r} vs OpenCLIP {getattr(own, f)!r}"
        for f in fields
        if getattr(hf_config, f) != getattr(own, f)
    ]
    if hf_config.num_hidden_layers > own.num_hidden_layers:
        problems.append(f"num_hidden_layers: pipeline {hf_config.num_hidden_layers} > OpenCLIP {own.num_hidden_layers}")
    if problems:
        hint = (
            " (OpenAI weights use QuickGELU: pick the '-quickgelu' OpenCLIP config, e.g. ViT-L-14-336-quickgelu)"
            if any(p.startswith("hidden_act") for p in problems)
            else ""
        )
        raise UserError(
            f"The pipeline's {tower} tower does not fit the OpenCLIP architecture: " + "; ".join(problems) + hint + "."
        )


def load_into_open_clip(model: nn.Module, hf_state_dict: Mapping[str, Tensor], tower: str) -> list[str]:
    """Overwrite OpenCLIP ``model``'s ``tower`` with the tensors of a Hugging Face checkpoint of it.

    Tensors the checkpoint does not hold (blocks an SD 2.x text encoder dropped, a missing projection)
    keep ``model``'s values.

    Args:
        model: An OpenCLIP CLIP of the matching architecture.
        hf_state_dict: Tensors of a HF model or checkpoint holding the tower under any prefix.
        tower: ``"language"`` or ``"vision"``.

    Returns:
        The OpenCLIP parameter names that were loaded.
    """
    layout = Layout.find(hf_state_dict, tower)
    canonical = {name: hf_state_dict[key] for key, name in layout.canonical(hf_state_dict).items()}
    canonical.pop("logit_scale", None)  # a CLIPModel's temperature is shared, not the tower's
    tensors = from_hf(canonical)
    own = model.state_dict()
    problems = [
        f"{name}: {tuple(t.shape)} vs {tuple(own[name].shape)}" if name in own else f"{name}: not in model"
        for name, t in tensors.items()
        if name not in own or own[name].shape != t.shape
    ]
    if problems:
        raise UserError(f"The Hugging Face {tower} tower does not fit this OpenCLIP model: {problems[:3]}.")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return list(tensors)
