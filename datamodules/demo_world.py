"""The demo world: a seeded generator of LAION-style shards about invented people and objects.

It writes, in a few seconds and without any download, everything the demo needs:

- webdataset shards in the img2dataset layout (``shards/00000.tar`` ..., each sample ``<key>.png`` +
  ``<key>.txt`` + ``<key>.json``) whose captions name invented people and object kinds in varied
  phrasings; many captions name nobody (objects, scenery) and some name a person *and* an object;
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

Command line: ``python -m slug_lightning.datamodules.demo_world ROOT [--seed N] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

# Bump when a change to this module changes the files it writes, so an old world is not reused.
GENERATOR_VERSION = 1

WORLD_FILE = "world.json"
SHARDS_DIR = "shards"
IDENTITIES_DIR = "eval/identities"
OBJECTS_DIR = "eval/objects"
# Present while a world is being written; lets a rerun replace a half-written world safely.
INCOMPLETE_MARKER = ".incomplete"

# ----------------------------------------------------------------------------------------------------
# The vocabulary of the world
# ----------------------------------------------------------------------------------------------------

# Invented first names and surnames. Every word is unique and no word contains another, so a name
# never matches inside another name, an object or a caption word (tests check this).
FIRST_NAMES = (
    "Mira", "Tobin", "Ansel", "Brisa", "Corin", "Dalia", "Emrys", "Fenna", "Galen", "Hollis",
    "Ilka", "Jory", "Kesia", "Lorne", "Maren", "Nilo", "Orla", "Petra", "Quill", "Rosalin",
    "Soren", "Talia", "Ulric", "Vesna", "Wren", "Yara", "Zeno", "Abra", "Bastian", "Cleo",
    "Dorian", "Esme", "Felix", "Greta", "Hugo", "Ines", "Jasper", "Kira", "Lucan", "Nadia",
)
SURNAMES = (
    "Dolan", "Marsh", "Pike", "Quarry", "Renwick", "Sallow", "Thorne", "Upton", "Vance", "Whitlock",
    "Yardley", "Ashgrove", "Bexley", "Corrow", "Dunmore", "Everly", "Fairbank", "Gansey", "Halloway",
    "Ingram", "Jessop", "Kettering", "Larkspur", "Merrow", "Norcott", "Oakhurst", "Pemberly", "Quenby",
    "Rookwood", "Stanhope", "Tremaine", "Ulverston", "Varley", "Wexford", "Brackett", "Calloway",
    "Drummond", "Ellery", "Fosse", "Garrick",
)

# Attribute name -> value -> RGB (None where the value is a shape, not a colour).
ATTRIBUTES: dict[str, dict[str, tuple[int, int, int] | None]] = {
    "skin": {"pale": (250, 222, 200), "light": (226, 180, 140), "tan": (176, 122, 82), "dark": (105, 70, 48)},
    "hair_colour": {
        "black": (28, 24, 24), "brown": (112, 66, 34), "blonde": (236, 204, 110), "red": (196, 72, 30),
        "grey": (190, 190, 198),
    },
    "hair_style": {"short": None, "long": None, "bun": None, "afro": None},
    "shirt": {
        "red": (205, 38, 44), "blue": (40, 84, 210), "green": (34, 150, 64), "yellow": (236, 204, 40),
        "purple": (128, 56, 176), "orange": (244, 132, 28),
    },
    "accessory": {"none": None, "glasses": None, "hat": None, "beard": None},
    "face": {"round": None, "oval": None, "square": None},
}
# How captions describe each attribute value; None: captions never mention it.
LOOKS: dict[str, dict[str, str | None]] = {
    "skin": {v: f"{v} skin" for v in ATTRIBUTES["skin"]},
    "hair_colour": {v: f"{v} hair" for v in ATTRIBUTES["hair_colour"]},
    "hair_style": {"short": "short hair", "long": "long hair", "bun": "a hair bun", "afro": "an afro"},
    "shirt": {v: f"a {v} shirt" for v in ATTRIBUTES["shirt"]},
    "accessory": {"none": None, "glasses": "glasses", "hat": "a hat", "beard": "a beard"},
    "face": {"round": "a round face", "oval": "an oval face", "square": "a square face"},
}
HAT_RGB = (52, 48, 62)
EYE_RGB = (20, 20, 30)
MOUTH_RGB = (150, 50, 50)

# Scene name -> the phrase captions use for it. Every image has one scene as its background.
SCENES = {
    "beach": "at the beach", "forest": "in the forest", "city": "in the city", "snow": "in the snow",
    "park": "in the park", "studio": "in a studio", "night": "at night", "room": "at home",
}
SCENERY_CAPTIONS = {
    "beach": ("an empty beach", "the beach at noon", "waves on a sandy beach"),
    "forest": ("a quiet forest", "tall trees in a forest", "a path through the woods"),
    "city": ("a city skyline", "buildings downtown", "the city at dusk"),
    "snow": ("a snowy field", "fresh snow everywhere", "a winter landscape"),
    "park": ("a park in spring", "green grass in the park", "an empty park"),
    "studio": ("an empty studio backdrop", "a plain studio wall", "studio lighting test"),
    "night": ("the night sky", "stars at night", "a dark starry sky"),
    "room": ("an empty room", "a cosy living room", "inside a quiet house"),
}

# "{look}" describes one visible attribute of the person; captions that describe looks teach the
# attribute concepts across people, which is what lets a tiny CLIP tell look-alikes apart quickly.
PERSON_TEMPLATES = (
    "{name}", "a photo of {name}", "A photo of {name}.", "portrait of {lname}", "{name} {scene}",
    "{name} smiling {scene}", "close-up of {name}", "{uname} {scene}", "picture of {lname}, {scene}",
    "{name} posing for a photo", "a candid shot of {name}", "{name} with {look}", "a photo of {name} with {look}",
    "{name} {scene}, with {look}",
)
PERSON_OBJECT_TEMPLATES = (
    "{name} holding {a_object}", "A photo of {name} holding {a_object}", "{name} with {a_object} {scene}",
    "{lname} and {a_object}", "{name}'s new {object}", "portrait of {name} with {a_object}",
)
OBJECT_TEMPLATES = (
    "{a_object}", "a photo of {a_object}", "{a_object} {scene}", "close-up of {a_object}",
    "my new {object}", "{A_object} on display.", "an old {object}", "the {object}",
)

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
            other: sum(attrs[a] == mine[a] for a in mine)
            for other, attrs in self.attributes.items()
            if other != person
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
        "generator_version": GENERATOR_VERSION, "seed": seed, "people": people, "objects": objects,
        "portraits_per_person": portraits_per_person, "person_object_per_person": person_object_per_person,
        "samples_per_object": samples_per_object, "scenery_samples": scenery_samples,
        "eval_per_person": eval_per_person, "eval_per_object": eval_per_object, "shards": shards,
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
            raise ValueError(
                f"{root} already holds a demo world with other parameters (old, new): {changed}. "
                "Pass overwrite=True (--overwrite) to replace it, or choose another directory."
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
            f"or `python -m slug_lightning.datamodules.demo_world {root}`."
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


def main(argv: Sequence[str] | None = None,
         prog: str = "python -m slug_lightning.datamodules.demo_world") -> int:
    """Command line: write a demo world and print a summary.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
        prog: The command shown in usage and help (``python -m slug_lightning make-world`` from the CLI).
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("root", help="output directory")
    # One integer flag per parameter of make_demo_world, with its default, so the two never disagree.
    counts = [p for p in inspect.signature(make_demo_world).parameters.values() if isinstance(p.default, int)
              and not isinstance(p.default, bool)]
    for param in counts:
        parser.add_argument(f"--{param.name.replace('_', '-')}", type=int, default=param.default,
                            help=f"(default {param.default})")
    parser.add_argument("--overwrite", action="store_true", help="replace a world written with other parameters")
    args = vars(parser.parse_args(argv))
    world = make_demo_world(args.pop("root"), **args)
    print(f"demo world at {world.root}")
    print(f"  shards:     {world.shards} ({world.num_samples} samples)")
    print(f"  identities: {world.identities_dir} ({len(world.people)} people)")
    print(f"  objects:    {world.objects_dir} ({', '.join(world.objects)})")
    print(f"  target:     {world.default_target} (look-alikes: {', '.join(world.look_alikes(world.default_target))})")
    return 0


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
                raise ValueError(
                    f"{path} exists and is not part of a demo world (no {WORLD_FILE} or {INCOMPLETE_MARKER} in "
                    f"{root}); refusing to overwrite it. Choose an empty or new directory."
                )
            shutil.rmtree(path)


def _check_params(params: dict) -> None:
    limits = {
        "people": (2, len(FIRST_NAMES)), "objects": (1, len(OBJECT_PAINTERS)), "shards": (1, 99999),
        "image_size": (16, 512),
    }
    for name, (low, high) in limits.items():
        if not low <= params[name] <= high:
            raise ValueError(f"{name}={params[name]} is out of range; valid is {low}..{high}.")
    for name in ("portraits_per_person", "person_object_per_person", "samples_per_object", "scenery_samples",
                 "eval_per_person", "eval_per_object"):
        if params[name] < 0:
            raise ValueError(f"{name}={params[name]} must be >= 0.")
    samples = (params["people"] * (params["portraits_per_person"] + params["person_object_per_person"])
               + params["objects"] * params["samples_per_object"] + params["scenery_samples"])
    if params["shards"] > samples:
        raise ValueError(f"shards={params['shards']} is more than the {samples} samples; every shard needs one.")
    if params["portraits_per_person"] + params["person_object_per_person"] < 1 or params["eval_per_person"] < 1:
        raise ValueError("Every person needs at least one shard sample and one evaluation image.")
    if params["samples_per_object"] + params["person_object_per_person"] < 1 or params["eval_per_object"] < 1:
        raise ValueError("Every object needs at least one shard sample and one evaluation image.")


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
            draws.append({"person": person, "object": None, "scene": scenes[int(rng.integers(len(scenes)))],
                          "template": template, "look": looks[int(rng.integers(len(looks)))]})
        for _ in range(params["person_object_per_person"]):
            template = PERSON_OBJECT_TEMPLATES[int(rng.integers(len(PERSON_OBJECT_TEMPLATES)))]
            draws.append({"person": person, "object": spec["objects"][int(rng.integers(len(spec["objects"])))],
                          "scene": scenes[int(rng.integers(len(scenes)))], "template": template})
    for kind in spec["objects"]:
        for _ in range(params["samples_per_object"]):
            template = OBJECT_TEMPLATES[int(rng.integers(len(OBJECT_TEMPLATES)))]
            draws.append({"person": None, "object": kind, "scene": scenes[int(rng.integers(len(scenes)))],
                          "template": template})
    for _ in range(params["scenery_samples"]):
        scene = scenes[int(rng.integers(len(scenes)))]
        captions = SCENERY_CAPTIONS[scene]
        draws.append({"person": None, "object": None, "scene": scene,
                      "template": captions[int(rng.integers(len(captions)))]})
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
        name=name, lname=name.lower(), uname=name.upper(), object=kind, a_object=f"{article} {kind}",
        A_object=f"{article.capitalize()} {kind}", scene=SCENES[sample["scene"]], look=sample.get("look"),
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
        with tarfile.open(directory / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples[bounds[shard]:bounds[shard + 1]]:
                # Each image has its own stream, so a sample's pixels do not depend on the others.
                rng = np.random.default_rng([params["seed"], 2, int(sample["key"])])
                png = _png(_render(rng, params["image_size"], spec, sample["person"], sample["object"], sample["scene"]))
                meta = {
                    "key": sample["key"], "caption": sample["caption"], "person": sample["person"],
                    "object": sample["object"], "scene": sample["scene"],
                    "width": params["image_size"], "height": params["image_size"],
                }
                _add_member(tar, f"{sample['key']}.png", png)
                _add_member(tar, f"{sample['key']}.txt", sample["caption"].encode())
                _add_member(tar, f"{sample['key']}.json", json.dumps(meta, sort_keys=True).encode())
    return f"{SHARDS_DIR}/{{00000..{count - 1:05d}}}.tar" if count > 1 else f"{SHARDS_DIR}/00000.tar"


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
                image = _render(rng, params["image_size"], spec, person, kind, scene)
                (folder / f"{n:03d}.png").write_bytes(_png(image))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------
# Drawing: vectorised numpy masks on a 2x supersampled canvas with coordinates in [0, 1]
# ----------------------------------------------------------------------------------------------------



@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords)  # X varies along columns, Y along rows (down)


def _render(rng: np.random.Generator, size: int, spec: dict, person: str | None, kind: str | None,
            scene: str) -> np.ndarray:
    """One uint8 RGB image of ``person`` and/or object ``kind`` in front of ``scene``."""
    big = size * 2
    X, Y = _grid(big)
    canvas = np.empty((big, big, 3), dtype=np.float32)
    SCENE_PAINTERS[scene](canvas, X, Y, rng)
    if person is not None:
        # With an object the person stands left of it, so both stay visible.
        cx = rng.uniform(0.28, 0.42) if kind else rng.uniform(0.36, 0.64)
        _paint_person(canvas, X, Y, spec["people"][person], cx, rng.uniform(0.0, 0.12), rng.uniform(0.88, 1.08), rng)
    if kind is not None:
        if person is not None:
            x, y, r = rng.uniform(0.72, 0.8), rng.uniform(0.62, 0.76), rng.uniform(0.16, 0.2)
        else:
            x, y, r = rng.uniform(0.38, 0.62), rng.uniform(0.38, 0.62), rng.uniform(0.26, 0.34)
        OBJECT_PAINTERS[kind](canvas, X, Y, x, y, r, rng)
    # Averaging the 2x2 blocks anti-aliases every edge (strided sums are much faster than reshape+mean).
    small = (canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2]) * 0.25
    small += rng.normal(0.0, 6.0, small.shape).astype(np.float32)
    return np.clip(small, 0, 255).round().astype(np.uint8)


def _jitter(rgb: Sequence[float], rng: np.random.Generator, amount: float = 14.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _ellipse(X, Y, cx, cy, rx, ry, power: float = 2.0) -> np.ndarray:
    return (np.abs((X - cx) / rx) ** power + np.abs((Y - cy) / ry) ** power) < 1.0


def _rect(X, Y, x0, y0, x1, y1) -> np.ndarray:
    return (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)


def _segment(X, Y, x0, y0, x1, y1, width) -> np.ndarray:
    """Pixels within ``width / 2`` of the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return (X - x0 - t * dx) ** 2 + (Y - y0 - t * dy) ** 2 < (width / 2) ** 2


def _polygon(X, Y, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Inside of a convex polygon given counter-clockwise in image coordinates (y down)."""
    inside = np.ones(X.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        inside &= (x1 - x0) * (Y - y0) - (y1 - y0) * (X - x0) <= 0
    return inside


# --- people ---------------------------------------------------------------------------------------


def _paint_person(canvas, X, Y, attrs: dict[str, str], cx: float, top: float, scale: float,
                  rng: np.random.Generator) -> None:
    """A head-and-shoulders portrait; ``top`` is where the tallest hair or hat may start."""
    r = 0.19 * scale
    hx, hy = cx, top + 1.7 * r
    skin = _jitter(ATTRIBUTES["skin"][attrs["skin"]], rng, 10)
    hair = _jitter(ATTRIBUTES["hair_colour"][attrs["hair_colour"]], rng, 10)
    shirt = _jitter(ATTRIBUTES["shirt"][attrs["shirt"]], rng, 12)
    rx, ry, power = {"round": (1.05, 1.0, 2.0), "oval": (0.72, 1.15, 2.0), "square": (1.0, 1.0, 6.0)}[attrs["face"]]
    rx, ry = rx * r, ry * r
    style = attrs["hair_style"]

    # Back to front: hair behind the head, shoulders, neck, face, hair on top, accessories.
    if style == "long":
        canvas[_rect(X, Y, hx - 1.18 * rx, hy - 0.3 * ry, hx + 1.18 * rx, hy + 1.55 * r)] = hair
    elif style == "afro":
        canvas[_ellipse(X, Y, hx, hy - 0.25 * r, 1.5 * r, 1.35 * r)] = hair
    shoulders_y = hy + 1.75 * r
    torso = _ellipse(X, Y, cx, shoulders_y + 0.3 * r, 1.75 * r, 0.75 * r) | _rect(
        X, Y, cx - 1.75 * r, shoulders_y + 0.3 * r, cx + 1.75 * r, 2.0)
    canvas[torso] = shirt
    canvas[_rect(X, Y, hx - 0.33 * r, hy, hx + 0.33 * r, shoulders_y)] = skin * 0.9
    face = _ellipse(X, Y, hx, hy, rx, ry, power)
    canvas[face] = skin
    if style in ("short", "long", "bun"):
        cap = _ellipse(X, Y, hx, hy - 0.06 * r, rx * 1.1, ry * 1.1, power) & (Y < hy - 0.38 * ry)
        canvas[cap] = hair
    if style == "bun":
        canvas[_ellipse(X, Y, hx, hy - ry - 0.38 * r, 0.58 * r, 0.48 * r)] = hair
    eye_y, eye_dx = hy - 0.02 * r, 0.4 * rx
    accessory = attrs["accessory"]
    if accessory == "beard":
        canvas[face & (Y > hy + 0.3 * ry)] = hair
    for side in (-1, 1):
        canvas[_ellipse(X, Y, hx + side * eye_dx, eye_y, 0.13 * r, 0.13 * r)] = EYE_RGB
    if accessory == "glasses":
        for side in (-1, 1):
            d2 = (X - hx - side * eye_dx) ** 2 + (Y - eye_y) ** 2
            canvas[(d2 < (0.34 * r) ** 2) & (d2 > (0.2 * r) ** 2)] = EYE_RGB
        canvas[_rect(X, Y, hx - eye_dx + 0.3 * r, eye_y - 0.05 * r, hx + eye_dx - 0.3 * r, eye_y + 0.05 * r)] = EYE_RGB
    elif accessory == "hat":
        brim_y = hy - 0.62 * ry
        canvas[_rect(X, Y, hx - 1.45 * rx, brim_y - 0.12 * r, hx + 1.45 * rx, brim_y + 0.12 * r)] = HAT_RGB
        canvas[_rect(X, Y, hx - 0.85 * rx, brim_y - 0.95 * r, hx + 0.85 * rx, brim_y)] = HAT_RGB
    elif accessory != "beard":
        canvas[_rect(X, Y, hx - 0.25 * rx, hy + 0.5 * ry, hx + 0.25 * rx, hy + 0.6 * ry)] = MOUTH_RGB


# --- objects: each kind has its own shape, colours and pattern -------------------------------------


def _teapot(canvas, X, Y, x, y, r, rng):
    body = _jitter((150, 110, 210), rng)
    canvas[_ellipse(X, Y, x + 0.75 * r, y - 0.35 * r, 0.2 * r, 0.2 * r) | _segment(X, Y, x + 0.5 * r, y, x + 0.95 * r, y - 0.5 * r, 0.18 * r)] = body
    ring = (X - x + 0.75 * r) ** 2 + (Y - y) ** 2
    canvas[(ring < (0.35 * r) ** 2) & (ring > (0.2 * r) ** 2)] = body * 0.7
    canvas[_ellipse(X, Y, x, y, 0.62 * r, 0.48 * r)] = body
    canvas[_ellipse(X, Y, x, y - 0.55 * r, 0.15 * r, 0.12 * r)] = body * 0.7
    canvas[_rect(X, Y, x - 0.6 * r, y - 0.05 * r, x + 0.6 * r, y + 0.08 * r)] = (245, 240, 220)


def _umbrella(canvas, X, Y, x, y, r, rng):
    canopy = _ellipse(X, Y, x, y, r, 0.75 * r) & (Y < y)
    stripes = (np.floor(np.arctan2(Y - y, X - x) / (np.pi / 6)) % 2).astype(bool)
    canvas[canopy & stripes] = _jitter((30, 60, 200), rng)
    canvas[canopy & ~stripes] = _jitter((245, 245, 240), rng, 8)
    canvas[_rect(X, Y, x - 0.05 * r, y, x + 0.05 * r, y + 0.85 * r)] = (60, 40, 30)
    hook = (X - x + 0.15 * r) ** 2 + (Y - y - 0.85 * r) ** 2
    canvas[(hook < (0.2 * r) ** 2) & (hook > (0.1 * r) ** 2) & (Y > y + 0.85 * r)] = (60, 40, 30)


def _clock(canvas, X, Y, x, y, r, rng):
    d2 = (X - x) ** 2 + (Y - y) ** 2
    canvas[d2 < (0.8 * r) ** 2] = _jitter((30, 30, 40), rng, 8)
    canvas[d2 < (0.68 * r) ** 2] = _jitter((250, 250, 240), rng, 5)
    angle = rng.uniform(0, 2 * np.pi)
    canvas[_segment(X, Y, x, y, x + 0.5 * r * np.cos(angle), y + 0.5 * r * np.sin(angle), 0.1 * r)] = (30, 30, 40)
    canvas[_segment(X, Y, x, y, x, y - 0.4 * r, 0.12 * r)] = (200, 30, 30)


def _cactus(canvas, X, Y, x, y, r, rng):
    green = _jitter((40, 140, 60), rng)
    canvas[_rect(X, Y, x - 0.4 * r, y + 0.55 * r, x + 0.4 * r, y + 0.95 * r)] = _jitter((190, 100, 60), rng)
    canvas[_ellipse(X, Y, x, y - 0.1 * r, 0.2 * r, 0.75 * r)] = green
    canvas[_rect(X, Y, x - 0.55 * r, y - 0.05 * r, x, y + 0.08 * r) | _ellipse(X, Y, x - 0.55 * r, y - 0.25 * r, 0.1 * r, 0.3 * r)] = green
    canvas[_rect(X, Y, x, y + 0.1 * r, x + 0.55 * r, y + 0.22 * r) | _ellipse(X, Y, x + 0.55 * r, y - 0.05 * r, 0.1 * r, 0.3 * r)] = green


def _kite(canvas, X, Y, x, y, r, rng):
    diamond = _polygon(X, Y, [(x, y - r), (x - 0.6 * r, y - 0.1 * r), (x, y + 0.7 * r), (x + 0.6 * r, y - 0.1 * r)])
    upper = (X - x) * (Y - y + 0.1 * r) > 0
    canvas[diamond & upper] = _jitter((250, 210, 30), rng)
    canvas[diamond & ~upper] = _jitter((30, 90, 220), rng)
    canvas[_segment(X, Y, x, y + 0.7 * r, x + 0.3 * r, y + r, 0.06 * r)] = (40, 40, 40)


def _balloon(canvas, X, Y, x, y, r, rng):
    colour = _jitter((230, 40, 90), rng)
    canvas[_segment(X, Y, x, y + 0.5 * r, x - 0.15 * r, y + r, 0.06 * r)] = (70, 70, 70)
    canvas[_ellipse(X, Y, x, y - 0.2 * r, 0.55 * r, 0.7 * r)] = colour
    canvas[_ellipse(X, Y, x - 0.2 * r, y - 0.45 * r, 0.12 * r, 0.16 * r)] = np.minimum(colour + 90, 255)


def _lamp(canvas, X, Y, x, y, r, rng):
    canvas[_rect(X, Y, x - 0.05 * r, y - 0.2 * r, x + 0.05 * r, y + 0.8 * r)] = (90, 90, 90)
    canvas[_rect(X, Y, x - 0.45 * r, y + 0.8 * r, x + 0.45 * r, y + 0.95 * r)] = (60, 60, 60)
    shade = _polygon(X, Y, [(x - 0.3 * r, y - 0.8 * r), (x - 0.65 * r, y - 0.15 * r), (x + 0.65 * r, y - 0.15 * r), (x + 0.3 * r, y - 0.8 * r)])
    canvas[shade] = _jitter((250, 230, 120), rng)


def _mushroom(canvas, X, Y, x, y, r, rng):
    canvas[_rect(X, Y, x - 0.2 * r, y - 0.1 * r, x + 0.2 * r, y + 0.75 * r)] = _jitter((240, 225, 195), rng, 8)
    cap = _ellipse(X, Y, x, y, 0.85 * r, 0.7 * r) & (Y < y)
    canvas[cap] = _jitter((210, 30, 30), rng)
    for dx, dy in ((-0.4, -0.2), (0.05, -0.5), (0.45, -0.25)):
        canvas[cap & _ellipse(X, Y, x + dx * r, y + dy * r, 0.12 * r, 0.1 * r)] = (250, 250, 250)


def _donut(canvas, X, Y, x, y, r, rng):
    d2 = ((X - x) ** 2 + ((Y - y) / 0.85) ** 2) / r**2
    canvas[(d2 < 0.6) & (d2 > 0.06)] = _jitter((200, 140, 70), rng)
    icing = (d2 < 0.45) & (d2 > 0.1)
    canvas[icing] = _jitter((245, 140, 190), rng)
    sprinkles = icing & (np.sin(X * 97.0) * np.sin(Y * 83.0) > 0.8)
    canvas[sprinkles] = (60, 180, 230)


def _traffic_cone(canvas, X, Y, x, y, r, rng):
    cone = _polygon(X, Y, [(x, y - r), (x - 0.55 * r, y + 0.7 * r), (x + 0.55 * r, y + 0.7 * r)])
    canvas[cone] = _jitter((250, 110, 20), rng)
    canvas[cone & (Y > y - 0.05 * r) & (Y < y + 0.2 * r)] = (250, 250, 250)
    canvas[_rect(X, Y, x - 0.75 * r, y + 0.7 * r, x + 0.75 * r, y + 0.85 * r)] = (250, 110, 20)


def _starfish(canvas, X, Y, x, y, r, rng):
    angle = np.arctan2(Y - y, X - x) + rng.uniform(0, 2 * np.pi / 5)
    radius = np.sqrt((X - x) ** 2 + (Y - y) ** 2) / r
    star = radius < 0.4 + 0.5 * np.abs(np.cos(2.5 * angle)) ** 3
    canvas[star] = _jitter((240, 150, 60), rng)
    canvas[star & (np.sin(X * 120.0) * np.sin(Y * 120.0) > 0.7)] = (170, 70, 30)


def _bell(canvas, X, Y, x, y, r, rng):
    gold = _jitter((220, 180, 40), rng)
    canvas[_ellipse(X, Y, x, y - 0.2 * r, 0.45 * r, 0.55 * r) & (Y < y + 0.1 * r)] = gold
    canvas[_polygon(X, Y, [(x - 0.45 * r, y - 0.1 * r), (x - 0.75 * r, y + 0.6 * r), (x + 0.75 * r, y + 0.6 * r), (x + 0.45 * r, y - 0.1 * r)])] = gold
    canvas[_ellipse(X, Y, x, y + 0.7 * r, 0.15 * r, 0.15 * r)] = (120, 90, 30)


def _anchor(canvas, X, Y, x, y, r, rng):
    steel = _jitter((40, 40, 45), rng)
    canvas[_rect(X, Y, x - 0.08 * r, y - 0.7 * r, x + 0.08 * r, y + 0.7 * r)] = steel
    canvas[_rect(X, Y, x - 0.4 * r, y - 0.45 * r, x + 0.4 * r, y - 0.32 * r)] = steel
    ring = (X - x) ** 2 + (Y - y + 0.82 * r) ** 2
    canvas[(ring < (0.2 * r) ** 2) & (ring > (0.1 * r) ** 2)] = steel
    arc = (X - x) ** 2 + (Y - y - 0.1 * r) ** 2
    canvas[(arc < (0.7 * r) ** 2) & (arc > (0.55 * r) ** 2) & (Y > y + 0.1 * r)] = steel


OBJECT_PAINTERS: dict[str, Callable] = {
    "teapot": _teapot, "umbrella": _umbrella, "clock": _clock, "cactus": _cactus, "kite": _kite,
    "balloon": _balloon, "lamp": _lamp, "mushroom": _mushroom, "donut": _donut, "traffic cone": _traffic_cone,
    "starfish": _starfish, "bell": _bell, "anchor": _anchor,
}


# --- scenes ---------------------------------------------------------------------------------------


def _sky_and_ground(canvas, Y, sky, ground, horizon) -> None:
    canvas[:] = np.where((Y < horizon)[..., None], sky, ground)


def _beach(canvas, X, Y, rng):
    h = rng.uniform(0.4, 0.6)
    _sky_and_ground(canvas, Y, _jitter((140, 200, 245), rng), _jitter((235, 215, 160), rng), h)
    canvas[(Y >= h) & (Y < h + 0.08)] = _jitter((40, 120, 190), rng)


def _forest(canvas, X, Y, rng):
    canvas[:] = _jitter((40, 95, 50), rng)
    trunks = np.sin(X * rng.uniform(25, 40) + rng.uniform(0, 6)) > 0.75
    canvas[trunks] = _jitter((90, 60, 35), rng)
    canvas[np.sin(X * 31.0 + Y * 17.0) * np.sin(Y * 23.0 - X * 11.0) > 0.6] = _jitter((70, 140, 70), rng)


def _city(canvas, X, Y, rng):
    canvas[:] = _jitter((150, 170, 190), rng)
    heights = rng.uniform(0.2, 0.6, 6)
    column = np.minimum((X * 6).astype(int), 5)
    building = Y > heights[column]
    canvas[building] = _jitter((95, 95, 105), rng)
    windows = building & (np.sin(X * 90.0) > 0.3) & (np.sin(Y * 90.0) > 0.3)
    canvas[windows] = _jitter((235, 220, 140), rng)


def _snow(canvas, X, Y, rng):
    _sky_and_ground(canvas, Y, _jitter((205, 215, 230), rng), _jitter((245, 248, 252), rng, 5), rng.uniform(0.45, 0.65))
    flakes = rng.random(X.shape) < 0.03
    canvas[flakes] = (255, 255, 255)


def _park(canvas, X, Y, rng):
    _sky_and_ground(canvas, Y, _jitter((150, 205, 240), rng), _jitter((90, 170, 70), rng), rng.uniform(0.45, 0.65))
    tx = rng.choice([rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.95)])
    canvas[_ellipse(X, Y, tx, 0.3, 0.12, 0.15)] = _jitter((40, 120, 45), rng)


def _studio(canvas, X, Y, rng):
    base = rng.uniform(60, 230, 3).astype(np.float32)
    shade = 1.0 - 0.35 * ((X - 0.5) ** 2 + (Y - 0.5) ** 2)
    canvas[:] = base * shade[..., None]


def _night(canvas, X, Y, rng):
    canvas[:] = _jitter((20, 25, 60), rng, 10)
    canvas[rng.random(X.shape) < 0.02] = (250, 250, 210)
    canvas[_ellipse(X, Y, rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2), 0.07, 0.07)] = (240, 240, 200)


def _room(canvas, X, Y, rng):
    _sky_and_ground(canvas, Y, _jitter((225, 205, 170), rng), _jitter((140, 95, 60), rng), rng.uniform(0.6, 0.75))
    canvas[(np.sin(X * 60.0) > 0.9) & (Y < 0.6)] = _jitter((205, 185, 150), rng)


SCENE_PAINTERS: dict[str, Callable] = {
    "beach": _beach, "forest": _forest, "city": _city, "snow": _snow, "park": _park, "studio": _studio,
    "night": _night, "room": _room,
}


if __name__ == "__main__":
    raise SystemExit(main())
