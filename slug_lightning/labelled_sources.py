"""Reading a labelled set's images and labels (:class:`~slug_lightning.labelled_sets.LabelledSet`): image
folders, a folder with a labels file, and Hugging Face datasets.

Image folders follow the ``imagefolder`` layout, ``root/<class>/*.jpg`` (:func:`scan_image_folder`). Folder
names become class names with ``_`` read as a space (``Elon_Musk`` → ``Elon Musk``). A root whose folders are
all WordNet synset ids (``n01440764``, the ImageNet layout) is classified against OpenCLIP's ImageNet class
names: class index = position of the synset in the sorted list of the 1000 ImageNet-1k synsets, which
``timm`` (a dependency of ``open_clip``) ships (:func:`imagenet_wnids`); ``synsets_file`` overrides that list.

CelebA as it ships is one flat folder of images (``img_align_celeba/000001.jpg``); ``labels_file`` names the
person in each: two header lines, then ``<image file> <Name_With_Underscores>`` per line (the layout of the
research code's ``list_identity_celeba.txt``; :func:`scan_labels_file`).

A Hugging Face dataset is read offline only (:func:`load_hf_split`), its class names and labels without
decoding an image (:func:`hf_class_labels`); ``datasets`` is the optional extra ``hf-datasets``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slug_lightning.extras import require
from slug_lightning.labelled_sets import LabelledSet, composed, folder_class_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_WNID = re.compile(r"n\d{8}")
# Lines of a labels_file before its entries (a count and column names in CelebA's list files).
LABELS_FILE_HEADER_LINES = 2


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
        raise ValueError(
            f"Synsets file {str(path)!r}: lines must start with a synset id like n01440764, got {bad[:5]}."
        )
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"Synsets file {str(path)!r} lists a synset more than once.")
    return wnids


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


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
        raise ValueError(
            f"Labelled set {spec.name!r}: {str(root)!r} holds no class folders (expected root/<class>/*.jpg)."
        )
    if all(_WNID.fullmatch(f) for f in folders):
        class_names, folder_labels = _synset_labels(spec, folders)
    else:
        class_names, folder_labels = _named_labels(spec, folders)
    paths, labels = [], []
    for folder in folders:
        images = _images_in(root / folder)
        if not images:
            raise ValueError(
                f"Labelled set {spec.name!r}: class folder {str(root / folder)!r} holds no "
                f"images ({', '.join(IMAGE_EXTENSIONS)})."
            )
        paths += images
        labels += [folder_labels[folder]] * len(images)
    return class_names, paths, labels


def _named_labels(spec: LabelledSet, folders: list[str], what: str = "folder") -> tuple[list[str], dict[str, int]]:
    """Class names and the label of each folder (or, ``what="name"``, each name of a labels_file)."""
    names = {f: folder_class_name(f) for f in folders}
    uses = Counter(names.values())
    clashes = [f for f in folders if uses[names[f]] > 1]
    if clashes:
        raise ValueError(
            f"Labelled set {spec.name!r}: {what}s {clashes} map to the same class name "
            "(underscores are read as spaces)."
        )
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
        source = f"folders of {spec.root!r}" if what == "folder" else f"names of labels_file {spec.labels_file!r}"
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
        raise ValueError(
            f"Labelled set {spec.name!r}: synsets_file {spec.synsets_file!r} lists "
            f"{len(wnids)} synsets; give class_names for them (OpenCLIP's names cover the "
            "1000 of ImageNet-1k)."
        )
    if len(class_names) != len(wnids):
        raise ValueError(
            f"Labelled set {spec.name!r}: {len(class_names)} class names for {len(wnids)} "
            f"synsets (synsets_file={spec.synsets_file!r}); they pair up by position."
        )
    position = {wnid: i for i, wnid in enumerate(wnids)}
    unknown = [f for f in folders if f not in position]
    if unknown:
        raise ValueError(
            f"Labelled set {spec.name!r}: synset folders {unknown[:10]} of {spec.root!r} are "
            f"not in the synset list (synsets_file={spec.synsets_file!r})."
        )
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
            raise ValueError(
                f"{where}: line {number} {line!r} is an entry, but the first "
                f"{LABELS_FILE_HEADER_LINES} lines are headers; expected {expected}."
            )
    entries, seen = [], set()
    for number, line in enumerate(lines[LABELS_FILE_HEADER_LINES:], start=LABELS_FILE_HEADER_LINES + 1):
        if not line.strip():
            continue
        tokens = line.split()
        if len(tokens) != 2:
            raise ValueError(
                f"{where}: line {number} {line!r} is not '<image file> <Name_With_Underscores>' (expected {expected})."
            )
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
        raise FileNotFoundError(
            f"Labelled set {spec.name!r}: {len(missing)} image(s) of labels_file "
            f"{spec.labels_file!r} are not in {str(root)!r}, e.g. {missing[:5]}."
        )
    class_names, name_labels = _named_labels(spec, sorted({name for _, name in entries}), what="name")
    return class_names, [root / image for image, _ in entries], [name_labels[name] for _, name in entries]


def load_hf_split(spec: LabelledSet) -> Any:
    """Open the split of a Hugging Face dataset without touching the network.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        FileNotFoundError: If the dataset or split cannot be found locally.
        ValueError: If a hub id is given while ``HF_HUB_OFFLINE`` is not set.
    """
    datasets = require("datasets", "hf-datasets")

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
        raise ValueError(
            f"{where} is not a local directory, so it is read as a hub id from the local cache; "
            "set HF_HUB_OFFLINE=1 so that nothing is downloaded."
        )
    return _offline(f"{where} (split {spec.split!r})", datasets.load_dataset, source, split=spec.split)


def _offline(where: str, load: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a ``datasets`` loader, turning its many failure types into one message that names the set."""
    datasets = require("datasets", "hf-datasets")

    try:
        return load(*args, **kwargs)
    except (OSError, datasets.exceptions.DatasetsError) as error:
        raise FileNotFoundError(f"{where} could not be loaded offline: {type(error).__name__}: {error}") from error


def hf_class_labels(dataset: Any, spec: LabelledSet) -> tuple[list[str], list[int]]:
    """Class names and per-row labels of a Hugging Face dataset, read without decoding images.

    Raises:
        ValueError: If a column is missing, the image column is not an ``Image`` feature, or labels and
            class names disagree.
    """
    datasets = require("datasets", "hf-datasets")

    for column in (spec.image_column, spec.label_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"Labelled set {spec.name!r}: no column {column!r}; columns: "
                f"{dataset.column_names}. Set image_column/label_column."
            )
    if not isinstance(dataset.features[spec.image_column], datasets.Image):
        raise ValueError(
            f"Labelled set {spec.name!r}: column {spec.image_column!r} is "
            f"{dataset.features[spec.image_column]}, expected an Image feature "
            "(cast it with dataset.cast_column(name, datasets.Image()))."
        )
    feature = dataset.features[spec.label_column]
    values = list(dataset[spec.label_column])
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(spec.class_names or map(composed, feature.names))
        if len(class_names) != feature.num_classes:
            raise ValueError(
                f"Labelled set {spec.name!r}: {len(class_names)} class_names for a ClassLabel "
                f"of {feature.num_classes} classes."
            )
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
        raise ValueError(
            f"Labelled set {spec.name!r}: column {spec.label_column!r} is {feature}, not a "
            "ClassLabel; give class_names in label order."
        )
    out_of_range = sorted({v for v in values if not 0 <= v < len(spec.class_names)})
    if out_of_range:
        raise ValueError(
            f"Labelled set {spec.name!r}: labels {out_of_range[:10]} are outside "
            f"[0, {len(spec.class_names)}) of class_names."
        )
    return list(spec.class_names), values
