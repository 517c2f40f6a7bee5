"""The saved gradient store: an exact round trip of tensors and metadata, written atomically."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from slug_lightning.artifacts import atomic_path
from slug_lightning.gradient_store import GradientStore

LAYERS = ["visual.proj", "visual.transformer.resblocks.0.attn.in_proj_weight", "text_projection"]


def _grads(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "visual.proj": (6, 4),
        "visual.transformer.resblocks.0.attn.in_proj_weight": (12, 4),
        "text_projection": (5, 4),
    }
    return {name: torch.randn(shapes[name], generator=generator) for name in LAYERS}


def _store(concepts: list[str]) -> GradientStore:
    return GradientStore(
        forget={concept: _grads(i + 1) for i, concept in enumerate(concepts)},
        retain=_grads(0),
        forget_samples={concept: 10 + i for i, concept in enumerate(concepts)},
        retain_samples=1234,
        skipped_samples=7,
        model={"name": "slug-tiny", "pretrained": "runs/demo/fit/slug-tiny.safetensors"},
    )


def _assert_same(loaded: GradientStore, store: GradientStore) -> None:
    assert loaded.concepts == store.concepts
    assert sorted(loaded.layers) == sorted(store.layers)  # the order has its own test
    for concept in store.concepts:
        assert loaded.forget[concept].keys() == store.forget[concept].keys(), concept
        for name, grad in store.forget[concept].items():
            assert torch.equal(loaded.forget[concept][name], grad), (concept, name)
    for name, grad in store.retain.items():
        assert torch.equal(loaded.retain[name], grad), name
    assert loaded.forget_samples == store.forget_samples
    assert loaded.retain_samples == store.retain_samples
    assert loaded.skipped_samples == store.skipped_samples
    assert loaded.model == store.model


def test_round_trip_with_awkward_concept_names(tmp_path):
    store = _store(["Elon Musk", "AC/DC live", "retain", "cat"])
    path = tmp_path / "run" / "gradients.safetensors"
    store.save(path)
    _assert_same(GradientStore.load(path), store)
    assert sorted(os.listdir(path.parent)) == ["gradients.safetensors"]  # no temporary file left


def test_round_trip_when_one_concept_name_is_a_prefix_of_another(tmp_path):
    store = _store(["AC", "AC/DC", "AC/DC/live"])
    path = tmp_path / "gradients.safetensors"
    store.save(path)
    _assert_same(GradientStore.load(path), store)


def test_load_keeps_the_layer_order(tmp_path):
    """Layer order is the row order of layers.csv and the order of the search: a reused store must give
    the same as the freshly computed one (safetensors itself sorts its keys)."""
    store = _store(["cat", "dog"])
    path = tmp_path / "gradients.safetensors"
    store.save(path)
    loaded = GradientStore.load(path)
    assert loaded.layers == LAYERS
    assert [list(grads) for grads in loaded.forget.values()] == [LAYERS, LAYERS]


def test_load_refuses_other_safetensors_files(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a gradient store written by slug_lightning"):
        GradientStore.load(path)


def test_saved_metadata_is_readable_json(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "gradients.safetensors"
    _store(["Elon Musk"]).save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert json.loads(metadata["concepts"]) == ["Elon Musk"]
    assert json.loads(metadata["forget_samples"]) == {"Elon Musk": 10}
    assert keys == {f"retain/{n}" for n in LAYERS} | {f"forget/Elon Musk/{n}" for n in LAYERS}


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out" / "report.json"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("boom")
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_atomic_path_keeps_an_existing_target_on_error(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("previous run")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new run, interrupted")
            raise KeyboardInterrupt
    assert target.read_text() == "previous run"
    assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_path_replaces_the_target_on_success(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("previous run")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new run")
        assert target.read_text() == "previous run"  # untouched until the block succeeds
    assert target.read_text() == "new run"
    assert os.listdir(tmp_path) == ["report.json"]


def test_failed_store_save_keeps_the_previous_store(tmp_path, monkeypatch):
    path = tmp_path / "gradients.safetensors"
    old = _store(["cat"])
    old.save(path)
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    # GradientStore.save imports save_file from safetensors.torch when called, so the patch applies.
    with pytest.raises(OSError, match="disk full"):
        _store(["dog"]).save(path)
    _assert_same(GradientStore.load(path), old)
    assert os.listdir(tmp_path) == ["gradients.safetensors"]
