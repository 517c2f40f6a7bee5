"""Labelled image sets for zero-shot evaluation (METHOD §8): what a set is and which of its classes count.

A :class:`LabelledSet` describes one set: where its images are (an image folder, a folder with a labels file,
or a Hugging Face dataset; :mod:`slug_lightning.labelled_sources` reads them), its class names, its prompt
templates and an optional seeded subset. Every set may be narrowed to the classes that compete (``classes``)
or to the classes whose images are evaluated (``image_classes``), given as names or as a text file of them
(:func:`read_class_list`; :func:`select_classes` applies both), and averages its accuracy over images
(``micro``) or over classes (``macro``). :class:`~slug_lightning.datamodules.labelled.LabelledImages` reads a
set as ``(image tensor, label)`` pairs.

Example::

    >>> spec = LabelledSet("identities", root="eval/identities", fraction=0.5)  # doctest: +SKIP
    >>> celeba = LabelledSet("celeba", root="celeba/img_align_celeba",
    ...                      labels_file="celeba/list_identity_celeba.txt",
    ...                      image_classes="package:frequent_celebs.txt", averaging="macro")  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from slug_lightning.errors import ConfigError
from slug_lightning.extras import install_hint, installed

AVERAGING = ("micro", "macro")
# `package:<file>` in `classes`/`image_classes` names a list shipped in slug_lightning/data/.
PACKAGED_LIST = "package:"


@dataclass
class LabelledSet:
    """One labelled evaluation set.

    Args:
        name: The set's name in results and logs, e.g. ``"identities"`` or ``"imagenet"``.
        root: An image folder, ``root/<class>/*.{jpg,jpeg,png,webp,bmp}``; with ``labels_file``, the folder
            holding the images it lists. Exactly one of ``root`` and ``hf_dataset`` is given.
        hf_dataset: A Hugging Face dataset: a directory written by ``save_to_disk``, a local data directory
            ``datasets.load_dataset`` reads (e.g. an ``imagefolder`` or parquet files), or a hub id already
            in the local cache (read only with ``HF_HUB_OFFLINE=1``, so the network is never tried). Needs the
            ``hf-datasets`` extra (``datasets``).
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
                "root",
                self.root,
            )
        if self.hf_dataset is not None and not installed("datasets"):
            raise ConfigError(
                f"Labelled set {self.name!r}: hf_dataset needs the optional package 'datasets'; install it with "
                f"{install_hint('hf-datasets')}.",
                "hf_dataset",
                self.hf_dataset,
            )
        if self.labels_file is not None and self.root is None:
            raise ConfigError(
                f"Labelled set {self.name!r}: labels_file {self.labels_file!r} needs root, the "
                "folder holding the images it lists (e.g. celeba/img_align_celeba).",
                "labels_file",
                self.labels_file,
            )
        if self.averaging not in AVERAGING:
            raise ConfigError(
                f"Labelled set {self.name!r}: averaging must be one of {list(AVERAGING)}, got {self.averaging!r}.",
                "averaging",
                self.averaging,
            )
        for option in ("classes", "image_classes"):
            value = getattr(self, option)
            if isinstance(value, str):
                if not value.strip():
                    raise ConfigError(
                        f"Labelled set {self.name!r}: {option} must be a list of class names "
                        f"or a text file of them, got {value!r}.",
                        option,
                        value,
                    )
            elif value is not None:
                if not value or not all(isinstance(name, str) and name.strip() for name in value):
                    raise ConfigError(
                        f"Labelled set {self.name!r}: {option} must be a non-empty list of "
                        f"class names or a text file of them, got {value!r}.",
                        option,
                        value,
                    )
                setattr(self, option, list(value))
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(
                f"Labelled set {self.name!r}: fraction must be in (0, 1], got {self.fraction!r}.",
                "fraction",
                self.fraction,
            )
        if isinstance(self.templates, str) or not self.templates:
            raise ConfigError(
                f"Labelled set {self.name!r}: templates must be a non-empty list of format "
                f"strings, got {self.templates!r}.",
                "templates",
                self.templates,
            )
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
                raise ConfigError(
                    f"Labelled set {self.name!r}: duplicate class names {duplicates}.", "class_names", self.class_names
                )


def check_set_names(sets: Sequence[LabelledSet]) -> None:
    """Refuse two sets of one name: results, forget sets and caches are keyed by name, so one would vanish.

    Raises:
        ConfigError: Naming the repeated names and their positions.
    """
    names = [spec.name for spec in sets]
    repeated = {name: [i for i, n in enumerate(names) if n == name] for name in names if names.count(name) > 1}
    if repeated:
        shown = "; ".join(f"{name!r} is the name of sets {positions}" for name, positions in repeated.items())
        raise ConfigError(
            f"Evaluation set names must be unique, but {shown} (counting from 0): give each set its own name.",
            "sets",
            list(sets),
        )


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
        raise ValueError(
            f"{where} {template!r} must contain exactly one '{{}}' (found fields {fields}); "
            "write literal braces as '{{' and '}}'."
        )


def folder_class_name(folder: str) -> str:
    """The class name of an image folder: underscores read as spaces (``Elon_Musk`` → ``Elon Musk``), in
    composed Unicode (:func:`composed`)."""
    return composed(folder.replace("_", " "))


def composed(name: str) -> str:
    """A class name in composed Unicode (NFC), as concept names are kept: file systems such as macOS's write
    "José" decomposed ("e" and a combining accent), which would otherwise differ from the config's "José"."""
    return unicodedata.normalize("NFC", name)


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
            path = folder.joinpath(value[len(PACKAGED_LIST) :])
            if not path.is_file():
                shipped = sorted(
                    f"{PACKAGED_LIST}{item.name}"
                    for item in folder.iterdir()
                    if item.is_file() and item.name.endswith(".txt")
                )
                raise FileNotFoundError(
                    f"{where} {value!r} is not a list shipped with the package; shipped: {shipped}."
                )
        else:
            path = Path(value).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"{where} file {value!r} does not exist (give a list of names, a "
                    f"text file with one name per line, or {PACKAGED_LIST}<file>)."
                )
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise ValueError(f"{where} file {value!r} holds no name.")
    else:
        names = [name.strip() for name in value]
    repeated = sorted(name for name, count in Counter(map(folder_class_name, names)).items() if count > 1)
    if repeated:
        raise ValueError(f"{where} names {repeated[:10]} more than once (underscores read as spaces).")
    return names


def _chosen_labels(
    value: Sequence[str] | str,
    set_name: str,
    option: str,
    class_names: Sequence[str],
    labels: Sequence[int] | None = None,
) -> list[int]:
    """The labels (positions in ``class_names``, or ``labels[position]``) of the names an option lists."""
    index = {name: i for i, name in enumerate(class_names)}
    names = read_class_list(value, set_name, option)
    found = {name: index.get(name, index.get(folder_class_name(name))) for name in names}
    unknown = [name for name, label in found.items() if label is None]
    if unknown:
        near = difflib.get_close_matches(folder_class_name(unknown[0]), list(class_names), n=3, cutoff=0.6)
        raise ValueError(
            f"Labelled set {set_name!r}: {option} {unknown[:10]} ({len(unknown)} of "
            f"{len(names)}) are not classes of the set ({len(class_names)} classes); near "
            f"{unknown[0]!r}: {near}."
        )
    return sorted(found.values() if labels is None else (labels[i] for i in found.values()))


def select_classes(
    spec: LabelledSet, class_names: Sequence[str], keep_classes: Sequence[str] = ()
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
            raise ValueError(
                f"Labelled set {spec.name!r}: forget concept(s) {left_out} are classes of the "
                f"set but not among its classes ({len(competing)} listed), so they could not be "
                "classified; add them to classes."
            )
    imaged = set(competing)
    if spec.image_classes is not None:
        imaged = set(
            _chosen_labels(
                spec.image_classes, spec.name, "image_classes", [class_names[i] for i in competing], competing
            )
        )
        imaged |= {index[name] for name in concepts}
    return competing, imaged
