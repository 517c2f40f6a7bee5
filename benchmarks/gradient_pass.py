"""The gradient pass against a bare forward+backward of the same model over the same batches.

bare: a plain loop, every parameter trainable, ``loss.backward()`` per batch (1 − cos on forget batches,
open_clip's ``ClipLoss`` on retain batches), gradients accumulated in ``.grad``. That is the least any
gradient computation can cost. collector: ``GradientCollector`` in ``trainer.predict`` over the same
batches (held in memory, so data loading is out of both), its own timer (``collector.seconds``: from the
first batch to the finished store, fp32 sums included). Also with activation checkpointing.

Run:  python benchmarks/gradient_pass.py [--models slug-tiny ViT-B-32] [--batches 4] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import machine, table
from open_clip.loss import ClipLoss
from torch.utils.data import DataLoader

from slug_lightning import GradientCollector, SlugTrainer
from slug_lightning.models import load_clip


def make_batches(loaded, batches: int, batch_size: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    size = loaded.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    words = ["red", "kite", "portrait", "of", "a", "man", "beach", "dog", "old", "city", "night", "smiling"]
    result = []
    for _ in range(batches):
        captions = [
            " ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=generator))
            for _ in range(batch_size)
        ]
        result.append(
            {
                "image": torch.randn(batch_size, 3, size, size, generator=generator),
                "text": loaded.tokenizer(captions),
                "skipped": 0,
            }
        )
    return result


def bare(model, forget: list[dict], retain: list[dict], device: str) -> float:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    clip_loss = ClipLoss()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for stream, batches in (("forget", forget), ("retain", retain)):
        for batch in batches:
            image = model.encode_image(batch["image"].to(device))
            text = model.encode_text(batch["text"].to(device))
            if stream == "forget":
                loss = (1 - F.cosine_similarity(image, text, dim=-1)).sum()
            else:
                loss = clip_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), model.logit_scale.exp())
            loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def collector_run(loaded, forget, retain, device: str, **kwargs) -> float:
    collector = GradientCollector(
        model=loaded.model, preprocess=loaded.preprocess, tokenizer=loaded.tokenizer, concepts=["concept"], **kwargs
    )
    trainer = SlugTrainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loaders = [DataLoader(forget, batch_size=None), DataLoader(retain, batch_size=None)]
    trainer.predict(collector, dataloaders=loaders, return_predictions=False)
    return collector.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["slug-tiny", "ViT-B-32"])
    parser.add_argument("--batches", type=int, default=4, help="batches per stream (forget, retain)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (the fastest counts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        loaded = load_clip(name)
        loaded.model.to(args.device).eval()
        forget = make_batches(loaded, args.batches, args.batch_size, seed=1)
        retain = make_batches(loaded, args.batches, args.batch_size, seed=2)
        pairs = 2 * args.batches * args.batch_size
        times = {"bare": [], "collector": [], "collector+ckpt": []}
        for _ in range(args.repeats):  # interleaved, so drifting load affects all alike
            times["bare"].append(bare(loaded.model, forget, retain, args.device))
            times["collector"].append(collector_run(loaded, forget, retain, args.device))
            times["collector+ckpt"].append(
                collector_run(loaded, forget, retain, args.device, activation_checkpointing=True)
            )
        best = {k: min(v) for k, v in times.items()}
        rows.append(
            {
                "model": name,
                "pairs": pairs,
                "bare s": best["bare"],
                "collector s": best["collector"],
                "ckpt s": best["collector+ckpt"],
                "collector throughput / bare": best["bare"] / best["collector"],
                "ckpt throughput / bare": best["bare"] / best["collector+ckpt"],
            }
        )
    print(
        f"# Gradient pass vs bare forward+backward, batch {args.batch_size}, {args.batches} forget + "
        f"{args.batches} retain batches; {machine()}"
    )
    print(
        table(
            rows,
            [
                "model",
                "pairs",
                "bare s",
                "collector s",
                "ckpt s",
                "collector throughput / bare",
                "ckpt throughput / bare",
            ],
        )
    )


if __name__ == "__main__":
    main()
