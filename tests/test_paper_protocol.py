"""The paper's evaluation protocol as options: CelebA as it ships (an image folder and an image→name list),
``classes``/``image_classes`` on every set layout, macro or micro test accuracy, and the seeded augmentation
of the retain stream."""

from __future__ import annotations

import io
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from open_clip import IMAGENET_CLASSNAMES
from PIL import Image
from torchvision import transforms

from slug_lightning import GradientCollector
from slug_lightning.callbacks import StepSearch
from slug_lightning.concepts import Concept
from slug_lightning.datamodules.labelled import LabelledImages, ZeroShotDataModule, shard_indices
from slug_lightning.datamodules.laion import LaionDataModule, PairStream
from slug_lightning.errors import UserError
from slug_lightning.evaluation import ZeroShotEvaluator, ZeroShotModule, summarize
from slug_lightning.labelled_sets import LabelledSet
from slug_lightning.labelled_sources import imagenet_wnids
from slug_lightning.report import describe_data
from slug_lightning.report_render import _data_lines
from slug_lightning.validation import check_eval_sets
from slug_lightning.zero_shot import accuracy

TO_TENSOR = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
HEADER = ["202599", "image_id identity_name"]  # a count, then column names, as CelebA's list files start
# (image file, name as the list spells it); the people's images interleave, as in CelebA.
ENTRIES = [
    ("000001.jpg", "Elon_Musk"),
    ("000002.jpg", "Ada_Lovelace"),
    ("000003.jpg", "Elon_Musk"),
    ("000004.jpg", "Grace_Hopper"),
    ("000005.jpg", "Ada_Lovelace"),
    ("000006.jpg", "Elon_Musk"),
    ("000007.jpg", "Alan_Turing"),
]


def _jpeg(value: int) -> bytes:
    """A small JPEG whose flat red value identifies it."""
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0] = value
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_celeba(root, entries=ENTRIES, header=HEADER, extra_images=("000999.jpg",)):
    """CelebA's layout: ``root/img_align_celeba/*.jpg`` and ``root/list_identity_celeba.txt``; returns the
    set's (root, labels_file). ``extra_images`` lie in the folder without being listed."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    for number, (file, _) in enumerate(entries):
        (images / file).write_bytes(_jpeg(20 * number))
    for file in extra_images:
        (images / file).write_bytes(_jpeg(255))
    labels = root / "list_identity_celeba.txt"
    labels.write_text("\n".join([*header, *(f"{file} {name}" for file, name in entries)]) + "\n")
    return str(images), str(labels)


@pytest.fixture
def celeba(tmp_path):
    return write_celeba(tmp_path / "celeba")


def celeba_set(celeba, **options) -> LabelledSet:
    root, labels_file = celeba
    return LabelledSet("celeba", root=root, labels_file=labels_file, templates=["{}."], **options)


# ----------------------------------------------------------------------------------------------------------
# CelebA as it ships


def test_celeba_layout_names_and_labels(celeba) -> None:
    dataset = LabelledImages(celeba_set(celeba), TO_TENSOR)
    # Sorted names, underscores read as spaces; samples in list order; unlisted images unused.
    assert dataset.class_names == ["Ada Lovelace", "Alan Turing", "Elon Musk", "Grace Hopper"]
    assert dataset.targets == [2, 0, 2, 3, 0, 2, 1]
    image, label = dataset[3]
    assert label == 3 and image.shape == (3, 8, 8)
    assert abs(image[0, 0, 0].item() - 60 / 255) < 0.03  # the 4th listed image, 000004.jpg


def test_celeba_layout_with_class_names_sets_the_order(celeba) -> None:
    names = ["Elon Musk", "Ada Lovelace", "Grace Hopper", "Alan Turing"]
    dataset = LabelledImages(celeba_set(celeba, class_names=names))
    assert dataset.class_names == names and dataset.targets == [0, 1, 0, 2, 1, 0, 3]
    with pytest.raises(ValueError, match=r"Names not in class_names: \['Alan_Turing'\]"):
        LabelledImages(celeba_set(celeba, class_names=names[:3]))


@pytest.mark.parametrize(
    "header, entries, words",
    [
        (HEADER, [*ENTRIES[:2], ("000003.jpg",)], ["line 5", "'000003.jpg'", "<image file> <Name_With_Underscores>"]),
        (HEADER, [*ENTRIES[:2], ("000003.jpg", "Elon", "Musk")], ["line 5", "Elon Musk'"]),
        (HEADER, [*ENTRIES[:2], ("000001.jpg", "Ada_Lovelace")], ["line 5", "'000001.jpg' a second time"]),
        ([], ENTRIES, ["line 1 '000001.jpg Elon_Musk' is an entry", "two header lines"]),
        (HEADER[:1], ENTRIES, ["line 2 '000001.jpg Elon_Musk' is an entry"]),
        (HEADER, [], ["has 2 line(s) and no entry"]),
    ],
)
def test_malformed_labels_file_is_refused(tmp_path, header, entries, words) -> None:
    root, labels_file = write_celeba(tmp_path / "celeba", [e for e in entries if len(e) == 2])
    with open(labels_file, "w") as file:
        file.write("\n".join([*header, *(" ".join(e) for e in entries)]) + "\n")
    with pytest.raises(ValueError) as error:
        LabelledImages(LabelledSet("celeba", root=root, labels_file=labels_file))
    message = str(error.value)
    assert "'celeba'" in message and labels_file in message
    for word in words:
        assert word in message, (word, message)


def test_labels_file_image_missing_from_root(tmp_path) -> None:
    root, labels_file = write_celeba(tmp_path / "celeba")
    (tmp_path / "celeba" / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) of labels_file .* e\.g\. \['000004\.jpg'\]"):
        LabelledImages(LabelledSet("celeba", root=root, labels_file=labels_file))


def test_labels_file_needs_root() -> None:
    with pytest.raises(ValueError, match="labels_file 'list.txt' needs root"):
        LabelledSet("celeba", hf_dataset="somewhere", labels_file="list.txt")


def test_preflight_refuses_a_bad_list_file_in_one_line(tmp_path, celeba) -> None:
    root, labels_file = celeba
    with open(labels_file, "a") as file:
        file.write("000008.jpg\n")
    objects = _folders(tmp_path / "objects", {"cup": 1})
    search = StepSearch(sets=[LabelledSet("objects", root=objects), celeba_set(celeba)])
    with pytest.raises(UserError) as error:
        check_eval_sets(search, ["Elon Musk"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("search.init_args.sets[1] ('celeba'): ") and "line 10 '000008.jpg'" in message


def test_preflight_finds_the_forget_set_of_a_celeba_layout(celeba) -> None:
    search = StepSearch(sets=[celeba_set(celeba, image_classes=["Ada_Lovelace"])], metric="top1")
    assert check_eval_sets(search, ["Elon Musk"]) == {"Elon Musk": "celeba"}


def test_celeba_layout_through_zero_shot_datamodule_shards_exactly(celeba) -> None:
    spec = celeba_set(celeba, image_classes=["Ada Lovelace", "Grace_Hopper"])
    module = ZeroShotDataModule([spec], batch_size=2)
    module.transform = TO_TENSOR
    dataset = module.datasets(["Elon Musk"])["celeba"]
    seen = []
    for rank in range(2):
        loader = module.loader("celeba", rank, 2, ["Elon Musk"])
        labels = [int(label) for _, batch in loader for label in batch]
        assert labels == [dataset.targets[i] for i in shard_indices(len(dataset), rank, 2)]
        seen += labels
    assert sorted(seen) == sorted(dataset.targets) == [0, 0, 2, 2, 2, 3]


# ----------------------------------------------------------------------------------------------------------
# classes and image_classes, on every layout


def _folders(root, counts: dict[str, int]):
    for number, (folder, count) in enumerate(counts.items()):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (number, i, 0)).save(root / folder / f"{i}.png")
    return str(root)


def _hf(datasets, path, names: list[str], labels: list[int]) -> str:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (4, 4)) for _ in labels], "label": labels}, features=features
    ).save_to_disk(str(path))
    return str(path)


@pytest.fixture
def layouts(tmp_path, monkeypatch):
    """One set per layout, each holding classes a (2 images), b (1), c (3) and d (1): {layout: (spec options,
    the four class names as the set names them)}."""
    counts = [2, 1, 3, 1]
    people = ["Ann Lee", "Bo Chen", "Cy Diaz", "Di Fox"]
    listed = [name.replace(" ", "_") for name, count in zip(people, counts) for _ in range(count)]
    entries = [(f"{i:06d}.jpg", name) for i, name in enumerate(listed)]
    root, labels_file = write_celeba(tmp_path / "celeba", entries, extra_images=())
    found = {
        "image folder": ({"root": _folders(tmp_path / "people", dict(zip(people, counts)))}, people),
        "celeba": ({"root": root, "labels_file": labels_file}, people),
    }
    wnids = imagenet_wnids()
    synsets = [wnids[i] for i in (0, 1, 2, 3)]
    found["synset folders"] = (
        {"root": _folders(tmp_path / "val", dict(zip(synsets, counts)))},
        [IMAGENET_CLASSNAMES[i] for i in (0, 1, 2, 3)],
    )
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    labels = [i for i, count in enumerate(counts) for _ in range(count)]
    found["hf dataset"] = (
        {"hf_dataset": _hf(datasets, tmp_path / "hf", ["a_b", "c", "d", "e"], labels)},
        ["a_b", "c", "d", "e"],
    )
    return found


LAYOUTS = ["image folder", "celeba", "synset folders", "hf dataset"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_classes_narrow_every_layout(layouts, layout, tmp_path) -> None:
    options, names = layouts[layout]
    full = LabelledImages(LabelledSet("s", **options))
    a, b, c, d = (full.class_index(n) for n in names)
    # A list in YAML, or a file with one name per line; underscores may stand for spaces.
    listed = tmp_path / "listed.txt"
    listed.write_text(f"{names[3].replace(' ', '_')}\n\n{names[0]}\n")
    for classes in ([names[0], names[3]], str(listed)):
        narrowed = LabelledImages(LabelledSet("s", classes=classes, **options))
        # Only these compete, in the set's own label order; the other classes' images are gone.
        assert narrowed.class_names == [full.class_names[i] for i in sorted((a, d))]
        kept = sorted(narrowed.class_names[t] for t in narrowed.targets)
        assert kept == sorted([names[0]] * 2 + [names[3]])
    # image_classes: every class still competes, only the listed classes' images (and the forget concept's).
    scored = LabelledImages(LabelledSet("s", image_classes=[names[1]], **options), keep_classes=[names[2]])
    assert scored.class_names == full.class_names
    assert sorted(scored.targets) == sorted([b] + [c] * 3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forget_concept_outside_classes_is_refused(layouts, layout) -> None:
    options, names = layouts[layout]
    spec = LabelledSet("s", classes=[names[0], names[1]], **options)
    with pytest.raises(
        ValueError,
        match=rf"forget concept\(s\) \['{names[2]}'\] are classes of the set but "
        r"not among its classes \(2 listed\).*add them to classes",
    ):
        LabelledImages(spec, keep_classes=[names[2], "not a class here"])
    # A concept that is not a class of the set at all is some other set's business.
    assert len(LabelledImages(spec, keep_classes=["not a class here"])) == 3


def test_preflight_names_a_forget_concept_outside_classes(celeba) -> None:
    search = StepSearch(sets=[celeba_set(celeba, classes=["Ada_Lovelace", "Alan_Turing"])])
    with pytest.raises(UserError, match=r"^search\.init_args\.sets\[0\] \('celeba'\): .*\['Elon Musk'\].*add them"):
        check_eval_sets(search, ["Elon Musk"])


@pytest.mark.parametrize(
    "option, value, error, words",
    [
        (
            "classes",
            ["Ada Lovelace", "Grace Hoper"],
            ValueError,
            ["['Grace Hoper'] (1 of 2) are not classes", "near 'Grace Hoper': ['Grace Hopper']"],
        ),
        ("image_classes", ["Ada_Lovelace", "Ada Lovelace"], ValueError, ["['Ada Lovelace'] more than once"]),
        ("classes", "no/such/list.txt", FileNotFoundError, ["'no/such/list.txt' does not exist", "package:"]),
        ("image_classes", "package:nope.txt", FileNotFoundError, ["package:frequent_celebs.txt"]),
    ],
)
def test_bad_class_lists_name_the_value(celeba, option, value, error, words) -> None:
    with pytest.raises(error) as raised:
        LabelledImages(celeba_set(celeba, **{option: value}))
    assert f"'celeba': {option}" in str(raised.value)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


@pytest.mark.parametrize("value", [[], "", [""], ["Ada", 3]])
def test_class_list_options_are_checked_when_the_set_is_built(value) -> None:
    with pytest.raises(ValueError, match="classes must be"):
        LabelledSet("s", root="x", classes=value)


def test_fraction_draws_the_same_images_whatever_classes_leave_out(tmp_path) -> None:
    root = _folders(tmp_path / "people", {"Ann": 20, "Bo": 20, "Cy": 20})
    full = LabelledImages(LabelledSet("s", root=root, fraction=0.3, seed=4))
    narrowed = LabelledImages(LabelledSet("s", root=root, fraction=0.3, seed=4, classes=["Bo", "Cy"]))
    assert [full._rows[i] for i, t in enumerate(full.targets) if t > 0] == narrowed._rows
    assert len(narrowed) == 12


# ----------------------------------------------------------------------------------------------------------
# Averaging


# Images, top-1 hits and top-5 hits of each class: a forget concept (row 0), three test classes with images
# and one without.
TABLE = torch.tensor([[5, 5, 5], [8, 8, 8], [1, 0, 1], [3, 1, 2], [0, 0, 0]])


def test_micro_and_macro_by_hand() -> None:
    class_names = {"people": ["Elon Musk", "Ann", "Bo", "Cy", "Di"]}
    forget = {"Elon Musk": "people"}
    micro = summarize({"people": TABLE}, class_names, forget)
    macro = summarize({"people": TABLE}, class_names, forget, {"people": "macro"})
    # micro: (8 + 0 + 1) / 12 and (8 + 1 + 2) / 12; macro: (1 + 0 + 1/3) / 3 and (1 + 1 + 2/3) / 3 over the
    # three test classes with images (the forget concept and the class without images left out).
    assert micro["test"]["people"] == pytest.approx({"top1": 9 / 12, "top5": 11 / 12, "count": 12})
    assert macro["test"]["people"] == pytest.approx({"top1": 4 / 9, "top5": 8 / 9, "count": 12})
    assert micro == summarize({"people": TABLE}, class_names, forget, {"people": "micro"})
    # The forget side is one class: the same either way.
    assert micro["forget"] == macro["forget"] == {"Elon Musk": {"top1": 1.0, "top5": 1.0, "count": 5}}
    # Over every row, as `evaluate` reports a set: (1 + 1 + 0 + 1/3) / 4.
    assert accuracy(TABLE, averaging="macro")["top1"] == pytest.approx(7 / 12)
    assert math.isnan(accuracy(TABLE, [4], averaging="macro")["top1"])
    with pytest.raises(ValueError, match="averaging must be 'micro' or 'macro', got 'mean'"):
        accuracy(TABLE, averaging="mean")
    with pytest.raises(ValueError, match=r"averaging must be one of \['micro', 'macro'\], got 'mean'"):
        LabelledSet("s", root="x", averaging="mean")


def test_step_search_passes_each_sets_averaging() -> None:
    search = StepSearch(sets=[LabelledSet("celeba", root="a", averaging="macro"), LabelledSet("imagenet", root="b")])
    assert search.averaging == {"celeba": "macro", "imagenet": "micro"}


def test_report_says_how_each_set_averages(celeba) -> None:
    frequent = "package:frequent_celebs.txt"
    search = StepSearch(
        sets=[
            celeba_set(celeba, image_classes=frequent, averaging="macro"),
            LabelledSet("objects", root="b", classes=["cup", "pot"]),
        ]
    )
    sizes = {"celeba": {"classes": 4, "images": 7}, "objects": {"classes": 2, "images": 5}}
    data = describe_data(None, search.sets, sizes)
    celeba_entry, objects_entry = data["evaluation_sets"]
    assert celeba_entry["averaging"] == "macro" and objects_entry["averaging"] == "micro"
    assert (celeba_entry["labels_file"], celeba_entry["image_class_list"]) == (celeba[1], frequent)
    assert objects_entry["class_list"] == "2 names" and objects_entry["classes"] == 2
    lines = _data_lines({"data": data})
    assert "test accuracy averaged over classes (macro)" in lines[2]
    assert "classes `2 names`, 2 classes, 5 images" in lines[3] and lines[3].endswith("over images (micro)")


def test_evaluate_averages_each_set_as_it_says(tiny_clip, tmp_path) -> None:
    """``ZeroShotModule`` (the ``evaluate`` command) reports the same accuracies as the count tables give."""
    import lightning as L

    root = _folders(tmp_path / "people", {"Ann": 5, "Bo": 1, "Cy": 2})
    sets = [LabelledSet("micro", root=root), LabelledSet("macro", root=root, averaging="macro")]
    datamodule = ZeroShotDataModule(sets, batch_size=4)
    datamodule.transform = tiny_clip.preprocess
    counts = ZeroShotEvaluator(tiny_clip.model, tiny_clip.tokenizer, datamodule).run()
    module = ZeroShotModule.wrap(tiny_clip)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    for name in ("micro", "macro"):
        assert module.results[name] == pytest.approx(accuracy(counts[name], averaging=name))


# ----------------------------------------------------------------------------------------------------------
# Retain augmentation


def _png(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path, count: int) -> str:
    """Pairs ``pair 0``, ``pair 1``, ... with an image of seeded noise each."""
    with wds.TarWriter(str(path)) as sink:
        for i in range(count):
            sink.write({"__key__": f"{i:09d}", "png": _png(i), "txt": f"pair {i}"})
    return str(path)


AUGMENT = transforms.Compose([transforms.RandomResizedCrop(8, scale=(0.3, 1.0)), transforms.ToTensor()])


def _tokenizer(captions):
    return torch.zeros(len(captions), 4, dtype=torch.long)


def _images(urls, seed, world_size=1, num_workers=0) -> dict[str, torch.Tensor]:
    images = {}
    for rank in range(world_size):
        stream = PairStream(urls, AUGMENT, _tokenizer, 3, rank=rank, world_size=world_size, augmentation_seed=seed)
        # (A DataLoader draws its workers' seeds from the global generator even without workers.)
        batches = stream
        if num_workers:
            batches = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
        for batch in batches:
            images.update(zip(batch["key"], batch["image"]))
    return images


def test_augmentation_is_seeded_per_pair(tmp_path) -> None:
    urls = [_shard(tmp_path / "00000.tar", 7)]
    torch.manual_seed(0)
    random.seed(0)
    before = (torch.rand(1), random.random())
    torch.manual_seed(0)
    random.seed(0)
    one = _images(urls, seed=0)
    assert (torch.rand(1), random.random()) == before  # the global generators are left as they were
    # The same crops in another run, on two ranks, with a worker per rank...
    two = _images(urls, seed=0, world_size=2, num_workers=1)
    assert one.keys() == two.keys() and len(one) == 7
    assert all(torch.equal(one[key], two[key]) for key in one)
    # ...other crops from another seed, and a crop per pair, not one for all.
    other = _images(urls, seed=1)
    assert sum(not torch.equal(one[key], other[key]) for key in one) >= 5


def test_retain_augmentation_feeds_only_the_retain_stream(tmp_path) -> None:
    url = _shard(tmp_path / "00000.tar", 4)
    data = LaionDataModule(url, concepts=[Concept("pair 3")], batch_size=4, retain_augmentation=True)
    # From a GradientCollector, setup takes OpenCLIP's training transform (load_clip returns it) for the
    # retain stream, next to the evaluation transform for the forget streams.
    collector = GradientCollector("slug-tiny")
    data.trainer = SimpleNamespace(lightning_module=collector, global_rank=0, world_size=1)
    data.setup("predict")
    assert data.transform is collector.preprocess and data.retain_transform is collector.train_preprocess
    assert isinstance(data.retain_transform.transforms[0], transforms.RandomResizedCrop)
    data.trainer = None
    data.retain_transform = None
    data.transform, data.tokenizer = TO_TENSOR, _tokenizer
    with pytest.raises(RuntimeError, match="no retain_transform"):
        data.retain_dataloader()
    data.retain_transform = AUGMENT
    forget, retain = (next(iter(loader)) for loader in data.predict_dataloader())
    assert torch.equal(forget["image"][0], TO_TENSOR(Image.open(io.BytesIO(_png(3))).convert("RGB")))
    expected = PairStream(
        [url], AUGMENT, _tokenizer, 4, keep=lambda caption: caption != "pair 3", augmentation_seed=data.seed
    )
    assert retain["key"] == ["000000000", "000000001", "000000002"]
    assert torch.equal(retain["image"], next(iter(expected))["image"])


def test_gradient_key_tells_augmented_retain_gradients_apart(tmp_path) -> None:
    """A store computed without the augmentation is never reused for a run with it, and the key asked for
    before setup is the one the pass records after it."""
    from slug_lightning.gradient_key import data_key

    url = _shard(tmp_path / "00000.tar", 2)
    collector = GradientCollector("slug-tiny")
    transforms_of = (collector.preprocess, collector.tokenizer, collector.train_preprocess)
    plain = data_key(LaionDataModule(url), *transforms_of)
    augmented = LaionDataModule(url, retain_augmentation=True)
    before_setup = data_key(augmented, *transforms_of)
    assert before_setup["retain_transform"] != plain["retain_transform"]
    retain = before_setup["retain_transform"]
    assert "RandomResizedCrop" in retain and "seeded per pair by 0" in retain
    assert before_setup["transform"] == plain["transform"]  # the forget streams are not augmented
    augmented.trainer = SimpleNamespace(lightning_module=collector, global_rank=0, world_size=1)
    augmented.setup("predict")
    assert data_key(augmented, *transforms_of) == before_setup
    reseeded = LaionDataModule(url, retain_augmentation=True, seed=1)
    assert data_key(reseeded, *transforms_of)["retain_transform"] != before_setup["retain_transform"]
