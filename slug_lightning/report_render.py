"""``report.md`` and the terminal summary: a finished run's ``report.json`` content (docs/report_format.md) written
for a person to read. Every function here reads the report dictionary only."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from slug_lightning.search import FORGOTTEN, NOTHING_TO_FORGET, concept_verdict, is_forgotten


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _change(before: float | None, after: float | None) -> str:
    """The change in percentage points, signed; n/a where either side was not measured."""
    if "n/a" in (_pct(before), _pct(after)):
        return "n/a"
    return f"{100 * (after - before):+.1f}"


def format_accuracy_table(results: dict[str, dict], title: str = "zero-shot accuracy (%)") -> str:
    """A plain-text table of ``{set: {top1, top5, count}}``."""
    lines = [title, f"{'set':<24}{'top-1':>8}{'top-5':>8}{'images':>8}"]
    for name, acc in results.items():
        lines.append(f"{name:<24}{_pct(acc['top1']):>8}{_pct(acc['top5']):>8}{acc.get('count', ''):>8}")
    return "\n".join(lines)


def weights_text(model: dict) -> str:
    """The weights a run started from: the pretrained tag, or a local checkpoint's name and the start of its sha256.

    Example::

        >>> weights_text({"pretrained": "sha256:" + "ab" * 32, "pretrained_file": "fit.safetensors"})
        '`fit.safetensors` (sha256:abababababab…)'
    """
    pretrained, name = model.get("pretrained"), model.get("pretrained_file")
    if name is None:
        return f"`{pretrained}`"
    return f"`{name}`" + (f" ({pretrained[:19]}…)" if pretrained else "")


def summary_lines(report: dict) -> list[str]:
    """Before/after rows of forget and test accuracy, for the terminal and report.md."""
    rows = []
    for side in ("forget", "test"):
        for name, before in report["before"][side].items():
            after = report["after"][side][name]
            change = _change(before["top1"], after["top1"])
            rows.append(
                f"| {side} | {name} | {_pct(before['top1'])} | {_pct(after['top1'])} | {change} | "
                f"{_pct(before['top5'])} | {_pct(after['top5'])} |"
            )
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
        "# SLUG unlearning report",
        "",
        *([f"> **{smoke_note(report)}**", ""] if report.get("smoke_run") else []),
        *_verdict(report),
        "",
        f"Model: `{model['name']}` (pretrained: {weights_text(model)}, {model['parameters']:,} parameters). "
        f"Devices: {report['devices']}.",
        "",
        *_data_lines(report),
        "## Chosen edits",
        "",
        "| concept | layer | tower | step size λ | relative change | forget pairs |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["concepts"]:
        if c["layer"] is None:
            lines.append(f"| {c['name']} | none: nothing to forget | | | | {c['forget_samples']} |")
            continue
        lines.append(
            f"| {c['name']} | `{c['layer']}` | {c['tower']} | {c['step_size']:.4g} | "
            f"{c['relative_change']:.4f} | {c['forget_samples']} |"
        )
    fronts = report["settings"].get("fronts", 1)
    if fronts > 1:
        lines += [
            "",
            f"Searched: the layers of Pareto fronts 1–{fronts} of each tower (`fronts: {fronts}`), not only "
            "the front of METHOD §4.",
        ]
    kept = _kept_order(report)
    rounds = max((p.get("round", 0) for p in report.get("search", []) if p.get("order", 0) == kept), default=0)
    if rounds:
        changed = [f"{c['name']} (round {c['round']})" for c in report["concepts"] if c.get("round")]
        lines += [
            "",
            f"After the search of METHOD §9, {rounds} refinement round(s) searched each concept again with "
            "every other edit applied (`refine_rounds`); edits changed there: "
            + (", ".join(changed) if changed else "none")
            + ".",
        ]
    lines += [
        "",
        "## Accuracy before and after (%)",
        "",
        "Forget: the concept's images classified among all classes of its set. Test: every other image "
        f"of each set. The search's forget test: {report['settings']['metric']} ≤ "
        f"{report['settings']['threshold']}.",
        "",
        "| kind | set / concept | top-1 before | top-1 after | Δ top-1 | top-5 before | top-5 after |",
        "|---|---|---|---|---|---|---|",
        *summary_lines(report),
        "",
    ]
    lines += _class_lines(report)
    lines += _leave_one_out_lines(report)
    lines += _order_lines(report)
    timing = report["timing"]
    # Forget first: probes that failed the forget test skipped the test sets (METHOD §6).
    untested = sum(not p.get("tested", True) for p in report.get("search", []))
    skipped = f", {untested} of them on the forget images alone" if untested else ""
    lines += [
        "## Cost",
        "",
        f"Gradients {timing['gradients_s']:.1f} s{' (reused)' if timing.get('reused_gradients') else ''}, "
        f"search {timing['search_s']:.1f} s ({timing['probes']} probes{skipped}), total {timing['total_s']:.1f} s. "
        f"Peak memory (MiB): {memory_summary(report['memory'])}.",
        "",
    ]
    plots = report.get("plots", [])
    for title, prefix, note in _PLOT_SECTIONS:
        chosen = [p for p in plots if Path(p).name.startswith(prefix)]
        if chosen:
            lines += [f"## {title}", "", note, "", *[f"![{Path(p).stem}]({p})" for p in chosen], ""]
    if report.get("loggers"):
        lines += [
            "## Probes",
            "",
            "Every probe is in `search.csv` and `report.json`, and was logged by "
            + "; ".join(f"{logger['name']} in `{logger['dir']}`" for logger in report["loggers"])
            + ".",
            "",
        ]
    lines += reproduce_lines(report)
    return "\n".join(lines)


def software_line(software: dict) -> str:
    """``report["software"]`` in one sentence: slug_lightning's version and commit, Python, the packages.

    Example::

        >>> software_line({"slug_lightning": "0.1.0", "commit": "0123456789abcdef", "dirty": True,
        ...                "python": "3.11.7", "packages": {"torch": "2.4.0", "webdataset": None}})
        'slug_lightning 0.1.0 (commit 0123456789ab, with uncommitted changes), Python 3.11.7, torch 2.4.0.'
    """
    commit = software.get("commit")
    where = f" (commit {commit[:12]}{', with uncommitted changes' if software.get('dirty') else ''})" if commit else ""
    parts = [f"slug_lightning {software.get('slug_lightning')}{where}", f"Python {software.get('python')}"]
    parts += [f"{name} {version}" for name, version in (software.get("packages") or {}).items() if version]
    return ", ".join(parts) + "."


def reproduce_lines(report: dict) -> list[str]:
    """The ``Reproduce`` section: the software the run used and the command that runs it again into a fresh
    directory (either may be missing: a report of an older version, a run not started by the command line)."""
    lines = []
    if report.get("software"):
        lines += [f"Run with {software_line(report['software'])}", ""]
    if report.get("command"):
        lines += [
            "The run's saved config, into a fresh directory beside it:",
            "",
            "```bash",
            report["command"],
            "```",
            "",
        ]
    return ["## Reproduce", "", *lines] if lines else []


def smoke_note(report: dict) -> str:
    """What a smoke run's report must say first: that its numbers mean nothing, and why."""
    smoke = report.get("smoke") or {}
    batches = smoke.get("batches_per_stream")
    read = "reused gradients" if batches is None else f"gradients of {batches} batch(es) per stream"
    return (
        f"Smoke run (--trainer.fast_dev_run): {read}, at most {smoke.get('probes_per_layer', 2)} probes per "
        "layer. The numbers below mean nothing; the run only checks that the config runs end to end."
    )


def _kept_order(report: dict) -> int:
    """The index of the concept order whose end the run kept (0 without ``orders`` in the report)."""
    return next((index for index, order in enumerate(report.get("orders", [])) if order["kept"]), 0)


def _order_lines(report: dict) -> list[str]:
    """Several concepts searched from several orders: where each ended (top-1, %), for report.md."""
    orders = report.get("orders") or []
    if len(orders) < 2:
        return []
    tests = list(report["after"]["test"])
    lines = [
        "## Concept orders (top-1, %)",
        "",
        f"The whole search ran from {len(orders)} concept orders (`orders`), each from the base model; the run "
        "keeps the end that forgets the most concepts and, among those, has the highest mean test top-1.",
        "",
        "| order | forgotten | " + " | ".join(f"test {name}" for name in tests) + " | probes | kept |",
        "|---" * (4 + len(tests)) + "|",
    ]
    threshold, metric = report["settings"]["threshold"], report["settings"]["metric"]
    for order in orders:
        forgotten = sum(is_forgotten(value[metric], threshold) for value in order["forget"].values())
        cells = [_pct(order["test"][name]["top1"]) for name in tests]
        lines.append(
            f"| {', '.join(order['concepts'])} | {forgotten} of {len(order['forget'])} | "
            + " | ".join(cells)
            + f" | {order['probes']} | {'yes' if order['kept'] else ''} |"
        )
    return lines + [""]


def _class_lines(report: dict, count: int = 5) -> list[str]:
    """The ``count`` test classes of each set whose top-1 fell the most, for report.md."""
    classes = report.get("test_classes") or {}
    if not classes:
        return []
    lines = [
        "## Test classes that lost the most (top-1, %)",
        "",
        f"Per set, the {count} test classes whose top-1 fell the most; every class is in `report.json` "
        "(`test_classes`).",
        "",
        "| set | class | images | top-1 before | top-1 after | Δ top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for set_name, rows in classes.items():
        fallen = [row for row in rows if row["top1_after"] < row["top1_before"]][:count]
        for row in fallen:
            lines.append(
                f"| {set_name} | {row['name']} | {row['images']} | {_pct(row['top1_before'])} | "
                f"{_pct(row['top1_after'])} | {_change(row['top1_before'], row['top1_after'])} |"
            )
        if not fallen:
            lines.append(f"| {set_name} | no class lost top-1 | | | | |")
    return lines + [""]


def _leave_one_out_lines(report: dict) -> list[str]:
    """Several concepts: top-1 with all edits, then with each concept's edit left out, for report.md."""
    left_out = report.get("leave_one_out") or {}
    if not left_out:
        return []
    tests, concepts = list(report["after"]["test"]), [c["name"] for c in report["concepts"]]
    rows = [("every edit", report["after"])] + [
        (f"all but {name}'s", left_out[name]) for name in concepts if name in left_out
    ]
    lines = [
        "## Each edit's share (top-1, %)",
        "",
        "The final model with one concept's edit left out: the test accuracy that removing its delta "
        "(`python -m slug_lightning delta remove --concept NAME`) gives back, and which other concepts need "
        "it to stay forgotten.",
        "",
        "| edits | "
        + " | ".join(f"test {name}" for name in tests)
        + " | "
        + " | ".join(f"forget {name}" for name in concepts)
        + " |",
        "|---" * (1 + len(tests) + len(concepts)) + "|",
    ]
    for label, result in rows:
        cells = [_pct(result["test"][name]["top1"]) for name in tests] + [
            _pct(result["forget"][name]["top1"]) for name in concepts
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_baseline_markdown(report: dict) -> str:
    """``report.md`` of a baseline run (``unlearn --method ft|ga|gaft|salun|ssd``)."""
    model, settings, timing, edit = report["model"], report["settings"], report["timing"], report["edit"]
    tuned = ", ".join(f"{k} {v}" for k, v in settings.items() if k not in ("method", "metric"))
    metric = settings.get("metric", "top1")
    verdicts = "; ".join(
        f"{c['name']} {c['verdict'].upper() if c['verdict'] == 'not forgotten' else c['verdict']} "
        f"(forget {metric} {_pct(report['before']['forget'][c['name']][metric])}% → "
        f"{_pct(report['after']['forget'][c['name']][metric])}%)"
        for c in report["concepts"]
        if "verdict" in c
    )
    lines = [
        f"# Unlearning report: baseline {report['method'].upper()}",
        "",
        *([f"Verdict: {verdicts}.", ""] if verdicts else []),
        f"Model: `{model['name']}` (pretrained: {weights_text(model)}, {model['parameters']:,} parameters). "
        f"Settings: {tuned}.",
        "",
        *_data_lines(report),
        "## Accuracy before and after (%)",
        "",
        "| kind | set / concept | top-1 before | top-1 after | Δ top-1 | top-5 before | top-5 after |",
        "|---|---|---|---|---|---|---|",
        *summary_lines(report),
        "",
    ]
    headers = [f"forget top-1 {c['name']}" for c in report["concepts"]] + [
        f"test top-1 {name}" for name in report["after"]["test"]
    ]
    lines += [
        "## Iterations",
        "",
        "| iteration | seconds | " + " | ".join(headers) + " |",
        "|---" * (2 + len(headers)) + "|",
    ]
    for row in report["search"]:
        cells = [_pct(row["forget_top1"].get(c["name"])) for c in report["concepts"]]
        cells += [_pct(row["test_top1"].get(s)) for s in report["after"]["test"]]
        lines.append(f"| {row['iteration']} | {row['seconds']:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost",
        "",
        f"Method {timing['method_s']:.1f} s, evaluations {timing['evaluation_s']:.1f} s, total "
        f"{timing['total_s']:.1f} s. Peak memory: {report['memory']['peak_rss_mib']:.0f} MiB RSS. The edit "
        f"changes {edit['tensors']} tensors ({edit['entries']:,} entries); shipping it takes "
        f"{edit['bytes'] / 2**20:.1f} MiB.",
        "",
    ]
    lines += reproduce_lines(report)
    return "\n".join(lines)


def _verdict(report: dict) -> list[str]:
    """The run in a few sentences: whether each concept was forgotten and by which edit (or plainly that it was not,
    and what the best probe reached), then what the test sets kept."""
    lines = [concept_sentence(concept, report, markdown=True) for concept in report["concepts"]]
    kept = "; ".join(
        f"{name} {_pct(before['top1'])}% → {_pct(report['after']['test'][name]['top1'])}%"
        for name, before in report["before"]["test"].items()
    )
    return [" ".join(lines), f"Test top-1 (all other images): {kept}."]


def concept_sentence(concept: dict, report: dict, markdown: bool = False) -> str:
    """One concept's verdict in words: forgotten by which edit, NOT forgotten (and the best the search reached), or
    nothing to forget (the model did not recognise it, so nothing was edited)."""
    metric, threshold = report["settings"]["metric"], report["settings"]["threshold"]
    before, after = (report[when]["forget"][concept["name"]][metric] for when in ("before", "after"))
    name = f"**{concept['name']}**" if markdown else repr(concept["name"])
    criterion = f"forget {metric} ≤ {_pct(threshold)}%"
    verdict = concept.get("verdict") or concept_verdict(before, after, threshold)
    if verdict == NOTHING_TO_FORGET:
        return (
            f"{name}: nothing to forget: the model did not recognise it to begin with (forget {metric} "
            f"{_pct(before)}%, the criterion is {criterion}), so no layer was edited."
        )
    layer = f"`{concept['layer']}`" if markdown else concept["layer"]
    edit = (
        f"one layer, {layer} ({concept['tower']} tower), with λ = {concept['step_size']:.4g} "
        f"({100 * concept['relative_change']:.2f}% of its norm)"
    )
    reached = f"forget {metric} {_pct(before)}% → {_pct(after)}%"
    if verdict != FORGOTTEN:
        return (
            f"{name} was NOT forgotten: no probe met the criterion ({criterion}); the best edit found, {edit}, "
            f"leaves {reached}."
        )
    return f"{name} was forgotten by editing {edit}: {reached}."


_PLOT_SECTIONS = (
    (
        "Layers: importance against alignment",
        "pareto_",
        "Every candidate layer of each tower; the Pareto front (most important for the forget set, least aligned "
        "with the retain gradient), and the further fronts of `fronts`, are labelled and searched, the chosen layer "
        "circled.",
    ),
    (
        "Step-size search",
        "search_",
        "Forget and test accuracy of every probe of every searched layer against the step size λ.",
    ),
    (
        "Refinement rounds",
        "refinement",
        "The model the refinement rounds start from, then the model each concept's visit leaves (the untangle move "
        "included): each test set's top-1 and the forget accuracy of the concept least forgotten; one panel per "
        "concept order with `orders`.",
    ),
    (
        "Image–text similarity",
        "similarity_",
        "Cosine of each name's text embedding (rows) with the mean embedding of each class's images (columns), "
        "before and after: the forgotten concept's row and column should fade, the others' diagonal stay.",
    ),
)


def _data_lines(report: dict) -> list[str]:
    data = report.get("data") or {}
    lines = ["## Data", ""]
    if "shards" in data:
        concepts = "; ".join(
            c["name"] + (f" (aliases: {', '.join(c['aliases'])})" if c["aliases"] else "") for c in data["concepts"]
        )
        forget_pairs = ", ".join(f"{c['name']} {c['forget_samples']}" for c in report["concepts"])
        lines += [
            f"- Concepts: {concepts}",
            f"- Retain shards: `{data['shards']}`; forget shards: `{data['forget_shards']}`; global batch "
            f"{data['batch_size']}"
            + ("; retain images through the training augmentation" if data.get("retain_augmentation") else ""),
            f"- Pairs: {forget_pairs} (forget), {report['retain_samples']} (retain); skipped samples: "
            f"{report['skipped_samples']}",
        ]
    for spec in data.get("evaluation_sets", []):
        size = f"{spec['classes']} classes, {spec['images']} images" if "images" in spec else "size unknown"
        subset = f" ({spec['fraction']:.0%} subset)" if spec["fraction"] < 1 else ""
        narrowed = "".join(
            f", {option} `{spec[key]}`"
            for key, option in (
                ("labels_file", "labels_file"),
                ("class_list", "classes"),
                ("image_class_list", "image_classes"),
            )
            if key in spec
        )
        averaging = spec.get("averaging", "micro")
        over = {"micro": "images", "macro": "classes"}.get(averaging, averaging)
        lines.append(
            f"- Evaluation set `{spec['name']}`: `{spec['source']}`{narrowed}, {size}{subset}, "
            f"{spec['templates']} template(s), test accuracy averaged over {over} ({averaging})"
        )
    return lines + [""] if len(lines) > 2 else []


def terminal_summary(report: dict, output: Path) -> str:
    """The compact table printed at the end of a run: the edits, before/after per set, the artifacts."""
    rule = "=" * 76
    verdict = report.get("verdict")
    smoke = " (SMOKE RUN, the numbers mean nothing)" if report.get("smoke_run") else ""
    lines = ["", rule, f"SLUG result{smoke}" + (f": {verdict.upper()}" if verdict else "")]
    if smoke:
        lines += textwrap.wrap(smoke_note(report), width=len(rule), initial_indent="  ", subsequent_indent="  ")
    for concept in report["concepts"]:
        lines += textwrap.wrap(
            concept_sentence(concept, report), width=len(rule), initial_indent="  ", subsequent_indent="    "
        )
    orders = report.get("orders") or []
    if len(orders) > 1:
        kept = _kept_order(report)
        lines.append(
            f"  kept the end of concept order {kept + 1} of {len(orders)}: {', '.join(orders[kept]['concepts'])}"
        )
    lines.append(f"  {'':<34}{'top-1 before':>14}{'top-1 after':>14}")
    for side in ("forget", "test"):
        for name, before in report["before"][side].items():
            after = report["after"][side][name]
            label = f"{side}: {name}"
            lines.append(f"  {label:<34}{_pct(before['top1']):>13}%{_pct(after['top1']):>13}%")
    worst = [
        (row, name)
        for name, rows in (report.get("test_classes") or {}).items()
        for row in rows[:1]
        if row["top1_after"] < row["top1_before"]
    ]
    if worst:
        lines.append(
            "  lost the most: "
            + "; ".join(
                f"{row['name']} ({name}) {_pct(row['top1_before'])}% → {_pct(row['top1_after'])}%"
                for row, name in worst
            )
        )
    timing = report["timing"]
    gradients = "reused" if timing.get("reused_gradients") else f"{timing['gradients_s']:.1f} s"
    lines.append(
        f"  gradients {gradients}, search {timing['search_s']:.1f} s "
        f"({timing['probes']} probes), total {timing['total_s']:.1f} s"
    )
    lines.append(f"  artifacts: {output}/ (report.md, report.json, model.safetensors, delta.safetensors, plots)")
    lines.append(rule)
    return "\n".join(lines)
