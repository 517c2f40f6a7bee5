"""The gradients of a SLUG pass as a file (METHOD §2): ``GradientStore`` and its safetensors format.

:class:`~slug_lightning.gradients.GradientCollector` makes a store; ``unlearn`` saves it as
``gradients.safetensors`` in its output directory and reuses it when its gradient key matches
(:mod:`slug_lightning.gradient_key`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from slug_lightning.artifacts import atomic_path

FORMAT = "slug_lightning.gradients/1"  # the ``format`` metadata of a store file


@dataclass
class GradientStore:
    """Mean forget gradients per concept and the mean retain gradient, for candidate tensors only.

    Saved as ``gradients.safetensors`` with keys ``forget/<concept>/<param>`` and ``retain/<param>``; the
    metadata holds the model, concepts, pair counts, skipped samples and the gradient key (what the gradients
    depend on, see :mod:`slug_lightning.gradient_key`; None in stores written before it existed).
    """

    forget: dict[str, dict[str, Tensor]]
    retain: dict[str, Tensor]
    forget_samples: dict[str, int]
    retain_samples: int
    skipped_samples: int = 0
    model: dict = field(default_factory=dict)
    key: dict | None = None

    @property
    def concepts(self) -> list[str]:
        return list(self.forget)

    @property
    def layers(self) -> list[str]:
        return list(self.retain)

    def save(self, path: str | Path) -> None:
        """Write atomically to ``path`` (safetensors)."""
        from safetensors.torch import save_file

        tensors = {f"retain/{name}": g.contiguous() for name, g in self.retain.items()}
        for concept, grads in self.forget.items():
            tensors.update({f"forget/{concept}/{name}": g.contiguous() for name, g in grads.items()})
        metadata = {
            "format": FORMAT,
            "model": json.dumps(self.model),
            "concepts": json.dumps(self.concepts),
            "layers": json.dumps(self.layers),
            "forget_samples": json.dumps(self.forget_samples),
            "retain_samples": str(self.retain_samples),
            "skipped_samples": str(self.skipped_samples),
            "key": json.dumps(self.key),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> GradientStore:
        """Read a store written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{str(path)!r} is not a gradient store written by slug_lightning.")
            concepts = json.loads(metadata["concepts"])
            forget = {concept: {} for concept in concepts}
            retain = {}
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if key.startswith("retain/"):
                    retain[key[len("retain/") :]] = tensor
                    continue
                # Concept names may contain "/" and one may begin another ("AC", "AC/DC"): the longest known
                # concept that prefixes the key is the one it belongs to.
                concept = max((c for c in concepts if key.startswith(f"forget/{c}/")), key=len)
                forget[concept][key[len(f"forget/{concept}/") :]] = tensor
            if "layers" in metadata:  # safetensors sorts its keys; restore the order the store was made in
                layers = json.loads(metadata["layers"])
                retain = {name: retain[name] for name in layers}
                forget = {
                    concept: {name: grads[name] for name in layers if name in grads}
                    for concept, grads in forget.items()
                }
        return cls(
            forget=forget,
            retain=retain,
            forget_samples=json.loads(metadata["forget_samples"]),
            retain_samples=int(metadata["retain_samples"]),
            skipped_samples=int(metadata["skipped_samples"]),
            model=json.loads(metadata["model"]),
            key=json.loads(metadata.get("key", "null")),
        )
