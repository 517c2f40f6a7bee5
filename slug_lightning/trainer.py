"""``SlugTrainer``: a Lightning Trainer with two more entry points, ``unlearn`` and ``evaluate``.

They are Trainer methods so that LightningCLI turns them into subcommands with the same ``--trainer.*``
options (devices, strategy, precision, loggers) as ``fit``; each runs inside Lightning's own loops, so
DDP processes are launched and torn down by Lightning.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from slug_lightning.artifacts import write_json
from slug_lightning.audit.settings import AuditSettings
from slug_lightning.baselines import BaselineSettings
from slug_lightning.callbacks.progress import with_default_progress_bar
from slug_lightning.callbacks.step_search import StepSearch
from slug_lightning.errors import NotForgotten, UserError
from slug_lightning.evaluation import ZeroShotEvaluator, ZeroShotModule
from slug_lightning.gradient_key import key_changes
from slug_lightning.gradient_store import GradientStore
from slug_lightning.gradients import GradientCollector
from slug_lightning.report import write_unlearn_artifacts
from slug_lightning.report_render import format_accuracy_table, terminal_summary
from slug_lightning.run_logging import log_run
from slug_lightning.search import FORGOTTEN, NOTHING_TO_FORGET
from slug_lightning.validation import preflight

GRADIENTS = "gradients.safetensors"  # the gradient store of the run's pass, reused by a re-run
PARTIAL_GRADIENTS = "gradients.partial.safetensors"  # the gradient pass's checkpoint (one file per rank under DDP)
SMOKE_DIR = "smoke"  # where a smoke run (--trainer.fast_dev_run) writes, inside --output_dir


class SlugTrainer(L.Trainer):
    """A ``lightning.Trainer`` with ``unlearn`` and ``evaluate``.

    Defaults differ from Lightning's in two places: ``inference_mode=False`` (the gradient pass runs in a
    predict loop and needs autograd) and ``use_distributed_sampler=False`` (the evaluation sets are
    sharded without padding by their datamodule, so counts stay exact). Given no progress bar, it shows
    :func:`~slug_lightning.callbacks.progress.default_progress_bar` (none with ``--quiet``).
    """

    def __init__(self, *args, inference_mode: bool = False, use_distributed_sampler: bool = False, **kwargs) -> None:
        kwargs.update(with_default_progress_bar(kwargs.get("callbacks"), kwargs.get("enable_progress_bar")))
        super().__init__(
            *args, inference_mode=inference_mode, use_distributed_sampler=use_distributed_sampler, **kwargs
        )

    def unlearn(
        self,
        model: GradientCollector,
        datamodule: L.LightningDataModule,
        search: StepSearch,
        output_dir: str = "runs/unlearn",
        gradients: str | None = None,
        overwrite: bool = False,
        method: Literal["slug", "ft", "ga", "gaft", "salun", "ssd"] = "slug",
        baseline: BaselineSettings = BaselineSettings(),  # noqa: B008 (a frozen value, never mutated)
        audit: AuditSettings = AuditSettings(),  # noqa: B008 (a frozen value, never mutated)
        require_forgotten: bool = False,
    ) -> dict | None:
        """Unlearn concepts with SLUG (gradients, layer statistics, step-size search, artifacts) or a baseline.

        Args:
            model: The GradientCollector holding the CLIP to unlearn.
            datamodule: Forget and retain pairs (one predict loader per concept, then retain).
            search: The StepSearch settings and evaluation sets.
            output_dir: Where the artifacts go (report.json, report.md, layers.csv, search.csv,
                gradients.safetensors, delta.safetensors, model.safetensors, plots; audit.json unless
                ``search.audit`` is False).
            gradients: A gradient store to reuse instead of computing one. By default a
                gradients.safetensors already in output_dir is reused when its model and concepts match.
            overwrite: Replace a finished run in output_dir; without it such a directory is refused.
            method: ``slug``, or a baseline to compare with (``ft``, ``ga``, ``gaft``, ``salun``, ``ssd``; see
                :mod:`slug_lightning.baselines`): same data, evaluation sets and report shape, one device.
            baseline: The baseline's hyperparameters (``--baseline.lr``, ``--baseline.iterations``, ...).
            audit: What the audit at the end tries (``--audit.paraphrases``, ``--audit.relearn_ks``, ...; see
                :mod:`slug_lightning.audit`). ``--search.init_args.audit false`` skips the audit.
            require_forgotten: After writing the artifacts, raise :class:`~slug_lightning.errors.NotForgotten`
                (the command line exits with status 3) unless the run's ``verdict`` is ``forgotten`` (or ``nothing
                to forget``). Without it, a run that did not forget is still a result and exits with 0; its report
                says so plainly. A smoke run has no result, and ignores it.

        A Trainer with ``fast_dev_run`` makes it a *smoke run*, which checks that the config runs end to end in
        seconds: the pre-flight check reads captions only until every concept has its ``min_forget_pairs``, the
        gradient pass reads ``fast_dev_run`` batches (1 for ``True``) per stream, the search makes at most
        :data:`~slug_lightning.callbacks.step_search.SMOKE_MAX_STEPS` probes per layer, and the artifacts go to
        ``output_dir/smoke`` (replacing an earlier smoke run's), marked as a smoke run; a gradient store in the
        output directory is neither reused nor left for a real run to reuse (its key records the batch limit). A
        store given by ``gradients`` is checked as a real run checks it, and used.

        Returns:
            The report (on global rank 0; None on other ranks).
        """
        smoke = bool(self.fast_dev_run)
        output = unlearn_dir(Path(output_dir), overwrite, smoke, method)
        if method != "slug":
            from slug_lightning.baseline_unlearn import unlearn_with_baseline

            preflight(model, datamodule, search)
            report, base = unlearn_with_baseline(self, model, datamodule, search, output, method, baseline)
            if report is not None and search.audit and not smoke:
                report["audit"] = self._audit(output, report, model, base, datamodule, search, audit)
            log_run(self.loggers, report, output)
            return _check_verdict(report, require_forgotten)
        if smoke and gradients is None:
            store = None  # a smoke run runs its own short pass: taking a store would leave the pass unchecked
        else:
            # A store given by --gradients must hold a full pass (its pass does not run here, smoke run or not).
            store = reusable_store(
                Path(gradients) if gradients else output / GRADIENTS,
                model,
                datamodule,
                explicit=gradients is not None,
                precision=str(self.precision),
                limit_predict_batches=1.0 if gradients else self.limit_predict_batches,
            )
        preflight(model, datamodule, search, scan_captions=store is None, smoke=smoke)
        model.partial_path = output / PARTIAL_GRADIENTS
        model.store_path = output / GRADIENTS
        self.callbacks.append(search)
        start = time.perf_counter()
        if store is not None:
            model.gradients = store
            model.reused = True
            # One placeholder batch per rank: the loop must run for StepSearch's hook, but there is no data
            # to read when the gradients already exist.
            self.predict(model, dataloaders=DataLoader([0]), return_predictions=False)
        else:
            self.predict(model, datamodule=datamodule, return_predictions=False)
        total = time.perf_counter() - start
        self.callbacks.remove(search)
        if not self.is_global_zero:
            return None
        smoke_settings = (
            {
                "batches_per_stream": None if model.reused else int(self.fast_dev_run),
                "probes_per_layer": search.steps_per_layer,
            }
            if smoke
            else None
        )
        report = write_unlearn_artifacts(
            output,
            model,
            search.result,
            search.sets,
            total_seconds=total,
            devices=self.world_size,
            datamodule=datamodule,
            smoke=smoke_settings,
        )
        print(terminal_summary(report, output))
        if search.audit and not smoke:
            if search.result.applied:
                originals = search.result.base_weights
                report["audit"] = self._audit(output, report, model, originals, datamodule, search, audit)
            else:
                rank_zero_info("[slug] no audit: the search left θ⁰ in place (apply=False), so nothing changed.")
        if smoke and require_forgotten:
            rank_zero_info("[slug] --require_forgotten is not applied to a smoke run: its verdict means nothing.")
        log_run(self.loggers, report, output)
        return _check_verdict(report, require_forgotten and not smoke)

    def _audit(self, output: Path, report: dict, collector, originals: dict, datamodule, search, settings) -> dict:
        """Audit the unlearned model in ``collector`` against θ⁰ (``originals``), beside the run (rank 0 only)."""
        from slug_lightning.audit.run import audit_unlearned

        rank_zero_info("[slug] auditing the unlearned model (--search.init_args.audit false skips it)")
        device = self.strategy.root_device
        model = collector.model
        return audit_unlearned(output, report, model, originals, collector, datamodule, search, settings, device)

    def evaluate(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        output: str | None = None,
        similarity: str | None = None,
        similarity_set: str | None = None,
        similarity_classes: list[str] | None = None,
    ) -> dict:
        """Zero-shot top-1/top-5 of a CLIP on labelled sets; prints a table and optionally writes JSON.

        Args:
            model: A module holding the CLIP (``ZeroShotModule``, or any module with ``model`` and
                ``tokenizer`` attributes such as ``CLIPContrastive``).
            datamodule: A ZeroShotDataModule with the sets.
            output: Write the accuracies to this JSON file.
            similarity: Also draw the image–text similarity matrix (names × mean class images) into this
                PNG file.
            similarity_set: The set whose classes the matrix shows (default: the first set).
            similarity_classes: The classes to show (default: the first six classes with images).

        Returns:
            ``{set: {top1, top5, count}}``.
        """
        module = model if isinstance(model, ZeroShotModule) else ZeroShotModule.wrap(model)
        # Bad arguments are refused before the evaluation, so that nothing is half-written.
        files = (("output", output, "results.json"), ("similarity", similarity, "similarity.png"))
        for option, value, example in files:
            if value:
                check_output_file(Path(value), f"--{option}", example)
        if similarity and hasattr(datamodule, "datasets"):
            similarity_selection(datamodule.datasets(), similarity_set, similarity_classes)
        self.validate(module, datamodule=datamodule, verbose=False)
        if self.is_global_zero:
            print(format_accuracy_table(module.results))
            if output:
                write_json(output, module.results)
        if similarity:
            draw_similarity(
                module, datamodule, Path(similarity), similarity_set, similarity_classes, rank_zero=self.is_global_zero
            )
        return module.results


def draw_similarity(
    module,
    datamodule,
    path: Path,
    set_name: str | None,
    classes: list[str] | None,
    rank_zero: bool = True,
    count: int = 6,
) -> None:
    """The image–text similarity matrix of a model on one labelled set, as a PNG (every rank computes)."""
    from slug_lightning.plots import similarity_plot

    evaluator = ZeroShotEvaluator(module.model, module.tokenizer, datamodule, device=module.device)
    set_name, classes = similarity_selection(evaluator.datasets, set_name, classes, count)
    evaluator.run()
    matrix = evaluator.similarity(set_name, classes)
    if rank_zero:
        model_name = getattr(module, "hparams", {}).get("model_name", type(module.model).__name__)
        similarity_plot(path, set_name, classes, [(model_name, matrix)])
        print(f"similarity matrix: {path}")


def similarity_selection(
    datasets: dict, set_name: str | None, classes: list[str] | None, count: int = 6
) -> tuple[str, list[str]]:
    """The set and classes the similarity matrix shows: as given, else the first set and its first ``count``
    classes with images.

    Raises:
        UserError: An unknown set, or a class that is not in it or has no images there.
    """
    if set_name is not None and set_name not in datasets:
        raise UserError(f"--similarity_set {set_name!r} is not one of the sets {list(datasets)}.")
    set_name = set_name or next(iter(datasets))
    dataset = datasets[set_name]
    with_images = sorted(set(dataset.targets))
    classes = list(classes) if classes else [dataset.class_names[i] for i in with_images[:count]]
    try:
        missing = [c for c in classes if dataset.class_index(c) not in with_images]
    except KeyError as error:
        raise UserError(f"--similarity_classes: {error.args[0]}") from None
    if missing:
        raise UserError(f"--similarity_classes {missing} have no images in set {set_name!r}.")
    return set_name, classes


def check_output_file(path: Path, option: str, example: str) -> None:
    """Refuse a file to write that is a directory or lies under a file (it would fail only once written).

    Raises:
        UserError: Naming ``option`` and what to give instead.
    """
    if path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a directory; name the file to write, e.g. {str(path / example)!r}.")
    blocking = next((parent for parent in path.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{option} {str(path)!r} lies under {str(blocking)!r}, which is a file, not a directory.")


def _check_verdict(report: dict | None, require_forgotten: bool) -> dict | None:
    """``report``; with ``require_forgotten``, raise :class:`NotForgotten` unless every concept the model knew was
    forgotten (other ranks than 0 have no report and pass)."""
    if require_forgotten and report is not None and report["verdict"] not in (FORGOTTEN, NOTHING_TO_FORGET):
        missed = [c["name"] for c in report["concepts"] if c["verdict"] not in (FORGOTTEN, NOTHING_TO_FORGET)]
        raise NotForgotten(
            f"--require_forgotten: the run's verdict is {report['verdict']!r}; not forgotten: "
            f"{', '.join(missed)} (the artifacts are written)."
        )
    return report


def unlearn_dir(output: Path, overwrite: bool, smoke: bool = False, method: str = "slug") -> Path:
    """The directory an ``unlearn`` run writes into, checked before any work: ``output``, or ``output/smoke`` for a
    smoke run (``--trainer.fast_dev_run``), so that a smoke run never writes over a run's artifacts nor leaves
    files that a later run in ``output`` would take for its own. A smoke run replaces an earlier smoke run.

    Raises:
        UserError: As :func:`check_output_dir`; or a smoke run of a baseline method, whose iterations read all the
            data whatever the Trainer's batch limits.
    """
    if not smoke:
        check_output_dir(output, overwrite)
        return output
    if method != "slug":
        raise UserError(
            f"--trainer.fast_dev_run smoke-tests --method slug only; --method {method} iterates over all "
            "the data whatever the Trainer's batch limits. Leave out one of the two."
        )
    smoke_dir = output / SMOKE_DIR
    check_output_dir(smoke_dir, overwrite or holds_smoke_run(smoke_dir))
    return smoke_dir


def holds_smoke_run(output: Path) -> bool:
    """Whether ``output`` holds the report of a smoke run (``"smoke_run": true``), which a smoke run may replace."""
    try:
        return json.loads((output / "report.json").read_text(encoding="utf-8")).get("smoke_run") is True
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an output directory that is a file, or one holding a finished run unless ``overwrite``."""
    existing = next((path for path in (output, *output.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is" if existing == output else f"lies under {str(existing)!r}, which is"
        raise UserError(
            f"--output_dir {str(output)!r} {where} an existing file, not a directory; name a directory "
            "for the run's artifacts (it is created if missing)."
        )
    if (output / "report.json").exists() and not overwrite:
        raise UserError(
            f"{str(output)!r} already holds a finished run (report.json): choose another --output_dir, or "
            "--overwrite to replace it (its gradients are reused if they match)."
        )


def reusable_store(
    path: Path,
    model: GradientCollector,
    datamodule,
    explicit: bool,
    precision: str = "32-true",
    limit_predict_batches: int | float = 1.0,
) -> GradientStore | None:
    """The gradient store at ``path`` if it was computed for exactly this run's inputs, else None.

    The store's gradient key (:mod:`slug_lightning.gradient_key`: the weights' fingerprint, the concepts and
    aliases, the shards with sizes and modification times, the batch size, the transforms, the candidate layers,
    the precision, the batches read per stream: ``limit_predict_batches``) must equal this run's. A store found in
    the output directory that does not match, or cannot be read, is recomputed with one line saying why.

    Raises:
        UserError: if ``explicit`` (``--gradients``) and the file is missing, unreadable or made for other inputs.
    """
    if not path.exists():
        if explicit:
            raise UserError(f"Gradient store {str(path)!r} (--gradients) does not exist.")
        return None
    try:
        store = GradientStore.load(path)
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: its gradients cannot be trusted
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        if explicit:
            raise UserError(
                f"Gradient store {str(path)!r} (--gradients) cannot be read ({reason}); give a complete "
                "gradients.safetensors, or leave out --gradients to compute them."
            ) from None
        rank_zero_info(f"[slug] recomputing the gradients: {path} cannot be read ({reason}).")
        return None
    try:
        wanted = model.gradient_key(datamodule, precision, limit_predict_batches=limit_predict_batches)
    except (OSError, ValueError):
        return None  # shard patterns that do not resolve: the pre-flight check names them
    changes = key_changes(store.key, wanted)
    if changes:
        if explicit:
            more = f"; and {len(changes) - 2} more" if len(changes) > 2 else ""
            raise UserError(
                f"--gradients {str(path)!r} was computed for other inputs ({'; '.join(changes[:2])}{more}); leave "
                "it out to compute them."
            )
        rank_zero_info(
            f"[slug] recomputing the gradients: {path} was computed for other inputs ({'; '.join(changes)})."
        )
        return None
    rank_zero_info(f"[slug] reusing the gradients in {path} (same weights, concepts, data and settings).")
    return store
