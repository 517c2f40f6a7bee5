"""Edits as modular deltas (METHOD §9): read, apply, remove and combine the updates of ``delta.safetensors``.

A delta file holds one update λ·G_f per concept and edited layer, under the key ``<concept>/<parameter>``,
with safetensors metadata:

- ``format``: ``"slug_lightning.delta/1"``;
- ``entries``: JSON list, one per tensor: ``key``, ``concept``, ``layer`` (the parameter name), ``step_size``,
  ``tower``, ``relative_change``;
- ``base_fingerprint``: :func:`slug_lightning.artifacts.fingerprint` of the model the update was computed
  for (θ⁰, before any edit);
- ``model``: JSON identity of that model (name, pretrained, fingerprint).

A checkpoint *carrying* deltas cannot be recognised by its own fingerprint (that is the fingerprint of the
edited weights, and removing an update gives θ⁰ back only up to float rounding). So a checkpoint written
here, or by ``unlearn`` as ``model.safetensors``, records its provenance in its safetensors metadata:
``base_fingerprint`` (of θ⁰) and ``deltas`` (JSON list of the applied entries: concept, layer, step size).
A checkpoint without that record is taken as a base model: its fingerprint is computed from its weights.
``apply`` and ``remove`` compare a delta's base fingerprint with the checkpoint's; ``apply`` refuses a
concept already applied, ``remove`` one that is not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from slug_lightning.artifacts import fingerprint, save_state_dict
from slug_lightning.errors import UserError
from slug_lightning.provenance import public_identity, public_model_metadata

DELTA_FORMAT = "slug_lightning.delta/1"
ENTRY_FIELDS = ("key", "concept", "layer", "step_size", "tower", "relative_change")


@dataclass
class Delta:
    """The updates of one or more concepts, each kept apart, and the base model they were made for.

    Attributes:
        tensors: ``<concept>/<layer>`` → update (added to the layer's weight).
        entries: One dict per tensor: ``key``, ``concept``, ``layer``, ``step_size``, ``tower``,
            ``relative_change``.
        base_fingerprint: Fingerprint of the base model θ⁰ (None for a delta written without one).
        model: Identity of the base model (name, pretrained, fingerprint).
        source: Where the delta came from, for messages.
    """

    tensors: dict[str, Tensor]
    entries: list[dict]
    base_fingerprint: str | None
    model: dict = field(default_factory=dict)
    source: str = "delta"

    @property
    def concepts(self) -> list[str]:
        """The concepts, in entry order, each once."""
        return list(dict.fromkeys(entry["concept"] for entry in self.entries))


def make_delta(
    updates: Sequence[tuple[dict, Tensor]],
    base_fingerprint: str | None,
    model: Mapping | None = None,
    source: str = "delta",
) -> Delta:
    """A :class:`Delta` from ``(entry, update)`` pairs; the key of each entry is ``<concept>/<layer>``.

    Args:
        updates: Each entry needs ``concept`` and ``layer``; ``step_size``, ``tower``, ``relative_change``
            are kept when given (None otherwise).
        base_fingerprint: Fingerprint of the base model θ⁰.
        model: Identity of the base model.
        source: Name for messages.

    Returns:
        The delta, tensors detached to fp32 on the CPU.

    Raises:
        ValueError: if a concept has two updates of the same layer.

    Example:
        >>> d = make_delta([({"concept": "Ann", "layer": "w", "step_size": 2.0}, torch.ones(2))], "f0")
        >>> d.entries[0]["key"], d.concepts, d.tensors["Ann/w"].tolist()
        ('Ann/w', ['Ann'], [1.0, 1.0])
    """
    tensors, entries = {}, []
    for entry, update in updates:
        key = f"{entry['concept']}/{entry['layer']}"
        if key in tensors:
            raise ValueError(f"Concept {entry['concept']!r} has two updates of layer {entry['layer']!r}.")
        tensors[key] = update.detach().to("cpu", torch.float32)
        entries.append({name: entry.get(name) for name in ENTRY_FIELDS} | {"key": key})
    return Delta(tensors, entries, base_fingerprint, dict(model or {}), source)


def write_delta(path: str | Path, delta: Delta) -> None:
    """Write ``delta`` as ``delta.safetensors`` (atomically); its model identity names a local checkpoint by content,
    not path (:func:`~slug_lightning.provenance.public_identity`)."""
    model = public_identity(delta.model)
    metadata = {"format": DELTA_FORMAT, "model": json.dumps(model), "entries": json.dumps(delta.entries)}
    if delta.base_fingerprint is not None:
        metadata["base_fingerprint"] = delta.base_fingerprint
    save_state_dict(path, delta.tensors, metadata=metadata)


def read_delta(path: str | Path) -> Delta:
    """Read a delta file written by ``unlearn`` or :func:`write_delta`.

    Raises:
        UserError: if the file is missing, not safetensors, not a slug_lightning delta, or its entries and
            tensors disagree.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"Delta file {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"Cannot read delta {str(path)!r} as safetensors: {error}") from None
    if metadata.get("format") != DELTA_FORMAT or "entries" not in metadata:
        raise UserError(
            f"{str(path)!r} is not a delta written by slug_lightning (metadata format "
            f"{metadata.get('format')!r}, expected {DELTA_FORMAT!r} with 'entries')."
        )
    entries = [{name: entry.get(name) for name in ENTRY_FIELDS} for entry in json.loads(metadata["entries"])]
    keys = [entry["key"] for entry in entries]
    if sorted(keys) != sorted(tensors):
        raise UserError(
            f"Delta {str(path)!r} is inconsistent: its entries name {sorted(keys)}, its tensors are {sorted(tensors)}."
        )
    return Delta(
        {key: tensors[key] for key in keys},
        entries,
        metadata.get("base_fingerprint"),
        json.loads(metadata.get("model", "{}")),
        str(path),
    )


def select(delta: Delta, concepts: Iterable[str] | None = None) -> Delta:
    """The part of ``delta`` that belongs to ``concepts`` (all of it for None).

    Raises:
        ValueError: for a concept the delta does not hold (the message lists those it holds).

    Example:
        >>> d = make_delta([({"concept": c, "layer": "w"}, torch.ones(1)) for c in ("A", "B")], "f0")
        >>> select(d, ["B"]).concepts
        ['B']
    """
    if concepts is None:
        return delta
    wanted = list(dict.fromkeys(concepts))
    unknown = [c for c in wanted if c not in delta.concepts]
    if unknown:
        raise ValueError(f"{delta.source} holds no update for {unknown}; it holds {delta.concepts}.")
    entries = [entry for entry in delta.entries if entry["concept"] in wanted]
    return Delta(
        {e["key"]: delta.tensors[e["key"]] for e in entries}, entries, delta.base_fingerprint, delta.model, delta.source
    )


def layer_updates(delta: Delta) -> dict[str, Tensor]:
    """Layer → the sum of its concepts' updates (two concepts that chose one layer add up, METHOD §9)."""
    sums: dict[str, Tensor] = {}
    for entry in delta.entries:
        update = delta.tensors[entry["key"]].float()
        sums[entry["layer"]] = sums[entry["layer"]] + update if entry["layer"] in sums else update
    return sums


def check_finite(delta: Delta) -> None:
    """Refuse a delta holding NaN or infinite values: applied, it would write a model of NaNs.

    Raises:
        ValueError: naming the delta and its first non-finite updates.

    Example:
        >>> nan = make_delta([({"concept": "A", "layer": "w"}, torch.tensor([float("nan")]))], "f0", source="a")
        >>> check_finite(nan)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: a holds NaN or infinite values in 1 update(s) (A/w); it cannot be applied, ...
    """
    bad = [key for key, tensor in delta.tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise ValueError(
            f"{delta.source} holds NaN or infinite values in {len(bad)} update(s) ({shown}); it cannot "
            "be applied, removed or combined. Compute it again."
        )


def _add(state_dict: Mapping[str, Tensor], delta: Delta, concepts, sign: float) -> dict[str, Tensor]:
    part = select(delta, concepts)
    check_finite(part)
    updates = layer_updates(part)
    missing = [layer for layer in updates if layer not in state_dict]
    if missing:
        raise ValueError(f"{delta.source} updates layers the model does not have: {missing}.")
    shapes = [
        f"{layer}: update {tuple(u.shape)} vs weight {tuple(state_dict[layer].shape)}"
        for layer, u in updates.items()
        if u.shape != state_dict[layer].shape
    ]
    if shapes:
        raise ValueError(f"{delta.source} does not fit the model: {'; '.join(shapes)}.")
    result = dict(state_dict)
    for layer, update in updates.items():
        weight = state_dict[layer]
        # In fp32, rounded once to the weight's dtype.
        result[layer] = (weight.float() + sign * update.to(weight.device)).to(weight.dtype)
    overflow = [layer for layer in updates if not torch.isfinite(result[layer]).all()]
    if overflow:
        raise ValueError(
            f"{delta.source} makes {overflow[:3]} non-finite (NaN or infinite weights after the "
            "update); nothing is written."
        )
    return result


def apply(state_dict: Mapping[str, Tensor], delta: Delta, concepts: Iterable[str] | None = None) -> dict[str, Tensor]:
    """A new state dict with the updates of ``concepts`` (default: all of the delta's) added.

    Args:
        state_dict: The weights; not modified.
        delta: The delta.
        concepts: Which of its concepts to apply; None for all.

    Returns:
        The state dict with the edited layers replaced (other tensors shared with ``state_dict``).

    Raises:
        ValueError: for an unknown concept, or a layer the model lacks or of another shape.

    Example:
        >>> d = make_delta([({"concept": "A", "layer": "w"}, torch.tensor([1.0, 2.0]))], "f0")
        >>> apply({"w": torch.zeros(2)}, d)["w"].tolist()
        [1.0, 2.0]
    """
    return _add(state_dict, delta, concepts, 1.0)


def remove(state_dict: Mapping[str, Tensor], delta: Delta, concepts: Iterable[str] | None = None) -> dict[str, Tensor]:
    """A new state dict with the updates of ``concepts`` (default: all) subtracted; undoes :func:`apply`
    up to float rounding.

    Example:
        >>> d = make_delta([({"concept": "A", "layer": "w"}, torch.tensor([1.0, 2.0]))], "f0")
        >>> remove(apply({"w": torch.zeros(2)}, d), d)["w"].tolist()
        [0.0, 0.0]
    """
    return _add(state_dict, delta, concepts, -1.0)


def combine(deltas: Sequence[Delta]) -> Delta:
    """One delta holding the updates of several, each concept still apart.

    Raises:
        ValueError: for no delta, deltas made for different base models (both fingerprints named), or a
            concept that two deltas hold (combining them would apply it twice).

    Example:
        >>> a = make_delta([({"concept": "A", "layer": "w"}, torch.ones(1))], "f0", source="a")
        >>> b = make_delta([({"concept": "B", "layer": "w"}, torch.ones(1))], "f0", source="b")
        >>> combine([a, b]).concepts
        ['A', 'B']
    """
    if not deltas:
        raise ValueError("combine needs at least one delta.")
    for delta in deltas:
        check_finite(delta)
    first = deltas[0]
    owner: dict[str, str] = {}
    for delta in deltas:
        if delta.base_fingerprint != first.base_fingerprint:
            raise ValueError(
                f"{delta.source} was made for base model {delta.base_fingerprint}, {first.source} for "
                f"{first.base_fingerprint}: deltas of different base models cannot be combined."
            )
        for concept in delta.concepts:
            if concept in owner:
                raise ValueError(
                    f"Concept {concept!r} is in both {owner[concept]} and {delta.source}; combine "
                    "each concept once (select the others with --concept)."
                )
            owner[concept] = delta.source
    tensors = {key: tensor for delta in deltas for key, tensor in delta.tensors.items()}
    entries = [entry for delta in deltas for entry in delta.entries]
    return Delta(tensors, entries, first.base_fingerprint, first.model, "combined delta")


# --- checkpoints that carry deltas --------------------------------------------------------------------------


@dataclass
class Provenance:
    """What a checkpoint is: the fingerprint of its base model θ⁰ and the delta entries applied to it."""

    base_fingerprint: str
    applied: list[dict] = field(default_factory=list)

    @property
    def concepts(self) -> list[str]:
        return [entry["concept"] for entry in self.applied]

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata that records it."""
        return {
            "base_fingerprint": self.base_fingerprint,
            "deltas": json.dumps(self.applied),
            "unlearned": json.dumps(self.concepts),
        }


def provenance_of(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> Provenance:
    """The provenance a checkpoint records, or, without a record, that of a base model (its own fingerprint).

    ``model.safetensors`` of runs before the record existed still name their concepts (``unlearned``) and
    their base model's fingerprint (``model``); those are read too.
    """
    metadata = metadata or {}
    if "base_fingerprint" in metadata:
        return Provenance(metadata["base_fingerprint"], _json(metadata.get("deltas"), []))
    model = _json(metadata.get("model"), {})
    if "unlearned" in metadata and isinstance(model, dict) and "fingerprint" in model:
        return Provenance(model["fingerprint"], [{"concept": c} for c in _json(metadata["unlearned"], [])])
    return Provenance(fingerprint(dict(state_dict)))


def _json(text: str | None, default):
    # Metadata written by other tools may hold plain strings (fit's export: "model": "slug-tiny").
    try:
        return json.loads(text) if text else default
    except json.JSONDecodeError:
        return default


def check_base(delta: Delta, provenance: Provenance, checkpoint: str = "the checkpoint") -> None:
    """Refuse a delta made for another base model than the checkpoint's.

    Raises:
        UserError: naming both fingerprints.
    """
    if delta.base_fingerprint is None:
        raise UserError(
            f"{delta.source} records no base-model fingerprint, so it cannot be checked against "
            f"{checkpoint} (base {provenance.base_fingerprint})."
        )
    if delta.base_fingerprint != provenance.base_fingerprint:
        raise UserError(
            f"{delta.source} was made for base model {delta.base_fingerprint}, but {checkpoint} has "
            f"base model {provenance.base_fingerprint}; it cannot be applied to or removed from it."
        )


def apply_to_checkpoint(
    state_dict: Mapping[str, Tensor],
    provenance: Provenance,
    delta: Delta,
    concepts: Iterable[str] | None = None,
    checkpoint: str = "the checkpoint",
) -> tuple[dict[str, Tensor], Provenance]:
    """Check the base, refuse concepts already applied, then :func:`apply`.

    Returns:
        The new state dict and its provenance (the applied entries appended).

    Raises:
        UserError: for another base model, a concept already applied, or a concept the delta lacks.
    """
    check_base(delta, provenance, checkpoint)
    part = _select_or_user_error(delta, concepts)
    again = [c for c in part.concepts if c in provenance.concepts]
    if again:
        raise UserError(f"{checkpoint} already carries {again}; applying it again would double the edit.")
    try:
        result = apply(state_dict, part)
    except ValueError as error:
        raise UserError(f"{error} ({checkpoint})") from None
    applied = [{k: e[k] for k in ("concept", "layer", "step_size")} for e in part.entries]
    return result, Provenance(provenance.base_fingerprint, provenance.applied + applied)


def remove_from_checkpoint(
    state_dict: Mapping[str, Tensor],
    provenance: Provenance,
    delta: Delta,
    concepts: Iterable[str] | None = None,
    checkpoint: str = "the checkpoint",
) -> tuple[dict[str, Tensor], Provenance]:
    """Check the base, refuse concepts the checkpoint does not carry, then :func:`remove`.

    Returns:
        The new state dict and its provenance (the removed concepts' entries dropped).

    Raises:
        UserError: for another base model, a concept not applied, or a concept the delta lacks.
    """
    check_base(delta, provenance, checkpoint)
    part = _select_or_user_error(delta, concepts)
    absent = [c for c in part.concepts if c not in provenance.concepts]
    if absent:
        raise UserError(
            f"{checkpoint} does not carry {absent} (it carries {provenance.concepts or 'no delta'}); "
            "only an applied concept can be removed."
        )
    try:
        result = remove(state_dict, part)
    except ValueError as error:
        raise UserError(f"{error} ({checkpoint})") from None
    applied = [entry for entry in provenance.applied if entry["concept"] not in part.concepts]
    return result, Provenance(provenance.base_fingerprint, applied)


def _select_or_user_error(delta: Delta, concepts) -> Delta:
    try:
        return select(delta, concepts)
    except ValueError as error:
        raise UserError(str(error)) from None


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], Provenance, dict[str, str]]:
    """A checkpoint's state dict, provenance and safetensors metadata (empty for a torch file).

    Raises:
        UserError (ModelLoadError): for a missing, unreadable or unsafe file.
    """
    from slug_lightning.models import checkpoint_format, read_state_dict

    path = Path(path).expanduser()
    state_dict = read_state_dict(path)
    metadata = {}
    if checkpoint_format(path) == "safetensors":  # by content: a safetensors file named .pt keeps its record
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    return state_dict, provenance_of(state_dict, metadata), metadata


def write_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, Tensor],
    provenance: Provenance,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a checkpoint (safetensors, atomically) recording its provenance; other metadata is kept, a model
    identity in it naming a local checkpoint by content, not path (:func:`~slug_lightning.provenance.public_identity`).
    """
    metadata = public_model_metadata(metadata or {})
    save_state_dict(path, state_dict, metadata={"format": "pt", **metadata, **provenance.metadata()})
