"""Shards streamed from where users keep them, and img2dataset's ``.parquet`` as the caption index.

An HTTP server on 127.0.0.1 (the standard library's, started by a fixture) serves a tiny demo world's shards;
``pipe:cat`` and fsspec's ``memory://`` filesystem serve them too. Every source gives the same captions, forget pairs
and gradients as the local files; a URL that 404s, a response cut short, a command that fails and a source that
stalls each give a one-line error or are skipped and counted, and a stall ends at ``read_timeout``. The forget stream
built from a caption scan is batch for batch the filtered stream of the tars.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import one_line_error
from test_laion import MUSK, global_order, keys_of, png_bytes, tokenizer, transform, write_shard
from torch.utils.data import DataLoader

from slug_lightning import GradientCollector, SlugTrainer, config_path
from slug_lightning.caption_index import CaptionIndex, matching_rows
from slug_lightning.concepts import Concept
from slug_lightning.datamodules.forget_stream import ForgetStream
from slug_lightning.datamodules.laion import LaionDataModule, PairStream
from slug_lightning.demo import make_demo_world
from slug_lightning.errors import UserError
from slug_lightning.shard_scan import scan_shards
from slug_lightning.shards import BrokenShard, expand_shards, read_shard
from slug_lightning.validation import caption_read_note

SHARDS = "{00000..00002}.tar"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        people=4,
        objects=2,
        portraits_per_person=6,
        person_object_per_person=2,
        samples_per_object=4,
        scenery_samples=10,
        eval_per_person=1,
        eval_per_object=1,
        shards=3,
    )


class _ShardHandler(http.server.SimpleHTTPRequestHandler):
    """The shard folder; under ``/truncated/`` a tar announces its whole length and sends half of it, under
    ``/stall/`` it sends its first 16 KiB and then nothing until the server stops. Other files there are whole."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind in ("truncated", "stall") and name.endswith(".tar"):
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if kind == "truncated" else data[:16384])
            self.wfile.flush()
            if kind == "stall":
                self.server.released.wait(60)
            self.close_connection = True
            return
        if kind in ("truncated", "stall"):
            self.path = f"/{name}"
        super().do_GET()


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that stops reading early (the pre-flight reads one block) is not the server's error


@pytest.fixture(scope="module")
def server(world):
    handler = functools.partial(_ShardHandler, directory=str(Path(world.shards).parent))
    httpd = _Server(("127.0.0.1", 0), handler)
    httpd.released = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.released.set()
    httpd.shutdown()
    httpd.server_close()


def sources(world, server) -> dict[str, str]:
    """The same three shards as local files, HTTP URLs and ``pipe:cat`` commands."""
    root = Path(world.shards).parent
    return {"local": world.shards, "http": f"{server}/{SHARDS}", "pipe": f"pipe:cat {root}/{SHARDS}"}


def keys_by_concept(scan) -> dict[str, list[str]]:
    return {name: [key for _, key in pairs] for name, pairs in scan.pairs.items()}


# ----------------------------------------------------------------------------------------------------
# The same data from every source


def test_every_source_and_index_gives_the_same_captions_and_forget_pairs(world, server):
    concepts = [Concept(person) for person in world.people]
    seen = {}
    for kind, pattern in sources(world, server).items():
        urls = expand_shards(pattern)
        for mode in ("tar", "parquet"):
            scan = scan_shards(urls, concepts, caption_index=mode)
            assert len(scan.indexed) == (3 if mode == "parquet" else 0) and not scan.broken, (kind, mode)
            seen[kind, mode] = (scan.captions, scan.matches, keys_by_concept(scan))
    reference = seen["local", "tar"]
    assert reference[0] == world.num_samples and all(reference[1].values())
    assert all(found == reference for found in seen.values()), {k: v[1] for k, v in seen.items()}


def _gradients(shards: str, concept: str, **data) -> object:
    torch.manual_seed(0)
    collector = GradientCollector("slug-tiny")
    datamodule = LaionDataModule(shards, concepts=[Concept(concept)], batch_size=8, **data)
    SlugTrainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    ).predict(collector, datamodule=datamodule, return_predictions=False)
    return datamodule.count_pairs(Concept(concept)), collector.gradients


def test_http_pipe_and_local_shards_give_the_same_gradients_bit_for_bit(world, server):
    runs = {kind: _gradients(pattern, world.default_target) for kind, pattern in sources(world, server).items()}
    runs["local, tars scanned"] = _gradients(world.shards, world.default_target, caption_index="tar")
    pairs, expected = runs.pop("local")
    assert pairs == expected.forget_samples[world.default_target] > 0
    for kind, (count, got) in runs.items():
        assert count == pairs, kind
        assert (got.forget_samples, got.retain_samples, got.skipped_samples) == (
            expected.forget_samples,
            expected.retain_samples,
            expected.skipped_samples,
        ), kind
        for stream, tensors in [("retain", expected.retain), *expected.forget.items()]:
            other = got.retain if stream == "retain" else got.forget[stream]
            assert all(torch.equal(other[name], tensors[name]) for name in tensors), (kind, stream)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_forget_pairs_from_a_server_are_seen_once_over_two_ranks_and_two_workers(world, server, batch_size):
    data = LaionDataModule(f"{server}/{SHARDS}", concepts=[Concept(world.default_target)], batch_size=batch_size)
    pairs = data.caption_scan().pairs[world.default_target]
    assert {url.rpartition("/")[0] for url, _ in pairs} == {server} and len(pairs) > 4  # more pairs than 2 x 2

    def rank(r: int) -> list[dict]:
        stream = ForgetStream(pairs, transform, tokenizer, batch_size, rank=r, world_size=2)
        return list(DataLoader(stream, batch_size=None, num_workers=2))

    ranks = [rank(0), rank(1)]
    assert len(ranks[0]) == len(ranks[1]) == -(-len(pairs) // batch_size)
    assert sorted(k for batches in ranks for k in keys_of(batches)) == sorted(key for _, key in pairs)
    flat = [key for batch in global_order(ranks) for key in batch]
    assert flat == [key for _, key in pairs]  # and in the scan's order


def test_training_pairs_from_a_server_are_split_as_local_ones(world, server):
    local = [PairStream(expand_shards(world.shards), transform, tokenizer, 5, rank=0, world_size=1)]
    expected = global_order([list(DataLoader(local[0], batch_size=None))])
    urls = expand_shards(f"{server}/{SHARDS}")
    ranks = [
        list(
            DataLoader(PairStream(urls, transform, tokenizer, 5, rank=r, world_size=2), batch_size=None, num_workers=2)
        )
        for r in range(2)
    ]
    assert global_order(ranks) == expected


# ----------------------------------------------------------------------------------------------------
# The forget stream of a scan is the filtered stream of the tars


def _musk_corpus(tmp_path) -> list[str]:
    """Two shards of Musk pairs and others with every kind of damage: a caption-less sample, a pair without an
    image, one whose image does not decode, and a second shard cut inside a member."""
    good = png_bytes
    first = write_shard(
        tmp_path / "00000.tar",
        [
            ("a0", "Musk zero", good(0)),
            ("a1", "a lake", good(1)),
            ("a2", None, good(2)),
            ("a3", "Musk without an image", None),
            ("a4", "Musk, broken", b"\x89PNG not really"),
            ("a5", "Elon Musk five", good(5)),
            ("a6", "a river", good(6)),
        ],
    )
    second = write_shard(tmp_path / "00001.tar", [(f"b{i}", f"Musk {i}", good(10 + i)) for i in range(6)])
    data = Path(second).read_bytes()
    Path(second).write_bytes(data[: int(len(data) * 0.7)])
    third = write_shard(tmp_path / "00002.tar", [("c0", "Musk again", good(20)), ("c1", "nobody", good(21))])
    return [first, second, third]


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2), (3, 0)])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_forget_stream_of_a_scan_is_the_filtered_stream_batch_for_batch(tmp_path, world_size, num_workers, batch_size):
    urls = _musk_corpus(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = scan_shards(urls, [MUSK])
        for rank in range(world_size):
            options = {"rank": rank, "world_size": world_size}
            filtered = PairStream(urls, transform, tokenizer, batch_size, keep=MUSK.matches, **options)
            scanned = ForgetStream(
                scan.pairs[MUSK.name],
                transform,
                tokenizer,
                batch_size,
                skipped_at=scan.skipped_at[MUSK.name],
                **options,
            )
            expected = list(DataLoader(filtered, batch_size=None, num_workers=num_workers))
            got = list(DataLoader(scanned, batch_size=None, num_workers=num_workers))
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert a["key"] == b["key"] and int(a["skipped"]) == int(b["skipped"])
                assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    assert sum(counts for counts in scan.skipped_at[MUSK.name].values()) == 2  # no caption, the damaged shard


def test_a_pair_its_shard_no_longer_holds_is_skipped_counted_and_warned_about(tmp_path):
    shard = write_shard(tmp_path / "00000.tar", [("k0", "Musk", png_bytes(0)), ("k1", "Musk", png_bytes(1))])
    pairs = [(shard, "k0"), (shard, "gone"), (shard, "k1")]
    with pytest.warns(UserWarning, match=r"00000\.tar' does not hold every pair .*1 of this stream's pair"):
        (batch,) = list(ForgetStream(pairs, transform, tokenizer, 3))
    assert batch["key"] == ["k0", "k1"] and int(batch["skipped"]) == 1


def test_a_member_twice_in_a_sample_keeps_the_first_as_before(tmp_path):
    import io
    import tarfile

    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k0.TXT", b"Musk first"), ("k0.txt", b"Musk second"), ("k0.png", png_bytes(0))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = list(read_shard(str(path)))
    assert (sample.key, sample.caption, sample.image) == ("k0", "Musk first", png_bytes(0))


# ----------------------------------------------------------------------------------------------------
# Failing sources


def _unlearn(world, output: Path, shards: str, *extra: str) -> list[str]:
    sets = [
        {"name": "identities", "root": str(world.identities_dir)},
        {"name": "objects", "root": str(world.objects_dir)},
    ]
    return [
        "unlearn",
        "--config",
        str(config_path("demo/unlearn.yaml")),
        "--model.init_args.pretrained",
        "null",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.shards",
        shards,
        "--data.init_args.concepts",
        json.dumps([{"name": world.default_target}]),
        "--search.init_args.sets",
        json.dumps(sets),
        "--output_dir",
        str(output),
        *extra,
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("shards", "words"),
    [
        ("{server}/{{00000..00003}}.tar", ["1 shard(s) of data.init_args.shards cannot be read", "00003.tar'", "404"]),
        ("pipe:cat {root}/{{00000..00003}}.tar", ["00003.tar'", "the command exited with status 1"]),
        ("pipe:sleep 30::{root}/00000.tar", ["'pipe:sleep 30'", "wrote nothing for 0.5 s", "read_timeout=0.5"]),
        ("http://127.0.0.1:9/00000.tar", ["'http://127.0.0.1:9/00000.tar'", "does not answer", "Connection refused"]),
    ],
)
def test_a_source_that_fails_is_refused_before_any_compute_in_one_line(capsys, world, server, tmp_path, shards, words):
    shards = shards.format(server=server, root=Path(world.shards).parent)
    output = tmp_path / "out"
    one_line_error(capsys, _unlearn(world, output, shards, "--data.init_args.read_timeout", "0.5"), *words)
    assert not (output / "gradients.safetensors").exists()


def test_a_response_cut_short_is_skipped_and_counted_with_what_its_index_says_was_lost(world, server):
    urls = [f"{server}/00000.tar", f"{server}/truncated/00001.tar"]
    with pytest.warns(UserWarning, match=r"truncated/00001\.tar.*connection closed \d+ bytes before the end"):
        batches = list(DataLoader(PairStream(urls, transform, tokenizer, 4), batch_size=None))
    keys = keys_of(batches)
    first = [sample.key for sample in read_shard(urls[0])]
    held = pq.read_metadata(Path(world.shards).parent / "00001.parquet").num_rows
    read = keys[len(first) :]
    assert keys[: len(first)] == first and 0 < len(read) < held  # some of the cut shard was read...
    assert sum(int(b["skipped"]) for b in batches) == held - len(read)  # ...and the rest counted, as its index says


@pytest.mark.timeout(120)  # a regression would hang here: fail it in minutes, not at the suite's limit
def test_a_stall_ends_at_read_timeout_and_the_samples_before_it_are_kept(world, server):
    root = Path(world.shards).parent
    whole = [sample.key for sample in read_shard(f"{root}/00000.tar")]
    cases = {
        f"{server}/stall/00000.tar": "no data for 0.5 s, read_timeout",
        f"pipe:head -c 16384 {root}/00000.tar; sleep 31": "the command wrote nothing for 0.5 s",
        f"pipe:head -c 16384 {root}/00000.tar; exit 3": "the command exited with status 3",
        "pipe:sleep 31": "the command wrote nothing for 0.5 s",
    }
    for url, reason in cases.items():
        *samples, broken = read_shard(url, timeout=0.5)
        assert isinstance(broken, BrokenShard) and reason in broken.reason, (url, broken)
        keys = [sample.key for sample in samples]
        assert keys == whole[: len(keys)] and (url == "pipe:sleep 31") == (not keys), url
    assert not _running(b"sleep\x0031\x00"), "a stalled command was left running"


def _running(cmdline: bytes) -> list[str]:
    """The processes with this command line, once those killed a moment ago are gone (a kill is not instant)."""
    for _ in range(50):
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                found += [pid] if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline else []
            except OSError:
                pass
        if not found:
            return found
        time.sleep(0.1)
    return found


# ----------------------------------------------------------------------------------------------------
# fsspec URLs


def test_fsspec_urls_read_like_local_files_globs_included(world):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    root = Path(world.shards).parent
    for path in root.iterdir():
        memory.pipe(f"/streaming-test/{path.name}", path.read_bytes())
    try:
        urls = expand_shards("memory://streaming-test/*.tar")
        assert len(urls) == 3
        concept = [Concept(world.default_target)]
        for mode in ("tar", "parquet"):
            scan = scan_shards(urls, concept, caption_index=mode)
            local = scan_shards(expand_shards(world.shards), concept, caption_index=mode)
            assert keys_by_concept(scan) == keys_by_concept(local) and scan.captions == local.captions
    finally:
        memory.rm("/streaming-test", recursive=True)


def test_an_fsspec_url_without_fsspec_or_its_backend_names_the_extra(monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(
        known_implementations,
        "slugtest",
        {"class": "slug_no_such_package.FileSystem", "err": "Install slug_no_such_package to access slugtest"},
    )
    with pytest.raises(UserError, match=r"slugtest:// backend .*pip install \"slug-lightning\[remote\]\""):
        expand_shards("slugtest://bucket/{00000..00001}.tar")
    monkeypatch.setitem(__import__("sys").modules, "fsspec", None)
    monkeypatch.delitem(__import__("sys").modules, "fsspec.core", raising=False)
    with pytest.raises(UserError, match=r"needs fsspec .*pip install \"slug-lightning\[remote\]\""):
        expand_shards("s3://bucket/00000.tar")


# ----------------------------------------------------------------------------------------------------
# The caption index


def test_auto_reads_the_tar_where_no_index_is_and_parquet_refuses(world, tmp_path):
    root = shutil.copytree(Path(world.shards).parent, tmp_path / "shards")
    (root / "00001.parquet").unlink()
    urls = expand_shards(f"{root}/{SHARDS}")
    concept = [Concept(world.default_target)]
    auto = scan_shards(urls, concept, caption_index="auto")
    assert auto.tars == [urls[1]] and len(auto.indexed) == 2 and "00001.parquet" in auto.unindexed[0][1]
    assert keys_by_concept(auto) == keys_by_concept(scan_shards(urls, concept))
    assert "2 from img2dataset's .parquet index, 1 from their tars (" in caption_read_note(auto, 0.1)
    with pytest.raises(UserError, match=r"00001\.tar' has none usable: no .*00001\.parquet.*caption_index 'auto'"):
        scan_shards(urls, concept, caption_index="parquet")


def test_the_index_leaves_out_failed_downloads_and_counts_captionless_samples(tmp_path):
    shard = write_shard(
        tmp_path / "00000.tar",
        [("s0", "Musk", png_bytes(0)), ("s1", None, png_bytes(1)), ("s2", "Elon Musk", png_bytes(2))],
    )
    table = pa.table(
        {
            "key": ["s0", "f0", "s1", "s2"],
            "caption": ["Musk", "Musk, failed", None, "Elon Musk"],
            "status": ["success", "failed_to_download", "success", "success"],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    indexed, scanned = (scan_shards([shard], [MUSK], caption_index=mode) for mode in ("parquet", "tar"))
    assert indexed.indexed == [shard]
    for field in ("captions", "without_caption", "matches", "pairs", "skipped_at"):
        assert getattr(indexed, field) == getattr(scanned, field), field


def test_index_matching_is_exactly_concept_matches():
    captions = [
        "Elon Musk at a launch",
        "a muskrat",
        "ELON MUSK",
        "musk",
        None,
        "Zoe\u0308 Bronte\u0308 at home",
        "Zoë Brontë",
        "zoe bronte",
        "der STRASSE",
        "die Straße",
        "Mus\u212a in Kelvin",
        "",
        "Muskets",
        "über Musk's car",
    ]
    index = CaptionIndex("x.tar", "x.parquet", pa.array([str(i) for i in range(len(captions))]), pa.array(captions))
    for concept in (MUSK, Concept("Zoë Brontë", aliases=("Brontë",)), Concept("straße"), Concept("musk")):
        expected = [i for i, caption in enumerate(captions) if caption is not None and concept.matches(caption)]
        assert matching_rows(index, concept).tolist() == expected, concept
