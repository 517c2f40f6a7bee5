"""Every audit probe of one concept on one model, in the form :func:`~slug_lightning.audit.verdicts.verdict` reads."""

from __future__ import annotations

from collections.abc import Sequence

from slug_lightning.audit.probe import image_probe
from slug_lightning.audit.prompts import AuditEvaluator, held_out_templates, name_accuracy, other_names, set_counts
from slug_lightning.audit.retrieval import search_by_name
from slug_lightning.concepts import Concept
from slug_lightning.zero_shot import accuracy


def measure_concept(
    evaluator: AuditEvaluator,
    set_name: str,
    concept: Concept | str,
    paraphrases: Sequence[str] = (),
    lookalikes: Sequence[str] = (),
    templates: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
) -> dict:
    """One concept's audit measures on the evaluator's model.

    Args:
        evaluator: A run :class:`~slug_lightning.audit.prompts.AuditEvaluator` of the model.
        set_name: The set holding the concept's images (its forget set).
        concept: The concept; its class name is ``concept.name``, its aliases are tried as other names.
        paraphrases: More names to try (e.g. ``"the CEO of Tesla"``).
        lookalikes: Classes for the image probe (none: no probe); give the same ones for every model compared.
        templates: The held-out templates (default: :func:`~slug_lightning.audit.prompts.held_out_templates` less
            the set's own).
        folds: Folds of the image probe.
        seed: Seed of the image probe's folds.

    Returns:
        ``{"held_out": {top1, top5, count}, "names": {name: {top1, top5, count}}, "retrieval": {name: scores},
        "image_probe": {...}}``: the forget accuracy under the held-out templates; under the set's own templates
        with each other name in place of the class name; searching the set by the class name and each other name
        (held-out templates); the linear probe. ``names`` and ``image_probe`` are left out when there is nothing to
        try.
    """
    if not isinstance(concept, Concept):
        concept = Concept(concept)
    if templates is None:
        templates = held_out_templates(seen=evaluator.templates[set_name])
    index = evaluator.datasets[set_name].class_index(concept.name)
    names = other_names(concept, paraphrases)
    measures = {"held_out": accuracy(set_counts(evaluator, set_name, templates), [index])}
    if names:
        measures["names"] = name_accuracy(evaluator, set_name, concept.name, names)
    measures["retrieval"] = search_by_name(evaluator, set_name, concept.name, [concept.name, *names], templates)
    if lookalikes:
        measures["image_probe"] = image_probe(evaluator, set_name, concept.name, lookalikes, folds, seed)
    return measures
