"""Partial sums of a gradient pass on disk, so that a killed pass resumes where it stopped (METHOD §2).

Every ``checkpoint_every`` batches :class:`~slug_lightning.gradients.GradientCollector` writes each stream's fp32
sums, the pair counts and its position (batches done per stream) with :func:`save_partial`; a re-run reads them back
with :func:`load_partial` when they were written under the same resume key (:func:`resume_key`: the gradient key,
the streams and the device count), and skips the batches already summed. Under DDP each rank has its own file
(:func:`rank_file`). These functions only read and write files; where the files go is the caller's to say
(``unlearn`` names them inside its output directory), when to write them the collector's.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from slug_lightning.artifacts import atomic_path
from slug_lightning.gradient_key import key_changes

FORMAT = "slug_lightning.partial/2"  # the ``format`` metadata of a partial file
_COUNTS = "__counts__"  # the tensor of pair counts per stream (and skipped samples, last)


def rank_file(path: str | Path, rank: int, world_size: int) -> Path:
    """A rank's partial file: ``path`` itself on one device, ``<stem>.rank<r>-of-<w>.safetensors`` under DDP.

    Example::

        >>> rank_file("run/gradients.partial.safetensors", 1, 2).name
        'gradients.partial.rank1-of-2.safetensors'
    """
    path = Path(path)
    if world_size == 1:
        return path
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.rank{rank}-of-{world_size}.safetensors")


def resume_key(gradient_key: dict | None, streams: Sequence[str], world_size: int) -> dict:
    """What partial sums must match to be resumed: the gradient key, the streams and the device count (each
    rank's sums and position depend on it)."""
    return {"gradient_key": gradient_key, "streams": streams, "world_size": world_size}


def save_partial(
    path: str | Path, sums: Sequence[Mapping[str, Tensor]], counts: Tensor, done: Sequence[int], key: dict
) -> None:
    """Write a rank's sums, counts and position atomically; a previous file at ``path`` stays until then.

    Args:
        path: The rank's partial file (:func:`rank_file`).
        sums: Per stream, in stream order, the summed gradient of each candidate tensor.
        counts: Pairs summed per stream, then the skipped samples.
        done: Batches summed per stream (the position of the pass).
        key: The resume key (:func:`resume_key`).
    """
    from safetensors.torch import save_file

    tensors = {
        f"{i}/{name}": g.detach().cpu().contiguous() for i, stream in enumerate(sums) for name, g in stream.items()
    }
    tensors[_COUNTS] = counts.detach().cpu()
    metadata = {"format": FORMAT, "key": json.dumps(key), "done": json.dumps(done)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_partial(path: Path, key: dict, streams: int) -> tuple[list[dict[str, Tensor]], Tensor, list[int]] | None:
    """The sums (per stream, as :func:`save_partial` takes them), counts and position of a partial checkpoint, or
    None when absent, unreadable or not this run's (with a warning that says what differs)."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored = json.loads(metadata["key"]) if metadata.get("format") == FORMAT else None
            changes = partial_changes(stored, key)
            if changes:
                warnings.warn(
                    f"Ignoring {str(path)!r}: its partial gradient sums belong to another run "
                    f"({'; '.join(changes)}); starting the pass from the beginning.",
                    stacklevel=2,
                )
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        done = json.loads(metadata["done"])
    except Exception as error:  # noqa: BLE001 - a damaged checkpoint only costs the work it held
        warnings.warn(f"Ignoring unreadable partial checkpoint {str(path)!r} ({error}); starting over.", stacklevel=2)
        return None
    if len(done) != streams:
        return None
    counts = tensors.pop(_COUNTS)
    sums = [
        {name[len(f"{i}/") :]: tensor for name, tensor in tensors.items() if name.startswith(f"{i}/")}
        for i in range(streams)
    ]
    return sums, counts, done


def partial_changes(stored: dict | None, wanted: dict) -> list[str]:
    """What differs between a partial checkpoint's resume key and this run's, in words."""
    if stored is None:
        return ["it was written by an older version"]
    changes = key_changes(stored.get("gradient_key"), wanted["gradient_key"])
    if stored.get("streams") != wanted["streams"]:
        changes.append(f"streams {stored.get('streams')} → {wanted['streams']}")
    if stored.get("world_size") != wanted["world_size"]:
        changes.append(f"device count {stored.get('world_size')} → {wanted['world_size']}")
    return changes
