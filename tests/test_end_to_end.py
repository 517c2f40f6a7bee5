"""End to end on the demo world: the README's demo, then what users check of its result.

The demo (world + fit + unlearn) runs once per session as a subprocess, exactly as the README says; the
other tests reuse its world and fitted tiny CLIP.
"""

import csv
import json
import shutil

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from slug_lightning import GradientCollector
from slug_lightning.callbacks import StepSearch
from slug_lightning.concepts import Concept
from slug_lightning.datamodules import LabelledSet, LaionDataModule, ZeroShotDataModule
from slug_lightning.datamodules.demo_world import load_demo_world
from slug_lightning.evaluation import ZeroShotEvaluator, summarize
from slug_lightning.zero_shot import accuracy

pytestmark = pytest.mark.slow


from conftest import run_cli as _run  # noqa: E402  (the `demo` fixture is in conftest.py)


def _sets(world):
    return [LabelledSet("identities", root=str(world.identities_dir)),
            LabelledSet("objects", root=str(world.objects_dir))]


def test_fit_reaches_90_percent_zero_shot(demo):
    output, report, _ = demo
    for name in ("identities", "objects"):
        assert report["before"]["test"][name]["top1"] >= 0.90, (name, report["before"]["test"][name])


def test_demo_forgets_the_person_and_keeps_the_rest(demo):
    output, report, log = demo
    (concept,) = report["concepts"]
    name = concept["name"]
    assert report["before"]["forget"][name]["top1"] >= 0.5
    assert report["after"]["forget"][name]["top1"] == 0.0
    before, after = report["before"]["test"], report["after"]["test"]
    assert before["identities"]["top1"] - after["identities"]["top1"] <= 0.05
    assert before["objects"]["top1"] - after["objects"]["top1"] <= 0.02
    assert "SLUG result" in log and "top-1 before" in log
    for artifact in ("report.json", "report.md", "layers.csv", "search.csv", "gradients.safetensors",
                     "delta.safetensors", "model.safetensors", "config.yaml", *report["plots"]):
        assert (output / artifact).is_file(), artifact
    # the edit is one layer: the delta holds exactly one tensor, the chosen one
    delta = load_file(str(output / "delta.safetensors"))
    assert list(delta) == [f"{name}/{concept['layer']}"]


def test_the_demo_report_shows_every_figure(demo):
    """Fig. 2 (Pareto per tower, search), Fig. 3 (similarity before/after) for the demo's own run."""
    from test_report import assert_readable_png, report_links

    output, report, _ = demo
    slug = report["concepts"][0]["name"].lower().replace(" ", "_")
    assert set(report["plots"]) == {f"pareto_{slug}_vision.png", f"pareto_{slug}_language.png",
                                    f"search_{slug}.png", "similarity_identities.png"}
    for name in report["plots"]:
        assert_readable_png(output / name)
    links = report_links((output / "report.md").read_text())
    assert sorted(links) == sorted(report["plots"])
    assert all((output / link).is_file() for link in links)


def test_unlearned_checkpoint_reproduces_reported_accuracy(demo):
    """model.safetensors loads with open_clip itself and gives the reported `after` accuracies."""
    output, report, _ = demo
    world = load_demo_world(output / "world")
    model, _, preprocess = open_clip.create_model_and_transforms(
        report["model"]["name"], pretrained=str(output / "model.safetensors"))
    datamodule = ZeroShotDataModule(_sets(world))
    datamodule.transform = preprocess
    concepts = [c["name"] for c in report["concepts"]]
    evaluator = ZeroShotEvaluator(model, open_clip.get_tokenizer(report["model"]["name"]), datamodule,
                                  keep_classes=concepts)
    names = {s: evaluator.class_names(s) for s in evaluator.datasets}
    counts = evaluator.run()
    result = summarize(counts, names, {c: "identities" for c in concepts})
    for side in ("forget", "test"):
        for key, value in report["after"][side].items():
            assert result[side][key]["top1"] == pytest.approx(value["top1"], abs=1e-9)
            assert result[side][key]["top5"] == pytest.approx(value["top5"], abs=1e-9)
    # and every test class's top-1, the forgotten person not among them
    for set_name, rows in report["test_classes"].items():
        assert sorted(row["name"] for row in rows) == sorted(set(names[set_name]) - set(concepts))
        for row in rows:
            top1 = accuracy(counts[set_name], [list(names[set_name]).index(row["name"])])["top1"]
            assert row["top1_after"] == pytest.approx(top1, abs=1e-9), row
    # and the base model is untouched: only the chosen layer differs from it
    base = load_file(str(output / "fit" / "slug-tiny.safetensors"))
    edited = load_file(str(output / "model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], edited[k])]
    assert changed == [report["concepts"][0]["layer"]]


def test_second_demo_reuses_the_fit_and_the_config_reproduces_the_run(demo):
    output, report, _ = demo
    fit = output / "fit" / "slug-tiny.safetensors"
    stamp = fit.stat().st_mtime_ns
    _run("unlearn", "--config", output / "config.yaml")
    again = json.loads((output / "report.json").read_text())
    assert fit.stat().st_mtime_ns == stamp
    assert again["timing"]["reused_gradients"] is True
    assert [(c["layer"], c["step_size"]) for c in again["concepts"]] == \
        [(c["layer"], c["step_size"]) for c in report["concepts"]]
    assert again["after"] == report["after"]


def test_object_concept_is_forgotten_and_identities_kept(demo, tmp_path):
    output, _, _ = demo
    shutil.copytree(output / "world", tmp_path / "world")
    shutil.copytree(output / "fit", tmp_path / "fit")
    world = load_demo_world(tmp_path / "world")
    target = world.objects[0]
    _run("demo", "--output_dir", tmp_path, "--concept", target)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["concepts"][0]["name"] == target
    assert report["after"]["forget"][target]["top1"] == 0.0
    before, after = report["before"]["test"], report["after"]["test"]
    assert before["identities"]["top1"] - after["identities"]["top1"] <= 0.05
    assert before["objects"]["top1"] - after["objects"]["top1"] <= 0.10


def test_more_fronts_search_the_layers_behind_the_pareto_front(demo, tmp_path):
    output, report, _ = demo
    _run("unlearn", "--config", output / "config.yaml", "--output_dir", tmp_path, "--gradients",
         output / "gradients.safetensors", "--search.init_args.fronts", "2", "--search.init_args.max_steps", "3")
    fronts = json.loads((tmp_path / "report.json").read_text())
    assert fronts["settings"]["fronts"] == 2 and report["settings"]["fronts"] == 1
    layers = list(csv.DictReader((tmp_path / "layers.csv").open()))
    searched = {row["layer"] for row in csv.DictReader((tmp_path / "search.csv").open())}
    assert searched == {row["layer"] for row in layers if int(row["front"]) <= 2}
    assert any(row["front"] == "2" for row in layers)
    assert all((row["pareto"] == "True") == (row["front"] == "1") for row in layers)
    assert {p["layer"] for p in report["search"]} == {row["layer"] for row in layers if row["front"] == "1"}


@pytest.mark.ddp
def test_two_process_ddp_gives_the_same_gradients_and_choice(demo, tmp_path):
    output, report, _ = demo
    _run("unlearn", "--config", output / "config.yaml", "--output_dir", tmp_path, "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger", "false")
    ddp = json.loads((tmp_path / "report.json").read_text())
    assert ddp["devices"] == 2 and ddp["timing"]["reused_gradients"] is False
    one, two = load_file(str(output / "gradients.safetensors")), load_file(str(tmp_path / "gradients.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).norm() <= 1e-4 * one[key].norm() + 1e-12, key
    assert ddp["concepts"][0]["layer"] == report["concepts"][0]["layer"]
    assert ddp["concepts"][0]["step_size"] == pytest.approx(report["concepts"][0]["step_size"], rel=1e-6)
    assert ddp["retain_samples"] == report["retain_samples"]
    assert ddp["concepts"][0]["forget_samples"] == report["concepts"][0]["forget_samples"]


def test_collector_and_search_in_a_user_lightning_setup(demo, tmp_path):
    """The pieces without the CLI: the user's own Trainer, callbacks list and logger."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    output, report, _ = demo
    world = load_demo_world(output / "world")
    target = world.people[1] if world.people[0] == world.default_target else world.people[0]
    collector = GradientCollector("slug-tiny", str(output / "fit" / "slug-tiny.safetensors"))
    laion = LaionDataModule(world.shards, concepts=[Concept(target)], batch_size=128)
    search = StepSearch(sets=_sets(world), metric="top1", max_steps=6)
    logger = CSVLogger(tmp_path, name="user")
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=False, logger=logger,
                        callbacks=[search], enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(collector, datamodule=laion, return_predictions=False)
    assert search.chosen[target].forget_top1 == 0.0
    assert search.after["forget"][target]["top1"] == 0.0
    assert search.before["forget"][target]["top1"] > 0.0
    logger.finalize("success")
    rows = (tmp_path / "user" / "version_0" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) - 1 == len(search.probes) > 0


# The baselines on the fitted demo CLIP, one iteration each over a one-shard retain set (all forget pairs).
# How far one SSD alpha moves the forget accuracy depends on the fit, which follows the CPU's kernels, so SSD is
# checked for direction rather than for a drop of a given size.
BASELINE_SETTINGS = {"ft": ["--baseline.lr=1e-5"], "ga": ["--baseline.lr=1e-3"], "gaft": ["--baseline.lr=1e-3"],
                     "salun": ["--baseline.lr=1e-3"], "ssd": ["--baseline.alpha=5"]}


@pytest.mark.parametrize("method", list(BASELINE_SETTINGS))
def test_each_baseline_runs_from_the_cli_and_moves_the_intended_way(demo, tmp_path, method):
    output, report, _ = demo
    world = load_demo_world(output / "world")
    shards = sorted((output / "world" / "shards").glob("*.tar"))
    _run("unlearn", "--config", output / "config.yaml", "--method", method, *BASELINE_SETTINGS[method],
               "--baseline.iterations=1", f"--data.init_args.shards={shards[0]}",
               f"--data.init_args.forget_shards={world.shards}", "--output_dir", tmp_path,
               "--trainer.logger=false", "--trainer.enable_progress_bar=false")
    run = json.loads((tmp_path / "report.json").read_text())
    name = report["concepts"][0]["name"]
    before, after = run["before"]["forget"][name]["top1"], run["after"]["forget"][name]["top1"]
    assert before == report["before"]["forget"][name]["top1"]  # same model, same evaluation as SLUG's run
    if method == "ft":
        assert abs(after - before) <= 0.1, (before, after)
    elif method == "ssd":
        # SSD dampens the weights more important to the forget pairs than to the retain pairs: the person's top-1
        # falls. By how much, and at what cost to the rest, depends on alpha and on the fit, which follows the CPU's
        # kernels (alpha 5 here took it to 0.0 on one machine's fit; on another to 0.58, with identities falling to
        # 3 %): that is what `compare` tunes alpha for, and benchmarks/results/compare_demo.md measures.
        assert after < before, (before, after)
    else:
        assert after <= before - 0.5, (before, after)
    assert run["method"] == method and run["concepts"][0]["layer"] is None
    assert [row["iteration"] for row in run["search"]] == [1]
    assert (run["retain_samples"] > 0) == (method in ("ft", "gaft", "salun", "ssd"))  # GA reads no retain pair
    forget_pairs = 0 if method == "ft" else report["concepts"][0]["forget_samples"]  # FT reads no forget pair
    assert run["concepts"][0]["forget_samples"] == forget_pairs
    # what shipping it costs: whole changed tensors, far more than SLUG's one layer
    assert run["edit"]["tensors"] > report["edit"]["tensors"] == 1
    for artifact in ("report.md", "iterations.csv", "model.safetensors", "config.yaml"):
        assert (tmp_path / artifact).is_file(), artifact
    assert f"baseline {method.upper()}" in (tmp_path / "report.md").read_text()
    edited = load_file(str(tmp_path / "model.safetensors"))
    base = load_file(str(output / "fit" / "slug-tiny.safetensors"))
    changed = sum(not torch.equal(base[k], edited[k]) for k in base)
    assert changed == run["edit"]["tensors"]
