"""Streaming LAION shards: img2dataset's ``.parquet`` index against the tar scan, and webdataset's reader against the
earlier hand-written one.

1. **Forget set at LAION's proportions.** A generated world of ``--shards`` shards (default 200) of ``--per-shard``
   samples (default 500), written as img2dataset writes them (``<shard>.tar`` and ``<shard>.parquet``), where 3
   shards hold the concept's pairs. Timed three ways, in one run:

   - ``parquet``: ``caption_index: parquet``: the pre-flight probes every shard and reads the captions from the
     indexes; the forget pass opens the 3 shards that hold a pair;
   - ``tar``: ``caption_index: tar``: the same, but the captions are read from the tars;
   - ``before``: the code before shards were streamed: the captions read from the tars by the earlier reader (images
     skipped), and a forget pass that reads every shard and filters the captions.

   The pre-flight is its data part (probing the shards and reading the captions); the forget pass decodes and
   transforms every pair of the concept's forget stream (slug-tiny's preprocessing, batches of 64, no model).
2. **Pair stream throughput.** Every pair of the first ``--stream-shards`` shards through ``PairStream`` (decoded,
   transformed, tokenized, batched), read by webdataset's stages and by the earlier reader (``legacy_shards.py``);
   and the two readers alone.

Every time is the best of ``--repeats`` runs, the ways alternating, so that load from other jobs touches them alike.
The shards are local files in the page cache: a remote store makes reading a tar dearer and the index's advantage
larger (the table lists the bytes each way opens).

    python benchmarks/streaming.py [--shards 200] [--per-shard 500] [--repeats 3] [--root DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from _common import machine, publish, table
from legacy_shards import read_shard_before
from PIL import Image
from torch.utils.data import DataLoader

import slug_lightning
import slug_lightning.datamodules.laion as laion_module
import slug_lightning.shard_scan as scan_module
from slug_lightning.concepts import Concept
from slug_lightning.datamodules.forget_stream import ForgetStream
from slug_lightning.datamodules.laion import PairStream
from slug_lightning.shard_scan import scan_shards
from slug_lightning.shard_sources import probe_shards
from slug_lightning.shards import expand_shards, read_shard

CONCEPT = Concept("Vesna Fairbank")
CONCEPT_SHARDS = 3
BATCH = 64


# --------------------------------------------------------------------------------------------------
# The world


def _images(count: int, seed: int) -> list[bytes]:
    """Small JPEGs of smooth random colour fields, a few KiB each, like LAION's thumbnails after resizing."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((64, 64), Image.BILINEAR)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def write_world(root: Path, shards: int, per_shard: int, seed: int = 0) -> tuple[str, int]:
    """``root/{00000..}.tar`` with their img2dataset ``.parquet``; returns the brace pattern and the concept's pairs.

    Every 10th sample of the 3 concept shards (spread over the set) names the concept; a few others name only its
    first name or a longer surname, which the caption filter must not take.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice("abcdefghijklmnoprstuvw") for _ in range(rng.randint(3, 9))) for _ in range(400)]
    images = _images(32, seed)
    concept_shards = {shards // 6, shards // 2, shards - 2}
    pairs = 0
    for shard in range(shards):
        rows = []
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as writer:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                words = [rng.choice(vocabulary) for _ in range(rng.randint(6, 16))]
                if shard in concept_shards and i % 10 == 0:
                    words.insert(rng.randrange(len(words)), "Vesna Fairbank")
                    pairs += 1
                elif i % 97 == 0:
                    words.insert(0, rng.choice(["Vesna", "Fairbanks", "vesna fairbanks"]))
                caption = " ".join(words)
                image = images[rng.randrange(len(images))]
                meta = {"key": key, "caption": caption, "width": 64, "height": 64}
                writer.write({"__key__": key, "jpg": image, "txt": caption, "json": json.dumps(meta).encode()})
                rows.append((key, caption))
        keys, captions = zip(*rows)
        count = len(keys)
        pq.write_table(
            pa.table(
                {
                    "url": [f"https://example.com/{key}.jpg" for key in keys],
                    "key": list(keys),
                    "caption": list(captions),
                    "status": ["success"] * count,
                    "error_message": pa.array([None] * count, pa.string()),
                    "width": [64] * count,
                    "height": [64] * count,
                    "original_width": [256] * count,
                    "original_height": [256] * count,
                }
            ),
            root / f"{shard:05d}.parquet",
        )
    return f"{root}/{{00000..{shards - 1:05d}}}.tar", pairs


# --------------------------------------------------------------------------------------------------
# The ways


@contextmanager
def earlier_reader():
    """The earlier hand-written reader in place of webdataset's stages (images skipped in caption scans, as then)."""
    saved = laion_module.read_shard, scan_module.read_shard
    laion_module.read_shard = read_shard_before
    scan_module.read_shard = partial(read_shard_before, with_images=False)
    try:
        yield
    finally:
        laion_module.read_shard, scan_module.read_shard = saved


def _drain(stream) -> int:
    return sum(len(batch["key"]) for batch in DataLoader(stream, batch_size=None))


def run_way(way: str, urls: list[str], clip) -> tuple[float, float, int]:
    """Pre-flight seconds, forget-pass seconds and pairs, one way."""
    start = time.perf_counter()
    if way == "before":
        with earlier_reader():
            scan = scan_shards(urls, [CONCEPT], caption_index="tar")
            middle = time.perf_counter()
            pairs = _drain(PairStream(urls, clip.preprocess, clip.tokenizer, BATCH, keep=CONCEPT.matches))
    else:
        probe_shards(urls)
        scan = scan_shards(urls, [CONCEPT], caption_index=way)
        middle = time.perf_counter()
        stream = ForgetStream(
            scan.pairs[CONCEPT.name], clip.preprocess, clip.tokenizer, BATCH, skipped_at=scan.skipped_at[CONCEPT.name]
        )
        pairs = _drain(stream)
    assert pairs == scan.matches[CONCEPT.name], (way, pairs, scan.matches)
    return middle - start, time.perf_counter() - middle, pairs


def stream_throughput(urls: list[str], clip, earlier: bool) -> float:
    """Pairs per second of a PairStream over ``urls`` (all pairs, decoded, transformed, tokenized)."""
    start = time.perf_counter()
    if earlier:
        with earlier_reader():
            pairs = _drain(PairStream(urls, clip.preprocess, clip.tokenizer, BATCH))
    else:
        pairs = _drain(PairStream(urls, clip.preprocess, clip.tokenizer, BATCH))
    return pairs / (time.perf_counter() - start)


def reader_throughput(urls: list[str], earlier: bool) -> float:
    """Samples per second of a shard reader alone."""
    read = read_shard_before if earlier else read_shard
    start = time.perf_counter()
    samples = sum(1 for url in urls for _ in read(url))
    return samples / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--stream-shards", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", help="where to write the world (default: a temporary directory)")
    parser.add_argument("--output", help="also write the markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clip = slug_lightning.load_clip("slug-tiny")

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.root or temporary)
        started = time.perf_counter()
        pattern, pairs = write_world(root / "shards", args.shards, args.per_shard)
        written = time.perf_counter() - started
        urls = expand_shards(pattern)
        tar_mb = sum(Path(url).stat().st_size for url in urls) / 1e6
        index_mb = sum(Path(url).with_suffix(".parquet").stat().st_size for url in urls) / 1e6
        concept_mb = tar_mb * CONCEPT_SHARDS / len(urls)

        ways = ("parquet", "tar", "before")
        runs = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way in ways:
                runs[way].append(run_way(way, urls, clip))
        times = {way: min(results, key=lambda r: r[0] + r[1]) for way, results in runs.items()}
        opened = {
            "parquet": f"{index_mb:.1f} (indexes) + {concept_mb:.1f} (3 tars)",
            "tar": f"{tar_mb:.1f} + {concept_mb:.1f} (3 tars)",
            "before": f"{tar_mb:.1f} + {tar_mb:.1f}",
        }
        rows = [
            {
                "way": way,
                "pre-flight s": preflight,
                "forget pass s": forget,
                "total s": preflight + forget,
                "MB opened": opened[way],
            }
            for way, (preflight, forget, _) in times.items()
        ]
        ratio_rows = [
            {
                "against parquet": way,
                "pre-flight": times[way][0] / times["parquet"][0],
                "forget pass": times[way][1] / times["parquet"][1],
                "total": sum(times[way][:2]) / sum(times["parquet"][:2]),
            }
            for way in ("tar", "before")
        ]

        stream_urls = urls[: args.stream_shards]
        speeds = {"webdataset": [], "earlier": []}
        readers = {"webdataset": [], "earlier": []}
        for _ in range(args.repeats):
            for name in speeds:
                speeds[name].append(stream_throughput(stream_urls, clip, earlier=name == "earlier"))
                readers[name].append(reader_throughput(stream_urls, earlier=name == "earlier"))
        stream_rows = [
            {
                "reader": name,
                "PairStream pairs/s": max(speeds[name]),
                "reader alone samples/s": max(readers[name]),
            }
            for name in speeds
        ]
        stream_ratio = max(speeds["webdataset"]) / max(speeds["earlier"])
        reader_ratio = max(readers["webdataset"]) / max(readers["earlier"])

    text = "\n".join(
        [
            "# Streaming shards: the caption index and webdataset's reader",
            "",
            f"Machine: {machine()}. Measured by `python benchmarks/streaming.py "
            f"--shards {args.shards} --per-shard {args.per_shard} --stream-shards {args.stream_shards} "
            f"--repeats {args.repeats}`; best of {args.repeats}, the ways alternating.",
            "",
            f"## A forget set in {CONCEPT_SHARDS} of {args.shards} shards",
            "",
            f"{args.shards} shards x {args.per_shard} samples ({tar_mb:.0f} MB of tars, {index_mb:.1f} MB of "
            f"img2dataset .parquet; written in {written:.0f} s), {pairs} pairs of {CONCEPT.name!r} in "
            f"{CONCEPT_SHARDS} shards. Pre-flight: probing the shards and reading every caption; forget pass: every "
            "pair decoded and transformed, in batches of 64.",
            "",
            table(rows, ["way", "pre-flight s", "forget pass s", "total s", "MB opened"]),
            "",
            "Ratios (time of the way over the parquet index's; higher: the index is faster):",
            "",
            table(ratio_rows, ["against parquet", "pre-flight", "forget pass", "total"]),
            "",
            f"## Pair stream on local shards ({len(stream_urls)} shards)",
            "",
            table(stream_rows, ["reader", "PairStream pairs/s", "reader alone samples/s"]),
            "",
            f"webdataset's reader against the earlier one: PairStream {stream_ratio:.2f}x, reader alone "
            f"{reader_ratio:.2f}x.",
            "",
        ]
    )
    publish(text, args.output)


if __name__ == "__main__":
    main()
