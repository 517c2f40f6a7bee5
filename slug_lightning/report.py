"""Everything an ``unlearn`` run leaves behind: the report (``report.json``, its keys described in
docs/report_format.md), the tables, the tensors and the plots.

:func:`assemble_report` is the one schema of ``report.json`` for every method; :func:`build_report` fills it for
SLUG from its :class:`~slug_lightning.results.SearchResult`, ``baseline_unlearn`` for the baselines. Rendering for
people (``report.md``, the terminal) is :mod:`slug_lightning.report_render`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from slug_lightning.artifacts import flat_row, write_csv, write_json, write_text
from slug_lightning.deltas import Delta, Provenance, make_delta, write_checkpoint, write_delta
from slug_lightning.memory import lifetime_peak_rss_mib
from slug_lightning.models import count_parameters
from slug_lightning.provenance import public_identity, software
from slug_lightning.report_render import render_markdown
from slug_lightning.reproduce import reproduce_command
from slug_lightning.results import SearchResult, Summary
from slug_lightning.search import concept_verdict, run_verdict

LAYER_COLUMNS = ["concept", "layer", "tower", "importance", "alignment", "weight_norm", "grad_norm", "pareto", "front"]


def peak_memory(phases: dict[str, dict]) -> dict:
    """Peak memory per phase (MiB; a phase that did not run, e.g. a reused gradient pass, is left out), and the
    process's lifetime peak RSS."""
    phases = {phase: result for phase, result in phases.items() if result}
    # Sampled and lifetime RSS come from different counters; the lifetime peak is at least every phase's.
    lifetime = max([lifetime_peak_rss_mib(), *(result["peak_rss_mib"] for result in phases.values())])
    return {**phases, "peak_rss_mib": round(lifetime, 1)}


def accuracies(summary: Summary) -> dict:
    """A summary's top-1 and top-5 per forget concept and per test set (the image counts left out)."""
    return {
        side: {name: {"top1": acc["top1"], "top5": acc["top5"]} for name, acc in summary[side].items()}
        for side in ("forget", "test")
    }


def assemble_report(
    *,
    method: str,
    concepts: list[dict],
    model: dict,
    retain_samples: int,
    skipped_samples: int,
    before: Summary,
    after: Summary,
    search: list[dict],
    settings: dict,
    timing: dict,
    memory: dict,
    edit: dict,
    devices: int,
    test_classes: dict | None = None,
    leave_one_out: dict[str, Summary] | None = None,
    orders: list[dict] | None = None,
    smoke: dict | None = None,
) -> dict:
    """The ``report.json`` of any method, every key always present (docs/report_format.md).

    ``concepts`` carry each concept's ``verdict``; the run's verdict is derived from them. ``smoke`` describes a
    smoke run (``--trainer.fast_dev_run``): ``{"batches_per_stream", "probes_per_layer"}``; its numbers mean
    nothing.
    """
    return {
        "method": method,
        # A smoke run checks that the config runs end to end, on a batch or two and two probes per layer: no result.
        "smoke_run": smoke is not None,
        **({"smoke": dict(smoke)} if smoke is not None else {}),
        # "forgotten", "partly forgotten", "not forgotten" or "nothing to forget" (each concept's is in `concepts`)
        "verdict": run_verdict([c["verdict"] for c in concepts]),
        "model": model,
        "concepts": concepts,
        "retain_samples": retain_samples,
        "skipped_samples": skipped_samples,
        "before": accuracies(before),
        "after": accuracies(after),
        # Several concepts: the final evaluation with one concept's edit taken out, per concept.
        "leave_one_out": {name: accuracies(summary) for name, summary in (leave_one_out or {}).items()},
        # Each test class's top-1 before and after, per set, the largest fall first: who paid for the edit.
        "test_classes": test_classes or {},
        # SLUG: every probe; a baseline: every iteration.
        "search": search,
        # Several concepts: where the search ended from each concept order (`orders`), the kept one marked.
        "orders": orders or [],
        "settings": settings,
        "timing": timing,
        "memory": memory,
        # What shipping the edit costs.
        "edit": edit,
        "devices": devices,
    }


def search_rows(probes) -> tuple[list[dict], list[str]]:
    """The rows and columns of ``search.csv``: a probe per row, its test accuracies as ``test_top1[set]`` columns.
    An untested probe (forget first) has no test accuracies: its cells stay empty, not 0.

    Example::

        >>> from slug_lightning.search import Probe
        >>> rows, columns = search_rows([Probe("x", "l", 0, 1.0, 0.1, 0.5, 0.5, tested=False),
        ...                              Probe("x", "l", 1, 2.0, 0.2, 0.0, 0.0, {"a": 0.7}, {"a": 0.9})])
        >>> [c for c in columns if c.startswith("test_")], "test_top1[a]" in rows[0]
        (['test_top1[a]', 'test_top5[a]'], False)
    """
    rows = [flat_row(asdict(p)) for p in probes]
    # The columns in a tested row's order (an untested one has no test columns).
    columns = dict.fromkeys(key for row in sorted(rows, key=lambda row: not row["tested"]) for key in row)
    return rows, list(columns)


def build_report(
    collector, result: SearchResult, total_seconds: float, devices: int, smoke: dict | None = None
) -> dict:
    """The ``report.json`` content of a finished SLUG run (``smoke``: see :func:`assemble_report`)."""
    store = collector.gradients
    edits = {edit.concept: edit for edit in result.edits}
    concepts = []
    for name in store.concepts:  # the order given; a concept with nothing to forget has no edit
        edit = edits.get(name)
        concepts.append(
            {
                "name": name,
                "verdict": concept_verdict(
                    result.before["forget"][name][result.metric],
                    result.after["forget"][name][result.metric],
                    result.threshold,
                ),
                "layer": edit.layer if edit else None,
                "tower": edit.tower if edit else None,
                "step_size": edit.step_size if edit else None,
                "relative_change": edit.relative_change if edit else None,
                "round": edit.round if edit else None,  # 0: the search of METHOD §9; r: changed in refinement round r
                "forget_samples": store.forget_samples[name],
                # The final evaluation, with every concept's edit applied (METHOD §9).
                **{
                    f"forget_{k}_{when}": summary["forget"][name][k]
                    for when, summary in (("before", result.before), ("after", result.after))
                    for k in ("top1", "top5")
                },
            }
        )
    sizes = [store.forget[edit.concept][edit.layer] for edit in edits.values()]
    return assemble_report(
        method="slug",
        concepts=concepts,
        model={**public_identity(store.model), "parameters": count_parameters(collector.model)},
        retain_samples=store.retain_samples,
        skipped_samples=store.skipped_samples,
        before=result.before,
        after=result.after,
        leave_one_out=result.leave_one_out,
        test_classes=result.test_classes,
        search=[asdict(p) for p in result.probes],
        orders=[
            {
                "concepts": end.order,
                "kept": index == result.kept_order,
                "probes": end.probes,
                "edits": {c: {"layer": p.layer, "step_size": p.step_size} for c, p in end.chosen.items()},
                **accuracies(end.after),
            }
            for index, end in enumerate(result.ends)
        ],
        settings=result.settings,
        timing={
            "gradients_s": collector.seconds,
            "search_s": result.seconds,
            "total_s": total_seconds,
            "probes": len(result.probes),
            "reused_gradients": collector.reused,
        },
        memory=peak_memory({"gradients": collector.memory.result, "search": result.memory}),
        # One delta per concept (delta.safetensors, fp32).
        edit={
            "tensors": len(sizes),
            "entries": sum(g.numel() for g in sizes),
            "parameters": sum(g.numel() for g in sizes),
            "bytes": sum(g.numel() * g.element_size() for g in sizes),
        },
        devices=devices,
        smoke=smoke,
    )


def run_delta(collector, result: SearchResult) -> Delta:
    """The run's chosen updates λ·G_f, one per concept, for the base model θ⁰ the gradients were taken at.

    The model in memory carries the edits by now; its base fingerprint was taken before the search
    (``GradientCollector.base_fingerprint``), and equals the gradient store's model fingerprint.
    """
    store = collector.gradients
    base = collector.base_fingerprint or store.model.get("fingerprint")
    updates = [
        (
            {
                "concept": edit.concept,
                "layer": edit.layer,
                "step_size": edit.step_size,
                "tower": edit.tower,
                "relative_change": edit.relative_change,
            },
            edit.update(store.forget),
        )
        for edit in result.edits
    ]
    return make_delta(updates, base, store.model)


def describe_data(datamodule, sets, set_sizes: dict[str, dict[str, int]]) -> dict:
    """What the run read: shards, concepts, and each evaluation set's size (for report.md and the record).

    Args:
        datamodule: The run's ``LaionDataModule`` (or None).
        sets: The evaluation sets (``LabelledSet``).
        set_sizes: Per set, its ``classes`` and ``images`` as loaded.
    """
    data = {}
    if datamodule is not None and hasattr(datamodule, "shards"):
        data = {
            "shards": datamodule.shards,
            "forget_shards": datamodule.forget_shards,
            "batch_size": datamodule.batch_size,
            "retain_augmentation": datamodule.retain_augmentation,
            "concepts": [{"name": c.name, "aliases": list(c.aliases)} for c in datamodule.concepts],
        }
    data["evaluation_sets"] = [
        {
            "name": spec.name,
            "source": spec.root if spec.root is not None else f"hf:{spec.hf_dataset}",
            "fraction": spec.fraction,
            "templates": len(spec.templates),
            **set_sizes.get(spec.name, {}),
            # How the test accuracy averages: over images (micro) or over classes (macro).
            "averaging": spec.averaging,
            # The layout and the `classes`/`image_classes` narrowing as given (a file, or how many names were listed).
            **{
                key: value if isinstance(value, str) else f"{len(value)} names"
                for key, option in (
                    ("labels_file", "labels_file"),
                    ("class_list", "classes"),
                    ("image_class_list", "image_classes"),
                )
                if (value := getattr(spec, option)) is not None
            },
        }
        for spec in sets
    ]
    return data


def write_unlearn_artifacts(
    output: Path,
    collector,
    result: SearchResult,
    sets,
    total_seconds: float,
    devices: int,
    datamodule=None,
    smoke: dict | None = None,
) -> dict:
    """Write every artifact of a SLUG run into ``output`` (rank 0 only) and return the report (``smoke``: see
    :func:`assemble_report`; ``sets``: the evaluation sets)."""
    from slug_lightning import plots

    output.mkdir(parents=True, exist_ok=True)
    store = collector.gradients
    report = build_report(collector, result, total_seconds, devices, smoke)
    report["data"] = describe_data(datamodule, sets, result.set_sizes)
    report["loggers"] = [
        {"name": type(logger).__name__, "dir": logger.log_dir}
        for logger in (collector.loggers if collector._trainer is not None else [])
        if getattr(logger, "log_dir", None)
    ]
    report["software"] = software()
    # config.yaml is written by the command line before the run (none: no command)
    report["command"] = reproduce_command(output / "config.yaml")
    if not (output / "gradients.safetensors").exists():  # the collector writes it when its pass ends
        store.save(output / "gradients.safetensors")
    layer_rows = [
        {"concept": concept, **asdict(stats), "pareto": stats.pareto}
        for concept, rows in result.layers.items()
        for stats in rows
    ]
    write_csv(output / "layers.csv", [{**row, "layer": row["name"]} for row in layer_rows], LAYER_COLUMNS)
    write_csv(output / "search.csv", *search_rows(result.probes))

    delta = run_delta(collector, result)
    write_delta(output / "delta.safetensors", delta)
    # What model.safetensors carries: the edits, unless the search was told to restore θ⁰ (apply=False).
    carried = delta.entries if result.applied else []
    provenance = Provenance(
        delta.base_fingerprint, [{k: e[k] for k in ("concept", "layer", "step_size")} for e in carried]
    )
    write_checkpoint(
        output / "model.safetensors",
        collector.model.state_dict(),
        provenance,
        metadata={"model": json.dumps(store.model)},
    )
    report["plots"] = plots.unlearn_plots(output, result)
    write_json(output / "report.json", report)
    write_text(output / "report.md", render_markdown(report))
    return report
