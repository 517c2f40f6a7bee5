"""Everything an ``unlearn`` run leaves behind: the report (``report.json`` contract of DESIGN.md), the
tables, the tensors and the plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from slug_lightning.artifacts import save_state_dict, write_csv, write_json, write_text
from slug_lightning.memory import lifetime_peak_rss_mib
from slug_lightning.models import count_parameters

LAYER_COLUMNS = ["concept", "layer", "tower", "importance", "alignment", "weight_norm", "grad_norm", "pareto"]


def peak_memory(collector, search) -> dict:
    """Peak memory per phase (MiB), and the process's lifetime peak RSS.

    A reused gradient store has no gradient phase to measure.
    """
    phases = {"gradients": collector.memory.result, "search": search.memory.result}
    phases = {phase: result for phase, result in phases.items() if result}
    # Sampled and lifetime RSS come from different counters; the lifetime peak is at least every phase's.
    lifetime = max([lifetime_peak_rss_mib(), *(result["peak_rss_mib"] for result in phases.values())])
    return {**phases, "peak_rss_mib": round(lifetime, 1)}


def _accuracies(summary: dict) -> dict:
    return {
        side: {name: {"top1": acc["top1"], "top5": acc["top5"]} for name, acc in summary[side].items()}
        for side in ("forget", "test")
    }


def build_report(collector, search, total_seconds: float, devices: int) -> dict:
    """The ``report.json`` content for a finished run."""
    store = collector.gradients
    towers = {s.name: s.tower for stats in search.layers.values() for s in stats}
    concepts = []
    for name, probe in search.chosen.items():
        concepts.append({
            "name": name,
            "layer": probe.layer,
            "tower": towers[probe.layer],
            "step_size": probe.step_size,
            "relative_change": probe.relative_change,
            "forget_samples": store.forget_samples[name],
        })
    return {
        "model": {**store.model, "parameters": count_parameters(collector.model)},
        "concepts": concepts,
        "retain_samples": store.retain_samples,
        "skipped_samples": store.skipped_samples,
        "before": _accuracies(search.before),
        "after": _accuracies(search.after),
        "search": [
            {"concept": p.concept, "layer": p.layer, "step": p.step, "step_size": p.step_size,
             "relative_change": p.relative_change, "forget_top1": p.forget_top1, "forget_top5": p.forget_top5,
             "test_top1": p.test_top1, "test_top5": p.test_top5, "seconds": p.seconds}
            for p in search.probes
        ],
        "settings": {"metric": search.metric, "threshold": search.threshold, "max_steps": search.max_steps,
                     "tolerance": search.tolerance, "towers": list(search.towers),
                     "signed_alignment": search.signed_alignment},
        "timing": {"gradients_s": collector.seconds, "search_s": search.seconds, "total_s": total_seconds,
                   "probes": len(search.probes), "reused_gradients": collector.reused},
        "memory": peak_memory(collector, search),
        "devices": devices,
    }


def write_unlearn_artifacts(output: Path, collector, search, total_seconds: float, devices: int,
                            reused_gradients: bool) -> dict:
    """Write every artifact of a run into ``output`` (rank 0 only) and return the report."""
    from slug_lightning import plots

    output.mkdir(parents=True, exist_ok=True)
    store = collector.gradients
    report = build_report(collector, search, total_seconds, devices)
    if not reused_gradients or not (output / "gradients.safetensors").exists():
        store.save(output / "gradients.safetensors")
    layer_rows = [{"concept": concept, **asdict(stats)} for concept, rows in search.layers.items() for stats in rows]
    write_csv(output / "layers.csv", [{**row, "layer": row["name"]} for row in layer_rows], LAYER_COLUMNS)
    write_csv(output / "search.csv", _search_rows(search))

    deltas, entries = {}, []
    for concept, probe in search.chosen.items():
        key = f"{concept}/{probe.layer}"
        deltas[key] = probe.step_size * store.forget[concept][probe.layer]
        entries.append({"key": key, "concept": concept, "layer": probe.layer, "step_size": probe.step_size})
    save_state_dict(output / "delta.safetensors", deltas, metadata={
        "format": "slug_lightning.delta/1", "model": json.dumps(store.model), "entries": json.dumps(entries),
        "base_fingerprint": collector.base_fingerprint,
    })
    save_state_dict(output / "model.safetensors", collector.model.state_dict(), metadata={
        "format": "pt", "model": json.dumps(store.model), "unlearned": json.dumps(list(search.chosen)),
    })
    report["plots"] = plots.unlearn_plots(output, search)
    write_json(output / "report.json", report)
    write_text(output / "report.md", render_markdown(report))
    return report


def _search_rows(search) -> list[dict]:
    rows = []
    for p in search.probes:
        row = {"concept": p.concept, "layer": p.layer, "step": p.step, "step_size": p.step_size,
               "relative_change": p.relative_change, "forget_top1": p.forget_top1, "forget_top5": p.forget_top5}
        row.update({f"test_top1[{name}]": value for name, value in p.test_top1.items()})
        row.update({f"test_top5[{name}]": value for name, value in p.test_top5.items()})
        row["seconds"] = p.seconds
        rows.append(row)
    return rows


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def format_accuracy_table(results: dict[str, dict], title: str = "zero-shot accuracy (%)") -> str:
    """A plain-text table of ``{set: {top1, top5, count}}``."""
    lines = [title, f"{'set':<24}{'top-1':>8}{'top-5':>8}{'images':>8}"]
    for name, acc in results.items():
        lines.append(f"{name:<24}{_pct(acc['top1']):>8}{_pct(acc['top5']):>8}{acc.get('count', ''):>8}")
    return "\n".join(lines)


def summary_lines(report: dict) -> list[str]:
    """Before/after rows of forget and test accuracy, for the terminal and report.md."""
    rows = []
    for side in ("forget", "test"):
        for name, before in report["before"][side].items():
            after = report["after"][side][name]
            rows.append(f"| {side} | {name} | {_pct(before['top1'])} | {_pct(after['top1'])} | "
                        f"{_pct(before['top5'])} | {_pct(after['top5'])} |")
    return rows


def memory_summary(memory: dict) -> str:
    """``gradients 812 RSS / 301 CUDA, search ...`` from ``report["memory"]``."""
    parts = []
    for phase in ("gradients", "search"):
        if memory.get(phase):
            values = " / ".join(f"{v:.0f} {k.split('_')[1].upper()}" for k, v in memory[phase].items())
            parts.append(f"{phase} {values}")
    parts.append(f"process peak {memory['peak_rss_mib']:.0f} RSS")
    return ", ".join(parts)


def render_markdown(report: dict) -> str:
    """``report.md``: the run for a person to read."""
    model = report["model"]
    lines = [
        "# SLUG unlearning report", "",
        f"Model: `{model['name']}` (pretrained: `{model.get('pretrained')}`, {model['parameters']:,} parameters). "
        f"Devices: {report['devices']}. Retain pairs: {report['retain_samples']}; skipped samples: "
        f"{report['skipped_samples']}.", "",
        "## Chosen edits", "",
        "| concept | layer | tower | step size λ | relative change | forget pairs |", "|---|---|---|---|---|---|",
    ]
    for c in report["concepts"]:
        lines.append(f"| {c['name']} | `{c['layer']}` | {c['tower']} | {c['step_size']:.4g} | "
                     f"{c['relative_change']:.4f} | {c['forget_samples']} |")
    lines += ["", "## Accuracy before and after (%)", "",
              "| kind | set / concept | top-1 before | top-1 after | top-5 before | top-5 after |",
              "|---|---|---|---|---|---|", *summary_lines(report), ""]
    timing = report["timing"]
    lines += ["## Cost", "",
              f"Gradients {timing['gradients_s']:.1f} s, search {timing['search_s']:.1f} s "
              f"({timing['probes']} probes), total {timing['total_s']:.1f} s. "
              f"Peak memory (MiB): {memory_summary(report['memory'])}.", ""]
    if report.get("plots"):
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in report["plots"]]
        lines.append("")
    return "\n".join(lines)
