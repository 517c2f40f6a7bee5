"""The paper's setup, ``configs/paper/vit-b-32_laion400m.yaml``, run unchanged on tiny stand-ins of its data.

The stand-ins are laid out exactly where the config's placeholder paths point (``data/...`` under the
working directory): a LAION-style retain shard, caption-filtered forget shards, CelebA as it ships (a flat
image folder and the research code's image→name list) and ImageNet synset folders. Only the model (the
packaged tiny CLIP, randomly initialised), the trainer, the number of probes and the list of CelebA identities
scored (see ``write_override``) are overridden, so a run here goes through the same sets, templates, metric,
averaging and filters as a run on the real data.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from open_clip import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from slug_lightning.cli import main
from slug_lightning.datamodules.labelled import LabelledImages
from slug_lightning.labelled_sets import LabelledSet, read_class_list
from slug_lightning.labelled_sources import imagenet_wnids

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper" / "vit-b-32_laion400m.yaml"
CONCEPT = "Elon Musk"

# (caption, mentions the concept). The flags are written by hand, not computed with Concept.matches, so
# that a broken caption filter shows up as a wrong sample count.
RETAIN_SHARD = [
    ("A red bicycle leaning on a wall", False),
    ("White Musk eau de parfum, 50 ml", False),  # the perfume note: why the config has no alias "Musk"
    ("Muskrat swimming in a pond", False),
    ("Elon Musk speaks at a conference", True),  # excluded from the retain set
    ("Two dogs playing in the snow", False),
    ("Sunset over the harbour", False),
    ("A bowl of ramen with egg", False),
]
FORGET_SHARDS = [
    [
        ("Elon Musk at the Tesla factory", True),
        ("A kitten asleep on a sofa", False),
        ("ELON MUSK portrait, 2019", True),
        ("Tesla Model 3 parked outside", False),
    ],
    [
        ("elon musk waves to the crowd", True),
        ("SpaceX rocket launch at dawn", False),
        ("Photo of Elon  Musk and a rocket", True),
    ],
]
IDENTITIES = ["Elon Musk", "Taylor Swift", "Jeff Bezos", "Mark Zuckerberg", "Kim Kardashian", "Kanye West"]
# Not one of the 100 identities frequent in LAION-400M: it competes in the classifier, its images go unscored.
UNSCORED = "Jeff Bezos"
# The 100 identities the research code scores, as the paper config reads them (underscores as spaces).
FREQUENT = [
    name.replace("_", " ") for name in read_class_list("package:frequent_celebs.txt", "celeba", "image_classes")
]
# Real ImageNet-1k synsets and the open_clip class names they must map to.
SYNSETS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n02085620": "Chihuahua",
    "n04592741": "airplane wing",
    "n15075141": "toilet paper",
}
IMAGES_PER_CLASS = 3


def _jpeg(seed: int) -> bytes:
    """A 32x32 RGB JPEG of seeded noise."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_shard(path: Path, captions: list[tuple[str, bool]], first_key: int) -> None:
    """An img2dataset-style tar: ``<key>.jpg``, ``<key>.txt`` and ``<key>.json`` per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for offset, (caption, _) in enumerate(captions):
            key = f"{first_key + offset:09d}"
            meta = {"key": key, "caption": caption, "status": "success", "width": 32, "height": 32}
            sink.write({"__key__": key, "jpg": _jpeg(first_key + offset), "txt": caption, "json": meta})


def _write_folders(root: Path, folders: list[str], suffix: str, seed: int) -> None:
    for i, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for j in range(IMAGES_PER_CLASS):
            (root / folder / f"{j:03d}{suffix}").write_bytes(_jpeg(seed + IMAGES_PER_CLASS * i + j))


def celeba_stand_in(all_frequent: bool = False) -> dict[str, int]:
    """Images per identity of the CelebA stand-in: 3 of each of IDENTITIES and, with ``all_frequent``, 1 of
    every other frequent identity (the config's list names all 100, each must be an identity of the set)."""
    others = {name: 1 for name in FREQUENT if name not in IDENTITIES} if all_frequent else {}
    return {**{name: IMAGES_PER_CLASS for name in IDENTITIES}, **others}


def _write_celeba(root: Path, seed: int, counts: dict[str, int]) -> None:
    """CelebA as it ships, ``img_align_celeba/000001.jpg ...``, and the research code's list of each image's
    person: two header lines, then ``<file> <Name_With_Underscores>``. The identities' images interleave."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    entries = []
    for j in range(IMAGES_PER_CLASS):
        for name, count in counts.items():
            if j >= count:
                continue
            file = f"{len(entries) + 1:06d}.jpg"
            (images / file).write_bytes(_jpeg(seed + len(entries)))
            entries.append(f"{file} {name.replace(' ', '_')}")
    (root / "list_identity_celeba.txt").write_text(
        "\n".join([str(len(entries)), "image_id identity_name", *entries]) + "\n"
    )


def make_stand_ins(root: Path, all_frequent: bool = False) -> None:
    """Write the stand-in data where the paper config's placeholder paths point, relative to ``root``."""
    _write_shard(root / "data/laion400m/00000.tar", RETAIN_SHARD, first_key=0)
    for i, captions in enumerate(FORGET_SHARDS):
        _write_shard(root / f"data/laion400m/forget/{i:05d}.tar", captions, first_key=1000 * (i + 1))
    _write_celeba(root / "data/celeba", seed=10_000, counts=celeba_stand_in(all_frequent))
    _write_folders(root / "data/imagenet/val", list(SYNSETS), ".JPEG", seed=20_000)


def write_override(path: Path) -> Path:
    """The only changes to the paper config: the tiny random model, a CPU trainer, one probe per layer, a
    minimum of forget pairs that the stand-in shards (4 pairs of the concept) meet, and the CelebA set's
    ``image_classes`` narrowed to the stand-in's frequent identities (every other field of both sets as the
    config has them; the config's own list of 100 is read by
    ``test_celeba_stand_ins_load_as_the_config_reads_them``).

    One probe per layer keeps the run short: each language-tower probe rebuilds a 1000-class x 7-template
    ImageNet classifier, the most expensive probe there is. The search itself is tested elsewhere. Six
    identities keep the target in a random tiny CLIP's top 5 before the edit; among the 101 of a stand-in with
    all 100 frequent names it is not, and a run with nothing to forget makes no edit.
    """
    sets = yaml.safe_load(PAPER_CONFIG.read_text())["search"]["init_args"]["sets"]
    for spec in sets:
        if spec["name"] == "celeba":
            spec["image_classes"] = [name.replace(" ", "_") for name in IDENTITIES if name in FREQUENT]
    path.write_text(
        yaml.safe_dump(
            {
                "trainer": {"accelerator": "cpu", "devices": 1, "logger": False},
                "model": {"init_args": {"model_name": "slug-tiny", "pretrained": None}},
                "data": {"init_args": {"min_forget_pairs": 2}},
                "search": {"init_args": {"max_steps": 1, "sets": sets}},
            }
        )
    )
    return path


def test_paper_config_holds_the_papers_settings() -> None:
    config = yaml.safe_load(PAPER_CONFIG.read_text())
    model = config["model"]["init_args"]
    assert (model["model_name"], model["pretrained"]) == ("ViT-B-32", "laion400m_e32")
    assert [c["name"] for c in config["data"]["init_args"]["concepts"]] == [CONCEPT]
    # G_r on the retain images through the training transform, as the research code computes it.
    assert config["data"]["init_args"]["retain_augmentation"] is True
    search = config["search"]["init_args"]
    assert {k: search[k] for k in ("metric", "threshold", "max_steps", "tolerance", "forget_set")} == {
        "metric": "top5",
        "threshold": 0.0,
        "max_steps": 10,
        "tolerance": 0.05,
        "forget_set": "celeba",
    }
    assert sorted(search["towers"]) == ["language", "vision"]
    sets = {s["name"]: s for s in search["sets"]}
    celeba = sets["celeba"]
    assert celeba["templates"] == ["{}."]
    # CelebA as it ships, every identity competing, the 100 frequent ones scored and averaged per identity.
    assert (celeba["root"], celeba["labels_file"]) == (
        "data/celeba/img_align_celeba",
        "data/celeba/list_identity_celeba.txt",
    )
    assert (celeba["image_classes"], celeba["averaging"]) == ("package:frequent_celebs.txt", "macro")
    assert "classes" not in celeba and "fraction" not in celeba
    imagenet = sets["imagenet"]
    assert (imagenet["fraction"], imagenet["seed"]) == (0.05, 0)
    # The same prompts as open_clip's lambdas, written as format strings.
    expected = [template("tench") for template in SIMPLE_IMAGENET_TEMPLATES]
    assert [template.format("tench") for template in imagenet["templates"]] == expected


def test_synset_stand_ins_map_to_open_clip_imagenet_names(tmp_path: Path) -> None:
    make_stand_ins(tmp_path)
    imagenet = next(
        s for s in yaml.safe_load(PAPER_CONFIG.read_text())["search"]["init_args"]["sets"] if s["name"] == "imagenet"
    )
    dataset = LabelledImages(LabelledSet(**{**imagenet, "root": str(tmp_path / imagenet["root"])}))
    assert dataset.class_names == list(IMAGENET_CLASSNAMES)  # classified 1000-way
    wnids = imagenet_wnids()
    for wnid, name in SYNSETS.items():
        assert IMAGENET_CLASSNAMES[wnids.index(wnid)] == name
    # fraction 0.05 keeps round(0.05 * 3) -> at least one image per class.
    assert sorted(dataset.class_names[t] for t in dataset.targets) == sorted(SYNSETS.values())


def test_packaged_frequent_identities_are_the_research_codes_100() -> None:
    names = read_class_list("package:frequent_celebs.txt", "celeba", "image_classes")
    # CSIPlab/SLUG data/celeba/frequent_celebs.txt: 100 names (99 newlines), most frequent first, spelled as
    # its list_identity_celeba.txt spells them (underscores), the paper's example target among them.
    assert len(names) == len(set(names)) == 100
    assert names[0] == "Barack_Obama" and names[-1] == "Julianne_Hough" and "Elon_Musk" in names
    assert all(" " not in name and "_" in name for name in names)
    assert "Jeff_Bezos" not in names  # the stand-ins' unscored identity


def test_celeba_stand_ins_load_as_the_config_reads_them(tmp_path: Path) -> None:
    make_stand_ins(tmp_path, all_frequent=True)
    celeba = next(
        s for s in yaml.safe_load(PAPER_CONFIG.read_text())["search"]["init_args"]["sets"] if s["name"] == "celeba"
    )
    paths = {key: str(tmp_path / celeba[key]) for key in ("root", "labels_file")}
    dataset = LabelledImages(LabelledSet(**{**celeba, **paths}), keep_classes=[CONCEPT])
    # Every identity of the list competes, in the sorted order of the list's spelling, named with spaces...
    counts = celeba_stand_in(all_frequent=True)
    assert dataset.class_names == [n.replace("_", " ") for n in sorted(n.replace(" ", "_") for n in counts)]
    # ...and only the frequent ones' images are read.
    scored = sorted(dataset.class_names[t] for t in dataset.targets)
    assert scored == sorted(n for n, count in counts.items() if n != UNSCORED for _ in range(count))
    # The list file order: the first stand-in image is the first identity's.
    assert dataset.targets[0] == dataset.class_index(IDENTITIES[0])


def _unlearn(*args: str) -> int:
    return main(["unlearn", "--search.init_args.audit=false", *args])


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the paper config on the stand-ins; returns its working directory."""
    workdir = tmp_path_factory.mktemp("paper")
    make_stand_ins(workdir)
    override = write_override(workdir / "tiny.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.chdir(workdir)
        assert _unlearn("--config", str(PAPER_CONFIG), "--config", str(override)) == 0
    return workdir


def _output(workdir: Path) -> Path:
    return workdir / yaml.safe_load(PAPER_CONFIG.read_text())["output_dir"]


@pytest.mark.e2e
def test_paper_run_report_follows_the_contract(paper_run: Path) -> None:
    report = json.loads((_output(paper_run) / "report.json").read_text())
    assert report["model"]["name"] == "slug-tiny" and report["model"]["pretrained"] is None
    assert report["model"]["parameters"] > 0
    (concept,) = report["concepts"]
    assert concept["name"] == CONCEPT
    assert concept["tower"] in ("vision", "language")
    assert concept["step_size"] > 0 and concept["relative_change"] > 0
    # Case-insensitive full-name matches in the forget shards; the retain shard minus its one mention.
    assert concept["forget_samples"] == sum(flag for shard in FORGET_SHARDS for _, flag in shard)
    assert report["retain_samples"] == sum(not flag for _, flag in RETAIN_SHARD)
    assert report["skipped_samples"] == 0
    for side in ("before", "after"):
        assert set(report[side]["forget"]) == {CONCEPT}
        assert set(report[side]["test"]) == {"celeba", "imagenet"}
        for accuracy in [*report[side]["forget"].values(), *report[side]["test"].values()]:
            assert 0.0 <= accuracy["top1"] <= accuracy["top5"] <= 1.0
    # Five stand-in synsets among 1000 classes: a random tiny CLIP cannot have them all in its top 5.
    assert report["before"]["test"]["imagenet"]["top5"] < 1.0
    # The forget side is the target's 3 CelebA images; the CelebA test side the mean over the 4 other scored
    # identities (never the unscored one) of each one's top-1.
    assert math.isclose(3 * report["before"]["forget"][CONCEPT]["top1"] % 1, 0, abs_tol=1e-9)
    rows = report["test_classes"]["celeba"]
    scored = sorted(n for n in IDENTITIES if n not in (CONCEPT, UNSCORED))
    assert sorted(row["name"] for row in rows) == scored
    for when in ("before", "after"):
        macro = sum(row[f"top1_{when}"] for row in rows) / len(rows)
        assert math.isclose(report[when]["test"]["celeba"]["top1"], macro, abs_tol=1e-9)
    data = report["data"]
    assert data["retain_augmentation"] is True
    celeba = next(s for s in data["evaluation_sets"] if s["name"] == "celeba")
    counts = celeba_stand_in()
    assert (celeba["classes"], celeba["images"], celeba["averaging"]) == (
        len(counts),
        sum(counts.values()) - counts[UNSCORED],
        "macro",
    )
    assert celeba["image_class_list"] == "5 names"
    assert next(s for s in data["evaluation_sets"] if s["name"] == "imagenet")["averaging"] == "micro"
    searched_layers = {p["layer"] for p in report["search"]}
    assert concept["layer"] in searched_layers
    # Every probe scored both test sets, but those whose forget images already failed the forget test (forget first).
    assert all(p["concept"] == CONCEPT for p in report["search"])
    assert all(set(p["test_top1"]) == ({"celeba", "imagenet"} if p["tested"] else set()) for p in report["search"])
    assert any(p["tested"] for p in report["search"])
    # max_steps 1 from the override: one probe per searched layer.
    assert len(report["search"]) == len(searched_layers)
    assert report["timing"]["probes"] == len(report["search"]) and report["timing"]["total_s"] > 0
    assert report["devices"] == 1
    with open(_output(paper_run) / "search.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == len(report["search"])


@pytest.mark.e2e
def test_recorded_config_runs_again(paper_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = _output(paper_run)
    recorded = yaml.safe_load((output / "config.yaml").read_text())
    assert recorded["search"]["init_args"]["max_steps"] == 1
    imagenet = recorded["search"]["init_args"]["sets"][1]
    assert imagenet["templates"] == [template("{}") for template in SIMPLE_IMAGENET_TEMPLATES]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(paper_run)
    rerun = paper_run / "rerun"
    # Only the vision tower is searched again: its probes are cheap, and they are enough to compare.
    assert (
        _unlearn(
            "--config", str(output / "config.yaml"), "--output_dir", str(rerun), "--search.init_args.towers=[vision]"
        )
        == 0
    )
    first = json.loads((output / "report.json").read_text())
    again = json.loads((rerun / "report.json").read_text())
    assert (again["retain_samples"], again["concepts"][0]["forget_samples"]) == (
        first["retain_samples"],
        first["concepts"][0]["forget_samples"],
    )
    # Same seed, model, data and concepts: the same gradients, so the same layer statistics...
    assert (rerun / "layers.csv").read_text() == (output / "layers.csv").read_text()
    # ...and the same vision probes.
    vision = [p for p in first["search"] if p["layer"].startswith("visual.")]
    assert vision and [(p["layer"], p["step_size"], p["forget_top5"]) for p in again["search"]] == [
        (p["layer"], p["step_size"], p["forget_top5"]) for p in vision
    ]
