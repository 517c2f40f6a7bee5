"""``python -m slug_lightning compare``: SLUG and the baselines on one unlearn configuration, side by side.

Every method runs as ``unlearn --method M`` on the same config (same model, pairs, evaluation sets); each tuned
method gets the same number of settings (a learning-rate grid for FT, GA, GAFT and SalUn, an ``alpha`` grid
for SSD), and the setting kept is chosen by SLUG's own rule (METHOD §7): lowest forget accuracy, then highest
utility. The table (``comparison.md``, ``comparison.csv``) gives forget top-1/top-5, each test set's top-1,
wall time, peak memory and the size of the shipped edit; ``comparison.png`` plots utility against forget
accuracy for every run. The kept setting of each method is then audited (:mod:`slug_lightning.audit`, the same
settings for every method), and the table gains the audit's columns (:func:`audit_columns`).

The command line (argument parsing and its checks) is :mod:`slug_lightning.commands.compare`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from slug_lightning.artifacts import write_csv, write_text
from slug_lightning.audit.settings import AuditSettings
from slug_lightning.errors import UserError

DEFAULT_LRS = (1e-6, 1e-5, 1e-4)


def grid(method: str, lrs: list[float], ssd_alphas: list[float]) -> list[dict[str, float]]:
    """The settings tried for ``method``: none for SLUG (its search is the method), a grid for the others.

    Example::

        >>> grid("ga", [1e-5, 1e-4], [10.0, 3.0])
        [{'lr': 1e-05}, {'lr': 0.0001}]
        >>> grid("ssd", [1e-5, 1e-4], [10.0, 3.0]), grid("slug", [1e-5], [10.0])
        ([{'alpha': 10.0}, {'alpha': 3.0}], [{}])
    """
    if method == "slug":
        return [{}]
    if method == "ssd":
        return [{"alpha": a} for a in ssd_alphas]
    return [{"lr": lr} for lr in lrs]


def _label(setting: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in setting.items()) or "-"


def mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summarize_run(method: str, setting: dict, report: dict) -> dict:
    """One row of the comparison from a run's ``report.json``."""
    after, timing = report["after"], report["timing"]
    row = {
        "method": method,
        "setting": _label(setting),
        "forget_top1": mean(a["top1"] for a in after["forget"].values()),
        "forget_top5": mean(a["top5"] for a in after["forget"].values()),
    }
    row.update({f"test_top1[{name}]": a["top1"] for name, a in after["test"].items()})
    row["utility"] = mean(a["top1"] for a in after["test"].values())
    row["total_s"] = timing["total_s"]
    row["method_s"] = timing.get("method_s", timing.get("gradients_s", 0.0) + timing.get("search_s", 0.0))
    row["peak_memory_mib"] = report["memory"]["peak_rss_mib"]
    row["edit_tensors"] = report["edit"]["tensors"]
    row["edit_mib"] = report["edit"]["bytes"] / 2**20
    return row


def select(rows: list[dict]) -> dict:
    """SLUG's rule (METHOD §7) among one method's runs: lowest forget top-1, then highest utility.

    Example::

        >>> select([{"forget_top1": 0.0, "utility": 0.5}, {"forget_top1": 0.0, "utility": 0.7},
        ...         {"forget_top1": 0.2, "utility": 0.9}])
        {'forget_top1': 0.0, 'utility': 0.7}
    """
    return min(rows, key=lambda r: (r["forget_top1"], -r["utility"] if not math.isnan(r["utility"]) else math.inf))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(column: str, value) -> str:
        if isinstance(value, float):
            if column.startswith(("forget", "test", "utility", "held_out", "name_search", "image_probe")):
                return "n/a" if math.isnan(value) else f"{100 * value:.1f}"
            return f"{value:.1f}" if column.endswith(("_s", "_mib")) else f"{value:g}"
        return str(value)

    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


AUDIT_COLUMNS = [
    "held_out_forget_top1",
    "held_out_utility",
    "name_search_r_precision",
    "image_probe_recall",
    "relearn_steps",
]


def audit_columns(audit: dict) -> dict:
    """A comparison row's audit columns from a run's ``audit.json`` (means over its concepts and sets).

    ``held_out_forget_top1`` and ``held_out_utility`` are forget top-1 and mean test top-1 under the held-out
    templates, ``name_search_r_precision`` the share of a concept's images among the first that many found by its
    name, ``image_probe_recall`` the linear probe's recall of the concept among its look-alikes, and
    ``relearn_steps`` ``k: steps`` for each relearning run (``-``: not back within the budget).

    Example::

        >>> audit = {"accuracy": {"unlearned": {"held_out": {"test": {"a": {"top1": 0.5}, "b": {"top1": 0.7}}}}},
        ...          "concepts": {"X": {"unlearned": {"held_out": {"top1": 0.1},
        ...                                           "retrieval": {"X": {"r_precision": 0.25}},
        ...                                           "image_probe": {"concept_accuracy": 1.0}},
        ...                           "relearning": {"runs": [{"k": 4, "steps": None}, {"k": 16, "steps": 8}]}}}}
        >>> row = audit_columns(audit)
        >>> row["held_out_forget_top1"], round(row["held_out_utility"], 2), row["relearn_steps"]
        (0.1, 0.6, '4: -, 16: 8')
    """
    concepts = audit["concepts"].items()
    runs = [run for _, result in concepts for run in (result.get("relearning") or {}).get("runs", [])]
    return {
        "held_out_forget_top1": mean(r["unlearned"]["held_out"]["top1"] for _, r in concepts),
        "held_out_utility": mean(a["top1"] for a in audit["accuracy"]["unlearned"]["held_out"]["test"].values()),
        "name_search_r_precision": mean(r["unlearned"]["retrieval"][name]["r_precision"] for name, r in concepts),
        "image_probe_recall": mean(
            r["unlearned"]["image_probe"]["concept_accuracy"] for _, r in concepts if r["unlearned"].get("image_probe")
        ),
        "relearn_steps": ", ".join(f"{run['k']}: {'-' if run['steps'] is None else run['steps']}" for run in runs)
        or "not run",
    }


def audit_kept(rows: list[dict], settings: AuditSettings, overwrite: bool) -> None:
    """Audit each method's kept run (its ``audit.json``, reused unless ``overwrite``) and add its columns."""
    from slug_lightning.audit.run import audit_run, write_audit

    for row in rows:
        if not row["selected"]:
            continue
        path = Path(row["run"]) / "audit.json"
        if overwrite or not path.is_file():
            print(f"[compare] auditing {row['method']} {row['setting']}", flush=True)
            write_audit(audit_run(row["run"], settings))
        audited = json.loads(path.read_text())
        row.update(audit_columns(audited))
        row["verdicts"] = {name: result["verdict"] for name, result in audited["concepts"].items()}


def audit_section(rows: list[dict], settings: AuditSettings) -> list[str]:
    """The ``## Audit of the kept settings`` lines of ``comparison.md``: the audit columns, then each verdict."""
    kept = [row for row in rows if row["selected"]]
    relearning = (
        f"relearning on k = {', '.join(map(str, settings.relearn_ks))} forget pairs for up to "
        f"{settings.relearn_steps} steps at lr {settings.relearn_lr:g}"
        if settings.relearn_ks
        else "no relearning"
    )
    lines = [
        "## Audit of the kept settings",
        "",
        "Each method's kept run, audited alike (`python -m slug_lightning audit`): forget top-1 and utility under "
        "held-out templates the search never used, searching the images by the concept's name (R-precision), a "
        f"linear probe on image features (recall of the concept among its look-alikes), and {relearning} "
        "(`k: steps` until forget top-1 is back at half its base value; `-`: not within the budget). In % except "
        "the steps; each run's `audit.json` has every figure with its sample size.",
        "",
        markdown_table(kept, ["method", "setting", "forget_top1", "utility", *AUDIT_COLUMNS]),
        "",
    ]
    for row in kept:
        lines += [f"- **{row['method']}**: {name}: {verdict}" for name, verdict in row.get("verdicts", {}).items()]
    return [*lines, ""]


def compare(
    configs: list[str],
    methods: list[str],
    lrs: list[float],
    ssd_alphas: list[float],
    iterations: int,
    output: Path,
    overwrite: bool = False,
    audit: AuditSettings | None = AuditSettings(),  # noqa: B008 (a frozen value, never mutated)
) -> list[dict]:
    """Run every method and setting, write the table and the plot, return every row (``selected`` marked).

    Each run is an ``unlearn`` in a process of its own (its output in ``<run>/log.txt``), so its time and peak
    memory are measured alone; a finished run (its ``report.json``) is reused unless ``overwrite``. The runs do not
    audit themselves; with ``audit`` (None: no audit) each method's kept run is audited once the table is known.
    """
    from slug_lightning.plots import comparison_plot

    rows = []
    for method in methods:
        for setting in grid(method, lrs, ssd_alphas):
            run_dir = output / method / (_label(setting).replace("=", "") if setting else "run")
            if overwrite or not (run_dir / "report.json").exists():
                args = [
                    "unlearn",
                    *[a for c in configs for a in ("--config", c)],
                    f"--method={method}",
                    f"--output_dir={run_dir}",
                    "--overwrite=true",
                    "--search.init_args.audit=false",  # only the kept runs are audited, below
                ]
                if method != "slug":
                    args.append(f"--baseline.iterations={iterations}")
                    args += [f"--baseline.{k}={v}" for k, v in setting.items()]
                print(f"[compare] {method} {_label(setting)} -> {run_dir}", flush=True)
                run_dir.mkdir(parents=True, exist_ok=True)
                # A process per run: its wall time and peak memory are its own, not the leftovers of the last.
                with open(run_dir / "log.txt", "w") as log:
                    code = subprocess.run(
                        [sys.executable, "-m", "slug_lightning", *args], stdout=log, stderr=subprocess.STDOUT
                    ).returncode
                if code:
                    tail = (run_dir / "log.txt").read_text().strip().splitlines()[-1:]
                    raise UserError(
                        f"The {method} run ({_label(setting)}) failed with exit code {code} "
                        f"({tail[0] if tail else 'no output'}); see {run_dir / 'log.txt'}."
                    )
            else:
                print(f"[compare] {method} {_label(setting)}: reusing the finished run in {run_dir}")
            report = json.loads((run_dir / "report.json").read_text())
            rows.append({**summarize_run(method, setting, report), "run": str(run_dir)})
    for method in methods:
        chosen = select([r for r in rows if r["method"] == method])
        for row in rows:
            if row["method"] == method:
                row["selected"] = row is chosen
    if audit is not None:
        audit_kept(rows, audit, overwrite)
    test_columns = sorted({k for r in rows for k in r if k.startswith("test_top1[")})
    columns = [
        "method",
        "setting",
        "forget_top1",
        "forget_top5",
        *test_columns,
        "utility",
        "total_s",
        "method_s",
        "peak_memory_mib",
        "edit_tensors",
        "edit_mib",
    ]
    audited = columns + AUDIT_COLUMNS if audit is not None else columns
    write_csv(output / "comparison.csv", rows, audited + ["selected", "run"])
    comparison_plot(output / "comparison.png", rows)
    budget = (
        f"Tuning budget: FT, GA, GAFT and SalUn ran lr in {', '.join(f'{v:g}' for v in lrs)} "
        f"({iterations} iterations each); SSD ran alpha in {', '.join(f'{v:g}' for v in ssd_alphas)}; "
        "SLUG ran once (its step-size search is part of the method)."
    )
    text = [
        "# SLUG against the baselines",
        "",
        budget,
        "Per method the kept setting is the one with the lowest forget top-1, then the highest utility "
        "(mean test top-1). Accuracies in %, times in seconds, memory and edit size in MiB.",
        "",
        markdown_table([r for r in rows if r["selected"]], columns),
        "",
        *(audit_section(rows, audit) if audit is not None else []),
        "![utility against forget accuracy](comparison.png)",
        "",
        "## Every setting tried",
        "",
        markdown_table(rows, columns),
        "",
        "Command: `python -m slug_lightning compare "
        + " ".join(f"--config {c}" for c in configs)
        + f" --methods {' '.join(methods)} --lrs {' '.join(f'{v:g}' for v in lrs)} --ssd_alphas "
        + " ".join(f"{v:g}" for v in ssd_alphas)
        + f" --iterations {iterations} --output_dir {output}`",
        "",
    ]
    write_text(output / "comparison.md", "\n".join(text))
    print("\n".join(text[4:5]))
    print(f"[compare] table: {output / 'comparison.md'} (and .csv); plot: {output / 'comparison.png'}")
    return rows
