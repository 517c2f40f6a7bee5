"""Hugging Face weight directories on disk: finding a CLIP tower in safetensors files (single, variant or
sharded) and writing an edited copy of a directory tree that rewrites only the files holding changed
tensors and links (or copies) everything else. The input is never written to.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from slug_lightning.errors import UserError
from slug_lightning.hf import LINK_MODES
from slug_lightning.hf.mapping import Layout

# Pickled weight formats: never read here (only safetensors are edited), and never carried into an output
# where a loader might prefer the unedited copy to the edited safetensors.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files directly in ``directory`` (variants and shards alike), sorted.

    Raises:
        UserError: if the directory is missing or holds no safetensors file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory.")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_WEIGHTS)
        hint = (
            f" It holds {', '.join(pickled)}: save it again with safetensors (save_pretrained does by "
            "default); pickled weights are never unpickled here."
            if pickled
            else ""
        )
        raise UserError(f"{str(directory)!r} holds no .safetensors weights.{hint}")
    return files


def keys_by_file(files: Iterable[Path]) -> dict[Path, list[str]]:
    """Tensor names of each safetensors file, without reading the tensors."""
    from safetensors import safe_open

    result = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            result[path] = list(handle.keys())
    return result


def find_tower(directory: Path, tower: str) -> tuple[Layout, dict[Path, list[str]]]:
    """Locate a CLIP tower in the safetensors files of ``directory``.

    The names of all files together are searched, so a tower split over shards is found, and variants
    (``model.safetensors`` beside ``model.fp16.safetensors``) share one layout.

    Returns:
        The layout and every file's tensor names.
    """
    keys = keys_by_file(weight_files(directory))
    union = dict.fromkeys(k for names in keys.values() for k in names)
    try:
        layout = Layout.find(union, tower)
    except UserError as error:
        raise UserError(f"{str(directory)!r}: {error}") from None
    return layout, keys


def read_tower(directory: Path, tower: str) -> tuple[Layout, dict[str, Tensor], dict]:
    """The tensors of a CLIP tower in ``directory`` (one variant: the first file that holds each key).

    Returns:
        ``(layout, {checkpoint key: tensor}, config)`` where ``config`` is ``config.json`` (or ``{}``).
    """
    from safetensors import safe_open

    layout, keys = find_tower(directory, tower)
    wanted = set(layout.canonical(dict.fromkeys(k for names in keys.values() for k in names)))
    tensors = {}
    for path in preferred_first(keys):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key in wanted and key not in tensors:
                    tensors[key] = handle.get_tensor(key)
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return layout, tensors, config


def preferred_first(keys: Mapping[Path, list[str]]) -> list[Path]:
    # Full-precision files first: when variants hold the same tensor, read the most precise one.
    return sorted(keys, key=lambda p: (any(v in p.name for v in (".fp16.", ".bf16.", ".half.")), p.name))


def check_output(source: Path, output: Path) -> None:
    """Refuse an output that exists (non-empty), equals the source, or lies inside it.

    Raises:
        UserError: naming the problem.
    """
    source, output = Path(source).resolve(), Path(output).resolve()
    if output == source or source in output.parents:
        raise UserError(
            f"The output {str(output)!r} must lie outside the input {str(source)!r}; the input is never written to."
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"The output {str(output)!r} already exists and is not empty; choose a new directory.")


def write_edited_tree(
    source: Path,
    output: Path,
    edits: Mapping[Path, Mapping[str, Tensor]],
    link: str = "symlink",
    drop: Iterable[Path] = (),
    extra: Mapping[str, Callable[[Path, dict], None]] | None = None,
) -> dict[str, list[str]]:
    """Write ``output`` as a copy of the tree ``source`` in which only the edited files are new.

    Every file of ``edits`` (a safetensors file of ``source``) is written again with its tensors, the
    tensors named in its mapping replaced (cast to the stored dtype; the file's metadata kept). Files in
    ``drop`` are left out. Every other file is linked or copied. The tree is assembled in a temporary
    sibling directory and renamed into place at the end, so ``output`` is either complete or absent.

    Args:
        source: The input directory (read only).
        output: The new directory; must not exist or be empty (see :func:`check_output`).
        edits: Source file path → {tensor name: new value}.
        link: How unchanged files get into the output: ``"symlink"`` (absolute links into ``source``: no
            space used, but the output depends on the input staying where it is), ``"hardlink"`` (same
            file system only) or ``"copy"``.
        drop: Source files to leave out.
        extra: Output-relative file name → a function writing that file, given its path and the returned
            record of what happened to the other files.

    Returns:
        ``{"rewritten": [...], "linked": [...], "dropped": [...]}`` of source-relative paths.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if link not in LINK_MODES:
        raise UserError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}.")
    source, output = Path(source).resolve(), Path(output).resolve()
    check_output(source, output)
    edits = {Path(p).resolve(): tensors for p, tensors in edits.items()}
    drop = {Path(p).resolve() for p in drop}
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    done = {"rewritten": [], "linked": [], "dropped": []}
    try:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            target = staging / relative
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            real = path.resolve()  # hub caches keep files as symlinks into a blob store
            if path.resolve() in drop or real in drop:
                done["dropped"].append(str(relative))
            elif path.resolve() in edits:
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata()
                    tensors = {key: handle.get_tensor(key) for key in handle.keys()}
                for key, value in edits[path.resolve()].items():
                    if key not in tensors:
                        raise UserError(f"{str(path)!r} holds no tensor {key!r}.")
                    if tuple(value.shape) != tuple(tensors[key].shape):
                        raise UserError(
                            f"{key!r} in {str(path)!r} has shape {tuple(tensors[key].shape)}, the edit "
                            f"{tuple(value.shape)}."
                        )
                    tensors[key] = value.to(tensors[key].dtype).contiguous()
                save_file(tensors, str(target), metadata=metadata)
                done["rewritten"].append(str(relative))
            else:
                _place(real, target, link)
                done["linked"].append(str(relative))
        for name, writer in (extra or {}).items():
            writer(staging / name, done)
        _ordinary_modes(staging, [*done["rewritten"], *(extra or {})])
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return done


def _ordinary_modes(root: Path, written: Iterable[str]) -> None:
    # safetensors creates private (0600) files; delivered weights are ordinary files like their inputs.
    umask = os.umask(0)
    os.umask(umask)
    for name in written:
        os.chmod(root / name, 0o666 & ~umask)


def _place(source: Path, target: Path, link: str) -> None:
    if link == "symlink":
        target.symlink_to(source)
    elif link == "hardlink":
        try:
            os.link(source, target)
        except OSError as error:
            raise UserError(f"Cannot hard-link {str(source)!r} ({error}); use --link copy or symlink.") from None
    else:
        shutil.copy2(source, target)


def equal_under_dtype(stored: Tensor, expected: Tensor) -> float:
    """Relative error ‖stored − expected‖/‖expected‖ after rounding ``expected`` to ``stored``'s dtype.

    Zero when a checkpoint holds exactly ``expected`` at its own precision (an fp16 variant of fp32 weights).
    """
    rounded = expected.to(stored.dtype).double()
    norm = torch.linalg.vector_norm(rounded).item()
    diff = torch.linalg.vector_norm(stored.double() - rounded).item()
    return diff / norm if norm else diff
