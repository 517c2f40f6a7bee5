"""Loading OpenCLIP models: by name and pretrained tag, from a local checkpoint, or from a hub id.

Everything here returns the same triple the rest of the package works with: the model, its evaluation
preprocessing (PIL image → tensor) and its tokenizer. Checkpoints are never unpickled: safetensors, or
``torch.load(weights_only=True)``; which of the two a file is, its first bytes tell (:func:`checkpoint_format`),
not its name.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import struct
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from slug_lightning.errors import UserError

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HUB_SCHEMAS = ("hf-hub:", "local-dir:")


def register_model_configs() -> None:
    """Make the package's model configs (``slug-tiny``) known to open_clip, e.g. to
    ``open_clip.create_model("slug-tiny")``. Done when this module is imported; calling it again is harmless."""
    open_clip.add_model_config(MODEL_CONFIGS)


register_model_configs()


class ModelLoadError(UserError):
    """A model name, pretrained tag or checkpoint that cannot be used; the message says why."""


@dataclass
class LoadedCLIP:
    """A CLIP model with the preprocessing and tokenizer that belong to it.

    ``preprocess`` is the evaluation transform; ``train_preprocess`` the training one (OpenCLIP's random
    resized crop), which the paper's retain gradient sees (``LaionDataModule(retain_augmentation=True)``).
    """

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str | None
    train_preprocess: Callable[[Any], torch.Tensor] | None = None


def _suggest(value: str, valid: list[str], what: str) -> str:
    """A short hint: the closest valid values, else how many there are and where to list them."""
    close = difflib.get_close_matches(value, valid, n=3, cutoff=0.5)
    if close:
        return f" Did you mean {', '.join(map(repr, close))}?"
    listing = ", ".join(valid[:4]) + (f", ... ({len(valid)} in all)" if len(valid) > 4 else "")
    return f" Valid {what}: {listing}."


def check_model_name(model_name: str) -> None:
    """Raise :class:`ModelLoadError` unless ``model_name`` is a known OpenCLIP config or a hub/local-dir id."""
    if model_name.startswith(HUB_SCHEMAS):
        return
    if model_name.replace("/", "-") not in open_clip.list_models():
        raise ModelLoadError(
            f"Unknown OpenCLIP model {model_name!r}."
            + _suggest(model_name, open_clip.list_models(), "names (open_clip.list_models())")
        )


def check_pretrained(model_name: str, pretrained: str | None) -> None:
    """Raise :class:`ModelLoadError` unless ``pretrained`` is None, a tag of ``model_name``, or an existing file."""
    if pretrained is None or model_name.startswith(HUB_SCHEMAS):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        return
    path = Path(pretrained).expanduser()
    if path.is_dir():
        raise ModelLoadError(directory_message(path, pretrained))
    looks_like_path = path.suffix in CHECKPOINT_SUFFIXES or "/" in pretrained or "\\" in pretrained
    if looks_like_path and not path.is_file():
        raise ModelLoadError(f"Checkpoint file {pretrained!r} does not exist.")
    if not path.is_file():
        message = f"{pretrained!r} is neither a pretrained tag of {model_name!r} nor a checkpoint file."
        if tags:
            message += _suggest(pretrained, tags, "tags")
        else:
            message += f" {model_name!r} has no published weights: give a checkpoint file, or none."
        raise ModelLoadError(message)


def directory_message(path: Path, given: str) -> str:
    """Why a directory is not a checkpoint, and what to give instead: a weights file in it, or the directory as
    ``model_name: local-dir:...`` when it is an open_clip model directory."""
    weights = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    message = f"Checkpoint {given!r} is a directory, not a weights file."
    if weights:
        message += (
            f" Give one of the weights files in it: {', '.join(weights[:5])}"
            + (" ..." if len(weights) > 5 else "")
            + "."
        )
    if (path / "open_clip_config.json").is_file():
        message += (
            f" It is an open_clip model directory: load it whole with model_name: local-dir:{path} and "
            "pretrained: null."
        )
    elif not weights:
        message += " It holds no weights file (.safetensors, .pt, .pth, .bin, .ckpt)."
    return message


def checkpoint_format(path: str | Path) -> str | None:
    """What a checkpoint file is, from its first bytes, whatever its name: ``"safetensors"`` (an 8-byte header
    length, then a JSON header), ``"zip"`` (``torch.save``'s format), ``"pickle"`` (``torch.save``'s legacy
    format), or None (none of these).
    """
    with open(path, "rb") as file:
        head = file.read(9)
        size = Path(path).stat().st_size
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        (header_length,) = struct.unpack("<Q", head[:8])
        if header_length <= size - 8:
            return "safetensors"
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a weights-only torch file (Lightning checkpoints included); which
    one the file is, its content tells (:func:`checkpoint_format`), not its extension.

    Raises:
        ModelLoadError: if the file is missing, is a directory, is neither format, holds pickled code
            (refused, never executed), or holds no tensors.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ModelLoadError(directory_message(path, str(path)))
    if not path.is_file():
        raise ModelLoadError(f"Checkpoint file {str(path)!r} does not exist.")
    kind = checkpoint_format(path)
    if kind is None:
        raise ModelLoadError(
            f"Checkpoint {str(path)!r} is neither safetensors nor a torch checkpoint (its first "
            "bytes match neither format); give an OpenCLIP state dict in one of them."
        )
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_prefixes(load_file(str(path)))
        except SafetensorError as error:
            raise ModelLoadError(f"Cannot read safetensors checkpoint {str(path)!r}: {error}") from None
    try:
        with open(path, "rb") as file:  # a file object: torch guesses nothing from the name
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"Refusing to load {str(path)!r}: not a weights-only checkpoint (loading it would run pickled code). "
            "Convert it to safetensors with a tool you trust."
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ModelLoadError(f"Cannot read checkpoint {str(path)!r}: {error}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelLoadError(f"Checkpoint {str(path)!r} does not hold a state dict of tensors.")
    return strip_prefixes(checkpoint)


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.`` from DDP, ``model.`` from this package's LightningModules)."""
    for prefix in ("module.", "model."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` strictly, turning key and shape mismatches into one readable error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own
        if key in state_dict and own[key].shape != state_dict[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    if problems:
        raise ModelLoadError(
            f"Checkpoint {source!r} does not fit this architecture: "
            + "; ".join(problems)
            + ". Check that the model name matches the checkpoint."
        )
    model.load_state_dict(state_dict, strict=True)


def load_clip(model_name: str = "slug-tiny", pretrained: str | None = None) -> LoadedCLIP:
    """Create an OpenCLIP model with its evaluation and training preprocessing and its tokenizer.

    Args:
        model_name: An OpenCLIP config name (``"ViT-B-32"``, the packaged ``"slug-tiny"``), or an
            ``hf-hub:org/repo`` / ``local-dir:/path`` id.
        pretrained: A pretrained tag of that model (``"laion400m_e32"``, downloaded by open_clip into its
            cache), a local checkpoint file (``.safetensors`` or a weights-only torch file, including
            Lightning ``.ckpt`` files of this package), or None for random initialisation.

    Raises:
        ModelLoadError: for an unknown name or tag, a missing file, an unsafe or mismatched checkpoint.
    """
    check_model_name(model_name)
    check_pretrained(model_name, pretrained)
    is_file = pretrained is not None and Path(pretrained).expanduser().is_file()
    tag = None if is_file else pretrained
    try:
        with _quiet_root_logger(tag is None):
            model, train_preprocess, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=tag)
    except RuntimeError as error:
        raise ModelLoadError(f"Cannot create {model_name!r} with pretrained={pretrained!r}: {error}") from None
    if is_file:
        load_into(model, read_state_dict(pretrained), pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    return LoadedCLIP(model, preprocess, tokenizer, model_name, pretrained, train_preprocess)


@contextmanager
def _quiet_root_logger(quiet: bool):
    # open_clip warns "No pretrained weights loaded" on the root logger even when we load a checkpoint
    # ourselves right after, or when random initialisation is what was asked for.
    logger = logging.getLogger()
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())
