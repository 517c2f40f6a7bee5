"""What searching over a template ensemble costs and buys: the demo's unlearn with and without it, side by side.

Both runs use the same gradients (the first computes them, the second reuses its store) and differ in one switch,
``--search.init_args.template_ensemble``: the search decides "forgotten" and utility under each evaluation set's
template alone, or under that template plus the first half of the audit's held-out templates, each of which must
forget. Both unlearned models are then audited under the same held-out templates: the other half, which neither
search saw. The table gives the search's own figures (probes, time, chosen layer and step, forget top-1 and utility
under the templates it used) and the audit's (forget top-1/top-5 and utility under the unseen half, search by name,
relearning).

Reproduce (after ``python -m slug_lightning demo``, whose config is reused; from the repository's root)::

    python benchmarks/template_ensemble.py --run runs/demo --work runs/template_ensemble \
        --output benchmarks/results/template_ensemble.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from _common import machine, table

from slug_lightning.audit.prompts import ensemble_templates, held_out_templates


def unseen_half(sets: list[dict]) -> list[str]:
    """The held-out templates neither search sees: those every set's ensemble leaves out."""
    return held_out_templates(seen=[t for spec in sets for t in ensemble_templates(spec["templates"])])


def run(run_dir: Path, work: Path, ensemble: bool, templates: list[str], gradients: Path | None, rerun: bool) -> dict:
    """One unlearn (``gradients`` reused if given; the audit at its end on ``templates``); its report and audit. A
    finished run in ``work`` is reused unless ``rerun``."""
    output = work / ("ensemble" if ensemble else "plain")
    arguments = [
        "unlearn",
        "--config",
        str(run_dir / "config.yaml"),
        *(["--gradients", str(gradients)] if gradients else []),
        "--output_dir",
        str(output),
        "--overwrite=true",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--search.init_args.template_ensemble={str(ensemble).lower()}",
        f"--audit.templates={json.dumps(templates)}",
    ]
    work.mkdir(parents=True, exist_ok=True)
    if (output / "audit.json").is_file() and not rerun:  # a finished run of an earlier call
        return {
            "report": json.loads((output / "report.json").read_text()),
            "audit": json.loads((output / "audit.json").read_text()),
        }
    with open(work / f"{output.name}.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "slug_lightning", *arguments], stdout=log, stderr=log).returncode
    if code:
        sys.exit(f"the {output.name} run failed (exit {code}); see {work / output.name}.log")
    report = json.loads((output / "report.json").read_text())
    return {"report": report, "audit": json.loads((output / "audit.json").read_text())}


def row(name: str, result: dict) -> dict:
    report, audit = result["report"], result["audit"]
    (concept,) = report["concepts"]
    measures = audit["concepts"][concept["name"]]
    held_out = audit["accuracy"]["unlearned"]["held_out"]["test"]
    relearning = measures["relearning"] or {"runs": []}
    return {
        "search": name,
        "templates searched": report["data"]["evaluation_sets"][0]["templates"],
        "probes": report["timing"]["probes"],
        "search_s": report["timing"]["search_s"],
        "layer": concept["layer"],
        "λ": concept["step_size"],
        "forget top-1 (searched)": report["after"]["forget"][concept["name"]]["top1"],
        "utility (searched)": sum(a["top1"] for a in report["after"]["test"].values()) / len(report["after"]["test"]),
        "forget top-1 (unseen)": measures["unlearned"]["held_out"]["top1"],
        "forget top-5 (unseen)": measures["unlearned"]["held_out"]["top5"],
        "utility (unseen)": sum(a["top1"] for a in held_out.values()) / len(held_out),
        "name search R-prec.": measures["unlearned"]["retrieval"][concept["name"]]["r_precision"],
        "relearn steps (k: steps)": ", ".join(
            f"{r['k']}: {'-' if r['steps'] is None else r['steps']}" for r in relearning["runs"]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished demo run directory")
    parser.add_argument("--work", type=Path, default=Path("runs/template_ensemble"), help="where the two runs go")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (markdown)")
    parser.add_argument("--rerun", action="store_true", help="run again what a finished run in --work holds")
    args = parser.parse_args()
    if not (args.run / "config.yaml").is_file():
        sys.exit(f"{args.run} is not a finished demo run (no config.yaml); run the demo first.")
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    templates = unseen_half(config["search"]["init_args"]["sets"])
    store = args.work / "plain" / "gradients.safetensors"
    plain = row("plain", run(args.run, args.work, False, templates, None, args.rerun))
    ensemble = row("ensemble", run(args.run, args.work, True, templates, store, args.rerun))
    rows = [plain, ensemble]
    lines = [
        "# The search over a template ensemble: what it costs, what it buys",
        "",
        f"Machine: {machine()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        f"Audited under the {len(templates)} held-out templates neither search saw: {templates}.",
        "",
        table(rows, list(plain)),
        "",
        f"Ratios, ensemble / plain: probes {ensemble['probes'] / plain['probes']:.2f}, search time "
        f"{ensemble['search_s'] / plain['search_s']:.2f}.",
        "",
        "Command: `python benchmarks/template_ensemble.py " + " ".join(sys.argv[1:]) + "`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
