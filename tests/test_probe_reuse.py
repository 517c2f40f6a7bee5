"""Probe reuse: towers run stage by stage equal the encoders, and probes that start at the edited stage give
the same accuracies as full evaluations (METHOD §6 probes; issue "fast search")."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from PIL import Image

from slug_lightning.callbacks import StepSearch
from slug_lightning.datamodules import LabelledSet, ZeroShotDataModule
from slug_lightning.evaluation import ZeroShotEvaluator
from slug_lightning.gradient_store import GradientStore
from slug_lightning.layers import candidate_layers
from slug_lightning.towers import check_stages, text_stages, tower_stages, vision_stages

PEOPLE = ["Ann Lee", "Bob Roy", "Cy Dunn", "Dee Fox", "Eve Ash", "Fay Orr", "Gus Kim", "Hal Poe"]


def _images(root, classes, per_class, seed, size=32):
    generator = torch.Generator().manual_seed(seed)
    for name in classes:
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    return [
        LabelledSet("people", root=_images(root / "people", PEOPLE, 4, seed=0), templates=["a photo of {}.", "{}."]),
        LabelledSet("things", root=_images(root / "things", ["cup", "hat", "kite"], 5, seed=1)),
    ]


def _evaluator(loaded, sets, **kwargs) -> ZeroShotEvaluator:
    datamodule = ZeroShotDataModule(sets, batch_size=7)  # batches that do not divide the sets
    datamodule.transform = loaded.preprocess
    return ZeroShotEvaluator(loaded.model, loaded.tokenizer, datamodule, **kwargs)


def _tiny_custom_text_clip() -> CustomTextCLIP:
    torch.manual_seed(0)
    return CustomTextCLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=2, proj_type="linear"),
    ).eval()


def _tiny_resnet_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=32),
        text_cfg=CLIPTextCfg(context_length=20, width=32, heads=2, layers=2),
    ).eval()  # slug-tiny's tokenizer


@pytest.mark.parametrize("name", ["slug-tiny", "ViT-B-32", "custom-text"])
def test_stages_reproduce_both_encoders(name):
    torch.manual_seed(0)
    if name == "custom-text":
        model, tokenizer = _tiny_custom_text_clip(), open_clip.get_tokenizer("ViT-B-32", context_length=16)
    else:
        model, tokenizer = open_clip.create_model(name).eval(), open_clip.get_tokenizer(name)
    stages = tower_stages(model)
    assert set(stages) == {"vision", "language"}
    size = model.visual.image_size[0]
    images = torch.randn(3, 3, size, size)
    tokens = tokenizer(["a cat.", "an old red kite", "x"])
    assert check_stages(model, stages["vision"], images)
    assert check_stages(model, stages["language"], tokens)
    # Running in two pieces through a cached middle is the same as running straight through.
    middle = stages["vision"].run(images, 0, 2)
    assert torch.allclose(stages["vision"].run(middle, 2), model.encode_image(images), atol=1e-5)


def test_stage_of_follows_the_forward_order(tiny_clip):
    vision, language = vision_stages(tiny_clip.model), text_stages(tiny_clip.model)
    blocks = len(tiny_clip.model.visual.transformer.resblocks)
    assert vision.num_stages == blocks + 3
    assert vision.stage_of("visual.conv1.weight") == 0
    assert vision.stage_of("visual.ln_pre.weight") == 0
    assert vision.stage_of("visual.transformer.resblocks.0.attn.in_proj_weight") == 1
    assert vision.stage_of(f"visual.transformer.resblocks.{blocks - 1}.mlp.c_proj.weight") == blocks
    assert vision.stage_of("visual.ln_post.weight") == blocks + 1
    assert vision.stage_of("visual.proj") == blocks + 2
    text_blocks = len(tiny_clip.model.transformer.resblocks)
    assert language.stage_of("transformer.resblocks.1.ln_2.weight") == 2
    assert language.stage_of("ln_final.weight") == text_blocks + 1
    assert language.stage_of("text_projection") == text_blocks + 2


def test_unknown_towers_are_not_staged():
    model = _tiny_resnet_clip()
    assert vision_stages(model) is None  # ModifiedResNet
    assert text_stages(model) is not None
    coca = open_clip.create_model("coca_ViT-B-32")
    assert text_stages(coca) is None  # a class token: attention mask depends on the batch


def _edit_every_layer(model, names, seed=0):
    """(name, original) pairs with each layer replaced by a strong random edit, one at a time."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(model.named_parameters())
    for name in names:
        parameter = parameters[name]
        original = parameter.detach().clone()
        direction = torch.randn(parameter.shape, generator=generator)
        with torch.no_grad():
            parameter.add_(0.5 * direction * original.norm() / direction.norm())
        try:
            yield name
        finally:
            with torch.no_grad():
                parameter.copy_(original)


@pytest.mark.parametrize("model_kind", ["slug-tiny", "resnet-vision"])
def test_probes_with_reuse_equal_full_evaluations(tiny_clip, sets, model_kind):
    if model_kind == "slug-tiny":
        loaded = tiny_clip
    else:
        loaded = dataclasses.replace(tiny_clip, model=_tiny_resnet_clip())
    reuse = _evaluator(loaded, sets)
    naive = _evaluator(loaded, sets, reuse=False)
    reference = reuse.run()
    assert all(torch.equal(reference[k], v) for k, v in naive.run().items())
    names = candidate_layers(loaded.model.named_parameters())
    # Each tower forward (the cache moves on), then back to an earlier stage (the cache is rebuilt).
    order = names + names[:2] + names[-2:]
    changed = 0
    for name in _edit_every_layer(loaded.model, order):
        probe, full = reuse.run(edited=name), naive.run(edited=name)
        assert probe.keys() == full.keys()
        for set_name in probe:
            assert torch.equal(probe[set_name], full[set_name]), (name, set_name)
        changed += any(not torch.equal(probe[k], reference[k]) for k in probe)
    # (Random batch-norm scales of the ResNet change little; most other edits flip predictions.)
    assert changed >= len(order) // 10, "the edits must change predictions for the comparison to mean anything"
    # Probes never replace the reference: with every weight restored, a probe gives the reference again.
    assert all(torch.equal(reuse.run(edited=names[3])[k], v) for k, v in reference.items())


def test_bfloat16_cache_agrees_with_float32(tiny_clip, sets):
    fp32 = _evaluator(tiny_clip, sets)
    bf16 = _evaluator(tiny_clip, sets, cache_dtype=torch.bfloat16)
    fp32.run(), bf16.run()
    names = [n for n in candidate_layers(tiny_clip.model.named_parameters()) if ".resblocks.1." in n]
    for name in _edit_every_layer(tiny_clip.model, names, seed=1):
        a, b = fp32.run(edited=name), bf16.run(edited=name)
        for set_name in a:
            images = a[set_name][:, 0].sum().item()
            top1_gap = abs(a[set_name][:, 1].sum().item() - b[set_name][:, 1].sum().item()) / images
            assert top1_gap <= 0.1, (name, set_name, top1_gap)
    assert bf16._caches and all(c.chunks[0].dtype == torch.bfloat16 for c in bf16._caches.values())


def test_a_new_reference_drops_stale_caches(tiny_clip, sets):
    """After the chosen edit of one concept is applied, probes for the next start from the edited model."""
    evaluator = _evaluator(tiny_clip, sets)
    evaluator.run()
    name = "visual.transformer.resblocks.2.mlp.c_fc.weight"
    evaluator.run(edited=name)
    assert evaluator._caches
    with torch.no_grad():
        earlier = dict(tiny_clip.model.named_parameters())["visual.transformer.resblocks.0.attn.in_proj_weight"]
        original = earlier.detach().clone()
        earlier.mul_(-1.0)
        try:
            evaluator.run()  # the new reference: θ¹ carries an edit before the cached stage
            probe = evaluator.run(edited=name)
            full = _evaluator(tiny_clip, sets, reuse=False).run(edited=name)
            assert all(torch.equal(probe[k], full[k]) for k in probe)
        finally:
            earlier.copy_(original)


def test_step_search_results_do_not_depend_on_reuse(tiny_clip, sets):
    model = tiny_clip.model
    names = candidate_layers(model.named_parameters())
    generator = torch.Generator().manual_seed(5)
    parameters = dict(model.named_parameters())
    forget = {n: torch.randn(parameters[n].shape, generator=generator) for n in names}
    retain = {n: torch.randn(parameters[n].shape, generator=generator) for n in names}
    # The concept: a person the random model places in its top 5 at least once (one it never does has nothing to
    # forget, and would not be searched).
    evaluator = _evaluator(tiny_clip, sets)
    target = next(name for name, row in zip(evaluator.class_names("people"), evaluator.run()["people"]) if row[2])
    store = GradientStore(forget={target: forget}, retain=retain, forget_samples={target: 1}, retain_samples=1)
    results = []
    for reuse in (True, False):
        search = StepSearch(sets=sets, metric="top5", max_steps=4, batch_size=7, apply=False, reuse=reuse)
        result = search.run(model, tiny_clip.tokenizer, tiny_clip.preprocess, store)
        results.append(
            (
                [dataclasses.replace(p, seconds=0.0) for p in result.probes],
                result.chosen[target].layer,
                result.after,
                result.test_classes,
            )
        )
    assert results[0][0] and results[0][0] == results[1][0]
    assert results[0][1:] == results[1][1:]
    # each set's test classes (the target not among them) add up to its test accuracy, before and after
    after, classes = results[0][2:]
    for name, rows in classes.items():
        assert target not in [row["name"] for row in rows] and rows
        for when, summary in (("before", result.before), ("after", after)):
            hits = sum(row["images"] * row[f"top1_{when}"] for row in rows)
            assert hits / sum(row["images"] for row in rows) == pytest.approx(summary["test"][name]["top1"])
    # Layers are searched tower by tower in forward order, so each tower's cache only moves forward.
    stages = tower_stages(model)
    visited = [
        (
            p.layer.startswith("visual."),
            stages["vision" if p.layer.startswith("visual.") else "language"].stage_of(p.layer),
        )
        for p in results[0][0]
    ]
    assert visited == sorted(visited, key=lambda v: (not v[0], v[1]))
