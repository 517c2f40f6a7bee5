"""Delivery into tiny random pipelines, offline: export-diffusers and export-llava.

The delivered weights must equal the unlearned CLIP's tensors under the mapping, only files with changed
tensors are new, the input is never touched, the pipelines still run, and edits a pipeline cannot feel
are refused.
"""

import hashlib
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from hf_tiny import fake_run, randomize, tiny_llava, tiny_sd_pipeline
from safetensors.torch import load_file

import slug_lightning  # noqa: F401  (registers slug-tiny)
from slug_lightning.cli import main
from slug_lightning.hf.export import apply_edit
from slug_lightning.hf.mapping import Layout, to_hf
from slug_lightning.layers import LANGUAGE, VISION
from slug_lightning.models import read_state_dict


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return randomize(open_clip.create_model("slug-tiny").eval())


@pytest.fixture(scope="module")
def sd2_like(clip, tmp_path_factory):
    """A tiny SD pipeline whose text encoder keeps 1 of the 2 text blocks, as SD 2.x keeps 23 of 24."""
    return tiny_sd_pipeline(clip, tmp_path_factory.mktemp("sd") / "pipeline", text_layers=1)


@pytest.fixture(scope="module")
def llava(clip, tmp_path_factory):
    """A tiny LLaVA reading hidden_states[-2] of the 3-block vision tower (blocks 0 and 1)."""
    return tiny_llava(clip, tmp_path_factory.mktemp("llava") / "model")


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _export(*args) -> int:
    return main([*map(str, args)])


def _expected(run: Path, tower: str, keys) -> dict[str, torch.Tensor]:
    """The unlearned CLIP's tensors (run/model.safetensors) under the mapping, named as in ``keys``."""
    canonical = to_hf(read_state_dict(run / "model.safetensors"), towers=[tower])
    layout = Layout.find(keys, tower)
    return {layout.key(name): value for name, value in canonical.items() if layout.key(name) in keys}


def test_export_diffusers_delivers_the_unlearned_text_tower(clip, sd2_like, tmp_path):
    from diffusers import StableDiffusionPipeline

    layers = {"transformer.resblocks.0.attn.in_proj_weight": 0.1, "ln_final.weight": 0.05}
    run = fake_run(clip, layers, tmp_path / "run")
    before = _digest(sd2_like)
    output = tmp_path / "edited"
    assert _export("export-diffusers", "--run", run, "--pipeline", sd2_like, "--output_dir", output) == 0
    assert _digest(sd2_like) == before  # the input is untouched

    delivered = load_file(str(output / "text_encoder" / "model.safetensors"))
    expected = _expected(run, LANGUAGE, delivered)
    assert expected.keys() == {k for k in delivered if not k.endswith("position_ids")}
    for key, value in expected.items():
        torch.testing.assert_close(delivered[key], value, atol=1e-6, rtol=1e-6, msg=key)
    original = load_file(str(sd2_like / "text_encoder" / "model.safetensors"))
    changed = sorted(k for k in delivered if not torch.equal(delivered[k], original[k]))
    assert [k.split(".")[-2] for k in changed] == ["k_proj", "q_proj", "v_proj", "final_layer_norm"]

    # only the text encoder's weights are new; the rest are links into the input
    summary = json.loads((output / "slug_edit.json").read_text())
    assert summary["rewritten"] == ["text_encoder/model.safetensors"]
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_symlink()
    assert not (output / "text_encoder" / "model.safetensors").is_symlink()
    assert summary["changed"] == changed
    assert summary["base_relative_difference"] < 1e-6
    # slug_edit.safetensors holds the changed tensors only
    assert len(load_file(str(output / "slug_edit.safetensors"))) == len(changed)

    # the pipeline loads and runs; its prompt embeddings are the edited ones
    pipe = StableDiffusionPipeline.from_pretrained(str(output))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of a person", num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (16, 16)
    in_memory = pipe.text_encoder.state_dict()
    for key, value in _expected(run, LANGUAGE, in_memory).items():
        torch.testing.assert_close(in_memory[key], value, atol=1e-6, rtol=1e-6, msg=key)

    # apply_edit gives an in-memory pipeline the same weights
    fresh = StableDiffusionPipeline.from_pretrained(str(sd2_like))
    assert sorted(apply_edit(fresh.text_encoder, output / "slug_edit.safetensors")) == changed
    for key, value in pipe.text_encoder.state_dict().items():
        assert torch.equal(fresh.text_encoder.state_dict()[key], value), key


@pytest.mark.parametrize(
    "layer, message",
    [
        ("transformer.resblocks.1.mlp.c_fc.weight", "never uses"),  # the block SD 2.x drops
        ("text_projection", "never uses"),
        ("visual.transformer.resblocks.0.attn.in_proj_weight", "takes the language tower"),
    ],
)
def test_export_diffusers_refuses_what_the_pipeline_cannot_feel(clip, sd2_like, tmp_path, capsys, layer, message):
    run = fake_run(clip, {layer: 0.1}, tmp_path / "run")
    assert _export("export-diffusers", "--run", run, "--pipeline", sd2_like, "--output_dir", tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_pipeline_of_another_clip_and_existing_outputs(clip, sd2_like, tmp_path, capsys):
    other = randomize(open_clip.create_model("slug-tiny").eval(), seed=7)
    run = fake_run(other, {"ln_final.weight": 0.1}, tmp_path / "run")
    assert _export("export-diffusers", "--run", run, "--pipeline", sd2_like, "--output_dir", tmp_path / "a") == 2
    assert "not the CLIP the run started from" in capsys.readouterr().err
    assert (
        _export(
            "export-diffusers", "--run", run, "--pipeline", sd2_like, "--output_dir", tmp_path / "a", "--no_check_base"
        )
        == 0
    )
    assert (
        _export(
            "export-diffusers", "--run", run, "--pipeline", sd2_like, "--output_dir", tmp_path / "a", "--no_check_base"
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    assert (
        _export(
            "export-diffusers",
            "--run",
            run,
            "--pipeline",
            sd2_like,
            "--output_dir",
            sd2_like / "inside",
            "--no_check_base",
        )
        == 2
    )
    assert "outside the input" in capsys.readouterr().err


def test_half_precision_variant_is_edited_too_and_keeps_its_dtype(clip, sd2_like, tmp_path):
    from transformers import CLIPTextModel

    pipeline = tmp_path / "pipeline"
    shutil.copytree(sd2_like, pipeline)
    CLIPTextModel.from_pretrained(str(pipeline / "text_encoder")).half().save_pretrained(
        str(pipeline / "text_encoder"), variant="fp16"
    )
    run = fake_run(clip, {"transformer.resblocks.0.mlp.c_proj.weight": 0.1}, tmp_path / "run")
    assert (
        _export(
            "export-diffusers", "--run", run, "--pipeline", pipeline, "--output_dir", tmp_path / "out", "--link", "copy"
        )
        == 0
    )
    summary = json.loads((tmp_path / "out" / "slug_edit.json").read_text())
    assert sorted(summary["rewritten"]) == ["text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors"]
    half = load_file(str(tmp_path / "out" / "text_encoder" / "model.fp16.safetensors"))
    expected = _expected(run, LANGUAGE, half)
    assert all(value.dtype == torch.float16 for value in half.values())
    for key, value in expected.items():
        assert torch.equal(half[key], value.half()), key  # exactly the fp32 result rounded once
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


def test_export_llava_delivers_the_unlearned_vision_tower(clip, llava, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run = fake_run(
        clip, {"visual.transformer.resblocks.1.attn.in_proj_weight": 0.1, "visual.conv1.weight": 0.05}, tmp_path / "run"
    )
    before = _digest(llava)
    output = tmp_path / "edited"
    assert _export("export-llava", "--run", run, "--model", llava, "--output_dir", output) == 0
    assert _digest(llava) == before

    delivered = load_file(str(output / "model.safetensors"))
    expected = _expected(run, VISION, delivered)
    assert len(expected) == sum(1 for k in delivered if "vision_tower" in k)
    for key, value in expected.items():
        torch.testing.assert_close(delivered[key], value, atol=1e-6, rtol=1e-6, msg=key)
    original = load_file(str(llava / "model.safetensors"))
    changed = [k for k in delivered if not torch.equal(delivered[k], original[k])]
    assert len(changed) == 4 and all("vision_tower" in k for k in changed)

    model = LlavaForConditionalGeneration.from_pretrained(str(output)).eval()
    vision = model.model.vision_tower.state_dict()
    layout = Layout.find(vision, VISION)
    for key, value in _expected(run, VISION, vision).items():
        torch.testing.assert_close(vision[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert layout.prefix == ""
    processor = AutoProcessor.from_pretrained(str(output))
    from PIL import Image

    inputs = processor(
        images=Image.new("RGB", (40, 40), "red"), text="USER: <image>\nWho is this? ASSISTANT:", return_tensors="pt"
    )
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize(
    "layer",
    [
        "visual.transformer.resblocks.2.mlp.c_fc.weight",
        "visual.ln_post.weight",
        "visual.proj",
        "transformer.resblocks.0.mlp.c_fc.weight",
    ],
)
def test_export_llava_refuses_layers_after_the_feature_layer(clip, llava, tmp_path, capsys, layer):
    run = fake_run(clip, {layer: 0.1}, tmp_path / "run")
    assert _export("export-llava", "--run", run, "--model", llava, "--output_dir", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "never uses" in error or "takes the vision tower" in error
    # read from the last layer, the same last block is reachable
    if layer.startswith("visual.transformer.resblocks.2"):
        assert (
            _export(
                "export-llava",
                "--run",
                run,
                "--model",
                llava,
                "--output_dir",
                tmp_path / "out",
                "--vision_feature_layer",
                "-1",
            )
            == 0
        )


def test_sharded_model_rewrites_only_the_shard_with_the_edit(clip, llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    sharded = tmp_path / "sharded"
    LlavaForConditionalGeneration.from_pretrained(str(llava)).save_pretrained(str(sharded), max_shard_size="2MB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2
    run = fake_run(clip, {"visual.transformer.resblocks.0.mlp.c_fc.weight": 0.1}, tmp_path / "run")
    assert _export("export-llava", "--run", run, "--model", sharded, "--output_dir", tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "slug_edit.json").read_text())
    assert len(summary["rewritten"]) == 1 and summary["rewritten"][0] in shards
    assert sum(name.endswith(".safetensors") for name in summary["linked"]) == len(shards) - 1
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out"))
    vision = model.model.vision_tower.state_dict()
    for key, value in _expected(run, VISION, vision).items():
        torch.testing.assert_close(vision[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_unlearned_model_without_delta_delivers_its_tower(clip, sd2_like, tmp_path):
    run = fake_run(clip, {"transformer.resblocks.0.ln_2.weight": 0.1}, tmp_path / "run")
    (run / "delta.safetensors").unlink()
    assert _export("export-diffusers", "--run", run, "--pipeline", sd2_like, "--output_dir", tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "slug_edit.json").read_text())
    assert summary["changed"] == ["encoder.layers.0.layer_norm2.weight"]
    delivered = load_file(str(tmp_path / "out" / "text_encoder" / "model.safetensors"))
    for key, value in _expected(run, LANGUAGE, delivered).items():
        assert torch.equal(delivered[key], value), key
