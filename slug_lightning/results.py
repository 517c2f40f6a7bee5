"""The typed records of a run: an evaluation summary, a visit of the refinement, the end of one concept order, and
the finished search that the report, the plots, the baselines and the delta read.

Nothing here computes; :mod:`slug_lightning.joint_search` fills these in and :mod:`slug_lightning.report` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, TypedDict

from torch import Tensor

from slug_lightning.layers import LayerStats
from slug_lightning.search import Probe


class Accuracy(TypedDict):
    """The zero-shot accuracy of one forget concept or one test set, and the images it counts."""

    top1: float
    top5: float
    count: int


class Summary(TypedDict):
    """One evaluation of the model (:func:`~slug_lightning.evaluation.summarize`): each forget concept's accuracy
    on its images, and each set's test accuracy on the images of no forget concept."""

    forget: dict[str, Accuracy]
    test: dict[str, Accuracy]


def utility(summary: Summary) -> float:
    """The utility of METHOD §7, the mean test top-1 over the sets that have test images; NaN when none has.

    Example::

        >>> utility({"forget": {}, "test": {"a": {"top1": 0.5, "top5": 1.0, "count": 4},
        ...                                  "b": {"top1": 0.0, "top5": 0.0, "count": 0}}})
        0.5
    """
    tests = [value["top1"] for value in summary["test"].values() if value["count"]]
    return sum(tests) / len(tests) if tests else float("nan")


class Visit(NamedTuple):
    """The model one visit of the refinement rounds left (METHOD §9): ``round`` 0 and no concept is the model the
    rounds start from."""

    round: int
    concept: str | None
    summary: Summary


@dataclass
class OrderEnd:
    """Where the search of several concepts ended from one concept order.

    Args:
        order: The concepts in the order they were searched and revisited.
        chosen: Each concept's edit at the end.
        after: The evaluation of the model carrying those edits.
        visits: The refinement's visits.
        probes: How many probes this order took.
    """

    order: list[str]
    chosen: dict[str, Probe]
    after: Summary
    visits: list[Visit]
    probes: int


@dataclass(frozen=True)
class Edit:
    """One concept's edit, θ_l ← θ⁰_l + λ·G_f,l: what the delta ships and the report lists.

    Args:
        concept: The concept it forgets.
        layer: The parameter name of the edited layer.
        tower: ``"vision"`` or ``"language"``.
        step_size: λ.
        relative_change: ``λ‖G_f,l‖/‖θ⁰_l‖``.
        round: 0 for the search of METHOD §9; r when refinement round r changed it.
    """

    concept: str
    layer: str
    tower: str
    step_size: float
    relative_change: float
    round: int = 0

    def update(self, forget_gradients: dict[str, dict[str, Tensor]]) -> Tensor:
        """λ·G_f of this edit, from the run's forget gradients (``GradientStore.forget``)."""
        return self.step_size * forget_gradients[self.concept][self.layer]


@dataclass
class SearchResult:
    """A finished SLUG search (:class:`~slug_lightning.callbacks.StepSearch`).

    Args:
        concepts: The run's concepts, in the order given.
        settings: The search settings the report records (metric, threshold, max_steps, ...).
        before: The evaluation of θ⁰.
        after: The evaluation of the model carrying every edit.
        chosen: Each edited concept's chosen probe, in the order given.
        probes: Every probe, in the order taken.
        layers: Each searched concept's statistics of every candidate layer (METHOD §3–§4).
        searched: The layers searched for each concept, in forward order.
        nothing_to_forget: The concepts the model did not recognise before: neither searched nor edited.
        visits: The refinement's visits of the kept order (several concepts with ``refine_rounds``).
        ends: The end of each concept order searched, the given one first.
        kept_order: The index in ``ends`` of the order whose edits the run keeps.
        leave_one_out: Several concepts: the final evaluation without each concept's edit.
        test_classes: Per set, each test class's top-1 before and after, the largest fall first.
        similarity: Per forget set, ``(names, concepts, before, after)`` image–text cosine matrices.
        set_sizes: Per evaluation set, its ``classes`` and ``images``.
        forget_set_of: The set that measures each concept's forget accuracy.
        applied: Whether the model was left carrying the edits.
        seconds: The search's wall time.
        memory: The search's peak memory (:class:`~slug_lightning.memory.PeakMemory`'s result).
        steps_per_layer: The most probes a layer's search took (``max_steps``, less in a smoke run).
        base_weights: θ⁰ of every edited layer, by parameter name (the audit rebuilds the base model from it).
    """

    concepts: list[str]
    settings: dict
    before: Summary
    after: Summary
    chosen: dict[str, Probe] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    layers: dict[str, list[LayerStats]] = field(default_factory=dict)
    searched: dict[str, list[LayerStats]] = field(default_factory=dict)
    nothing_to_forget: list[str] = field(default_factory=list)
    visits: list[Visit] = field(default_factory=list)
    ends: list[OrderEnd] = field(default_factory=list)
    kept_order: int = 0
    leave_one_out: dict[str, Summary] = field(default_factory=dict)
    test_classes: dict[str, list[dict]] = field(default_factory=dict)
    similarity: dict[str, tuple] = field(default_factory=dict)
    set_sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    forget_set_of: dict[str, str] = field(default_factory=dict)
    applied: bool = True
    seconds: float = 0.0
    memory: dict = field(default_factory=dict)
    steps_per_layer: int = 0
    base_weights: dict[str, Tensor] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The forget metric that decided "forgotten"."""
        return self.settings["metric"]

    @property
    def threshold(self) -> float:
        """The forget accuracy at or below which a concept counts as forgotten."""
        return self.settings["threshold"]

    @property
    def edits(self) -> list[Edit]:
        """Each edited concept's :class:`Edit`, in the order given."""
        towers = {stats.name: stats.tower for rows in self.layers.values() for stats in rows}
        return [
            Edit(concept, probe.layer, towers.get(probe.layer, ""), probe.step_size, probe.relative_change, probe.round)
            for concept, probe in self.chosen.items()
        ]
