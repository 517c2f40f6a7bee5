"""``SlugTrainer``: a Lightning Trainer with two more entry points, ``unlearn`` and ``evaluate``.

They are Trainer methods so that LightningCLI turns them into subcommands with the same ``--trainer.*``
options (devices, strategy, precision, loggers) as ``fit``; each runs inside Lightning's own loops, so
DDP processes are launched and torn down by Lightning.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from slug_lightning.baselines import BaselineSettings
from slug_lightning.callbacks.step_search import StepSearch
from slug_lightning.errors import UserError
from slug_lightning.evaluation import ZeroShotEvaluator, ZeroShotModule
from slug_lightning.gradients import GradientCollector, GradientStore
from slug_lightning.report import format_accuracy_table, terminal_summary, write_unlearn_artifacts
from slug_lightning.artifacts import write_json
from slug_lightning.validation import preflight

PARTIAL_GRADIENTS = "gradients.partial.safetensors"  # the gradient pass's checkpoint (one file per rank under DDP)


class SlugTrainer(L.Trainer):
    """A ``lightning.Trainer`` with ``unlearn`` and ``evaluate``.

    Defaults differ from Lightning's in two places: ``inference_mode=False`` (the gradient pass runs in a
    predict loop and needs autograd) and ``use_distributed_sampler=False`` (the evaluation sets are
    sharded without padding by their datamodule, so counts stay exact).
    """

    def __init__(self, *args, inference_mode: bool = False, use_distributed_sampler: bool = False, **kwargs) -> None:
        super().__init__(*args, inference_mode=inference_mode, use_distributed_sampler=use_distributed_sampler,
                         **kwargs)

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
    ) -> dict | None:
        """Unlearn concepts with SLUG (gradients, layer statistics, step-size search, artifacts) or a baseline.

        Args:
            model: The GradientCollector holding the CLIP to unlearn.
            datamodule: Forget and retain pairs (one predict loader per concept, then retain).
            search: The StepSearch settings and evaluation sets.
            output_dir: Where the artifacts go (report.json, report.md, layers.csv, search.csv,
                gradients.safetensors, delta.safetensors, model.safetensors, plots).
            gradients: A gradient store to reuse instead of computing one. By default a
                gradients.safetensors already in output_dir is reused when its model and concepts match.
            overwrite: Replace a finished run in output_dir; without it such a directory is refused.
            method: ``slug``, or a baseline to compare with (``ft``, ``ga``, ``gaft``, ``salun``, ``ssd``; see
                :mod:`slug_lightning.baselines`): same data, evaluation sets and report shape, one device.
            baseline: The baseline's hyperparameters (``--baseline.lr``, ``--baseline.iterations``, ...).

        Returns:
            The report (on global rank 0; None on other ranks).
        """
        output = Path(output_dir)
        check_output_dir(output, overwrite)
        if method != "slug":
            from slug_lightning.baseline_unlearn import unlearn_with_baseline

            preflight(model, datamodule, search)
            return unlearn_with_baseline(self, model, datamodule, search, output, method, baseline)
        store = reusable_store(Path(gradients) if gradients else output / "gradients.safetensors", model, datamodule,
                               explicit=gradients is not None)
        preflight(model, datamodule, search, scan_captions=store is None)
        model.partial_path = output / PARTIAL_GRADIENTS
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
        report = write_unlearn_artifacts(output, model, search, total_seconds=total, devices=self.world_size,
                                         datamodule=datamodule)
        print(terminal_summary(report, output))
        return report

    def evaluate(self, model: L.LightningModule, datamodule: L.LightningDataModule, output: str | None = None,
                 similarity: str | None = None, similarity_set: str | None = None,
                 similarity_classes: list[str] | None = None) -> dict:
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
        self.validate(module, datamodule=datamodule, verbose=False)
        if self.is_global_zero:
            print(format_accuracy_table(module.results))
            if output:
                write_json(output, module.results)
        if similarity:
            draw_similarity(module, datamodule, Path(similarity), similarity_set, similarity_classes,
                            rank_zero=self.is_global_zero)
        return module.results


def draw_similarity(module, datamodule, path: Path, set_name: str | None, classes: list[str] | None,
                    rank_zero: bool = True, count: int = 6) -> None:
    """The image–text similarity matrix of a model on one labelled set, as a PNG (every rank computes)."""
    from slug_lightning.plots import similarity_plot

    evaluator = ZeroShotEvaluator(module.model, module.tokenizer, datamodule, device=module.device)
    if set_name is not None and set_name not in evaluator.datasets:
        raise UserError(f"similarity_set {set_name!r} is not one of the sets {list(evaluator.datasets)}.")
    set_name = set_name or next(iter(evaluator.datasets))
    dataset = evaluator.datasets[set_name]
    with_images = sorted(set(dataset.targets))
    classes = list(classes) if classes else [dataset.class_names[i] for i in with_images[:count]]
    try:
        missing = [c for c in classes if dataset.class_index(c) not in with_images]
    except KeyError as error:
        raise UserError(f"similarity_classes: {error.args[0]}") from None
    if missing:
        raise UserError(f"similarity_classes {missing} have no images in set {set_name!r}.")
    evaluator.run()
    matrix = evaluator.similarity(set_name, classes)
    if rank_zero:
        model_name = getattr(module, "hparams", {}).get("model_name", type(module.model).__name__)
        similarity_plot(path, set_name, classes, [(model_name, matrix)])
        print(f"similarity matrix: {path}")


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse to run into a directory holding a finished run, unless ``overwrite``."""
    if (output / "report.json").exists() and not overwrite:
        raise UserError(
            f"{str(output)!r} already holds a finished run (report.json). Choose another --output_dir, or pass "
            "--overwrite true to replace it (its gradients.safetensors is reused when it matches)."
        )


def reusable_store(path: Path, model: GradientCollector, datamodule, explicit: bool) -> GradientStore | None:
    """The gradient store at ``path`` if it fits this run's model and concepts, else None.

    Raises:
        UserError: if ``explicit`` and the file is missing or belongs to another model or concepts.
    """
    if not path.exists():
        if explicit:
            raise UserError(f"Gradient store {str(path)!r} does not exist.")
        return None
    store = GradientStore.load(path)
    concepts = [c.name for c in getattr(datamodule, "concepts", [])] if model.concepts is None else model.concepts
    wanted = model.identity()
    problems = []
    if store.model != wanted:
        problems.append(f"it was computed for {store.model}, this run uses {wanted}")
    if store.concepts != list(concepts):
        problems.append(f"it holds concepts {store.concepts}, this run asks for {list(concepts)}")
    if set(store.layers) != set(model.candidates()):
        problems.append("its layers differ from this run's candidate layers")
    if problems:
        if explicit:
            raise UserError(f"Cannot reuse gradient store {str(path)!r}: " + "; ".join(problems) + ".")
        return None
    return store
