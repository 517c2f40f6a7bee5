"""Candidate layers, importance, alignment and the Pareto front (METHOD §3–§4)."""

from __future__ import annotations

import json
import math
import random
import re

import open_clip
import pytest
import torch

from slug_lightning.layers import (
    LANGUAGE,
    VISION,
    alignment,
    candidate_layers,
    importance,
    is_default_candidate,
    layer_statistics,
    pareto_front,
    pareto_ranks,
    short_name,
    tower_of,
)

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
BLOCK_WEIGHTS = (
    "ln_1.weight",
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "ln_2.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
VISION_CANDIDATES = [
    "visual.proj",
    "visual.conv1.weight",
    "visual.ln_pre.weight",
    *(f"visual.transformer.resblocks.{b}.{w}" for b in range(2) for w in BLOCK_WEIGHTS),
    "visual.ln_post.weight",
]
LANGUAGE_CANDIDATES = [
    "text_projection",
    *(f"transformer.resblocks.{b}.{w}" for b in range(2) for w in BLOCK_WEIGHTS),
    "ln_final.weight",
]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, torch.nn.Module]:
    """A tiny CLIP (towers in one module) and a tiny CustomTextCLIP (text tower under ``text.``)."""
    config_dir = tmp_path_factory.mktemp("model_configs")
    (config_dir / "test-layers-tiny.json").write_text(json.dumps(TINY))
    (config_dir / "test-layers-tiny-custom.json").write_text(json.dumps({**TINY, "custom_text": True}))
    open_clip.add_model_config(config_dir)
    return {
        "clip": open_clip.create_model("test-layers-tiny", pretrained=None),
        "custom": open_clip.create_model("test-layers-tiny-custom", pretrained=None),
    }


# --- towers and candidates ------------------------------------------------------------------------


def test_default_candidates_of_a_real_open_clip_model(tiny_models):
    model = tiny_models["clip"]
    names = [n for n, _ in model.named_parameters()]
    candidates = candidate_layers(model.named_parameters())
    assert set(candidates) == set(VISION_CANDIDATES + LANGUAGE_CANDIDATES)
    assert candidates == [n for n in names if n in set(candidates)]  # parameter order kept
    for rejected in (
        "logit_scale",
        "token_embedding.weight",
        "positional_embedding",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.transformer.resblocks.0.attn.in_proj_bias",
        "transformer.resblocks.1.mlp.c_fc.bias",
        "ln_final.bias",
    ):
        assert rejected in names and rejected not in candidates


def test_tower_split_of_a_real_open_clip_model(tiny_models):
    candidates = candidate_layers(tiny_models["clip"].named_parameters())
    vision = [n for n in candidates if tower_of(n) == VISION]
    assert vision == [n for n in candidates if n in VISION_CANDIDATES]
    assert sorted(n for n in candidates if tower_of(n) == LANGUAGE) == sorted(LANGUAGE_CANDIDATES)


def test_custom_text_tower_is_language(tiny_models):
    candidates = candidate_layers(tiny_models["custom"].named_parameters())
    language = [n for n in candidates if tower_of(n) == LANGUAGE]
    assert sorted(language) == sorted(f"text.{n}" for n in LANGUAGE_CANDIDATES)
    assert len(candidates) == len(VISION_CANDIDATES) + len(LANGUAGE_CANDIDATES)


@pytest.mark.parametrize("name", ["logit_scale", "logit_bias"])
def test_logit_parameters_belong_to_no_tower(name):
    with pytest.raises(ValueError, match=name):
        tower_of(name)
    assert not is_default_candidate(name, torch.ones(()))


def test_scalars_are_never_default_candidates():
    assert not is_default_candidate("visual.some_gain", torch.ones(()))
    assert is_default_candidate("visual.some_gain", torch.ones(1))


@pytest.mark.parametrize(
    "name",
    [
        "visual.trunk.pos_embed",
        "visual.trunk.cls_token",
        "visual.trunk.reg_token",
        "text.transformer.embeddings.word_embeddings.weight",
    ],
)
def test_timm_and_hf_embeddings_are_not_default_candidates(name):
    assert not is_default_candidate(name, torch.ones(4, 4))


def test_include_widens_and_exclude_narrows(tiny_models):
    params = list(tiny_models["clip"].named_parameters())
    default = candidate_layers(params)
    with_biases = candidate_layers(params, include=["*.bias", "*in_proj_bias"])
    biases = [n for n, _ in params if n.endswith("bias") and n != "logit_bias"]
    assert set(with_biases) == set(default) | set(biases)
    assert candidate_layers(params, exclude=["visual.*"]) == [n for n in default if n in LANGUAGE_CANDIDATES]
    only_out = candidate_layers(
        params, exclude=["visual.*", "text_projection", "ln_final.*", "transformer.resblocks.*.[lm]*", "*in_proj*"]
    )
    assert only_out == [f"transformer.resblocks.{b}.attn.out_proj.weight" for b in range(2)]


def test_exclude_wins_over_include(tiny_models):
    params = list(tiny_models["clip"].named_parameters())
    result = candidate_layers(params, include=["token_embedding.weight"], exclude=["token_*"])
    assert result == candidate_layers(params)
    assert "token_embedding.weight" in candidate_layers(params, include=["token_embedding.weight"])


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"include": ["visual.trunk.*"]}, "visual.trunk.*"),
        ({"exclude": ["*attn.qkv*"]}, "*attn.qkv*"),
        ({"include": ["logit_scale"]}, "logit_scale"),  # never a layer, even on request
    ],
)
def test_unknown_pattern_is_an_error_naming_it(tiny_models, kwargs, bad):
    with pytest.raises(ValueError, match=re.escape(f"pattern {bad!r}")):
        candidate_layers(tiny_models["clip"].named_parameters(), **kwargs)


def test_pattern_list_given_as_a_string_is_an_error(tiny_models):
    with pytest.raises(ValueError, match="list of patterns"):
        candidate_layers(tiny_models["clip"].named_parameters(), include="visual.*")


def test_excluding_everything_is_an_error(tiny_models):
    with pytest.raises(ValueError, match="No candidate layer"):
        candidate_layers(tiny_models["clip"].named_parameters(), exclude=["*"])


@pytest.mark.parametrize(
    "name, short",
    [
        ("visual.transformer.resblocks.11.attn.out_proj.weight", "v.11.attn.out"),
        ("visual.transformer.resblocks.11.attn.out_proj.bias", "v.11.attn.out.bias"),
        ("visual.transformer.resblocks.2.attn.in_proj_weight", "v.2.attn.in"),
        ("visual.transformer.resblocks.2.attn.in_proj_bias", "v.2.attn.in.bias"),
        ("transformer.resblocks.0.mlp.c_fc.weight", "t.0.mlp.fc"),
        ("transformer.resblocks.0.mlp.c_proj.weight", "t.0.mlp.proj"),
        ("text.transformer.resblocks.0.mlp.c_fc.weight", "t.0.mlp.fc"),
        ("visual.proj", "v.proj"),
        ("text_projection", "t.proj"),
        ("text.text_projection", "t.proj"),
        ("visual.conv1.weight", "v.conv1"),
        ("visual.transformer.resblocks.3.ln_1.weight", "v.3.ln_1"),
        ("visual.ln_post.weight", "v.ln_post"),
        ("ln_final.weight", "t.ln_final"),
    ],
)
def test_short_name(name, short):
    assert short_name(name) == short


def test_short_names_are_unique(tiny_models):
    names = [n for n, _ in tiny_models["clip"].named_parameters() if not n.startswith("logit_")]
    shorts = [short_name(n) for n in names]
    assert len(set(shorts)) == len(shorts)


# --- importance and alignment ---------------------------------------------------------------------


def test_importance_hand_computed():
    assert importance(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0])) == pytest.approx(1.0)
    assert importance(torch.tensor([[1.0, 2.0], [2.0, 4.0]]), torch.full((2, 2), 0.5)) == pytest.approx(5.0)


def test_importance_of_a_zero_weight():
    assert importance(torch.ones(3), torch.zeros(3)) == math.inf
    assert importance(torch.zeros(3), torch.zeros(3)) == 0.0


def test_importance_in_high_precision():
    # fp16 inputs: the norm is accumulated in fp64, so it does not overflow fp16's 65504.
    grad = torch.full((10_000,), 100.0, dtype=torch.float16)
    assert importance(grad, torch.ones(10_000, dtype=torch.float16)) == pytest.approx(100.0)


@pytest.mark.parametrize(
    "f, r, absolute, signed_value",
    [
        ([3.0, 4.0], [0.0, 5.0], 0.8, 0.8),
        ([1.0, 0.0], [0.0, 2.0], 0.0, 0.0),  # orthogonal
        ([1.0, 2.0], [-2.0, -4.0], 1.0, -1.0),  # opposite
        ([1.0, 2.0], [0.0, 0.0], 0.0, 0.0),  # zero gradient: no direction
    ],
)
def test_alignment_hand_computed(f, r, absolute, signed_value):
    f, r = torch.tensor(f), torch.tensor(r)
    assert alignment(f, r) == pytest.approx(absolute)
    assert alignment(f, r, signed=True) == pytest.approx(signed_value)


def test_alignment_treats_matrices_as_vectors():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert alignment(f, r) == pytest.approx(0.5)


def test_shape_mismatch_and_nan_are_errors():
    with pytest.raises(ValueError, match=r"\(2,\) and \(3,\)"):
        importance(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        alignment(torch.ones(2, 2), torch.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        importance(torch.tensor([1.0, float("nan")]), torch.ones(2))


# --- Pareto front ---------------------------------------------------------------------------------


def test_pareto_front_hand_computed_with_ties():
    points = [
        (4.0, 0.9),  # 0 most important: nothing can dominate it
        (3.0, 0.2),  # 1 only (4, .9) is more important, and it is worse aligned
        (3.0, 0.5),  # 2 (3, .2) is better aligned but only AS important: no domination
        (2.0, 0.2),  # 3 (3, .2) is more important but only AS aligned: no domination
        (1.0, 0.1),  # 4 lowest alignment among the important ones
        (1.5, 0.3),  # 5 dominated by (3, .2) and (2, .2)
        (0.5, 0.05),  # 6 lowest alignment of all
        (0.5, 0.5),  # 7 dominated by (1, .1) and others
        (2.0, 0.2),  # 8 duplicate of 3: duplicates never dominate each other
    ]
    assert pareto_front(points) == [0, 1, 2, 3, 4, 6, 8]


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 0.5)] * 3) == [0, 1, 2]
    assert pareto_front([(math.inf, 0.9), (5.0, 0.1), (4.0, 0.2)]) == [0, 1]
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(1.0, float("nan"))])


def test_pareto_front_matches_the_definition_on_random_points():
    rng = random.Random(0)
    # Coarse values so ties in both coordinates are common.
    points = [(rng.randint(0, 12) / 4, rng.randint(0, 12) / 4) for _ in range(300)]
    expected = [
        i for i, (imp, ali) in enumerate(points) if not any(imp_j > imp and ali_j < ali for imp_j, ali_j in points)
    ]
    assert pareto_front(points) == expected


def test_pareto_ranks_hand_computed():
    # (3, .5) and (1, .1) are front 1; (2, .6) is dominated by (3, .5) only, so front 2; (0.5, .7) by (2, .6)
    # too, so front 3; (3, .9): only (3, .5) is as important and none more, and a tie never dominates: front 1.
    points = [(3.0, 0.5), (2.0, 0.6), (1.0, 0.1), (0.5, 0.7), (3.0, 0.9)]
    assert pareto_ranks(points) == [1, 2, 1, 3, 1]
    assert pareto_ranks([]) == []
    assert pareto_ranks([(1.0, 1.0)] * 3) == [1, 1, 1]


def test_pareto_ranks_match_the_definition_on_random_points():
    rng = random.Random(1)
    points = [(rng.randint(0, 8) / 4, rng.randint(0, 8) / 4) for _ in range(120)]
    ranks = pareto_ranks(points)
    assert [i for i, r in enumerate(ranks) if r == 1] == pareto_front(points)
    for i, (imp, ali) in enumerate(points):
        dominators = [ranks[j] for j, (imp_j, ali_j) in enumerate(points) if imp_j > imp and ali_j < ali]
        # Front r: every dominator sits on an earlier front, and one of them on front r − 1.
        assert ranks[i] == 1 + max(dominators, default=0)


def test_layer_statistics_per_tower_front():
    weights = {
        "visual.a.weight": torch.tensor([1.0, 0.0]),
        "visual.b.weight": torch.tensor([1.0, 0.0]),
        "transformer.c.weight": torch.tensor([1.0, 0.0]),
        "ln_final.weight": torch.tensor([1.0, 0.0]),
        "token_embedding.weight": torch.ones(3),  # not a candidate: ignored because absent from the grads
    }
    forget = {
        "visual.a.weight": torch.tensor([10.0, 0.0]),  # importance 10, alignment 0 → dominates everything
        "visual.b.weight": torch.tensor([2.0, 0.0]),  # importance 2, alignment 1 → dominated by a
        "transformer.c.weight": torch.tensor([3.0, 0.0]),  # importance 3, alignment 1
        "ln_final.weight": torch.tensor([0.0, 1.0]),  # importance 1, |cos| 0.6, cos -0.6
    }
    retain = {
        "visual.a.weight": torch.tensor([0.0, 1.0]),
        "visual.b.weight": torch.tensor([5.0, 0.0]),
        "transformer.c.weight": torch.tensor([-1.0, 0.0]),
        "ln_final.weight": torch.tensor([0.8, -0.6]),
    }
    stats = layer_statistics(weights, forget, retain)
    assert [s.name for s in stats] == list(forget)
    assert [s.tower for s in stats] == [VISION, VISION, LANGUAGE, LANGUAGE]
    assert [s.importance for s in stats] == pytest.approx([10.0, 2.0, 3.0, 1.0])
    assert [s.alignment for s in stats] == pytest.approx([0.0, 1.0, 1.0, 0.6])
    assert [s.grad_norm for s in stats] == pytest.approx([10.0, 2.0, 3.0, 1.0])
    assert [s.weight_norm for s in stats] == pytest.approx([1.0] * 4)
    # visual.a would dominate both language layers if the towers were pooled; per tower they stay.
    assert [s.pareto for s in stats] == [True, False, True, True]
    assert [s.front for s in stats] == [1, 2, 1, 1]

    signed = layer_statistics(weights, forget, retain, signed=True)
    assert [s.alignment for s in signed] == pytest.approx([0.0, 1.0, -1.0, -0.6])
    # Signed: transformer.c (3, -1) now dominates ln_final (1, -0.6).
    assert [s.pareto for s in signed] == [True, False, True, False]
    assert [s.front for s in signed] == [1, 2, 1, 2]


def test_layer_statistics_missing_inputs_are_errors():
    grads = {"visual.proj": torch.ones(2)}
    with pytest.raises(ValueError, match="retain_grads lacks.*visual.proj"):
        layer_statistics({"visual.proj": torch.ones(2)}, grads, {})
    with pytest.raises(ValueError, match="weights lacks"):
        layer_statistics({}, grads, grads)
    with pytest.raises(ValueError, match="empty"):
        layer_statistics({}, {}, {})
