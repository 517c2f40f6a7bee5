"""``ProgressLines``: progress as whole lines, for output that is not a terminal (a log file, a CI job).

A bar redraws itself with carriage returns, which a log keeps, every redraw of it. Here each phase instead writes a
line when it has passed another ``every`` percent of its length, with the time left, but not sooner than ``interval``
seconds after its last line (a phase of seconds is one line); when its length is not known, a line each ``interval``
seconds, without a time left; and one line when it ends, with how long it took. A fit's
length is its optimizer steps; a fit of unknown length also gets a line at the end of each epoch, and each
validation during a fit one line with its metrics. The gradient streams are named as the bars name them
(:func:`~slug_lightning.callbacks.progress.predict_stream`). ``SlugTrainer`` installs this where stderr is not a
terminal (:func:`~slug_lightning.callbacks.progress.default_progress_bar`); the search writes one line per layer
(:class:`~slug_lightning.callbacks.search_progress.SearchProgress`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm
from typing_extensions import override

from slug_lightning.callbacks.progress import finite, predict_stream


def counted(count: int, unit: str) -> str:
    """``"1 batch"``, ``"2 batches"``: ``unit`` is a plural ending in ``s`` or ``es``."""
    if count != 1:
        return f"{count} {unit}"
    return f"{count} {unit[:-2] if unit.endswith(('ches', 'shes', 'sses')) else unit[:-1]}"


def metrics_text(metrics: Mapping[str, Any]) -> str:
    """``", name value, ..."`` of the numeric metrics (Lightning's logger version ``v_num`` left out)."""
    items = [
        f"{name} {float(value):.4g}"
        for name, value in metrics.items()
        if name != "v_num" and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    return "".join(f", {item}" for item in items)


class LineReporter:
    """The lines of one phase of ``total`` units (None: not known).

    Args:
        name: What the lines call the phase.
        total: Its length in ``unit``, or None.
        unit: What it counts (``"batches"``, ``"steps"``).
        every: A line each time another this many percent of ``total`` is done...
        interval: ... but not within this many seconds of the last line; without a total, a line each this many
            seconds.
        clock: Seconds from an arbitrary start (a test gives its own).

    Example::

        >>> ticks = iter([0.0, 60.0, 70.0, 140.0, 150.0])
        >>> phase = LineReporter("Predicting retain", total=4, every=25, interval=30.0, clock=lambda: next(ticks))
        >>> phase.update(1)
        'Predicting retain: 1/4 batches (25%), 01:00 elapsed, 03:00 left'
        >>> phase.update(2) is None  # 10 s after the last line
        True
        >>> phase.update(4) is None  # the end has its own line
        True
        >>> phase.finish()
        'Predicting retain: 4 batches in 02:30'
    """

    def __init__(
        self,
        name: str,
        total: int | None = None,
        unit: str = "batches",
        every: int = 10,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= every <= 100:
            raise ValueError(f"every must be a percentage in [1, 100], got {every!r}.")
        self.name, self.total, self.unit, self.every, self.interval = name, total, unit, every, interval
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0
        self.next_percent = every

    def update(self, done: int, metrics: Mapping[str, Any] | None = None) -> str | None:
        """``done`` units are done: the line to write, if one is due."""
        self.done = done
        now = self.clock()
        elapsed = now - self.start
        if now - self.last < self.interval:
            return None
        if self.total:
            percent = 100 * done // self.total
            if percent < self.next_percent or done >= self.total:  # the end has its own line
                return None
            self.next_percent = (percent // self.every + 1) * self.every
            self.last = now
            left = elapsed * (self.total - done) / done
            return (
                f"{self.name}: {done}/{self.total} {self.unit} ({percent}%), {tqdm.format_interval(elapsed)} elapsed, "
                f"{tqdm.format_interval(left)} left{metrics_text(metrics or {})}"
            )
        self.last = now
        return (
            f"{self.name}: {counted(done, self.unit)}, {tqdm.format_interval(elapsed)} elapsed"
            f"{metrics_text(metrics or {})}"
        )

    def finish(self, metrics: Mapping[str, Any] | None = None, what: str = "") -> str:
        """The phase's last line: how much, in how long (``what`` says more about where it ended)."""
        elapsed = tqdm.format_interval(self.clock() - self.start)
        return f"{self.name}{what}: {counted(self.done, self.unit)} in {elapsed}{metrics_text(metrics or {})}"


class ProgressLines(ProgressBar):
    """Lightning's progress bar callback, writing lines instead of bars (see the module's docstring).

    Args:
        every: A line each time another this many percent of a phase of known length is done...
        interval: ... but not within this many seconds of the phase's last line; in a phase of unknown length, a line
            each this many seconds.
    """

    def __init__(self, every: int = 10, interval: float = 60.0) -> None:
        super().__init__()
        LineReporter("", every=every)  # checks every
        self.every, self.interval = every, interval
        self._enabled = True
        self._train: LineReporter | None = None
        self._loader: LineReporter | None = None  # the validation, test or predict loader being read

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @override
    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        self.write(sep.join(map(str, args)))

    def write(self, line: str | None) -> None:
        """Write ``line`` (None: nothing) to stderr, where progress goes."""
        if line is not None and self._enabled:
            print(line, file=sys.stderr, flush=True)

    def _reporter(self, name: str, total: int | None, unit: str = "batches") -> LineReporter:
        return LineReporter(name, total, unit, self.every, self.interval)

    # --- fit ------------------------------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train = self._reporter(self.train_description, finite(trainer.estimated_stepping_batches), "steps")
        self._train.done = trainer.global_step  # a resumed fit starts there

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.write(self._train.update(trainer.global_step, self.get_metrics(trainer, pl_module)))

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train.total is None:  # no percentages to mark the way
            what = f" epoch {trainer.current_epoch} done"
            self.write(self._train.finish(self.get_metrics(trainer, pl_module), what))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(self._train.finish(self.get_metrics(trainer, pl_module)))

    # --- validation, test, predict: a phase per loader ---------------------------------------------------------------

    def _loader_starts(self, name: str, total: int | None) -> None:
        self._loader_ends()
        self._loader = self._reporter(name, total)

    def _loader_ends(self, metrics: Mapping[str, Any] | None = None, what: str = "") -> None:
        if self._loader is not None:
            self.write(self._loader.finish(metrics, what))
            self._loader = None

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.has_dataloader_changed(dataloader_idx) and not trainer.sanity_checking:
            total = finite(self.total_val_batches_current_dataloader)
            if trainer.state.fn == "fit":  # one line per validation, at its end
                self._loader = self._loader or self._reporter(self.validation_description, None)
            else:
                self._loader_starts(f"{self.validation_description} DataLoader {dataloader_idx}", total)

    @override
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._loader is not None:
            self._loader.done += 1
            if trainer.state.fn != "fit":
                self.write(self._loader.update(batch_idx + 1))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reset_dataloader_idx_tracker()
        if trainer.state.fn == "fit":
            self._loader_ends(self.get_metrics(trainer, pl_module), f" at step {trainer.global_step}")
        else:
            self._loader_ends()

    @override
    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            total = finite(self.total_test_batches_current_dataloader)
            self._loader_starts(f"{self.test_description} DataLoader {dataloader_idx}", total)

    @override
    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.write(self._loader.update(batch_idx + 1))

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reset_dataloader_idx_tracker()
        self._loader_ends()

    @override
    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            name, total = predict_stream(trainer, dataloader_idx)
            self._loader_starts(f"{self.predict_description} {name or f'DataLoader {dataloader_idx}'}", total)

    @override
    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.write(self._loader.update(batch_idx + 1))

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reset_dataloader_idx_tracker()
        self._loader_ends()
