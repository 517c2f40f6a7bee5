"""Progress of the long phases (the fit, the gradient pass, the search) in one style: Lightning's tqdm bars in a
terminal, and in a log one line per stretch of work (:class:`~slug_lightning.callbacks.progress_lines.ProgressLines`).

:class:`SlugProgressBar` is Lightning's :class:`~lightning.pytorch.callbacks.TQDMProgressBar` with totals that are
true: a fit bounded by ``max_steps`` is one bar over its steps (not one per pass over a stream of unknown length),
and the gradient pass's streams, which have no length, take theirs from the datamodule where it knows them
(``predict_streams``); where nothing knows a total the bar shows no ETA rather than a made-up one. Bars go to
stderr, like every other message of a run; stdout keeps the result. The search draws its bar with
:func:`lightning_bar`, the same style.

``SlugTrainer`` installs :func:`default_progress_bar` (the bar where stderr is a terminal, the lines elsewhere)
unless it is given a progress bar of its own or ``enable_progress_bar=False``; with ``--quiet`` it shows none.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

from slug_lightning import console


def interactive() -> bool:
    """Whether stderr, where progress goes, is a terminal (else a log file or a CI job's output)."""
    return sys.stderr.isatty()


def finite(value: int | float | None) -> int | None:
    """``value`` as an int when it is a finite number, else None (Lightning counts an unknown length as ``inf``)."""
    return None if value is None or math.isinf(value) or math.isnan(value) else int(value)


def fit_steps(trainer: L.Trainer) -> int | None:
    """The optimizer steps a fit bounded by ``max_steps`` alone makes; None for a fit bounded by epochs (Lightning
    sets ``max_epochs=-1`` when only ``max_steps`` is given)."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1):
        return int(trainer.max_steps)
    return None


def epoch_description(trainer: L.Trainer) -> str:
    """``Epoch N/LAST`` (0-based, as Lightning counts), or ``Epoch N`` when the number of epochs is not set."""
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return f"Epoch {trainer.current_epoch}/{trainer.max_epochs - 1}"
    return f"Epoch {trainer.current_epoch}"


def predict_stream(trainer: L.Trainer, dataloader_idx: int) -> tuple[str | None, int | None]:
    """The name and the number of batches of predict loader ``dataloader_idx``, each None when unknown.

    The batches are the fewer of Lightning's count (the loader's length, or ``limit_predict_batches``) and the
    datamodule's (its ``predict_streams()``: ``(name, batches or None)`` per loader, as ``LaionDataModule`` gives
    them for its forget and retain streams). A datamodule whose streams do not match the loaders is not asked.
    """
    counts = trainer.num_predict_batches
    limit = finite(counts[dataloader_idx]) if dataloader_idx < len(counts) else None
    streams = getattr(trainer.datamodule, "predict_streams", None)
    streams = streams() if callable(streams) else []
    if len(streams) != len(counts):
        return None, limit
    name, batches = streams[dataloader_idx]
    known = [count for count in (limit, batches) if count is not None]
    return name, min(known) if known else None


# Lightning's bar format without the time left, for a bar of unknown total: tqdm would show it as 00:00. Its
# description ends in ": ", as tqdm's set_description leaves it (and lightning_bar starts it).
NO_TOTAL_FORMAT = "{desc}{n_fmt} [{elapsed}, {rate_noinv_fmt}{postfix}]"


def bar_format(total: int | float | None) -> str:
    """Lightning's bar format for a bar of ``total`` steps, without the time left when the total is not known."""
    return TQDMProgressBar.BAR_FORMAT if finite(total) is not None else NO_TOTAL_FORMAT


def lightning_bar(description: str, total: int | None = None, **kwargs: Any) -> Tqdm:
    """A progress bar in Lightning's style (its :class:`Tqdm` and bar format), on stderr."""
    return Tqdm(
        desc=f"{description}: ",
        total=total,
        dynamic_ncols=True,
        file=sys.stderr,
        bar_format=bar_format(total),
        **kwargs,
    )


class SlugProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, on stderr, with a whole-run bar for a fit bounded by steps and named gradient
    streams with their totals (see the module's docstring).

    Args:
        refresh_rate: Refresh the bars every this many batches (0 hides them), as Lightning's.
        leave: Leave each finished epoch's bar on the screen, as Lightning's.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    def _bar(self, description: str, offset: int = 0, leave: bool = True, **kwargs: Any) -> Tqdm:
        position = 2 * self.process_position + offset
        return lightning_bar(description, position=position, disable=self.is_disabled, leave=leave, **kwargs)

    @override
    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(self.sanity_check_description, leave=False)

    @override
    def init_train_tqdm(self) -> Tqdm:
        return self._bar(self.train_description, smoothing=0)

    @override
    def init_predict_tqdm(self) -> Tqdm:
        return self._bar(self.predict_description, smoothing=0)

    @override
    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"  # as Lightning's: below the training bar, if any
        return self._bar(self.validation_description, offset=int(has_main_bar), leave=not has_main_bar)

    @override
    def init_test_tqdm(self) -> Tqdm:
        return self._bar(self.test_description)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        steps = fit_steps(trainer)
        if steps is not None:  # one bar for the run, from where a resumed run starts
            bar = self.train_progress_bar
            bar.reset(total=steps)
            bar.n = bar.initial = trainer.global_step
            bar.bar_format = bar_format(steps)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if fit_steps(trainer) is None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.bar_format = bar_format(self.train_progress_bar.total)
            self.train_progress_bar.set_description(epoch_description(trainer))

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if fit_steps(trainer) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if not bar.disable and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix({**self.get_metrics(trainer, pl_module), "epoch": trainer.current_epoch})

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if fit_steps(trainer) is None:
            super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        name, total = predict_stream(trainer, dataloader_idx)
        bar = self.predict_progress_bar
        bar.total, bar.bar_format = total, bar_format(total)
        bar.set_description(f"{self.predict_description} {name or f'DataLoader {dataloader_idx}'}", refresh=False)
        bar.reset()  # draws it anew: 0 of the total, under its name
        bar.initial = 0


def default_progress_bar() -> ProgressBar:
    """The progress display for this process: the bars where stderr is a terminal, else one line per stretch."""
    if interactive():
        return SlugProgressBar()
    from slug_lightning.callbacks.progress_lines import ProgressLines

    return ProgressLines()


def with_default_progress_bar(callbacks: Callback | list[Callback] | None, enable_progress_bar: bool | None) -> dict:
    """The Trainer's ``callbacks`` and ``enable_progress_bar``, with :func:`default_progress_bar` added when the
    Trainer is given no progress bar and not told to show none; with ``--quiet``
    (:func:`slug_lightning.console.verbosity`), no bar unless one is given."""
    callbacks = [] if callbacks is None else [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
    if enable_progress_bar is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return {"callbacks": callbacks, "enable_progress_bar": enable_progress_bar}
    if console.verbosity() == "quiet":
        return {"callbacks": callbacks, "enable_progress_bar": False}
    return {"callbacks": [*callbacks, default_progress_bar()], "enable_progress_bar": enable_progress_bar}
