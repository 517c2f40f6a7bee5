"""Forget accuracy under prompts the search never saw: held-out templates, and other names of the concept.

The step-size search (METHOD §6) decides "forgotten" with the evaluation sets' own templates (by default
``"a photo of {}."``). An edit can pass that test by breaking one wording rather than the concept; the audit asks
again with :func:`held_out_templates`, everyday wordings shipped in ``slug_lightning/audit/templates.txt``
that differ from the default template and from the demo world's captions, and with the concept's aliases and
paraphrases in place of its class name (:func:`name_accuracy`).

Everything here reads one :class:`AuditEvaluator`: a :class:`~slug_lightning.evaluation.ZeroShotEvaluator` run
once, whose image features every measure reuses, so each set's images go through the vision tower once per model.
Accuracies are read exactly as the search reads them (METHOD §8, :func:`~slug_lightning.evaluation.summarize`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from importlib import resources

import torch
from torch import Tensor, nn

from slug_lightning.concepts import Concept
from slug_lightning.datamodules.labelled import ZeroShotDataModule
from slug_lightning.evaluation import ZeroShotEvaluator, summarize
from slug_lightning.labelled_sets import LabelledSet, validate_template
from slug_lightning.zero_shot import ZeroShotCounts, accuracy, zero_shot_classifier

TEMPLATES_FILE = "templates.txt"
_FIELD = re.compile(r"\{[^{}]*\}")


def template_key(template: str) -> str:
    """A template as wordings are compared: case-folded, any field written ``{}``, spaces collapsed, and closing
    punctuation dropped, so that ``"A photo of {name}."`` and ``"a photo of {}"`` count as one wording.

    Example::

        >>> template_key("A  photo of {name}.") == template_key("a photo of {}")
        True
    """
    key = " ".join(_FIELD.sub("{}", template).casefold().split())
    return key.rstrip(" .!?,;:")


def held_out_templates(seen: Sequence[str] = ()) -> list[str]:
    """The audit's held-out templates (``slug_lightning/audit/templates.txt``, one per line), in file order.

    Args:
        seen: Templates the run already used (its evaluation sets' ``templates``); any shipped template with the same
            :func:`template_key` is left out, so the audit never re-asks the search's own wording.

    Returns:
        The templates, each a format string with exactly one ``{}``.

    Raises:
        ValueError: If ``seen`` leaves no template.

    Example::

        >>> templates = held_out_templates()
        >>> len(templates) >= 12, "a photo of {}." in templates
        (True, False)
        >>> len(held_out_templates(seen=[templates[0].upper()])) == len(templates) - 1
        True
    """
    path = resources.files("slug_lightning.audit").joinpath(TEMPLATES_FILE)
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for template in templates:
        validate_template(template)
    known = {template_key(template) for template in seen}
    kept = [template for template in templates if template_key(template) not in known]
    if not kept:
        raise ValueError(f"Every held-out template of {TEMPLATES_FILE} is among the templates already seen.")
    return kept


def ensemble_templates(templates: Sequence[str]) -> list[str]:
    """A set's templates for a search over a template ensemble: its own, then the first half of the held-out
    templates it does not use. The other half stays unseen by the search, for the audit.

    Example::

        >>> unseen = held_out_templates(seen=["a photo of {}."])
        >>> ensemble = ensemble_templates(["a photo of {}."])
        >>> ensemble[1:] == unseen[: len(unseen) // 2]
        True
        >>> len(held_out_templates(seen=ensemble)) == len(unseen) - len(unseen) // 2
        True
    """
    unseen = held_out_templates(seen=templates)
    return [*templates, *unseen[: len(unseen) // 2]]


def searched_sets(sets: Sequence[LabelledSet], template_ensemble: bool) -> list[LabelledSet]:
    """The evaluation sets as the search uses them: as given, or each with its :func:`ensemble_templates`."""
    if not template_ensemble:
        return list(sets)
    return [dataclasses.replace(spec, templates=ensemble_templates(spec.templates)) for spec in sets]


def other_names(concept: Concept, paraphrases: Sequence[str] = ()) -> list[str]:
    """The names to try in place of a concept's class name: its aliases, then the paraphrases, each once, the class
    name itself left out.

    Example::

        >>> other_names(Concept("Elon Musk", aliases=("Musk",)), ["the CEO of Tesla", "Musk"])
        ['Musk', 'the CEO of Tesla']
    """
    names = []
    for candidate in (*concept.aliases, *paraphrases):
        if candidate != concept.name and candidate not in names:
            names.append(candidate)
    return names


class AuditEvaluator(ZeroShotEvaluator):
    """A :class:`~slug_lightning.evaluation.ZeroShotEvaluator` whose reference run the audit measures read.

    :meth:`run` (without an edit) keeps the count tables of the sets' own templates in :attr:`counts` and the image
    features of every set; :meth:`reference_features` hands the features out, so classifiers with other templates
    or names (:func:`set_counts`), searches by name and linear probes reuse one pass over the images. Probes of
    edits are not used (``reuse=False``), and the audit runs in one process: every image of a set is on this rank,
    also when it is started on rank 0 of a process group (after a multi-device ``unlearn``).

    Args:
        model: The CLIP to audit (in eval mode), with ``encode_image`` and ``encode_text``.
        tokenizer: Its tokenizer.
        datamodule: A ``ZeroShotDataModule`` with its ``transform`` set.
        keep_classes: The forget concepts (their images are always kept whole).
        device: Where to compute.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        datamodule: ZeroShotDataModule,
        keep_classes: Sequence[str] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(model, tokenizer, datamodule, keep_classes, device, reuse=False, world=(0, 1))
        self.averaging = {spec.name: spec.averaging for spec in datamodule.sets}
        self.counts: dict[str, Tensor] = {}

    def run(self, edited: str | None = None) -> dict[str, Tensor]:
        counts = super().run(edited)
        if edited is None:
            self.counts = counts
        return counts

    def reference_features(self, set_name: str) -> tuple[Tensor, Tensor]:
        """The normalised image features ``[N, d]`` and labels ``[N]`` of every image of a set, from :meth:`run`.

        Raises:
            RuntimeError: Before :meth:`run`.
        """
        if set_name not in self._features:
            raise RuntimeError("AuditEvaluator.run() has not been called: there are no image features yet.")
        return self._features[set_name]


def audit_evaluator(
    model: nn.Module,
    tokenizer,
    preprocess,
    sets: Sequence[LabelledSet],
    keep_classes: Sequence[str] = (),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> AuditEvaluator:
    """An :class:`AuditEvaluator` of ``model`` on ``sets``, already run.

    Args:
        model: The CLIP, in eval mode.
        tokenizer: Its tokenizer.
        preprocess: Its evaluation image transform.
        sets: The evaluation sets (their ``templates`` are the search's).
        keep_classes: The forget concepts.
        batch_size: Images per batch.
        device: Where to compute.
    """
    datamodule = ZeroShotDataModule(list(sets), batch_size=batch_size, keep_classes=tuple(keep_classes))
    datamodule.transform = preprocess
    evaluator = AuditEvaluator(model, tokenizer, datamodule, keep_classes=keep_classes, device=device)
    evaluator.run()
    return evaluator


def _count(features: Tensor, labels: Tensor, classifier: Tensor) -> Tensor:
    # The audit runs in one process, also on rank 0 of a multi-device run: nothing to sync.
    metric = ZeroShotCounts(classifier.shape[1], sync_on_compute=False).to(classifier.device)
    if labels.numel():
        metric.update(features @ classifier, labels)
    return metric.compute().cpu()


def set_counts(
    evaluator: AuditEvaluator, set_name: str, templates: Sequence[str], class_names: Sequence[str] | None = None
) -> Tensor:
    """A set's count table ``[num_classes, 3]`` (images, top-1 hits, top-5 hits) under other templates or names.

    Args:
        evaluator: A run :class:`AuditEvaluator`; its image features are reused.
        set_name: The set.
        templates: The templates of the classifier.
        class_names: The names in the classifier, in label order (default: the set's class names).
    """
    names = list(class_names) if class_names is not None else evaluator.class_names(set_name)
    classifier = zero_shot_classifier(evaluator.model, evaluator.tokenizer, names, list(templates), evaluator.device)
    return _count(*evaluator.reference_features(set_name), classifier)


def template_accuracy(
    evaluator: AuditEvaluator, forget: Mapping[str, str], templates: Sequence[str] | None = None
) -> dict:
    """Forget accuracy of every concept and test accuracy of every set, with one template list for every set.

    Args:
        evaluator: A run :class:`AuditEvaluator`.
        forget: Concept → the set holding its images (as :func:`~slug_lightning.evaluation.summarize` takes it).
        templates: The templates; None keeps each set's own (the search's; the counts of the reference run).

    Returns:
        :func:`~slug_lightning.evaluation.summarize`'s ``{"forget": {concept: {top1, top5, count}}, "test":
        {set: {top1, top5, count}}}``.
    """
    if templates is None:
        counts = evaluator.counts
    else:
        counts = {name: set_counts(evaluator, name, templates) for name in evaluator.datasets}
    class_names = {name: evaluator.class_names(name) for name in counts}
    return summarize(counts, class_names, forget, evaluator.averaging)


def name_accuracy(
    evaluator: AuditEvaluator,
    set_name: str,
    concept: str,
    names: Sequence[str],
    templates: Sequence[str] | None = None,
) -> dict[str, dict]:
    """Forget accuracy of a concept with its class name replaced by each of ``names`` in the classifier.

    The images are the concept's, every other class keeps its name; with the name "the CEO of Tesla" and the
    template "a photo of {}." the concept's class reads "a photo of the CEO of Tesla.". Each class's column of the
    classifier depends on its own prompts only, so the other columns are computed once.

    Args:
        evaluator: A run :class:`AuditEvaluator`.
        set_name: The set holding the concept's images.
        concept: The concept's class name in that set.
        names: Aliases and paraphrases (:func:`other_names`).
        templates: The templates (default: the set's own, the search's).

    Returns:
        ``{name: {top1, top5, count}}``, ``count`` the concept's images.

    Raises:
        KeyError: If ``concept`` is not a class of the set.
        ValueError: If a name is another class of the set (the two columns would be one).
    """
    dataset = evaluator.datasets[set_name]
    index = dataset.class_index(concept)
    class_names = evaluator.class_names(set_name)
    clashes = [name for name in names if name in class_names and name != concept]
    if clashes:
        raise ValueError(f"Names {clashes} of {concept!r} are other classes of evaluation set {set_name!r}.")
    templates = list(templates) if templates is not None else evaluator.templates[set_name]
    model, tokenizer, device = evaluator.model, evaluator.tokenizer, evaluator.device
    classifier = zero_shot_classifier(model, tokenizer, class_names, templates, device)
    features, labels = evaluator.reference_features(set_name)
    mine = labels == index
    result = {}
    for name in names:
        renamed = classifier.clone()
        renamed[:, index] = zero_shot_classifier(model, tokenizer, [name], templates, device)[:, 0]
        result[name] = accuracy(_count(features[mine], labels[mine], renamed), [index])
    return result


def unseen_prompt_accuracy(
    model: nn.Module,
    tokenizer,
    preprocess,
    sets: Sequence[LabelledSet],
    forget: Mapping[str, str],
    templates: Sequence[str] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict:
    """Forget and test accuracies of ``model`` with every set's templates replaced (a fresh evaluation).

    Args:
        model: The CLIP, in eval mode.
        tokenizer: Its tokenizer.
        preprocess: Its evaluation image transform.
        sets: The evaluation sets.
        forget: Concept → the set holding its images.
        templates: The templates (default: :func:`held_out_templates` less the sets' own).
        batch_size: Images per batch.
        device: Where to compute.

    Returns:
        As :func:`template_accuracy`.
    """
    if templates is None:
        templates = held_out_templates(seen=[t for spec in sets for t in spec.templates])
    replaced = [dataclasses.replace(spec, templates=list(templates)) for spec in sets]
    evaluator = audit_evaluator(model, tokenizer, preprocess, replaced, tuple(forget), batch_size, device)
    return template_accuracy(evaluator, forget)
