"""OpenCLIP ↔ Hugging Face CLIP mappings: equal outputs on random tiny towers, both directions, both towers."""

import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from hf_tiny import randomize

import slug_lightning
from slug_lightning.errors import UserError
from slug_lightning.hf.convert import (
    check_config_fits,
    load_into_open_clip,
    to_hf_clip,
    to_hf_text,
    to_hf_vision,
    vision_config,
)
from slug_lightning.hf.mapping import Layout, Reach, from_hf, hf_names, to_hf
from slug_lightning.layers import LANGUAGE, VISION, candidate_layers

ATOL = 1e-5  # fp32, CPU: the largest difference seen is ~1e-6 on outputs of magnitude ~1
CONFIGS = Path(slug_lightning.__file__).parent.parent / "configs"


@pytest.fixture(scope="module", params=[False, True], ids=["gelu", "quickgelu"])
def clip(request):
    torch.manual_seed(0)
    model = open_clip.create_model("slug-tiny", force_quick_gelu=request.param).eval()
    return randomize(model)


@pytest.fixture(scope="module")
def tokens():
    tokenizer = open_clip.get_tokenizer("slug-tiny")
    return tokenizer(["a photo of a cat", "an oil painting of a lighthouse at dusk by the sea", ""])


def _blocks(model, x, blocks, count):
    """Run the first ``count`` OpenCLIP residual blocks (batch-first, as open_clip 3 does)."""
    for block in blocks[:count]:
        x = block(
            x,
            attn_mask=getattr(model, "attn_mask", None)[: x.shape[1], : x.shape[1]]
            if blocks is model.transformer.resblocks
            else None,
        )
    return x


@torch.no_grad()
def test_text_tower_gives_the_same_embeddings(clip, tokens):
    hf = to_hf_text(clip, projection=True)
    assert hf.config.hidden_act == (
        "quick_gelu" if isinstance(clip.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU) else "gelu"
    )
    expected = clip.encode_text(tokens)
    torch.testing.assert_close(hf(input_ids=tokens).text_embeds, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_truncated_text_encoder_is_ln_final_of_the_penultimate_block(clip, tokens):
    """SD 2.x: a text encoder of the first k blocks gives ln_final of the k-th block's output, per token."""
    hf = to_hf_text(clip, layers=1)
    x = clip.token_embedding(tokens) + clip.positional_embedding
    x = clip.ln_final(_blocks(clip, x, clip.transformer.resblocks, 1))
    torch.testing.assert_close(hf(input_ids=tokens).last_hidden_state, x, atol=ATOL, rtol=0)


@torch.no_grad()
def test_vision_tower_gives_the_same_embeddings_and_hidden_states(clip):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    hf = to_hf_vision(clip, projection=True)
    output = hf(pixel_values=images, output_hidden_states=True)
    torch.testing.assert_close(output.image_embeds, clip.encode_image(images), atol=ATOL, rtol=0)
    # LLaVA reads hidden_states[-2]: the output of all blocks but the last, no ln_post (open_clip: ln_pre first)
    visual = clip.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = _blocks(clip, visual.ln_pre(x), visual.transformer.resblocks, len(visual.transformer.resblocks) - 1)
    torch.testing.assert_close(output.hidden_states[-2], x, atol=ATOL, rtol=0)


@torch.no_grad()
def test_clip_model_gives_the_same_logits(clip, tokens):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    hf = to_hf_clip(clip)
    image_features, text_features, scale = clip(images, tokens)[:3]
    expected = scale * image_features @ text_features.T
    torch.testing.assert_close(hf(input_ids=tokens, pixel_values=images).logits_per_image, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_wrong_activation_changes_the_output(clip, tokens):
    """The activation is part of the mapping: the other one gives a different text tower."""
    hf = to_hf_text(clip, projection=True)
    hf.config.hidden_act = "gelu" if hf.config.hidden_act == "quick_gelu" else "quick_gelu"
    from transformers.activations import ACT2FN

    for layer in hf.text_model.encoder.layers:
        layer.mlp.activation_fn = ACT2FN[hf.config.hidden_act]
    difference = (hf(input_ids=tokens).text_embeds - clip.encode_text(tokens)).abs().max()
    assert difference > 100 * ATOL


def test_round_trip_is_exact_both_towers(clip):
    state = {k: v for k, v in clip.state_dict().items() if k != "attn_mask"}
    back = from_hf(to_hf(state))
    assert back.keys() == state.keys()
    for name in state:
        assert torch.equal(back[name], state[name]), name


@torch.no_grad()
def test_hugging_face_towers_load_into_open_clip_with_equal_outputs(tokens):
    """The other direction: a random transformers CLIPModel, loaded into an OpenCLIP model, gives its outputs."""
    from transformers import CLIPConfig, CLIPModel

    from slug_lightning.hf.convert import text_config

    torch.manual_seed(4)
    target = open_clip.create_model("slug-tiny").eval()
    config = CLIPConfig(
        text_config=text_config(target).to_dict(), vision_config=vision_config(target).to_dict(), projection_dim=64
    )
    hf = randomize(CLIPModel(config), seed=5).eval()
    state = hf.state_dict()
    assert sorted(load_into_open_clip(target, state, LANGUAGE)) == sorted(
        n for n, _ in target.named_parameters() if not n.startswith("visual.") and n != "logit_scale"
    )
    vision_parameters = [n for n, _ in target.named_parameters() if n.startswith("visual.")]
    assert sorted(load_into_open_clip(target, state, VISION)) == sorted(vision_parameters)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    # transformers 5 returns an output object (projected features in pooler_output), 4 a tensor
    text_features = hf.get_text_features(input_ids=tokens)
    image_features = hf.get_image_features(pixel_values=images)
    torch.testing.assert_close(
        target.encode_text(tokens), getattr(text_features, "pooler_output", text_features), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        target.encode_image(images), getattr(image_features, "pooler_output", image_features), atol=ATOL, rtol=0
    )


def test_fused_attention_rows_split_in_q_k_v_order():
    fused = torch.arange(12.0).reshape(6, 2)  # rows 0-1 q, 2-3 k, 4-5 v
    hf = to_hf({"transformer.resblocks.0.attn.in_proj_weight": fused})
    root = "text_model.encoder.layers.0.self_attn."
    assert torch.equal(hf[root + "q_proj.weight"], fused[:2])
    assert torch.equal(hf[root + "k_proj.weight"], fused[2:4])
    assert torch.equal(hf[root + "v_proj.weight"], fused[4:])
    assert torch.equal(to_hf({"visual.proj": fused})["visual_projection.weight"], fused.T)
    with pytest.raises(UserError, match="q_proj, k_proj and v_proj"):
        from_hf({root + "q_proj.weight": fused[:2]})


def test_parameters_without_a_counterpart_are_refused():
    with pytest.raises(UserError, match="no counterpart"):
        hf_names("visual.attn_pool.query")
    with pytest.raises(UserError, match="no counterpart"):
        hf_names("text.transformer.resblocks.0.ln_1.weight")


@pytest.mark.parametrize("prefix", ["text_model.", "", "cond.text_model."])
def test_text_layout_is_found_under_any_prefix(prefix):
    keys = [
        f"{prefix}embeddings.token_embedding.weight",
        f"{prefix}encoder.layers.0.mlp.fc1.weight",
        f"{prefix}final_layer_norm.weight",
        "unet.conv_in.weight",
    ]
    if prefix.endswith("text_model."):
        keys.append(prefix[: -len("text_model.")] + "text_projection.weight")
    layout = Layout.find(keys, LANGUAGE)
    assert layout.prefix == prefix
    assert layout.key("text_model.encoder.layers.0.mlp.fc1.weight") == f"{prefix}encoder.layers.0.mlp.fc1.weight"
    assert (layout.key("text_projection.weight") is None) == (not prefix.endswith("text_model."))
    assert sorted(layout.canonical(keys).values()) == sorted(
        [
            "text_model.embeddings.token_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight",
            "text_model.final_layer_norm.weight",
        ]
        + (["text_projection.weight"] if prefix.endswith("text_model.") else [])
    )


@pytest.mark.parametrize(
    "prefix", ["vision_tower.", "model.vision_tower.", "vision_tower.vision_model.", "model.vision_tower.vision_model."]
)
def test_llava_vision_layouts(prefix):
    keys = [
        f"{prefix}embeddings.patch_embedding.weight",
        f"{prefix}encoder.layers.3.self_attn.q_proj.weight",
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.3.self_attn.q_proj.weight",
    ]
    layout = Layout.find(keys, VISION)
    assert layout.prefix == prefix
    assert set(layout.canonical(keys)) == set(keys[:2])


def test_a_missing_or_doubled_tower_is_an_error():
    with pytest.raises(UserError, match="no CLIP vision tower"):
        Layout.find(["text_model.embeddings.token_embedding.weight"], VISION)
    with pytest.raises(UserError, match="2 "):
        Layout.find(["a.embeddings.patch_embedding.weight", "b.embeddings.patch_embedding.weight"], VISION)


def test_reach_of_sd2_and_llava():
    sd2 = Reach(LANGUAGE, layers=23, final_norm=True, projection=False)
    assert sd2.unreachable(
        [
            "transformer.resblocks.22.mlp.c_fc.weight",
            "transformer.resblocks.23.mlp.c_fc.weight",
            "ln_final.weight",
            "text_projection",
            "visual.proj",
            "token_embedding.weight",
        ]
    ) == ["transformer.resblocks.23.mlp.c_fc.weight", "text_projection", "visual.proj"]
    llava = Reach(VISION, layers=23, final_norm=False, projection=False)
    assert llava.unreachable(
        [
            "visual.transformer.resblocks.22.attn.in_proj_weight",
            "visual.ln_post.weight",
            "visual.proj",
            "visual.transformer.resblocks.23.ln_1.weight",
            "visual.conv1.weight",
            "visual.ln_pre.weight",
            "ln_final.weight",
        ]
    ) == ["visual.ln_post.weight", "visual.proj", "visual.transformer.resblocks.23.ln_1.weight", "ln_final.weight"]


@pytest.mark.parametrize(
    "config, model_name, reach",
    [
        ("sd/unlearn.yaml", "ViT-H-14", Reach(LANGUAGE, layers=23, final_norm=True, projection=False)),
        ("llava/unlearn.yaml", "ViT-L-14-336-quickgelu", Reach(VISION, layers=23, final_norm=False, projection=False)),
    ],
)
def test_config_excludes_exactly_what_the_real_pipeline_cannot_use(config, model_name, reach):
    """The real architectures' parameter names (built on the meta device: no weights, no memory)."""
    init_args = yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]
    assert init_args["model_name"] == model_name
    assert init_args["exclude"] == reach.exclude_patterns(24)
    with torch.device("meta"):
        model = open_clip.create_model(model_name, device="meta")
    names = [n for n, _ in model.named_parameters()]
    candidates = candidate_layers(model.named_parameters(), exclude=init_args["exclude"])
    assert candidates and not reach.unreachable(candidates)
    # and everything reachable that is a default candidate stays a candidate
    assert set(candidate_layers(model.named_parameters())) - set(reach.unreachable(names)) == set(candidates)


def test_quickgelu_mismatch_is_explained():
    torch.manual_seed(0)
    gelu = open_clip.create_model("slug-tiny")
    config = vision_config(open_clip.create_model("slug-tiny", force_quick_gelu=True))
    with pytest.raises(UserError, match="quickgelu"):
        check_config_fits(gelu, config, VISION)


def test_transformers_and_diffusers_are_imported_lazily():
    """No module of the package imports them at module level (open_clip and torchmetrics may import
    transformers themselves when it is installed; that is theirs, not ours)."""
    import ast

    package = Path(slug_lightning.__file__).parent
    offenders = []
    for path in [
        *package.rglob("*.py"),
        *(package.parent / "datamodules").rglob("*.py"),
        *(package.parent / "callbacks").rglob("*.py"),
    ]:
        for node in ast.parse(path.read_text()).body:  # module level only
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("transformers", "diffusers")]
    assert offenders == []
    code = "import sys, slug_lightning, slug_lightning.hf.export\nassert 'diffusers' not in sys.modules\n"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_missing_extra_is_named(monkeypatch):
    import importlib

    from slug_lightning.hf import require

    real = importlib.import_module

    def absent(name, *args):
        if name == "diffusers":
            raise ModuleNotFoundError("No module named 'diffusers'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", absent)
    with pytest.raises(UserError, match=r'pip install "slug-lightning\[diffusion\]"'):
        require("diffusers", "diffusion")
