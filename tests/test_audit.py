"""The audit's measurement core (issue 25, "does it stay forgotten?"): held-out prompts, other names, search by
name, the linear probe on image features, the similarity shift and the verdict line."""

from __future__ import annotations

import copy
import dataclasses
import math
import string

import pytest
import torch
import yaml
from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from slug_lightning.audit import (
    audit_evaluator,
    ensemble_templates,
    held_out_templates,
    image_probe,
    linear_probe_accuracy,
    measure_concept,
    name_accuracy,
    recoveries,
    retrieval_scores,
    search_by_name,
    similarity_shift,
    stratified_folds,
    template_accuracy,
    template_key,
    unseen_prompt_accuracy,
    verdict,
)
from slug_lightning.concepts import Concept
from slug_lightning.datamodules.labelled import ZeroShotDataModule
from slug_lightning.demo.vocabulary import OBJECT_TEMPLATES, PERSON_OBJECT_TEMPLATES, PERSON_TEMPLATES
from slug_lightning.evaluation import ZeroShotEvaluator, summarize
from slug_lightning.labelled_sets import LabelledSet, validate_template
from slug_lightning.zero_shot import zero_shot_classifier

PEOPLE = ["Ann Lee", "Bob Roy", "Cy Dunn", "Dee Fox", "Eve Ash", "Fay Orr"]
THINGS = ["cup", "hat", "kite", "lamp"]
SEARCH_TEMPLATE = "a photo of {}."
CONCEPT = "Ann Lee"

# --- the shipped templates ------------------------------------------------------------------------------------


def test_held_out_templates_are_unseen_everyday_wordings():
    templates = held_out_templates()
    assert 12 <= len(templates) <= 20
    for template in templates:
        validate_template(template)
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        assert fields == [""] and template.count("{}") == 1, template
    keys = [template_key(t) for t in templates]
    assert len(set(keys)) == len(keys), "two templates are one wording"
    # Neither the search's default template, nor the captions the demo's unlearning sees, nor the paper config's
    # ImageNet templates.
    seen = [SEARCH_TEMPLATE, *PERSON_TEMPLATES, *PERSON_OBJECT_TEMPLATES, *OBJECT_TEMPLATES]
    seen += [make("{}") for make in SIMPLE_IMAGENET_TEMPLATES]
    assert not set(keys) & {template_key(t) for t in seen}
    assert all("photo of" not in key for key in keys)
    # A run's own templates are left out of the audit's.
    assert held_out_templates(seen=[templates[1].upper(), "a photo of {}"]) == [templates[0], *templates[2:]]
    with pytest.raises(ValueError, match="already seen"):
        held_out_templates(seen=templates)


def test_template_key_reads_demo_fields_as_one_field():
    assert template_key("A photo of {name}.") == template_key("a photo of {}") == "a photo of {}"
    assert template_key("{name} {scene}") == "{} {}"
    assert template_key("look, it is {}!") == "look, it is {}"


# --- pure measures on hand-made tensors -----------------------------------------------------------------------


def test_retrieval_scores_by_hand():
    # cosines with the query [1, 0]: 0.8, 1.0, -1.0, 0.6, 0.0, 0.28 -> ranks 2, 1, 6, 3, 5, 4
    features = torch.tensor([[0.8, 0.6], [1.0, 0.0], [-1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.28, 0.96]])
    relevant = torch.tensor([True, False, True, True, False, False])  # ranks 2, 6, 3
    scores = retrieval_scores(torch.tensor([1.0, 0.0]), features, relevant, ks=(1, 2, 5, 10))
    assert scores == {
        "recall@1": 0.0,
        "precision@1": 0.0,
        "recall@2": 1.0,
        "precision@2": 0.5,
        "recall@5": 1.0,
        "precision@5": 2 / 5,
        "recall@10": 1.0,  # k past the number of images: all six are the results
        "precision@10": 3 / 6,
        "r_precision": 2 / 3,  # ranks 1-3 hold two of the three
        "mean_rank": pytest.approx((2 + 6 + 3) / 3),
        "chance": 0.5,
        "n_images": 6,
        "n_relevant": 3,
    }


def test_retrieval_ties_keep_image_order_and_need_a_relevant_image():
    same = torch.ones(4, 2)
    scores = retrieval_scores(torch.tensor([1.0, 0.0]), same, torch.tensor([False, False, True, True]), ks=(2,))
    assert scores["recall@2"] == 0.0 and scores["mean_rank"] == 3.5
    with pytest.raises(ValueError, match="nothing to find"):
        retrieval_scores(torch.tensor([1.0, 0.0]), same, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        retrieval_scores(torch.tensor([1.0, 0.0, 0.0]), same, torch.ones(4, dtype=torch.bool))


def test_stratified_folds_deal_every_class_across_the_folds():
    labels = torch.tensor([2] * 10 + [0] * 5 + [7] * 5)
    fold = stratified_folds(labels, 5, seed=3)
    for label in (0, 2, 7):
        counts = torch.bincount(fold[labels == label], minlength=5).tolist()
        assert counts == ([2] * 5 if label == 2 else [1] * 5)
    assert torch.equal(fold, stratified_folds(labels, 5, seed=3))
    assert not torch.equal(fold, stratified_folds(labels, 5, seed=4))


def test_linear_probe_on_separable_and_on_identical_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 5)
    separable = centres[labels] + 0.1 * torch.randn(20, 3, generator=generator)
    result = linear_probe_accuracy(separable, labels)
    assert result.pop("log_loss") < 0.1
    assert result == {"accuracy": 1.0, "count": 20, "folds": 5, "per_class": {0: 1.0, 1: 1.0, 2: 1.0}}
    # Identical features carry no class: each fold's probe can only guess its training folds' majority, class 0
    # (8 of 16), right on the 2 of 4 held-out images of class 0 in every fold: 10 of 20. Its probabilities are the
    # training priors 1/2, 1/4, 1/4, so the held-out log loss is (2 ln 2 + 2 ln 4) / 4 = 1.5 ln 2.
    identical = torch.ones(20, 3)
    result = linear_probe_accuracy(identical, labels)
    assert result.pop("log_loss") == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert result == {"accuracy": 0.5, "count": 20, "folds": 5, "per_class": {0: 1.0, 1: 0.0, 2: 0.0}}
    # Deterministic: the same features give the same answer; labels may be any integers.
    noisy = torch.randn(20, 3, generator=generator)
    assert linear_probe_accuracy(noisy, labels) == linear_probe_accuracy(noisy.clone(), labels)
    assert linear_probe_accuracy(separable, labels + 5)["per_class"] == {5: 1.0, 6: 1.0, 7: 1.0}
    with pytest.raises(ValueError, match="two classes"):
        linear_probe_accuracy(separable, torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="folds"):
        linear_probe_accuracy(separable, labels, folds=21)


def test_similarity_shift_by_hand():
    names = ["Ann", "Bob", "Cy", "Dee"]
    before = torch.tensor([[0.9, 0.6, 0.4, 0.2], [0.5, 0.8, 0.3, 0.1], [0.4, 0.2, 0.7, 0.0], [0.1, 0.1, 0.1, 0.9]])
    after = before.clone()
    after[0] = torch.tensor([0.1, 0.3, 0.2, 0.4])
    shift = similarity_shift(before, after, names, ["Ann", "Dee"], lookalikes={"Ann": ["Bob", "Cy"], "Dee": []})
    ann = shift["Ann"]
    assert (ann["own_before"], ann["own_after"]) == (pytest.approx(0.9), pytest.approx(0.1))
    assert ann["lookalikes_before"] == pytest.approx(0.5) and ann["lookalikes_after"] == pytest.approx(0.25)
    assert ann["lookalikes"] == ["Bob", "Cy"]
    assert shift["Dee"]["own_before"] == shift["Dee"]["own_after"] == pytest.approx(0.9)
    assert math.isnan(shift["Dee"]["lookalikes_before"])
    # By default the look-alikes are every name that is not a concept.
    default = similarity_shift(before, after, names, ["Ann", "Dee"])
    assert default["Ann"]["lookalikes"] == ["Bob", "Cy"] and default["Dee"]["lookalikes_before"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="matrices"):
        similarity_shift(before, after[:3, :3], names, ["Ann"])


def _scores(r_precision: float, chance: float) -> dict:
    return {"r_precision": r_precision, "chance": chance, "n_relevant": 6, "n_images": 36}


def test_verdict_names_each_probe_that_brings_the_concept_back():
    gone = {
        "held_out": {"top1": 0.0, "top5": 0.4, "count": 20},
        "names": {"Musk": {"top1": 0.0, "top5": 0.1, "count": 20}},
        "retrieval": {"Elon Musk": _scores(0.2, 0.17)},
        "image_probe": {"concept_accuracy": 0.2, "chance": 0.17, "count": 36, "classes": ["a", "b", "c"]},
    }
    assert recoveries(gone) == []
    assert (
        verdict(gone) == "gone under every probe tried (held-out templates, 1 other name, search by name, image probe)"
    )
    back = copy.deepcopy(gone)
    back["names"]["the CEO of Tesla"] = {"top1": 0.25, "top5": 0.5, "count": 20}
    back["retrieval"]["Elon Musk"] = _scores(0.5, 1 / 6)
    back["image_probe"]["concept_accuracy"] = 0.9
    assert verdict(back) == (
        "recognised as 'the CEO of Tesla': forget top-1 0.25 (n=20); "
        "found by searching 'Elon Musk': R-precision 0.50 vs chance 0.17 (6 of 36 images); "
        "told apart from 2 look-alikes by a linear probe on image features: recall 0.90 vs chance 0.17 (n=36)"
    )
    # The tolerance and the margin move the lines; top-5 is the search's default metric.
    assert verdict(back, tolerance=0.3, margin=0.8).startswith("gone under every probe tried")
    assert recoveries(gone, metric="top5")[0] == "recognised under held-out templates: forget top-5 0.40 (n=20)"
    # A probe without images (NaN) brings nothing back; no probe at all is said so.
    assert recoveries({"held_out": {"top1": math.nan, "top5": math.nan, "count": 0}}) == []
    assert verdict({}) == "no probe tried"


# --- on a model -----------------------------------------------------------------------------------------------


def _image_folder(root, classes, per_class, seed):
    """Each class's images are noise around a colour of its own, so the classes look different."""
    generator = torch.Generator().manual_seed(seed)
    for name in classes:
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True)
        colour = torch.randint(0, 256, (3,), generator=generator)
        for i in range(per_class):
            noise = torch.randint(-40, 41, (32, 32, 3), generator=generator)
            pixels = (colour + noise).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    return [
        LabelledSet("people", root=_image_folder(root / "people", PEOPLE, 6, seed=0), templates=[SEARCH_TEMPLATE]),
        LabelledSet("things", root=_image_folder(root / "things", THINGS, 3, seed=1), templates=[SEARCH_TEMPLATE]),
    ]


@pytest.fixture(scope="module")
def knowing(tiny_clip, sets):
    """A copy of the tiny CLIP that knows the classes: its last image layer (``visual.proj``) fitted by least
    squares so that every image lands on its class's ``"a photo of {}."`` text embedding, as if it had been trained
    on those captions."""
    clip = dataclasses.replace(tiny_clip, model=copy.deepcopy(tiny_clip.model))
    model = clip.model
    datamodule = ZeroShotDataModule(sets, batch_size=64)
    datamodule.transform = clip.preprocess
    pooled, targets = [], []
    with torch.no_grad():
        projection, model.visual.proj = model.visual.proj, None
        for spec in sets:
            classifier = zero_shot_classifier(
                model, clip.tokenizer, datamodule.datasets()[spec.name].class_names, [SEARCH_TEMPLATE]
            )
            for images, labels in datamodule.loader(spec.name):
                pooled.append(model.encode_image(images))
                targets.append(classifier.T[labels])
        model.visual.proj = projection
        projection.copy_(torch.linalg.lstsq(torch.cat(pooled), 10 * torch.cat(targets)).solution)
    return clip


def _evaluator(clip, sets, concepts=(CONCEPT,)):
    return audit_evaluator(clip.model, clip.tokenizer, clip.preprocess, sets, keep_classes=concepts, batch_size=16)


def test_accuracies_are_the_searchs_and_held_out_templates_a_fresh_evaluation(knowing, sets):
    forget = {CONCEPT: "people", "kite": "things"}
    evaluator = _evaluator(knowing, sets, tuple(forget))
    # Under the sets' own templates the audit reads exactly what the search's evaluator reads.
    datamodule = ZeroShotDataModule(sets, batch_size=16, keep_classes=tuple(forget))
    datamodule.transform = knowing.preprocess
    plain = ZeroShotEvaluator(knowing.model, knowing.tokenizer, datamodule, keep_classes=tuple(forget))
    counts = plain.run()
    search = summarize(counts, {name: plain.class_names(name) for name in counts}, forget)
    assert template_accuracy(evaluator, forget) == search
    assert search["forget"][CONCEPT] == {"top1": 1.0, "top5": 1.0, "count": 6}  # the model knows Ann Lee
    # Held-out templates on the same image features equal a fresh evaluation of sets with those templates.
    held_out = template_accuracy(evaluator, forget, held_out_templates())
    assert held_out == unseen_prompt_accuracy(knowing.model, knowing.tokenizer, knowing.preprocess, sets, forget)
    assert held_out["forget"]["kite"]["count"] == 3 and held_out["test"]["people"]["count"] == 30
    assert held_out["test"]["things"]["count"] == 9


def test_other_names_replace_the_class_name_in_the_classifier(knowing, sets):
    evaluator = _evaluator(knowing, sets)
    search = template_accuracy(evaluator, {CONCEPT: "people"})["forget"][CONCEPT]
    names = name_accuracy(evaluator, "people", CONCEPT, [CONCEPT, "Ann", "the woman from the ad"])
    assert list(names) == [CONCEPT, "Ann", "the woman from the ad"]
    assert names[CONCEPT] == search  # its own name changes nothing
    assert all(result["count"] == 6 for result in names.values())
    with pytest.raises(ValueError, match="other classes"):
        name_accuracy(evaluator, "people", CONCEPT, ["Bob Roy"])


def test_search_by_name_finds_the_concepts_images(knowing, sets):
    evaluator = _evaluator(knowing, sets)
    found = search_by_name(evaluator, "people", CONCEPT, [CONCEPT, "Bob Roy"])
    assert found[CONCEPT]["n_images"] == 36 and found[CONCEPT]["n_relevant"] == 6
    assert found[CONCEPT]["chance"] == pytest.approx(1 / 6)
    assert found[CONCEPT]["recall@1"] == 1.0 and found[CONCEPT]["r_precision"] == 1.0
    assert found[CONCEPT]["mean_rank"] == pytest.approx(3.5)  # ranks 1..6
    assert found["Bob Roy"]["r_precision"] == 0.0  # another person's name finds his images, not hers


def test_a_search_template_trick_fails_the_held_out_check(knowing, sets):
    """The leak case. A fake "unlearning" leaves the model alone and only rewords the search's template until the
    concept's forget accuracy is 0; the audit's held-out templates, never tried by the search, still recognise it,
    exactly as they recognise it in the untouched model."""
    base = _evaluator(knowing, sets)
    assert template_accuracy(base, {CONCEPT: "people"})["forget"][CONCEPT]["top1"] == 1.0

    def with_wording(wording):
        return [dataclasses.replace(spec, templates=[wording]) if spec.name == "people" else spec for spec in sets]

    wordings = ["{} photo", "photo {} of a.", "a photo {}", "{}, photo, a of"]
    fakes = (_evaluator(knowing, with_wording(wording)) for wording in wordings)
    fake = next(e for e in fakes if template_accuracy(e, {CONCEPT: "people"})["forget"][CONCEPT]["top1"] == 0.0)
    assert fake.model is base.model  # nothing was unlearned: the search is merely asked differently

    measures = measure_concept(fake, "people", Concept(CONCEPT, aliases=("Ann",)))
    assert measures["held_out"] == measure_concept(base, "people", CONCEPT)["held_out"]
    assert measures["held_out"]["top1"] > 0.0
    line = verdict(measures)
    assert line.startswith(
        f"recognised under held-out templates: forget top-1 {measures['held_out']['top1']:.2f} (n=6)"
    )
    assert "gone" not in line


def _plain_evaluator(clip, sets, per_template=False, reuse=True):
    datamodule = ZeroShotDataModule(sets, batch_size=16, keep_classes=(CONCEPT,))
    datamodule.transform = clip.preprocess
    return ZeroShotEvaluator(
        clip.model, clip.tokenizer, datamodule, keep_classes=(CONCEPT,), reuse=reuse, per_template=per_template
    )


def test_per_template_counts_are_each_templates_own_evaluation(knowing, sets):
    """A template ensemble's count tables, one per template, each equal an evaluation of the sets with that template
    alone; the summary keeps each concept's worst template and the templates' mean test accuracy."""
    templates = ["{} photo", SEARCH_TEMPLATE, "a picture of {}"]
    ensemble = [dataclasses.replace(spec, templates=templates) for spec in sets]
    counts = _plain_evaluator(knowing, ensemble, per_template=True).run()
    alone = [_plain_evaluator(knowing, [dataclasses.replace(s, templates=[t]) for s in sets]).run() for t in templates]
    for name in counts:
        assert counts[name].shape == (3, *alone[0][name].shape)
        assert all(torch.equal(counts[name][t], alone[t][name]) for t in range(3))
    names = {spec.name: _plain_evaluator(knowing, sets).class_names(spec.name) for spec in sets}
    forget = {CONCEPT: "people"}
    summary = summarize(counts, names, forget)
    each = [summarize(table, names, forget) for table in alone]
    assert summary["forget"][CONCEPT]["top1"] == max(e["forget"][CONCEPT]["top1"] for e in each)
    assert summary["test"]["things"]["top1"] == pytest.approx(sum(e["test"]["things"]["top1"] for e in each) / 3)
    # A probe of a language edit (recomputed from the edited stage on) gives the full evaluation's tables.
    edited = copy.deepcopy(knowing)
    with torch.no_grad():
        edited.model.text_projection.mul_(1.5)
    reused = _plain_evaluator(edited, ensemble, per_template=True)
    with torch.no_grad():
        edited.model.text_projection.div_(1.5)
        reused.run()
        edited.model.text_projection.mul_(1.5)
        probe = reused.run(edited="text_projection")
    full = _plain_evaluator(edited, ensemble, per_template=True, reuse=False).run()
    assert all(torch.equal(probe[name], full[name]) for name in full)


def test_an_ensemble_search_sees_through_the_template_trick(knowing, sets):
    """The search guarding itself: a wording under which the untouched model "forgets" the concept (forget top-5 0)
    does not make it forget under that wording's ensemble, where every template must forget: templates of the
    ensemble still rank the concept among the first five."""
    wordings = ["{} photo", "photo {} of a.", "a photo {}", "{}, photo, a of"]
    names = {spec.name: _plain_evaluator(knowing, sets).class_names(spec.name) for spec in sets}

    def forget_top5(templates, per_template):
        worded = [dataclasses.replace(spec, templates=templates) for spec in sets]
        counts = _plain_evaluator(knowing, worded, per_template=per_template).run()
        return summarize(counts, names, {CONCEPT: "people"})["forget"][CONCEPT]["top5"]

    trick = next(w for w in wordings if forget_top5([w], per_template=False) == 0.0)
    assert forget_top5(ensemble_templates([trick]), per_template=True) > 0.0


def test_a_search_over_an_ensemble_keeps_half_of_the_held_out_templates_for_the_audit(tmp_path):
    from slug_lightning.audit.run import read_run
    from slug_lightning.callbacks import StepSearch

    spec = LabelledSet("people", root=str(tmp_path), templates=[SEARCH_TEMPLATE])
    search = StepSearch(sets=[spec], template_ensemble=True)
    searched = search.sets[0].templates
    assert searched == ensemble_templates([SEARCH_TEMPLATE]) and search.settings["template_ensemble"] is True
    unseen = held_out_templates(seen=searched)
    assert len(unseen) >= 6 and not {template_key(t) for t in unseen} & {template_key(t) for t in searched}
    # A run directory records the sets as given and the switch; the audit reads the templates the search used.
    for name in ("model.safetensors", "report.md"):
        (tmp_path / name).write_text("")
    (tmp_path / "report.json").write_text('{"method": "slug", "settings": {"metric": "top1"}, "concepts": []}')
    config = {
        "model": {"init_args": {"model_name": "slug-tiny"}},
        "data": {"init_args": {"concepts": [CONCEPT], "shards": "x.tar"}},
        "search": {"init_args": {"sets": [dataclasses.asdict(spec)], "template_ensemble": True}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert read_run(tmp_path).sets[0].templates == searched


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    """People whose images are plain noise (no colour of their own): a probe on them is neither right nor wrong
    every time, so its numbers are sensitive to any change of the features."""
    generator = torch.Generator().manual_seed(2)
    root = tmp_path_factory.mktemp("crowd")
    for name in PEOPLE:
        folder = root / name.replace(" ", "_")
        folder.mkdir()
        for i in range(8):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return [LabelledSet("people", root=str(root), templates=[SEARCH_TEMPLATE])]


def test_a_language_tower_edit_leaves_the_image_probe_exactly_as_it_was(tiny_clip, crowd):
    base = _evaluator(tiny_clip, crowd)
    lookalikes = base.nearest_classes("people", [CONCEPT], 3)
    assert len(lookalikes) == 3 and CONCEPT not in lookalikes
    before = image_probe(base, "people", CONCEPT, lookalikes)
    assert before["count"] == 32 and before["chance"] == 0.25 and before["classes"] == [CONCEPT, *lookalikes]
    assert 0.0 < before["accuracy"] < 1.0  # a probe with room to move either way

    edited = dataclasses.replace(tiny_clip, model=copy.deepcopy(tiny_clip.model))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        edited.model.text_projection.add_(torch.randn(edited.model.text_projection.shape, generator=generator))
        edited.model.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)
    after = _evaluator(edited, crowd)
    # The edit is real: the text side moved ...
    held_out = held_out_templates()
    assert not torch.equal(set_classifier(base, held_out), set_classifier(after, held_out))
    # ... but not one image feature did, so the probe, its log loss included, is the base model's to the bit.
    assert torch.equal(base.reference_features("people")[0], after.reference_features("people")[0])
    assert image_probe(after, "people", CONCEPT, lookalikes) == before
    with pytest.raises(ValueError, match="look-alikes"):
        image_probe(base, "people", CONCEPT, [CONCEPT])


def set_classifier(evaluator, templates):
    return zero_shot_classifier(evaluator.model, evaluator.tokenizer, evaluator.class_names("people"), templates)


def test_similarity_shift_of_an_evaluator_and_measure_concept(knowing, sets):
    base = _evaluator(knowing, sets)
    names = base.class_names("people")
    matrix = base.similarity("people", names)
    shift = similarity_shift(matrix, matrix, names, [CONCEPT])[CONCEPT]
    assert shift["own_before"] == shift["own_after"] and shift["lookalikes"] == names[1:]
    assert shift["own_before"] > shift["lookalikes_before"]  # the model knows her images from the others'
    measures = measure_concept(base, "people", Concept(CONCEPT, ("Ann",)), ["the woman in red"], lookalikes=names[1:3])
    assert set(measures) == {"held_out", "names", "retrieval", "image_probe"}
    assert list(measures["names"]) == ["Ann", "the woman in red"]
    assert list(measures["retrieval"]) == [CONCEPT, "Ann", "the woman in red"]
    assert verdict(measures).startswith("recognised under held-out templates: forget top-1 1.00 (n=6)")
