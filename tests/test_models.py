"""Loading OpenCLIP models: names, tags, local checkpoints (safetensors, torch, Lightning), their errors."""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import slug_lightning  # noqa: F401  (registers slug-tiny with open_clip)
from slug_lightning.errors import UserError
from slug_lightning.models import ModelLoadError, check_pretrained, checkpoint_format, load_clip, read_state_dict

# Same depth as slug-tiny (so the same parameter names) but other widths: only shapes differ.
OTHER_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; cloning gives each tensor its own.
    return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.fixture
def no_model_creation(monkeypatch):
    """Fail the test if anything tries to build a model or fetch pretrained weights."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"must not be called here (args={args}, kwargs={kwargs})")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden)
    monkeypatch.setattr(open_clip, "create_model", forbidden)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", forbidden)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", forbidden)


def test_load_clip_returns_model_preprocess_and_tokenizer(tiny_clip):
    assert isinstance(tiny_clip.model, open_clip.CLIP)
    assert tiny_clip.name == "slug-tiny" and tiny_clip.pretrained is None
    assert not tiny_clip.model.training
    image = tiny_clip.preprocess(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert image.shape == (3, 32, 32)
    tokens = tiny_clip.tokenizer(["a photo of a cat.", "a dog"])
    assert tokens.shape == (2, 20)  # slug-tiny's context length
    with torch.no_grad():
        assert tiny_clip.model.encode_image(image[None]).shape == (1, 64)
        assert tiny_clip.model.encode_text(tokens).shape == (2, 64)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tiny_clip, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(_tensors(tiny_clip.model), str(path))
    else:
        torch.save(tiny_clip.model.state_dict(), path)
    torch.manual_seed(123)  # another random initialisation, so equality below comes from the file
    fresh = load_clip("slug-tiny").model
    assert not torch.equal(fresh.visual.proj, tiny_clip.model.visual.proj)
    torch.manual_seed(123)
    loaded = load_clip("slug-tiny", str(path))
    assert loaded.pretrained == str(path)
    _assert_same_weights(loaded.model, tiny_clip.model)


def test_safetensors_checkpoint_loads_in_plain_open_clip(tiny_clip, tmp_path):
    path = tmp_path / "slug-tiny.safetensors"
    save_file(_tensors(tiny_clip.model), str(path))
    model = open_clip.create_model("slug-tiny", pretrained=str(path))
    _assert_same_weights(model, tiny_clip.model)


@pytest.mark.parametrize("prefix", ["model.", "module."])
def test_lightning_checkpoint_prefix_is_stripped(tiny_clip, tmp_path, prefix):
    path = tmp_path / "last.ckpt"
    state = {prefix + name: tensor for name, tensor in tiny_clip.model.state_dict().items()}
    torch.save({"epoch": 3, "global_step": 70, "state_dict": state}, path)
    _assert_same_weights(load_clip("slug-tiny", str(path)).model, tiny_clip.model)


def test_safetensors_with_lightning_prefix_loads(tiny_clip, tmp_path):
    """A LightningModule's ``state_dict()`` saved as safetensors keeps ``model.``; torch files strip it."""
    path = tmp_path / "module.safetensors"
    save_file({f"model.{name}": t for name, t in _tensors(tiny_clip.model).items()}, str(path))
    _assert_same_weights(load_clip("slug-tiny", str(path)).model, tiny_clip.model)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ModelLoadError, match="Unknown OpenCLIP model 'ViT-B-33'") as error:
        load_clip("ViT-B-33")
    assert "Did you mean" in str(error.value) and "'ViT-B-32'" in str(error.value)
    assert isinstance(error.value, UserError)  # shown as one line by the CLI
    assert len(str(error.value)) <= 200  # not the list of every open_clip config


def test_unknown_model_name_without_close_names_is_short():
    with pytest.raises(ModelLoadError) as error:
        load_clip("zzzz")
    message = str(error.value)
    assert "open_clip.list_models()" in message and len(message) <= 200


def test_unknown_pretrained_tag_lists_valid_tags_without_downloading(no_model_creation):
    with pytest.raises(ModelLoadError) as error:
        load_clip("ViT-B-32", "laion400m_e33")
    message = str(error.value)
    assert "'laion400m_e33' is neither a pretrained tag of 'ViT-B-32'" in message
    assert "Did you mean 'laion400m_e32'" in message
    assert len(message) <= 200


def test_known_tag_passes_the_check_without_downloading(no_model_creation):
    check_pretrained("ViT-B-32", "laion400m_e32")  # no error, nothing created


def test_tag_for_a_model_without_published_weights(no_model_creation):
    with pytest.raises(ModelLoadError, match="'slug-tiny' has no published weights"):
        load_clip("slug-tiny", "openai")


@pytest.mark.parametrize("name", ["missing.safetensors", "sub/dir/missing.pt"])
def test_missing_checkpoint_file(tmp_path, name, no_model_creation):
    path = tmp_path / name
    with pytest.raises(ModelLoadError, match="does not exist") as error:
        load_clip("slug-tiny", str(path))
    assert str(path) in str(error.value)


def test_checkpoint_of_another_architecture(tmp_path):
    torch.manual_seed(0)
    other = open_clip.CLIP(**OTHER_ARCHITECTURE)
    path = tmp_path / "other.safetensors"
    save_file(_tensors(other), str(path))
    with pytest.raises(ModelLoadError) as error:
        load_clip("slug-tiny", str(path))
    message = str(error.value)
    assert "does not fit this architecture" in message and "shape mismatches" in message
    assert "text_projection: checkpoint (32, 32) vs model (64, 64)" in message
    assert "missing keys" not in message  # same names, only shapes differ


def test_checkpoint_with_missing_keys(tiny_clip, tmp_path):
    state = tiny_clip.model.state_dict()
    dropped = ["logit_scale", "visual.proj"]
    path = tmp_path / "partial.pt"
    torch.save({name: t for name, t in state.items() if name not in dropped}, path)
    with pytest.raises(ModelLoadError, match="2 missing keys") as error:
        load_clip("slug-tiny", str(path))
    assert all(name in str(error.value) for name in dropped)


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"a": 1, "b": [2, 3]}, path)
    with pytest.raises(ModelLoadError, match="does not hold a state dict of tensors"):
        load_clip("slug-tiny", str(path))


def test_corrupt_safetensors_is_a_model_load_error(tmp_path):
    """A damaged file must be reported as the user's problem (one line), not as a crash."""
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"this is not a safetensors file" * 4)
    with pytest.raises(ModelLoadError, match="broken.safetensors"):
        load_clip("slug-tiny", str(path))


@pytest.mark.parametrize("name", ["weights.pt", "weights.bin", "weights"])
def test_safetensors_under_another_name_is_read_as_safetensors(tiny_clip, tmp_path, name):
    """What a file is, its first bytes say: a safetensors file named .pt is not refused as pickled code."""
    path = tmp_path / name
    save_file(_tensors(tiny_clip.model), str(path))
    assert checkpoint_format(path) == "safetensors"
    _assert_same_weights(load_clip("slug-tiny", str(path)).model, tiny_clip.model)


def test_torch_file_named_safetensors_is_read_as_a_torch_file(tiny_clip, tmp_path):
    path = tmp_path / "weights.safetensors"
    torch.save(_tensors(tiny_clip.model), path)
    assert checkpoint_format(path) == "zip"
    _assert_same_weights(load_clip("slug-tiny", str(path)).model, tiny_clip.model)


def test_file_of_neither_format_says_so(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights")
    assert checkpoint_format(path) is None
    with pytest.raises(ModelLoadError, match="neither safetensors nor a torch checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize("open_clip_dir", [False, True])
def test_directory_as_pretrained_names_what_to_give_instead(tmp_path, open_clip_dir, no_model_creation):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_model.safetensors").write_bytes(b"")
    if open_clip_dir:
        (folder / "open_clip_config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as error:
        load_clip("slug-tiny", str(folder))
    message = str(error.value)
    assert "is a directory, not a weights file" in message and "does not exist" not in message
    assert "open_clip_model.safetensors" in message
    assert (f"model_name: local-dir:{folder}" in message) == open_clip_dir
    with pytest.raises(ModelLoadError, match="is a directory"):
        read_state_dict(folder)


class _RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _WritesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("payload", [_RunsShellCommand, _WritesFile])
@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_malicious_pickle_is_refused_and_never_executed(tiny_clip, tmp_path, payload, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    state = dict(tiny_clip.model.state_dict())
    state["logit_scale"] = payload(marker)
    torch.save({"state_dict": state}, path)
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match="Refusing to load") as error:
        load_clip("slug-tiny", str(path))
    assert str(path) in str(error.value)
    assert not marker.exists(), "unpickling ran the payload"
