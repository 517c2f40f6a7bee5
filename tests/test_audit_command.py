"""The ``audit`` command (issue 25): its arguments, its refusal of a run directory that is not a finished run, and one
audit of the small demo's run, end to end, with what it writes beside the run."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml
from conftest import one_line_error

from slug_lightning.audit.prompts import template_key
from slug_lightning.audit.relearning import fitting_ks
from slug_lightning.audit.render import with_audit_section
from slug_lightning.audit.run import audit_verdict, image_probe_note, image_tower_unchanged
from slug_lightning.commands.audit import _parser
from slug_lightning.errors import UsageError
from slug_lightning.relearn import DEFAULT_KS, first_pairs

# --- fast: no fitted world -------------------------------------------------------------------------------------


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_missing_run_directory_is_one_line_and_writes_nothing(capsys, tmp_path):
    one_line_error(capsys, ["audit", "--run", str(tmp_path / "no_such_run")], "no_such_run", "not a directory")
    assert _listing(tmp_path) == []


def test_an_unfinished_run_directory_is_one_line_and_writes_nothing(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    before = _listing(tmp_path)
    one_line_error(capsys, ["audit", "--run", str(run)], "not a finished unlearn run", "report.json")
    assert _listing(tmp_path) == before  # no audit.json, no report


def test_bad_relearning_settings_are_one_line(capsys, tmp_path):
    one_line_error(capsys, ["audit", "--run", str(tmp_path), "--relearn_ks", "1", "4"], "--relearn_ks")
    one_line_error(capsys, ["audit", "--run", str(tmp_path), "--relearn_lr", "0"], "--relearn_lr")


def test_bad_held_out_templates_are_one_line(capsys, tmp_path):
    one_line_error(capsys, ["audit", "--run", str(tmp_path), "--templates", str(tmp_path / "none.txt")], "--templates")
    (tmp_path / "empty.txt").write_text("\n\n")
    one_line_error(capsys, ["audit", "--run", str(tmp_path), "--templates", str(tmp_path / "empty.txt")], "no template")
    (tmp_path / "bad.txt").write_text("a photo of {}.\na photo\n")
    one_line_error(capsys, ["audit", "--run", str(tmp_path), "--templates", str(tmp_path / "bad.txt")], "'a photo'")


def test_held_out_templates_the_search_used_are_refused(tiny_clip, tmp_path):
    from slug_lightning.audit.run import Models, RunSetup, audit_models
    from slug_lightning.audit.settings import AuditSettings
    from slug_lightning.concepts import Concept
    from slug_lightning.errors import UserError
    from slug_lightning.labelled_sets import LabelledSet

    spec = LabelledSet("people", root=str(tmp_path), templates=["a photo of {}.", "this is {}."])
    setup = RunSetup(tmp_path, "slug", None, None, [Concept("Ann")], [spec], None, None, "top1", 0.0, 8, {})
    models = Models(tiny_clip.model, tiny_clip.model, tiny_clip.preprocess, tiny_clip.tokenizer)
    with pytest.raises(UserError, match=r"never used; \['This is \{\}\.'\]"):
        audit_models(setup, models, AuditSettings(templates=("an image of {}.", "This is {}.")))


def test_arguments():
    parser = _parser("audit")
    args = parser.parse_args(["--run", "r"])
    assert args.run == "r" and args.paraphrases == [] and args.relearn_ks == list(DEFAULT_KS)
    assert not args.no_relearn and args.output is None and args.device == "cpu"
    args = parser.parse_args(
        ["--run", "r", "--paraphrases", "the CEO of Tesla", "Musk", "--relearn_ks", "4", "16", "--relearn_steps", "8"]
    )
    assert args.paraphrases == ["the CEO of Tesla", "Musk"] and args.relearn_ks == [4, 16] and args.relearn_steps == 8
    assert parser.parse_args(["--run", "r", "--no_relearn", "--output", "a.json"]).no_relearn
    with pytest.raises(UsageError, match="not allowed with"):  # relearning ks and no relearning at once
        parser.parse_args(["--run", "r", "--no_relearn", "--relearn_ks", "4"])
    with pytest.raises(UsageError, match="required: --run"):
        parser.parse_args([])


def test_ks_that_do_not_fit_the_forget_pairs_are_left_out():
    assert fitting_ks([4, 16, 64], 64) == ([4, 16, 64], [])
    assert fitting_ks([4, 16, 64], 10) == ([4], [16, 64])
    assert fitting_ks([4], 1) == ([], [4])
    assert first_pairs([], 4, exact=False)["image"].shape[0] == 0


def test_a_second_audit_replaces_the_first_section():
    report = "# Run\n\ntext\n"
    once = with_audit_section(report, "## Audit\n\nfirst\n")
    twice = with_audit_section(once, "## Audit\n\nsecond\n")
    assert twice == "# Run\n\ntext\n\n## Audit\n\nsecond\n"


def _measures(probe_recall: float) -> dict:
    return {
        "held_out": {"top1": 0.0, "top5": 0.3, "count": 12},
        "retrieval": {"Ann": {"r_precision": 0.05, "chance": 0.05, "n_relevant": 12, "n_images": 240}},
        "image_probe": {"concept_accuracy": probe_recall, "chance": 0.17, "count": 72, "classes": ["Ann", *"bcdef"]},
    }


def test_an_unchanged_image_tower_keeps_the_image_probe_out_of_the_verdict():
    told_apart = _measures(0.9)
    assert "linear probe" in audit_verdict(told_apart, None, image_unchanged=False, tolerance=0.0, metric="top1")
    line = audit_verdict(told_apart, None, image_unchanged=True, tolerance=0.0, metric="top1")
    assert line == "gone under every probe tried (held-out templates, search by name)"
    note = image_probe_note(told_apart["image_probe"], margin=0.1)
    assert "language tower" in note and "recall 0.90 vs chance 0.17, n=72" in note
    relearned = {"target": 0.5, "count": 12, "runs": [{"k": 16, "steps": 8}, {"k": 4, "steps": None}]}
    line = audit_verdict(told_apart, relearned, image_unchanged=True, tolerance=0.0, metric="top1")
    assert line.endswith(
        "; relearned to half its base forget top-1 (0.50, n=12) in 8 step(s) of fine-tuning on 16 forget pairs"
    )


def test_the_image_tower_is_unchanged_by_a_language_edit_only(tiny_clip):
    edited = copy.deepcopy(tiny_clip.model)
    with torch.no_grad():
        edited.text_projection.mul_(2.0)
        edited.logit_scale.add_(1.0)
    assert image_tower_unchanged(tiny_clip.model, edited)
    with torch.no_grad():
        edited.visual.proj.mul_(2.0)
    assert not image_tower_unchanged(tiny_clip.model, edited)


# --- end to end on the small demo's run --------------------------------------------------------------------------


def _without(record: dict, *keys: str) -> dict:
    return {k: _without(v, *keys) if isinstance(v, dict) else v for k, v in record.items() if k not in keys}


def test_audit_of_the_small_run(small_run, tmp_path, capsys):
    source, report = small_run
    # unlearn audited the run at its end (on the models in memory): audit.json, report.json's block, report.md's
    # section; the audit command on the same run finds the same, measure for measure.
    ended = json.loads((source / "audit.json").read_text())
    assert report["audit"]["file"] == "audit.json" and list(report["audit"]["concepts"]) == list(ended["concepts"])
    assert (source / "report.md").read_text().count("## Audit") == 1
    report = _without(report, "audit")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "model.safetensors", "report.json", "report.md"):
        shutil.copy(source / name, run / name)
    from slug_lightning.cli import main

    assert main(["audit", "--run", str(run), "--relearn_ks", "4", "--relearn_steps", "4", "--relearn_every", "2"]) == 0
    printed = capsys.readouterr().out
    audit = json.loads((run / "audit.json").read_text())
    concepts = [c["name"] for c in report["concepts"]]
    assert list(audit["concepts"]) == concepts
    for name in concepts:
        result = audit["concepts"][name]
        assert result["verdict"].strip() and "\n" not in result["verdict"]
        assert f"{name}: {result['verdict']}" in printed
        for model in ("base", "unlearned"):
            measures = result[model]
            assert measures["held_out"]["count"] > 0
            for scores in measures["retrieval"].values():
                assert scores["n_relevant"] > 0 and scores["n_images"] >= scores["n_relevant"]
            assert measures["image_probe"]["count"] > measures["held_out"]["count"]
        assert len(result["lookalikes"]) == 5 and name not in result["lookalikes"]
        assert all(count > 0 for count in result["similarity_shift"]["images"].values())
        relearned = result["relearning"]
        assert relearned["count"] == result["base"]["held_out"]["count"] and [r["k"] for r in relearned["runs"]] == [4]
        assert relearned["runs"][0]["budget"] == 4 and len(relearned["runs"][0]["curve"]) <= 3
        # A language-tower edit leaves the image probe at the base value, and the audit says so.
        if audit["image_tower_unchanged"]:
            assert result["base"]["image_probe"] == result["unlearned"]["image_probe"]
            assert "language tower" in result["note"] and "image probe" not in result["verdict"]
        else:
            assert result["note"] is None
    for accuracies in audit["accuracy"].values():
        for key in ("search", "held_out"):
            assert all(entry["count"] > 0 for entry in accuracies[key]["test"].values())
    # The held-out templates are none of the run's search templates.
    config = yaml.safe_load((run / "config.yaml").read_text())
    searched = {template_key(t) for spec in config["search"]["init_args"]["sets"] for t in spec["templates"]}
    assert audit["templates"]["search"] and not searched & {template_key(t) for t in audit["templates"]["held_out"]}
    assert _without(audit, "seconds", "run") == _without(ended, "seconds", "run")
    # report.json gained the audit block, report.md the section.
    updated = json.loads((run / "report.json").read_text())
    assert updated["audit"]["file"] == "audit.json" and list(updated["audit"]["concepts"]) == concepts
    assert {k: v for k, v in updated.items() if k != "audit"} == report
    markdown = (run / "report.md").read_text()
    assert markdown.count("## Audit") == 1 and "| measure | base | unlearned | n |" in markdown
    assert all(f"**Verdict:** {audit['concepts'][name]['verdict']}" in markdown for name in concepts)
