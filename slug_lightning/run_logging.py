"""What an ``unlearn`` run gives the Trainer's loggers, every one of ``trainer.loggers``: each probe of the search
as it ends (:func:`probe_metrics`), and at the end the result (:func:`summary_metrics`, :func:`summary_params`),
``report.md`` and the plots as artifacts where the logger keeps files (:func:`log_run`).

A probe's tags name its concept and layer, ``search/<concept>/<layer>/forget_top1``, and its step counts the
probes of that concept and layer, so that each layer's search is a curve of its own; docs/logging.md lists the tags
and what each kind of logger receives. Files go to TensorBoard as text and images, to a CSV logger's directory as
copies, to W&B and MLflow as artifacts; a logger of another kind gets the metrics and parameters. wandb and mlflow
are used only through loggers that already hold them: nothing here imports either.
"""

from __future__ import annotations

import re

from slug_lightning.search import Probe


def tag_part(name: str) -> str:
    """``name`` as one level of a tag that every logger keeps as it is: letters, digits, ``_``, ``.`` and ``-``, any
    other character (a space, a slash that would open a new level) as ``_``, as TensorBoard writes it."""
    return re.sub(r"[^\w.\-]", "_", name)


def probe_metrics(probe: Probe) -> dict[str, float]:
    """A probe's metrics, tagged ``search/<concept>/<layer>/<metric>``: λ (``step_size``), ``relative_change``,
    ``forget_top1``, ``forget_top5``, ``tested`` (0: the forget images failed the forget test, so the test sets were
    not evaluated) and ``test_top1/<set>`` for each set it was tested on."""
    prefix = f"search/{tag_part(probe.concept)}/{tag_part(probe.layer)}"
    metrics = {
        f"{prefix}/step_size": probe.step_size,
        f"{prefix}/relative_change": probe.relative_change,
        f"{prefix}/forget_top1": probe.forget_top1,
        f"{prefix}/forget_top5": probe.forget_top5,
        f"{prefix}/tested": float(probe.tested),
    }
    metrics.update({f"{prefix}/test_top1/{name}": value for name, value in probe.test_top1.items()})
    return metrics
