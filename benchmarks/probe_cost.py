"""Probe cost with reuse against the naive probe and against the ideal, side by side in one run.

For an early, a middle and a late block of each tower, and for each tower's final projection, a layer is
edited and probed three ways over the same evaluation set:

- naive: a full zero-shot evaluation of the edited model (both towers, images decoded again);
- reuse: what StepSearch does (``ZeroShotEvaluator.run(edited=...)``: the other tower's reference outputs,
  the edited tower from the edited stage on, over cached inputs of that stage);
- ideal: only running the edited stage onward (plus the head) over the cached inputs, nothing else.

The cache is built by the first probe of a layer (once per layer, reported as ``cache s``); the timed
probes are the later ones, as in a search. Models are random-initialised (timing does not depend on
weights): the packaged ``slug-tiny`` and OpenCLIP's ``ViT-B-32`` geometry.

Run:  python benchmarks/probe_cost.py [--models slug-tiny ViT-B-32] [--classes 20] [--per-class 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import best_of, image_folder, machine, table

from slug_lightning.datamodules import LabelledSet, ZeroShotDataModule
from slug_lightning.evaluation import ZeroShotEvaluator
from slug_lightning.layers import LANGUAGE, VISION, short_name
from slug_lightning.models import load_clip
from slug_lightning.towers import tower_stages

TEMPLATES = ["a photo of {}.", "a picture of {}."]


def probed_layers(model) -> list[tuple[str, str]]:
    """(tower, parameter) for an early, a middle and a late block of each tower, and the projections."""
    layers = []
    for tower, prefix, projection in (
        (VISION, "visual.transformer", "visual.proj"),
        (LANGUAGE, "transformer", "text_projection"),
    ):
        blocks = len(dict(model.named_modules())[f"{prefix}.resblocks"])
        for block in sorted({0, blocks // 2, blocks - 1}):
            layers.append((tower, f"{prefix}.resblocks.{block}.mlp.c_fc.weight"))
        layers.append((tower, projection))
    return layers


def measure(model_name: str, root: Path, classes: int, per_class: int, repeats: int, device: str) -> list[dict]:
    torch.manual_seed(0)
    loaded = load_clip(model_name)
    model = loaded.model.to(device).eval()
    size = loaded.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    folder = image_folder(root / model_name, classes, per_class, size=size)
    datamodule = ZeroShotDataModule([LabelledSet("eval", root=folder, templates=TEMPLATES)], batch_size=64)
    datamodule.transform = loaded.preprocess
    reuse = ZeroShotEvaluator(model, loaded.tokenizer, datamodule, device=device)
    naive = ZeroShotEvaluator(model, loaded.tokenizer, datamodule, device=device, reuse=False)
    reuse.run()
    stages = tower_stages(model)
    parameters = dict(model.named_parameters())
    rows = []
    for tower, name in probed_layers(model):
        parameter = parameters[name]
        original = parameter.detach().clone()
        with torch.no_grad():
            parameter.mul_(1.5)  # any edit: the cost of a probe does not depend on it
        try:
            start = time.perf_counter()
            reuse.run(edited=name)  # the layer's first probe builds or moves the cache
            cache_seconds = time.perf_counter() - start
            stage = stages[tower].stage_of(name)
            cache = reuse.stage_cache(tower, "eval", stage)

            @torch.no_grad()
            def ideal(cache=cache, tower=tower, stage=stage):  # bound now: the loop moves on
                dtype = next(model.parameters()).dtype
                for chunk, tokens in zip(cache.chunks, cache.tokens):
                    chunk = chunk.to(device, dtype=dtype) if chunk.is_floating_point() else chunk.to(device)
                    stages[tower].run(chunk, stage, tokens=tokens)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()

            t_reuse = best_of(lambda name=name: reuse.run(edited=name), repeats)
            t_ideal = best_of(ideal, repeats)
            t_naive = best_of(lambda name=name: naive.run(edited=name), repeats)
        finally:
            with torch.no_grad():
                parameter.copy_(original)
        rows.append(
            {
                "model": model_name,
                "tower": tower,
                "layer": short_name(name),
                "stage": f"{stage}/{stages[tower].num_stages - 1}",
                "naive s": t_naive,
                "reuse s": t_reuse,
                "ideal s": t_ideal,
                "cache s": cache_seconds,
                "reuse/ideal": t_reuse / t_ideal,
                "reuse/naive": t_reuse / t_naive,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["slug-tiny", "ViT-B-32"])
    parser.add_argument("--classes", type=int, default=20, help="classes in the evaluation set")
    parser.add_argument("--per-class", type=int, default=6, help="images per class")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per probe (the fastest counts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            rows += measure(model_name, Path(tmp), args.classes, args.per_class, args.repeats, args.device)
    print(f"# Probe cost: {args.classes} classes x {args.per_class} images, {len(TEMPLATES)} templates; {machine()}")
    print(
        table(
            rows,
            [
                "model",
                "tower",
                "layer",
                "stage",
                "naive s",
                "reuse s",
                "ideal s",
                "cache s",
                "reuse/ideal",
                "reuse/naive",
            ],
        )
    )
    worst = max(rows, key=lambda r: r["reuse/ideal"])
    print(f"\nworst reuse/ideal: {worst['reuse/ideal']:.2f} ({worst['model']} {worst['layer']})")
    late = [r for r in rows if r["layer"].endswith("proj") or _last_quarter(r["stage"])]
    worst_late = max(late, key=lambda r: r["reuse/naive"])
    print(
        f"worst reuse/naive over last-quarter blocks and projections: {worst_late['reuse/naive']:.3f} "
        f"({worst_late['model']} {worst_late['layer']})"
    )


def _last_quarter(stage: str) -> bool:
    index, last = map(int, stage.split("/"))
    blocks = last - 2  # stages: stem, blocks 1..L, pool, project
    return index - 1 >= blocks * 3 / 4


if __name__ == "__main__":
    main()
