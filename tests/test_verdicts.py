"""Honest verdicts: a run that did not forget says so plainly (report.json's `verdict`, report.md, the terminal) and
exits 0 unless `--require_forgotten true` (then 3, artifacts written); a concept the model does not recognise gets
no search and no edit ("nothing to forget")."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slug_lightning import config_path
from slug_lightning.artifacts import save_state_dict
from slug_lightning.callbacks import StepSearch, step_search
from slug_lightning.cli import main
from slug_lightning.datamodules import LabelledSet
from slug_lightning.demo import make_demo_world
from slug_lightning.gradient_store import GradientStore
from slug_lightning.memory import PeakMemory
from slug_lightning.report import build_report
from slug_lightning.report_render import render_markdown, terminal_summary
from slug_lightning.search import concept_verdict, run_verdict

DEMO_UNLEARN = config_path("demo/unlearn.yaml")


def test_verdicts_of_concepts_and_runs():
    assert [concept_verdict(1.0, a) for a in (0.0, 0.1)] == ["forgotten", "not forgotten"]
    assert concept_verdict(0.05, 0.0, threshold=0.05) == "nothing to forget"
    assert run_verdict(["forgotten", "forgotten"]) == "forgotten"
    assert run_verdict(["not forgotten", "nothing to forget"]) == "not forgotten"
    assert run_verdict(["forgotten", "not forgotten"]) == "partly forgotten"
    assert run_verdict(["nothing to forget"]) == "nothing to forget"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 4 people: with the search's forget test on top-5, no step can forget (every class is always in the top 5)
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        people=4,
        objects=2,
        portraits_per_person=3,
        person_object_per_person=1,
        samples_per_object=3,
        scenery_samples=6,
        eval_per_person=2,
        eval_per_object=2,
        shards=2,
    )


def _unlearn(world, weights, output, *extra) -> int:
    sets = [{"name": "identities", "root": str(world.identities_dir)}]
    return main(
        [
            "unlearn",
            "--config",
            str(DEMO_UNLEARN),
            "--search.init_args.audit=false",
            "--model.init_args.pretrained",
            str(weights),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.shards",
            world.shards,
            "--data.init_args.batch_size",
            "16",
            "--data.init_args.min_forget_pairs",
            "1",
            "--data.init_args.concepts",
            json.dumps([{"name": world.default_target}]),
            "--search.init_args.sets",
            json.dumps(sets),
            "--search.init_args.metric",
            "top5",
            "--search.init_args.max_steps",
            "2",
            "--search.init_args.towers",
            "[language]",
            "--search.init_args.similarity_classes",
            "0",
            "--output_dir",
            str(output),
            *extra,
        ]
    )


def test_a_run_that_did_not_forget_says_so_and_exits_3_only_when_asked(world, tmp_path, tiny_clip, capsys):
    weights = tmp_path / "tiny.safetensors"
    save_state_dict(weights, tiny_clip.model.state_dict())
    output = tmp_path / "run"
    assert _unlearn(world, weights, output) == 0
    printed = capsys.readouterr().out
    report = json.loads((output / "report.json").read_text())
    assert report["verdict"] == "not forgotten" and report["concepts"][0]["verdict"] == "not forgotten"
    markdown = (output / "report.md").read_text()
    for text in (markdown, " ".join(printed.split())):  # the terminal wraps sentences
        assert "NOT forgotten" in text and "was forgotten" not in text and "forgot " not in text
    assert "SLUG result: NOT FORGOTTEN" in printed
    assert "forget top5 100.0% → 100.0%" in markdown  # what the best probe reached
    # the same run for a script that needs the concept gone: status 3, one line, the artifacts still written
    (output / "report.json").unlink()
    assert _unlearn(world, weights, output, "--require_forgotten", "true") == 3
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: --require_forgotten: the run's verdict is 'not forgotten'")
    assert (output / "report.json").is_file() and (output / "model.safetensors").is_file()


class _Images:
    """An evaluation set as the search reads it: three people, ten images each."""

    class_names = ["Ann", "Bob", "Cy"]
    targets = [0] * 10 + [1] * 10 + [2] * 10

    def class_index(self, name):
        return self.class_names.index(name)

    def __len__(self):
        return len(self.targets)


class _Evaluator:
    """Ann's images are never classified as Ann: the model does not know her."""

    def __init__(self, *args, **kwargs):
        self.datasets = {"people": _Images()}
        self.runs = 0

    def class_names(self, name):
        return self.datasets[name].class_names

    def run(self, edited=None):
        self.runs += 1
        return {"people": torch.tensor([[10.0, 0.0, 0.0], [10.0, 9.0, 10.0], [10.0, 8.0, 10.0]])}


def test_a_concept_the_model_does_not_know_gets_no_edit(tiny_clip, monkeypatch):
    monkeypatch.setattr(step_search, "ZeroShotEvaluator", _Evaluator)
    model = tiny_clip.model
    layer = "visual.proj"
    store = GradientStore(
        forget={"Ann": {layer: torch.ones_like(dict(model.named_parameters())[layer])}},
        retain={layer: torch.ones_like(dict(model.named_parameters())[layer])},
        forget_samples={"Ann": 8},
        retain_samples=100,
        model={"name": "slug-tiny", "pretrained": None, "fingerprint": "f0"},
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search = StepSearch(sets=[LabelledSet("people", root="unused")], metric="top1", similarity_classes=0)
    result = search.run(model, None, None, store)
    assert result.chosen == {} and result.nothing_to_forget == ["Ann"] and result.probes == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing edited
    collector = SimpleNamespace(gradients=store, model=model, memory=PeakMemory(), seconds=0.0, reused=False)
    report = build_report(collector, result, total_seconds=1.0, devices=1)
    assert report["verdict"] == "nothing to forget" and report["edit"]["tensors"] == 0
    (concept,) = report["concepts"]
    assert concept["verdict"] == "nothing to forget" and concept["layer"] is None
    report.update(plots=[], data={})
    for text in (render_markdown(report), terminal_summary(report, Path("out"))):
        assert "nothing to forget" in text and "was forgotten" not in text
