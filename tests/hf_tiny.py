"""Tiny, random, offline Hugging Face pipelines around the packaged ``slug-tiny`` CLIP, for the hf tests.

- a CLIP tokenizer written from open_clip's own BPE vocabulary (Hugging Face tokenizers cannot be
  downloaded here; ``CLIPTokenizer`` needs ``vocab.json`` and ``merges.txt``, which this rebuilds);
- a Stable Diffusion pipeline (tiny UNet and VAE) whose text encoder is the OpenCLIP text tower, optionally
  truncated by one block as SD 2.x truncates ViT-H-14;
- a LLaVA model (tiny Llama) whose vision tower is the OpenCLIP vision tower.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch


def write_clip_tokenizer(directory: Path, context_length: int, pad_token: str = "!") -> Path:
    """Write a ``CLIPTokenizer`` equivalent to open_clip's tokenizer (same BPE, same ids) into ``directory``.

    ``pad_token="!"`` (id 0) is how SD 2.x pads, and what open_clip pads with (0).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        pad_token=pad_token,
        model_max_length=context_length,
    )
    tokenizer.save_pretrained(str(directory))
    return directory


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (LayerNorm weights and biases too), so no mapping error hides behind 1s and 0s."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "logit_scale":
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def tiny_sd_pipeline(clip: torch.nn.Module, directory: Path, text_layers: int | None = None) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` whose text encoder is ``clip``'s text tower (first
    ``text_layers`` blocks, as SD 2.x keeps 23 of 24), with a CLIP tokenizer, to ``directory``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from slug_lightning.hf.convert import to_hf_text

    torch.manual_seed(0)
    text_encoder = to_hf_text(clip, layers=text_layers)
    width = text_encoder.config.hidden_size
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
    )
    tokenizer_dir = write_clip_tokenizer(
        Path(directory).parent / f".{Path(directory).name}-tokenizer", clip.context_length
    )
    from transformers import CLIPTokenizer

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(directory))
    return Path(directory)


def tiny_llava(clip: torch.nn.Module, directory: Path, vision_feature_layer: int = -2) -> Path:
    """Save a tiny ``LlavaForConditionalGeneration`` (1-block Llama) whose vision tower is ``clip``'s, with a
    ``LlavaProcessor`` (the CLIP tokenizer plus an ``<image>`` token), to ``directory``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from slug_lightning.hf.convert import to_hf_vision

    torch.manual_seed(0)
    vision = to_hf_vision(clip)
    tokenizer_dir = write_clip_tokenizer(Path(directory).parent / f".{Path(directory).name}-tokenizer", 256)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    grid = vision.config.image_size // vision.config.patch_size
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        image_token_index=image_token,
        image_seq_length=grid * grid,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.save_pretrained(str(directory))
    size = vision.config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(str(directory))
    return Path(directory)


def fake_run(clip: torch.nn.Module, layers: dict[str, float], directory: Path, concept: str = "Target Person") -> Path:
    """An unlearn run's ``delta.safetensors`` and ``model.safetensors`` as ``report.py`` writes them, with a
    random update of relative size ``layers[name]`` for each layer (no search: the delivery is under test)."""
    from slug_lightning.artifacts import save_state_dict

    generator = torch.Generator().manual_seed(1)
    state = {name: tensor.clone() for name, tensor in clip.state_dict().items()}
    deltas, entries = {}, []
    for layer, size in layers.items():
        direction = torch.randn(state[layer].shape, generator=generator)
        delta = size * state[layer].norm() / direction.norm() * direction
        deltas[f"{concept}/{layer}"] = delta
        entries.append({"key": f"{concept}/{layer}", "concept": concept, "layer": layer, "step_size": size})
        state[layer] = state[layer] + delta
    model = json.dumps({"name": "slug-tiny", "pretrained": None})
    save_state_dict(
        Path(directory) / "delta.safetensors",
        deltas,
        metadata={"format": "slug_lightning.delta/1", "model": model, "entries": json.dumps(entries)},
    )
    save_state_dict(Path(directory) / "model.safetensors", state, metadata={"format": "pt", "model": model})
    return Path(directory)
