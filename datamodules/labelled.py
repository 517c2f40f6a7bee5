"""Labelled image sets for zero-shot evaluation (METHOD §8): folders, list files and Hugging Face datasets.

A :class:`LabelledSet` describes one set (where its images are, its class names, its prompt templates, an
optional seeded subset); :class:`LabelledImages` reads it as ``(image tensor, label)`` pairs; and
:class:`ZeroShotDataModule` serves every set as a loader sharded across ranks without padding, so per-class
counts summed over ranks are exact.

Image folders follow the ``imagefolder`` layout, ``root/<class>/*.jpg``. Folder names become class names
with ``_`` read as a space (``Elon_Musk`` → ``Elon Musk``). A root whose folders are all WordNet synset
ids (``n01440764``, the ImageNet layout) is classified against OpenCLIP's ImageNet class names: class index
= position of the synset in the sorted list of the 1000 ImageNet-1k synsets, which ``timm`` (a dependency
of ``open_clip``) ships; ``synsets_file`` overrides that list.

CelebA as it ships is one flat folder of images (``img_align_celeba/000001.jpg``); ``labels_file`` names the
person in each: two header lines, then ``<image file> <Name_With_Underscores>`` per line (the layout of the
research code's ``list_identity_celeba.txt``). Every set may be narrowed to the classes that compete
(``classes``) or to the classes whose images are evaluated (``image_classes``), and averages its accuracy over
images (``micro``) or over classes (``macro``).

Example::

    >>> spec = LabelledSet("identities", root="eval/identities", fraction=0.5)  # doctest: +SKIP
    >>> dataset = LabelledImages(spec, transform=preprocess, keep_classes=["Elon Musk"])  # doctest: +SKIP
    >>> dataset.class_index("Elon Musk")  # doctest: +SKIP
    >>> celeba = LabelledSet("celeba", root="celeba/img_align_celeba",
    ...                      labels_file="celeba/list_identity_celeba.txt",
    ...                      image_classes="package:frequent_celebs.txt", averaging="macro")  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import math
import os
import random
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from typing_extensions import override

from slug_lightning.errors import ConfigError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_WNID = re.compile(r"n\d{8}")
AVERAGING = ("micro", "macro")
# `package:<file>` in `classes`/`image_classes` names a list shipped in slug_lightning/data/.
PACKAGED_LIST = "package:"
# Lines of a labels_file before its entries (a count and column names in CelebA's list files).
LABELS_FILE_HEADER_LINES = 2


@dataclass
class LabelledSet:
    """One labelled evaluation set.

    Args:
        name: The set's name in results and logs, e.g. ``"identities"`` or ``"imagenet"``.
        root: An image folder, ``root/<class>/*.{jpg,jpeg,png,webp,bmp}``; with ``labels_file``, the folder
            holding the images it lists. Exactly one of ``root`` and ``hf_dataset`` is given.
        hf_dataset: A Hugging Face dataset: a directory written by ``save_to_disk``, a local data directory
            ``datasets.load_dataset`` reads (e.g. an ``imagefolder`` or parquet files), or a hub id already
            in the local cache (read only with ``HF_HUB_OFFLINE=1``, so the network is never tried).
        split: The split of a ``hf_dataset`` (ignored for a ``save_to_disk`` directory holding one split).
        class_names: Class names in label order. Default: the sorted folder names (``_`` read as a space),
            the ``ClassLabel`` names of a Hugging Face dataset, or OpenCLIP's ImageNet class names for
            synset folders. For an image folder every folder must match one of them; for synset folders
            they replace OpenCLIP's names, pairing with the synset list by position.
        templates: Prompt format strings, each with exactly one ``{}`` for the class name.
        fraction: Share of each class's images kept, in (0, 1]; seeded by ``seed``.
        seed: Seed of the ``fraction`` subset.
        image_column: The image column of a Hugging Face dataset (an ``Image`` feature).
        label_column: The label column of a Hugging Face dataset (``ClassLabel``, integers or strings).
        allow_missing_classes: Allow names in ``class_names`` without a folder; they stay in the class
            list (and so in the classifier) with no images.
        synsets_file: For synset folders: a file with one synset id per line in class order (the first
            token of each line, so ImageNet's ``LOC_synset_mapping.txt`` works). Default: the 1000
            ImageNet-1k synsets in sorted order.
        labels_file: The images of ``root`` and their classes, CelebA as it ships: two header lines, then
            ``<image file> <Name_With_Underscores>`` per line, the file relative to ``root`` (the research
            code's ``list_identity_celeba.txt`` with ``root`` its ``img_align_celeba``). Names read as folder
            names do (``_`` as a space); images of ``root`` the file does not list are not used.
        classes: The classes that compete: the classifier holds only these, and images of other classes are
            dropped. A list of names or a text file with one name per line (``package:<file>`` for a list
            shipped in ``slug_lightning/data/``); a name matches a class as written or with ``_`` read as a
            space. Forget concepts of the set must be among them. Default: every class.
        image_classes: The classes whose images are evaluated; every class (of ``classes``) still competes.
            Given as ``classes``; the images of forget concepts are always kept. The research code's CelebA
            test accuracy is this: all CelebA identities compete, the images of 100 identities frequent in
            LAION-400M are scored (``package:frequent_celebs.txt``). Default: every class.
        averaging: How test accuracy averages: ``"micro"`` over images (the CLIP convention), ``"macro"``
            over test classes (the mean of each class's top-1/top-5, as the research code's CelebA metric).
    """

    name: str
    root: str | None = None
    hf_dataset: str | None = None
    split: str = "validation"
    class_names: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: ["a photo of {}."])
    fraction: float = 1.0
    seed: int = 0
    image_column: str = "image"
    label_column: str = "label"
    allow_missing_classes: bool = False
    synsets_file: str | None = None
    labels_file: str | None = None
    classes: list[str] | str | None = None
    image_classes: list[str] | str | None = None
    averaging: Literal["micro", "macro"] = "micro"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"A labelled set needs a non-empty name, got {self.name!r}.", "name", self.name)
        if (self.root is None) == (self.hf_dataset is None):
            raise ConfigError(
                f"Labelled set {self.name!r}: give exactly one of root (an image folder) and hf_dataset "
                f"(a Hugging Face dataset), got root={self.root!r}, hf_dataset={self.hf_dataset!r}.",
                "root", self.root)
        if self.labels_file is not None and self.root is None:
            raise ConfigError(f"Labelled set {self.name!r}: labels_file {self.labels_file!r} needs root, the "
                              "folder holding the images it lists (e.g. celeba/img_align_celeba).",
                              "labels_file", self.labels_file)
        if self.averaging not in AVERAGING:
            raise ConfigError(f"Labelled set {self.name!r}: averaging must be one of {list(AVERAGING)}, "
                              f"got {self.averaging!r}.", "averaging", self.averaging)
        for option in ("classes", "image_classes"):
            value = getattr(self, option)
            if isinstance(value, str):
                if not value.strip():
                    raise ConfigError(f"Labelled set {self.name!r}: {option} must be a list of class names "
                                      f"or a text file of them, got {value!r}.", option, value)
            elif value is not None:
                if not value or not all(isinstance(name, str) and name.strip() for name in value):
                    raise ConfigError(f"Labelled set {self.name!r}: {option} must be a non-empty list of "
                                      f"class names or a text file of them, got {value!r}.", option, value)
                setattr(self, option, list(value))
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"Labelled set {self.name!r}: fraction must be in (0, 1], "
                              f"got {self.fraction!r}.", "fraction", self.fraction)
        if isinstance(self.templates, str) or not self.templates:
            raise ConfigError(f"Labelled set {self.name!r}: templates must be a non-empty list of format "
                              f"strings, got {self.templates!r}.", "templates", self.templates)
        self.templates = list(self.templates)
        for template in self.templates:
            try:
                validate_template(template, self.name)
            except ValueError as error:
                raise ConfigError(str(error), "templates", self.templates) from None
        if self.class_names is not None:
            self.class_names = [composed(name) if isinstance(name, str) else name for name in self.class_names]
            duplicates = sorted(n for n, count in Counter(self.class_names).items() if count > 1)
            if duplicates:
                raise ConfigError(f"Labelled set {self.name!r}: duplicate class names {duplicates}.", "class_names",
                                  self.class_names)


def check_set_names(sets: Sequence[LabelledSet]) -> None:
    """Refuse two sets of one name: results, forget sets and caches are keyed by name, so one would vanish.

    Raises:
        ConfigError: Naming the repeated names and their positions.
    """
    names = [spec.name for spec in sets]
    repeated = {name: [i for i, n in enumerate(names) if n == name] for name in names if names.count(name) > 1}
    if repeated:
        shown = "; ".join(f"{name!r} is the name of sets {positions}" for name, positions in repeated.items())
        raise ConfigError(f"Evaluation set names must be unique, but {shown} (counting from 0): give each set its "
                          "own name.", "sets",
                          list(sets))


def validate_template(template: str, set_name: str = "") -> None:
    """Check that ``template`` is a format string with exactly one empty ``{}`` field.

    Raises:
        ValueError: If it is not a string, is malformed, or has no, several or named/indexed fields.
    """
    where = f"Labelled set {set_name!r}: template" if set_name else "Template"
    if not isinstance(template, str):
        raise ValueError(f"{where} {template!r} must be a format string such as 'a photo of {{}}.'.")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"{where} {template!r} is not a valid format string: {error}.") from None
    if fields != [""]:
        raise ValueError(f"{where} {template!r} must contain exactly one '{{}}' (found fields {fields}); "
                         "write literal braces as '{{' and '}}'.")


def folder_class_name(folder: str) -> str:
    """The class name of an image folder: underscores read as spaces (``Elon_Musk`` → ``Elon Musk``), in
    composed Unicode (:func:`composed`)."""
    return composed(folder.replace("_", " "))


def composed(name: str) -> str:
    """A class name in composed Unicode (NFC), as concept names are kept: file systems such as macOS's write
    "José" decomposed ("e" and a combining accent), which would otherwise differ from the config's "José"."""
    return unicodedata.normalize("NFC", name)


def imagenet_wnids(synsets_file: str | os.PathLike | None = None) -> list[str]:
    """ImageNet synset ids in class order.

    Args:
        synsets_file: One synset per line (first token of each line). Default: timm's list of the 1000
            ImageNet-1k synsets, sorted, which is the standard class order and OpenCLIP's.

    Raises:
        FileNotFoundError: If ``synsets_file`` does not exist.
        ValueError: If a line does not start with a synset id, or an id repeats.
    """
    if synsets_file is None:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo("imagenet-1k").label_names())
    path = Path(synsets_file)
    if not path.is_file():
        raise FileNotFoundError(f"Synsets file {str(path)!r} does not exist.")
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    wnids = [tokens[0] for tokens in lines]
    bad = [w for w in wnids if not _WNID.fullmatch(w)]
    if bad:
        raise ValueError(f"Synsets file {str(path)!r}: lines must start with a synset id like n01440764, "
                         f"got {bad[:5]}.")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"Synsets file {str(path)!r} lists a synset more than once.")
    return wnids


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_image_folder(spec: LabelledSet) -> tuple[list[str], list[Path], list[int]]:
    """Class names, image paths and labels of an image-folder set.

    Returns:
        ``(class_names, paths, labels)``; ``labels[i]`` indexes ``class_names`` for ``paths[i]``.

    Raises:
        FileNotFoundError: If ``spec.root`` is not a directory.
        ValueError: If it holds no class folders, a class folder holds no images, two folders map to one
            class name, or folders and ``spec.class_names`` disagree.
    """
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Labelled set {spec.name!r}: image folder {str(root)!r} does not exist.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"Labelled set {spec.name!r}: {str(root)!r} holds no class folders "
                         "(expected root/<class>/*.jpg).")
    if all(_WNID.fullmatch(f) for f in folders):
        class_names, folder_labels = _synset_labels(spec, folders)
    else:
        class_names, folder_labels = _named_labels(spec, folders)
    paths, labels = [], []
    for folder in folders:
        images = _images_in(root / folder)
        if not images:
            raise ValueError(f"Labelled set {spec.name!r}: class folder {str(root / folder)!r} holds no "
                             f"images ({', '.join(IMAGE_EXTENSIONS)}).")
        paths += images
        labels += [folder_labels[folder]] * len(images)
    return class_names, paths, labels


def _named_labels(spec: LabelledSet, folders: list[str],
                  what: str = "folder") -> tuple[list[str], dict[str, int]]:
    """Class names and the label of each folder (or, ``what="name"``, each name of a labels_file)."""
    names = {f: folder_class_name(f) for f in folders}
    uses = Counter(names.values())
    clashes = [f for f in folders if uses[names[f]] > 1]
    if clashes:
        raise ValueError(f"Labelled set {spec.name!r}: {what}s {clashes} map to the same class name "
                         "(underscores are read as spaces).")
    if spec.class_names is None:
        class_names = [names[f] for f in folders]
        return class_names, {f: i for i, f in enumerate(folders)}
    index = {name: i for i, name in enumerate(spec.class_names)}
    # A folder may carry the class name itself or its underscore spelling.
    folder_labels = {f: index.get(f, index.get(names[f])) for f in folders}
    unlisted = [f for f, label in folder_labels.items() if label is None]
    present = {label for label in folder_labels.values() if label is not None}
    missing = [name for i, name in enumerate(spec.class_names) if i not in present]
    if unlisted or (missing and not spec.allow_missing_classes):
        source = (f"folders of {spec.root!r}" if what == "folder"
                  else f"names of labels_file {spec.labels_file!r}")
        raise ValueError(
            f"Labelled set {spec.name!r}: {source} and class_names differ. "
            f"{what.capitalize()}s not in class_names: {unlisted}. Class names without a {what}: {missing}"
            + ("" if unlisted else " (set allow_missing_classes=True to keep them without images).")
        )
    return list(spec.class_names), folder_labels


def _synset_labels(spec: LabelledSet, folders: list[str]) -> tuple[list[str], dict[str, int]]:
    wnids = imagenet_wnids(spec.synsets_file)
    if spec.class_names is not None:
        class_names = list(spec.class_names)
    elif len(wnids) == 1000:
        from open_clip import IMAGENET_CLASSNAMES

        class_names = list(IMAGENET_CLASSNAMES)
    else:
        raise ValueError(f"Labelled set {spec.name!r}: synsets_file {spec.synsets_file!r} lists "
                         f"{len(wnids)} synsets; give class_names for them (OpenCLIP's names cover the "
                         "1000 of ImageNet-1k).")
    if len(class_names) != len(wnids):
        raise ValueError(f"Labelled set {spec.name!r}: {len(class_names)} class names for {len(wnids)} "
                         f"synsets (synsets_file={spec.synsets_file!r}); they pair up by position.")
    position = {wnid: i for i, wnid in enumerate(wnids)}
    unknown = [f for f in folders if f not in position]
    if unknown:
        raise ValueError(f"Labelled set {spec.name!r}: synset folders {unknown[:10]} of {spec.root!r} are "
                         f"not in the synset list (synsets_file={spec.synsets_file!r}).")
    return class_names, {f: position[f] for f in folders}


def read_labels_file(spec: LabelledSet) -> list[tuple[str, str]]:
    """The ``(image file, name)`` entries of ``spec.labels_file``, in file order, names as written.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it has no entry after its two header lines, a header line looks like an entry (the
            file has no header, so its first entries would be lost), an entry is not two fields, or an image
            is listed twice.
    """
    path = Path(spec.labels_file).expanduser()
    where = f"Labelled set {spec.name!r}: labels_file {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist.")
    expected = "two header lines, then '<image file> <Name_With_Underscores>' per line"
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines[:LABELS_FILE_HEADER_LINES], start=1):
        tokens = line.split()
        if len(tokens) == 2 and tokens[0].lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(f"{where}: line {number} {line!r} is an entry, but the first "
                             f"{LABELS_FILE_HEADER_LINES} lines are headers; expected {expected}.")
    entries, seen = [], set()
    for number, line in enumerate(lines[LABELS_FILE_HEADER_LINES:], start=LABELS_FILE_HEADER_LINES + 1):
        if not line.strip():
            continue
        tokens = line.split()
        if len(tokens) != 2:
            raise ValueError(f"{where}: line {number} {line!r} is not '<image file> <Name_With_Underscores>' "
                             f"(expected {expected}).")
        if tokens[0] in seen:
            raise ValueError(f"{where}: line {number} lists image {tokens[0]!r} a second time.")
        seen.add(tokens[0])
        entries.append((tokens[0], tokens[1]))
    if not entries:
        raise ValueError(f"{where} has {len(lines)} line(s) and no entry; expected {expected}.")
    return entries


def scan_labels_file(spec: LabelledSet) -> tuple[list[str], list[Path], list[int]]:
    """Class names, image paths and labels of a set laid out as CelebA ships: ``root`` and ``labels_file``.

    Returns:
        ``(class_names, paths, labels)`` in labels_file order; class names are the sorted names of the file
        (``_`` read as a space) unless ``spec.class_names`` gives them.

    Raises:
        FileNotFoundError: If ``spec.root`` or the labels file does not exist, or an image it lists is not in
            ``root``.
        ValueError: If the labels file is malformed (see :func:`read_labels_file`) or its names and
            ``spec.class_names`` disagree.
    """
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Labelled set {spec.name!r}: image folder {str(root)!r} does not exist.")
    entries = read_labels_file(spec)
    # One directory listing, not a stat per entry: CelebA lists 200k images.
    present = {entry.name for entry in os.scandir(root) if entry.is_file()}
    missing = [image for image, _ in entries if image not in present and not (root / image).is_file()]
    if missing:
        raise FileNotFoundError(f"Labelled set {spec.name!r}: {len(missing)} image(s) of labels_file "
                                f"{spec.labels_file!r} are not in {str(root)!r}, e.g. {missing[:5]}.")
    class_names, name_labels = _named_labels(spec, sorted({name for _, name in entries}), what="name")
    return class_names, [root / image for image, _ in entries], [name_labels[name] for _, name in entries]


def read_class_list(value: Sequence[str] | str, set_name: str, option: str) -> list[str]:
    """The names of a ``classes``/``image_classes`` option: the list itself, or the lines of a text file.

    Args:
        value: Names, a text file with one name per line (blank lines skipped), or ``package:<file>`` for a
            list shipped in ``slug_lightning/data/`` (``package:frequent_celebs.txt``).
        set_name: The set, for messages.
        option: The option, for messages.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it holds no name or a name twice.
    """
    where = f"Labelled set {set_name!r}: {option}"
    if isinstance(value, str):
        if value.startswith(PACKAGED_LIST):
            folder = resources.files("slug_lightning").joinpath("data")
            path = folder.joinpath(value[len(PACKAGED_LIST):])
            if not path.is_file():
                shipped = sorted(f"{PACKAGED_LIST}{item.name}" for item in folder.iterdir() if item.is_file()
                                 and item.name.endswith(".txt"))
                raise FileNotFoundError(f"{where} {value!r} is not a list shipped with the package; "
                                        f"shipped: {shipped}.")
        else:
            path = Path(value).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{where} file {value!r} does not exist (give a list of names, a "
                                        f"text file with one name per line, or {PACKAGED_LIST}<file>).")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{where} file {value!r} holds no name.")
    else:
        names = [name.strip() for name in value]
    repeated = sorted(name for name, count in Counter(map(folder_class_name, names)).items() if count > 1)
    if repeated:
        raise ValueError(f"{where} names {repeated[:10]} more than once (underscores read as spaces).")
    return names


def _chosen_labels(value: Sequence[str] | str, set_name: str, option: str, class_names: Sequence[str],
                   labels: Sequence[int] | None = None) -> list[int]:
    """The labels (positions in ``class_names``, or ``labels[position]``) of the names an option lists."""
    index = {name: i for i, name in enumerate(class_names)}
    names = read_class_list(value, set_name, option)
    found = {name: index.get(name, index.get(folder_class_name(name))) for name in names}
    unknown = [name for name, label in found.items() if label is None]
    if unknown:
        near = difflib.get_close_matches(folder_class_name(unknown[0]), list(class_names), n=3, cutoff=0.6)
        raise ValueError(f"Labelled set {set_name!r}: {option} {unknown[:10]} ({len(unknown)} of "
                         f"{len(names)}) are not classes of the set ({len(class_names)} classes); near "
                         f"{unknown[0]!r}: {near}.")
    return sorted(found.values() if labels is None else (labels[i] for i in found.values()))


def select_classes(spec: LabelledSet, class_names: Sequence[str], keep_classes: Sequence[str] = ()
                   ) -> tuple[list[int], set[int]]:
    """Apply ``spec.classes`` and ``spec.image_classes`` to a set's full class list.

    Args:
        spec: The set.
        class_names: Every class of the set, in label order.
        keep_classes: Forget concepts: classes whose images are always evaluated (names that are not classes
            of the set are ignored).

    Returns:
        ``(competing, imaged)``: the labels of the classes that compete, in label order (they become labels
        0, 1, ... of the narrowed set), and the labels whose images are evaluated.

    Raises:
        FileNotFoundError: If a list file does not exist.
        ValueError: If a listed name is not a class, or a forget concept is not among ``classes``.
    """
    index = {name: i for i, name in enumerate(class_names)}
    concepts = [name for name in keep_classes if name in index]
    competing = list(range(len(class_names)))
    if spec.classes is not None:
        competing = _chosen_labels(spec.classes, spec.name, "classes", class_names)
        left_out = [name for name in concepts if index[name] not in set(competing)]
        if left_out:
            raise ValueError(f"Labelled set {spec.name!r}: forget concept(s) {left_out} are classes of the "
                             f"set but not among its classes ({len(competing)} listed), so they could not be "
                             "classified; add them to classes.")
    imaged = set(competing)
    if spec.image_classes is not None:
        imaged = set(_chosen_labels(spec.image_classes, spec.name, "image_classes",
                                    [class_names[i] for i in competing], competing))
        imaged |= {index[name] for name in concepts}
    return competing, imaged


def load_hf_split(spec: LabelledSet) -> Any:
    """Open the split of a Hugging Face dataset without touching the network.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        FileNotFoundError: If the dataset or split cannot be found locally.
        ValueError: If a hub id is given while ``HF_HUB_OFFLINE`` is not set.
    """
    import datasets

    source = spec.hf_dataset
    path = Path(source).expanduser()
    where = f"Labelled set {spec.name!r}: Hugging Face dataset {source!r}"
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = _offline(where, datasets.load_from_disk, str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded
        if spec.split not in loaded:
            raise FileNotFoundError(f"{where} has no split {spec.split!r}; splits: {sorted(loaded)}.")
        return loaded[spec.split]
    if path.is_dir():
        return _offline(f"{where} (split {spec.split!r})", datasets.load_dataset, str(path), split=spec.split)
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"{where}: no such directory.")
    # Anything else is a hub id; datasets only stays off the network in offline mode.
    if not datasets.config.HF_HUB_OFFLINE:
        raise ValueError(f"{where} is not a local directory, so it is read as a hub id from the local cache; "
                         "set HF_HUB_OFFLINE=1 so that nothing is downloaded.")
    return _offline(f"{where} (split {spec.split!r})", datasets.load_dataset, source, split=spec.split)


def _offline(where: str, load: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a ``datasets`` loader, turning its many failure types into one message that names the set."""
    import datasets

    try:
        return load(*args, **kwargs)
    except (OSError, datasets.exceptions.DatasetsError) as error:
        raise FileNotFoundError(f"{where} could not be loaded offline: "
                                f"{type(error).__name__}: {error}") from error


def hf_class_labels(dataset: Any, spec: LabelledSet) -> tuple[list[str], list[int]]:
    """Class names and per-row labels of a Hugging Face dataset, read without decoding images.

    Raises:
        ValueError: If a column is missing, the image column is not an ``Image`` feature, or labels and
            class names disagree.
    """
    import datasets

    for column in (spec.image_column, spec.label_column):
        if column not in dataset.column_names:
            raise ValueError(f"Labelled set {spec.name!r}: no column {column!r}; columns: "
                             f"{dataset.column_names}. Set image_column/label_column.")
    if not isinstance(dataset.features[spec.image_column], datasets.Image):
        raise ValueError(f"Labelled set {spec.name!r}: column {spec.image_column!r} is "
                         f"{dataset.features[spec.image_column]}, expected an Image feature "
                         "(cast it with dataset.cast_column(name, datasets.Image())).")
    feature = dataset.features[spec.label_column]
    values = list(dataset[spec.label_column])
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(spec.class_names or map(composed, feature.names))
        if len(class_names) != feature.num_classes:
            raise ValueError(f"Labelled set {spec.name!r}: {len(class_names)} class_names for a ClassLabel "
                             f"of {feature.num_classes} classes.")
        return class_names, values
    if values and all(isinstance(v, str) for v in values):
        values = [composed(v) for v in values]
        class_names = list(spec.class_names or sorted(set(values)))
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ValueError(f"Labelled set {spec.name!r}: labels {unknown[:10]} are not in class_names.")
        return class_names, [index[v] for v in values]
    if spec.class_names is None:
        raise ValueError(f"Labelled set {spec.name!r}: column {spec.label_column!r} is {feature}, not a "
                         "ClassLabel; give class_names in label order.")
    out_of_range = sorted({v for v in values if not 0 <= v < len(spec.class_names)})
    if out_of_range:
        raise ValueError(f"Labelled set {spec.name!r}: labels {out_of_range[:10]} are outside "
                         f"[0, {len(spec.class_names)}) of class_names.")
    return list(spec.class_names), values


def stratified_subset(labels: Sequence[int], fraction: float, seed: int,
                      keep: Collection[int] = ()) -> list[int]:
    """A seeded subset of sample indices: ``fraction * n_c`` rounded half up (at least 1) of each class ``c``.

    Each class draws from its own generator, seeded by ``(seed, c)``, so the images picked for one class
    do not depend on which other classes are kept whole.

    Args:
        labels: Each sample's class.
        fraction: Share of each class kept, in (0, 1].
        seed: Seed of the draw.
        keep: Classes whose images are all kept (e.g. forget concepts).

    Returns:
        Sorted sample indices.
    """
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen = []
    for label, indices in by_class.items():
        if label in keep or fraction >= 1.0:
            chosen += indices
            continue
        # Half up, not Python's half-to-even: 5% of ImageNet's 50 images per class is 3, not 2.
        count = max(1, math.floor(fraction * len(indices) + 0.5))
        chosen += random.Random(f"{seed}:{label}").sample(indices, count)
    return sorted(chosen)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of ``range(n)``: ``indices[rank::world_size]``, without padding.

    Every index lands on exactly one rank, so per-rank counts sum to the exact totals.

    Example::

        >>> shard_indices(5, 1, 2)
        [1, 3]

    Raises:
        ValueError: If ``world_size < 1`` or ``rank`` is not in ``[0, world_size)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return list(range(rank, n, world_size))


class LabelledImages(Dataset):
    """``(image, label)`` pairs of one :class:`LabelledSet` after its ``fraction`` subset.

    Args:
        spec: The set.
        transform: Applied to each RGB PIL image (e.g. OpenCLIP's ``preprocess``); None returns the image.
        keep_classes: Class names whose images are all kept by the subset (the forget concepts). Names
            that are not classes of this set are ignored: the set simply has no images of them.

    Attributes:
        class_names: Every class of the set that competes (its ``classes``) in label order, including classes
            without images.
        targets: The label of each sample.

    Raises:
        FileNotFoundError: If the set's folder, labels file or class list does not exist.
        ValueError: If the set is malformed, or a forget concept is a class of it but not among its
            ``classes``.
    """

    def __init__(self, spec: LabelledSet, transform: Callable | None = None,
                 keep_classes: Sequence[str] = ()) -> None:
        self.spec = spec
        self.transform = transform
        self._paths: list[Path] | None = None
        self._hf = None
        if spec.labels_file is not None:
            class_names, self._paths, labels = scan_labels_file(spec)
        elif spec.root is not None:
            class_names, self._paths, labels = scan_image_folder(spec)
        else:
            self._hf = load_hf_split(spec)
            class_names, labels = hf_class_labels(self._hf, spec)
        competing, imaged = select_classes(spec, class_names, keep_classes)
        self.class_names: list[str] = [class_names[i] for i in competing]
        self._index = {name: i for i, name in enumerate(self.class_names)}
        concepts = set(keep_classes)
        keep = {i for i, name in enumerate(class_names) if name in concepts}
        # The subset draws on the full set's labels: a class keeps its images whatever `classes` leaves out.
        rows = [row for row, label in enumerate(labels) if label in imaged]
        picked = stratified_subset([labels[row] for row in rows], spec.fraction, spec.seed, keep)
        self._rows = [rows[i] for i in picked]
        label_of = {old: new for new, old in enumerate(competing)}
        self.targets: list[int] = [label_of[labels[row]] for row in self._rows]

    @property
    def image_files(self) -> list[Path] | None:
        """The image file of each sample, in sample order; None for a Hugging Face dataset."""
        return None if self._paths is None else [self._paths[row] for row in self._rows]

    @property
    def templates(self) -> list[str]:
        """The set's prompt templates."""
        return list(self.spec.templates)

    def class_index(self, name: str) -> int:
        """The label of class ``name`` (exact, case-sensitive).

        Raises:
            KeyError: If ``name`` is not a class of this set; the message lists near matches.
        """
        if name in self._index:
            return self._index[name]
        near = difflib.get_close_matches(name, self.class_names, n=5, cutoff=0.5)
        raise KeyError(f"{name!r} is not a class of labelled set {self.spec.name!r}; near matches: {near} "
                       f"(of {len(self.class_names)} classes).")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self._rows[index]
        if self._paths is not None:
            path = self._paths[row]
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                raise UserError(f"Labelled set {self.spec.name!r}: image {str(path)!r} cannot be decoded ({error}); "
                                "remove or replace it.") from None
        else:
            image = self._hf[row][self.spec.image_column].convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class ShardSampler(DistributedSampler):
    """Yields one rank's :func:`shard_indices` in order: no shuffling, no padding.

    It subclasses ``DistributedSampler`` because that is how Lightning recognises a loader as already
    sharded; any other sampler it would wrap in its own, padding ``DistributedSampler``.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        indices = shard_indices(len(dataset), rank, world_size)
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.indices = indices
        self.num_samples = len(self.indices)
        self.total_size = len(dataset)

    @override
    def __iter__(self):
        return iter(self.indices)

    @override
    def __len__(self) -> int:
        return len(self.indices)


class ZeroShotDataModule(L.LightningDataModule):
    """Labelled sets for zero-shot evaluation, one loader per set, sharded across ranks without padding.

    Args:
        sets: The evaluation sets; names must be unique.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        keep_classes: Class names whose images the ``fraction`` subsets always keep whole in
            ``val/test/predict_dataloader`` (the forget concepts).

    Attributes:
        transform: The image transform. If None at ``setup``, it is taken from the attached
            LightningModule's ``preprocess``.
    """

    def __init__(self, sets: list[LabelledSet], batch_size: int = 256, num_workers: int = 0,
                 keep_classes: Sequence[str] = ()) -> None:
        super().__init__()
        if not sets:
            raise ConfigError("ZeroShotDataModule needs at least one LabelledSet.", "sets", sets)
        check_set_names(sets)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.", "batch_size", batch_size)
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}.", "num_workers", num_workers)
        self.sets = list(sets)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.keep_classes = tuple(keep_classes)
        self.transform: Callable | None = None
        self._datasets: dict[frozenset[str], dict[str, LabelledImages]] = {}

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.transform is not None:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        preprocess = getattr(module, "preprocess", None)
        if preprocess is None:
            raise RuntimeError("ZeroShotDataModule has no transform: set .transform, or attach it to a "
                               "Trainer whose LightningModule has a `preprocess` attribute.")
        self.transform = preprocess

    def datasets(self, keep_classes: Sequence[str] = ()) -> dict[str, LabelledImages]:
        """Every set as a :class:`LabelledImages` by name, in ``sets`` order; built once per ``keep_classes``.

        Args:
            keep_classes: Class names whose images the ``fraction`` subsets keep whole.
        """
        key = frozenset(keep_classes)
        if key not in self._datasets:
            self._datasets[key] = {spec.name: LabelledImages(spec, self.transform, tuple(key))
                                   for spec in self.sets}
        # The transform may be set after a first build (e.g. in setup); cached sets follow it.
        for dataset in self._datasets[key].values():
            dataset.transform = self.transform
        return self._datasets[key]

    def loader(self, name: str, rank: int = 0, world_size: int = 1,
               keep_classes: Sequence[str] = ()) -> DataLoader:
        """This rank's shard of set ``name``: batches of ``(images [b, C, H, W], labels [b])``, in order.

        Args:
            name: The set's name.
            rank: This process's rank.
            world_size: Number of processes; the shards of all ranks partition the set.
            keep_classes: Class names whose images the ``fraction`` subset keeps whole.

        Raises:
            KeyError: If no set is called ``name``.
            RuntimeError: If no transform is set (images could not be batched).
        """
        if self.transform is None:
            raise RuntimeError("ZeroShotDataModule.transform is not set; set it, or call setup() with a "
                               "Trainer first.")
        datasets = self.datasets(keep_classes)
        if name not in datasets:
            raise KeyError(f"No labelled set {name!r}; sets: {list(datasets)}.")
        dataset = datasets[name]
        sampler = ShardSampler(dataset, rank, world_size)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def _loaders(self) -> list[DataLoader]:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return [self.loader(spec.name, rank, world_size, self.keep_classes) for spec in self.sets]

    @override
    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    @override
    def predict_dataloader(self) -> list[DataLoader]:
        return self._loaders()
