"""The step-size search of one layer (METHOD §6) and the choice among all probes (METHOD §7).

:class:`BinarySearch` only proposes step sizes λ and narrows its bracket from the answers; whoever uses it
edits the model, evaluates it, records a :class:`Probe` and reports whether the concept was forgotten.
Nothing here touches a model, so the rule can be tested against a scripted oracle.

Example::

    >>> search = BinarySearch(initial=1.0, max_steps=4)
    >>> while not search.done:
    ...     step_size = search.step_size
    ...     search.update(forgotten=step_size >= 3.0)  # stands in for "edit, evaluate, compare"
    >>> search.low, search.high
    (2.0, 3.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

METRICS = ("top1", "top5")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")


def _check_accuracy(value: float, what: str) -> None:
    # NaN (an evaluation set with no images) would compare false everywhere and steer silently.
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{what} must be an accuracy in [0, 1], got {value!r}.")


def initial_step_size(weight_norm: float, grad_norm: float) -> float:
    """The first λ of a search, ``‖θ⁰_l‖ / ‖G_f,l‖ / 10``: a 10% change of the layer (METHOD §6).

    This is the research code's first step (CSIPlab/SLUG ``src/clip/unlearn_slug.py``: ``ratio = params_norm /
    grad_norm``, first probe at ``ratio / 10``). The paper's Algorithm 1 writes ``λ₀ = Importance(l)/10`` with
    ``Importance(l) = ‖G_f,l‖ / ‖θ_l‖``, the inverse ratio; taken literally, its first step would change the
    layer by ``(‖G_f,l‖ / ‖θ_l‖)² / 10``, which depends on the gradient's scale (how the loss is reduced, how
    many batches are summed). The code's ratio does not: every layer's first probe moves it by 10% of its
    norm, whatever the gradient's magnitude. The project follows the code.

    Args:
        weight_norm: ``‖θ⁰_l‖``.
        grad_norm: ``‖G_f,l‖``.

    Returns:
        The initial step size, ``> 0``.

    Raises:
        ValueError: if either norm is not a finite positive number: a zero gradient gives no direction to
            step in, and a zero weight no scale to step relative to.

    Example::

        >>> initial_step_size(5.0, 2.0)
        0.25
    """
    for what, value in (("weight_norm", weight_norm), ("grad_norm", grad_norm)):
        if not (math.isfinite(value) and value > 0.0):
            raise ValueError(
                f"{what} must be finite and > 0 to size a step relative to the layer, got {value!r}; "
                f"a layer with a zero weight or zero forget gradient cannot be searched."
            )
    return weight_norm / grad_norm / 10.0


def relative_change(step_size: float, grad_norm: float, weight_norm: float) -> float:
    """How far a step moves a layer relative to its norm: ``λ‖G_f,l‖ / ‖θ⁰_l‖``.

    Args:
        step_size: λ.
        grad_norm: ``‖G_f,l‖``.
        weight_norm: ``‖θ⁰_l‖``, ``> 0``.

    Returns:
        The relative change.

    Raises:
        ValueError: if ``weight_norm`` is not positive.

    Example::

        >>> relative_change(initial_step_size(5.0, 2.0), 2.0, 5.0)
        0.1
    """
    if not weight_norm > 0.0:
        raise ValueError(f"weight_norm must be > 0 for a relative change, got {weight_norm!r}.")
    return step_size * grad_norm / weight_norm


@dataclass
class Probe:
    """One evaluated step: the concept, the layer, λ, and the accuracies of the edited model.

    Accuracies are fractions in [0, 1]. ``test_top1``/``test_top5`` map each test set's name to its
    accuracy; they may be empty when no test sets are configured, or when the probe was not ``tested``.

    Args:
        concept: The concept being forgotten.
        layer: The parameter name of the edited layer.
        step: The probe's index within its layer's search, from 0.
        step_size: λ.
        relative_change: ``λ‖G_f,l‖/‖θ⁰_l‖``.
        forget_top1: Top-1 accuracy on the concept's images.
        forget_top5: Top-5 accuracy on the concept's images.
        test_top1: Top-1 accuracy per test set.
        test_top5: Top-5 accuracy per test set.
        seconds: Wall time of the probe.
        round: 0 for the search of METHOD §9; r ≥ 1 for the r-th refinement round of several concepts
            (see :class:`~slug_lightning.callbacks.StepSearch`), where the forget accuracy is the largest over the
            concept and the concepts it must keep forgotten.
        order: Several concepts searched from several orders: the index of the order this probe's search went in
            (0: the order given; see :func:`concept_orders`).
        tested: Whether the test sets were evaluated. A probe whose forget images already fail the forget test
            skips them (forget first); its utility is then not measured (NaN), and :func:`choose` refuses to rank
            it where its utility could decide.

    Raises:
        ValueError: on a negative step, step size, relative change or time, or an accuracy outside [0, 1].
    """

    concept: str
    layer: str
    step: int
    step_size: float
    relative_change: float
    forget_top1: float
    forget_top5: float
    test_top1: dict[str, float] = field(default_factory=dict)
    test_top5: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    round: int = 0
    order: int = 0
    tested: bool = True

    def __post_init__(self) -> None:
        for what in ("step", "round", "order"):
            value = getattr(self, what)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{what} must be an integer >= 0, got {value!r}.")
        for what in ("step_size", "relative_change", "seconds"):
            value = getattr(self, what)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{what} must be finite and >= 0, got {value!r}.")
        _check_accuracy(self.forget_top1, "forget_top1")
        _check_accuracy(self.forget_top5, "forget_top5")
        for what in ("test_top1", "test_top5"):
            for name, value in getattr(self, what).items():
                _check_accuracy(value, f"{what}[{name!r}]")

    @property
    def utility(self) -> float:
        """The mean top-1 accuracy over the test sets (METHOD §7); NaN when there are none.

        NaN rather than 0.0 because "not measured" is not "destroyed"; :func:`choose` ranks it below any
        measured utility.
        """
        if not self.test_top1:
            return math.nan
        return sum(self.test_top1.values()) / len(self.test_top1)

    def forget_accuracy(self, metric: str) -> float:
        """The forget accuracy by ``metric`` (``"top1"`` or ``"top5"``).

        Raises:
            ValueError: for any other metric.
        """
        _check_metric(metric)
        return self.forget_top1 if metric == "top1" else self.forget_top5


def is_forgotten(accuracy: float | Probe, threshold: float = 0.0, metric: str = "top5") -> bool:
    """The forget test of a probe: forget accuracy ``<= threshold`` (default: exactly 0).

    Args:
        accuracy: A forget accuracy, or a :class:`Probe` whose accuracy by ``metric`` is taken.
        threshold: The largest accuracy that still counts as forgotten, in [0, 1].
        metric: ``"top1"`` or ``"top5"``; used only when ``accuracy`` is a Probe.

    Returns:
        Whether the concept counts as forgotten.

    Raises:
        ValueError: if the accuracy or threshold is outside [0, 1] (NaN included), or the metric is unknown.

    Example::

        >>> is_forgotten(0.0), is_forgotten(0.02), is_forgotten(0.02, threshold=0.05)
        (True, False, True)
    """
    _check_metric(metric)
    _check_accuracy(threshold, "threshold")
    if isinstance(accuracy, Probe):
        accuracy = accuracy.forget_accuracy(metric)
    _check_accuracy(accuracy, "The forget accuracy")
    return accuracy <= threshold


FORGOTTEN, NOT_FORGOTTEN, PARTLY_FORGOTTEN, NOTHING_TO_FORGET = (
    "forgotten",
    "not forgotten",
    "partly forgotten",
    "nothing to forget",
)


def concept_verdict(before: float, after: float, threshold: float = 0.0) -> str:
    """Whether a concept was forgotten, from its forget accuracy (by the search's metric) before and after.

    ``"nothing to forget"`` when the model did not recognise it to begin with (its accuracy before already meets
    the forget test: no edit is made), else ``"forgotten"`` or ``"not forgotten"`` by the forget test after.

    Example::

        >>> concept_verdict(1.0, 0.0), concept_verdict(1.0, 0.25), concept_verdict(0.0, 0.0)
        ('forgotten', 'not forgotten', 'nothing to forget')
    """
    if is_forgotten(before, threshold):
        return NOTHING_TO_FORGET
    return FORGOTTEN if is_forgotten(after, threshold) else NOT_FORGOTTEN


def run_verdict(verdicts: Sequence[str]) -> str:
    """The verdict of a run from its concepts' (:func:`concept_verdict`): ``"forgotten"`` when every concept the
    model knew is forgotten, ``"not forgotten"`` when none is, ``"partly forgotten"`` in between, and ``"nothing to
    forget"`` when it knew none of them.

    Example::

        >>> run_verdict(["forgotten", "nothing to forget"]), run_verdict(["forgotten", "not forgotten"])
        ('forgotten', 'partly forgotten')
    """
    known = [v for v in verdicts if v != NOTHING_TO_FORGET]
    if not known:
        return NOTHING_TO_FORGET
    forgotten = sum(v == FORGOTTEN for v in known)
    return FORGOTTEN if forgotten == len(known) else NOT_FORGOTTEN if not forgotten else PARTLY_FORGOTTEN


class BinarySearch:
    """The λ search of one layer; the caller evaluates each proposed λ and reports whether it forgot.

    Starting from ``initial`` with the bracket ``[low, high] = [0, ∞)``:

    - not forgotten: ``low = λ``; then ``λ = 2λ`` while ``high`` is unbounded, else ``(low + high) / 2``;
    - forgotten: ``high = λ``; then ``λ = (low + high) / 2``.

    The search is done after ``max_steps`` probes, or as soon as the bracket is tight:
    ``high < ∞`` and ``(high - low) / high < tolerance``. Forget accuracy need not be monotone in λ;
    the search does not assume it, it only follows the answers it gets.

    A warm start (``skip`` > 0) begins at ``initial · 2^skip``, as if the first ``skip`` doublings had not forgotten:
    they count as steps, so the same ``max_steps`` ends it where the plain search would have ended. If that λ
    already forgets, the search halves λ until it does not (or down to ``initial``) before it bisects; these
    probes replace the skipped ones and do not count. Wherever forget accuracy is monotone on the doublings, it
    then probes every step size the plain search would have probed from its first forgotten doubling on
    (:attr:`crossed`), and above it only the halvings that found it; it trusts, and does not check, that the skipped
    doublings did not forget.

    Args:
        initial: The first λ, ``> 0`` (see :func:`initial_step_size`).
        max_steps: The most probes, ``>= 1``.
        tolerance: The relative bracket width that stops the search early, in (0, 1).
        skip: Doublings of ``initial`` to skip, ``0 <= skip < max_steps``.

    Raises:
        ValueError: on an argument outside its range.

    Example::

        >>> search = BinarySearch(initial=1.0)
        >>> search.update(forgotten=False); search.step_size
        2.0
        >>> search.update(forgotten=True); search.step_size
        1.5
    """

    def __init__(self, initial: float, max_steps: int = 10, tolerance: float = 0.05, skip: int = 0) -> None:
        self._configure(initial, max_steps, tolerance)
        if not (isinstance(skip, int) and not isinstance(skip, bool) and 0 <= skip < max_steps):
            raise ValueError(f"skip must be an integer in [0, max_steps={max_steps}), got {skip!r}.")
        self.low = 0.0
        self.high = math.inf
        self.steps = skip
        self._next = float(initial) * 2.0**skip
        # Halving down from a warm start that forgot at once: the bracket's low end is not known yet.
        self.descending = False
        # The plain search's first forgotten doubling, once known (None before, and if none forgot).
        self.crossed: float | None = None

    def _configure(self, initial: float, max_steps: int, tolerance: float) -> None:
        if not (isinstance(initial, (int, float)) and math.isfinite(initial) and initial > 0):
            raise ValueError(f"initial step size must be finite and > 0, got {initial!r}.")
        if not (isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps >= 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}.")
        if not (isinstance(tolerance, (int, float)) and 0.0 < tolerance < 1.0):
            raise ValueError(f"tolerance must be in the open interval (0, 1), got {tolerance!r}.")
        self.initial = float(initial)
        self.max_steps = max_steps
        self.tolerance = float(tolerance)

    @property
    def converged(self) -> bool:
        """Whether the bracket is tight: ``high < ∞`` and ``(high - low) / high < tolerance``."""
        return math.isfinite(self.high) and (self.high - self.low) / self.high < self.tolerance

    @property
    def done(self) -> bool:
        """Whether the search is over: ``max_steps`` probes taken or the bracket tight."""
        return self.steps >= self.max_steps or self.converged

    @property
    def step_size(self) -> float:
        """The λ to evaluate next.

        Raises:
            RuntimeError: if the search is done.
        """
        if self.done:
            raise RuntimeError(f"The search is done after {self.steps} probe(s); there is no next step size.")
        return self._next

    def update(self, forgotten: bool) -> None:
        """Narrow the bracket with the answer for :attr:`step_size` and propose the next λ.

        Args:
            forgotten: Whether the model edited with the current λ forgot the concept.

        Raises:
            RuntimeError: if the search is done.
        """
        step_size = self.step_size
        # A warm start's first forgotten λ has no probed low end below it (low is still 0): find one.
        if self.descending or (forgotten and math.isinf(self.high) and self.low == 0.0 and self.steps > 0):
            self._descend(step_size, forgotten)
            return
        if forgotten:
            if math.isinf(self.high):
                self.crossed = step_size
            self.high = step_size
            self._next = (self.low + self.high) / 2
        else:
            self.low = step_size
            self._next = 2 * step_size if math.isinf(self.high) else (self.low + self.high) / 2
        self.steps += 1

    def _descend(self, step_size: float, forgotten: bool) -> None:
        # At initial · 2^k (steps == k, the plain search's count before probing it). Forgotten above the first
        # doubling: halve. Forgotten at `initial`, or not forgotten: the plain search's state after its first
        # forgotten doubling, which is here or one above.
        k = self.steps
        if forgotten and k > 0:
            self.descending, self.high, self.steps, self._next = True, step_size, k - 1, step_size / 2
            return
        self.descending = False
        if forgotten:  # `initial` forgets: the bracket is [0, initial], as after the plain search's first probe
            self.high, self.steps = step_size, 1
        else:
            self.low, self.steps = step_size, k + 2
        self.crossed = self.high
        self._next = (self.low + self.high) / 2

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the search exactly (plain floats and ints)."""
        return {
            "initial": self.initial,
            "max_steps": self.max_steps,
            "tolerance": self.tolerance,
            "low": self.low,
            "high": self.high,
            "steps": self.steps,
            "next": self._next,
            "descending": self.descending,
            "crossed": self.crossed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a search saved by :meth:`state_dict`, configuration included.

        Raises:
            ValueError: if keys are missing or a value is out of range.
        """
        missing = sorted(set(self.state_dict()) - set(state) - {"descending", "crossed"})  # (older states lack it)
        if missing:
            raise ValueError(f"The search state lacks {missing}; got keys {sorted(state)}.")
        self._configure(state["initial"], state["max_steps"], state["tolerance"])
        low, high, next_ = float(state["low"]), float(state["high"]), float(state["next"])
        steps = state["steps"]
        if not (0.0 <= low < high and isinstance(steps, int) and steps >= 0 and next_ > 0):
            raise ValueError(f"Inconsistent search state: low={low}, high={high}, steps={steps}, next={next_}.")
        self.low, self.high, self.steps, self._next = low, high, steps, next_
        self.descending = bool(state.get("descending", False))
        self.crossed = state.get("crossed")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(low={self.low:g}, high={self.high:g}, "
            f"steps={self.steps}/{self.max_steps}, done={self.done})"
        )


def choose(probes: Sequence[Probe], metric: str = "top5") -> Probe:
    """The result of SLUG among all probes of all searched layers of one concept (METHOD §7).

    The lowest forget accuracy by ``metric``; among those the highest utility (a NaN utility ranks below
    any number); then the smallest relative change; then the first in order.

    Args:
        probes: Every probe of the concept's search, in the order they were taken.
        metric: ``"top1"`` or ``"top5"``, the same metric as the search's forget test.

    Returns:
        The chosen probe.

    Raises:
        ValueError: if ``probes`` is empty, spans several concepts, ``metric`` is unknown, or a probe that was not
            tested has the lowest forget accuracy (its utility could decide: test it first, see :func:`untested`).

    Example::

        >>> a = Probe("x", "visual.proj", 0, 1.0, 0.1, 0.0, 0.0, {"objects": 0.6}, {"objects": 0.9})
        >>> b = Probe("x", "text_projection", 0, 1.0, 0.05, 0.0, 0.0, {"objects": 0.7}, {"objects": 0.9})
        >>> choose([a, b]).layer
        'text_projection'
    """
    _check_metric(metric)
    if not probes:
        raise ValueError("choose needs at least one probe, got none.")
    concepts = sorted({p.concept for p in probes})
    if len(concepts) > 1:
        raise ValueError(f"choose ranks the probes of one concept; got several: {concepts}.")

    def rank(index: int) -> tuple[float, float, float]:
        probe = probes[index]
        utility = probe.utility
        return (
            probe.forget_accuracy(metric),
            math.inf if math.isnan(utility) else -utility,
            probe.relative_change,
        )

    missing = untested(probes, metric)
    if missing:
        raise ValueError(f"choose cannot rank probes {missing}: not tested, and their utility could decide.")
    # min() keeps the first of equal keys, which is the "first in order" tie-break.
    return probes[min(range(len(probes)), key=rank)]


def untested(probes: Sequence[Probe], metric: str = "top5") -> list[int]:
    """The indices of the probes :func:`choose` would need the test accuracies of but lacks: untested probes with
    the lowest forget accuracy.

    A probe skips its test sets only when it fails the forget test, so its forget accuracy is above that of any
    probe that passed: it can rank first only when no probe forgot, and then its utility breaks the tie.

    Example::

        >>> a = Probe("x", "visual.proj", 0, 1.0, 0.1, 0.5, 0.5, tested=False)
        >>> b = Probe("x", "visual.proj", 1, 2.0, 0.2, 0.0, 0.0, {"objects": 0.7}, {"objects": 0.9})
        >>> untested([a, b]), untested([a])
        ([], [0])
    """
    _check_metric(metric)
    if not probes:
        return []
    least = min(p.forget_accuracy(metric) for p in probes)
    return [i for i, p in enumerate(probes) if not p.tested and p.forget_accuracy(metric) == least]


def concept_orders(concepts: Sequence[str], count: int) -> list[list[str]]:
    """The first ``count`` distinct orders to search several concepts in (METHOD §9 searches them in one).

    The order given, its reverse, then the given order rotated by one place and its reverse, by two places, and
    so on. There are fewer when fewer are distinct: one for a single concept, two for two, ``2n`` for ``n >= 3``.

    Args:
        concepts: The concepts in the order given.
        count: How many orders, ``>= 1``.

    Returns:
        Up to ``count`` orders, the given one first.

    Raises:
        ValueError: if ``count`` is not an integer ``>= 1``.

    Example::

        >>> concept_orders(["a", "b", "c"], 4)
        [['a', 'b', 'c'], ['c', 'b', 'a'], ['b', 'c', 'a'], ['a', 'c', 'b']]
        >>> concept_orders(["a", "b"], 4)
        [['a', 'b'], ['b', 'a']]
    """
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise ValueError(f"count must be an integer >= 1, got {count!r}.")
    orders: list[list[str]] = []
    for shift in range(len(concepts)):
        rotated = [*concepts[shift:], *concepts[:shift]]
        for order in (rotated, rotated[::-1]):
            if len(orders) < count and order not in orders:
                orders.append(order)
    return orders
