"""Zero-shot evaluation of a CLIP on labelled sets: a reusable evaluator for search probes, and
``ZeroShotModule``, the LightningModule behind ``python -m slug_lightning evaluate``.

Both count per-class hits with :class:`~slug_lightning.zero_shot.ZeroShotCounts` over each rank's shard of
every set; the counts are summed across ranks, so accuracies are exact on any number of devices.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from slug_lightning.distributed import rank_and_world
from slug_lightning.layers import LANGUAGE, VISION, tower_of
from slug_lightning.towers import TowerStages, check_stages, tower_stages
from slug_lightning.zero_shot import (
    ZeroShotCounts,
    accuracy,
    class_embeddings,
    class_prompts,
    classifier_from_tokens,
    image_features,
    zero_shot_classifier,
)

# Classes per batch when class prompts go through the text tower stage by stage (as in the reference).
TEXT_BATCH_CLASSES = 64


@dataclass
class StageCache:
    """One tower's inputs to ``stage`` at θ⁰ for every item of one set on this rank, in batches.

    A vision cache holds the forget concepts' images first: its first ``forget`` chunks are theirs alone, so a probe
    can evaluate them before, and without, the rest. ``labels`` are the images' classes in the chunks' order.
    """

    stage: int
    chunks: list[Tensor]
    tokens: list[Tensor | None]
    forget: int = 0
    labels: Tensor | None = None


class ZeroShotEvaluator:
    """Evaluates a model on every set of a ``ZeroShotDataModule``; a probe recomputes only what its edit changes.

    :meth:`run` without an edit evaluates everything and keeps the image features and class classifiers as
    the reference. A probe, ``run(edited=<parameter name>)`` while that parameter carries an edit, reuses
    the reference of the other tower and, for the edited tower, runs only the stages from the edited one on
    (:mod:`slug_lightning.towers`), starting from that stage's inputs at θ⁰, which it caches per set: for a
    vision edit of block l, the input of block l for every evaluation image; for a language edit, the input
    of block l for every class prompt; for an edit of a final projection, the pooled features (the probe is
    one matrix product). The cache is filled on the first probe of a stage and moved forward to a later
    stage in place, so searching a tower's layers in depth order (the parameter order) costs one partial
    pass per layer.

    Cache size per tower: the items of this rank (images, or classes × templates prompts) × tokens × width
    (for the pooled stages just × embedding width) × bytes per element; e.g. ViT-B-32 at 224 px holds
    50 × 768 values per image, 154 KB in fp32. ``cache_dtype=torch.bfloat16`` halves it (results agree
    with fp32 up to bf16 rounding of the cached inputs) and ``cache_device="cpu"`` keeps it off the GPU.

    Args:
        model: Anything with ``encode_image``/``encode_text``. Stage reuse needs a standard OpenCLIP tower;
            other towers are recomputed whole (the other tower is still reused).
        tokenizer: The model's tokenizer.
        datamodule: A set-up ``ZeroShotDataModule`` (its ``transform`` set).
        keep_classes: Class names whose images are always fully kept by subsetting (forget concepts).
        device: Where to compute.
        reuse: Reuse the reference and the stage caches in probes. False makes every probe a full
            evaluation of both towers (the naive probe, for checks and benchmarks).
        cache_device: Where stage caches live (default: ``device``).
        cache_dtype: The dtype of stage caches (default: as computed, fp32 for fp32 models).
        per_template: One classifier per template instead of their mean: count tables ``[num_templates,
            num_classes, 3]`` (a search over a template ensemble; :func:`summarize` reads them).
        world: ``(rank, number of processes)`` to shard the sets over (default: :func:`rank_and_world`); ``(0, 1)``
            evaluates every image here, whatever process group is running.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        datamodule,
        keep_classes: Sequence[str] = (),
        device: torch.device | str = "cpu",
        reuse: bool = True,
        cache_device: torch.device | str | None = None,
        cache_dtype: torch.dtype | None = None,
        per_template: bool = False,
        world: tuple[int, int] | None = None,
    ) -> None:
        self.model = model
        self.per_template = per_template
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.reuse = reuse
        self.cache_device = torch.device(cache_device) if cache_device is not None else self.device
        self.cache_dtype = cache_dtype
        self.rank, self.world_size = world if world is not None else rank_and_world()
        self.datasets = datamodule.datasets(keep_classes=tuple(keep_classes))
        self.templates = {spec.name: list(spec.templates) for spec in datamodule.sets}
        self.loaders = {
            name: datamodule.loader(name, self.rank, self.world_size, keep_classes=tuple(keep_classes))
            for name in self.datasets
        }
        # Each set's classes that are forget concepts: a probe evaluates their images first (forget first).
        self.forget_classes = {
            name: [d.class_names.index(c) for c in keep_classes if c in d.class_names]
            for name, d in self.datasets.items()
        }
        self._metrics = {
            name: ZeroShotCounts(len(dataset.class_names), sync_on_compute=self.world_size > 1).to(self.device)
            for name, dataset in self.datasets.items()
        }
        self.stages = tower_stages(model) if reuse else {}
        self._checked: set[str] = set()
        self._caches: dict[tuple[str, str], StageCache] = {}
        self._features: dict[str, tuple[Tensor, Tensor]] = {}
        self._classifiers: dict[str, Tensor] = {}
        self._tokens: dict[str, Tensor] = {}

    def class_names(self, set_name: str) -> list[str]:
        return list(self.datasets[set_name].class_names)

    @torch.no_grad()
    def run(
        self, edited: str | None = None, needs_tests: Callable[[dict[str, Tensor]], bool] | None = None
    ) -> dict[str, Tensor]:
        """Per-set count tables ``[num_classes, 3]`` (images, top-1 hits, top-5 hits), summed over ranks (one per
        template, stacked, with ``per_template``).

        Args:
            edited: None evaluates everything; the result becomes the reference for later probes (and
                stage caches from an earlier reference are dropped: the weights they came from may have
                changed). A parameter name makes this a probe of an edit of that parameter alone: only the
                edited tower is recomputed, from the edited stage on. Probes never replace the reference.
            needs_tests: Forget first, for a probe over reused stages: the forget concepts' images are evaluated
                first, and their count tables (the sets that hold them, no other image counted) given to
                ``needs_tests``; if it returns False, those tables are the result and nothing else is computed.
                Otherwise the rest is evaluated (the forget images are not recomputed) and the result is complete.
        """
        was_training = self.model.training
        if was_training:  # (switching modes walks every module: not free at the scale of a probe)
            self.model.eval()
        if edited is None or not self.reuse:
            outputs = {name: (self._classifier(name), *self._image_features(name)) for name in self.datasets}
            if edited is None:
                self._caches.clear()
                self._classifiers = {name: out[0] for name, out in outputs.items()}
                self._features = {name: out[1:] for name, out in outputs.items()}
            counts = {name: self._tables(name, *output) for name, output in outputs.items()}
        else:
            counts = self._probe_counts(edited, needs_tests)
        if was_training:
            self.model.train()
        return counts

    def _tables(self, name: str, classifier: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        """The count table of ``features`` (labelled ``labels``) of set ``name``: a stack with ``per_template``."""
        tables = [self._count(name, features, c, labels) for c in (classifier if self.per_template else [classifier])]
        return torch.stack(tables) if self.per_template else tables[0]

    def _probe_counts(self, edited: str, needs_tests: Callable[[dict[str, Tensor]], bool] | None) -> dict[str, Tensor]:
        """A probe's count tables: the forget images first when ``needs_tests`` is given (see :meth:`run`)."""
        scratch: dict[str, object] = {}  # what the forget part computed that the rest reuses: classifiers, features
        first = [name for name in self.datasets if self.forget_classes[name]]
        if needs_tests is None or not first:
            return {name: self._probe_table(name, edited, None, scratch) for name in self.datasets}
        early = {name: self._probe_table(name, edited, True, scratch) for name in first}
        if not needs_tests(early):
            return early
        return {
            name: early[name] + self._probe_table(name, edited, False, scratch)
            if name in early
            else self._probe_table(name, edited, None, scratch)
            for name in self.datasets
        }

    def _probe_table(self, name: str, edited: str, forget: bool | None, scratch: dict) -> Tensor:
        """The count table of set ``name`` under the probed edit, over its forget concepts' images (``forget``
        True), the others (False) or all (None)."""
        if tower_of(edited) != VISION:
            if name not in scratch:
                scratch[name] = self._probe_classifier(name, edited)
            features, labels = self._features[name]
            return self._tables(name, scratch[name], *self._part(name, features, labels, forget))
        staged = self._staged(VISION, edited)
        cache = None if staged is None else self.stage_cache(VISION, name, staged[1])
        if cache is None:  # the stages did not reproduce the encoder: recompute the tower (once per probe)
            if name not in scratch:
                scratch[name] = self._image_features(name)
            return self._tables(name, self._classifiers[name], *self._part(name, *scratch[name], forget))
        chunks = {None: cache.chunks, True: cache.chunks[: cache.forget], False: cache.chunks[cache.forget :]}[forget]
        rows = sum(chunk.shape[0] for chunk in cache.chunks[: cache.forget])
        labels = {None: cache.labels, True: cache.labels[:rows], False: cache.labels[rows:]}[forget]
        stages, stage = staged
        features = [F.normalize(stages.run(self._input(chunk), stage).float(), dim=-1) for chunk in chunks]
        features = torch.cat(features) if features else torch.zeros(0, 1, device=self.device)
        return self._tables(name, self._classifiers[name], features, labels)

    def _part(self, name: str, features: Tensor, labels: Tensor, forget: bool | None) -> tuple[Tensor, Tensor]:
        """The rows of the forget concepts' images (``forget`` True), of the others (False), or all (None)."""
        if forget is None:
            return features, labels
        rows = torch.isin(labels, torch.tensor(self.forget_classes[name], device=labels.device))
        rows = rows if forget else ~rows
        return features[rows], labels[rows]

    def _count(self, name: str, features: Tensor, classifier: Tensor, labels: Tensor) -> Tensor:
        metric = self._metrics[name]
        metric.reset()
        if labels.numel():
            metric.update(features @ classifier, labels)
        return metric.compute().cpu()

    def _mean_classifier(self, set_name: str) -> Tensor:
        """The reference classifier ``[embed_dim, num_classes]``: the templates' mean (the per-template ones'
        normalised mean, as :func:`~slug_lightning.zero_shot.class_embeddings` takes it)."""
        classifier = self._classifiers[set_name]
        return F.normalize(classifier.mean(dim=0), dim=0) if self.per_template else classifier

    # The image–text similarity matrix of the paper's Fig. 3, 7, 8, from the reference outputs.

    def nearest_classes(self, set_name: str, concepts: Sequence[str], count: int = 5) -> list[str]:
        """The ``count`` classes with images whose reference text embeddings are closest to any of
        ``concepts``: the look-alikes an edit is most likely to hurt."""
        dataset = self.datasets[set_name]
        classifier = self._mean_classifier(set_name)
        targets = [dataset.class_index(c) for c in concepts]
        closeness = (classifier.T @ classifier[:, targets]).max(dim=1).values
        with_images = set(dataset.targets)
        ranked = [i for i in closeness.argsort(descending=True).tolist() if i not in targets and i in with_images]
        return [dataset.class_names[i] for i in ranked[:count]]

    def similarity(self, set_name: str, names: Sequence[str]) -> Tensor:
        """``[n, n]`` cosines of the reference outputs: row i is name i's text embedding (its classifier
        column), column j the normalised mean embedding of the images of class j (over all ranks)."""
        dataset = self.datasets[set_name]
        labels = torch.tensor([dataset.class_index(n) for n in names], device=self.device)
        classifier = self._mean_classifier(set_name)
        features, targets = self._features[set_name]
        members = (targets[None, :] == labels[:, None]).float()  # [n, images on this rank]
        sums = (
            members @ features
            if features.shape[0]
            else torch.zeros(len(names), classifier.shape[0], device=self.device)
        )
        counts = members.sum(dim=1)
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        if (counts == 0).any():
            missing = [n for n, c in zip(names, counts.tolist()) if c == 0]
            raise ValueError(f"No images of {missing} in evaluation set {set_name!r}.")
        images = F.normalize(sums / counts[:, None], dim=-1)
        return (classifier[:, labels].T @ images.T).cpu()

    # The reference path: the model's own encoders.

    def _prompt_tokens(self, name: str) -> Tensor:
        if name not in self._tokens:  # prompts never change; tokenizing them is not free
            self._tokens[name] = self.tokenizer(class_prompts(self.datasets[name].class_names, self.templates[name]))
        return self._tokens[name]

    def _classifier(self, name: str) -> Tensor:
        tokens, templates = self._prompt_tokens(name), len(self.templates[name])
        return classifier_from_tokens(self.model, tokens, templates, self.device, per_template=self.per_template)

    def _batches(self, name: str):
        for images, targets in self.loaders[name]:
            yield images.to(self.device), targets.to(self.device)

    def _image_features(self, name: str) -> tuple[Tensor, Tensor]:
        features, labels = [], []
        for images, targets in self._batches(name):
            features.append(image_features(self.model, images))
            labels.append(targets)
        if not features:  # this rank's shard is empty
            return torch.zeros(0, 1, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.cat(features), torch.cat(labels)

    # The probe path: from the edited stage on.

    def _staged(self, tower: str, edited: str) -> tuple[TowerStages, int] | None:
        stages = self.stages.get(tower)
        return None if stages is None else (stages, stages.stage_of(edited))

    def _probe_classifier(self, name: str, edited: str) -> Tensor:
        staged = self._staged(LANGUAGE, edited)
        cache = None if staged is None else self.stage_cache(LANGUAGE, name, staged[1])
        if cache is None:
            return self._classifier(name)
        stages, stage = staged
        prompt_features = [
            stages.run(self._input(chunk), stage, tokens=tokens) for chunk, tokens in zip(cache.chunks, cache.tokens)
        ]
        return class_embeddings(torch.cat(prompt_features), len(self.templates[name]), self.per_template)

    def _input(self, chunk: Tensor) -> Tensor:
        if chunk.is_floating_point():
            return chunk.to(self.device, dtype=self._compute_dtype())
        return chunk.to(self.device)

    def _compute_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _raw_inputs(self, tower: str, name: str):
        """(inputs, tokens) batches of a tower's stage 0: images, or tokenized class prompts."""
        if tower == VISION:
            for images, _ in self._batches(name):
                yield images, None
            return
        tokens = self._prompt_tokens(name)
        rows = TEXT_BATCH_CLASSES * len(self.templates[name])
        for start in range(0, tokens.shape[0], rows):
            chunk = tokens[start : start + rows].to(self.device)
            yield chunk, chunk

    def stage_cache(self, tower: str, name: str, stage: int) -> StageCache | None:
        """The inputs of ``stage`` at θ⁰ for set ``name``; None if this tower's stages cannot be trusted.

        Reached from the cached stage when it is not later than ``stage``, else from the raw inputs; the
        stages in between hold no edited weight (the edit is at ``stage``), so they still compute θ⁰.
        """
        stages = self.stages[tower]
        cache = self._caches.get((tower, name))
        if cache is None or cache.stage > stage:
            if not self._trusted(tower, name):
                return None
            self._caches.pop((tower, name), None)  # free the old cache before building the new one
            if tower == VISION:
                cache = self._image_cache(name, stage)
            else:
                chunks, tokens = [], []
                for inputs, batch_tokens in self._raw_inputs(tower, name):
                    chunks.append(self._store(stages.run(inputs, 0, stage, tokens=batch_tokens)))
                    tokens.append(batch_tokens)
                cache = StageCache(stage, chunks, tokens)
        elif cache.stage < stage:
            cache.chunks = [
                self._store(stages.run(self._input(chunk), cache.stage, stage, tokens=tokens))
                for chunk, tokens in zip(cache.chunks, cache.tokens)
            ]
            cache.stage = stage
        self._caches[(tower, name)] = cache
        return cache

    def _image_cache(self, name: str, stage: int) -> StageCache:
        """The inputs of ``stage`` for every image of set ``name``, the forget concepts' images first, in chunks of
        at most a batch (each batch runs whole to ``stage``, then its rows are split)."""
        stages, concepts = self.stages[VISION], torch.tensor(self.forget_classes[name], device=self.device)
        forget, rest, forget_labels, rest_labels, size = [], [], [], [], 1
        for images, targets in self._batches(name):
            hidden, size = stages.run(images, 0, stage), max(size, images.shape[0])
            rows = torch.isin(targets, concepts)
            forget.append(hidden[rows])
            forget_labels.append(targets[rows])
            if not rows.all():
                rest.append(self._store(hidden[~rows]))
                rest_labels.append(targets[~rows])
        gathered = torch.cat(forget) if forget else None
        forget = [self._store(c) for c in gathered.split(size)] if gathered is not None and len(gathered) else []
        labels = forget_labels + rest_labels
        labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=self.device)
        return StageCache(stage, forget + rest, [None] * (len(forget) + len(rest)), len(forget), labels)

    def cache_bytes(self, tower: str) -> int:
        """The bytes the stage caches of ``tower`` hold now, over every set."""
        caches = [cache for (name, _), cache in self._caches.items() if name == tower]
        return sum(chunk.numel() * chunk.element_size() for cache in caches for chunk in cache.chunks)

    def _store(self, hidden: Tensor) -> Tensor:
        dtype = self.cache_dtype if self.cache_dtype is not None and hidden.is_floating_point() else hidden.dtype
        return hidden.to(self.cache_device, dtype=dtype)

    def _trusted(self, tower: str, name: str) -> bool:
        """Check once per tower, on a few real inputs, that the stages reproduce the model's encoder."""
        if tower in self._checked:
            return tower in self.stages
        sample = next(iter(self._raw_inputs(tower, name)), None)
        if sample is None:  # nothing on this rank to check with; try again with another set
            return True
        self._checked.add(tower)
        if not check_stages(self.model, self.stages[tower], sample[0][:8]):
            warnings.warn(
                f"The {tower} tower of {type(self.model).__name__} does not run as OpenCLIP stages; its "
                "probes recompute the whole tower.",
                stacklevel=2,
            )
            del self.stages[tower]
            return False
        return True


def ensemble_accuracy(
    counts: Tensor, classes: Sequence[int], averaging: str = "micro", reduce: str = "mean"
) -> dict[str, float]:
    """:func:`~slug_lightning.zero_shot.accuracy` of a count table, or of each template's table of a stack
    ``[num_templates, num_classes, 3]`` reduced over the templates: ``"mean"`` (utility over a template ensemble)
    or ``"max"`` (forget accuracy: a concept is forgotten only if it is under every template).

    Example::

        >>> stack = torch.tensor([[[4, 4, 4], [2, 0, 1]], [[4, 2, 4], [2, 2, 2]]])
        >>> ensemble_accuracy(stack, [1], reduce="max"), ensemble_accuracy(stack, [0])["top1"]
        ({'top1': 1.0, 'top5': 1.0, 'count': 2}, 0.75)
    """
    if counts.dim() == 2:
        return accuracy(counts, classes, averaging)
    each = [accuracy(table, classes, averaging) for table in counts]
    if not each[0]["count"]:
        return each[0]
    combine = max if reduce == "max" else (lambda values: sum(values) / len(values))
    return {key: combine([a[key] for a in each]) for key in ("top1", "top5")} | {"count": each[0]["count"]}


def summarize(
    counts: Mapping[str, Tensor],
    class_names: Mapping[str, Sequence[str]],
    forget: Mapping[str, str],
    averaging: Mapping[str, str] | None = None,
) -> dict:
    """Forget and test accuracies from per-set count tables.

    Args:
        counts: Per-set count tables; a stack of one per template (a template ensemble) gives each concept the
            forget accuracy of its worst template and each set the mean test accuracy (:func:`ensemble_accuracy`).
        class_names: Per-set class lists (label order).
        forget: Forget concept name → the set whose images of that class measure its forget accuracy.
        averaging: Per-set ``"micro"`` (over images, the default for a set not named) or ``"macro"`` (the mean
            over the set's test classes with images of each class's accuracy) test accuracy; see
            :func:`~slug_lightning.zero_shot.accuracy`.

    Returns:
        ``{"forget": {concept: {top1, top5, count}}, "test": {set: {top1, top5, count}}}`` where a set's
        test accuracy covers all its images except those of any forget concept.
    """
    averaging = averaging or {}
    excluded = {name: set() for name in counts}
    result = {"forget": {}, "test": {}}
    for concept, set_name in forget.items():
        index = list(class_names[set_name]).index(concept)
        excluded[set_name].add(index)
        result["forget"][concept] = ensemble_accuracy(counts[set_name], [index], reduce="max")
    for name, table in counts.items():
        rows = [i for i in range(table.shape[-2]) if i not in excluded[name]]
        result["test"][name] = ensemble_accuracy(table, rows, averaging.get(name, "micro"))
    return result


def forget_sets_of(
    concepts: Sequence[str], datasets: Mapping[str, object], forget_set: str | None = None
) -> dict[str, str]:
    """Which evaluation set measures each concept's forget accuracy: ``forget_set`` if given, else the first set
    with the concept among its classes.

    Args:
        concepts: The forget concepts.
        datasets: The evaluation sets by name, each with ``class_names``, ``class_index(name)`` and ``targets``
            (:class:`~slug_lightning.datamodules.labelled.LabelledImages`).
        forget_set: The one set to look in, or ``None`` for all.

    Raises:
        UserError: naming a concept no set holds (with close matches), or one with no images in its set.
    """
    import difflib

    from slug_lightning.errors import UserError

    candidates = [forget_set] if forget_set else list(datasets)
    result = {}
    for concept in concepts:
        holders = [name for name in candidates if concept in datasets[name].class_names]
        if not holders:
            known = [c for name in candidates for c in datasets[name].class_names]
            close = difflib.get_close_matches(concept, known, n=3)
            raise UserError(
                f"Concept {concept!r} is not a class of the evaluation sets {candidates}"
                + (f"; close matches: {close}." if close else ".")
            )
        dataset = datasets[holders[0]]
        if dataset.class_index(concept) not in set(dataset.targets):
            raise UserError(
                f"Concept {concept!r} has no images in evaluation set {holders[0]!r}: its forget accuracy cannot "
                "be measured."
            )
        result[concept] = holders[0]
    return result


def class_changes(
    before: Mapping[str, Tensor],
    after: Mapping[str, Tensor],
    class_names: Mapping[str, Sequence[str]],
    forget: Mapping[str, str],
) -> dict[str, list[dict]]:
    """Each test class's top-1 before and after an edit: where the test accuracy of :func:`summarize` was lost.

    Args:
        before: Per-set count tables of the model before the edit (per-template stacks: the templates' mean).
        after: The same, after it.
        class_names: Per-set class lists (label order).
        forget: Forget concept name → its set; those classes are not test classes.

    Returns:
        ``{set: [{name, images, top1_before, top1_after}, ...]}``, every class with images but the forget
        concepts, the largest fall in top-1 first (ties in label order).
    """
    result = {}
    for set_name, table in before.items():
        rows = []
        for index, name in enumerate(class_names[set_name]):
            then, now = ensemble_accuracy(table, [index]), ensemble_accuracy(after[set_name], [index])
            if then["count"] and forget.get(name) != set_name:
                rows.append(
                    {"name": name, "images": then["count"], "top1_before": then["top1"], "top1_after": now["top1"]}
                )
        result[set_name] = sorted(rows, key=lambda row: row["top1_after"] - row["top1_before"])
    return result


class ZeroShotModule(L.LightningModule):
    """Zero-shot top-1/top-5 of a CLIP on the sets of a ``ZeroShotDataModule`` (one dataloader per set), over
    every image of each set, averaged as the set's ``averaging`` says.

    Args:
        model_name: OpenCLIP model name.
        pretrained: Pretrained tag or local checkpoint file (None: random initialisation).
    """

    def __init__(self, model_name: str = "slug-tiny", pretrained: str | None = None) -> None:
        super().__init__()
        from slug_lightning.models import load_clip

        loaded = load_clip(model_name, pretrained)
        self.model, self.preprocess, self.tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer
        self.metrics = nn.ModuleList()
        self.results: dict[str, dict[str, float]] = {}

    @classmethod
    def wrap(cls, module: nn.Module) -> ZeroShotModule:
        """Evaluate the CLIP held by another module (its ``model``, ``preprocess`` and ``tokenizer``)."""
        for attribute in ("model", "preprocess", "tokenizer"):
            if not hasattr(module, attribute):
                raise TypeError(f"{type(module).__name__} has no `{attribute}` to evaluate.")
        wrapper = cls.__new__(cls)
        L.LightningModule.__init__(wrapper)
        wrapper.model, wrapper.preprocess, wrapper.tokenizer = module.model, module.preprocess, module.tokenizer
        wrapper.metrics = nn.ModuleList()
        wrapper.results = {}
        return wrapper

    @override
    def on_validation_start(self) -> None:
        datamodule = self.trainer.datamodule
        datasets = datamodule.datasets()
        self.set_names = list(datasets)
        self.classifiers = [
            zero_shot_classifier(
                self.model, self.tokenizer, datasets[name].class_names, list(spec.templates), self.device
            )
            for name, spec in zip(self.set_names, datamodule.sets)
        ]
        self.metrics = nn.ModuleList(ZeroShotCounts(len(datasets[name].class_names)) for name in self.set_names)
        self.metrics.to(self.device)
        self.averaging = [spec.averaging for spec in datamodule.sets]

    @override
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        logits = image_features(self.model, images) @ self.classifiers[dataloader_idx]
        self.metrics[dataloader_idx].update(logits, labels)

    @override
    def on_validation_epoch_end(self) -> None:
        for name, metric, averaging in zip(self.set_names, self.metrics, self.averaging):
            self.results[name] = accuracy(metric.compute().cpu(), averaging=averaging)
            metric.reset()
            for key in ("top1", "top5"):
                self.log(f"{name}/{key}", self.results[name][key], add_dataloader_idx=False)

    # `test` is the same evaluation on the datamodule's test loaders.
    on_test_start = on_validation_start
    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end
