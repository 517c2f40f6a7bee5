"""The Python API (issue 27): ``unlearn`` does what the ``unlearn`` command does, from configs or from objects, and
``load_run`` reads a finished run back as an open_clip model; the README's snippet runs.

The runs here reuse the small run's gradients and skip the audit (both tested with the command line elsewhere), so
each is a search of seconds; its choice must be the command line's.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from safetensors.torch import load_file

from slug_lightning import GradientCollector, config_path
from slug_lightning.api import ChosenEdit, LoadedRun, UnlearnResult, load_run, unlearn
from slug_lightning.callbacks import StepSearch
from slug_lightning.concepts import as_concepts
from slug_lightning.datamodules import LabelledSet, LaionDataModule, ZeroShotDataModule
from slug_lightning.deltas import Provenance, read_checkpoint, write_checkpoint
from slug_lightning.demo import load_demo_world
from slug_lightning.errors import UserError
from slug_lightning.evaluation import ZeroShotEvaluator, summarize

README = Path(__file__).resolve().parent.parent / "README.md"
# The audit and the progress bar cost seconds and are tested elsewhere.
QUICK = {"search.init_args.audit": False, "trainer.enable_progress_bar": False}


def chosen(edits) -> list[tuple]:
    return [(edit.concept, edit.layer, edit.step_size) for edit in edits]


def reported(report: dict) -> list[tuple]:
    return [(c["name"], c["layer"], c["step_size"]) for c in report["concepts"]]


def assert_a_finished_run(result: UnlearnResult, cli_report: dict) -> None:
    """The command line's choice and verdict, every documented artifact, the in-memory model the saved one."""
    assert chosen(result.edits) == reported(cli_report) and result.verdict == cli_report["verdict"]
    assert result.report["after"] == cli_report["after"]
    assert json.loads((result.output_dir / "report.json").read_text())["concepts"] == result.report["concepts"]
    for path in (result.report_md, result.model_file, result.delta_file, result.config_file):
        assert path is not None and path.is_file(), path
    saved = load_file(str(result.model_file))
    own = result.model.state_dict()
    assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k].cpu()) for k in saved)


# --- unlearn ------------------------------------------------------------------------------------------------


def test_unlearn_from_objects_records_what_it_can(small_demo, small_run, tmp_path, monkeypatch):
    """No config: a collector, a datamodule, a search and Trainer arguments, a logger among them."""
    monkeypatch.chdir(tmp_path)
    output, cli_report = small_run
    paths = yaml.safe_load((small_demo / "demo_paths.yaml").read_text())
    demo = yaml.safe_load(Path(config_path("demo/unlearn.yaml")).read_text())
    data, search = demo["data"]["init_args"], demo["search"]["init_args"]
    result = unlearn(
        output_dir=tmp_path / "api",
        model=GradientCollector("slug-tiny", paths["model"]["init_args"]["pretrained"]),
        data=LaionDataModule(
            paths["data"]["init_args"]["shards"],
            concepts=as_concepts(paths["data"]["init_args"]["concepts"]),
            batch_size=data["batch_size"],
        ),
        search=StepSearch(
            sets=[LabelledSet(**s) for s in paths["search"]["init_args"]["sets"]],
            metric=search["metric"],
            max_steps=search["max_steps"],
            tolerance=search["tolerance"],
            audit=False,
        ),
        trainer={
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "logger": CSVLogger(tmp_path / "logs"),
        },
        gradients=output / "gradients.safetensors",
    )
    assert_a_finished_run(result, cli_report)
    text = result.config_file.read_text()
    assert text.startswith("# Written by slug_lightning.unlearn()") and "model, data, search, trainer.logger" in text
    record = yaml.safe_load(text)
    assert record["model"]["init_args"]["pretrained"] == paths["model"]["init_args"]["pretrained"]
    assert record["data"]["class_path"].endswith("LaionDataModule")
    assert record["search"]["class_path"].endswith("StepSearch")
    assert record["trainer"]["logger"] == {"class_path": "lightning.pytorch.loggers.csv_logs.CSVLogger"}
    assert record["trainer"]["enable_progress_bar"] is False  # a plain Trainer argument is a setting
    assert [entry["name"] for entry in result.report["loggers"]] == ["CSVLogger"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api", "logs"]  # the logger's save_dir, and no more
    assert list((tmp_path / "logs").rglob("metrics.csv"))


def test_an_object_stands_in_for_a_config_section(small_run, tmp_path, monkeypatch):
    """The run's config, as a dict, with a search of our own, as a smoke run (Trainer arguments over the config's)."""
    monkeypatch.chdir(tmp_path)
    output, cli_report = small_run
    search = StepSearch(sets=[LabelledSet(**s) for s in _sets(output)], metric="top1", max_steps=2, audit=False)
    result = unlearn(
        cli_config(output),  # a dict in the shape of a config file
        output_dir=tmp_path / "run",
        search=search,
        trainer={"fast_dev_run": True},
        gradients=output / "gradients.safetensors",
    )
    assert search.result is not None and result.report["smoke_run"] is True
    assert result.output_dir == tmp_path / "run" / "smoke" and result.report_md.is_file()
    assert result.report["settings"]["max_steps"] == 2 and cli_report["settings"]["max_steps"] == 10
    record = yaml.safe_load(result.config_file.read_text())
    assert record["search"] == {"class_path": "slug_lightning.callbacks.step_search.StepSearch"}
    assert record["trainer"]["fast_dev_run"] is True and record["model"] == cli_config(output)["model"]


def cli_config(output: Path) -> dict:
    return yaml.safe_load((output / "config.yaml").read_text())


def _sets(output: Path) -> list[dict]:
    return cli_config(output)["search"]["init_args"]["sets"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"config": "missing.yaml"}, ["Config file 'missing.yaml' does not exist"]),
        ({"config": "."}, ["is a directory, not a config file"]),
        ({"overrides": {"search.init_args.no_such_option": 1}}, ["no_such_option"]),
        ({"overrides": {"search.init_args.max_steps": "many"}}, ["max_steps", "many"]),
        ({"overrides": {"search.init_args.max_steps": 0}}, ["--search.init_args.max_steps:", ">= 1, got 0"]),
        ({"search": "top1"}, ["search must be a StepSearch, got str"]),
        ({"trainer": "cpu"}, ["trainer must be a SlugTrainer (its unlearn runs the pass) or a dict", "got str"]),
    ],
)
def test_a_mistake_is_one_line(small_run, tmp_path, monkeypatch, kwargs, words):
    monkeypatch.chdir(tmp_path)
    output, _ = small_run
    with pytest.raises(UserError) as raised:
        unlearn(**{"config": output / "config.yaml", "output_dir": tmp_path / "run", **kwargs})
    message = str(raised.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert not (tmp_path / "run").exists()


def test_a_run_without_data_is_one_line(small_run, tmp_path):
    output, _ = small_run
    config = {key: value for key, value in cli_config(output).items() if key != "data"}
    with pytest.raises(UserError, match=r"^unlearn\(\): no data: give `data`"):
        unlearn(config, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_plain_lightning_trainer_is_refused(tmp_path):
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(UserError, match="trainer must be a SlugTrainer .* got Trainer"):
        unlearn(output_dir=tmp_path / "run", trainer=trainer)


def test_a_finished_output_dir_is_refused_as_the_command_line_refuses_it(small_run):
    output, _ = small_run
    before = sorted((p.name, p.stat().st_mtime_ns) for p in output.iterdir())
    with pytest.raises(UserError, match="already holds a finished run"):
        unlearn(output / "config.yaml", output_dir=output, overrides=QUICK)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in output.iterdir()) == before


# --- load_run -----------------------------------------------------------------------------------------------


def _forget_accuracy(model, preprocess, tokenizer, world, concept: str) -> dict:
    sets = ZeroShotDataModule([LabelledSet("identities", root=str(world.identities_dir))])
    sets.transform = preprocess
    evaluator = ZeroShotEvaluator(model, tokenizer, sets, keep_classes=[concept])
    counts = evaluator.run()
    return summarize(counts, {"identities": evaluator.class_names("identities")}, {concept: "identities"})["forget"][
        concept
    ]


def test_load_run_gives_the_unlearned_model_its_preprocess_tokenizer_and_base(small_demo, small_run):
    output, report = small_run
    world = load_demo_world(small_demo / "world")
    run = load_run(output)
    assert run.report == report and run.verdict == report["verdict"]
    assert chosen(run.edits) == reported(report) and all(isinstance(e, ChosenEdit) for e in run.edits)
    saved = load_file(str(output / "model.safetensors"))
    assert all(torch.equal(value, run.model.state_dict()[key]) for key, value in saved.items())
    # preprocess and tokenizer are the model's: they reproduce the reported forget accuracy, after and before
    (edit,) = run.edits
    forget = _forget_accuracy(run.model, run.preprocess, run.tokenizer, world, edit.concept)
    assert (forget["top1"], forget["top5"]) == (edit.forget_after.top1, edit.forget_after.top5)
    base = run.base_model()
    forget = _forget_accuracy(base, run.preprocess, run.tokenizer, world, edit.concept)
    assert (forget["top1"], forget["top5"]) == (edit.forget_before.top1, edit.forget_before.top5)
    # θ⁰ is the fitted checkpoint: the edited layer up to rounding, every other tensor exactly
    fitted = load_file(str(small_demo / "fit" / "slug-tiny.safetensors"))
    base_state = base.state_dict()
    assert all(torch.equal(base_state[k], v) for k, v in fitted.items() if k != edit.layer)
    assert torch.allclose(base_state[edit.layer], fitted[edit.layer], atol=1e-6)
    assert not torch.equal(run.model.state_dict()[edit.layer], fitted[edit.layer])
    # the pieces work together on an image of the demo world
    image = run.preprocess(Image.open(next(world.identities_dir.rglob("*.png"))).convert("RGB"))
    with torch.no_grad():
        features = run.model.encode_image(image.unsqueeze(0)), run.model.encode_text(run.tokenizer(["a person."]))
    assert features[0].shape == features[1].shape


def _copy_run(output: Path, target: Path, *names: str) -> Path:
    target.mkdir(parents=True)
    for name in names:
        shutil.copy(output / name, target / name)
    return target


def test_load_run_refuses_what_is_not_a_finished_run_in_one_line(small_run, tmp_path):
    output, report = small_run
    smoke_parent = tmp_path / "smoke_parent"
    (smoke_parent / "smoke").mkdir(parents=True)
    (smoke_parent / "smoke" / "report.json").write_text(json.dumps({**report, "smoke_run": True}))
    kept_base = _copy_run(output, tmp_path / "apply_false", "report.json")
    state, provenance, _ = read_checkpoint(output / "model.safetensors")
    write_checkpoint(kept_base / "model.safetensors", state, Provenance(provenance.base_fingerprint, []))
    cases = {
        tmp_path / "absent": "is not a directory",
        kept_base: "its model.safetensors holds θ⁰, not the edit (the search ran with apply=False)",
        _copy_run(output, tmp_path / "unfinished", "config.yaml"): "holds no report.json: it is not a finished",
        smoke_parent: "its smoke/ holds a smoke run",
        smoke_parent / "smoke": "holds a smoke run",
        _copy_run(output, tmp_path / "no_model", "report.json"): "holds no model.safetensors",
    }
    for path, words in cases.items():
        with pytest.raises(UserError) as raised:
            load_run(path)
        assert words in str(raised.value) and "\n" not in str(raised.value), (path, str(raised.value))
    baseline = _copy_run(output, tmp_path / "baseline", "model.safetensors")
    (baseline / "report.json").write_text(json.dumps({**report, "method": "ft"}))
    with pytest.raises(UserError, match="is a ft run: it keeps no delta"):
        load_run(baseline).base_model()


# --- the README -----------------------------------------------------------------------------------------------


def readme_snippet() -> str:
    """The Python block of the README's "From Python" section."""
    section = README.read_text(encoding="utf-8").split("## From Python", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return block


def test_the_readme_snippet_names_only_what_the_api_has():
    """Every ``slug_lightning.X`` it calls is the package's API (exposed lazily), and every attribute it reads of a
    result, a loaded run or an edit exists."""
    import slug_lightning
    from slug_lightning import api

    tree = ast.parse(readme_snippet())
    calls = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and _named(node.value)}
    assert calls == {"unlearn", "load_run"} and calls <= set(slug_lightning.__all__)
    assert all(getattr(slug_lightning, name) is getattr(api, name) for name in calls)
    kinds = {"result": UnlearnResult, "run": LoadedRun, "edit": ChosenEdit}
    read = [
        (node.value.id, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in kinds
    ]
    assert {name for name, _ in read} == set(kinds), read
    for name, attr in read:
        assert attr in kinds[name].__dataclass_fields__ or hasattr(kinds[name], attr), (name, attr)


def _named(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "slug_lightning"


def test_the_readme_snippet_is_the_command_line_run(small_demo, small_run, tmp_path, monkeypatch, capsys):
    """The snippet, in a directory laid out as ``python -m slug_lightning demo`` leaves it (the small demo's paths),
    with the gradients reused and no audit, for speed: two config files layered as two --config give the command
    line's choice, and config.yaml is the command line's record. A Trainer built there gets no logger unless the
    config names one: nothing is written where the program runs."""
    import slug_lightning

    output, cli_report = small_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "demo").mkdir(parents=True)
    shutil.copy(config_path("demo/unlearn.yaml"), tmp_path / "configs" / "demo" / "unlearn.yaml")
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    shutil.copy(small_demo / "demo_paths.yaml", tmp_path / "runs" / "demo" / "demo_paths.yaml")
    gradients = output / "gradients.safetensors"
    quick = {**QUICK, "trainer.logger": None}  # as a config that names no logger

    def quick_unlearn(*args, **kwargs):
        return unlearn(*args, **kwargs, gradients=gradients, overrides=quick)

    monkeypatch.setattr(slug_lightning, "unlearn", quick_unlearn)
    namespace: dict = {}
    exec(compile(readme_snippet(), str(README), "exec"), namespace)
    result, run = namespace["result"], namespace["run"]
    assert f"{cli_report['verdict']} [" in capsys.readouterr().out
    assert_a_finished_run(result, cli_report)
    assert result.output_dir == Path("runs/demo/api") and result.report["timing"]["reused_gradients"] is True
    assert run.output_dir == result.output_dir and namespace["features"].ndim == 2
    record = yaml.safe_load(result.config_file.read_text())
    assert record["output_dir"] == "runs/demo/api" and record["overwrite"] is False
    assert record["gradients"] == str(gradients) and record["trainer"]["logger"] is False
    assert record["search"]["init_args"]["audit"] is False and record["search"]["init_args"]["max_steps"] == 10
    assert record["data"]["init_args"]["concepts"] == [cli_report["concepts"][0]["name"]]
    assert str(result.config_file) in result.report["command"]  # what the command line writes: it reruns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "runs"]
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir()) == ["api", "demo_paths.yaml"]
    assert not list(tmp_path.rglob("lightning_logs"))
