"""Reports a person can read: every plot renders with content, report.md links only what exists, the
terminal summary and the similarity matrix of `evaluate`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slug_lightning import plots
from slug_lightning.layers import LayerStats, short_name
from slug_lightning.plots import unlearn_plots
from slug_lightning.report_render import render_markdown, terminal_summary
from slug_lightning.results import SearchResult
from slug_lightning.search import Probe


def assert_readable_png(path: Path, min_width: int = 500, min_height: int = 350) -> None:
    """The file decodes as a PNG of a sensible size and is not blank (real marks on a white page)."""
    with Image.open(path) as image:
        assert image.format == "PNG", path
        image.load()
        width, height = image.size
        gray = np.asarray(image.convert("L"), dtype=np.float32)
    assert width >= min_width and height >= min_height, (path.name, image.size)
    inked = (gray < 200).mean()
    assert 0.01 < inked < 0.9, (path.name, inked)  # some ink, not a solid block
    assert gray.std() > 20, path.name


def report_links(markdown: str) -> list[str]:
    return re.findall(r"!?\[[^\]]*\]\(([^)]+)\)", markdown)


def _result() -> SearchResult:
    """A finished search of a two-tower, one-concept run, as the plots read it."""
    names = [
        "visual.conv1.weight",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.proj",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "ln_final.weight",
        "text_projection",
    ]
    generator = torch.Generator().manual_seed(0)
    importance = torch.rand(len(names), generator=generator).tolist()
    alignment = torch.rand(len(names), generator=generator).tolist()
    layers = {
        "Ann Lee": [
            LayerStats(
                n,
                "vision" if n.startswith("visual.") else "language",
                10 ** (-3 * i),
                10 ** (-2 * a),
                1.0,
                1.0,
                front=1 + k % 2,
            )
            for k, (n, i, a) in enumerate(zip(names, importance, alignment))
        ]
    }
    probes = []
    for layer in ("visual.proj", "text_projection"):
        for step, lam in enumerate([1.0, 2.0, 4.0, 3.0, 3.5]):
            forget = max(0.0, 1 - lam / 3.2)
            probes.append(
                Probe(
                    "Ann Lee",
                    layer,
                    step,
                    lam,
                    0.1 * lam,
                    forget,
                    min(1.0, forget * 2),
                    {"people": 0.9 - 0.02 * lam, "things": 0.8},
                    {"people": 1.0, "things": 1.0},
                )
            )
    matrix = torch.rand(4, 4, generator=generator) * 0.5 + torch.eye(4) * 0.4
    similarity = {
        "people": (
            ["Ann Lee", "Bob Roy", "Cy Dunn", "Dee Fox"],
            ["Ann Lee"],
            matrix,
            matrix * torch.tensor([0.2, 1, 1, 1])[:, None],
        )
    }
    # one concept: no refinement visits
    return SearchResult(
        ["Ann Lee"],
        {"metric": "top1", "threshold": 0.0, "fronts": 1},
        before={},
        after={},
        chosen={"Ann Lee": probes[3]},
        probes=probes,
        layers=layers,
        similarity=similarity,
    )


def test_every_plot_of_a_run_renders_with_content(tmp_path):
    names = unlearn_plots(tmp_path, _result())
    assert set(names) == {
        "pareto_ann_lee_vision.png",
        "pareto_ann_lee_language.png",
        "search_ann_lee.png",
        "similarity_people.png",
    }
    for name in names:
        assert_readable_png(tmp_path / name)


@pytest.mark.parametrize("fronts", [1, 2])
def test_pareto_plot_labels_every_searched_front(tmp_path, monkeypatch, fronts):
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.append(figure))
    stats = [s for s in _result().layers["Ann Lee"] if s.tower == "vision"]  # fronts 1, 2, 1
    plots.pareto_plot(tmp_path / "p.png", "Ann Lee", "vision", stats, "visual.proj", fronts=fronts)
    axis = drawn[0].axes[0]
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    labelled = sorted(text.get_text() for text in axis.texts)
    searched = sorted(short_name(s.name) for s in stats if s.front <= fronts)
    assert labelled == searched
    assert ("front 2 (searched too)" in legend) == (fronts == 2)
    assert ("other layers" in legend) == (fronts == 1)
    assert "chosen: v.proj" in legend


def _report(plots: list[str]) -> dict:
    accuracies = {
        "forget": {"Ann Lee": {"top1": 0.9, "top5": 1.0}},
        "test": {"people": {"top1": 0.8, "top5": 0.95}, "things": {"top1": 0.7, "top5": 0.9}},
    }
    after = {"forget": {"Ann Lee": {"top1": 0.0, "top5": 0.2}}, "test": accuracies["test"]}
    return {
        "model": {"name": "slug-tiny", "pretrained": "fit.safetensors", "parameters": 123},
        "concepts": [
            {
                "name": "Ann Lee",
                "layer": "visual.proj",
                "tower": "vision",
                "step_size": 3.0,
                "relative_change": 0.3,
                "forget_samples": 12,
            }
        ],
        "retain_samples": 100,
        "skipped_samples": 1,
        "before": accuracies,
        "after": after,
        "settings": {"metric": "top1", "threshold": 0.0},
        "timing": {"gradients_s": 2.0, "search_s": 1.0, "total_s": 3.5, "probes": 10, "reused_gradients": False},
        "memory": {"gradients": {"peak_rss_mib": 900.0}, "search": {"peak_rss_mib": 950.0}, "peak_rss_mib": 990.0},
        "devices": 1,
        "plots": plots,
        "data": {
            "shards": "s/{0..3}.tar",
            "forget_shards": "s/{0..3}.tar",
            "batch_size": 8,
            "concepts": [{"name": "Ann Lee", "aliases": ["Ann"]}],
            "evaluation_sets": [
                {"name": "people", "source": "eval/people", "fraction": 0.5, "templates": 1, "classes": 4, "images": 40}
            ],
        },
        "command": "python -m slug_lightning unlearn --config out/config.yaml",
    }


def test_report_md_has_every_section_and_links_only_its_plots(tmp_path):
    plots = unlearn_plots(tmp_path, _result())
    markdown = render_markdown(_report(plots))
    for heading in (
        "## Data",
        "## Chosen edits",
        "## Accuracy before and after",
        "## Cost",
        "## Layers: importance against alignment",
        "## Step-size search",
        "## Image–text similarity",
        "## Reproduce",
    ):
        assert heading in markdown, heading
    assert "Ann Lee (aliases: Ann)" in markdown and "(50% subset)" in markdown
    assert "| forget | Ann Lee | 90.0 | 0.0 |" in markdown
    assert sorted(report_links(markdown)) == sorted(plots)
    assert all((tmp_path / link).is_file() for link in report_links(markdown))
    assert "Pareto fronts 1–" not in markdown
    report = _report(plots)
    report["settings"]["fronts"] = 3
    assert "Searched: the layers of Pareto fronts 1–3 of each tower (`fronts: 3`)" in render_markdown(report)


def test_report_md_shows_each_edits_share_for_several_concepts():
    report = _report([])
    assert "## Each edit's share" not in render_markdown(report)  # one concept: nothing to leave out
    report["concepts"].append({**report["concepts"][0], "name": "Bob Roy", "layer": "text_projection"})
    for side in ("before", "after"):
        report[side]["forget"]["Bob Roy"] = {"top1": 0.0, "top5": 0.1}
    report["leave_one_out"] = {
        "Ann Lee": {
            "forget": {"Ann Lee": {"top1": 0.9, "top5": 1.0}, "Bob Roy": {"top1": 0.25, "top5": 0.5}},
            "test": {"people": {"top1": 0.85, "top5": 1.0}, "things": {"top1": 0.7, "top5": 0.9}},
        },
        "Bob Roy": {
            "forget": {"Ann Lee": {"top1": 0.0, "top5": 0.1}, "Bob Roy": {"top1": 1.0, "top5": 1.0}},
            "test": {"people": {"top1": 0.8, "top5": 0.95}, "things": {"top1": 0.75, "top5": 0.9}},
        },
    }
    markdown = render_markdown(report)
    assert "| edits | test people | test things | forget Ann Lee | forget Bob Roy |" in markdown
    assert "| every edit | 80.0 | 70.0 | 0.0 | 0.0 |" in markdown
    # leaving Ann's edit out gives 5 points of people back and brings Bob partly back: he leans on her edit
    assert "| all but Ann Lee's | 85.0 | 70.0 | 90.0 | 25.0 |" in markdown
    assert "| all but Bob Roy's | 80.0 | 75.0 | 0.0 | 100.0 |" in markdown


def test_report_md_and_the_terminal_summary_show_the_concept_orders_and_the_kept_one():
    report = _report([])
    report["concepts"].append({**report["concepts"][0], "name": "Bob Roy", "layer": "text_projection"})
    for side in ("before", "after"):
        report[side]["forget"]["Bob Roy"] = {"top1": 0.0, "top5": 0.1}
    tests = report["after"]["test"]

    def end(concepts, bob, people, kept):
        return {
            "concepts": concepts,
            "kept": kept,
            "probes": 40,
            "edits": {},
            "forget": {"Ann Lee": {"top1": 0.0, "top5": 0.1}, "Bob Roy": {"top1": bob, "top5": 1.0}},
            "test": {**tests, "people": {"top1": people, "top5": 1.0}},
        }

    report["orders"] = [end(["Ann Lee", "Bob Roy"], 0.0, 0.8, False)]
    assert "## Concept orders" not in render_markdown(report)  # one order: nothing to compare
    assert "concept order" not in terminal_summary(report, Path("runs/x"))
    report["orders"] = [end(["Ann Lee", "Bob Roy"], 0.0, 0.8, True), end(["Bob Roy", "Ann Lee"], 0.5, 0.9, False)]
    markdown = render_markdown(report)
    assert "| order | forgotten | test people | test things | probes | kept |" in markdown
    assert "| Ann Lee, Bob Roy | 2 of 2 | 80.0 | 70.0 | 40 | yes |" in markdown
    assert "| Bob Roy, Ann Lee | 1 of 2 | 90.0 | 70.0 | 40 |  |" in markdown
    assert "kept the end of concept order 1 of 2: Ann Lee, Bob Roy" in terminal_summary(report, Path("runs/x"))
    # the refinement sentence speaks of the kept order's rounds only
    report["search"] = [{"round": 0, "order": 0}, {"round": 2, "order": 1}]
    assert "refinement round(s)" not in render_markdown(report)
    report["search"].append({"round": 1, "order": 0})
    assert "1 refinement round(s)" in render_markdown(report)


def test_report_md_and_the_terminal_summary_name_the_test_classes_that_lost_the_most():
    report = _report([])
    assert "## Test classes that lost the most" not in render_markdown(report)  # a report without them
    assert "lost the most" not in terminal_summary(report, Path("runs/x"))
    falls = [0.5, 0.0, 0.25, 0.1, 0.2, 0.15, 0.3]  # seven people, each losing that much of a top-1 of 100 %
    people = [
        {"name": f"P{i}", "images": 12, "top1_before": 1.0, "top1_after": 1.0 - fall}
        for i, fall in sorted(enumerate(falls), key=lambda item: -item[1])
    ]
    things = [{"name": "cup", "images": 8, "top1_before": 0.5, "top1_after": 0.75}]
    report["test_classes"] = {"people": people, "things": things}
    markdown = render_markdown(report)
    rows = [line for line in markdown.splitlines() if line.startswith("| people | P")]
    assert rows == [
        "| people | P0 | 12 | 100.0 | 50.0 | -50.0 |",
        "| people | P6 | 12 | 100.0 | 70.0 | -30.0 |",
        "| people | P2 | 12 | 100.0 | 75.0 | -25.0 |",
        "| people | P4 | 12 | 100.0 | 80.0 | -20.0 |",
        "| people | P5 | 12 | 100.0 | 85.0 | -15.0 |",
    ]  # the five largest falls, P3 and P1 left out
    assert "| things | no class lost top-1 |" in markdown
    assert "lost the most: P0 (people) 100.0% → 50.0%" in terminal_summary(report, Path("runs/x"))


def test_terminal_summary_shows_the_edit_and_before_after():
    text = terminal_summary(_report([]), Path("runs/x"))
    words = " ".join(text.split())  # the sentence is wrapped to the table's width
    assert "'Ann Lee' was forgotten by editing one layer, visual.proj (vision tower), with λ = 3" in words
    assert re.search(r"forget: Ann Lee\s+90\.0%\s+0\.0%", text)
    assert re.search(r"test: people\s+80\.0%\s+80\.0%", text)
    assert "runs/x/" in text


def test_a_concept_not_forgotten_is_never_said_to_be():
    report = _report([])
    report["after"]["forget"]["Ann Lee"] = {"top1": 0.25, "top5": 0.5}
    report["verdict"], report["concepts"][0]["verdict"] = "not forgotten", "not forgotten"
    for text in (terminal_summary(report, Path("runs/x")), render_markdown(report)):
        text = " ".join(text.split())
        assert "NOT forgotten" in text and "was forgotten" not in text and "forgot " not in text
        assert "forget top1 90.0% → 25.0%" in text  # what the best edit reached
    assert "SLUG result: NOT FORGOTTEN" in terminal_summary(report, Path("runs/x"))


def test_evaluate_draws_the_similarity_matrix_of_any_model(tmp_path):
    from slug_lightning.cli import main

    root = tmp_path / "people"
    generator = torch.Generator().manual_seed(0)
    for name in ("Ann Lee", "Bob Roy", "Cy Dunn"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    args = [
        "evaluate",
        "--model",
        "slug_lightning.ZeroShotModule",
        "--data",
        "slug_lightning.datamodules.ZeroShotDataModule",
        "--data.init_args.sets",
        f"[{{name: people, root: {root}}}]",
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main([*args, "--similarity", str(tmp_path / "sim.png")]) == 0
    assert_readable_png(tmp_path / "sim.png", min_width=300, min_height=250)
    assert main([*args, "--similarity", str(tmp_path / "bad.png"), "--similarity_classes", "[Ann Le]"]) == 2
    assert not (tmp_path / "bad.png").exists()
