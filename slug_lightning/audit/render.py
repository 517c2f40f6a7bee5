"""The audit for a person to read: the ``## Audit`` section of ``report.md``, the ``audit`` block of
``report.json`` and the terminal lines, each a pure function of :func:`~slug_lightning.audit.run.audit_run`'s dict."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

HEADING = "## Audit"


def _number(value: float | None, digits: int = 2) -> str:
    """A figure, or n/a where it was not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _accuracy_rows(base: Mapping, unlearned: Mapping, label: str) -> list[str]:
    """Forget top-1 and top-5 rows of two ``{top1, top5, count}``."""
    return [
        _row(f"forget {name} ({label})", _number(base[key]), _number(unlearned[key]), base["count"])
        for key, name in (("top1", "top-1"), ("top5", "top-5"))
    ]


def _relearning_rows(relearned: Mapping | None) -> list[str]:
    """One row per ``k``: the base model's forget top-1 under the same fine-tuning, the unlearned model's step count."""
    if not relearned:
        return []
    if relearned.get("skipped"):
        return [_row("relearning", "", f"skipped: {relearned['skipped']}", relearned.get("pairs", 0))]
    rows = []
    for run in relearned["runs"]:
        reference = run["reference"]
        steps = f"{run['steps']} steps" if run["steps"] is not None else f"not within {run['budget']} steps"
        base = (
            f"forget top-1 {_number(reference['forget_top1_before'])} → "
            f"{_number(reference['forget_top1_after'])} in {reference['steps']} steps"
        )
        rows.append(
            _row(f"relearning to {_number(relearned['target'])} forget top-1, k={run['k']}", base, steps, run["k"])
        )
    return rows


def concept_table(name: str, result: Mapping, accuracy: Mapping) -> list[str]:
    """The markdown lines of one concept: its table (measure | base | unlearned | n), its verdict and note."""
    base, after = result["base"], result["unlearned"]
    search = (accuracy["base"]["search"]["forget"][name], accuracy["unlearned"]["search"]["forget"][name])
    lines = [
        f"### {name}",
        "",
        f"Images in evaluation set `{result['forget_set']}`; look-alikes: {', '.join(result['lookalikes']) or 'none'}.",
        "",
        _row("measure", "base", "unlearned", "n"),
        _row("---", "---", "---", "---"),
        *_accuracy_rows(*search, "search templates"),
        *_accuracy_rows(base["held_out"], after["held_out"], "held-out templates"),
    ]
    for other, measured in base.get("names", {}).items():
        changed = after["names"][other]
        lines.append(
            _row(f"forget top-1 as {other!r}", _number(measured["top1"]), _number(changed["top1"]), measured["count"])
        )
    for query, scores in base["retrieval"].items():
        now = after["retrieval"][query]
        lines.append(
            _row(
                f"search by {query!r}: R-precision (chance {_number(scores['chance'])})",
                _number(scores["r_precision"]),
                _number(now["r_precision"]),
                f"{scores['n_relevant']} of {scores['n_images']}",
            )
        )
        lines.append(
            _row(f"search by {query!r}: mean rank", _number(scores["mean_rank"], 1), _number(now["mean_rank"], 1), "")
        )
    probe = base.get("image_probe")
    if probe:
        lines.append(
            _row(
                f"image probe vs {len(probe['classes']) - 1} look-alikes: recall (chance {_number(probe['chance'])})",
                _number(probe["concept_accuracy"]),
                _number(after["image_probe"]["concept_accuracy"]),
                probe["count"],
            )
        )
    shift = result["similarity_shift"]
    images = shift.get("images", {})
    lines.append(
        _row(
            "image–text cosine, own images",
            _number(shift["own_before"], 3),
            _number(shift["own_after"], 3),
            images.get(name, ""),
        )
    )
    others = sum(count for other, count in images.items() if other != name)
    lines.append(
        _row(
            "image–text cosine, look-alikes' images (mean)",
            _number(shift["lookalikes_before"], 3),
            _number(shift["lookalikes_after"], 3),
            others or "",
        )
    )
    lines += _relearning_rows(result.get("relearning"))
    lines += ["", f"**Verdict:** {result['verdict']}."]
    if result.get("relearning") and result["relearning"].get("note"):
        lines += ["", f"Relearning: {result['relearning']['note']}."]
    if result.get("note"):
        lines += ["", f"*Note:* {result['note']}"]
    return lines


def test_rows(accuracy: Mapping) -> list[str]:
    """The utility table: each set's test top-1 under the search's and the held-out templates."""
    lines = [
        _row("test top-1", "base", "unlearned", "n"),
        _row("---", "---", "---", "---"),
    ]
    for label, key in (("search templates", "search"), ("held-out templates", "held_out")):
        for name, before in accuracy["base"][key]["test"].items():
            after = accuracy["unlearned"][key]["test"][name]
            lines.append(_row(f"{name} ({label})", _number(before["top1"]), _number(after["top1"]), before["count"]))
    return lines


def render_audit_markdown(audit: Mapping) -> str:
    """The ``## Audit`` section of ``report.md``."""
    held_out = audit["templates"]["held_out"]
    settings = audit["settings"]
    metric = settings["metric"].replace("top", "top-")
    lines = [
        HEADING,
        "",
        f"`python -m slug_lightning audit` of this {audit['method']} run, {audit['seconds']:.1f} s: the base model "
        f"against the unlearned one, asked in ways the {'search' if audit['method'] == 'slug' else 'run'} never "
        f"tried. {len(held_out)} held-out templates (e.g. {', '.join(repr(t) for t in held_out[:2])}; none of the "
        f"run's {len(audit['templates']['search'])}); a concept counts as recognised above forget "
        f"{metric} {settings['threshold']:.2f}. Relearning: AdamW at lr {settings['relearn_lr']:g} for "
        f"at most {settings['relearn_steps']} steps, forget top-1 measured every {settings['relearn_every']}; "
        "n is images (pairs for relearning). Details in `audit.json`.",
        "",
        *test_rows(audit["accuracy"]),
        "",
    ]
    for name, result in audit["concepts"].items():
        lines += concept_table(name, result, audit["accuracy"])
        lines.append("")
    return "\n".join(lines)


def with_audit_section(markdown: str, section: str) -> str:
    """``report.md`` with its ``## Audit`` section replaced by ``section`` (appended when there is none), so that a
    second audit does not add a second section.

    Example::

        >>> with_audit_section("# Run\\n\\n## Audit\\n\\nold\\n\\n## Later\\n\\ntext\\n", "## Audit\\n\\nnew\\n")
        '# Run\\n\\n## Later\\n\\ntext\\n\\n## Audit\\n\\nnew\\n'
    """
    kept = re.sub(r"(?ms)^## Audit[ \t]*$.*?(?=^## |\Z)", "", markdown).rstrip("\n")
    return f"{kept}\n\n{section.rstrip(chr(10))}\n" if kept else f"{section.rstrip(chr(10))}\n"


def audit_summary(audit: Mapping, file: str) -> dict:
    """The ``audit`` block of ``report.json``: per concept the verdict and key numbers, each with its sample size;
    the rest is in ``file`` (``audit.json``)."""
    concepts = {}
    for name, result in audit["concepts"].items():
        base, after = result["base"], result["unlearned"]
        retrieval = base["retrieval"][name], after["retrieval"][name]
        entry = {
            "verdict": result["verdict"],
            "note": result["note"],
            "held_out_forget_top1": {
                "base": base["held_out"]["top1"],
                "unlearned": after["held_out"]["top1"],
                "count": base["held_out"]["count"],
            },
            "search_by_name_r_precision": {
                "base": retrieval[0]["r_precision"],
                "unlearned": retrieval[1]["r_precision"],
                "chance": retrieval[0]["chance"],
                "n_relevant": retrieval[0]["n_relevant"],
                "n_images": retrieval[0]["n_images"],
            },
            "seconds": result["seconds"],
        }
        if base.get("image_probe"):
            entry["image_probe_recall"] = {
                "base": base["image_probe"]["concept_accuracy"],
                "unlearned": after["image_probe"]["concept_accuracy"],
                "chance": base["image_probe"]["chance"],
                "count": base["image_probe"]["count"],
            }
        relearned = result.get("relearning")
        if relearned and relearned.get("runs"):
            entry["relearn_steps"] = {str(run["k"]): run["steps"] for run in relearned["runs"]}
            entry["relearn_budget"] = relearned["budget"]
        concepts[name] = entry
    return {
        "file": file,
        "seconds": audit["seconds"],
        "held_out_templates": len(audit["templates"]["held_out"]),
        "image_tower_unchanged": audit["image_tower_unchanged"],
        "concepts": concepts,
    }


def terminal_lines(audit: Mapping) -> list[str]:
    """What ``audit`` prints: per concept its verdict line and seconds, then the total."""
    lines = [f"audit of {audit['run']} ({audit['method']}):"]
    for name, result in audit["concepts"].items():
        lines.append(f"  {name}: {result['verdict']} ({result['seconds']:.1f} s)")
        if result.get("note"):
            lines.append("    note: the edit is in the language tower; the image probe equals the base model's")
    lines.append(f"  total {audit['seconds']:.1f} s")
    return lines
