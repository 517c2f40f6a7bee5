"""The gradient pass on several CPU processes (gloo) whatever each rank's share of a global batch: empty shares
(global batch 1, or fewer pairs than ranks in the final batch) and uneven ones (a batch size that is not a multiple
of the device count) give the gradients of one process, and no rank waits in a collective the others skip.

Each world size is one launch of a small script that runs every batch size in turn, as several Trainers of one
program; rank 0 saves each store, and the test compares them with one process's stores.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from slug_lightning import GradientCollector, SlugTrainer
from slug_lightning.concepts import Concept
from slug_lightning.datamodules import LaionDataModule
from slug_lightning.demo import make_demo_world
from slug_lightning.gradient_store import GradientStore

pytestmark = pytest.mark.ddp

SCRIPT = """
import sys
import torch
from slug_lightning import GradientCollector, SlugTrainer
from slug_lightning.concepts import Concept
from slug_lightning.datamodules import LaionDataModule

torch.set_num_threads(1)
shards, concept, devices, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for batch_size in map(int, sys.argv[5:]):
    torch.manual_seed(0)
    collector = GradientCollector("slug-tiny")
    data = LaionDataModule(shards, concepts=[Concept(concept)], batch_size=batch_size)
    trainer = SlugTrainer(accelerator="cpu", devices=devices, strategy="ddp", logger=False,
                          enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.predict(collector, datamodule=data, return_predictions=False)
    if trainer.is_global_zero:
        collector.gradients.save(f"{out}/gradients_{batch_size}.safetensors")
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        portraits_per_person=2,
        person_object_per_person=1,
        samples_per_object=2,
        scenery_samples=6,
        eval_per_person=1,
        eval_per_object=1,
        shards=2,
    )


def _one_process(world, batch_size: int) -> GradientStore:
    torch.manual_seed(0)
    collector = GradientCollector("slug-tiny")
    data = LaionDataModule(world.shards, concepts=[Concept(world.default_target)], batch_size=batch_size)
    SlugTrainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    ).predict(collector, datamodule=data, return_predictions=False)
    return collector.gradients


def _batch_sizes(world, devices: int) -> list[int]:
    """Global batches that leave ranks empty or uneven: 1 (every rank but one empty in every batch), and a size that
    is not a multiple of ``devices`` whose final retain batch holds a single pair."""
    data = LaionDataModule(world.shards, concepts=[Concept(world.default_target)])
    retain = data.count_pairs(None)
    return [1, next(b for b in range(devices + 1, retain) if b % devices and retain % b == 1)]


# 3 processes: with a global batch of 1 two ranks are empty in every batch, and the other size leaves them uneven.
# (2 processes with a batch that splits unevenly: test_end_to_end.py's DDP run.)
@pytest.mark.parametrize("devices", [3])
def test_uneven_and_empty_shares_give_the_one_process_gradients(world, tmp_path, devices):
    batch_sizes = _batch_sizes(world, devices)
    script = tmp_path / "collect.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            world.shards,
            world.default_target,
            str(devices),
            str(tmp_path),
            *map(str, batch_sizes),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for batch_size in batch_sizes:
        one, many = (
            _one_process(world, batch_size),
            GradientStore.load(tmp_path / f"gradients_{batch_size}.safetensors"),
        )
        assert (many.retain_samples, many.forget_samples) == (one.retain_samples, one.forget_samples)
        for stream, expected, got in [
            ("retain", one.retain, many.retain),
            *[(c, one.forget[c], many.forget[c]) for c in one.forget],
        ]:
            assert got.keys() == expected.keys()
            for name in expected:
                error = (got[name] - expected[name]).norm()
                assert error <= 1e-4 * expected[name].norm() + 1e-12, (batch_size, stream, name, error.item())
