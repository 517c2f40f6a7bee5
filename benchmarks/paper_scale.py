"""The whole unlearn on the paper's geometry: a random-initialised ViT-B-32 at 224 px, a gradient pass over generated
forget and retain pairs, and the step-size search over generated evaluation sets, with and without forget first.

The paper's setup evaluates about 5,000 images (CelebA's 100 identities and 5 % of ImageNet) for each of ~10 probes on
each front layer, against one forward and backward pass over ~1–6k forget and ~8k retain pairs. This script keeps that
geometry (the model, the image size, a forget concept that is one identity among many, two evaluation sets, ~10
probes per layer) at sizes two CPU cores finish in about 10 minutes, and reports what carries to a GPU:

- search time / gradient-pass time, for full probes (every probe evaluates every set), forget first (the default: a
  probe whose forget images fail the forget test skips the rest) and forget first with warm starts;
- probes per layer and how many probes evaluated the test sets;
- the probe cache's memory per image;
- the projection of both times to the paper's sizes: the gradient pass in proportion to the pairs, each probe in
  proportion to the images it evaluates (all of them when tested, the forget concept's alone when not).

Where each layer first forgets is scripted (a random model forgets nothing in particular): every probe computes
exactly what a real one does (the edited layer, the cached stages, both sets), but its forget accuracy is replaced
by 0 above the layer's scripted step and 1 below, so the searches take the paths of a real search (doublings, then
bisection; ~10 probes per layer with ``max_steps`` 10), and its test accuracy by one that falls with the step. The
edit direction of each layer is its real forget gradient.

Run (CPU, about 10 minutes on 2 cores)::

    python benchmarks/paper_scale.py --output benchmarks/results/paper_scale.md

``--device cuda`` runs the paper's sizes (``--paper``, the default on a GPU) and adds absolute times and the peak
GPU memory. ``--demo DIR`` also times the demo's unlearn (a finished ``python -m slug_lightning demo``) with full
probes, forget first, and forget first with warm starts, in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from _common import image_folder, machine, publish, table

from slug_lightning import config_path
from slug_lightning.datamodules import LabelledSet, ZeroShotDataModule
from slug_lightning.editor import ModelEditor
from slug_lightning.evaluation import ZeroShotEvaluator, summarize
from slug_lightning.joint_search import JointSearch, Listener, SearchRule
from slug_lightning.layers import LayerStats, short_name, tower_of
from slug_lightning.losses import forget_loss_sum, retain_loss_sum
from slug_lightning.models import load_clip


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run: pairs of the gradient pass, and (classes, images per class) of each evaluation set."""

    forget_pairs: int
    retain_pairs: int
    identities: tuple[int, int]  # the forget set: the concept is one identity
    objects: tuple[int, int]

    @property
    def images(self) -> int:
        return self.identities[0] * self.identities[1] + self.objects[0] * self.objects[1]


# The paper: one CelebA identity among 100 (25 images each), 5 % of ImageNet (2,500 images; 500 classes here, the
# text tower's share of a language probe at half ImageNet's 1,000), ~3k forget pairs (1–6k), ~8k retain pairs.
PAPER = Sizes(forget_pairs=3000, retain_pairs=8000, identities=(100, 25), objects=(500, 5))
CPU = Sizes(forget_pairs=16, retain_pairs=32, identities=(8, 4), objects=(16, 2))
SMOKE = Sizes(forget_pairs=2, retain_pairs=2, identities=(2, 2), objects=(2, 1))  # checks that the script runs
# A front of late vision blocks, the final projection and a language block; each first forgets at this relative
# change λ‖G‖/‖θ‖ (the first probe is 0.1, so ~4–5 doublings, then bisection).
# Spread as on the demo, where layers first forgot between 0 and 4 doublings: a warm start gains on some layers
# and pays halvings back down on others.
FRONT = {
    "visual.transformer.resblocks.8.mlp.c_proj.weight": 1.9,
    "visual.transformer.resblocks.10.mlp.c_proj.weight": 0.35,
    "visual.transformer.resblocks.11.mlp.c_fc.weight": 2.6,
    "visual.proj": 1.2,
    "transformer.resblocks.11.mlp.c_proj.weight": 2.2,
}
CONCEPT_SET = "identities"
TEMPLATES = ["a photo of {}.", "a picture of {}."]


def gradient_pass(model, tokenizer, sizes: Sizes, batch: int, device: str, front) -> tuple[float, dict]:
    """One forward and backward over the forget pairs, then over the retain pairs (random pictures and captions), as
    the gradient pass does; returns its seconds and the forget gradient of each ``front`` layer."""
    generator = torch.Generator().manual_seed(0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    parameters = dict(model.named_parameters())
    model.train()
    forget = {}
    start = time.perf_counter()
    for kind, pairs in (("forget", sizes.forget_pairs), ("retain", sizes.retain_pairs)):
        model.zero_grad(set_to_none=True)
        for first in range(0, pairs, batch):
            count = min(batch, pairs - first)
            images = torch.randn(count, 3, size, size, generator=generator).to(device)
            tokens = tokenizer([f"a photo of person {first + i}" for i in range(count)]).to(device)
            image, text = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
            loss = (
                forget_loss_sum(image, text)
                if kind == "forget"
                else retain_loss_sum(image, text, model.logit_scale, False)
            )
            loss.backward()
        if kind == "forget":
            forget = {name: parameters[name].grad.detach().clone() for name in front}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return seconds, forget


class CacheSize(Listener):
    """The most bytes the vision stage caches held after any probe (a full evaluation drops them)."""

    def __init__(self, evaluator: ZeroShotEvaluator) -> None:
        self.evaluator, self.most = evaluator, 0

    def probed(self, probe) -> None:
        self.most = max(self.most, self.evaluator.cache_bytes("vision"))


class ScriptedForget:
    """An editor that computes every evaluation with ``editor`` but reports the concept forgotten exactly when the
    step moves its layer by at least the layer's scripted relative change, and a test accuracy that falls with the
    relative change: a random model's accuracies are chance, and their ties would be broken by float rounding."""

    def __init__(self, editor: ModelEditor, concept: str, crossing: dict[str, float], stats: dict[str, LayerStats]):
        self.editor, self.concept, self.crossing, self.stats = editor, concept, crossing, stats

    def _script(self, summary, layer=None, step_size=0.0):
        change = 0.0 if layer is None else step_size * self.stats[layer].grad_norm / self.stats[layer].weight_norm
        value = 0.0 if layer is not None and change >= self.crossing[layer] else 1.0
        forget = {self.concept: {**summary["forget"][self.concept], "top1": value, "top5": value}}
        utility = 1.0 / (1.0 + change)  # (no test accuracies where the probe skipped the test sets)
        return {
            "forget": forget,
            "test": {k: {**v, "top1": utility, "top5": utility} for k, v in summary["test"].items()},
        }

    def evaluate(self):
        return self._script(self.editor.evaluate())

    def probe(self, layer, step_size, direction, needs_tests=None):
        ask = None if needs_tests is None else (lambda summary: needs_tests(self._script(summary, layer, step_size)))
        return self._script(self.editor.probe(layer, step_size, direction, ask), layer, step_size)

    def shift(self, changes):
        return self._script(self.editor.shift(changes))

    def reset(self, changes=()):
        return self._script(self.editor.reset(changes))


def search(model, tokenizer, preprocess, folders, forget, sizes, device, modes) -> tuple[list[dict], float]:
    """The search of the front in each mode; returns a row per mode and the cache's bytes per image."""
    sets = [LabelledSet(name, root=folder, templates=TEMPLATES) for name, folder in folders.items()]
    datamodule = ZeroShotDataModule(sets, batch_size=64)
    datamodule.transform = preprocess
    concept = datamodule.datasets()[CONCEPT_SET].class_names[0]
    evaluator = ZeroShotEvaluator(model, tokenizer, datamodule, keep_classes=[concept], device=device)
    class_names = {name: evaluator.class_names(name) for name in evaluator.datasets}
    summary = partial(summarize, class_names=class_names, forget={concept: CONCEPT_SET})
    parameters = dict(model.named_parameters())
    editor = ModelEditor(parameters, list(FRONT), evaluator.run, summary, device)
    stats = {
        name: LayerStats(name, tower_of(name), 0.0, 0.0, parameters[name].norm().item(), forget[name].norm().item(), 1)
        for name in FRONT
    }
    scripted = ScriptedForget(editor, concept, FRONT, stats)
    scripted.evaluate()
    rows, cache = [], CacheSize(evaluator)
    for label, options in modes:
        rule = SearchRule(metric="top1", steps_per_layer=10, tolerance=0.05, **options)
        joint = JointSearch(scripted, {concept: list(stats.values())}, {concept: forget}, rule, cache)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        chosen = joint.run([concept]).chosen[concept]
        seconds = time.perf_counter() - start
        probes = joint.probes
        rows.append(
            {
                "mode": label,
                "search s": seconds,
                "probes": len(probes),
                "probes per layer": len(probes) / len(FRONT),
                "tested": sum(p.tested for p in probes),
                "chosen": f"{short_name(chosen.layer)} λ={chosen.step_size:.4g}",
                "_tested": sum(p.tested for p in probes),
                "_untested": sum(not p.tested for p in probes),
            }
        )
    return rows, cache.most / sizes.images


def project(row: dict, gradient_s: float, sizes: Sizes, full_probe_s: float, full_probes: int) -> dict:
    """Both times at the paper's sizes: the gradient pass by pairs; a probe by the images it evaluates, at the cost
    per probe-image of the full-probe mode."""
    per_probe_image = full_probe_s / (full_probes * sizes.images)
    forget_images = sizes.identities[1]
    evaluated = row["_tested"] * sizes.images + row["_untested"] * forget_images
    paper_evaluated = row["_tested"] * PAPER.images + row["_untested"] * PAPER.identities[1]
    gradient = gradient_s / (sizes.forget_pairs + sizes.retain_pairs) * (PAPER.forget_pairs + PAPER.retain_pairs)
    paper_search = per_probe_image * paper_evaluated
    return {
        "images evaluated": evaluated,
        "paper search s": paper_search,
        "paper gradient s": gradient,
        "paper search / gradient": paper_search / gradient,
    }


def demo_runs(demo: Path, work: Path) -> list[dict]:
    """The demo's unlearn three ways, each into a fresh directory under ``work``."""
    rows = []
    for label, options in (
        ("full probes", ["--search.init_args.full_probes=true"]),
        ("forget first", []),
        ("forget first + warm start", ["--search.init_args.warm_start=true"]),
    ):
        output = work / label.replace(" ", "_").replace("+", "")
        command = [sys.executable, "-m", "slug_lightning", "unlearn", "--config", config_path("demo/unlearn.yaml")]
        command += ["--config", str(demo / "demo_paths.yaml"), f"--output_dir={output}", "--trainer.logger=false"]
        command += ["--trainer.enable_progress_bar=false", "--search.init_args.audit=false", *options]
        subprocess.run(command, check=True, capture_output=True, text=True)
        report = json.loads((output / "report.json").read_text())
        timing, search = report["timing"], report["search"]
        layers = {(r["concept"], r["layer"], r["round"], r["order"]) for r in search}
        rows.append(
            {
                "mode": label,
                "gradients s": timing["gradients_s"],
                "search s": timing["search_s"],
                "probes": timing["probes"],
                "probes per layer": len(search) / len(layers),
                "tested": sum(r["tested"] for r in search),
                "search / gradients": timing["search_s"] / timing["gradients_s"],
                "chosen": f"{short_name(report['concepts'][0]['layer'])} λ={report['concepts'][0]['step_size']:.6g}",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paper", action="store_true", default=None, help="the paper's sizes (default on a GPU)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per batch of the gradient pass")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a machine other jobs load")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--demo", help="also time the demo's unlearn on this finished demo directory")
    parser.add_argument("--output", help="also write the markdown here")
    args = parser.parse_args()
    paper = args.device.startswith("cuda") if args.paper is None else args.paper
    sizes = SMOKE if args.smoke else PAPER if paper else CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_clip("ViT-B-32")
    model = loaded.model.to(args.device)
    modes = [
        ("full probes", {"full_probes": True}),
        ("forget first", {}),
        ("forget first + warm start", {"warm_start": True}),
    ]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    gradient_s, forget = gradient_pass(model, loaded.tokenizer, sizes, args.batch_size, args.device, list(FRONT))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            CONCEPT_SET: image_folder(Path(tmp) / CONCEPT_SET, *sizes.identities, size=224, seed=1),
            "objects": image_folder(Path(tmp) / "objects", *sizes.objects, size=224, seed=2),
        }
        rows, per_image = search(model, loaded.tokenizer, loaded.preprocess, folders, forget, sizes, args.device, modes)
        demo = demo_runs(Path(args.demo).resolve(), Path(tmp)) if args.demo else []
    full = rows[0]
    for row in rows:
        row["search / gradients"] = row["search s"] / gradient_s
        row["speed-up"] = full["search s"] / row["search s"]
        row.update(project(row, gradient_s, sizes, full["search s"], full["probes"]))
    peak = (
        f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        if args.device.startswith("cuda")
        else ""
    )
    lines = [
        "# The unlearn on the paper's geometry (benchmarks/paper_scale.py)",
        "",
        f"{machine()}; device {args.device}{peak}.",
        f"ViT-B-32 (random init) at 224 px; gradient pass over {sizes.forget_pairs} forget + {sizes.retain_pairs} "
        f"retain pairs (batch {args.batch_size}): {gradient_s:.1f} s. Evaluation: {CONCEPT_SET} "
        f"{sizes.identities[0]}×{sizes.identities[1]} images (the concept: {sizes.identities[1]}), objects "
        f"{sizes.objects[0]}×{sizes.objects[1]}, {len(TEMPLATES)} templates; front: "
        + ", ".join(short_name(name) for name in FRONT)
        + f". Probe cache: {per_image / 1e3:.1f} kB per image (fp32).",
        "",
        table(
            rows,
            ["mode", "search s", "probes", "probes per layer", "tested", "search / gradients", "speed-up", "chosen"],
        ),
        "",
        f"Projected to the paper's sizes ({PAPER.images} evaluation images, the concept {PAPER.identities[1]}; "
        f"{PAPER.forget_pairs} + {PAPER.retain_pairs} pairs), at this run's cost per pair and per probe-image:",
        "",
        table(rows, ["mode", "images evaluated", "paper search s", "paper gradient s", "paper search / gradient"]),
    ]
    if demo:
        lines += ["", f"The demo's unlearn ({args.demo}), same run:", "", table(demo, list(demo[0]))]
    lines += [
        "",
        "Times are wall-clock, measured side by side in one run; the machine may be shared with other jobs, so "
        "compare the ratios within this run.",
    ]
    publish("\n".join(lines) + "\n", args.output)
    if not all(math.isfinite(r["search s"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
