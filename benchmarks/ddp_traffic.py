"""Bytes all-reduced by a DDP gradient pass against the size of the candidate gradient sums.

The collector synchronises nothing per batch but the sizes of its feature gathers (a few integers): the
gradient sums travel once, in buckets, at the end. This counts every ``all_reduce`` and ``all_gather``
on each rank of a 2-process CPU (gloo) run of ``GradientCollector`` over synthetic batches, and compares
the all-reduced bytes with the candidate sums (streams × candidate tensors × 4 bytes) and with what a
per-batch gradient all-reduce (DDP's default in training) would send.

Run:  python benchmarks/ddp_traffic.py [--model slug-tiny] [--batches 6] [--batch-size 16]
(Lightning's DDP launcher re-runs this script in the second process.)
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

import torch
import torch.distributed as dist
from _common import table
from gradient_pass import make_batches
from torch.utils.data import DataLoader

from slug_lightning import GradientCollector, SlugTrainer
from slug_lightning.models import load_clip

traffic: Counter = Counter()


def _counting(name: str, function):
    def wrapper(tensor_or_list, *args, **kwargs):
        tensors = tensor_or_list if isinstance(tensor_or_list, (list, tuple)) else [tensor_or_list]
        traffic[f"{name} calls"] += 1
        traffic[f"{name} bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return function(tensor_or_list, *args, **kwargs)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="slug-tiny")
    parser.add_argument("--batches", type=int, default=6, help="global batches per stream")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.manual_seed(0)
    loaded = load_clip(args.model)
    forget = make_batches(loaded, args.batches, args.batch_size, seed=1)
    retain = make_batches(loaded, args.batches, args.batch_size, seed=2)
    trainer = SlugTrainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    rank, world = trainer.global_rank, trainer.world_size

    def share(batches):  # this rank's rows of every global batch
        return [{k: v[rank::world] if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]

    collector = GradientCollector(
        model=loaded.model, preprocess=loaded.preprocess, tokenizer=loaded.tokenizer, concepts=["concept"]
    )
    dist.all_reduce = _counting("all_reduce", dist.all_reduce)
    dist.all_gather = _counting("all_gather", dist.all_gather)
    loaders = [DataLoader(share(forget), batch_size=None), DataLoader(share(retain), batch_size=None)]
    trainer.predict(collector, dataloaders=loaders, return_predictions=False)
    if rank != 0:
        return
    candidate_bytes = sum(g.numel() * 4 for g in collector.gradients.retain.values())
    streams = 2
    per_batch = candidate_bytes * 2 * args.batches  # one all-reduce of the candidates per batch and stream
    rows = [
        {"": "this run: all_reduce", "calls": traffic["all_reduce calls"], "MB": traffic["all_reduce bytes"] / 1e6},
        {
            "": "this run: all_gather (features)",
            "calls": traffic["all_gather calls"],
            "MB": traffic["all_gather bytes"] / 1e6,
        },
        {"": "candidate sums (streams x tensors)", "calls": "", "MB": streams * candidate_bytes / 1e6},
        {"": "per-batch gradient all-reduce", "calls": 2 * args.batches, "MB": per_batch / 1e6},
    ]
    print(
        f"# DDP traffic on rank 0 of 2 (gloo, CPU): {args.model}, {args.batches} global batches of "
        f"{args.batch_size} per stream"
    )
    print(table(rows, ["", "calls", "MB"]))
    print(
        f"\nall-reduced / candidate sums: {traffic['all_reduce bytes'] / (streams * candidate_bytes):.4f}; "
        f"all-reduced / per-batch sync: {traffic['all_reduce bytes'] / per_batch:.4f}"
    )


if __name__ == "__main__":
    main()
