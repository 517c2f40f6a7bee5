"""Progress: Lightning's bars with true totals in a terminal, whole lines elsewhere, one line per searched layer, and
each probe for every logger with its concept and layer in the tag."""

from __future__ import annotations

import csv
import math
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

from slug_lightning import console
from slug_lightning.callbacks import progress
from slug_lightning.callbacks.progress import SlugProgressBar, epoch_description, fit_steps
from slug_lightning.callbacks.progress_lines import LineReporter, ProgressLines
from slug_lightning.callbacks.search_progress import LINES, SearchProgress
from slug_lightning.joint_search import JointSearch, SearchRule
from slug_lightning.layers import LayerStats, short_name
from slug_lightning.trainer import SlugTrainer


class Stream(IterableDataset):
    """``count`` batches of 2 vectors and no length, as the gradient streams and the fit's pairs."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        return iter([torch.ones(2, 2)] * self.count)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return None  # as the gradient pass: it sums, it predicts nothing

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Streams(L.LightningDataModule):
    """A forget stream the datamodule can count and a retain stream it cannot, as LaionDataModule's."""

    def train_dataloader(self):
        return DataLoader(Stream(3), batch_size=None)

    def predict_dataloader(self):
        return [DataLoader(Stream(3), batch_size=None), DataLoader(Stream(5), batch_size=None)]

    def predict_streams(self):
        return [("forget A", 3), ("retain", None)]


def _run(capsys, bar, max_steps=8):
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        callbacks=[bar],
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Tiny(), datamodule=Streams())
    trainer.predict(Tiny(), datamodule=Streams(), return_predictions=False)
    return capsys.readouterr()


def test_lines_are_whole_lines_with_true_totals(capsys):
    captured = _run(capsys, ProgressLines(every=25, interval=0.0))
    assert "\r" not in captured.err and not captured.out
    lines = captured.err.splitlines()
    # the fit: by its steps, every 25 %, with the time left and the progress bar's metrics, then its end
    steps = [line for line in lines if line.startswith("Training:")]
    assert [re.match(r"Training: (\d/8 steps \(\d+%\)|8 steps in)", s).group(1) for s in steps] == [
        "2/8 steps (25%)",
        "4/8 steps (50%)",
        "6/8 steps (75%)",
        "8 steps in",
    ]
    assert all("train/loss" in s for s in steps) and all(" left" in s for s in steps[:-1])
    # the streams, named: a known total with the time left, an unknown one without it
    forget = [line for line in lines if line.startswith("Predicting forget A:")]
    assert forget[-1].startswith("Predicting forget A: 3 batches in") and "1/3 batches (33%)" in forget[0]
    retain = [line for line in lines if line.startswith("Predicting retain:")]
    assert retain[-1].startswith("Predicting retain: 5 batches in")
    assert not any("left" in line or "/" in line for line in retain)


def test_bars_count_a_fit_by_its_steps_and_the_streams_by_their_batches(capsys):
    err = _run(capsys, SlugProgressBar(), max_steps=8).err
    final = {}  # each bar's last state
    for state in re.split(r"[\r\n]", err):
        name = state.split(":")[0]
        if state.strip():
            final[name] = state
    assert "8/8" in final["Training"] and "epoch" in final["Training"]
    assert not any(name.startswith("Epoch") for name in final)  # not one bar per pass over a stream
    assert "3/3" in final["Predicting forget A"]
    assert re.match(r"Predicting retain: 5 \[\d\d:\d\d, ", final["Predicting retain"])  # no total, no time left


def test_descriptions_of_fits_bounded_by_steps_and_by_epochs():
    by_steps = SimpleNamespace(max_steps=500, max_epochs=-1, current_epoch=11)
    by_epochs = SimpleNamespace(max_steps=-1, max_epochs=12, current_epoch=3)
    assert fit_steps(by_steps) == 500 and fit_steps(by_epochs) is None
    assert epoch_description(by_epochs) == "Epoch 3/11"
    assert epoch_description(by_steps) == "Epoch 11"  # not "Epoch 11/-2"


def test_a_phase_of_unknown_length_writes_a_line_per_interval():
    ticks = iter([0.0, 30.0, 61.0, 90.0, 125.0, 130.0])
    phase = LineReporter("Predicting retain", interval=60.0, clock=lambda: next(ticks))
    assert [phase.update(n) for n in (1, 2, 3, 4)] == [
        None,
        "Predicting retain: 2 batches, 01:01 elapsed",
        None,
        "Predicting retain: 4 batches, 02:05 elapsed",
    ]
    assert phase.finish() == "Predicting retain: 4 batches in 02:10"


def _bar(**kwargs):
    trainer = SlugTrainer(logger=False, enable_model_summary=False, enable_checkpointing=False, **kwargs)
    return trainer.progress_bar_callback


def test_the_trainer_shows_the_progress_for_where_it_goes(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert isinstance(_bar(), SlugProgressBar)
    monkeypatch.setattr(progress, "interactive", lambda: False)
    assert isinstance(_bar(), ProgressLines)
    # the user's choices stand
    assert _bar(enable_progress_bar=False) is None
    own = TQDMProgressBar()
    assert _bar(callbacks=[own]) is own
    console.configure_output("quiet")
    try:
        assert _bar() is None
        assert _bar(callbacks=own) is own
    finally:
        console.configure_output("normal")


# --- the search --------------------------------------------------------------------------------------------------


class Editor:
    """Layer ``a`` forgets once λ >= 3, layer ``b`` never; the test accuracy is 1 / (1 + λ)."""

    def _summary(self, layer=None, step=0.0):
        forgotten = layer == "a" and step >= 3.0
        forget = {"x": {"top1": 0.0 if forgotten else 0.5, "top5": 1.0, "count": 4}}
        return {"forget": forget, "test": {"objects": {"top1": 1 / (1 + step), "top5": 1.0, "count": 8}}}

    def evaluate(self):
        return self._summary()

    def probe(self, layer, step_size, direction, needs_tests=None):
        return self._summary(layer, step_size)

    def shift(self, changes):
        return self._summary()

    reset = shift


def _search(listener, layers=("a", "b")):
    # weight norm 10, gradient norm 1: each layer's first λ is 1
    front = [LayerStats(name, "vision", 1.0, 0.1, 10.0, 1.0, front=1) for name in layers]
    gradients = {"x": {name: torch.ones(1) for name in layers}}
    search = JointSearch(Editor(), {"x": front}, gradients, SearchRule(metric="top1", steps_per_layer=5), listener)
    search.run(["x"])
    return search


def test_the_search_writes_one_line_per_layer(capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    listener = SearchProgress(None, "top1")
    assert listener.display == LINES
    search = _search(listener)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2
    probes_a = sum(p.layer == "a" for p in search.probes)
    forgetting = min(p.step_size for p in search.probes if p.layer == "a" and p.forget_top1 == 0.0)
    assert lines[0] == (
        f"search x · layer 1/2 {short_name('a')}: {probes_a} probes, forgets at λ={forgetting:.4g}: forget top1 0.000, "
        f"test top1 objects {1 / (1 + forgetting):.3f}"
    )
    top = max(p.step_size for p in search.probes if p.layer == "b")
    assert (
        lines[1].startswith(f"search x · layer 2/2 {short_name('b')}: 5 probes, not forgotten up to λ=")
        and f"{top:.4g}" in lines[1]
    )


def test_every_logger_gets_each_probe_tagged_by_concept_and_layer(tmp_path):
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    trainer = SimpleNamespace(loggers=loggers, is_global_zero=True, progress_bar_callback=None)
    search = _search(SearchProgress(trainer, "top1"))
    for logger in loggers:
        logger.finalize("success")
    with open(loggers[1].log_dir + "/metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for layer in ("a", "b"):
        tag = f"search/x/{layer}/step_size"
        logged = [(int(row["step"]), float(row[tag])) for row in rows if row.get(tag)]
        assert logged == [(p.step, p.step_size) for p in search.probes if p.layer == layer]  # 0, 1, 2, ... per layer
    scalars = tensorboard_scalars(tmp_path / "tb")
    for probe in search.probes:
        assert scalars[f"search/x/{probe.layer}/forget_top1"][probe.step] == pytest.approx(probe.forget_top1)
    assert len(scalars["search/x/a/forget_top1"]) == sum(p.layer == "a" for p in search.probes)


def tensorboard_events(folder):
    """Every event of the TensorBoard event files under ``folder`` (TFRecord framing: length, CRC, data, CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            length = int.from_bytes(data[at : at + 8], "little")
            yield Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    scalars: dict[str, dict[int, float]] = {}
    for event in tensorboard_events(folder):
        for value in event.summary.value:
            if value.HasField("simple_value") and math.isfinite(value.simple_value):
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars
