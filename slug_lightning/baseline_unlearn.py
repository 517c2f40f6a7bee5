"""``unlearn --method ft|ga|gaft|salun|ssd``: a baseline run with the same data, evaluation and artifacts as SLUG.

The baseline reads the forget and retain pairs of the run's ``LaionDataModule`` (at the baseline's own batch
size), evaluates on the run's ``StepSearch`` sets before it starts and after every iteration, and writes
``report.json`` in SLUG's shape: ``concepts`` carry no layer or step size, ``search`` is the iteration log,
``edit`` is what shipping the result costs (every tensor the method changed, in full).
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import Tensor

from slug_lightning.artifacts import flat_row, save_state_dict, write_csv, write_json, write_text
from slug_lightning.baselines import BaselineSettings, run_baseline, settings_used
from slug_lightning.errors import UserError
from slug_lightning.evaluation import class_changes, forget_sets_of, summarize
from slug_lightning.memory import PeakMemory
from slug_lightning.models import count_parameters
from slug_lightning.provenance import software
from slug_lightning.report import accuracies, assemble_report, describe_data, peak_memory
from slug_lightning.report_render import render_baseline_markdown
from slug_lightning.reproduce import reproduce_command
from slug_lightning.search import concept_verdict


def edit_size(base: dict[str, Tensor], edited: dict[str, Tensor]) -> dict:
    """What must be stored to ship an edit: the tensors that differ from ``base``, whole.

    Returns:
        ``{"tensors": n, "entries": changed entries, "parameters": entries of the changed tensors,
        "bytes": their size in the edited dtype}``.

    Example::

        >>> import torch
        >>> base = {"a": torch.zeros(4), "b": torch.zeros(2, 3)}
        >>> edit_size(base, {"a": torch.tensor([0.0, 1.0, 0.0, 0.0]), "b": torch.zeros(2, 3)})
        {'tensors': 1, 'entries': 1, 'parameters': 4, 'bytes': 16}
    """
    tensors = entries = parameters = size = 0
    for name, tensor in edited.items():
        changed = int((tensor != base[name]).sum())
        if changed:
            tensors += 1
            entries += changed
            parameters += tensor.numel()
            size += tensor.numel() * tensor.element_size()
    return {"tensors": tensors, "entries": entries, "parameters": parameters, "bytes": size}


def unlearn_with_baseline(
    trainer, collector, datamodule, search, output: Path, method: str, settings: BaselineSettings
) -> tuple[dict | None, dict[str, Tensor]]:
    """Run baseline ``method`` on the collector's CLIP, in place, and write the run's artifacts.

    Args:
        trainer: The SlugTrainer (its root device is used; one device only).
        collector: The GradientCollector holding the CLIP; only its model, tokenizer and preprocess are used.
        datamodule: The LaionDataModule of forget and retain pairs.
        search: The StepSearch whose evaluation sets, metric and forget-set rule are used.
        output: The run's output directory.
        method: ``ft``, ``ga``, ``gaft``, ``salun`` or ``ssd``.
        settings: The baseline's hyperparameters.

    Returns:
        The report (None off global rank 0) and θ⁰, the CLIP's state before the method changed it.

    Raises:
        UserError: on more than one device, or a datamodule without concepts.
    """
    if trainer.world_size > 1:
        raise UserError(
            f"--method {method} runs on one device; this run has {trainer.world_size}. Set "
            "--trainer.devices 1 (only SLUG spreads its gradient pass over devices)."
        )
    concepts = list(getattr(datamodule, "concepts", None) or [])
    if not concepts:
        raise UserError("unlearn needs concepts to forget: set --data.init_args.concepts.")
    start = time.perf_counter()
    identity = collector.identity()  # of θ⁰, before the method changes it
    device = trainer.strategy.root_device
    clip = collector.model.to(device)
    datamodule.transform, datamodule.tokenizer = collector.preprocess, collector.tokenizer
    if getattr(datamodule, "retain_augmentation", False):  # the retain pairs seen as the paper's code sees them
        datamodule.retain_transform = collector.train_preprocess
    datamodule.batch_size = settings.batch_size  # the baselines' optimizer batch, not SLUG's gradient batch
    datamodule.setup("predict")

    names = [c.name for c in concepts]
    evaluator = search.evaluator(clip, collector.tokenizer, collector.preprocess, names, device, reuse=False)
    forget_sets = forget_sets_of(names, evaluator.datasets, search.forget_set)
    class_names = {name: evaluator.class_names(name) for name in evaluator.datasets}
    set_sizes = {name: {"classes": len(d.class_names), "images": len(d)} for name, d in evaluator.datasets.items()}
    evaluation_seconds = 0.0
    latest = {}

    def evaluate() -> dict:
        nonlocal evaluation_seconds
        began = time.perf_counter()
        latest["counts"] = evaluator.run()
        latest["summary"] = summarize(latest["counts"], class_names, forget_sets, search.averaging)
        evaluation_seconds += time.perf_counter() - began
        measured = accuracies(latest["summary"])
        return {
            "forget_top1": {c: a["top1"] for c, a in measured["forget"].items()},
            "forget_top5": {c: a["top5"] for c, a in measured["forget"].items()},
            "test_top1": {s: a["top1"] for s, a in measured["test"].items()},
        }

    evaluate()
    before, before_counts = latest["summary"], latest["counts"]
    base = {name: tensor.detach().clone() for name, tensor in clip.state_dict().items()}
    memory = PeakMemory().start()
    result = run_baseline(
        method,
        clip,
        lambda: {c.name: datamodule.forget_dataloader(c) for c in concepts},
        datamodule.retain_dataloader,
        settings,
        device,
        evaluate=evaluate,
    )
    memory.stop()
    total = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None, base
    state = clip.state_dict()
    after = latest["summary"]
    report = assemble_report(
        method=method,
        concepts=[
            {
                "name": c,
                "verdict": concept_verdict(
                    before["forget"][c][search.metric], after["forget"][c][search.metric], search.threshold
                ),
                "layer": None,
                "tower": None,
                "step_size": None,
                "relative_change": None,
                "round": None,
                "forget_samples": result.forget_samples.get(c, 0),
                **{
                    f"forget_{k}_{when}": summary["forget"][c][k]
                    for when, summary in (("before", before), ("after", after))
                    for k in ("top1", "top5")
                },
            }
            for c in names
        ],
        model={**identity, "parameters": count_parameters(clip)},
        retain_samples=result.retain_samples,
        skipped_samples=0,
        before=before,
        after=after,
        test_classes=class_changes(before_counts, latest["counts"], class_names, forget_sets),
        search=result.iterations,
        settings={
            "method": method,
            **settings_used(method, settings),
            "metric": search.metric,
            "threshold": search.threshold,
        },
        timing={
            "method_s": result.method_seconds,
            "evaluation_s": evaluation_seconds,
            "total_s": total,
            "iterations": len(result.iterations),
        },
        memory=peak_memory({"method": memory.result}),
        edit=edit_size(base, state),
        devices=1,
    )
    report["data"] = describe_data(datamodule, search.sets, set_sizes)
    report["software"] = software()
    report["command"] = reproduce_command(output / "config.yaml")
    output.mkdir(parents=True, exist_ok=True)
    write_csv(output / "iterations.csv", [flat_row(row) for row in result.iterations])
    save_state_dict(
        output / "model.safetensors", state, metadata={"format": "pt", "method": method, "unlearned": ",".join(names)}
    )
    write_text(output / "report.md", render_baseline_markdown(report))
    write_json(output / "report.json", report)  # last: its presence marks a finished run
    return report, base
