"""``fit`` with CLIPContrastive and LaionDataModule: the learning-rate schedule and its scaling to the batch,
validation every N steps, the exported best weights, and the settings refused with a one-line error."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from slug_lightning import CLIPContrastive, config_path, load_clip
from slug_lightning.cli import main
from slug_lightning.clip_module import scaled_lr, warmup_cosine
from slug_lightning.datamodules import LabelledSet, LaionDataModule, ZeroShotDataModule
from slug_lightning.demo import make_demo_world
from slug_lightning.errors import ConfigError, UserError
from slug_lightning.evaluation import ZeroShotEvaluator
from slug_lightning.models import read_state_dict
from slug_lightning.zero_shot import accuracy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """400 pairs in 4 shards; 60 identity and 20 object evaluation images."""
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        portraits_per_person=8,
        person_object_per_person=2,
        samples_per_object=8,
        scenery_samples=20,
        eval_per_person=2,
        eval_per_object=2,
        shards=4,
    )


def _val_sets(world) -> list[LabelledSet]:
    return [
        LabelledSet("identities", root=str(world.identities_dir)),
        LabelledSet("objects", root=str(world.objects_dir)),
    ]


def _trainer(**kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**settings, **kwargs})


class LearningRates(Callback):
    """The learning rate of every optimizer step."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rates.append(optimizer.param_groups[0]["lr"])


class Validations(Callback):
    """``(global step, logged metrics)`` after every validation of training (not the sanity check)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, float]]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.seen.append((trainer.global_step, metrics))


# --------------------------------------------------------------------------------------------------
# The schedule and the scaling rule, as functions


@pytest.mark.parametrize(("warmup", "total"), [(5, 20), (0, 10), (30, 12)])
def test_warmup_cosine_rises_linearly_then_falls_along_a_cosine_to_zero_at_the_end(warmup, total):
    factors = [warmup_cosine(step, warmup, total) for step in range(total + 1)]
    ramp = min(warmup, total)  # a warm-up longer than the run is cut to it
    assert factors[:ramp] == pytest.approx([(step + 1) / ramp for step in range(ramp)])
    decay = [0.5 * (1 + math.cos(math.pi * (step - ramp) / max(total - ramp, 1))) for step in range(ramp, total + 1)]
    if ramp < total:
        assert factors[ramp:] == pytest.approx(decay)
        assert factors[ramp] == 1.0 and factors[total] == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_stays_at_the_peak_after_warmup_when_the_run_length_is_unknown():
    assert [warmup_cosine(step, 3, None) for step in range(6)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])


@pytest.mark.parametrize(
    ("batch_size", "base", "expected"), [(32, 256, 1e-3), (128, 256, 4e-3), (512, 256, 1.6e-2), (32, None, 8e-3)]
)
def test_lr_scales_linearly_with_the_global_batch(batch_size, base, expected):
    assert scaled_lr(8e-3, batch_size, base) == pytest.approx(expected)


def test_defaults_give_the_demo_rate_at_the_demo_batch():
    """8e-3 per 256 pairs is the demo's 4e-3 at its batch of 128, to the bit."""
    module = CLIPContrastive()
    assert scaled_lr(module.hparams.lr, 128, module.hparams.base_batch_size) == 0.004


# --------------------------------------------------------------------------------------------------
# The schedule in a fit: warm-up, then a cosine that ends with the run


@pytest.mark.parametrize("bound", ["max_steps", "max_epochs"])
def test_fit_follows_warmup_then_cosine_to_the_last_step(world, bound):
    # 400 pairs: 12 global batches of 32 per pass. max_epochs=2 with 2 batches per step makes 12 steps, as many as
    # the pass has batches; Lightning knows it only from the training loader's length.
    if bound == "max_steps":
        run, accumulate, total = {"max_steps": 10}, 1, 10
    else:
        run, accumulate, total = {"max_epochs": 2}, 2, 12
    L.seed_everything(0, verbose=False)
    module = CLIPContrastive(lr=8e-3, base_batch_size=256, warmup_steps=3)
    rates = LearningRates()
    trainer = _trainer(accumulate_grad_batches=accumulate, callbacks=[rates], **run)
    trainer.fit(module, LaionDataModule(str(world.root / "shards" / "*.tar"), batch_size=32))
    peak = 8e-3 * 32 * accumulate / 256  # the global batch counts the accumulated batches
    assert trainer.global_step == len(rates.rates) == total
    assert rates.rates == pytest.approx([peak * warmup_cosine(step, 3, total) for step in range(total)])
    assert max(rates.rates) == pytest.approx(peak)
    assert rates.rates[-1] < 0.1 * peak  # the cosine ends with the run, not beyond it


# --------------------------------------------------------------------------------------------------
# Validation every N steps, and the best weights exported


def test_validation_every_n_steps_is_logged_and_the_best_checkpoint_is_exported(world, tmp_path):
    L.seed_everything(0, verbose=False)
    export = tmp_path / "slug-tiny.safetensors"
    module = CLIPContrastive(warmup_steps=2, export_path=str(export))  # export="best", the default
    data = LaionDataModule(str(world.root / "shards" / "*.tar"), batch_size=32, val_sets=_val_sets(world))
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), monitor="val/top1", mode="max")
    validations = Validations()
    trainer = _trainer(
        max_steps=15,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        logger=CSVLogger(str(tmp_path), name="logs"),
        enable_checkpointing=True,
        callbacks=[checkpoint, validations],
    )
    trainer.fit(module, data)

    # every 3 steps, counted across the end of the first pass over the shards (12 batches of 32)
    assert [step for step, _ in validations.seen] == [3, 6, 9, 12, 15]
    for _, metrics in validations.seen:
        assert metrics["val/top1"] == pytest.approx((metrics["val/identities/top1"] + metrics["val/objects/top1"]) / 2)
    assert "val/top1" in trainer.progress_bar_metrics
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        logged = [float(row["val/top1"]) for row in csv.DictReader(handle) if row.get("val/top1")]
    assert logged == pytest.approx([metrics["val/top1"] for _, metrics in validations.seen])

    # The best checkpoint is the first validation with the highest top-1, and it is what was exported.
    best_step, best = max(validations.seen, key=lambda seen: seen[1]["val/top1"])
    assert f"step={best_step}" in checkpoint.best_model_path
    exported = read_state_dict(export)
    assert all(torch.equal(exported[k], v) for k, v in read_state_dict(checkpoint.best_model_path).items())

    # The exported weights, evaluated by the package's evaluator (not by fit's validation), give that top-1.
    reloaded = load_clip("slug-tiny", str(export))
    sets = ZeroShotDataModule(_val_sets(world))
    sets.transform = reloaded.preprocess
    counts = ZeroShotEvaluator(reloaded.model, reloaded.tokenizer, sets).run()
    top1 = [accuracy(counts[name])["top1"] for name in ("identities", "objects")]
    assert sum(top1) / 2 == pytest.approx(best["val/top1"])


@pytest.mark.parametrize(
    ("export", "monitored", "logged"),
    [
        ("last", True, "exported the last weights (step 4) to"),  # though a best checkpoint is kept
        (None, False, "exported the last weights (step 4; export=best, but no ModelCheckpoint monitors a metric)"),
    ],
)
def test_the_last_weights_are_exported_when_asked_or_without_a_best_checkpoint_and_the_log_says_so(
    world, tmp_path, caplog, export, monitored, logged
):
    L.seed_everything(0, verbose=False)
    path = tmp_path / "exported.safetensors"
    module = CLIPContrastive(warmup_steps=1, export_path=str(path), **({"export": export} if export else {}))
    data = LaionDataModule(str(world.root / "shards" / "*.tar"), batch_size=32, val_sets=_val_sets(world)[1:])
    callbacks = [ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), monitor="val/top1", mode="max")]
    with caplog.at_level("INFO"):
        _trainer(
            max_steps=4,
            val_check_interval=2,
            check_val_every_n_epoch=None,
            enable_checkpointing=monitored,
            num_sanity_val_steps=0,
            callbacks=callbacks if monitored else [],
        ).fit(module, data)
    exported = read_state_dict(path)
    assert all(torch.equal(exported[k], v) for k, v in module.model.state_dict().items())
    assert logged in caplog.text


# --------------------------------------------------------------------------------------------------
# Settings refused with one line


@pytest.mark.parametrize(
    ("trainer_settings", "data_settings", "message"),
    [
        (
            {"max_steps": 4, "val_check_interval": 0, "check_val_every_n_epoch": None},
            {},
            "trainer.val_check_interval must be a number of training steps >= 1",
        ),
        ({"max_steps": 4, "val_check_interval": 2}, {}, "check_val_every_n_epoch: null"),
        (
            {"max_steps": 4},
            {"val_sets": [LabelledSet("holdout", root="/no/such/folder")]},
            "LaionDataModule val_sets: Labelled set 'holdout': image folder '/no/such/folder' does not exist",
        ),
        ({"max_epochs": 1}, {"batch_size": 512}, "hold 400 pairs, fewer than one training batch of batch_size=512"),
    ],
)
def test_bad_fit_settings_are_refused_before_training(world, trainer_settings, data_settings, message):
    data = LaionDataModule(
        str(world.root / "shards" / "*.tar"), **{"batch_size": 32, "val_sets": _val_sets(world)[1:], **data_settings}
    )
    module = CLIPContrastive()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        _trainer(**trainer_settings).fit(module, data)
    assert "\n" not in str(raised.value)
    assert module.global_step == 0


def test_shards_smaller_than_one_batch_stop_a_run_bounded_by_steps(world):
    """Without a length the run cannot know beforehand; its first epoch yields no batch, and it stops there (instead
    of going through empty epochs forever)."""
    data = LaionDataModule(str(world.root / "shards" / "*.tar"), batch_size=512)
    with pytest.raises(UserError, match="The training shards yield no batch: .* batch_size=512") as raised:
        _trainer(max_steps=4).fit(CLIPContrastive(), data)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("settings", "option"),
    [
        ({"lr": 0.0}, "lr"),
        ({"base_batch_size": 0}, "base_batch_size"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"export": "final"}, "export"),
    ],
)
def test_bad_module_settings_name_the_option(settings, option):
    with pytest.raises(ConfigError, match=option) as raised:
        CLIPContrastive(**settings)
    assert raised.value.option == option


def test_bad_val_batch_size_names_the_option():
    with pytest.raises(ConfigError, match="val_batch_size must be >= 1"):
        LaionDataModule("shards/*.tar", val_batch_size=0)


def test_cli_refuses_a_negative_validation_interval_in_one_line(capsys):
    assert (
        main(
            [
                "fit",
                "--config",
                config_path("fit/tiny_clip.yaml"),
                "--data.init_args.shards=x.tar",
                "--trainer.val_check_interval=-5",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: trainer.val_check_interval must be") and "\n" not in error


# --------------------------------------------------------------------------------------------------
# The packaged config, end to end through the command line


def test_packaged_fit_config_validates_every_n_steps_and_exports(world, tmp_path):
    export = tmp_path / "slug-tiny.safetensors"
    code = main(
        [
            "fit",
            "--config",
            config_path("fit/tiny_clip.yaml"),
            f"--data.init_args.shards={world.root / 'shards' / '*.tar'}",
            f"--data.init_args.val_sets=[{{name: objects, root: {world.objects_dir}}}]",
            "--data.init_args.batch_size=32",
            "--data.init_args.num_workers=0",
            "--trainer.max_epochs=1",
            "--trainer.val_check_interval=4",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            f"--model.init_args.export_path={export}",
        ]
    )
    assert code == 0
    assert export.is_file()
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows if row.get("val/top1")] == ["3", "7", "11"]  # 0-based: after steps 4, 8, 12
    assert any(value for row in rows for key, value in row.items() if key.startswith("lr-AdamW"))
