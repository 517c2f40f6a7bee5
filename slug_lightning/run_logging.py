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
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from slug_lightning.search import Probe

REPORT = "report.md"


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


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary_metrics(report: dict) -> dict[str, float]:
    """The result of a run (its ``report.json``) as metrics: per concept ``result/<concept>/<key>`` for λ
    (``step_size``), ``relative_change`` and the forget accuracies before and after (``forget_top1_before``, ...);
    per test set ``result/test/<set>/top1_before``, ``top1_after`` and the same for top-5."""
    metrics = {}
    keys = ("step_size", "relative_change", *(f"forget_{k}_{w}" for k in ("top1", "top5") for w in ("before", "after")))
    for concept in report.get("concepts", []):
        prefix = f"result/{tag_part(concept['name'])}"
        metrics.update({f"{prefix}/{key}": float(concept[key]) for key in keys if _number(concept.get(key))})
    for when in ("before", "after"):
        for name, accuracy in (report.get(when) or {}).get("test", {}).items():
            for k in ("top1", "top5"):
                if _number(accuracy.get(k)):
                    metrics[f"result/test/{tag_part(name)}/{k}_{when}"] = float(accuracy[k])
    return metrics


def summary_params(report: dict) -> dict[str, str]:
    """What a run chose, as parameters: ``result/method``, ``result/verdict``, and per concept its ``layer`` and
    ``verdict`` (``result/<concept>/layer``; a concept with no edit has no layer)."""
    params = {f"result/{key}": str(report[key]) for key in ("method", "verdict") if key in report}
    for concept in report.get("concepts", []):
        for key in ("layer", "verdict"):
            if concept.get(key) is not None:
                params[f"result/{tag_part(concept['name'])}/{key}"] = str(concept[key])
    return params


def run_files(output: Path) -> list[Path]:
    """The files of a finished run that loggers keep: ``report.md``, then the plots (``*.png``)."""
    report = [output / REPORT] if (output / REPORT).is_file() else []
    return report + sorted(output.glob("*.png"))


def _tensorboard(logger: TensorBoardLogger, files: Sequence[Path]) -> None:
    """``report.md`` as text (TensorBoard renders its Markdown), each plot as an image, tagged by its file name."""
    import numpy as np
    from PIL import Image

    for path in files:
        if path.suffix == ".md":
            logger.experiment.add_text(f"run/{path.stem}", path.read_text(encoding="utf-8"), global_step=0)
        else:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            logger.experiment.add_image(f"plots/{path.stem}", pixels, global_step=0, dataformats="HWC")


def _csv(logger: CSVLogger, files: Sequence[Path]) -> None:
    """The files, copied beside ``metrics.csv``."""
    folder = Path(logger.log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, folder / path.name)


def _wandb(logger: WandbLogger, files: Sequence[Path]) -> None:
    """``report.md`` as an artifact of the run, the plots as images under ``plots``."""
    for path in files:
        if path.suffix == ".md":
            logger.experiment.log_artifact(str(path), name=f"slug-{path.stem}", type="slug-run")
    plots = [path for path in files if path.suffix != ".md"]
    if plots:
        logger.log_image("plots", [str(path) for path in plots], caption=[path.stem for path in plots])


def _mlflow(logger: MLFlowLogger, files: Sequence[Path]) -> None:
    """Each file as an artifact of the run, under ``slug/``."""
    for path in files:
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="slug")


# The loggers that keep files, and how each is given them.
FILE_WRITERS: tuple[tuple[type[Logger], Callable[[Logger, Sequence[Path]], None]], ...] = (
    (TensorBoardLogger, _tensorboard),
    (CSVLogger, _csv),
    (WandbLogger, _wandb),
    (MLFlowLogger, _mlflow),
)


def log_run(loggers: Sequence[Logger], report: dict | None, output: Path) -> None:
    """Give every logger the result of a finished run in ``output``: :func:`summary_params` as hyperparameters,
    :func:`summary_metrics` at step 0, and :func:`run_files` where the logger keeps files (see the module's
    docstring); then finalize it again (Lightning finalized it when its loop ended). Nothing without a ``report``
    (ranks other than 0 have none)."""
    if report is None:
        return
    metrics, params, files = summary_metrics(report), summary_params(report), run_files(output)
    for logger in loggers:
        logger.log_hyperparams(params)
        logger.log_metrics(metrics, step=0)
        for kind, write in FILE_WRITERS:
            if isinstance(logger, kind):
                write(logger, files)
        logger.finalize("success")
