"""Zero-shot classifiers, per-class hit counts, accuracies, summaries and the probe-reusing evaluator."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_accuracy

from slug_lightning.datamodules.labelled import ZeroShotDataModule
from slug_lightning.evaluation import ZeroShotEvaluator, class_changes, summarize
from slug_lightning.labelled_sets import LabelledSet
from slug_lightning.zero_shot import ZeroShotCounts, accuracy, hits, zero_shot_classifier

CLASSES = ["cat", "dog", "red car", "Elon Musk", "tree", "a banana", "house"]
TEMPLATES = ["a photo of {}.", "a blurry picture of {}", "{}"]


def _counts(logits: torch.Tensor, labels: torch.Tensor, batch: int = 16) -> torch.Tensor:
    metric = ZeroShotCounts(num_classes=logits.shape[1])
    for start in range(0, len(labels), batch):
        metric.update(logits[start : start + batch], labels[start : start + batch])
    return metric.compute()


def _reference(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro", top_k=k).item()


@pytest.mark.parametrize("templates", [TEMPLATES[:1], TEMPLATES])
@pytest.mark.parametrize("classes_per_batch", [1, 3, 64])
def test_classifier_matches_open_clip(tiny_clip, templates, classes_per_batch):
    model, tokenizer = tiny_clip.model, tiny_clip.tokenizer
    ours = zero_shot_classifier(model, tokenizer, CLASSES, templates, classes_per_batch=classes_per_batch)
    theirs = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSES, templates, num_classes_per_batch=2)
    assert ours.shape == (64, len(CLASSES))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=0), torch.ones(len(CLASSES)))
    # The classes are told apart: no two columns alike.
    similarity = ours.T @ ours - torch.eye(len(CLASSES))
    assert similarity.max() < 0.999


@pytest.mark.parametrize("num_classes", [7, 30])
def test_counts_agree_with_torchmetrics(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(101, num_classes, generator=generator)
    labels = torch.randint(0, num_classes, (101,), generator=generator)
    counts = _counts(logits, labels)
    assert counts.shape == (num_classes, 3)
    assert counts[:, 0].tolist() == torch.bincount(labels, minlength=num_classes).tolist()
    result = accuracy(counts)
    assert result["count"] == 101
    assert result["top1"] == pytest.approx(_reference(logits, labels, 1), abs=1e-6)
    assert result["top5"] == pytest.approx(_reference(logits, labels, 5), abs=1e-6)
    assert result["top1"] < result["top5"] < 1.0


def test_top5_is_capped_at_the_number_of_classes():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.0, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 1, 2])
    top1, top5 = hits(logits, labels)
    assert top1.tolist() == [False, False, True]
    assert top5.all()
    result = accuracy(_counts(logits, labels))
    assert result == {"top1": pytest.approx(1 / 3), "top5": 1.0, "count": 3}
    assert result["top1"] == pytest.approx(_reference(logits, labels, 1))
    assert result["top5"] == pytest.approx(_reference(logits, labels, 3))


def test_accuracy_on_a_subset_of_rows():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(80, 10, generator=generator)
    labels = torch.randint(0, 10, (80,), generator=generator)
    rows = [1, 4, 7]
    chosen = torch.isin(labels, torch.tensor(rows))
    result = accuracy(_counts(logits, labels), rows)
    assert result["count"] == int(chosen.sum())
    assert result["top1"] == pytest.approx(_reference(logits[chosen], labels[chosen], 1))
    assert result["top5"] == pytest.approx(_reference(logits[chosen], labels[chosen], 5))


def test_accuracy_without_images_is_nan():
    empty = accuracy(torch.zeros(4, 3, dtype=torch.long))
    assert math.isnan(empty["top1"]) and math.isnan(empty["top5"]) and empty["count"] == 0
    counts = torch.tensor([[2, 1, 2], [0, 0, 0], [3, 3, 3]])
    assert math.isnan(accuracy(counts, [1])["top1"])
    assert accuracy(counts, [0, 2]) == {"top1": 4 / 5, "top5": 1.0, "count": 5}


def test_counts_validate_num_classes():
    with pytest.raises(ValueError, match="num_classes must be at least 1, got 0"):
        ZeroShotCounts(0)


def test_summarize_excludes_every_forget_concept_from_test():
    counts = {
        # images, top-1 hits, top-5 hits per class
        "identities": torch.tensor([[10, 9, 10], [4, 1, 3], [6, 0, 2], [20, 10, 15]]),
        "objects": torch.tensor([[5, 5, 5], [8, 2, 4], [7, 7, 7]]),
    }
    class_names = {"identities": ["Ann", "Bob", "Cy", "Dee"], "objects": ["cup", "hat", "pen"]}
    result = summarize(counts, class_names, {"Bob": "identities", "Cy": "identities", "hat": "objects"})
    assert result["forget"] == {
        "Bob": {"top1": 1 / 4, "top5": 3 / 4, "count": 4},
        "Cy": {"top1": 0 / 6, "top5": 2 / 6, "count": 6},
        "hat": {"top1": 2 / 8, "top5": 4 / 8, "count": 8},
    }
    assert result["test"] == {
        "identities": {"top1": 19 / 30, "top5": 25 / 30, "count": 30},  # Ann and Dee
        "objects": {"top1": 12 / 12, "top5": 12 / 12, "count": 12},  # cup and pen
    }


def test_class_changes_list_every_test_class_the_largest_fall_first():
    class_names = {"identities": ["Ann", "Bob", "Cy", "Dee", "Eve"], "objects": ["cup", "hat"]}
    before = {
        "identities": torch.tensor([[10, 9, 10], [4, 4, 4], [6, 6, 6], [20, 10, 15], [0, 0, 0]]),
        "objects": torch.tensor([[5, 5, 5], [8, 8, 8]]),
    }
    after = {
        "identities": torch.tensor([[10, 3, 10], [4, 0, 1], [6, 6, 6], [20, 12, 15], [0, 0, 0]]),
        "objects": torch.tensor([[5, 5, 5], [8, 4, 8]]),
    }
    changes = class_changes(before, after, class_names, {"Bob": "identities"})
    # Bob is forgotten, not tested; Eve has no images; Ann fell 60 points, Cy none, Dee rose 10
    assert changes["identities"] == [
        {"name": "Ann", "images": 10, "top1_before": 0.9, "top1_after": 0.3},
        {"name": "Cy", "images": 6, "top1_before": 1.0, "top1_after": 1.0},
        {"name": "Dee", "images": 20, "top1_before": 0.5, "top1_after": 0.6},
    ]
    assert [row["name"] for row in changes["objects"]] == ["hat", "cup"]
    # the classes add up to summarize's test accuracy
    test = summarize(after, class_names, {"Bob": "identities"})["test"]["identities"]
    rows = changes["identities"]
    assert sum(r["images"] * r["top1_after"] for r in rows) / sum(r["images"] for r in rows) == pytest.approx(
        test["top1"]
    )


def test_summarize_without_forget_concepts_covers_all_rows():
    counts = {"objects": torch.tensor([[5, 5, 5], [8, 2, 4]])}
    result = summarize(counts, {"objects": ["cup", "hat"]}, {})
    assert result == {"forget": {}, "test": {"objects": {"top1": 7 / 13, "top5": 9 / 13, "count": 13}}}


# ---------------------------------------------------------------------------------------------------------
# ZeroShotEvaluator


def _image_folder(root, classes: list[str], per_class: int, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    for name in classes:
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def evaluation_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    people = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay"]
    return [
        LabelledSet("objects", root=_image_folder(root / "objects", CLASSES, 3, seed=0), templates=TEMPLATES[:2]),
        LabelledSet("people", root=_image_folder(root / "people", people, 2, seed=1)),
    ]


def _evaluator(clip, sets) -> ZeroShotEvaluator:
    datamodule = ZeroShotDataModule(sets, batch_size=8)
    datamodule.transform = clip.preprocess
    return ZeroShotEvaluator(clip.model, clip.tokenizer, datamodule)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_evaluator_counts_every_image(tiny_clip, evaluation_sets):
    counts = _evaluator(tiny_clip, evaluation_sets).run()
    assert list(counts) == ["objects", "people"]
    assert counts["objects"][:, 0].tolist() == [3] * len(CLASSES)
    assert counts["people"][:, 0].tolist() == [2] * 6


def test_evaluator_probes_reuse_the_untouched_tower(tiny_clip, evaluation_sets):
    model = tiny_clip.model
    evaluator = _evaluator(tiny_clip, evaluation_sets)
    first = evaluator.run()
    original = model.visual.proj.detach().clone()
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(7)
            model.visual.proj.copy_(torch.randn(original.shape, generator=generator))
        probe = evaluator.run("visual.proj")
        full = _evaluator(tiny_clip, evaluation_sets).run()
        assert not _equal(full, first), "the edit must change the predictions for this test to mean anything"
        assert _equal(probe, full)
    finally:
        with torch.no_grad():
            model.visual.proj.copy_(original)
    # The probe did not replace the reference image features: with the weight restored, a language probe
    # (which reuses them) gives the first result again.
    assert _equal(evaluator.run("text_projection"), first)
    assert _equal(evaluator.run("visual.proj"), first)


def test_language_probe_recomputes_classifiers_and_vision_probe_reuses_them(tiny_clip, evaluation_sets):
    model = tiny_clip.model
    evaluator = _evaluator(tiny_clip, evaluation_sets)
    first = evaluator.run()
    original = model.text_projection.detach().clone()
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(3)
            model.text_projection.copy_(torch.randn(original.shape, generator=generator))
        full = _evaluator(tiny_clip, evaluation_sets).run()
        assert not _equal(full, first)
        assert _equal(evaluator.run("text_projection"), full)
        # A vision probe trusts the reference classifiers, so this language edit goes unseen.
        assert _equal(evaluator.run("visual.proj"), first)
    finally:
        with torch.no_grad():
            model.text_projection.copy_(original)
    assert _equal(evaluator.run(), first)


def test_evaluator_restores_training_mode(tiny_clip, evaluation_sets):
    evaluator = _evaluator(tiny_clip, evaluation_sets)
    tiny_clip.model.train()
    try:
        evaluator.run()
        assert tiny_clip.model.training
    finally:
        tiny_clip.model.eval()
