"""What the gradients of a run depend on (its *gradient key*), and what changed between two keys.

A gradient store (``gradients.safetensors``) and the partial sums of a killed pass are reused only by a run with
the same key, so a re-run never takes gradients computed for other weights or other data, and the same weights
under another path are reused. The key holds:

- the model: its architecture name and the fingerprint of its weights θ⁰ (not where they were loaded from);
- the concepts: names and aliases, in order (each alias widens the forget set);
- the data: the resolved retain and forget shard lists, each local file with its size and modification time
  (a URL as written), the global batch size (the retain loss is contrastive within a batch), the image
  transform of each stream and the tokenizer;
- the candidate layers, and the precision of the pass;
- how many batches the pass read per stream, when it stopped early: Lightning's ``limit_predict_batches``, which a
  smoke run (``--trainer.fast_dev_run``) sets to 1 (or N). A store of such a pass holds the gradients of its
  first batches only, so a run that reads every batch never takes it.

The device count is not part of it: the gradients do not depend on it (the partial sums of a killed pass do,
and add it to their own key).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def shard_records(urls: Sequence[str]) -> list[list]:
    """``[path, size, mtime_ns]`` of each local shard (absolute path), ``[url, None, None]`` of anything else.

    Example::

        >>> shard_records(["pipe:cat a.tar"])
        [['pipe:cat a.tar', None, None]]
    """
    records = []
    for url in urls:
        if os.path.isfile(url):
            stat = os.stat(url)
            records.append([os.path.abspath(url), stat.st_size, stat.st_mtime_ns])
        else:
            records.append([url, None, None])
    return records


def describe(component: Any) -> str | None:
    """A stable text of a transform or tokenizer: its repr without memory addresses (which change per process).

    Example::

        >>> describe(None) is None, describe(len)
        (True, '<built-in function len>')
    """
    if component is None:
        return None
    text = repr(component)
    if text.startswith("<") and " object" in text:  # a bare object repr says only its class
        text = f"{type(component).__module__}.{type(component).__qualname__}"
        length = getattr(component, "context_length", None)
        if length is not None:
            text += f"(context_length={length})"
    return _ADDRESS.sub("", text)


def gradient_key(
    *,
    model_name: str,
    fingerprint: str,
    concepts: Sequence[Mapping[str, Any]],
    layers: Sequence[str],
    precision: str,
    data: Mapping[str, Any],
    batch_limit: int | None = None,
) -> dict:
    """The key of a gradient pass (see the module docstring).

    Args:
        model_name: The architecture (OpenCLIP model name).
        fingerprint: The fingerprint of the weights θ⁰ (:func:`slug_lightning.artifacts.fingerprint`).
        concepts: ``{"name", "aliases"}`` of each concept, in stream order.
        layers: The candidate layers.
        precision: The Trainer's precision (``32-true``, ``bf16-mixed``).
        data: What the data side adds (:func:`data_key`).
        batch_limit: The most batches the pass reads per stream (:func:`batch_limit`); None: every batch.
    """
    return {
        "model": model_name,
        "fingerprint": fingerprint,
        "concepts": [{"name": c["name"], "aliases": list(c.get("aliases", []))} for c in concepts],
        "layers": list(layers),
        "precision": str(precision),
        "data": dict(data),
        "batch_limit": batch_limit,
    }


def batch_limit(limit_predict_batches: int | float) -> int | None:
    """The most batches a predict run reads per stream, from the Trainer's ``limit_predict_batches``: an int
    (``fast_dev_run=N`` sets N, ``True`` sets 1), or None for 1.0, every batch (a stream has no length, so
    Lightning allows no other fraction).

    Example::

        >>> batch_limit(1.0) is None, batch_limit(1), batch_limit(5)
        (True, 1, 5)
    """
    if isinstance(limit_predict_batches, bool) or not isinstance(limit_predict_batches, int):
        return None
    return limit_predict_batches


def data_key(datamodule: Any, transform: Any = None, tokenizer: Any = None, train_transform: Any = None) -> dict:
    """The data side of a gradient key. For a datamodule with ``shards``/``forget_shards`` (``LaionDataModule``):
    the resolved shard lists, the batch size and each stream's transform; for any other datamodule, its class.

    Args:
        datamodule: The run's datamodule.
        transform: The image transform, when the datamodule has none yet (it takes the model's at setup).
        tokenizer: The tokenizer, likewise.
        train_transform: The model's training transform, which a datamodule with ``retain_augmentation`` takes
            for its retain stream at setup.
    """
    if not hasattr(datamodule, "forget_shards"):
        return {"datamodule": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"}
    from slug_lightning.shards import expand_shards

    transform = getattr(datamodule, "transform", None) or transform
    # With retain_augmentation the retain stream goes through the training transform, each pair's crop seeded.
    augmented = getattr(datamodule, "retain_augmentation", False)
    retain = (getattr(datamodule, "retain_transform", None) or train_transform) if augmented else transform
    return {
        "retain_shards": shard_records(expand_shards(datamodule.shards)),
        "forget_shards": shard_records(expand_shards(datamodule.forget_shards)),
        "batch_size": datamodule.batch_size,
        "transform": describe(transform),
        "retain_transform": f"{describe(retain)}, seeded per pair by {datamodule.seed}"
        if augmented
        else describe(retain),
        "tokenizer": describe(getattr(datamodule, "tokenizer", None) or tokenizer),
    }


def key_changes(stored: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> list[str]:
    """What differs between the key a store was made with and the key a run wants, in words; empty when they match.

    Example::

        >>> old = {"model": "ViT-B-32", "fingerprint": "aa", "data": {"batch_size": 64}}
        >>> key_changes(old, {**old, "data": {"batch_size": 16}})
        ['global batch size 64 → 16']
        >>> key_changes(None, old)
        ['it records no gradient key (written by an older version)']
    """
    if stored is None:
        return ["it records no gradient key (written by an older version)"]
    changes = []
    if stored.get("model") != wanted.get("model"):
        changes.append(f"model {stored.get('model')} → {wanted.get('model')}")
    if stored.get("fingerprint") != wanted.get("fingerprint"):
        changes.append(f"model weights (fingerprint {stored.get('fingerprint')} → {wanted.get('fingerprint')})")
    if stored.get("concepts") != wanted.get("concepts"):
        changes.append(f"concepts {_concepts(stored.get('concepts'))} → {_concepts(wanted.get('concepts'))}")
    if stored.get("layers") != wanted.get("layers"):
        changes.append(f"candidate layers ({len(stored.get('layers') or [])} → {len(wanted.get('layers') or [])})")
    if stored.get("precision") != wanted.get("precision"):
        changes.append(f"precision {stored.get('precision')} → {wanted.get('precision')}")
    if stored.get("batch_limit") != wanted.get("batch_limit"):  # absent in older keys: those passes read everything
        changes.append(
            f"batches read per stream {_batches(stored.get('batch_limit'))} → {_batches(wanted.get('batch_limit'))}"
        )
    old, new = stored.get("data") or {}, wanted.get("data") or {}
    for field in dict.fromkeys([*new, *old]):  # in the order data_key writes them
        if old.get(field) == new.get(field):
            continue
        if field.endswith("_shards"):
            changes.append(f"{field.replace('_', ' ')} ({_shard_changes(old.get(field) or [], new.get(field) or [])})")
        elif field == "batch_size":
            changes.append(f"global batch size {old.get(field)} → {new.get(field)}")
        else:
            changes.append(_DATA_WORDS.get(field, f"data setting {field!r}"))
    return changes


_DATA_WORDS = {
    "transform": "image transform",
    "retain_transform": "retain image transform",
    "tokenizer": "tokenizer",
    "datamodule": "datamodule",
}


def _batches(limit: int | None) -> str:
    """``all``, or ``the first 1 (a smoke run or limit_predict_batches)``."""
    return "all" if limit is None else f"the first {limit} (a smoke run or limit_predict_batches)"


def _concepts(concepts: Sequence[Mapping[str, Any]] | None) -> str:
    return (
        "["
        + ", ".join(
            c["name"] + (f" (aliases {', '.join(c['aliases'])})" if c.get("aliases") else "") for c in concepts or []
        )
        + "]"
    )


def _shard_changes(old: Sequence[Sequence], new: Sequence[Sequence]) -> str:
    """``1 added, 2 modified: 00003.tar, ...``: how two shard lists differ."""
    before, after = {r[0]: tuple(r[1:]) for r in old}, {r[0]: tuple(r[1:]) for r in new}
    added = [p for p in after if p not in before]
    removed = [p for p in before if p not in after]
    modified = [p for p in after if p in before and before[p] != after[p]]
    parts = [
        f"{len(paths)} {what}"
        for paths, what in ((added, "added"), (removed, "removed"), (modified, "modified"))
        if paths
    ]
    named = [os.path.basename(p) or p for p in (added + removed + modified)[:3]]
    more = " ..." if len(added) + len(removed) + len(modified) > 3 else ""
    return (", ".join(parts) or "reordered") + (f": {', '.join(named)}{more}" if named else "")
