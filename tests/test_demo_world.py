"""Tests of the demo world generator: determinism, layout, content, evaluation sets, idempotence."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import re
import string
import tarfile
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from slug_lightning.commands.demo import make_world_main as main
from slug_lightning.concepts import Concept
from slug_lightning.demo import load_demo_world, make_demo_world
from slug_lightning.demo import world as dw

# Every person and object, but few samples: the properties under test do not depend on the counts.
SMALL = dict(
    people=30,
    objects=10,
    portraits_per_person=3,
    person_object_per_person=1,
    samples_per_object=4,
    scenery_samples=12,
    eval_per_person=2,
    eval_per_object=3,
    shards=4,
)
TINY_CONFIG = Path(dw.__file__).resolve().parents[1] / "model_configs" / "slug-tiny.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_demo_world(tmp_path_factory.mktemp("world") / "w", seed=0, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shard_members(world) -> dict[str, dict[str, bytes]]:
    """key -> extension -> bytes, over every shard."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted((world.root / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def _captions(world) -> list[tuple[str, dict]]:
    return [(s["txt"].decode(), json.loads(s["json"])) for s in _shard_members(world).values()]


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(world, tmp_path):
    again = make_demo_world(tmp_path / "again", seed=0, **SMALL)
    other = make_demo_world(tmp_path / "other", seed=1, **SMALL)
    assert _files(again.root) == _files(world.root)
    other_files = _files(other.root)
    assert other_files["shards/00000.tar"] != _files(world.root)["shards/00000.tar"]
    assert other_files["world.json"] != _files(world.root)["world.json"]


def test_shards_hold_png_txt_json_per_key(world):
    samples = _shard_members(world)
    assert len(list((world.root / "shards").glob("*.tar"))) == SMALL["shards"] == world.num_shards
    assert len(samples) == world.num_samples
    for key, parts in samples.items():
        assert re.fullmatch(r"\d{9}", key)
        assert set(parts) == {"png", "txt", "json"}
        meta = json.loads(parts["json"])
        assert meta["key"] == key and meta["caption"] == parts["txt"].decode()
        assert {"person", "object", "width", "height"} <= set(meta)
        assert Image.open(io.BytesIO(parts["png"])).size == (meta["width"], meta["height"])


def test_each_shard_has_img2dataset_parquet_listing_its_samples_in_tar_order(world):
    import pyarrow.parquet as pq

    columns = {"url", "key", "caption", "status", "error_message", "width", "height", "sha256"}
    for shard in sorted((world.root / "shards").glob("*.tar")):
        table = pq.read_table(shard.with_suffix(".parquet"))
        assert columns <= set(table.column_names)
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = list(dict.fromkeys(name.split(".")[0] for name in members))
        assert table["key"].to_pylist() == keys
        assert table["caption"].to_pylist() == [members[f"{key}.txt"].decode() for key in keys]
        assert table["sha256"].to_pylist() == [hashlib.sha256(members[f"{key}.png"]).hexdigest() for key in keys]
        assert set(table["status"].to_pylist()) == {"success"}


def test_webdataset_reads_the_brace_pattern(world):
    dataset = wds.WebDataset(world.shards, shardshuffle=False).decode("pil").to_tuple("png", "txt", "json")
    rows = list(dataset)
    assert len(rows) == world.num_samples
    image, caption, meta = rows[0]
    assert image.size == (32, 32) and caption == meta["caption"]


def test_captions_name_people_and_objects_as_their_metadata_says(world):
    people = {name: Concept(name) for name in world.people}
    objects = {kind: Concept(kind) for kind in world.objects}
    named_people, named_objects, nobody, both = set(), set(), 0, 0
    for caption, meta in _captions(world):
        who = {name for name, c in people.items() if c.matches(caption)}
        what = {kind for kind, c in objects.items() if c.matches(caption)}
        assert who == ({meta["person"]} if meta["person"] else set()), caption
        assert what == ({meta["object"]} if meta["object"] else set()), caption
        named_people |= who
        named_objects |= what
        nobody += not who
        both += bool(who and what)
    assert len(named_people) == len(world.people) >= 30
    assert len(named_objects) == len(world.objects) >= 10
    assert nobody >= 0.2 * world.num_samples
    assert both >= len(world.people)


def test_people_are_named_in_varied_phrasings(world):
    phrasings = set()
    for caption, meta in _captions(world):
        if meta["person"]:
            name = meta["person"]
            for spelling in (name, name.lower(), name.upper()):
                caption = caption.replace(spelling, "<name>")
            phrasings.add(re.sub(r"\b(at|in) (the |a )?\w+$", "<place>", caption))
    assert len(phrasings) >= 10


def test_evaluation_sets_are_image_folders_of_fresh_images(world):
    assert sorted(p.name for p in world.identities_dir.iterdir()) == sorted(world.people)
    assert sorted(p.name for p in world.objects_dir.iterdir()) == sorted(world.objects)
    shard_hashes = {hashlib.sha256(s["png"]).hexdigest() for s in _shard_members(world).values()}
    for folder, per_class in (
        (world.identities_dir, SMALL["eval_per_person"]),
        (world.objects_dir, SMALL["eval_per_object"]),
    ):
        for class_dir in folder.iterdir():
            images = sorted(class_dir.glob("*.png"))
            assert len(images) == per_class
            assert not {hashlib.sha256(p.read_bytes()).hexdigest() for p in images} & shard_hashes


def test_no_single_attribute_identifies_a_person(world):
    data = json.loads((world.root / "world.json").read_text())
    table = {p["name"]: p["attributes"] for p in data["people"]}
    assert set(table) == set(world.people) and set(data["attributes"]) == set(dw.ATTRIBUTES)
    for name, attrs in table.items():
        for attribute, value in attrs.items():
            assert value in data["attributes"][attribute]
            sharing = [other for other in table if other != name and table[other][attribute] == value]
            assert sharing, f"{name} alone has {attribute}={value}"
    for a, b in combinations(table, 2):
        assert sum(table[a][k] != table[b][k] for k in table[a]) >= 2, (a, b)


def test_every_person_has_look_alikes_and_the_target_is_a_person(world):
    for name in world.people:
        look_alikes = world.look_alikes(name)
        assert look_alikes and name not in look_alikes
        mine = world.attributes[name]
        for other in look_alikes:
            assert sum(world.attributes[other][k] == mine[k] for k in mine) >= len(mine) - 2
    assert world.default_target in world.people and world.look_alikes(world.default_target)
    with pytest.raises(KeyError, match="not a person"):
        world.look_alikes("Nobody Atall")


def test_look_alike_groups_partition_the_people_along_look_alike_chains(world):
    groups = world.look_alike_groups()
    group_of = {person: index for index, group in enumerate(groups) for person in group}
    assert sorted(group_of) == sorted(world.people) and sum(map(len, groups)) == len(world.people)
    assert [min(world.people.index(p) for p in group) for group in groups] == sorted(
        world.people.index(group[0]) for group in groups
    )
    for person in world.people:  # look-alikes share a group...
        assert {group_of[other] for other in world.look_alikes(person)} == {group_of[person]}
    for group in groups:  # ...and every group is one chain: all of it is reached from its first person
        reached, frontier = {group[0]}, [group[0]]
        while frontier:
            new = set(world.look_alikes(frontier.pop())) - reached
            reached |= new
            frontier += new
        assert reached == set(group)
    assert 1 < len(groups) < len(world.people)


def test_names_never_overlap_each_other_or_caption_words():
    words = [w.lower() for w in dw.FIRST_NAMES + dw.SURNAMES]
    assert len(set(words)) == len(words)
    for a, b in combinations(words, 2):
        assert a not in b and b not in a, (a, b)
    caption_text = " ".join(
        [
            *dw.PERSON_TEMPLATES,
            *dw.PERSON_OBJECT_TEMPLATES,
            *dw.OBJECT_TEMPLATES,
            *dw.SCENES.values(),
            *(c for captions in dw.SCENERY_CAPTIONS.values() for c in captions),
            *dw.OBJECT_PAINTERS,
            *(look for looks in dw.LOOKS.values() for look in looks.values() if look),
        ]
    )
    caption_words = set(
        re.sub(r"\{\w+\}", " ", caption_text)
        .lower()
        .translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
        .split()
    )
    for name_word in words:
        assert not any(name_word in w for w in caption_words), name_word


def test_every_caption_fits_the_tiny_clip_context():
    open_clip = pytest.importorskip("open_clip")
    context = json.loads(TINY_CONFIG.read_text())["text_cfg"]["context_length"]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def longest(values):
        return max(values, key=lambda v: len(tokenizer.encode(v)))

    # BPE works word by word, so filling every slot with its longest value gives the longest caption.
    name = max(((f, s) for f in dw.FIRST_NAMES for s in dw.SURNAMES), key=lambda n: len(tokenizer.encode(" ".join(n))))
    name = " ".join(name)
    kind = longest(list(dw.OBJECT_PAINTERS))
    slots = dict(
        name=name,
        lname=name.lower(),
        uname=name.upper(),
        object=kind,
        a_object=f"an {kind}",
        A_object=f"An {kind}",
        scene=longest(list(dw.SCENES.values())),
        look=longest([v for looks in dw.LOOKS.values() for v in looks.values() if v]),
    )
    templates = [
        *dw.PERSON_TEMPLATES,
        *dw.PERSON_OBJECT_TEMPLATES,
        *dw.OBJECT_TEMPLATES,
        *(c for captions in dw.SCENERY_CAPTIONS.values() for c in captions),
    ]
    worst = max(len(tokenizer.encode(t.format(**slots))) for t in templates)
    assert worst + 2 <= context  # start and end tokens


def test_same_parameters_reuse_the_world_and_other_parameters_raise(world):
    before = {p: p.stat().st_mtime_ns for p in world.root.rglob("*") if p.is_file()}
    assert make_demo_world(world.root, seed=0, **SMALL) == world
    assert {p: p.stat().st_mtime_ns for p in world.root.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="seed"):
        make_demo_world(world.root, seed=3, **SMALL)


def test_overwrite_replaces_a_world_with_other_parameters(tmp_path):
    make_demo_world(tmp_path, seed=0, **SMALL)
    replaced = make_demo_world(tmp_path, seed=0, **{**SMALL, "people": 12, "shards": 5}, overwrite=True)
    assert len(replaced.people) == 12
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 5
    assert len(list(replaced.identities_dir.iterdir())) == 12
    assert load_demo_world(tmp_path) == replaced


def test_an_interrupted_world_is_written_again(tmp_path):
    world = make_demo_world(tmp_path, seed=0, **SMALL)
    (tmp_path / "world.json").unlink()
    (tmp_path / dw.INCOMPLETE_MARKER).touch()
    (tmp_path / "shards" / "00003.tar").write_bytes(b"truncated")
    again = make_demo_world(tmp_path, seed=0, **SMALL)
    assert again == world and not (tmp_path / dw.INCOMPLETE_MARKER).exists()
    assert len(list(wds.WebDataset(again.shards, shardshuffle=False))) == again.num_samples


def test_foreign_shards_are_never_deleted(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "mine.tar").write_bytes(b"precious")
    with pytest.raises(ValueError, match="not part of a demo world"):
        make_demo_world(tmp_path, seed=0, **SMALL)
    assert (tmp_path / "shards" / "mine.tar").read_bytes() == b"precious"


def test_load_without_a_world_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="world.json"):
        load_demo_world(tmp_path)


@pytest.mark.parametrize(
    "bad", [dict(people=1), dict(objects=0), dict(shards=0), dict(shards=10_000), dict(samples_per_object=-1)]
)
def test_bad_parameters_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_demo_world(tmp_path, **{**SMALL, **bad})


def test_command_line_writes_a_world_and_prints_its_target(tmp_path, capsys):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert main([str(tmp_path / "cli"), "--seed", "2", *flags]) == 0
    world = load_demo_world(tmp_path / "cli")
    assert world == make_demo_world(tmp_path / "cli", seed=2, **SMALL)
    assert world.default_target in capsys.readouterr().out


def test_defaults_make_a_world_of_30_people_10_objects_and_at_least_4_shards():
    defaults = {k: p.default for k, p in inspect.signature(make_demo_world).parameters.items()}
    assert defaults["people"] == 30 and defaults["objects"] == 10 and defaults["shards"] >= 4
