"""``audit --run RUN_DIR``: every audit measure of a finished run, the base model against the unlearned one.

A run directory (SLUG's or a baseline's: ``unlearn --method ...``) holds what the audit needs: ``config.yaml`` (the
resolved config: the base model, the forget concepts, the shards, the evaluation sets), ``model.safetensors`` (the
unlearned weights) and ``report.json`` (its presence marks a finished run; its ``settings`` give the forget test).
:func:`audit_run` loads both models, runs one :class:`~slug_lightning.audit.prompts.AuditEvaluator` per model and,
per concept, gathers :func:`~slug_lightning.audit.measure.measure_concept` on both, the similarity shift, the
relearning measure (:mod:`slug_lightning.relearn`) and a verdict line; :func:`write_audit` writes ``audit.json``,
an ``audit`` block in ``report.json`` and an ``## Audit`` section in ``report.md``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from slug_lightning.audit.measure import measure_concept
from slug_lightning.audit.prompts import (
    AuditEvaluator,
    audit_evaluator,
    held_out_templates,
    searched_sets,
    template_accuracy,
    template_key,
)
from slug_lightning.audit.relearning import concept_images, forget_top1, relearn_clause, relearning_measure
from slug_lightning.audit.settings import AuditSettings
from slug_lightning.audit.verdicts import recoveries, similarity_shift, verdict
from slug_lightning.concepts import Concept, as_concepts
from slug_lightning.errors import UserError
from slug_lightning.evaluation import forget_sets_of
from slug_lightning.labelled_sets import LabelledSet
from slug_lightning.layers import VISION, tower_of
from slug_lightning.relearn import first_pairs

AUDIT_FILE = "audit.json"
RUN_FILES = ("report.json", "config.yaml", "model.safetensors")
LOOKALIKES = 5


@dataclass(frozen=True)
class RunSetup:
    """What the audit reads from a finished run directory.

    Attributes:
        run_dir: The directory.
        method: ``"slug"`` or the baseline's name.
        model_name, pretrained: The base model, as ``load_clip`` takes it (None: the models are given, not loaded).
        concepts: The forget concepts, with their aliases.
        sets: The evaluation sets (their templates are the search's).
        forget_set: The one set holding the concepts' images, or None (the first set that has them).
        data: The ``LaionDataModule`` shards (``shards``, ``forget_shards``) the relearning takes forget pairs from;
            None: no LAION shards, no relearning.
        metric, threshold: The forget test of the run (``top1``/``top5``, the accuracy a concept may keep).
        batch_size: Images per evaluation batch.
        towers: Each concept's edited tower from ``report.json`` (None: no edit, or a baseline).
    """

    run_dir: Path
    method: str
    model_name: str | None
    pretrained: str | None
    concepts: list[Concept]
    sets: list[LabelledSet]
    forget_set: str | None
    data: dict | None
    metric: str
    threshold: float
    batch_size: int
    towers: dict[str, str | None]


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory, if it is a finished run (``report.json``, ``config.yaml`` and ``model.safetensors``).

    Raises:
        UserError: If it is missing, or a file is (e.g. a run still going, or one that failed).
    """
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"--run {str(run_dir)!r} is not a directory; give the output directory of an unlearn run.")
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(
            f"--run {str(run_dir)!r} is not a finished unlearn run: it has no {', '.join(missing)} "
            "(report.json is written last, when a run ends)."
        )
    return path


def _init_args(config: Mapping, key: str) -> dict:
    """``config[key]["init_args"]`` of a resolved LightningCLI config ({} when absent)."""
    section = config.get(key) or {}
    return dict(section.get("init_args") or {})


def read_run(run_dir: str | Path) -> RunSetup:
    """Read a finished run's ``config.yaml`` and ``report.json`` (:func:`check_run_dir` first).

    Raises:
        UserError: If the run directory is not a finished run, or its config lacks the model, the concepts or the
            evaluation sets.
    """
    path = check_run_dir(run_dir)
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    report = json.loads((path / "report.json").read_text())
    model, data, search = _init_args(config, "model"), _init_args(config, "data"), _init_args(config, "search")
    if not model.get("model_name") or not data.get("concepts") or not search.get("sets"):
        raise UserError(
            f"{path / 'config.yaml'} does not name the model (model.init_args.model_name), the concepts "
            "(data.init_args.concepts) and the evaluation sets (search.init_args.sets) of an unlearn run."
        )
    settings = report.get("settings") or {}
    try:
        sets = searched_sets([LabelledSet(**spec) for spec in search["sets"]], bool(search.get("template_ensemble")))
    except TypeError as error:
        raise UserError(
            f"{path / 'config.yaml'}: search.init_args.sets is not a list of evaluation sets: {error}"
        ) from None
    return RunSetup(
        run_dir=path,
        method=report.get("method") or config.get("method") or "slug",
        model_name=model["model_name"],
        pretrained=model.get("pretrained"),
        concepts=as_concepts(data["concepts"]),
        sets=sets,
        forget_set=search.get("forget_set"),
        data={key: data.get(key) for key in ("shards", "forget_shards")},
        metric=settings.get("metric") or search.get("metric") or "top1",
        threshold=float(settings.get("threshold", search.get("threshold", 0.0))),
        batch_size=int(search.get("batch_size") or 64),
        towers={entry["name"]: entry.get("tower") for entry in report.get("concepts", [])},
    )


def image_tower_unchanged(base: nn.Module, unlearned: nn.Module) -> bool:
    """Whether every vision-tower parameter and buffer of the two models is bit-identical (an edit of the language
    tower only): then every image feature, and so the image probe, is the base model's by construction."""
    base_state, state = base.state_dict(), unlearned.state_dict()
    for name, tensor in state.items():
        if name.startswith("logit_") or tower_of(name) != VISION:
            continue
        if name not in base_state or not torch.equal(tensor, base_state[name]):
            return False
    return True


def image_probe_note(probe: Mapping, margin: float) -> str:
    """The plain-words note of a language-tower edit's image probe, which cannot tell anything about the edit."""
    found = recoveries({"image_probe": probe}, margin=margin)
    reading = (
        f"a linear probe on them still tells the concept from {len(probe['classes']) - 1} look-alikes (recall "
        f"{probe['concept_accuracy']:.2f} vs chance {probe['chance']:.2f}, n={probe['count']})"
        if found
        else f"a linear probe on them does not tell it apart (recall {probe['concept_accuracy']:.2f} vs chance "
        f"{probe['chance']:.2f}, n={probe['count']})"
    )
    return (
        "The edit is in the language tower: the image tower is unchanged, so every image feature, and the image "
        f"probe, equals the base model's by construction; {reading}. That is what the images encode, not whether "
        "the name is forgotten, so it is left out of the verdict."
    )


def audit_verdict(
    unlearned: Mapping, relearned: Mapping | None, image_unchanged: bool, tolerance: float, metric: str
) -> str:
    """The verdict line of one concept: :func:`~slug_lightning.audit.verdicts.verdict` of the unlearned model's
    measures (without the image probe when the image tower is unchanged), then the relearning phrase, if any."""
    measures = {key: value for key, value in unlearned.items() if not (image_unchanged and key == "image_probe")}
    line = verdict(measures, tolerance=tolerance, metric=metric)
    clause = relearn_clause(relearned) if relearned else None
    return f"{line}; {clause}" if clause else line


@dataclass(frozen=True)
class Models:
    """The two CLIPs an audit compares (in eval mode), and the preprocess and tokenizer they share."""

    base: nn.Module
    unlearned: nn.Module
    preprocess: Callable
    tokenizer: Callable


def _load_models(setup: RunSetup, device: torch.device | str) -> Models:
    """The base CLIP and the run's ``model.safetensors``, in eval mode on ``device``."""
    from slug_lightning.models import load_clip

    base = load_clip(setup.model_name, setup.pretrained)
    unlearned = load_clip(setup.model_name, str(setup.run_dir / "model.safetensors"))
    return Models(base.model.to(device).eval(), unlearned.model.to(device).eval(), base.preprocess, base.tokenizer)


def base_model(unlearned: nn.Module, originals: Mapping[str, Tensor]) -> nn.Module:
    """The model before unlearning: a copy of ``unlearned`` with θ⁰ put back wherever the run changed it.

    Args:
        unlearned: The unlearned model.
        originals: θ⁰ of every tensor the run changed, by state-dict name (SLUG: its edited layers; a baseline: its
            whole state).

    Raises:
        KeyError: If a name is not one of the model's.
    """
    base = copy.deepcopy(unlearned)
    unexpected = base.load_state_dict(dict(originals), strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"Not tensors of the model: {unexpected[:3]}.")
    return base.eval()


def _datamodule(setup: RunSetup, models: Models):
    """The run's ``LaionDataModule`` (its shards and concepts) with the model's preprocess and tokenizer."""
    from slug_lightning.datamodules import LaionDataModule

    data = LaionDataModule(
        setup.data["shards"], forget_shards=setup.data["forget_shards"], concepts=setup.concepts, num_workers=0
    )
    data.transform, data.tokenizer = models.preprocess, models.tokenizer
    return data


def _class_counts(evaluator: AuditEvaluator, set_name: str, names: Sequence[str]) -> dict[str, int]:
    """Images of each named class in a set."""
    labels = evaluator.reference_features(set_name)[1].cpu()
    dataset = evaluator.datasets[set_name]
    return {name: int((labels == dataset.class_index(name)).sum()) for name in names}


def audit_run(
    run_dir: str | Path,
    settings: AuditSettings = AuditSettings(),  # noqa: B008 (a frozen value, never mutated)
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Audit a finished run: for every forgotten concept, the base model against the unlearned one.

    Args:
        run_dir: The run's output directory (SLUG or a baseline).
        settings: The names to try and the relearning budget.
        device: Where to compute.
        log: Called with a line as each concept is done (e.g. ``print``).

    Returns:
        ``{"run", "method", "concepts": {name: {"forget_set", "lookalikes", "base", "unlearned",
        "similarity_shift", "relearning", "verdict", "note", "seconds"}}, "accuracy": {"base", "unlearned"},
        "templates": {"held_out", "search"}, "image_tower_unchanged", "settings", "seconds"}`` (JSON-able; see
        docs/report_format.md).

    Raises:
        UserError: Not a finished run; a paraphrase that is another class's name.
    """
    setup = read_run(run_dir)
    return audit_models(setup, _load_models(setup, device), settings, device, log)


def audit_models(
    setup: RunSetup,
    models: Models,
    settings: AuditSettings = AuditSettings(),  # noqa: B008 (a frozen value, never mutated)
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict:
    """:func:`audit_run` of a run described by ``setup``, on ``models`` already in memory (its arguments and result
    are :func:`audit_run`'s). Without LAION shards (``setup.data`` None) there is no relearning."""
    began = time.perf_counter()
    names = [concept.name for concept in setup.concepts]
    search_templates = list(dict.fromkeys(t for spec in setup.sets for t in spec.templates))
    templates = list(settings.templates) or held_out_templates(seen=search_templates)
    used = {template_key(t) for t in search_templates}
    seen = [template for template in templates if template_key(template) in used]
    if seen:
        raise UserError(
            f"Held-out templates must be ones the search never used; {sorted(seen)} are among its {search_templates}."
        )
    evaluators = {
        which: audit_evaluator(
            model, models.tokenizer, models.preprocess, setup.sets, names, setup.batch_size, device=device
        )
        for which, model in (("base", models.base), ("unlearned", models.unlearned))
    }
    forget = forget_sets_of(names, evaluators["base"].datasets, setup.forget_set)
    unchanged = image_tower_unchanged(models.base, models.unlearned)
    accuracy = {
        which: {"search": template_accuracy(e, forget), "held_out": template_accuracy(e, forget, templates)}
        for which, e in evaluators.items()
    }
    datamodule = _datamodule(setup, models) if settings.relearn_ks and setup.data else None
    concepts = {}
    for concept in setup.concepts:
        started = time.perf_counter()
        concepts[concept.name] = _audit_concept(
            concept,
            forget[concept.name],
            evaluators,
            models,
            templates,
            datamodule,
            settings,
            unchanged,
            setup,
        )
        concepts[concept.name]["seconds"] = time.perf_counter() - started
        if log:
            log(f"{concept.name}: {concepts[concept.name]['verdict']} ({concepts[concept.name]['seconds']:.1f} s)")
    return {
        "run": str(setup.run_dir),
        "method": setup.method,
        "concepts": concepts,
        "accuracy": accuracy,
        "templates": {"held_out": templates, "search": search_templates},
        "image_tower_unchanged": unchanged,
        "settings": {
            "metric": setup.metric,
            "threshold": setup.threshold,
            "lookalikes": LOOKALIKES,
            "templates": "given" if settings.templates else "shipped",
            "paraphrases": list(settings.paraphrases),
            "relearn_ks": list(settings.relearn_ks),
            "relearn_steps": settings.relearn_steps,
            "relearn_lr": settings.relearn_lr,
            "relearn_every": settings.relearn_every,
        },
        "seconds": time.perf_counter() - began,
    }


def _audit_concept(
    concept: Concept,
    set_name: str,
    evaluators: Mapping[str, AuditEvaluator],
    models: Models,
    templates: Sequence[str],
    datamodule,
    settings: AuditSettings,
    unchanged: bool,
    setup: RunSetup,
) -> dict:
    """One concept's audit (see :func:`audit_run`)."""
    base = evaluators["base"]
    lookalikes = base.nearest_classes(set_name, [concept.name], LOOKALIKES)
    try:
        measures = {
            which: measure_concept(e, set_name, concept, settings.paraphrases, lookalikes, templates)
            for which, e in evaluators.items()
        }
    except ValueError as error:  # a paraphrase that is another class of the set
        raise UserError(str(error)) from None
    shown = [concept.name, *lookalikes]
    shift = similarity_shift(
        base.similarity(set_name, shown),
        evaluators["unlearned"].similarity(set_name, shown),
        shown,
        [concept.name],
        {concept.name: lookalikes},
    )[concept.name]
    shift["images"] = _class_counts(base, set_name, shown)
    relearned = None
    ks = settings.relearn_ks
    if ks and datamodule is not None:
        index = base.datasets[set_name].class_index(concept.name)
        images = concept_images(base, set_name, index)
        evaluate = forget_top1(
            images, index, base.class_names(set_name), base.templates[set_name], base.tokenizer, base.device
        )
        pairs = first_pairs(datamodule.forget_dataloader(concept), max(ks), exact=False)
        relearned = relearning_measure(
            models.base,
            models.unlearned,
            pairs,
            evaluate,
            ks,
            settings.relearn_steps,
            settings.relearn_lr,
            settings.relearn_every,
            int(images.shape[0]),
        )
    probe = measures["unlearned"].get("image_probe")
    return {
        "forget_set": set_name,
        "tower": setup.towers.get(concept.name),
        "lookalikes": lookalikes,
        "base": measures["base"],
        "unlearned": measures["unlearned"],
        "similarity_shift": shift,
        "relearning": relearned,
        "verdict": audit_verdict(measures["unlearned"], relearned, unchanged, setup.threshold, setup.metric),
        "note": image_probe_note(probe, 0.1) if unchanged and probe else None,
    }


def write_audit(audit: Mapping, output: str | Path | None = None) -> Path:
    """Write an audit beside its run: the whole of it as ``output`` (default ``RUN_DIR/audit.json``), its summary as
    the ``audit`` block of ``RUN_DIR/report.json`` and its tables as the ``## Audit`` section of ``RUN_DIR/report.md``
    (replacing those of an earlier audit). Returns the path of the JSON file."""
    from slug_lightning.artifacts import write_json, write_text
    from slug_lightning.audit.render import audit_summary, render_audit_markdown, with_audit_section

    run_dir = Path(audit["run"])
    path = Path(output).expanduser() if output is not None else run_dir / AUDIT_FILE
    write_json(path, audit)
    report = json.loads((run_dir / "report.json").read_text())
    inside = path.resolve().is_relative_to(run_dir.resolve())
    report["audit"] = audit_summary(audit, str(path.resolve().relative_to(run_dir.resolve())) if inside else str(path))
    write_json(run_dir / "report.json", report)
    markdown = run_dir / "report.md"
    existing = markdown.read_text() if markdown.is_file() else ""
    write_text(markdown, with_audit_section(existing, render_audit_markdown(audit)))
    return path


def setup_of(output: Path, report: Mapping, datamodule, search) -> RunSetup:
    """The :class:`RunSetup` of a run that just ended in this process, from its objects and its ``report``."""
    shards = getattr(datamodule, "shards", None)
    return RunSetup(
        run_dir=Path(output),
        method=report["method"],
        model_name=None,
        pretrained=None,
        concepts=list(datamodule.concepts),
        sets=list(search.sets),
        forget_set=search.forget_set,
        data={"shards": shards, "forget_shards": datamodule.forget_shards} if shards else None,
        metric=search.metric,
        threshold=search.threshold,
        batch_size=search.batch_size,
        towers={entry["name"]: entry.get("tower") for entry in report["concepts"]},
    )


def audit_unlearned(
    output: Path,
    report: Mapping,
    unlearned: nn.Module,
    originals: Mapping[str, Tensor],
    clip,
    datamodule,
    search,
    settings: AuditSettings = AuditSettings(),  # noqa: B008 (a frozen value, never mutated)
    device: torch.device | str = "cpu",
) -> dict:
    """The audit at the end of ``unlearn``, written beside the run.

    Args:
        output: The finished run's directory (its ``report.json`` and ``report.md`` get the audit).
        report: Its report.
        unlearned: The unlearned model, as left in memory.
        originals: θ⁰ of every tensor the run changed (:func:`base_model`).
        clip: What holds the model's ``preprocess`` and ``tokenizer`` (the ``GradientCollector``).
        datamodule: The run's datamodule (its concepts; its shards give the relearning's forget pairs).
        search: The run's ``StepSearch`` (the evaluation sets and the forget test).
        settings: The names to try and the relearning budget.
        device: Where to compute.

    Returns:
        The ``audit`` block added to ``report.json``.
    """
    from slug_lightning.audit.render import audit_summary, terminal_lines

    was_training = unlearned.training
    models = Models(base_model(unlearned, originals), unlearned.eval(), clip.preprocess, clip.tokenizer)
    try:
        audit = audit_models(setup_of(output, report, datamodule, search), models, settings, device)
    finally:
        unlearned.train(was_training)
    path = write_audit(audit)
    print("\n".join(terminal_lines(audit)))
    return audit_summary(audit, path.name)
