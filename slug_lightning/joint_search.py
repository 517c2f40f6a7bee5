"""The search of one or several concepts (METHOD §6–§9), through an :class:`Editor`.

:class:`JointSearch` decides which edits to probe and keep; an :class:`Editor` applies them and evaluates the
model. A lasting change and the evaluation that makes it the probes' reference are one editor call, so they cannot
drift apart. The search of each layer is :class:`~slug_lightning.search.BinarySearch`, the choice among probes
:func:`~slug_lightning.search.choose` (METHOD §7).

For several concepts (METHOD §9), each concept is searched on the model carrying the edits chosen before it; then
up to ``refine_rounds`` rounds visit each concept again on the model carrying every other edit, keeping the
concepts forgotten at that moment forgotten, and try freeing an edit that other concepts lean on (the untangle move,
docs/multi_concept.md). With ``orders`` > 1 all of it runs again from θ⁰ for further concept orders and the best end
is kept. :class:`~slug_lightning.callbacks.StepSearch` runs this after the gradient pass; tests drive it through a
scripted editor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from torch import Tensor

from slug_lightning.layers import LayerStats, short_name
from slug_lightning.results import OrderEnd, Summary, Visit, utility
from slug_lightning.search import (
    BinarySearch,
    Probe,
    choose,
    concept_orders,
    initial_step_size,
    is_forgotten,
    untested,
)

Change = tuple[str, float, Tensor]  # (layer, λ, direction): θ_layer ← θ_layer + λ·direction


class Editor(Protocol):
    """What the search needs of a model (:class:`~slug_lightning.editor.ModelEditor` is the real one)."""

    def evaluate(self) -> Summary:
        """Evaluate the model as it is; it becomes the reference of the next probes."""

    def probe(
        self, layer: str, step_size: float, direction: Tensor, needs_tests: Callable[[Summary], bool] | None = None
    ) -> Summary:
        """Evaluate the model with ``θ_layer + λ·direction`` and leave the layer exactly as it was. With
        ``needs_tests``, an editor may evaluate the forget images first, ask it with their accuracies (``test``
        empty) and, when it returns False, skip the test sets (the returned ``test`` is empty)."""

    def shift(self, changes: Sequence[Change]) -> Summary:
        """Add each change in order, then :meth:`evaluate`."""

    def reset(self, changes: Sequence[Change] = ()) -> Summary:
        """Back to θ⁰, then :meth:`shift` by ``changes``."""


class Listener:
    """Progress and logging hooks of a search; every one does nothing here."""

    def begin(self, total: int) -> None:
        """A search of at most ``total`` probes starts."""

    def probing(self, description: str) -> None:
        """The next probe is about to run."""

    def probed(self, probe: Probe) -> None:
        """A probe ended."""

    def searched(self, description: str, probes: Sequence[Probe], forgetting: Probe | None) -> None:
        """The search of one layer ended: its ``probes`` in order, and the one at the smallest λ that forgot (None
        if none did)."""

    def end(self) -> None:
        """The search begun last ended."""

    def info(self, message: str) -> None:
        """A line worth showing the user."""


@dataclass(frozen=True)
class SearchRule:
    """The settings of the search that shape its choices.

    Args:
        metric: The forget accuracy that decides "forgotten": ``"top1"`` or ``"top5"``.
        threshold: A probe has forgotten when its forget accuracy is at most this.
        steps_per_layer: The most probes of one layer's search.
        tolerance: A layer's search stops once its bracket is this tight (relative), and a refinement round that
            moves no step by more than this ends the rounds.
        refine_rounds: Several concepts: the most refinement rounds after the search of METHOD §9.
        orders: Several concepts: from how many concept orders to search (:func:`concept_orders`).
        full_probes: Evaluate the test sets in every probe. False (forget first): a probe whose forget images fail
            the forget test skips them; the choice is the same, since :func:`~slug_lightning.search.choose` reads
            such a probe's utility only when no probe forgot, and then the probes it needs are tested again in full.
        warm_start: Start each layer's search one doubling below the earliest doubling of its first λ at which a
            layer searched before it in the same tower first forgot (:class:`~slug_lightning.search.BinarySearch`'s
            ``skip``; each layer's first λ moves it by 10 %, so doublings compare across layers). Fewer probes; the
            choice is the same wherever forget accuracy is monotone on the skipped doublings. Only in searches that
            keep no other concept forgotten (not in the refinement rounds' searches that do).
    """

    metric: str = "top5"
    threshold: float = 0.0
    steps_per_layer: int = 10
    tolerance: float = 0.05
    refine_rounds: int = 0
    orders: int = 1
    full_probes: bool = False
    warm_start: bool = False


def forgotten(summary: Summary, rule: SearchRule) -> set[str]:
    """The concepts whose forget accuracy in ``summary`` passes the forget test."""
    return {c for c, accuracy in summary["forget"].items() if is_forgotten(accuracy[rule.metric], rule.threshold)}


def kept_end(ends: Sequence[OrderEnd], rule: SearchRule) -> int:
    """The index of the end a run keeps: the most concepts forgotten, then the highest utility, then the first."""

    def rank(index: int) -> tuple[int, float]:
        value = utility(ends[index].after)
        return len(forgotten(ends[index].after, rule)), -math.inf if math.isnan(value) else value

    return max(range(len(ends)), key=rank)  # max() keeps the first of equal keys


@dataclass
class Outcome:
    """Where a :meth:`JointSearch.run` ended: the kept edits (in the order given), the evaluation of the model
    carrying them, and the visits and ends of every order."""

    chosen: dict[str, Probe]
    after: Summary
    visits: list[Visit]
    ends: list[OrderEnd]
    kept_order: int


class JointSearch:
    """The search of every concept over its front layers.

    Args:
        editor: Edits and evaluates the model; it must carry θ⁰ (or, for :meth:`refine`, the edits given).
        fronts: The layers to search for each concept, in the order to search them.
        gradients: Each concept's forget gradient G_f of each of its front layers.
        rule: The settings that shape the choices.
        listener: Progress and logging.

    Attributes:
        probes: Every probe taken, in order.
    """

    def __init__(
        self,
        editor: Editor,
        fronts: Mapping[str, Sequence[LayerStats]],
        gradients: Mapping[str, Mapping[str, Tensor]],
        rule: SearchRule,
        listener: Listener | None = None,
    ) -> None:
        self.editor, self.fronts, self.gradients, self.rule = editor, fronts, gradients, rule
        self.listener = listener or Listener()
        self.probes: list[Probe] = []
        self.chosen: dict[str, Probe] = {}
        self.visits: list[Visit] = []
        self._order = 0

    def run(self, concepts: Sequence[str]) -> Outcome:
        """Search ``concepts`` from each concept order, each from θ⁰; the editor is left carrying the kept edits."""
        orders = concept_orders(list(concepts), self.rule.orders)
        if len(orders) < self.rule.orders:
            self.listener.info(
                f"{len(concepts)} concept(s) have {len(orders)} order(s); searching those, not {self.rule.orders}."
            )
        ends = []
        for index, order in enumerate(orders):
            self._order = index
            if index:  # every order starts from θ⁰
                self.editor.reset()
            if len(orders) > 1:
                self.listener.info(f"order {index + 1}/{len(orders)}: {', '.join(order)}")
            first = len(self.probes)
            self.chosen, self.visits = {}, []
            after = self._search_order(order)
            ends.append(OrderEnd(order, dict(self.chosen), after, self.visits, len(self.probes) - first))
        kept = kept_end(ends, self.rule)
        self.chosen = {concept: ends[kept].chosen[concept] for concept in concepts}
        self.visits = ends[kept].visits
        after = ends[kept].after
        if kept != len(ends) - 1:  # the model carries the last order's edits: back to the kept ones
            after = self.editor.reset([self._change(c, edit) for c, edit in self.chosen.items()])
        if len(orders) > 1:
            self.listener.info(f"kept order {kept + 1}: {', '.join(ends[kept].order)}")
        return Outcome(self.chosen, after, self.visits, ends, kept)

    def refine(self, chosen: Mapping[str, Probe], start: Summary) -> Summary:
        """The refinement rounds from ``chosen``, the edits the editor's model carries (``start``: its evaluation);
        returns the evaluation of the model they leave. The visits go to :attr:`visits`, the edits to
        :attr:`chosen`."""
        self.chosen = dict(chosen)
        concepts = list(chosen)
        self.visits = [Visit(0, None, start)]
        summary = start
        for round_ in range(1, self.rule.refine_rounds + 1):
            changed = []
            self.listener.begin(sum(len(self.fronts[c]) for c in concepts) * self.rule.steps_per_layer)
            for concept in concepts:
                current, visited = self.chosen[concept], dict(self.chosen)
                now = forgotten(self.visits[-1].summary, self.rule)  # the model as the last visit left it
                kept = [c for c in concepts if c != concept and c in now]
                edit = self._search_again(concept, kept, round_)
                summary = self.editor.shift([self._change(concept, edit)])
                if (edit.layer, edit.step_size) != (current.layer, current.step_size):
                    self.chosen[concept] = edit  # (an unchanged edit keeps the probe, and round, it came from)
                summary = self._untangle(concept, summary, concepts, round_)
                edit = self.chosen[concept]
                self.visits.append(Visit(round_, concept, summary))
                # A step that moved within the search's tolerance is kept but does not call for another round.
                changed += [
                    c
                    for c, e in self.chosen.items()
                    if e.layer != visited[c].layer
                    or abs(e.step_size - visited[c].step_size) > self.rule.tolerance * visited[c].step_size
                ]
                self.listener.info(
                    f"refine {round_}: {concept}: {short_name(current.layer)} λ={current.step_size:.4g} → "
                    f"{short_name(edit.layer)} λ={edit.step_size:.4g}, forget {self.rule.metric} (keeping "
                    f"{len(kept)} other(s) forgotten) {edit.forget_accuracy(self.rule.metric):.3f}, utility "
                    f"{edit.utility:.3f}"
                )
            self.listener.end()
            if not changed:
                break
        return summary

    def leave_one_out(self) -> dict[str, Summary]:
        """The editor's model (every edit of :attr:`chosen` applied) without each concept's edit in turn, each
        evaluated as a probe: what removing that delta gives back, and which other concepts lean on it."""
        return {concept: self._without(concept) for concept in self.chosen}

    # --- the steps ----------------------------------------------------------------------------------------------

    def _search_order(self, order: Sequence[str]) -> Summary:
        """METHOD §9 through ``order`` on the editor's model, then the refinement rounds; returns the evaluation of
        the model it leaves, which carries the edits of :attr:`chosen`."""
        summary = None
        for concept in order:
            self.listener.begin(len(self.fronts[concept]) * self.rule.steps_per_layer)
            edit = choose(self._search_front(concept), self.rule.metric)
            self.listener.end()
            self.chosen[concept] = edit
            # Later concepts are searched on the model that carries this edit; after the last, the final result.
            summary = self.editor.shift([self._change(concept, edit)])
            self.listener.info(
                f"{concept}: layer {edit.layer}, λ={edit.step_size:.4g}, forget {self.rule.metric} "
                f"{edit.forget_accuracy(self.rule.metric):.3f}, utility {edit.utility:.3f}"
            )
        if len(order) > 1:
            summary = self.refine(self.chosen, summary)
        return summary

    def _search_again(self, concept: str, kept: Sequence[str], round_: int) -> Probe:
        """Search ``concept`` again over its layers on the model carrying every other concept's edit, keeping
        ``kept`` forgotten; returns the chosen probe and leaves the model without ``concept``'s edit. The current
        edit is the first probe of its layer, so it stays unless a probe beats it."""
        current = self.chosen[concept]
        self.editor.shift([self._change(concept, current, sign=-1.0)])
        return choose(self._search_front(concept, kept, round_, current), self.rule.metric)

    def _untangle(self, concept: str, summary: Summary, concepts: Sequence[str], round_: int) -> Summary:
        """Try freeing ``concept``'s edit from the concepts that stay forgotten only through it (they lean on it):
        search it again keeping only the others, then search each leaning concept brought back, keeping the rest
        forgotten. Kept if no concept forgotten before comes back and the utility rises; otherwise every edit it
        touched is restored. Returns the evaluation of the model it leaves."""
        start = dict(self.chosen)
        was = forgotten(summary, self.rule)
        without = forgotten(self._without(concept), self.rule)
        leaning = [c for c in concepts if c != concept and c in was and c not in without]
        if not leaning:
            return summary
        free = self._search_again(concept, [c for c in was if c != concept and c not in leaning], round_)
        # A freed edit no better than the current one, before the leaning concepts pay to be forgotten again,
        # cannot end better.
        moved = (
            [concept]
            if free.utility > utility(summary)
            and (free.layer, free.step_size) != (start[concept].layer, start[concept].step_size)
            else []
        )
        if moved:
            self.chosen[concept] = free
        after = self.editor.shift([self._change(concept, self.chosen[concept])])
        for other in leaning if moved else ():
            now = forgotten(after, self.rule)
            if other in now:
                continue
            self.chosen[other] = self._search_again(other, [c for c in now if c != other], round_)
            moved.append(other)
            after = self.editor.shift([self._change(other, self.chosen[other])])
        if not moved:
            return after
        better = was <= forgotten(after, self.rule) and utility(after) > utility(summary)
        self.listener.info(
            f"untangle {round_}: {concept} freed from {', '.join(leaning)}: utility "
            f"{utility(summary):.3f} → {utility(after):.3f}, "
            + ("kept" if better else "restored (a concept came back or the utility fell)")
        )
        if better:
            return after
        back = []
        for name in moved:  # back to the edits the move started from
            back += [self._change(name, self.chosen[name], sign=-1.0), self._change(name, start[name])]
            self.chosen[name] = start[name]
        return self.editor.shift(back)

    def _without(self, concept: str) -> Summary:
        """The editor's reference model with ``concept``'s edit taken out, evaluated as a probe."""
        edit = self.chosen[concept]
        return self.editor.probe(edit.layer, -1.0 * edit.step_size, self.gradients[concept][edit.layer])

    def _search_front(
        self, concept: str, kept: Sequence[str] = (), round_: int = 0, start: Probe | None = None
    ) -> list[Probe]:
        """Search λ on every front layer of ``concept`` (METHOD §6) on the editor's model; returns the probes. Each
        layer starts at ``initial_step_size``, except the layer of ``start``, which starts at its λ."""
        front = self.fronts[concept]
        stage = "search" if not round_ else f"refine {round_}/{self.rule.refine_rounds}"
        if self.rule.orders > 1:
            stage = f"order {self._order + 1} · {stage}"
        probes, crossed = [], {}  # per tower, the fewest doublings at which a layer searched so far first forgot
        for index, layer in enumerate(front, start=1):
            restart = start is not None and start.layer == layer.name
            initial = start.step_size if restart else initial_step_size(layer.weight_norm, layer.grad_norm)
            # The earliest crossing, not the last: a layer that forgets sooner than the start costs halvings back down.
            # Not while keeping other concepts forgotten: a larger step can bring one back, so forgetting is not
            # monotone in λ there (on the people config, warm starts in the rounds changed the choices).
            warm = self.rule.warm_start and not restart and not kept
            skip = max(0, crossed.get(layer.tower, 0) - 1) if warm else 0
            search = BinarySearch(initial, self.rule.steps_per_layer, self.rule.tolerance, skip)
            first = len(probes)
            where = f"{stage} {concept} · layer {index}/{len(front)} {short_name(layer.name)}"
            while not search.done:
                self.listener.probing(f"{where} · probe {search.steps + 1}/{self.rule.steps_per_layer}")
                probe = self._probe(layer, concept, search.step_size, kept, round_)
                probes.append(probe)
                search.update(is_forgotten(probe.forget_accuracy(self.rule.metric), self.rule.threshold))
            forgetting = next((p for p in probes[first:] if p.step_size == search.high), None)
            self.listener.searched(where, probes[first:], forgetting)
            if search.crossed is not None and not restart:
                doublings = min(round(math.log2(search.crossed / initial)), self.rule.steps_per_layer - 1)
                crossed[layer.tower] = min(doublings, crossed.get(layer.tower, doublings))
                # A warm start's halvings above the first forgotten doubling are probes the plain search never
                # makes: kept in the record, not offered to the choice.
                probes[first:] = [p for p in probes[first:] if p.step_size <= search.crossed]
        return self._tested(probes, layers={layer.name: layer for layer in front}, kept=kept, round_=round_)

    def _tested(self, probes: list[Probe], layers: Mapping[str, LayerStats], kept, round_: int) -> list[Probe]:
        """``probes`` with every probe whose utility the choice needs (:func:`~slug_lightning.search.untested`)
        evaluated again in full; the new record replaces the old one in :attr:`probes` too."""
        for index in untested(probes, self.rule.metric):
            old = probes[index]
            new = self._probe(layers[old.layer], old.concept, old.step_size, kept, round_, full=True, record=False)
            new = replace(new, step=old.step, seconds=old.seconds + new.seconds)
            self.probes[next(i for i, p in enumerate(self.probes) if p is old)] = new
            probes[index] = new
        return probes

    def _probe(
        self,
        layer: LayerStats,
        concept: str,
        step_size: float,
        kept: Sequence[str],
        round_: int,
        full: bool = False,
        record: bool = True,
    ) -> Probe:
        """Evaluate one step; a probe is only as forgotten as the worst of ``concept`` and ``kept``. Unless ``full``
        or the rule's ``full_probes``, the test sets are skipped when the forget images fail the forget test."""
        began = time.perf_counter()

        def worst(summary: Summary) -> dict[str, float]:
            # Test accuracy excludes the images of every concept of the run; the forget side is this concept's.
            every = [summary["forget"][c] for c in [*kept, concept]]
            return {k: max(f[k] for f in every) for k in ("top1", "top5")}

        def needs_tests(summary: Summary) -> bool:
            return is_forgotten(worst(summary)[self.rule.metric], self.rule.threshold)

        ask = None if full or self.rule.full_probes else needs_tests
        summary = self.editor.probe(layer.name, step_size, self.gradients[concept][layer.name], ask)
        forget = worst(summary)
        # (an editor may evaluate everything anyway: then the probe is tested, whatever the forget test says)
        tested = ask is None or bool(summary["test"]) or needs_tests(summary)
        probe = Probe(
            concept=concept,
            layer=layer.name,
            step=sum(
                1
                for p in self.probes
                if (p.concept, p.layer, p.round, p.order) == (concept, layer.name, round_, self._order)
            ),
            step_size=float(step_size),
            relative_change=float(step_size * layer.grad_norm / layer.weight_norm),
            forget_top1=forget["top1"],
            forget_top5=forget["top5"],
            # A set whose only images are forget concepts has no test accuracy.
            test_top1={name: value["top1"] for name, value in summary["test"].items() if value["count"]},
            test_top5={name: value["top5"] for name, value in summary["test"].items() if value["count"]},
            seconds=time.perf_counter() - began,
            round=round_,
            order=self._order,
            tested=tested,
        )
        if record:
            self.probes.append(probe)
            self.listener.probed(probe)
        return probe

    def _change(self, concept: str, edit: Probe, sign: float = 1.0) -> Change:
        """The change that adds (``sign`` 1) or takes out (-1) ``edit`` of ``concept``: λ·G_f on its layer."""
        return edit.layer, sign * edit.step_size, self.gradients[concept][edit.layer]
