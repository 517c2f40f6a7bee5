"""The step-size search's progress: a progress bar on rank 0, its log lines, and each probe's metrics for the
trainer's logger (a :class:`~slug_lightning.joint_search.Listener`)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from slug_lightning.joint_search import Listener
from slug_lightning.search import Probe


class SearchProgress(Listener):
    """The search's progress bar (rank 0, when the trainer shows one), its log lines, and each probe's metrics
    for the trainer's logger."""

    def __init__(self, trainer: L.Trainer | None, metric: str) -> None:
        self.trainer, self.metric = trainer, metric
        self.show = (trainer is None or trainer.is_global_zero) and (
            trainer is None or trainer.progress_bar_callback is not None
        )
        self.bar = None
        self.logged = 0

    def begin(self, total: int) -> None:
        # The total is an upper bound: a layer's search may stop early once its bracket is tight.
        self.bar = tqdm(total=total, disable=not self.show, leave=False, unit="probe", dynamic_ncols=True)

    def probing(self, description: str) -> None:
        self.bar.set_description(description)

    def probed(self, probe: Probe) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            {"λ": f"{probe.step_size:.3g}", f"forget {self.metric}": f"{probe.forget_accuracy(self.metric):.2f}"}
        )
        if self.trainer is not None and self.trainer.logger is not None:
            metrics = {
                "search/step_size": probe.step_size,
                "search/forget_top1": probe.forget_top1,
                "search/forget_top5": probe.forget_top5,
                # 0: the forget images failed the forget test, so the test sets were not evaluated (no test metric).
                "search/tested": float(probe.tested),
            }
            metrics.update({f"search/test_top1/{name}": value for name, value in probe.test_top1.items()})
            self.trainer.logger.log_metrics(metrics, step=self.logged)
        self.logged += 1

    def end(self) -> None:
        self.bar.close()

    def info(self, message: str) -> None:
        rank_zero_info(f"[slug] {message}")
