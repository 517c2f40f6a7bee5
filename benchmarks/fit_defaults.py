"""``fit`` on a world that is not the demo's: CLIPContrastive's old defaults against the new ones, side by side.

The world: the demo world generator with other counts and another seed (``make_demo_world(seed=7, people=10,
...)``): 10 invented people are the 10 classes, about 860 caption-image pairs in 4 shards, and 40 fresh images per
person split into a validation folder (20, what ``fit`` validates on every 2 epochs, ``val_curve``) and a test
folder (20, what the table reports). Each setting trains the tiny CLIP for the same number of epochs from the same
seed. Top-1 is zero-shot with "a photo of {}." on the test folder, of the best checkpoint's weights (the highest
validation top-1, kept by ``ModelCheckpoint``; what ``fit`` exports by default) and of the last weights. The plain
loop is the reference a user would write by hand: AdamW at a constant rate, no warm-up, no schedule, the same loss
and data stream. ``--all`` adds the demo's fit config as it is (500 steps of 128 pairs: 74 epochs of this world).

Run (4 to 5 minutes on 2 CPU cores, 8 to 9 with ``--all``; settings run two at a time, one thread each)::

    python benchmarks/fit_defaults.py --all --output benchmarks/results/fit_defaults.md

``--root DIR`` keeps the world and the runs (default: a temporary directory); ``--only NAME ...`` runs some
settings; ``--epochs`` changes the length of the runs bounded by epochs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import machine, publish, table

WORLD = dict(
    seed=7,
    people=10,
    objects=3,
    portraits_per_person=60,
    person_object_per_person=10,
    samples_per_object=40,
    scenery_samples=40,
    eval_per_person=40,
    eval_per_object=2,
    shards=4,
)
TEMPLATES = ["a photo of {}."]


@dataclass
class Setting:
    """One row: CLIPContrastive and LaionDataModule arguments, or the plain loop."""

    name: str
    what: str
    batch_size: int
    module: dict = field(default_factory=dict)
    plain_lr: float | None = None  # the plain loop's constant rate; None: a Lightning fit
    max_steps: int | None = None  # a run bounded by steps (validated every 50) instead of epochs
    long: bool = False  # run only with --all


# CLIPContrastive's defaults before issue 22: lr 1e-3 used as given at any batch (and the last weights exported).
OLD = {"lr": 1e-3, "base_batch_size": None, "warmup_steps": 50, "export": "last"}
NEW = {}  # CLIPContrastive's defaults now: 8e-3 per 256 pairs, scaled linearly; warm-up 50; the last weights
SETTINGS = [
    # At batch 32 the old and the new rate are the same (1e-3): the old defaults' row would be this run.
    Setting("new_32", "new defaults, batch 32 (lr 1e-3, as the old defaults)", 32, NEW),
    Setting("old_64", "old defaults, batch 64 (LaionDataModule's default batch)", 64, OLD),
    Setting("new_64", "new defaults, batch 64", 64, NEW),
    Setting("old_128", "old defaults, batch 128", 128, OLD),
    Setting("new_128", "new defaults, batch 128 (lr 4e-3: the demo's fit settings)", 128, NEW),
    Setting("plain_32", "plain loop: AdamW lr 5e-4 constant, batch 32", 32, plain_lr=5e-4),
    Setting(
        "demo_500",
        "configs/demo/fit.yaml as it is: lr 4e-3, batch 128, max_steps 500",
        128,
        {**OLD, "lr": 4e-3},
        max_steps=500,
        long=True,
    ),
]


def make_world(root: Path):
    """The benchmark's world, and its identity images split into validation and test folders."""
    from slug_lightning.demo import make_demo_world

    world = make_demo_world(root / "world", **WORLD)
    for person_dir in sorted(world.identities_dir.iterdir()):
        images = sorted(person_dir.iterdir())
        for split, chosen in (("val", images[: len(images) // 2]), ("test", images[len(images) // 2 :])):
            target = root / split / person_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for image in chosen:
                shutil.copyfile(image, target / image.name)
    return world


def top1(model, preprocess, tokenizer, folder: Path) -> float:
    """Zero-shot top-1 of ``model`` on an image folder (every image, one template)."""
    from torch.utils.data import DataLoader

    from slug_lightning.datamodules import LabelledImages, LabelledSet
    from slug_lightning.zero_shot import image_features, zero_shot_classifier

    dataset = LabelledImages(LabelledSet("test", root=str(folder), templates=TEMPLATES), preprocess)
    model.eval()
    classifier = zero_shot_classifier(model, tokenizer, dataset.class_names, TEMPLATES)
    hits = total = 0
    for images, labels in DataLoader(dataset, batch_size=256):
        hits += int(((image_features(model, images) @ classifier).argmax(dim=1) == labels).sum())
        total += len(labels)
    return hits / total


def run(setting: Setting, root: Path, shards: str, epochs: int) -> dict:
    """Fit one setting; its row of the table."""
    import torch

    torch.set_num_threads(1)
    out = root / "runs" / setting.name
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    row = (
        plain_loop(setting, root, shards, epochs)
        if setting.plain_lr
        else lightning_fit(setting, root, shards, epochs, out)
    )
    row.update(
        name=setting.name, what=setting.what, batch=setting.batch_size, seconds=round(time.perf_counter() - started)
    )
    return row


def lightning_fit(setting: Setting, root: Path, shards: str, epochs: int, out: Path) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from slug_lightning import CLIPContrastive, load_clip
    from slug_lightning.datamodules import LabelledSet, LaionDataModule

    class Record(Callback):
        """The learning rate of the first optimizer step at the peak, and each validation's top-1."""

        def __init__(self) -> None:
            self.peak, self.val = 0.0, []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.peak = max(self.peak, trainer.optimizers[0].param_groups[0]["lr"])

        def on_validation_end(self, trainer, module) -> None:
            if not trainer.sanity_checking:
                self.val.append((trainer.global_step, float(trainer.callback_metrics["val/top1"])))

    L.seed_everything(0, verbose=False)
    export = out / "slug-tiny.safetensors"
    module = CLIPContrastive("slug-tiny", export_path=str(export), **setting.module)
    data = LaionDataModule(
        shards,
        batch_size=setting.batch_size,
        num_workers=0,
        seed=0,
        val_sets=[LabelledSet("val", root=str(root / "val"), templates=TEMPLATES)],
    )
    if setting.max_steps:
        length, interval = {"max_steps": setting.max_steps}, 50
    else:  # validated every 2 epochs, so that the last validation sees the last weights
        length, interval = {"max_epochs": epochs}, 2 * (data_pairs(shards) // setting.batch_size)
    record = Record()
    checkpoint = ModelCheckpoint(dirpath=str(out / "checkpoints"), monitor="val/top1", mode="max")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
        val_check_interval=interval,
        check_val_every_n_epoch=None,
        callbacks=[checkpoint, record],
        **length,
    )
    trainer.fit(module, data)
    best = load_clip("slug-tiny", checkpoint.best_model_path)
    return {
        "steps": trainer.global_step,
        "peak_lr": record.peak,
        "best_step": max(record.val, key=lambda v: v[1])[0],
        "val_curve": " ".join(f"{top1:.2f}" for _, top1 in record.val),
        "test_best": top1(best.model, best.preprocess, best.tokenizer, root / "test"),
        "test_last": top1(module.model, module.preprocess, module.tokenizer, root / "test"),
    }


def plain_loop(setting: Setting, root: Path, shards: str, epochs: int) -> dict:
    """The hand-written reference: AdamW at a constant rate over the same stream and loss."""
    import lightning as L
    import torch

    from slug_lightning import load_clip
    from slug_lightning.datamodules import PairStream
    from slug_lightning.losses import retain_loss_sum
    from slug_lightning.shards import expand_shards

    L.seed_everything(0, verbose=False)
    loaded = load_clip("slug-tiny")
    model = loaded.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=setting.plain_lr)
    stream = PairStream(
        expand_shards(shards),
        loaded.preprocess,
        loaded.tokenizer,
        setting.batch_size,
        shuffle=True,
        seed=0,
        drop_last=True,
    )
    steps = 0
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for batch in stream:
            loss = (
                retain_loss_sum(model.encode_image(batch["image"]), model.encode_text(batch["text"]), model.logit_scale)
                / batch["image"].shape[0]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            steps += 1
    last = top1(model, loaded.preprocess, loaded.tokenizer, root / "test")
    return {"steps": steps, "peak_lr": setting.plain_lr, "test_last": last}


def data_pairs(shards: str) -> int:
    from slug_lightning.shard_scan import count_kept
    from slug_lightning.shards import expand_shards

    return count_kept(expand_shards(shards))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="where the world and the runs go (default: a temporary dir)")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=2, help="settings run at once, one thread each")
    parser.add_argument("--only", nargs="*", default=None, help="names of the settings to run")
    parser.add_argument("--all", action="store_true", help="also the long settings (the demo config as it is)")
    args = parser.parse_args(argv)

    root = Path(args.root or tempfile.mkdtemp(prefix="fit_defaults_")).resolve()
    world = make_world(root)
    settings = [s for s in SETTINGS if (s.name in args.only if args.only else args.all or not s.long)]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.starmap(run, [(s, root, world.shards, args.epochs) for s in settings])
    columns = [
        "name",
        "what",
        "batch",
        "peak_lr",
        "steps",
        "val_curve",
        "best_step",
        "test_best",
        "test_last",
        "seconds",
    ]
    text = "\n".join(
        [
            "# fit on a world that is not the demo: old and new CLIPContrastive defaults",
            "",
            f"Machine: {machine()}",
            f"World: make_demo_world({', '.join(f'{k}={v}' for k, v in WORLD.items())}): {world.num_samples} pairs, "
            f"10 classes; validation and test folders of 200 images each. {args.epochs} epochs per setting but "
            "demo_500, seed 0, one thread each. val_curve: validation top-1 every 2 epochs (demo_500: every 50 "
            "steps); test_best: test top-1 of the best checkpoint (at best_step), which fit exports by default; "
            "test_last: of the last weights.",
            f"Reproduce: `python benchmarks/fit_defaults.py{' --all' if args.all else ''} --output "
            "benchmarks/results/fit_defaults.md` "
            f"({time.perf_counter() - started:.0f} s here, {args.jobs} settings at a time).",
            "",
            table(rows, columns),
            "",
        ]
    )
    publish(text, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
