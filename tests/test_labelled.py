"""Labelled evaluation sets: image folders, ImageNet synset folders, Hugging Face datasets, subsets,
sharding and the ZeroShotDataModule loaders."""

from __future__ import annotations

import itertools
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip import IMAGENET_CLASSNAMES
from PIL import Image
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms

from slug_lightning.datamodules.labelled import (
    LabelledImages,
    ZeroShotDataModule,
    shard_indices,
    stratified_subset,
)
from slug_lightning.labelled_sets import LabelledSet
from slug_lightning.labelled_sources import imagenet_wnids

TO_TENSOR = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


def _image(value: int, size: int = 6) -> Image.Image:
    """A small image whose top-left red value identifies it."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[0, 0, 0] = value
    return Image.fromarray(pixels)


def make_folder(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    """Write ``counts[folder]`` PNGs into ``root/folder``; each image's red pixel numbers it."""
    value = start
    for folder, count in counts.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            _image(value).save(root / folder / f"{i:03d}.png")
            value += 1
    return root


@pytest.fixture
def people(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "people", {"Zoë Saldaña": 2, "Elon_Musk": 3, "Ada Lovelace": 1})


def test_folder_names_with_spaces_unicode_and_underscores(people: Path) -> None:
    dataset = LabelledImages(LabelledSet("people", root=str(people)), TO_TENSOR)
    # Sorted by folder name; underscores read as spaces.
    assert dataset.class_names == ["Ada Lovelace", "Elon Musk", "Zoë Saldaña"]
    assert dataset.targets == [0, 1, 1, 1, 2, 2]
    image, label = dataset[1]
    assert image.shape == (3, 8, 8) and label == 1
    assert dataset.class_index("Elon Musk") == 1


def test_class_index_is_exact_and_suggests_near_matches(people: Path) -> None:
    dataset = LabelledImages(LabelledSet("people", root=str(people)), TO_TENSOR)
    with pytest.raises(KeyError, match="Elon Musk"):
        dataset.class_index("elon musk")


def test_class_names_set_the_order(people: Path) -> None:
    names = ["Zoë Saldaña", "Ada Lovelace", "Elon Musk"]
    dataset = LabelledImages(LabelledSet("people", root=str(people), class_names=names), TO_TENSOR)
    assert dataset.class_names == names
    # Files are read folder by folder (sorted): Ada (1), Elon (3), Zoë (2).
    assert dataset.targets == [1, 2, 2, 2, 0, 0]


def test_folder_missing_from_class_names_is_an_error(people: Path) -> None:
    spec = LabelledSet("people", root=str(people), class_names=["Ada Lovelace", "Elon Musk"])
    with pytest.raises(ValueError, match="Folders not in class_names: \\['Zoë Saldaña'\\]"):
        LabelledImages(spec, TO_TENSOR)


def test_class_name_without_folder_needs_allow_missing_classes(people: Path) -> None:
    names = ["Ada Lovelace", "Elon Musk", "Zoë Saldaña", "Grace Hopper"]
    with pytest.raises(ValueError, match="without a folder: \\['Grace Hopper'\\]"):
        LabelledImages(LabelledSet("people", root=str(people), class_names=names), TO_TENSOR)
    spec = LabelledSet("people", root=str(people), class_names=names, allow_missing_classes=True)
    dataset = LabelledImages(spec, TO_TENSOR)
    assert dataset.class_names == names  # the missing class stays in the classifier
    assert 3 not in dataset.targets and len(dataset) == 6


def test_underscore_and_space_folders_of_one_name_clash(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "r", {"A_B": 1, "A B": 1})
    with pytest.raises(ValueError, match="same class name"):
        LabelledImages(LabelledSet("r", root=str(root)), TO_TENSOR)


@pytest.mark.parametrize("case", ["missing", "empty", "empty_class"])
def test_bad_roots_name_the_path_and_set(tmp_path: Path, case: str) -> None:
    root = tmp_path / "set"
    if case == "empty":
        root.mkdir()
    elif case == "empty_class":
        make_folder(root, {"cat": 1})
        (root / "dog").mkdir()
    error = FileNotFoundError if case == "missing" else ValueError
    with pytest.raises(error, match=f"'animals'.*{root}"):
        LabelledImages(LabelledSet("animals", root=str(root)), TO_TENSOR)


def test_synset_folders_map_to_openclip_imagenet_names(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imagenet", {"n01443537": 2, "n01440764": 1, "n15075141": 1})
    dataset = LabelledImages(LabelledSet("imagenet", root=str(root)), TO_TENSOR)
    assert dataset.class_names == list(IMAGENET_CLASSNAMES)
    # tench is class 0, goldfish class 1, toilet tissue (the last synset) class 999.
    assert dataset.targets == [0, 1, 1, 999]
    assert [IMAGENET_CLASSNAMES[t] for t in dataset.targets[:2]] == ["tench", "goldfish"]


def test_synsets_file_sets_the_class_order(tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    # A LOC_synset_mapping.txt-style file (wnid + description) with the first two classes swapped.
    swapped = [wnids[1], wnids[0], *wnids[2:]]
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text("".join(f"{w} some description\n" for w in swapped))
    root = make_folder(tmp_path / "imagenet", {"n01440764": 1, "n01443537": 1})
    dataset = LabelledImages(LabelledSet("imagenet", root=str(root), synsets_file=str(synsets)), TO_TENSOR)
    assert dataset.targets == [1, 0]

    small = tmp_path / "wnids.txt"
    small.write_text("n01443537\nn01440764\n")
    spec = LabelledSet("fish", root=str(root), synsets_file=str(small), class_names=["goldfish", "tench"])
    assert LabelledImages(spec, TO_TENSOR).targets == [1, 0]
    with pytest.raises(ValueError, match="give class_names"):
        LabelledImages(LabelledSet("fish", root=str(root), synsets_file=str(small)), TO_TENSOR)


def test_synset_folder_outside_the_list_is_an_error(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imagenet", {"n01440764": 1, "n00000001": 1})
    with pytest.raises(ValueError, match="n00000001"):
        LabelledImages(LabelledSet("imagenet", root=str(root)), TO_TENSOR)


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The ``datasets`` module in offline mode, caching under ``tmp_path``."""
    datasets = pytest.importorskip("datasets")
    # datasets reads HF_HUB_OFFLINE when imported, so the setting itself is patched.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return datasets


def _save_hf(datasets, path: Path, *, splits: bool) -> list[int]:
    labels = [0, 1, 1, 2, 0]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "fish"])}
    )
    dataset = datasets.Dataset.from_dict(
        {"image": [_image(10 * i) for i in range(5)], "label": labels}, features=features
    )
    (datasets.DatasetDict({"validation": dataset}) if splits else dataset).save_to_disk(str(path))
    return labels


@pytest.mark.parametrize("splits", [False, True])
def test_hf_dataset_saved_to_disk(tmp_path: Path, hf_offline, splits: bool) -> None:
    labels = _save_hf(hf_offline, tmp_path / "hf", splits=splits)
    dataset = LabelledImages(LabelledSet("pets", hf_dataset=str(tmp_path / "hf")), TO_TENSOR)
    assert dataset.class_names == ["cat", "dog", "fish"]
    assert dataset.targets == labels
    image, label = dataset[3]
    assert image.shape == (3, 8, 8) and label == 2
    # The image is row 3's: its red pixel is 30 / 255.
    assert abs(transforms.ToTensor()(_image(30))[0, 0, 0] - image[0, 0, 0]) < 0.02


def test_hf_local_data_directory(tmp_path: Path, hf_offline) -> None:
    root = make_folder(tmp_path / "pets", {"cat": 2, "dog": 1})  # read by datasets' imagefolder builder
    dataset = LabelledImages(LabelledSet("pets", hf_dataset=str(root), split="train"), TO_TENSOR)
    assert dataset.class_names == ["cat", "dog"]
    assert sorted(dataset.targets) == [0, 0, 1]


@pytest.mark.parametrize(
    "labels, class_names, expected_names, expected_targets",
    [
        (["dog", "cat", "dog"], None, ["cat", "dog"], [1, 0, 1]),
        (["dog", "cat", "dog"], ["dog", "cat"], ["dog", "cat"], [0, 1, 0]),
        ([2, 0, 1], ["a", "b", "c"], ["a", "b", "c"], [2, 0, 1]),
    ],
)
def test_hf_labels_without_classlabel(
    tmp_path: Path, hf_offline, labels, class_names, expected_names, expected_targets
) -> None:
    kind = hf_offline.Value("string" if isinstance(labels[0], str) else "int64")
    features = hf_offline.Features({"picture": hf_offline.Image(), "kind": kind})
    hf_offline.Dataset.from_dict(
        {"picture": [_image(i) for i in range(3)], "kind": labels}, features=features
    ).save_to_disk(str(tmp_path / "hf"))
    spec = LabelledSet(
        "s", hf_dataset=str(tmp_path / "hf"), class_names=class_names, image_column="picture", label_column="kind"
    )
    dataset = LabelledImages(spec, TO_TENSOR)
    assert dataset.class_names == expected_names and dataset.targets == expected_targets


def test_hf_errors(tmp_path: Path, hf_offline, monkeypatch: pytest.MonkeyPatch) -> None:
    _save_hf(hf_offline, tmp_path / "hf", splits=True)
    with pytest.raises(FileNotFoundError, match="no split 'test'.*validation"):
        LabelledImages(LabelledSet("pets", hf_dataset=str(tmp_path / "hf"), split="test"), TO_TENSOR)
    with pytest.raises(ValueError, match="no column 'img'"):
        LabelledImages(LabelledSet("pets", hf_dataset=str(tmp_path / "hf"), image_column="img"), TO_TENSOR)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        LabelledImages(LabelledSet("pets", hf_dataset=str(tmp_path / "absent")), TO_TENSOR)
    # A hub id not in the cache: offline mode fails at once, with the set named.
    with pytest.raises(FileNotFoundError, match="'pets'.*someone/not-cached.*offline"):
        LabelledImages(LabelledSet("pets", hf_dataset="someone/not-cached"), TO_TENSOR)
    monkeypatch.setattr(hf_offline.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        LabelledImages(LabelledSet("pets", hf_dataset="someone/not-cached"), TO_TENSOR)


def test_fraction_subset_is_seeded_stratified_and_keeps_forget_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "r", {"a": 10, "b": 4, "c": 1, "d": 20})
    spec = LabelledSet("r", root=str(root), fraction=0.3, seed=7)
    subset = LabelledImages(spec, TO_TENSOR)
    counts = np.bincount(subset.targets, minlength=4).tolist()
    assert counts == [3, 1, 1, 6]  # round(0.3 n), at least one per class
    assert subset._rows == LabelledImages(spec, TO_TENSOR)._rows  # seeded
    other_seed = LabelledImages(LabelledSet("r", root=str(root), fraction=0.3, seed=8), TO_TENSOR)
    assert other_seed._rows != subset._rows

    kept = LabelledImages(spec, TO_TENSOR, keep_classes=["d", "not a class here"])
    assert np.bincount(kept.targets, minlength=4).tolist() == [3, 1, 1, 20]
    # Keeping one class whole does not change which images the other classes keep.
    others = [r for r, t in zip(kept._rows, kept.targets) if t != 3]
    assert others == [r for r, t in zip(subset._rows, subset.targets) if t != 3]


def test_stratified_subset_full_fraction_keeps_everything() -> None:
    assert stratified_subset([0, 1, 0, 2], 1.0, seed=0) == [0, 1, 2, 3]


@pytest.mark.parametrize("n, world_size", itertools.product([0, 1, 7, 10], [2, 3]))
def test_shard_indices_partition_exactly(n: int, world_size: int) -> None:
    shards = [shard_indices(n, rank, world_size) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_indices_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard_indices(4, 2, 2)


@pytest.mark.parametrize("template", ["a photo", "a {} and a {}", "a {0}", "a {name}", "a {"])
def test_templates_need_exactly_one_empty_field(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        LabelledSet("s", root="r", templates=[template])


def test_spec_validation() -> None:
    LabelledSet("s", root="r", templates=["a photo of {}.", "{{literal}} {}"])
    with pytest.raises(ValueError, match="exactly one of root"):
        LabelledSet("s")
    with pytest.raises(ValueError, match="exactly one of root"):
        LabelledSet("s", root="r", hf_dataset="h")
    with pytest.raises(ValueError, match="fraction"):
        LabelledSet("s", root="r", fraction=0.0)
    with pytest.raises(ValueError, match="duplicate"):
        LabelledSet("s", root="r", class_names=["a", "a"])


def test_datamodule_loaders_shard_without_padding(tmp_path: Path, people: Path) -> None:
    objects = make_folder(tmp_path / "objects", {"cup": 3, "lamp": 2})
    sets = [LabelledSet("people", root=str(people)), LabelledSet("objects", root=str(objects))]
    module = ZeroShotDataModule(sets, batch_size=2)
    module.transform = TO_TENSOR
    images, labels = next(iter(module.loader("people")))
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.tolist() == [0, 1]

    per_rank = [torch.cat([y for _, y in module.loader("people", rank, 3)]) for rank in range(3)]
    assert sorted(torch.cat(per_rank).tolist()) == sorted(module.datasets()["people"].targets)
    # Lightning leaves a DistributedSampler alone instead of wrapping it in its own padding one.
    assert isinstance(module.loader("people", 1, 3).sampler, DistributedSampler)

    loaders = module.val_dataloader()  # no trainer: rank 0 of 1
    assert [len(loader.dataset) for loader in loaders] == [6, 5]
    assert module.datasets() is module.datasets(())  # built once
    with pytest.raises(KeyError, match="objects"):
        module.loader("animals")


def test_datamodule_takes_transform_from_the_lightning_module(people: Path) -> None:
    import lightning as L

    class WithPreprocess(L.LightningModule):
        preprocess = TO_TENSOR

    module = ZeroShotDataModule([LabelledSet("people", root=str(people))])
    with pytest.raises(RuntimeError, match="transform"):
        module.loader("people")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(WithPreprocess())
    module.trainer = trainer
    module.setup("validate")
    assert module.transform is TO_TENSOR
    assert next(iter(module.val_dataloader()[0]))[0].shape == (6, 3, 8, 8)


def test_datamodule_rejects_duplicate_set_names(people: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        ZeroShotDataModule([LabelledSet("x", root=str(people)), LabelledSet("x", root=str(people))])


def test_step_search_refuses_two_sets_of_one_name(people: Path) -> None:
    """Sets are taken by name (results, forget sets, the pre-flight's file lists): the first would vanish."""
    from slug_lightning.callbacks.step_search import StepSearch
    from slug_lightning.errors import ConfigError

    sets = [LabelledSet("x", root=str(people)), LabelledSet("y", root=str(people)), LabelledSet("x", root=str(people))]
    with pytest.raises(ConfigError, match=r"'x' is the name of sets \[0, 2\]") as error:
        StepSearch(sets)
    assert error.value.option == "sets"


def test_decomposed_folder_names_give_composed_class_names(tmp_path: Path) -> None:
    """macOS writes "Zoë" decomposed in file names; the config's concept is composed. Both are one class."""
    composed = "Zoë Saldaña"
    root = make_folder(tmp_path / "people", {unicodedata.normalize("NFD", composed): 2, "Ada Lovelace": 3})
    dataset = LabelledImages(LabelledSet("people", root=str(root), fraction=0.34), keep_classes=[composed])
    assert dataset.class_names == ["Ada Lovelace", composed]
    assert dataset.class_index(composed) == 1
    assert dataset.targets.count(1) == 2  # the forget concept keeps all its images under fraction
    spec = LabelledSet("named", root=str(root), class_names=[unicodedata.normalize("NFD", composed), "Ada Lovelace"])
    assert LabelledImages(spec).class_names == [composed, "Ada Lovelace"]


DDP_SCRIPT = """
import json, sys
import lightning as L
import torch
from torchvision import transforms
from slug_lightning.datamodules.labelled import ZeroShotDataModule
from slug_lightning.labelled_sets import LabelledSet


class CountLabels(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.preprocess = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])

    def on_validation_start(self):
        # Made here, not in __init__: ddp_spawn would share an __init__ tensor between the processes.
        self.counts = torch.zeros(2, 3, dtype=torch.long)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.counts[dataloader_idx] += torch.bincount(batch[1], minlength=3)

    def on_validation_epoch_end(self):
        total = self.trainer.strategy.reduce(self.counts.float(), reduce_op="sum")
        if self.global_rank == 0:
            with open(sys.argv[2], "w") as f:
                json.dump(total.long().tolist(), f)


if __name__ == "__main__":
    root = sys.argv[1]
    sets = [LabelledSet("a", root=root), LabelledSet("b", root=root, fraction=0.5)]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(CountLabels(), datamodule=ZeroShotDataModule(sets, batch_size=2))
"""


@pytest.mark.ddp
def test_lightning_ddp_validation_sees_every_image_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = make_folder(tmp_path / "r", {"x": 3, "y": 1, "z": 3})  # 7 images: uneven over 2 ranks
    script, result = tmp_path / "ddp_count.py", tmp_path / "counts.json"
    script.write_text(DDP_SCRIPT)
    subprocess.run([sys.executable, str(script), str(root), str(result)], check=True, timeout=300, cwd=tmp_path)
    # A padding sampler would count 8 images, a doubly sharded loader fewer than 7.
    assert json.loads(result.read_text()) == [[3, 1, 3], [2, 1, 2]]
