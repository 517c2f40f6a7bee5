"""A gradient store is reused only for the inputs it was computed for (its gradient key): the same weights under
another path are reused; other shards, aliases, batch size or a touched shard are recomputed with one line that
says what changed; a store given by ``--gradients`` that does not fit, or a truncated one, is refused."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slug_lightning import GradientCollector, SlugTrainer
from slug_lightning.artifacts import save_state_dict
from slug_lightning.concepts import Concept
from slug_lightning.datamodules import LaionDataModule
from slug_lightning.demo import make_demo_world
from slug_lightning.errors import UserError
from slug_lightning.gradient_key import key_changes
from slug_lightning.gradient_store import GradientStore
from slug_lightning.partial_gradients import load_partial
from slug_lightning.trainer import reusable_store


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
        shards=3,
    )


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights


def _data(world, shards=None, aliases=(), batch_size=64, **kwargs) -> LaionDataModule:
    return LaionDataModule(
        shards or world.shards,
        concepts=[Concept(world.default_target, aliases=tuple(aliases))],
        batch_size=batch_size,
        **kwargs,
    )


@pytest.fixture(scope="module")
def stored(world, weights, tmp_path_factory):
    """A store computed by a real pass, saved where a finished run keeps it."""
    collector = GradientCollector("slug-tiny", str(weights))
    SlugTrainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    ).predict(collector, datamodule=_data(world), return_predictions=False)
    path = tmp_path_factory.mktemp("run") / "gradients.safetensors"
    collector.gradients.save(path)
    return path


def _reuse(path, world, weights, explicit=False, **data):
    return reusable_store(path, GradientCollector("slug-tiny", str(weights)), _data(world, **data), explicit)


def test_the_same_weights_under_another_path_are_reused(stored, world, weights, tmp_path, caplog):
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copy(weights, copy)
    with caplog.at_level(logging.INFO):
        store = _reuse(stored, world, copy)
    assert store is not None and store.key["fingerprint"] == GradientStore.load(stored).key["fingerprint"]
    assert "reusing" in caplog.text
    # and so is the store given explicitly
    assert _reuse(stored, world, copy, explicit=True) is not None


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"shards": "00000.tar"}, "retain shards (2 removed"),
        ({"aliases": ["Vee"]}, "concepts"),
        ({"batch_size": 16}, "global batch size 64 → 16"),
    ],
)
def test_other_inputs_are_recomputed_with_one_line_naming_the_change(stored, world, weights, change, said, caplog):
    if "shards" in change:  # the first shard alone
        change = {"shards": str(Path(world.shards).parent / change["shards"])}
    with caplog.at_level(logging.INFO):
        assert _reuse(stored, world, weights, **change) is None
    lines = [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()]
    assert len(lines) == 1 and said in lines[0] and "\n" not in lines[0], caplog.text
    with pytest.raises(UserError, match="computed for other inputs"):
        _reuse(stored, world, weights, explicit=True, **change)


def test_a_shard_rewritten_in_place_is_recomputed(stored, world, weights, tmp_path, caplog):
    shards = tmp_path / "shards"
    shutil.copytree(Path(world.shards).parent, shards)
    pattern = str(shards / Path(world.shards).name)
    # the same files elsewhere are other shards; made the reference here, then one of them is touched
    reference = tmp_path / "gradients.safetensors"
    store = GradientStore.load(stored)
    store.key = GradientCollector("slug-tiny", str(weights)).gradient_key(_data(world, shards=pattern))
    store.save(reference)
    assert _reuse(reference, world, weights, shards=pattern) is not None
    first = sorted(shards.glob("*.tar"))[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO):
        assert _reuse(reference, world, weights, shards=pattern) is None
    assert f"1 modified: {first.name}" in caplog.text


def test_other_weights_are_named_by_fingerprint(stored, world, tmp_path, tiny_clip):
    other = tmp_path / "other.safetensors"
    state = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    state["visual.proj"] += 1.0
    save_state_dict(other, state)
    with pytest.raises(UserError, match="model weights \\(fingerprint"):
        _reuse(stored, world, other, explicit=True)


def test_a_truncated_store_is_recomputed_or_refused_when_given(stored, world, weights, tmp_path, caplog):
    truncated = tmp_path / "gradients.safetensors"
    truncated.write_bytes(stored.read_bytes()[:1000])
    with caplog.at_level(logging.INFO):
        assert _reuse(truncated, world, weights) is None
    assert "cannot be read" in caplog.text
    with pytest.raises(UserError, match="cannot be read") as error:
        _reuse(truncated, world, weights, explicit=True)
    assert "\n" not in str(error.value)


def test_a_store_without_a_key_is_recomputed(stored, world, weights, tmp_path):
    old = GradientStore.load(stored)
    old.key = None
    old.save(tmp_path / "gradients.safetensors")
    assert _reuse(tmp_path / "gradients.safetensors", world, weights) is None
    assert key_changes(None, {}) == ["it records no gradient key (written by an older version)"]


def test_a_partial_checkpoint_of_other_data_says_what_changed(world, weights, tmp_path):
    collector = GradientCollector("slug-tiny", str(weights))
    key = {"gradient_key": collector.gradient_key(_data(world)), "streams": ["x", "retain"], "world_size": 1}
    other = {**key, "gradient_key": collector.gradient_key(_data(world, batch_size=8)), "world_size": 2}
    path = tmp_path / "gradients.partial.safetensors"
    save_file(
        {"__counts__": torch.zeros(3)},
        str(path),
        metadata={"format": "slug_lightning.partial/2", "key": json.dumps(other), "done": "[1, 1]"},
    )
    with pytest.warns(UserWarning, match="global batch size 8 → 64; device count 2 → 1"):
        assert load_partial(path, key, 2) is None
    save_file(
        {"__counts__": torch.zeros(3)},
        str(path),
        metadata={"format": "slug_lightning.partial/2", "key": json.dumps(key), "done": "[1, 1]"},
    )
    assert load_partial(path, key, 2) is not None
