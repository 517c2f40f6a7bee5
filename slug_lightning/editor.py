"""The model side of the search: edit named layers in place and evaluate, as one call.

:class:`ModelEditor` is the :class:`~slug_lightning.joint_search.Editor` over a CLIP's parameters and a
:class:`~slug_lightning.evaluation.ZeroShotEvaluator`. Every lasting change of the weights is followed by a full
evaluation, which becomes the evaluator's reference for the probes that follow; a probe adds its change, evaluates
only what the edited layer changes, and puts the layer back exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from slug_lightning.joint_search import Change
from slug_lightning.results import Summary


class ModelEditor:
    """Edits ``parameters`` in place and evaluates them with ``evaluate``.

    Args:
        parameters: The model's parameters by name (``dict(model.named_parameters())``).
        layers: The names of the layers the search may edit; their weights now are θ⁰, kept for :meth:`reset`.
        evaluate: ``evaluate(edited, needs_tests)``: the count tables of the model (``ZeroShotEvaluator.run``): a full
            evaluation for ``edited=None``, else a probe that recomputes only what layer ``edited`` changes, the
            forget concepts' images first when ``needs_tests`` is given.
        summarize: Turns count tables into a :class:`~slug_lightning.results.Summary`.
        device: Where the parameters live; directions are moved there.

    Attributes:
        counts: The count tables of the last full evaluation (``first_counts``: of the first).
    """

    def __init__(
        self,
        parameters: Mapping[str, Tensor],
        layers: Sequence[str],
        evaluate: Callable[..., Mapping[str, Tensor]],
        summarize: Callable[[Mapping[str, Tensor]], Summary],
        device: torch.device | str = "cpu",
    ) -> None:
        self.parameters = parameters
        self.base = {name: parameters[name].detach().clone() for name in layers}
        self._evaluate, self._summarize, self.device = evaluate, summarize, device
        self.counts: Mapping[str, Tensor] | None = None
        self.first_counts: Mapping[str, Tensor] | None = None
        self._moved: tuple[Tensor, Tensor] | None = None  # (a direction, its copy on the device)

    @torch.no_grad()
    def evaluate(self) -> Summary:
        """Evaluate the model as it is; it becomes the reference of the next probes."""
        self.counts = self._evaluate(None)
        if self.first_counts is None:
            self.first_counts = self.counts
        return self._summarize(self.counts)

    @torch.no_grad()
    def probe(
        self, layer: str, step_size: float, direction: Tensor, needs_tests: Callable[[Summary], bool] | None = None
    ) -> Summary:
        """The evaluation of the model with ``θ_layer + λ·direction``; the layer is restored afterwards.

        With ``needs_tests`` (forget first), the forget concepts' images are evaluated first and their accuracies
        (a summary with no ``test`` entry) given to it; when it returns False, the test sets are not evaluated and
        the summary's ``test`` is empty.
        """
        parameter = self.parameters[layer]
        original = parameter.detach().clone()
        parameter.add_(step_size * self._on_device(direction))
        try:
            if needs_tests is None:
                return self._summarize(self._evaluate(layer))
            decided: list[bool] = []

            def ask(forget_counts: Mapping[str, Tensor]) -> bool:
                decided.append(needs_tests({"forget": self._summarize(forget_counts)["forget"], "test": {}}))
                return decided[-1]

            counts = self._evaluate(layer, ask)
            return (
                {"forget": self._summarize(counts)["forget"], "test": {}}
                if decided == [False]
                else self._summarize(counts)
            )
        finally:
            parameter.copy_(original)

    @torch.no_grad()
    def shift(self, changes: Sequence[Change]) -> Summary:
        """Add each change, in order, then evaluate the model (the new reference)."""
        for layer, step_size, direction in changes:
            self.parameters[layer].add_(step_size * self._on_device(direction))
        return self.evaluate()

    @torch.no_grad()
    def restore(self) -> None:
        """Back to θ⁰ on every editable layer, without evaluating."""
        for name, weight in self.base.items():
            self.parameters[name].copy_(weight)

    def reset(self, changes: Sequence[Change] = ()) -> Summary:
        """Back to θ⁰ (:meth:`restore`), then :meth:`shift` by ``changes``."""
        self.restore()
        return self.shift(changes)

    def _on_device(self, direction: Tensor) -> Tensor:
        """``direction`` on the parameters' device. The probes of one layer's search step along one direction, so
        the last one moved is kept: it crosses to the accelerator once per layer, not once per probe."""
        if self._moved is None or self._moved[0] is not direction:
            self._moved = (direction, direction.to(self.device))
        return self._moved[1]
