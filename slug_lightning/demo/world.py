"""The demo world: a seeded generator of LAION-style shards about invented people and objects.

It writes, in a few seconds and without any download, everything the demo needs:

- webdataset shards in the img2dataset layout (``shards/00000.tar`` ..., each sample ``<key>.png`` +
  ``<key>.txt`` + ``<key>.json``) whose captions name invented people and object kinds in varied
  phrasings; many captions name nobody (objects, scenery) and some name a person *and* an object. Beside each
  tar, img2dataset's ``<shard>.parquet`` (``key``, ``caption``, ``status``, ... one row per sample), the caption
  index :mod:`slug_lightning.caption_index` reads;
- two labelled evaluation sets in the image-folder layout (``eval/identities/<person>/*.png`` and
  ``eval/objects/<object>/*.png``), drawn afresh so none of their images is in the shards;
- ``world.json``: the parameters, every person's attributes, the objects, counts and the shard pattern.

A person is a combination of visual attributes (skin tone, hair colour, hair style, shirt colour,
accessory, face shape). Every attribute value is shared with other people, and every person has
look-alikes that differ in only two attributes, so recognising someone takes the combination, not a
single cue. Every image varies in position, scale, background scene and pixel noise.

Example::

    >>> world = make_demo_world("/tmp/world", seed=0)            # doctest: +SKIP
    >>> world.default_target, world.look_alikes(world.default_target)  # doctest: +SKIP

The names, looks and scenes it draws from are in :mod:`slug_lightning.demo.vocabulary`, the drawing in
:mod:`slug_lightning.demo.painters`. Command line: ``python -m slug_lightning make-world ROOT [--seed N]
[--overwrite]`` (:func:`slug_lightning.commands.demo.make_world_main`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from slug_lightning.demo.painters import OBJECT_PAINTERS, encode_png, render
from slug_lightning.demo.vocabulary import (
    ATTRIBUTES,
    FIRST_NAMES,
    LOOKS,
    OBJECT_TEMPLATES,
    PERSON_OBJECT_TEMPLATES,
    PERSON_TEMPLATES,
    SCENERY_CAPTIONS,
    SCENES,
    SURNAMES,
)
from slug_lightning.errors import ConfigError

# Bump when a change to this package changes the files it writes, so an old world is not reused.
GENERATOR_VERSION = 1

WORLD_FILE = "world.json"
SHARDS_DIR = "shards"
IDENTITIES_DIR = "eval/identities"
OBJECTS_DIR = "eval/objects"
# Present while a world is being written; lets a rerun replace a half-written world safely.
INCOMPLETE_MARKER = ".incomplete"

# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoWorld:
    """Paths and names of a written demo world (read back from its ``world.json``).

    Args:
        root: The directory the world was written to.
        shards: Brace pattern of the training shards, e.g. ``<root>/shards/{00000..00007}.tar``.
        identities_dir: Image folder of the identity evaluation set (one folder per person name).
        objects_dir: Image folder of the object evaluation set (one folder per object kind).
        people: The invented person names, in world order.
        objects: The object kinds, in world order.
        default_target: The person the demo forgets; it has look-alikes.
        attributes: Person name -> attribute name -> value.
        num_samples: Number of image-text pairs in the shards.
        num_shards: Number of shard files.
    """

    root: Path
    shards: str
    identities_dir: Path
    objects_dir: Path
    people: tuple[str, ...]
    objects: tuple[str, ...]
    default_target: str
    attributes: dict[str, dict[str, str]] = field(repr=False, compare=False, hash=False)
    num_samples: int = 0
    num_shards: int = 0

    def look_alikes(self, person: str, min_shared: int | None = None) -> tuple[str, ...]:
        """People who share at least ``min_shared`` attributes with ``person``, most similar first.

        Args:
            person: A person name of this world.
            min_shared: Fewest shared attributes; by default all attributes but two ("most").

        Returns:
            Names in world order within equal similarity, excluding ``person``.

        Raises:
            KeyError: If ``person`` is not in this world.
        """
        if person not in self.attributes:
            raise KeyError(f"{person!r} is not a person of this world; people are {list(self.people)}.")
        mine = self.attributes[person]
        threshold = len(mine) - 2 if min_shared is None else min_shared
        shared = {
            other: sum(attrs[a] == mine[a] for a in mine) for other, attrs in self.attributes.items() if other != person
        }
        found = [other for other in self.people if other in shared and shared[other] >= threshold]
        return tuple(sorted(found, key=lambda other: -shared[other]))

    def look_alike_groups(self) -> list[tuple[str, ...]]:
        """The people linked by chains of look-alikes (:meth:`look_alikes`): a partition of the people, each group
        in world order, the groups in the world order of their first person.

        Two people of different groups are never look-alikes, and no one is a look-alike of people in two groups.
        """
        groups: list[set[str]] = []
        for person in self.people:
            linked = {person, *self.look_alikes(person)}
            for group in [g for g in groups if g & linked]:
                linked |= group
                groups.remove(group)
            groups.append(linked)
        ordered = [tuple(p for p in self.people if p in group) for group in groups]
        return sorted(ordered, key=lambda group: self.people.index(group[0]))


def make_demo_world(
    root: str | os.PathLike,
    seed: int = 0,
    *,
    people: int = 30,
    objects: int = 10,
    portraits_per_person: int = 120,
    person_object_per_person: int = 20,
    samples_per_object: int = 120,
    scenery_samples: int = 300,
    eval_per_person: int = 12,
    eval_per_object: int = 24,
    shards: int = 12,
    image_size: int = 32,
    overwrite: bool = False,
) -> DemoWorld:
    """Write a demo world to ``root`` (or return the one already there with the same parameters).

    Call it from one process only (under DDP: in ``LightningDataModule.prepare_data``). A run that was
    interrupted leaves no ``world.json``, and the next call writes the world again from scratch.

    Args:
        root: Output directory; created if missing.
        seed: Seed of every random choice; the same seed and parameters give byte-identical files.
        people: Number of invented people (at most ``len(FIRST_NAMES)``).
        objects: Number of object kinds (at most ``len(OBJECT_PAINTERS)``, 13).
        portraits_per_person: Shard samples showing only that person.
        person_object_per_person: Shard samples showing that person holding an object.
        samples_per_object: Shard samples showing only that object kind.
        scenery_samples: Shard samples showing only a background scene.
        eval_per_person: Evaluation images per person (not in the shards).
        eval_per_object: Evaluation images per object kind (not in the shards).
        shards: Number of shard files (at least 1; the samples are split evenly).
        image_size: Side of the square images in pixels (at least 16).
        overwrite: Replace a world written with other parameters instead of raising.

    Returns:
        The written world.

    Raises:
        ValueError: If a parameter is out of range, ``root`` holds a world with other parameters and
            ``overwrite`` is False, or ``root`` has ``shards/`` or ``eval/`` folders of something else.
    """
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "people": people,
        "objects": objects,
        "portraits_per_person": portraits_per_person,
        "person_object_per_person": person_object_per_person,
        "samples_per_object": samples_per_object,
        "scenery_samples": scenery_samples,
        "eval_per_person": eval_per_person,
        "eval_per_object": eval_per_object,
        "shards": shards,
        "image_size": image_size,
    }
    _check_params(params)
    root = Path(root)
    world_file = root / WORLD_FILE
    if world_file.exists():
        existing = json.loads(world_file.read_text())["parameters"]
        if existing == params:
            return load_demo_world(root)
        if not overwrite:
            changed = {k: (existing.get(k), v) for k, v in params.items() if existing.get(k) != v}
            raise ConfigError(
                f"{str(root)!r} holds a demo world made with other parameters (old, new): {changed}; pass "
                "--overwrite (overwrite=True) to replace it, or choose another directory."
            )
        world_file.unlink()
        (root / INCOMPLETE_MARKER).touch()
    _clear_outputs(root)

    root.mkdir(parents=True, exist_ok=True)
    (root / INCOMPLETE_MARKER).touch()
    spec = _build_spec(params)
    samples = _shard_samples(spec, params)
    pattern = _write_shards(root / SHARDS_DIR, samples, spec, params)
    _write_eval_sets(root, spec, params)
    description = {
        "parameters": params,
        "shards": pattern,
        "identities_dir": IDENTITIES_DIR,
        "objects_dir": OBJECTS_DIR,
        "templates": ["a photo of {}."],
        "default_target": spec["default_target"],
        "attributes": {name: list(values) for name, values in ATTRIBUTES.items()},
        "people": [{"name": name, "attributes": attrs} for name, attrs in spec["people"].items()],
        "objects": [{"name": kind} for kind in spec["objects"]],
        "counts": _counts(samples, params),
    }
    # world.json is written last and atomically: its presence means the world is complete.
    tmp = world_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    tmp.replace(world_file)
    (root / INCOMPLETE_MARKER).unlink()
    return load_demo_world(root)


def load_demo_world(root: str | os.PathLike) -> DemoWorld:
    """Read the world written to ``root`` by `make_demo_world`.

    Raises:
        FileNotFoundError: If ``root/world.json`` does not exist.
    """
    root = Path(root)
    world_file = root / WORLD_FILE
    if not world_file.is_file():
        raise FileNotFoundError(
            f"No demo world at {root}: {world_file} is missing. Write one with make_demo_world({str(root)!r}) "
            f"or `python -m slug_lightning make-world {root}`."
        )
    data = json.loads(world_file.read_text())
    people = tuple(p["name"] for p in data["people"])
    return DemoWorld(
        root=root,
        shards=str(root / data["shards"]),
        identities_dir=root / data["identities_dir"],
        objects_dir=root / data["objects_dir"],
        people=people,
        objects=tuple(o["name"] for o in data["objects"]),
        default_target=data["default_target"],
        attributes={p["name"]: dict(p["attributes"]) for p in data["people"]},
        num_samples=data["counts"]["samples"],
        num_shards=data["parameters"]["shards"],
    )


# ----------------------------------------------------------------------------------------------------
# Who is in the world
# ----------------------------------------------------------------------------------------------------


def _clear_outputs(root: Path) -> None:
    """Remove the shards and evaluation sets of an unfinished or replaced world, and nothing else.

    Raises:
        ValueError: If ``root`` has ``shards/`` or ``eval/`` content that no demo world run wrote.
    """
    ours = (root / INCOMPLETE_MARKER).exists()
    for sub in (SHARDS_DIR, "eval"):
        path = root / sub
        if path.exists() and any(path.iterdir()):
            if not ours:
                raise ConfigError(
                    f"{path} exists and is not part of a demo world (no {WORLD_FILE} or {INCOMPLETE_MARKER} in "
                    f"{root}); refusing to overwrite it. Choose an empty or new directory."
                )
            shutil.rmtree(path)


def _check_params(params: dict) -> None:
    limits = {
        "people": (2, len(FIRST_NAMES)),
        "objects": (1, len(OBJECT_PAINTERS)),
        "shards": (1, 99999),
        "image_size": (16, 512),
    }
    for name, (low, high) in limits.items():
        if not low <= params[name] <= high:
            raise ConfigError(f"{name}={params[name]} is out of range; valid is {low}..{high}.")
    for name in (
        "portraits_per_person",
        "person_object_per_person",
        "samples_per_object",
        "scenery_samples",
        "eval_per_person",
        "eval_per_object",
    ):
        if params[name] < 0:
            raise ConfigError(f"{name}={params[name]} must be >= 0.")
    samples = (
        params["people"] * (params["portraits_per_person"] + params["person_object_per_person"])
        + params["objects"] * params["samples_per_object"]
        + params["scenery_samples"]
    )
    if params["shards"] > samples:
        raise ConfigError(f"shards={params['shards']} is more than the {samples} samples; every shard needs one.")
    if params["portraits_per_person"] + params["person_object_per_person"] < 1 or params["eval_per_person"] < 1:
        raise ConfigError("Every person needs at least one shard sample and one evaluation image.")
    if params["samples_per_object"] + params["person_object_per_person"] < 1 or params["eval_per_object"] < 1:
        raise ConfigError("Every object needs at least one shard sample and one evaluation image.")


def _family_sizes(count: int) -> list[int]:
    """Sizes of look-alike families: twos, plus one or two threes so some people have two look-alikes."""
    if count <= 3:
        return [count]
    sizes = [3] if count % 2 else ([3, 3] if count >= 6 else [2, 2])
    return sizes + [2] * ((count - sum(sizes)) // 2)


def _choose_people(rng: np.random.Generator, count: int) -> list[dict[str, str]]:
    """Attribute combinations: families of look-alikes, every two people at least two attributes apart.

    Each family has a base combination (balanced over the values of every attribute) and members that
    differ from it in exactly two attributes, so everyone has a look-alike that shares all attributes
    but two. No attribute value belongs to a single person, so no single attribute identifies anyone.
    """
    names = list(ATTRIBUTES)
    sizes = [len(ATTRIBUTES[a]) for a in names]
    families = _family_sizes(count)
    for _ in range(1000):
        bases = np.stack([rng.permutation(np.resize(np.arange(k), len(families))) for k in sizes], axis=1)
        codes = []
        for base, members in zip(bases, families):
            codes.append(tuple(int(v) for v in base))
            for _ in range(members - 1):
                new = [int(v) for v in base]
                for a in rng.choice(len(names), size=2, replace=False):
                    new[a] = (new[a] + 1 + int(rng.integers(sizes[a] - 1))) % sizes[a]
                codes.append(tuple(new))
        apart = all(sum(x != y for x, y in zip(c, d)) >= 2 for c, d in combinations(codes, 2))
        shared = count < 4 or all(sum(c[a] == code[a] for c in codes) >= 2 for code in codes for a in range(len(names)))
        if apart and shared:
            return [{a: list(ATTRIBUTES[a])[v] for a, v in zip(names, code)} for code in codes]
    raise RuntimeError(f"Could not draw {count} people two attributes apart with all attribute values shared.")


def _build_spec(params: dict) -> dict:
    """Names, attributes and objects of the world, all drawn from the seed."""
    rng = np.random.default_rng([params["seed"], 0])
    firsts = rng.permutation(len(FIRST_NAMES))[: params["people"]]
    lasts = rng.permutation(len(SURNAMES))[: params["people"]]
    names = [f"{FIRST_NAMES[f]} {SURNAMES[s]}" for f, s in zip(firsts, lasts)]
    attrs = _choose_people(rng, params["people"])
    people = dict(zip(names, attrs))
    kinds = list(OBJECT_PAINTERS)
    objects = [kinds[i] for i in sorted(rng.permutation(len(kinds))[: params["objects"]])]
    # The target has the most look-alikes (ties: first in world order), so forgetting it is a real test.
    closeness = [sum(_distance(people[n], people[o]) <= 2 for o in names if o != n) for n in names]
    return {"people": people, "objects": objects, "default_target": names[int(np.argmax(closeness))]}


def _distance(a: dict[str, str], b: dict[str, str]) -> int:
    return sum(a[k] != b[k] for k in a)


# ----------------------------------------------------------------------------------------------------
# What the shards hold
# ----------------------------------------------------------------------------------------------------


def _shard_samples(spec: dict, params: dict) -> list[dict]:
    """Every shard sample's content (who, what, where, caption), in shuffled order."""
    rng = np.random.default_rng([params["seed"], 1])
    scenes = list(SCENES)
    draws: list[dict] = []
    for person, attrs in spec["people"].items():
        looks = [LOOKS[a][v] for a, v in attrs.items() if LOOKS[a][v] is not None]
        for _ in range(params["portraits_per_person"]):
            template = PERSON_TEMPLATES[int(rng.integers(len(PERSON_TEMPLATES)))]
            draws.append(
                {
                    "person": person,
                    "object": None,
                    "scene": scenes[int(rng.integers(len(scenes)))],
                    "template": template,
                    "look": looks[int(rng.integers(len(looks)))],
                }
            )
        for _ in range(params["person_object_per_person"]):
            template = PERSON_OBJECT_TEMPLATES[int(rng.integers(len(PERSON_OBJECT_TEMPLATES)))]
            draws.append(
                {
                    "person": person,
                    "object": spec["objects"][int(rng.integers(len(spec["objects"])))],
                    "scene": scenes[int(rng.integers(len(scenes)))],
                    "template": template,
                }
            )
    for kind in spec["objects"]:
        for _ in range(params["samples_per_object"]):
            template = OBJECT_TEMPLATES[int(rng.integers(len(OBJECT_TEMPLATES)))]
            draws.append(
                {"person": None, "object": kind, "scene": scenes[int(rng.integers(len(scenes)))], "template": template}
            )
    for _ in range(params["scenery_samples"]):
        scene = scenes[int(rng.integers(len(scenes)))]
        captions = SCENERY_CAPTIONS[scene]
        draws.append(
            {"person": None, "object": None, "scene": scene, "template": captions[int(rng.integers(len(captions)))]}
        )
    order = rng.permutation(len(draws))
    samples = []
    for index, i in enumerate(order):
        sample = dict(draws[i], key=f"{index:09d}")
        sample["caption"] = _caption(sample)
        samples.append(sample)
    return samples


def _caption(sample: dict) -> str:
    name = sample["person"] or ""
    kind = sample["object"] or ""
    article = "an" if kind[:1] in tuple("aeiou") else "a"
    return sample["template"].format(
        name=name,
        lname=name.lower(),
        uname=name.upper(),
        object=kind,
        a_object=f"{article} {kind}",
        A_object=f"{article.capitalize()} {kind}",
        scene=SCENES[sample["scene"]],
        look=sample.get("look"),
    )


def _counts(samples: list[dict], params: dict) -> dict[str, int]:
    return {
        "samples": len(samples),
        "with_person": sum(s["person"] is not None for s in samples),
        "with_person_and_object": sum(s["person"] is not None and s["object"] is not None for s in samples),
        "object_only": sum(s["person"] is None and s["object"] is not None for s in samples),
        "scenery_only": sum(s["person"] is None and s["object"] is None for s in samples),
        "eval_identities": params["people"] * params["eval_per_person"],
        "eval_objects": params["objects"] * params["eval_per_object"],
    }


def _write_shards(directory: Path, samples: list[dict], spec: dict, params: dict) -> str:
    """Write the samples as img2dataset-style tars and return the brace pattern (relative to the root)."""
    directory.mkdir(parents=True, exist_ok=True)
    count = params["shards"]
    bounds = np.linspace(0, len(samples), count + 1).round().astype(int)
    for shard in range(count):
        rows = []
        with tarfile.open(directory / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples[bounds[shard] : bounds[shard + 1]]:
                # Each image has its own stream, so a sample's pixels do not depend on the others.
                rng = np.random.default_rng([params["seed"], 2, int(sample["key"])])
                pixels = render(rng, params["image_size"], spec, sample["person"], sample["object"], sample["scene"])
                png = encode_png(pixels)
                meta = {
                    "key": sample["key"],
                    "caption": sample["caption"],
                    "person": sample["person"],
                    "object": sample["object"],
                    "scene": sample["scene"],
                    "width": params["image_size"],
                    "height": params["image_size"],
                }
                _add_member(tar, f"{sample['key']}.png", png)
                _add_member(tar, f"{sample['key']}.txt", sample["caption"].encode())
                _add_member(tar, f"{sample['key']}.json", json.dumps(meta, sort_keys=True).encode())
                rows.append((sample["key"], sample["caption"], params["image_size"], hashlib.sha256(png).hexdigest()))
        _write_index(directory / f"{shard:05d}.parquet", rows)
    return f"{SHARDS_DIR}/{{00000..{count - 1:05d}}}.tar" if count > 1 else f"{SHARDS_DIR}/00000.tar"


def _write_index(path: Path, rows: list[tuple[str, str, int, str]]) -> None:
    """img2dataset's ``<shard>.parquet``: one row per sample, in the tar's order, with img2dataset's columns (the
    demo downloads nothing, so every status is a success and there is no source URL)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys, captions, sizes, hashes = (list(column) for column in zip(*rows)) if rows else ([], [], [], [])
    table = pa.table(
        {
            "url": pa.array([None] * len(keys), pa.string()),
            "key": pa.array(keys, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "status": pa.array(["success"] * len(keys), pa.string()),
            "error_message": pa.array([None] * len(keys), pa.string()),
            "width": pa.array(sizes, pa.int64()),
            "height": pa.array(sizes, pa.int64()),
            "original_width": pa.array(sizes, pa.int64()),
            "original_height": pa.array(sizes, pa.int64()),
            "sha256": pa.array(hashes, pa.string()),
        }
    )
    pq.write_table(table, path)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (no mtime, owner) keeps the tars byte-identical across runs and machines.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _write_eval_sets(root: Path, spec: dict, params: dict) -> None:
    """Fresh draws (their own random streams) in the image-folder layout: ``<set>/<class>/<n>.png``."""
    scenes = list(SCENES)
    sets = (
        (IDENTITIES_DIR, 3, list(spec["people"]), params["eval_per_person"], "person"),
        (OBJECTS_DIR, 4, spec["objects"], params["eval_per_object"], "object"),
    )
    for subdir, stream, classes, per_class, role in sets:
        for c, name in enumerate(classes):
            folder = root / subdir / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                rng = np.random.default_rng([params["seed"], stream, c, n])
                scene = scenes[int(rng.integers(len(scenes)))]
                person, kind = (name, None) if role == "person" else (None, name)
                image = render(rng, params["image_size"], spec, person, kind, scene)
                (folder / f"{n:03d}.png").write_bytes(encode_png(image))
