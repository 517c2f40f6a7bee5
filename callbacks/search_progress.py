"""The step-size search's progress: a bar in Lightning's style in a terminal, one line per searched layer in a log,
its log lines, and each probe's metrics for every logger of the trainer (a
:class:`~slug_lightning.joint_search.Listener`)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from slug_lightning.callbacks.progress import interactive, lightning_bar
from slug_lightning.callbacks.progress_lines import ProgressLines
from slug_lightning.joint_search import Listener
from slug_lightning.run_logging import probe_metrics
from slug_lightning.search import Probe

BAR, LINES = "bar", "lines"


def search_display(trainer: L.Trainer | None) -> str | None:
    """How the search shows its progress: as the trainer's progress display does (lines where it writes lines, none
    where it has none, and on ranks other than 0), else a bar; without a trainer, a bar where stderr is a terminal
    and lines elsewhere."""
    if trainer is None:
        return BAR if interactive() else LINES
    if not trainer.is_global_zero or trainer.progress_bar_callback is None:
        return None
    return LINES if isinstance(trainer.progress_bar_callback, ProgressLines) else BAR


def layer_line(description: str, probes: Sequence[Probe], forgetting: Probe | None, metric: str) -> str:
    """One layer's search in a line: its probes, and the smallest λ that forgot with the forget and test accuracies
    there, or how far it went without forgetting."""
    head = f"{description}: {len(probes)} probe{'s' if len(probes) != 1 else ''}"
    if forgetting is None:
        best = min(probes, key=lambda p: p.forget_accuracy(metric))
        return (
            f"{head}, not forgotten up to λ={max(p.step_size for p in probes):.4g} (forget {metric} at best "
            f"{best.forget_accuracy(metric):.3f})"
        )
    tests = ", ".join(f"{name} {value:.3f}" for name, value in forgetting.test_top1.items()) or "not tested"
    return (
        f"{head}, forgets at λ={forgetting.step_size:.4g}: forget {metric} {forgetting.forget_accuracy(metric):.3f}, "
        f"test top1 {tests}"
    )


class SearchProgress(Listener):
    """The search's progress display (:func:`search_display`), its log lines, and each probe's metrics (tagged by
    concept and layer, :func:`~slug_lightning.run_logging.probe_metrics`) for every logger of the trainer, at a step
    that counts the probes of the probe's concept and layer."""

    def __init__(self, trainer: L.Trainer | None, metric: str) -> None:
        self.trainer, self.metric = trainer, metric
        self.display = search_display(trainer)
        self.bar = None
        self.steps: Counter[tuple[str, str]] = Counter()  # probes logged per (concept, layer)

    def begin(self, total: int) -> None:
        # The total is an upper bound: a layer's search may stop early once its bracket is tight.
        if self.display == BAR:
            self.bar = lightning_bar("search", total=total, unit="probe", leave=False)

    def probing(self, description: str) -> None:
        if self.bar is not None:
            self.bar.set_description(description)

    def probed(self, probe: Probe) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                {"λ": f"{probe.step_size:.3g}", f"forget {self.metric}": f"{probe.forget_accuracy(self.metric):.2f}"}
            )
        key = (probe.concept, probe.layer)
        for logger in self.trainer.loggers if self.trainer is not None else ():
            logger.log_metrics(probe_metrics(probe), step=self.steps[key])
        self.steps[key] += 1

    def searched(self, description: str, probes: Sequence[Probe], forgetting: Probe | None) -> None:
        if self.display == LINES and probes:
            print(layer_line(description, probes, forgetting, self.metric), file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def info(self, message: str) -> None:
        rank_zero_info(f"[slug] {message}")
