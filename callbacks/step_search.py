"""``StepSearch``: the step-size search of SLUG (METHOD §4–§9) as a Lightning callback.

After a ``GradientCollector`` predict run, this callback ranks the layers, takes each tower's Pareto fronts and hands
them to :class:`~slug_lightning.joint_search.JointSearch`; it keeps the settings, the Lightning hook, the progress bar
and the logging. The finished search is :attr:`StepSearch.result` (:class:`~slug_lightning.results.SearchResult`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from slug_lightning.audit.prompts import searched_sets
from slug_lightning.callbacks.search_progress import SearchProgress
from slug_lightning.datamodules.labelled import ZeroShotDataModule
from slug_lightning.editor import ModelEditor
from slug_lightning.errors import ConfigError, UserError
from slug_lightning.evaluation import ZeroShotEvaluator, class_changes, forget_sets_of, summarize
from slug_lightning.gradient_store import GradientStore
from slug_lightning.joint_search import JointSearch, SearchRule
from slug_lightning.labelled_sets import LabelledSet, check_set_names
from slug_lightning.layers import LANGUAGE, VISION, front_layers, layer_statistics
from slug_lightning.memory import PeakMemory
from slug_lightning.results import SearchResult
from slug_lightning.search import BinarySearch, is_forgotten
from slug_lightning.towers import in_forward_order, tower_stages

CACHE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # None: the dtype the model computes in
# Probes per layer at most in a smoke run (a Trainer with fast_dev_run): enough to go through a search's both
# branches (a probe that forgets and one that does not), few enough to take seconds.
SMOKE_MAX_STEPS = 2


class StepSearch(Callback):
    """Search a step size for every Pareto-front layer, probing zero-shot forget and test accuracy.

    Every probe edits one layer, θ_l = θ⁰_l + λ·G_f,l, evaluates every set on accuracies reduced over all devices (so
    every rank takes the same path), and restores θ⁰_l; each is logged to the trainer's logger.

    Args:
        sets: Labelled evaluation sets. The forget accuracy of a concept is measured on the images of its
            class in ``forget_set``; the test accuracy of each set on all its other images.
        forget_set: The set that holds the concepts' images (default: the first whose classes name the concept).
        metric: Forget accuracy that decides "forgotten": ``"top5"`` (the paper) or ``"top1"`` (use it with
            fewer than about 20 classes, where top-5 is nearly always right).
        threshold: A probe has forgotten when its forget accuracy is at most this.
        max_steps: Probes per layer at most. A Trainer with ``fast_dev_run`` (a smoke run) caps it at
            :data:`SMOKE_MAX_STEPS`.
        tolerance: Stop a layer's search once (λ_high − λ_low)/λ_high is below this.
        towers: Which towers' front layers to search: ``"vision"``, ``"language"``.
        fronts: How many Pareto fronts of each tower to search: 1 is the front of METHOD §4; 2 adds the front of
            the layers left once the first is taken out, and so on (:func:`~slug_lightning.layers.pareto_ranks`).
            More probes, for layers where a step may cost the test sets less.
        signed_alignment: Rank by signed cos(G_f, G_r) instead of its absolute value.
        batch_size: Evaluation batch size.
        num_workers: Evaluation data loader workers.
        apply: Leave the chosen edits applied to the model (otherwise restore θ⁰).
        reuse: Probes recompute only what the edit changes, over cached inputs of the edited block (see
            :class:`~slug_lightning.evaluation.ZeroShotEvaluator`). False makes every probe a full evaluation;
            the results are the same up to float rounding.
        cache_dtype: Dtype of the probe caches: ``"float32"``, or ``"bfloat16"`` to halve their memory.
        cache_on_cpu: Keep the probe caches in CPU memory instead of on the accelerator.
        similarity_classes: How many look-alike classes (those whose names the model embeds closest to the
            forget concepts) join the concepts in the before/after image–text similarity matrix; 0 skips it.
        refine_rounds: Several concepts: after the search of METHOD §9, up to this many rounds that search each
            concept again on the model carrying every other edit, keeping the concepts forgotten at that moment
            forgotten, and try freeing an edit others lean on (docs/multi_concept.md). 0 is METHOD §9 as written.
        orders: Several concepts: from how many concept orders to run the whole search, each from θ⁰, keeping the
            end that forgets the most concepts, then has the highest utility
            (:func:`~slug_lightning.search.concept_orders`). Each order costs a whole search.
        template_ensemble: Decide "forgotten" and utility over a template ensemble: each set's templates, then the
            first half of the audit's held-out templates (:func:`~slug_lightning.audit.prompts.ensemble_templates`;
            the other half stays unseen, for the audit), each a classifier of its own. A concept is forgotten when
            it is under every template; test accuracy is the templates' mean.
        full_probes: Evaluate the test sets in every probe. False (forget first): a probe whose forget images already
            fail the forget test skips them (recorded as not tested); the choice is the same (docs/performance.md).
        warm_start: Start each layer's search one doubling below the earliest relative step at which a layer
            searched before it in its tower first forgot (:class:`~slug_lightning.joint_search.SearchRule`). Fewer
            probes per layer; the same choice wherever forget accuracy falls monotonically with λ below that step.
        audit: Once ``SlugTrainer.unlearn`` has written the run, audit the unlearned model (:mod:`slug_lightning.audit`:
            held-out prompts, search by name, the image side, relearning) into ``audit.json``, ``report.json`` and
            ``report.md``. False skips it; a smoke run never audits.

    Example::

        search = StepSearch(sets=[LabelledSet("identities", root="eval/identities")], metric="top1")
        trainer = L.Trainer(inference_mode=False, callbacks=[search])
        trainer.predict(GradientCollector("ViT-B-32", "laion400m_e32"), datamodule=laion)
        print(search.result.chosen)
    """

    joint_search: type[JointSearch] = JointSearch  # the algorithm; a subclass may give a variant of its own

    def __init__(
        self,
        sets: list[LabelledSet],
        forget_set: str | None = None,
        metric: Literal["top1", "top5"] = "top5",
        threshold: float = 0.0,
        max_steps: int = 10,
        tolerance: float = 0.05,
        towers: Sequence[Literal["vision", "language"]] = (VISION, LANGUAGE),
        fronts: int = 1,
        signed_alignment: bool = False,
        batch_size: int = 256,
        num_workers: int = 0,
        apply: bool = True,
        reuse: bool = True,
        cache_dtype: Literal["float32", "bfloat16"] = "float32",
        cache_on_cpu: bool = False,
        similarity_classes: int = 5,
        refine_rounds: int = 0,
        orders: int = 1,
        template_ensemble: bool = False,
        full_probes: bool = False,
        warm_start: bool = False,
        audit: bool = True,
    ) -> None:
        if not sets:
            raise ConfigError("StepSearch needs at least one evaluation set.", "sets", sets)
        check_set_names(sets)
        if metric not in ("top1", "top5"):
            raise ConfigError(f"metric must be 'top1' or 'top5', got {metric!r}.", "metric", metric)
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"threshold must be in [0, 1), got {threshold}.", "threshold", threshold)
        unknown = [t for t in towers if t not in (VISION, LANGUAGE)]
        if unknown or not towers:
            raise ConfigError(
                f"towers must be a non-empty subset of ['vision', 'language'], got {list(towers)}.", "towers", towers
            )
        names = [s.name for s in sets]
        if forget_set is not None and forget_set not in names:
            raise ConfigError(f"forget_set {forget_set!r} is not one of the sets {names}.", "forget_set", forget_set)
        try:  # validates max_steps and tolerance now, not after hours
            BinarySearch(1.0, max_steps, tolerance)
        except ValueError as error:
            option, value = ("max_steps", max_steps) if "max_steps" in str(error) else ("tolerance", tolerance)
            raise ConfigError(str(error), option, value) from error
        if cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"cache_dtype must be one of {list(CACHE_DTYPES)}, got {cache_dtype!r}.", "cache_dtype", cache_dtype
            )
        for option, value, least in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("similarity_classes", similarity_classes, 0),
            ("fronts", fronts, 1),
            ("refine_rounds", refine_rounds, 0),
            ("orders", orders, 1),
        ):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                raise ConfigError(f"{option} must be an integer >= {least}, got {value!r}.", option, value)
        for option, value in (("full_probes", full_probes), ("warm_start", warm_start)):
            if not isinstance(value, bool):
                raise ConfigError(f"{option} must be true or false, got {value!r}.", option, value)
        self.sets, self.forget_set = searched_sets(sets, template_ensemble), forget_set
        self.template_ensemble = template_ensemble
        self.metric, self.threshold = metric, threshold
        self.max_steps, self.tolerance = max_steps, tolerance
        self.towers, self.fronts, self.signed_alignment = tuple(towers), fronts, signed_alignment
        self.batch_size, self.num_workers, self.apply = batch_size, num_workers, apply
        self.reuse, self.cache_dtype, self.cache_on_cpu = reuse, cache_dtype, cache_on_cpu
        self.similarity_classes = similarity_classes
        self.refine_rounds, self.orders, self.audit = refine_rounds, orders, audit
        self.full_probes, self.warm_start = full_probes, warm_start
        self.smoke_run = False  # set from the Trainer's fast_dev_run when the search starts
        self.result: SearchResult | None = None  # the finished search

    @property
    def steps_per_layer(self) -> int:
        """The most probes one layer's search takes: ``max_steps``, at most :data:`SMOKE_MAX_STEPS` in a smoke run."""
        return min(self.max_steps, SMOKE_MAX_STEPS) if self.smoke_run else self.max_steps

    @property
    def averaging(self) -> dict[str, str]:
        """Each set's test-accuracy averaging (``LabelledSet.averaging``), for :func:`summarize`."""
        return {spec.name: spec.averaging for spec in self.sets}

    @property
    def settings(self) -> dict:
        """The settings a report records."""
        names = ("metric", "threshold", "max_steps", "tolerance", "towers", "fronts", "signed_alignment")
        return {
            **{name: getattr(self, name) for name in (*names, "refine_rounds", "orders", "template_ensemble")},
            **{name: getattr(self, name) for name in ("full_probes", "warm_start")},
            "towers": list(self.towers),
        }

    @override
    def on_predict_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if getattr(module, "gradients", None) is None:
            raise RuntimeError("StepSearch runs after a GradientCollector; this module has no `gradients`.")
        # Lightning's convention: a fast_dev_run Trainer runs every stage briefly, so the search probes little too.
        self.smoke_run = bool(trainer.fast_dev_run)
        if self.smoke_run and self.max_steps > SMOKE_MAX_STEPS:
            rank_zero_info(
                f"[slug] smoke run (fast_dev_run): at most {SMOKE_MAX_STEPS} probes per layer, not "
                f"max_steps={self.max_steps}."
            )
        self.run(module.model, module.tokenizer, module.preprocess, module.gradients, module.device, trainer)

    def evaluator(self, model, tokenizer, preprocess, concepts, device="cpu", reuse=None) -> ZeroShotEvaluator:
        """A zero-shot evaluator of ``model`` on :attr:`sets` with this search's loader and cache settings."""
        datamodule = ZeroShotDataModule(self.sets, batch_size=self.batch_size, num_workers=self.num_workers)
        datamodule.transform = preprocess
        caches = {"cache_device": "cpu" if self.cache_on_cpu else None, "cache_dtype": CACHE_DTYPES[self.cache_dtype]}
        reuse = self.reuse if reuse is None else reuse
        return ZeroShotEvaluator(
            model, tokenizer, datamodule, concepts, device, reuse, per_template=self.template_ensemble, **caches
        )

    @torch.no_grad()
    def run(self, model, tokenizer, preprocess, store: GradientStore, device="cpu", trainer=None) -> SearchResult:
        """The whole search for every concept of ``store`` (METHOD §9); returns (and keeps) the result."""
        start = time.perf_counter()
        memory = PeakMemory().start()
        evaluator = self.evaluator(model, tokenizer, preprocess, store.concepts, device)
        forget_sets = forget_sets_of(store.concepts, evaluator.datasets, self.forget_set)
        class_names = {name: evaluator.class_names(name) for name in evaluator.datasets}
        summary = partial(summarize, class_names=class_names, forget=forget_sets, averaging=self.averaging)
        editor = ModelEditor(dict(model.named_parameters()), list(store.layers), evaluator.run, summary, device)
        stages = tower_stages(model)
        before = editor.evaluate()
        result = SearchResult(list(store.concepts), self.settings, before, before, forget_set_of=forget_sets)
        result.steps_per_layer, result.applied = self.steps_per_layer, self.apply
        result.set_sizes = {
            name: {"classes": len(d.class_names), "images": len(d)} for name, d in evaluator.datasets.items()
        }
        # Rows and columns of the similarity matrices: per set, its forget concepts and their look-alikes.
        panels = {}
        for set_name in dict.fromkeys(forget_sets.values()) if self.similarity_classes else ():
            concepts = [c for c, s in forget_sets.items() if s == set_name]
            rows = concepts + evaluator.nearest_classes(set_name, concepts, self.similarity_classes)
            panels[set_name] = (rows, concepts)
        similarity_before = {name: evaluator.similarity(name, rows) for name, (rows, _) in panels.items()}
        # A concept the model does not recognise to begin with (its forget accuracy already passes the forget test)
        # has nothing to forget: it is neither searched nor edited.
        result.nothing_to_forget = [
            c for c in store.concepts if is_forgotten(before["forget"][c][self.metric], self.threshold)
        ]
        for concept in result.nothing_to_forget:
            rank_zero_info(
                f"[slug] {concept}: nothing to forget, the model does not recognise it (forget {self.metric} "
                f"{before['forget'][concept][self.metric]:.3f} before); no edit."
            )
        store = replace(store, forget={c: g for c, g in store.forget.items() if c not in result.nothing_to_forget})
        for concept in store.concepts:
            stats = layer_statistics(editor.base, store.forget[concept], store.retain, signed=self.signed_alignment)
            result.layers[concept], front = stats, front_layers(stats, self.fronts, self.towers)
            if not front:
                raise UserError(f"No searchable Pareto layer for {concept!r} in towers {list(self.towers)}.")
            result.searched[concept] = in_forward_order(front, stages)
        rule = SearchRule(
            *(self.metric, self.threshold, self.steps_per_layer, self.tolerance, self.refine_rounds, self.orders),
            full_probes=self.full_probes,
            warm_start=self.warm_start,
        )
        search = self.joint_search(editor, result.searched, store.forget, rule, SearchProgress(trainer, self.metric))
        if store.concepts:
            outcome = search.run(store.concepts)
            result.chosen, result.after, result.visits = outcome.chosen, outcome.after, outcome.visits
            result.ends, result.kept_order = outcome.ends, outcome.kept_order
            if len(store.concepts) > 1:
                result.leave_one_out = search.leave_one_out()
        result.probes = search.probes
        result.base_weights = {edit.layer: editor.base[edit.layer] for edit in result.edits}
        result.test_classes = class_changes(editor.first_counts, editor.counts, class_names, forget_sets)
        result.similarity = {
            name: (rows, concepts, similarity_before[name], evaluator.similarity(name, rows))
            for name, (rows, concepts) in panels.items()
        }
        if not self.apply:
            editor.restore()
        result.seconds = time.perf_counter() - start
        result.memory = memory.stop()
        self.result = result
        return result
