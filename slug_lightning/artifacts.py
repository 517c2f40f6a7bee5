"""Writing run artifacts atomically: a file is either complete or absent, never truncated."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create private files; artifacts are ordinary ones
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(value: Any) -> Any:
    # NaN is not JSON; an accuracy over zero images is reported as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Write dict rows as CSV with a header, atomically."""
    columns = list(columns or (rows[0].keys() if rows else []))
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A CSV row from a record whose values may be ``{name: value}`` maps: each becomes columns ``key[name]``, in
    place.

    Example::

        >>> flat_row({"step": 0, "test_top1": {"a": 0.5, "b": 1.0}, "seconds": 2.0})
        {'step': 0, 'test_top1[a]': 0.5, 'test_top1[b]': 1.0, 'seconds': 2.0}
    """
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}[{name}]": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_state_dict(path: str | Path, state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (shared storage is cloned, as safetensors requires)."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short, cheap identity of a set of weights: names, shapes and a sample of values of every tensor."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        flat = state_dict[name].detach().flatten()  # sampled before the copy: a large model stays where it is
        digest.update(f"{name}:{tuple(state_dict[name].shape)}".encode())
        digest.update(torch.cat([flat[:256], flat[-256:]]).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
