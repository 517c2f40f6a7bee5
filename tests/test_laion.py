"""Tests for the LAION-style shards datamodule: patterns, caption filters, exact-once splits, broken data (as long
as the module it tests, for the same reason: datamodules/laion.py's docstring)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import unicodedata
import warnings

import lightning
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from slug_lightning.concepts import Concept
from slug_lightning.datamodules.laion import LaionDataModule, PairStream
from slug_lightning.errors import ConfigError
from slug_lightning.shard_scan import scan_shards
from slug_lightning.shards import expand_shards, expected_samples

IMAGE_SIZE = 8
CONTEXT_LENGTH = 5


# ----------------------------------------------------------------------------------------------------
# Helpers: tiny shards, a transform and a tokenizer that need no model


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path, samples) -> str:
    """Write a webdataset tar; each sample is (key, caption or None, image bytes or None)."""
    with wds.TarWriter(str(path)) as writer:
        for key, caption, image in samples:
            sample = {"__key__": key}
            if image is not None:
                sample["png"] = image
            if caption is not None:
                sample["txt"] = caption
            writer.write(sample)
    return str(path)


def write_pairs(path, prefix: str, captions: list[str]) -> str:
    """A shard of good pairs keyed ``<prefix><n>`` with the given captions."""
    return write_shard(path, [(f"{prefix}{i:03d}", c, png_bytes(i)) for i, c in enumerate(captions)])


def transform(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def tokenizer(captions: list[str]) -> torch.Tensor:
    tokens = torch.zeros((len(captions), CONTEXT_LENGTH), dtype=torch.long)
    for row, caption in enumerate(captions):
        ids = [ord(c) for c in caption[:CONTEXT_LENGTH]]
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def run_rank(urls, batch_size, rank, world_size, num_workers=0, **kwargs) -> list[dict]:
    """Every batch one rank yields, through a real DataLoader (worker processes when num_workers > 0)."""
    stream = PairStream(urls, transform, tokenizer, batch_size, rank=rank, world_size=world_size, **kwargs)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return list(loader)


def run_world(urls, batch_size, world_size, num_workers=0, **kwargs) -> list[list[dict]]:
    return [run_rank(urls, batch_size, r, world_size, num_workers, **kwargs) for r in range(world_size)]


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def global_order(ranks: list[list[dict]]) -> list[list[str]]:
    """Reassemble global batches from the ranks' shares: rank r holds positions r, r + world_size, ..."""
    world_size = len(ranks)
    result = []
    for shares in zip(*ranks, strict=True):
        size = sum(len(s["key"]) for s in shares)
        result.append([shares[p % world_size]["key"][p // world_size] for p in range(size)])
    return result


@pytest.fixture
def corpus(tmp_path) -> list[str]:
    """Three shards of 7, 5 and 6 pairs (18 in all): no batch size used below divides it evenly."""
    return [
        write_pairs(tmp_path / f"{n:05d}.tar", f"s{n}-", [f"caption {n} {i}" for i in range(count)])
        for n, count in enumerate((7, 5, 6))
    ]


# ----------------------------------------------------------------------------------------------------
# expand_shards


def test_expand_shards_braces_globs_and_separators(tmp_path):
    for name in ("00000.tar", "00001.tar", "00002.tar", "extra.tar"):
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path)
    numbered = [f"{d}/0000{i}.tar" for i in range(3)]
    assert expand_shards(f"{d}/{{00000..00002}}.tar") == numbered
    assert expand_shards(f"{d}/0000*.tar") == numbered
    everything = sorted(numbered + [f"{d}/extra.tar"])
    # Overlapping patterns, "::" and lists all give one sorted list without duplicates.
    assert expand_shards(f"{d}/extra.tar::{d}/{{00000..00002}}.tar::{d}/*.tar") == everything
    assert expand_shards([f"{d}/extra.tar", f"{d}/00001.tar::{d}/0000[02].tar"]) == everything


def test_expand_shards_names_what_is_missing(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        expand_shards(f"{tmp_path}/00000.tar::{tmp_path}/nothing-*.tar")
    with pytest.raises(FileNotFoundError, match=r"2 missing file.*00001\.tar.*00002\.tar"):
        expand_shards(f"{tmp_path}/{{00000..00002}}.tar")
    with pytest.raises(ValueError, match="directories"):
        expand_shards(str(tmp_path))
    with pytest.raises(ValueError, match="No shard pattern"):
        expand_shards(" :: ")


# ----------------------------------------------------------------------------------------------------
# Caption filters through the datamodule


MUSK = Concept("Elon Musk", aliases=("Musk",))
APPLE = Concept("apple")
CAPTIONS = {
    "a": "Elon Musk at a rocket launch",
    "b": "ELON MUSK's new car",
    "c": "a muskrat swimming in a river",  # not a word-boundary match
    "d": "portrait of musk, smiling",
    "e": "Muskets of the 18th century",  # not a word-boundary match
    "f": "an Apple on a table",
    "g": "pineapples and apples",  # "apples" is not "apple"
    "h": "Musk eats an apple",  # both concepts
    "i": "a quiet lake at dawn",
}


@pytest.fixture
def captioned(tmp_path) -> LaionDataModule:
    items = sorted(CAPTIONS.items())
    write_shard(tmp_path / "00000.tar", [(k, c, png_bytes(i)) for i, (k, c) in enumerate(items[:5])])
    write_shard(tmp_path / "00001.tar", [(k, c, png_bytes(i)) for i, (k, c) in enumerate(items[5:])])
    data = LaionDataModule(f"{tmp_path}/{{00000..00001}}.tar", concepts=[MUSK, APPLE], batch_size=2)
    data.transform, data.tokenizer = transform, tokenizer
    return data


def loader_keys(loader: DataLoader) -> list[str]:
    return keys_of(list(loader))


def test_forget_stream_filters_on_aliases_word_boundaries_and_case(captioned):
    assert loader_keys(captioned.forget_dataloader(MUSK)) == ["a", "b", "d", "h"]
    assert loader_keys(captioned.forget_dataloader(APPLE)) == ["f", "h"]
    assert captioned.count_pairs(MUSK) == 4
    assert captioned.count_pairs(APPLE) == 2


def test_retain_stream_excludes_every_concept(captioned):
    assert loader_keys(captioned.retain_dataloader()) == ["c", "e", "g", "i"]
    assert captioned.count_pairs(None) == 4


def test_predict_dataloader_is_forget_per_concept_then_retain(captioned):
    loaders = captioned.predict_dataloader()
    assert [loader_keys(dl) for dl in loaders] == [["a", "b", "d", "h"], ["f", "h"], ["c", "e", "g", "i"]]
    assert all(dl.batch_size is None for dl in loaders)


def test_forget_shards_default_to_shards_and_can_differ(tmp_path, captioned):
    other = write_pairs(tmp_path / "forget.tar", "z", ["Musk again", "no one"])
    data = LaionDataModule(captioned.shards, forget_shards=other, concepts=[MUSK], batch_size=2)
    data.transform, data.tokenizer = transform, tokenizer
    assert loader_keys(data.forget_dataloader(MUSK)) == ["z000"]
    assert data.count_pairs(None) == 5  # retain still comes from `shards`


def test_predict_streams_count_the_batches_each_loader_yields(tmp_path, captioned):
    names = [f"forget {MUSK.name}", f"forget {APPLE.name}", "retain"]
    assert captioned.predict_streams() == [(name, None) for name in names]  # nothing read yet
    captioned.caption_scan()
    batches = [len(list(loader)) for loader in captioned.predict_dataloader()]
    assert captioned.predict_streams() == list(zip(names, batches)) and batches == [2, 1, 2]
    # the retain stream of other shards than the scanned ones is not known
    other = write_pairs(tmp_path / "forget.tar", "z", ["Musk again", "no one"])
    data = LaionDataModule(captioned.shards, forget_shards=other, concepts=[MUSK], batch_size=2)
    data.caption_scan()
    assert data.predict_streams() == [(f"forget {MUSK.name}", 1), ("retain", None)]


def test_setup_without_transform_or_module_says_what_to_set(captioned):
    data = LaionDataModule(captioned.shards, concepts=[MUSK])
    with pytest.raises(RuntimeError, match=r"datamodule\.transform"):
        data.setup("predict")
    with pytest.raises(ValueError, match="no concepts"):
        LaionDataModule(captioned.shards).predict_dataloader()


# ----------------------------------------------------------------------------------------------------
# Exact-once splitting across ranks and workers


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_ranks_and_workers_split_global_batches_exactly_once(corpus, num_workers, batch_size):
    (single,) = run_world(corpus, batch_size, world_size=1)
    expected = keys_of(single)
    assert len(expected) == 18 and len(set(expected)) == 18
    assert [len(b["key"]) for b in single[:-1]] == [batch_size] * (len(single) - 1)

    ranks = run_world(corpus, batch_size, world_size=2, num_workers=num_workers)
    union = [k for batches in ranks for k in keys_of(batches)]
    assert sorted(union) == sorted(expected)  # nothing lost, nothing twice
    # Every rank yields one batch per global batch, and batch j over ranks is global batch j.
    assert [len(batches) for batches in ranks] == [len(single)] * 2
    for j, global_batch in enumerate(single):
        shares = [batches[j]["key"] for batches in ranks]
        assert sorted(shares[0] + shares[1]) == sorted(global_batch["key"])
    # Positions alternate between ranks (rank r holds positions r, r + 2, ...), so order is kept too.
    assert global_order(ranks) == [b["key"] for b in single]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_tiny_forget_set_is_seen_once_over_ranks_and_workers(tmp_path, num_workers, batch_size):
    tiny = [write_pairs(tmp_path / "forget.tar", "f", ["Musk one", "Musk two", "Musk three"])]
    ranks = run_world(tiny, batch_size, world_size=2, num_workers=num_workers, keep=MUSK.matches)
    assert sorted(k for batches in ranks for k in keys_of(batches)) == ["f000", "f001", "f002"]
    assert len(ranks[0]) == len(ranks[1]) == -(-3 // batch_size)


def test_short_rank_yields_zero_row_batches_of_the_right_shape(corpus):
    # 18 pairs, global batch 4, 3 ranks: the final global batch (2 pairs) leaves rank 2 empty.
    ranks = run_world(corpus, 4, world_size=3)
    assert [len(batches) for batches in ranks] == [5, 5, 5]
    last = ranks[2][-1]
    assert last["image"].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE) and last["image"].dtype == torch.float32
    assert last["text"].shape == (0, CONTEXT_LENGTH) and last["text"].dtype == torch.long
    assert last["key"] == [] and int(last["skipped"]) == 0
    full = ranks[0][0]
    assert full["image"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and full["text"].shape == (2, CONTEXT_LENGTH)


def test_drop_last_drops_the_final_partial_global_batch_everywhere(corpus):
    ranks = run_world(corpus, 4, world_size=2, num_workers=2, drop_last=True)
    assert [len(batches) for batches in ranks] == [4, 4]
    assert sum(len(b["key"]) for batches in ranks for b in batches) == 16


# ----------------------------------------------------------------------------------------------------
# Broken samples and shards


def broken_corpus(tmp_path, cut: str) -> list[str]:
    """A shard with a corrupt image, a missing image and a missing caption; then a damaged shard.

    Kept indices: a0 a1(corrupt) a2 a3(no image) a5 -> 0..4 (a4 has no caption), then b000 -> 5 and,
    when the damage is inside b002's image, b001 -> 6.
    """
    first = write_shard(
        tmp_path / "00000.tar",
        [
            ("a0", "good zero", png_bytes(0)),
            ("a1", "corrupt image", b"\x89PNG\r\n\x1a\n this is not a png"),
            ("a2", "good two", png_bytes(2)),
            ("a3", "no image", None),
            ("a4", None, png_bytes(4)),
            ("a5", "good five", png_bytes(5)),
        ],
    )
    second = write_pairs(tmp_path / "00001.tar", "b", ["one", "two", "three", "four"])
    data = open(second, "rb").read()
    members = tarfile.open(second).getmembers()
    third_image = next(m for m in members if m.name == "b002.png")
    if cut == "mid-member":
        damaged = data[: third_image.offset_data + 100]
    elif cut == "at-member-boundary":
        damaged = data[: third_image.offset]
    else:  # garbage where a header should be
        damaged = data[: third_image.offset] + b"x" * 2048
    open(second, "wb").write(damaged)
    return [first, second]


@pytest.mark.parametrize("cut", ["mid-member", "at-member-boundary", "garbage"])
@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 0), (2, 2), (3, 2)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_broken_samples_and_shards_are_counted_exactly_once(tmp_path, cut, world_size, num_workers, drop_last):
    urls = broken_corpus(tmp_path, cut)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = run_world(urls, 3, world_size, num_workers, drop_last=drop_last)
    skipped = sum(int(b["skipped"]) for batches in ranks for b in batches)
    # corrupt image + missing image + missing caption + the damaged shard, whatever the split
    assert skipped == 4
    keys = sorted(k for batches in ranks for k in keys_of(batches))
    # b001 is complete only if b002's header was read; a shard that just stops (cut at a member
    # boundary or garbled header) may have lost b001's last member, so b001 goes with the damage.
    readable = ["a0", "a2", "a5", "b000"] + (["b001"] if cut == "mid-member" else [])
    assert keys == (readable[:4] if drop_last else readable)
    assert len({len(batches) for batches in ranks}) == 1


def test_damaged_shard_warns_naming_it(tmp_path):
    urls = broken_corpus(tmp_path, "mid-member")
    with pytest.warns(UserWarning, match=r"00001\.tar.*truncated or corrupt"):
        run_rank(urls, 3, rank=0, world_size=1)


def test_not_a_tar_at_all_is_skipped_and_counted(tmp_path, corpus):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tar archive" * 10)
    with pytest.warns(UserWarning, match="junk.tar"):
        (batches,) = run_world([str(junk), *corpus], 5, world_size=1)
    assert len(keys_of(batches)) == 18
    assert sum(int(b["skipped"]) for b in batches) == 1


@pytest.mark.parametrize("truncated", [False, True])
def test_gzipped_shards_are_read_and_truncation_is_counted(tmp_path, truncated):
    plain = write_pairs(tmp_path / "plain.tar", "g", [f"caption {i}" for i in range(6)])
    data = gzip.compress(open(plain, "rb").read())
    (tmp_path / "shard.tar.gz").write_bytes(data[: len(data) // 2] if truncated else data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (batches,) = run_world([str(tmp_path / "shard.tar.gz")], 2, world_size=1)
    keys = keys_of(batches)
    assert sum(int(b["skipped"]) for b in batches) == int(truncated)
    if truncated:
        assert 0 < len(keys) < 6 and keys == [f"g{i:03d}" for i in range(len(keys))]
    else:
        assert keys == [f"g{i:03d}" for i in range(6)]


def _sidecar(url: str, kind: str, held: int) -> None:
    """What img2dataset writes beside a shard: ``<shard>_stats.json`` or ``<shard>.parquet`` (one row per sample
    it tried, two of them failed downloads that are not in the tar)."""
    stem = url[: -len(".tar")]
    if kind == "stats":
        with open(f"{stem}_stats.json", "w") as file:
            json.dump({"count": held + 2, "successes": held, "failed_to_download": 2}, file)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        status = ["success"] * held + ["failed_to_download"] * 2
        pq.write_table(pa.table({"key": [f"b{i:03d}" for i in range(held + 2)], "status": status}), f"{stem}.parquet")


@pytest.mark.parametrize("kind", ["stats", "parquet"])
@pytest.mark.parametrize("cut", ["mid-member", "at-member-boundary"])
@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2)])
def test_damaged_shard_counts_the_samples_img2dataset_says_it_lost(tmp_path, kind, cut, world_size, num_workers):
    urls = broken_corpus(tmp_path, cut)
    _sidecar(urls[1], kind, held=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = run_world(urls, 3, world_size, num_workers)
    read = sum(k.startswith("b") for batches in ranks for k in keys_of(batches))
    skipped = sum(int(b["skipped"]) for batches in ranks for b in batches)
    # corrupt image + missing image + missing caption, and every sample of the 4 the damage took
    assert skipped == 3 + (4 - read)
    scan = scan_shards(urls)
    assert scan.broken == [(urls[1], scan.broken[0][1], read, 4 - read)] and not scan.lost_is_lower_bound


def test_damaged_shard_without_img2dataset_files_warns_that_its_count_is_a_lower_bound(tmp_path):
    urls = broken_corpus(tmp_path, "mid-member")
    with pytest.warns(UserWarning, match=r"00001\.tar.*counted as 1: a lower bound"):
        run_rank(urls, 3, rank=0, world_size=1)
    assert expected_samples(urls[1]) is None


def test_undecodable_images_are_warned_about_once_per_stream_with_a_count(tmp_path):
    first = write_shard(
        tmp_path / "00000.tar",
        [(f"x{i}", f"caption {i}", b"not an image" if i % 2 else png_bytes(i)) for i in range(8)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (batches,) = run_world([first], 2, world_size=1)
    about_images = [str(w.message) for w in caught if "does not decode" in str(w.message)]
    assert about_images == [
        "4 sample(s) of this stream have no image or one that does not decode (e.g. keys "
        "['x1', 'x3', 'x5']); they were skipped and counted in 'skipped'."
    ]
    assert sum(int(b["skipped"]) for b in batches) == 4


def test_names_match_whether_captions_compose_accents_or_not(tmp_path):
    composed = "Zoë Brontë"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    concept = Concept(composed, aliases=("Brontë",))
    assert concept.matches(f"A portrait of {decomposed.upper()} in 1850")
    assert concept.matches(f"{unicodedata.normalize('NFD', 'brontë')} sisters")
    assert not concept.matches("Bronte and Zoe")  # an accent is not dropped, only its encoding ignored
    assert not concept.matches(f"{decomposed}x")  # word boundaries hold
    assert Concept(decomposed).name == composed
    shard = write_pairs(tmp_path / "00000.tar", "z", [f"{decomposed} at home", f"{composed} again", "nobody"])
    assert scan_shards([shard], [Concept(composed)]).matches == {composed: 2}


def test_concepts_differing_only_in_unicode_form_or_case_are_duplicates():
    from slug_lightning.concepts import as_concepts

    with pytest.raises(ConfigError, match="listed twice"):
        as_concepts(["Zoë", unicodedata.normalize("NFD", "ZOË")])


# ----------------------------------------------------------------------------------------------------
# Shuffling


def test_shuffle_is_deterministic_per_seed_and_epoch(corpus):
    def order(seed: int, epoch: int, world_size: int = 1, num_workers: int = 0) -> list[list[str]]:
        ranks = []
        for rank in range(world_size):
            stream = PairStream(
                corpus,
                transform,
                tokenizer,
                4,
                rank=rank,
                world_size=world_size,
                shuffle=True,
                seed=seed,
                buffer_size=5,
            )
            stream.set_epoch(epoch)
            ranks.append(list(DataLoader(stream, batch_size=None, num_workers=num_workers)))
        return global_order(ranks)

    plain = keys_of(run_world(corpus, 4, world_size=1)[0])
    first = order(seed=0, epoch=0)
    assert first == order(seed=0, epoch=0)
    assert first != order(seed=0, epoch=1) and first != order(seed=1, epoch=0)
    flat = [k for batch in first for k in batch]
    assert flat != plain and sorted(flat) == sorted(plain)
    # The shuffled order is the same however it is split.
    assert order(seed=0, epoch=1, world_size=2, num_workers=2) == order(seed=0, epoch=1)


class _RecordingModule(lightning.LightningModule):
    """Exposes preprocess/tokenizer like the project's CLIP modules and records the keys it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.preprocess, self.tokenizer = transform, tokenizer
        self.seen: list[list[str]] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch, batch_idx):
        self.seen[-1].extend(batch["key"])
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_fit_reshuffles_each_epoch_and_takes_transform_from_the_module(corpus):
    data = LaionDataModule("::".join(corpus), batch_size=4, shuffle=True, seed=3)
    module = _RecordingModule()
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert data.transform is transform and data.tokenizer is tokenizer
    epoch0, epoch1 = module.seen
    assert len(epoch0) == len(epoch1) == 16  # 18 pairs, drop_last at global batch 4
    assert epoch0 != epoch1
    assert len(set(epoch0)) == 16 and len(set(epoch1)) == 16


# ----------------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"urls": []}, "non-empty list"),
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"buffer_size": 0}, "buffer_size"),
    ],
)
def test_pair_stream_rejects_bad_arguments(corpus, kwargs, message):
    arguments = {"urls": corpus, "transform": transform, "tokenizer": tokenizer, "batch_size": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        PairStream(**arguments)


def test_missing_shards_fail_at_setup(tmp_path):
    data = LaionDataModule(f"{tmp_path}/{{00000..00003}}.tar", concepts=[MUSK])
    data.transform, data.tokenizer = transform, tokenizer
    with pytest.raises(FileNotFoundError, match="4 missing"):
        data.setup("predict")
    assert not os.listdir(tmp_path)
