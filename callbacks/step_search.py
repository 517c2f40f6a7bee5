"""``StepSearch``: the step-size search of SLUG (METHOD §4–§7) as a Lightning callback.

After a ``GradientCollector`` predict run has produced the gradients, this callback ranks the candidate
layers, takes the Pareto front of each tower, and for every front layer searches λ along the forget
gradient with zero-shot probes; then it picks the result (METHOD §7) and applies it to the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from typing_extensions import override

from slug_lightning.datamodules.labelled import LabelledSet, ZeroShotDataModule, check_set_names
from slug_lightning.errors import ConfigError, UserError
from slug_lightning.evaluation import ZeroShotEvaluator, class_changes, summarize
from slug_lightning.gradients import GradientStore
from slug_lightning.layers import LANGUAGE, VISION, LayerStats, layer_statistics, short_name
from slug_lightning.memory import PeakMemory
from slug_lightning.search import BinarySearch, Probe, choose, concept_orders, initial_step_size, is_forgotten
from slug_lightning.towers import TowerStages, tower_stages

CACHE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # None: the dtype the model computes in
# Probes per layer at most in a smoke run (a Trainer with fast_dev_run): enough to go through a search's both
# branches (a probe that forgets and one that does not), few enough to take seconds.
SMOKE_MAX_STEPS = 2


@dataclass
class OrderEnd:
    """Where the search of several concepts ended from one concept order (``StepSearch(orders=...)``).

    Args:
        order: The concepts in the order they were searched and revisited.
        chosen: Each concept's edit at the end.
        after: The evaluation summary of the model carrying those edits.
        visits: The refinement's ``(round, concept, summary)`` records (see ``StepSearch.visits``).
        probes: How many probes this order took.
    """

    order: list[str]
    chosen: dict[str, Probe]
    after: dict
    visits: list
    probes: int


class StepSearch(Callback):
    """Search a step size for every Pareto-front layer, probing zero-shot forget and test accuracy.

    Every probe edits one layer, θ_l = θ⁰_l + λ·G_f,l, evaluates every set, and restores θ⁰_l. The search
    decision uses accuracies reduced over all devices, so every rank takes the same path. Each probe is
    logged to the trainer's logger and kept in :attr:`probes`. The final evaluation, every edit applied, is
    :attr:`after`; with several concepts, :attr:`leave_one_out` maps each concept to the final evaluation without
    its edit (one more probe per concept), and with ``refine_rounds``, :attr:`visits` holds the model each visit left.
    With ``orders``, :attr:`ends` holds the end of every order and :attr:`kept_order` the index of the one kept.

    Args:
        sets: Labelled evaluation sets. The forget accuracy of a concept is measured on the images of its
            class in ``forget_set``; the test accuracy of each set on all its other images.
        forget_set: Name of the set that holds the concepts' images (default: the set whose class names
            contain the concept).
        metric: Forget accuracy that decides "forgotten": ``"top5"`` (the paper) or ``"top1"`` (use it with
            fewer than about 20 classes, where top-5 is nearly always right).
        threshold: A probe has forgotten when its forget accuracy is at most this.
        max_steps: Probes per layer at most. A Trainer with ``fast_dev_run`` (a smoke run) caps it at
            :data:`SMOKE_MAX_STEPS` (see :attr:`steps_per_layer`); every other setting is kept.
        tolerance: Stop a layer's search once (λ_high − λ_low)/λ_high is below this.
        towers: Which towers' front layers to search: ``"vision"``, ``"language"``.
        fronts: How many Pareto fronts of each tower to search: 1 (the default) is the front of METHOD §4; 2 adds
            the front of the layers left once the first is taken out, and so on (see
            :func:`~slug_lightning.layers.pareto_ranks`). Each front adds its layers' probes; in return the
            search sees layers that importance and alignment rank just behind the best, where a step can cost
            the test sets less.
        signed_alignment: Rank by signed cos(G_f, G_r) instead of its absolute value.
        batch_size: Evaluation batch size.
        num_workers: Evaluation data loader workers.
        apply: Leave the chosen edits applied to the model (otherwise restore θ⁰).
        reuse: Probes recompute only what the edit changes: the other tower's reference outputs are reused
            and the edited tower runs from the edited block on, over cached inputs of that block (see
            :class:`~slug_lightning.evaluation.ZeroShotEvaluator` for the cache sizes). False makes every
            probe a full evaluation; the results are the same up to float rounding.
        cache_dtype: Dtype of the probe caches: ``"float32"``, or ``"bfloat16"`` to halve their memory.
        cache_on_cpu: Keep the probe caches in CPU memory instead of on the accelerator.
        similarity_classes: How many look-alike classes (those whose names the model embeds closest to the
            forget concepts) join the concepts in the before/after image–text similarity matrix; 0 skips it.
        keep_forgotten: Several concepts: a probe of concept k counts as forgotten only if concepts 1..k−1 stay
            forgotten too (its forget accuracy is the largest of theirs and its own). Off (METHOD §9): the forget
            test of concept k checks k only, and a later edit may bring an earlier concept back.
        refine_rounds: Several concepts: after the search of METHOD §9, up to this many rounds that revisit each
            concept in order and search it again over the same layers (its ``fronts``), on the model carrying
            every other concept's edit (its chosen layer starts from the step it has). A probe there counts as
            forgotten only if the concept and every other concept forgotten at that moment stay forgotten; the
            rule of METHOD §7 picks among the round's probes, the current edit included, so an edit changes only
            for a better one: a concept a later edit brought back gets a larger step or another layer, and one
            the other edits already help a smaller step. Each concept keeps a single layer.
            Rounds stop early once one changes no layer and no step by more than ``tolerance``. 0 (the
            default) is METHOD §9 as written.
        untangle: Several concepts, with ``refine_rounds``: after a concept's visit, when other concepts stay
            forgotten only through its edit (they lean on it), also try freeing it: search it again keeping only
            the concepts that do not lean on it, then search each leaning concept brought back over its own
            layers, keeping the others forgotten. The move is kept if no concept forgotten before comes back and
            the utility (METHOD §7) is higher; otherwise every edit it touched is restored. It costs a front
            search per try and per leaning concept, and lets a round leave an edit that forgets several
            concepts at a high cost, which a visit that must keep them forgotten cannot.
        sequential: Several concepts: search each on the model carrying the edits chosen for the ones before it
            (METHOD §9). False searches every concept on θ⁰, as separate single-concept runs would, and applies
            all the edits together afterwards (a start for ``refine_rounds`` that no concept's order shapes).
        orders: Several concepts: from how many concept orders to run the whole search (METHOD §9, then the
            refinement rounds, which visit the concepts in the same order), each from θ⁰. 1 (the default) is the
            order given; 2 adds its reverse; more add the given order rotated by one place and its reverse, and so
            on (:func:`~slug_lightning.search.concept_orders`: two orders of two concepts, at most 2n of n ≥ 3).
            Where an edit lands depends on the edits searched before it, so the orders end apart; the end kept
            forgets the most concepts and, among those, has the highest utility (METHOD §7). Each order costs a
            whole search.

    Example::

        search = StepSearch(sets=[LabelledSet("identities", root="eval/identities")], metric="top1")
        trainer = L.Trainer(inference_mode=False, callbacks=[search])
        trainer.predict(GradientCollector("ViT-B-32", "laion400m_e32"), datamodule=laion)
        print(search.chosen)
    """

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
        keep_forgotten: bool = False,
        refine_rounds: int = 0,
        untangle: bool = False,
        sequential: bool = True,
        orders: int = 1,
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
            raise ConfigError(f"towers must be a non-empty subset of ['vision', 'language'], got {list(towers)}.",
                              "towers", towers)
        if not (isinstance(fronts, int) and not isinstance(fronts, bool) and fronts >= 1):
            raise ConfigError(f"fronts must be an integer >= 1, got {fronts!r}.", "fronts", fronts)
        names = [s.name for s in sets]
        if forget_set is not None and forget_set not in names:
            raise ConfigError(f"forget_set {forget_set!r} is not one of the sets {names}.", "forget_set", forget_set)
        try:  # validates max_steps and tolerance now, not after hours
            BinarySearch(1.0, max_steps, tolerance)
        except ValueError as error:
            option, value = ("max_steps", max_steps) if "max_steps" in str(error) else ("tolerance", tolerance)
            raise ConfigError(str(error), option, value) from error
        if cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache_dtype must be one of {list(CACHE_DTYPES)}, got {cache_dtype!r}.", "cache_dtype",
                              cache_dtype)
        if batch_size < 1:  # the evaluation loaders are built after the gradient pass: refuse it now
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.", "batch_size", batch_size)
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}.", "num_workers", num_workers)
        self.sets = list(sets)
        self.forget_set = forget_set
        self.metric, self.threshold = metric, threshold
        self.max_steps, self.tolerance = max_steps, tolerance
        self.towers = tuple(towers)
        self.fronts = fronts
        self.signed_alignment = signed_alignment
        self.batch_size, self.num_workers = batch_size, num_workers
        self.apply = apply
        self.reuse, self.cache_dtype, self.cache_on_cpu = reuse, cache_dtype, cache_on_cpu
        if similarity_classes < 0:
            raise ConfigError(f"similarity_classes must be >= 0, got {similarity_classes}.", "similarity_classes",
                              similarity_classes)
        self.similarity_classes = similarity_classes
        self.keep_forgotten = keep_forgotten
        if not (isinstance(refine_rounds, int) and not isinstance(refine_rounds, bool) and refine_rounds >= 0):
            raise ConfigError(f"refine_rounds must be an integer >= 0, got {refine_rounds!r}.", "refine_rounds",
                              refine_rounds)
        self.refine_rounds = refine_rounds
        if untangle and not refine_rounds:
            raise ConfigError("untangle works in the refinement rounds; set refine_rounds >= 1 with it.", "untangle",
                              untangle)
        self.untangle = untangle
        if keep_forgotten and not sequential:
            raise ConfigError("keep_forgotten needs sequential: without it every concept is searched on θ⁰, "
                              "where the other concepts are not forgotten to keep.", "keep_forgotten", keep_forgotten)
        self.sequential = sequential
        if not (isinstance(orders, int) and not isinstance(orders, bool) and orders >= 1):
            raise ConfigError(f"orders must be an integer >= 1, got {orders!r}.", "orders", orders)
        self.orders = orders
        self.forget_set_of: dict[str, str] = {}
        self.similarity: dict[str, tuple] = {}
        self.set_sizes: dict[str, dict[str, int]] = {}
        self.layers: dict[str, list[LayerStats]] = {}
        self.searched: dict[str, list[LayerStats]] = {}  # the layers searched for each concept
        self.probes: list[Probe] = []
        self.chosen: dict[str, Probe] = {}
        self.before: dict = {}
        self.after: dict = {}
        self.test_classes: dict[str, list[dict]] = {}  # each test class's top-1 before and after, largest fall first
        self.leave_one_out: dict[str, dict] = {}  # several concepts: the final model without each one's edit
        self.nothing_to_forget: list[str] = []  # concepts the model did not recognise before: no search, no edit
        # The refinement: (round, concept, summary) of the model each visit left, after (0, None, its start).
        self.visits: list[tuple[int, str | None, dict]] = []
        self.ends: list[OrderEnd] = []  # the end of each concept order searched, the given one first
        self.kept_order = 0  # the index in ends of the order whose edits the run keeps
        self._order = 0  # the index of the order being searched, recorded in its probes
        self.smoke_run = False  # set from the Trainer's fast_dev_run when the search starts
        self.seconds = 0.0
        self.memory = PeakMemory()

    @property
    def steps_per_layer(self) -> int:
        """The most probes one layer's search takes: ``max_steps``, at most :data:`SMOKE_MAX_STEPS` in a smoke run."""
        return min(self.max_steps, SMOKE_MAX_STEPS) if self.smoke_run else self.max_steps

    @property
    def averaging(self) -> dict[str, str]:
        """Each set's test-accuracy averaging (``LabelledSet.averaging``), for :func:`summarize`."""
        return {spec.name: spec.averaging for spec in self.sets}

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "gradients", None) is None:
            raise RuntimeError("StepSearch runs after a GradientCollector; this module has no `gradients`.")
        # Lightning's convention: a fast_dev_run Trainer runs every stage briefly, so the search probes little too.
        self.smoke_run = bool(trainer.fast_dev_run)
        if self.smoke_run and self.max_steps > SMOKE_MAX_STEPS:
            rank_zero_info(f"[slug] smoke run (fast_dev_run): at most {SMOKE_MAX_STEPS} probes per layer, not "
                           f"max_steps={self.max_steps}.")
        self.run(pl_module.model, pl_module.tokenizer, pl_module.preprocess, pl_module.gradients,
                 device=pl_module.device, trainer=trainer)

    def forget_sets(self, concepts: Sequence[str], evaluator: ZeroShotEvaluator) -> dict[str, str]:
        """Which set measures each concept's forget accuracy; a clear error for a concept no set knows."""
        result = {}
        for concept in concepts:
            candidates = [self.forget_set] if self.forget_set else list(evaluator.datasets)
            holders = [name for name in candidates if concept in evaluator.class_names(name)]
            if not holders:
                import difflib

                known = [c for name in candidates for c in evaluator.class_names(name)]
                close = difflib.get_close_matches(concept, known, n=3)
                raise UserError(
                    f"Forget concept {concept!r} is not a class name of the evaluation set(s) {candidates}"
                    + (f"; close matches: {close}." if close else ".")
                )
            dataset = evaluator.datasets[holders[0]]
            if dataset.class_index(concept) not in set(dataset.targets):
                raise UserError(f"Forget concept {concept!r} has no images in evaluation set {holders[0]!r}, so "
                                "its forget accuracy cannot be measured.")
            result[concept] = holders[0]
        return result

    @torch.no_grad()
    def run(self, model, tokenizer, preprocess, store: GradientStore, device: torch.device | str = "cpu",
            trainer: L.Trainer | None = None) -> dict[str, Probe]:
        """The whole search for every concept of ``store``, in order (METHOD §9); returns the chosen probes.

        Concept k is searched on the model that already carries the edits chosen for concepts 1..k−1 (on θ⁰
        without ``sequential``); then come the ``refine_rounds``. With ``orders``, all of it again from θ⁰ for each
        further order, and the best end is kept.
        """
        start = time.perf_counter()
        self.memory.start()
        datamodule = ZeroShotDataModule(self.sets, batch_size=self.batch_size, num_workers=self.num_workers)
        datamodule.transform = preprocess
        evaluator = ZeroShotEvaluator(model, tokenizer, datamodule, keep_classes=store.concepts, device=device,
                                      reuse=self.reuse, cache_device="cpu" if self.cache_on_cpu else None,
                                      cache_dtype=CACHE_DTYPES[self.cache_dtype])
        forget_sets = self.forget_sets(store.concepts, evaluator)
        class_names = {name: evaluator.class_names(name) for name in evaluator.datasets}
        self.set_sizes = {name: {"classes": len(dataset.class_names), "images": len(dataset)}
                          for name, dataset in evaluator.datasets.items()}
        parameters = dict(model.named_parameters())
        base = {name: parameters[name].detach().clone() for name in store.layers}
        stages = tower_stages(model)
        before_counts = evaluator.run()
        self.before = summarize(before_counts, class_names, forget_sets, self.averaging)
        self.forget_set_of = forget_sets
        # Rows and columns of the similarity matrices: per set, its forget concepts and their look-alikes.
        panels = {}
        for set_name in dict.fromkeys(forget_sets.values()) if self.similarity_classes else ():
            concepts = [c for c, s in forget_sets.items() if s == set_name]
            panels[set_name] = (concepts + evaluator.nearest_classes(set_name, concepts, self.similarity_classes),
                                concepts)
        before = {set_name: evaluator.similarity(set_name, names) for set_name, (names, _) in panels.items()}
        rank_zero = trainer is None or trainer.is_global_zero
        show_progress = rank_zero and (trainer is None or trainer.progress_bar_callback is not None)
        # A concept the model does not recognise to begin with (its forget accuracy already passes the forget test)
        # has nothing to forget: it is neither searched nor edited.
        self.nothing_to_forget = [c for c in store.concepts
                                  if is_forgotten(self.before["forget"][c][self.metric], self.threshold)]
        for concept in self.nothing_to_forget:
            rank_zero_info(f"[slug] {concept}: nothing to forget, the model does not recognise it (forget {self.metric} "
                           f"{self.before['forget'][concept][self.metric]:.3f} before); no edit.")
        store = replace(store, forget={c: g for c, g in store.forget.items() if c not in self.nothing_to_forget})
        for concept in store.concepts:
            stats = layer_statistics(base, store.forget[concept], store.retain, signed=self.signed_alignment)
            self.layers[concept] = stats
            # A layer without forget gradient (or without weight) has no direction to step along.
            front = [s for s in stats if s.front <= self.fronts and s.tower in self.towers
                     and s.grad_norm > 0 and s.weight_norm > 0]
            self.searched[concept] = in_forward_order(front, stages)
            if not front:
                raise UserError(f"No searchable Pareto layer for {concept!r} in towers {list(self.towers)}.")
        counts = self._search_orders(evaluator, parameters, base, store, class_names, forget_sets, trainer,
                                     show_progress, device) if store.concepts else before_counts
        self.after = summarize(counts, class_names, forget_sets, self.averaging)
        self.test_classes = class_changes(before_counts, counts, class_names, forget_sets)
        if len(store.concepts) > 1:
            self.leave_one_out = self._leave_one_out(evaluator, parameters, store, class_names, forget_sets, device)
        self.similarity = {set_name: (names, concepts, before[set_name], evaluator.similarity(set_name, names))
                           for set_name, (names, concepts) in panels.items()}
        if not self.apply:
            _load(parameters, base)
        self.seconds = time.perf_counter() - start
        self.memory.stop()
        return self.chosen

    def _search_orders(self, evaluator, parameters, base: dict[str, torch.Tensor], store: GradientStore, class_names,
                       forget_sets, trainer, show_progress: bool, device) -> dict:
        """The search from each concept order of ``orders`` (:meth:`_search_order`), each from θ⁰ (``base``);
        records their ends in :attr:`ends`, leaves the model carrying the kept end's edits and returns its counts."""
        orders = concept_orders(store.concepts, self.orders)
        if len(orders) < self.orders:
            rank_zero_info(f"[slug] {len(store.concepts)} concept(s) have {len(orders)} order(s); searching those, "
                           f"not {self.orders}.")
        self.ends = []
        for index, order in enumerate(orders):
            self._order = index
            if index:  # every order starts from θ⁰
                _load(parameters, base)
                evaluator.run()
            if len(orders) > 1:
                rank_zero_info(f"[slug] order {index + 1}/{len(orders)}: {', '.join(order)}")
            first = len(self.probes)
            self.chosen, self.visits = {}, []
            # The store with its concepts in this order: the search and the refinement go through them in it.
            ordered = replace(store, forget={concept: store.forget[concept] for concept in order})
            counts = self._search_order(evaluator, parameters, ordered, class_names, forget_sets, trainer,
                                        show_progress, device)
            self.ends.append(OrderEnd(order, dict(self.chosen),
                                      summarize(counts, class_names, forget_sets, self.averaging),
                                      self.visits, len(self.probes) - first))
        self.kept_order = self._kept_end()
        kept = self.ends[self.kept_order]
        self.chosen = {concept: kept.chosen[concept] for concept in store.concepts}
        self.visits = kept.visits
        if self.kept_order != len(self.ends) - 1:  # the model carries the last order's edits: back to the kept ones
            _load(parameters, base)
            for concept, chosen in self.chosen.items():
                self._shift(parameters, store, concept, chosen, device)
            counts = evaluator.run()
        if len(orders) > 1:
            rank_zero_info(f"[slug] kept order {self.kept_order + 1}: {', '.join(kept.order)}")
        return counts

    def _search_order(self, evaluator, parameters, store: GradientStore, class_names, forget_sets, trainer,
                      show_progress: bool, device) -> dict:
        """The search of METHOD §9 through ``store``'s concepts in their order, on the current reference model
        (θ⁰), then the ``refine_rounds``; returns the counts of the model it leaves, which carries the edits of
        :attr:`chosen`."""
        for concept in store.concepts:
            front = self.searched[concept]
            # The total is an upper bound: a layer's search may stop early once its bracket is tight.
            progress = tqdm(total=len(front) * self.steps_per_layer, disable=not show_progress, leave=False,
                            unit="probe", dynamic_ncols=True)
            probes = self._search_front(evaluator, parameters, store, concept, class_names, forget_sets, trainer,
                                        progress, device, self._kept(concept))
            progress.close()
            self.chosen[concept] = chosen = choose(probes, self.metric)
            if self.sequential:
                # Later concepts are searched on the model that carries this edit (METHOD §9).
                self._shift(parameters, store, concept, chosen, device)
                # The edited model is the reference for the next concept; after the last one, the final result.
                counts = evaluator.run()
            rank_zero_info(f"[slug] {concept}: layer {chosen.layer}, λ={chosen.step_size:.4g}, "
                           f"forget {self.metric} {chosen.forget_accuracy(self.metric):.3f}, "
                           f"utility {chosen.utility:.3f}")
        if not self.sequential:  # every concept was searched on θ⁰, as in separate runs; now all edits together
            for concept, chosen in self.chosen.items():
                self._shift(parameters, store, concept, chosen, device)
            counts = evaluator.run()
        if len(store.concepts) > 1:
            counts = self._refine(evaluator, parameters, store, class_names, forget_sets, counts, trainer,
                                  show_progress, device)
        return counts

    def _kept_end(self) -> int:
        """The index of the end the run keeps among :attr:`ends`: the most concepts forgotten, then the highest
        utility, then the first."""
        def rank(index: int) -> tuple[int, float]:
            after = self.ends[index].after
            utility = _utility(after)
            return len(self._forgotten(after)), -math.inf if math.isnan(utility) else utility
        return max(range(len(self.ends)), key=rank)  # max() keeps the first of equal keys

    def _kept(self, concept: str) -> list[str]:
        """The concepts a probe of ``concept`` must keep forgotten in the search of METHOD §9: those chosen
        before it with ``keep_forgotten``, none without."""
        return [c for c in self.chosen if c != concept] if self.keep_forgotten else []

    def _refine(self, evaluator, parameters, store: GradientStore, class_names, forget_sets, counts, trainer,
                show_progress: bool, device) -> dict:
        """The refinement rounds of several concepts (see ``refine_rounds``); returns the final counts. The model
        they start from and the one each visit leaves (untangle included) go to :attr:`visits`."""
        self.visits = [(0, None, summarize(counts, class_names, forget_sets, self.averaging))]
        for round_ in range(1, self.refine_rounds + 1):
            changed = []
            progress = tqdm(total=sum(len(f) for f in self.searched.values()) * self.steps_per_layer, leave=False,
                            disable=not show_progress, unit="probe", dynamic_ncols=True)
            for concept in store.concepts:
                current, visited = self.chosen[concept], dict(self.chosen)
                forgotten = self._forgotten(self.visits[-1][2])  # the model as the last visit left it
                kept = [c for c in store.concepts if c != concept and c in forgotten]
                chosen = self._search_again(evaluator, parameters, store, concept, class_names, forget_sets,
                                            trainer, progress, device, kept, round_)
                self._shift(parameters, store, concept, chosen, device)
                counts = evaluator.run()
                if (chosen.layer, chosen.step_size) != (current.layer, current.step_size):
                    self.chosen[concept] = chosen  # (an unchanged edit keeps the probe, and round, it came from)
                if self.untangle:
                    counts = self._untangle(evaluator, parameters, store, concept, class_names, forget_sets, counts,
                                            trainer, progress, device, round_)
                    chosen = self.chosen[concept]
                self.visits.append((round_, concept, summarize(counts, class_names, forget_sets, self.averaging)))
                # A step that moved within the search's tolerance is kept but does not call for another round.
                changed += [c for c, edit in self.chosen.items() if edit.layer != visited[c].layer or
                            abs(edit.step_size - visited[c].step_size) > self.tolerance * visited[c].step_size]
                rank_zero_info(f"[slug] refine {round_}: {concept}: {short_name(current.layer)} "
                               f"λ={current.step_size:.4g} → {short_name(chosen.layer)} λ={chosen.step_size:.4g}, "
                               f"forget {self.metric} (keeping {len(kept)} other(s) forgotten) "
                               f"{chosen.forget_accuracy(self.metric):.3f}, utility {chosen.utility:.3f}")
            progress.close()
            if not changed:
                break
        return counts

    def _search_again(self, evaluator, parameters, store: GradientStore, concept: str, class_names, forget_sets,
                      trainer, progress, device, kept: Sequence[str], round_: int) -> Probe:
        """Search ``concept`` again over its layers, on the model carrying every other concept's edit, keeping
        ``kept`` forgotten; returns the chosen probe and leaves the model without ``concept``'s edit. The current
        edit is the first probe of its layer, so it stays unless a probe beats it."""
        current = self.chosen[concept]
        self._shift(parameters, store, concept, current, device, sign=-1.0)
        evaluator.run()  # the model with every other concept's edit is the reference of these probes
        return choose(self._search_front(evaluator, parameters, store, concept, class_names, forget_sets, trainer,
                                         progress, device, kept, round_, current), self.metric)

    def _untangle(self, evaluator, parameters, store: GradientStore, concept: str, class_names, forget_sets,
                  counts, trainer, progress, device, round_: int) -> dict:
        """Try freeing ``concept``'s edit from the concepts that lean on it (see ``untangle``); returns the counts
        of the model it leaves, which carries either the freed edits or the ones it started from."""
        start = dict(self.chosen)
        summary = summarize(counts, class_names, forget_sets, self.averaging)
        forgotten = self._forgotten(summary)
        without = self._forgotten(self._without(evaluator, parameters, store, concept, class_names, forget_sets,
                                                device))
        leaning = [c for c in store.concepts if c != concept and c in forgotten and c not in without]
        if not leaning:
            return counts
        free = self._search_again(evaluator, parameters, store, concept, class_names, forget_sets, trainer, progress,
                                  device, [c for c in forgotten if c != concept and c not in leaning], round_)
        # A freed edit no better than the current one, before the leaning concepts pay to be forgotten again, cannot
        # end better.
        moved = [concept] if free.utility > _utility(summary) and \
            (free.layer, free.step_size) != (start[concept].layer, start[concept].step_size) else []
        if moved:
            self.chosen[concept] = free
        self._shift(parameters, store, concept, self.chosen[concept], device)
        counts = evaluator.run()
        for other in leaning if moved else ():
            now = self._forgotten(summarize(counts, class_names, forget_sets, self.averaging))
            if other in now:
                continue
            self.chosen[other] = self._search_again(evaluator, parameters, store, other, class_names, forget_sets,
                                                    trainer, progress, device, [c for c in now if c != other], round_)
            moved.append(other)
            self._shift(parameters, store, other, self.chosen[other], device)
            counts = evaluator.run()
        if not moved:
            return counts
        after = summarize(counts, class_names, forget_sets, self.averaging)
        better = forgotten <= self._forgotten(after) and _utility(after) > _utility(summary)
        rank_zero_info(f"[slug] untangle {round_}: {concept} freed from {', '.join(leaning)}: utility "
                       f"{_utility(summary):.3f} → {_utility(after):.3f}, "
                       + ("kept" if better else "restored (a concept came back or the utility fell)"))
        if better:
            return counts
        for name in moved:  # back to the edits the move started from
            self._shift(parameters, store, name, self.chosen[name], device, sign=-1.0)
            self._shift(parameters, store, name, start[name], device)
            self.chosen[name] = start[name]
        return evaluator.run()

    def _forgotten(self, summary: dict) -> set[str]:
        """The concepts the summary's forget accuracies count as forgotten."""
        return {c for c, accuracy in summary["forget"].items() if is_forgotten(accuracy[self.metric], self.threshold)}

    def _without(self, evaluator, parameters, store: GradientStore, concept: str, class_names, forget_sets,
                 device) -> dict:
        """The summary of the evaluator's reference model (every edit applied) with ``concept``'s edit taken out,
        evaluated as a probe: only the edited layer's stages run again, and the edit is put back."""
        edit = self.chosen[concept]
        parameter = parameters[edit.layer]
        original = parameter.detach().clone()
        self._shift(parameters, store, concept, edit, device, sign=-1.0)
        try:
            return summarize(evaluator.run(edited=edit.layer), class_names, forget_sets, self.averaging)
        finally:
            parameter.copy_(original)

    def _leave_one_out(self, evaluator, parameters, store: GradientStore, class_names, forget_sets,
                       device) -> dict[str, dict]:
        """Several concepts: the final model without each concept's edit in turn (:meth:`_without`): what removing
        its delta gives back, and which other concepts lean on it."""
        return {concept: self._without(evaluator, parameters, store, concept, class_names, forget_sets, device)
                for concept in self.chosen}

    def _search_front(self, evaluator, parameters, store: GradientStore, concept: str, class_names, forget_sets,
                      trainer, progress, device, kept: Sequence[str] = (), round_: int = 0,
                      start: Probe | None = None) -> list[Probe]:
        """Search λ on every front layer of ``concept`` (METHOD §6), on the current reference model; returns the
        probes. Each layer starts at ``initial_step_size``, except the layer of ``start``, which starts at its λ."""
        front = self.searched[concept]
        stage = "search" if not round_ else f"refine {round_}/{self.refine_rounds}"
        if self.orders > 1:
            stage = f"order {self._order + 1} · {stage}"
        probes = []
        for index, layer in enumerate(front, start=1):
            gradient = store.forget[concept][layer.name].to(device)
            initial = start.step_size if start is not None and start.layer == layer.name else \
                initial_step_size(layer.weight_norm, layer.grad_norm)
            search = BinarySearch(initial, self.steps_per_layer, self.tolerance)
            while not search.done:
                progress.set_description(f"{stage} {concept} · layer {index}/{len(front)} {short_name(layer.name)}"
                                         f" · probe {search.steps + 1}/{self.steps_per_layer}")
                probe = self._probe(evaluator, parameters[layer.name], gradient, layer, concept, search.step_size,
                                    class_names, forget_sets, trainer, kept, round_)
                probes.append(probe)
                search.update(is_forgotten(probe.forget_accuracy(self.metric), self.threshold))
                progress.update(1)
                progress.set_postfix({"λ": f"{probe.step_size:.3g}",
                                      f"forget {self.metric}": f"{probe.forget_accuracy(self.metric):.2f}"})
        return probes

    @staticmethod
    def _shift(parameters, store: GradientStore, concept: str, edit: Probe, device, sign: float = 1.0) -> None:
        """Add (``sign`` 1) or take out (-1) the edit of ``concept`` that ``edit`` chose: λ·G_f on its layer."""
        parameters[edit.layer].add_(sign * edit.step_size * store.forget[concept][edit.layer].to(device))

    def _probe(self, evaluator, parameter, gradient, layer: LayerStats, concept, step_size, class_names,
               forget_sets, trainer, kept: Sequence[str] = (), round_: int = 0) -> Probe:
        start = time.perf_counter()
        original = parameter.detach().clone()
        parameter.add_(step_size * gradient)
        try:
            counts = evaluator.run(edited=layer.name)
        finally:
            parameter.copy_(original)
        # Test accuracy excludes the images of every concept of the run; the forget side is this concept's.
        summary = summarize(counts, class_names, forget_sets, self.averaging)
        forget = summary["forget"][concept]
        if kept:  # other concepts that must stay forgotten: the probe is only as forgotten as the worst of them
            worst = [summary["forget"][c] for c in kept] + [forget]
            forget = {k: max(f[k] for f in worst) for k in ("top1", "top5")}
        probe = Probe(
            concept=concept,
            layer=layer.name,
            step=sum(1 for p in self.probes
                     if (p.concept, p.layer, p.round, p.order) == (concept, layer.name, round_, self._order)),
            step_size=float(step_size),
            relative_change=float(step_size * layer.grad_norm / layer.weight_norm),
            forget_top1=forget["top1"],
            forget_top5=forget["top5"],
            # A set whose only images are forget concepts has no test accuracy.
            test_top1={name: value["top1"] for name, value in summary["test"].items() if value["count"]},
            test_top5={name: value["top5"] for name, value in summary["test"].items() if value["count"]},
            seconds=time.perf_counter() - start,
            round=round_,
            order=self._order,
        )
        self.probes.append(probe)
        if trainer is not None and trainer.logger is not None:
            metrics = {"search/step_size": probe.step_size, "search/forget_top1": probe.forget_top1,
                       "search/forget_top5": probe.forget_top5}
            metrics.update({f"search/test_top1/{name}": value for name, value in probe.test_top1.items()})
            trainer.logger.log_metrics(metrics, step=len(self.probes) - 1)
        return probe

    @override
    def state_dict(self) -> dict:
        return {"probes": [asdict(p) for p in self.probes], "chosen": {c: asdict(p) for c, p in self.chosen.items()},
                "visits": self.visits, "ends": [asdict(end) for end in self.ends], "kept_order": self.kept_order}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.probes = [Probe(**p) for p in state_dict["probes"]]
        self.chosen = {c: Probe(**p) for c, p in state_dict["chosen"].items()}
        self.visits = list(state_dict.get("visits", []))
        self.ends = [OrderEnd(**{**end, "chosen": {c: Probe(**p) for c, p in end["chosen"].items()}})
                     for end in state_dict.get("ends", [])]
        self.kept_order = state_dict.get("kept_order", 0)


def _load(parameters: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the parameters of the same names (θ⁰ back into the edited layers)."""
    for name, weight in weights.items():
        parameters[name].copy_(weight)


def _utility(summary: dict) -> float:
    """The utility of METHOD §7 (mean test top-1 over the sets that have test images) of a summary."""
    tests = [value["top1"] for value in summary["test"].values() if value["count"]]
    return sum(tests) / len(tests) if tests else float("nan")


def in_forward_order(layers: list[LayerStats], stages: dict[str, TowerStages]) -> list[LayerStats]:
    """The vision tower's layers, then the language tower's, each in the order the forward pass meets them.

    Probes then move each tower's cache forward only (parameter order puts ``visual.proj`` before
    ``visual.conv1``). Layers of a tower that is not staged keep their parameter order.
    """
    def depth(layer: LayerStats) -> tuple[bool, int]:
        tower = stages.get(layer.tower)
        return layer.tower != VISION, tower.stage_of(layer.name) if tower is not None else 0
    return sorted(layers, key=depth)
