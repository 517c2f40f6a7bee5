"""Delivering an unlearn run's edit into Hugging Face pipelines, behind ``export-diffusers`` and ``export-llava``
(their command lines are in :mod:`slug_lightning.commands.export`).

An ``unlearn`` run leaves ``delta.safetensors`` (the chosen update λ·G_f of each edited OpenCLIP layer) and
``model.safetensors`` (the whole unlearned OpenCLIP state dict). Delivery maps the delta into the
pipeline's own naming (:mod:`.mapping`), adds it to the pipeline's tensors, and writes a new directory in
which only the safetensors files that hold changed tensors are new; every other file is a link into the
input (or a copy). Beside them it writes ``slug_edit.safetensors`` (the changed tensors only, in Hugging Face
CLIP names, for :func:`apply_edit` on a pipeline already in memory) and ``slug_edit.json`` (what was done).

Before writing, delivery refuses an edit the pipeline cannot feel: Stable Diffusion 2.x conditions on the
penultimate text block (its text encoder has 23 of ViT-H-14's 24 blocks and no projection), LLaVA-1.5 on
the penultimate vision block (``vision_feature_layer = -2``, no ``ln_post``, no projection). When the run's
``model.safetensors`` is present it also checks that the pipeline holds the CLIP the run started from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slug_lightning.errors import UserError
from slug_lightning.hf.checkpoints import (
    PICKLED_WEIGHTS,
    equal_under_dtype,
    find_tower,
    preferred_first,
    write_edited_tree,
)
from slug_lightning.hf.mapping import Layout, Reach, to_hf
from slug_lightning.layers import LANGUAGE, VISION, tower_of
from slug_lightning.provenance import public_identity

EDIT_FILE, SUMMARY_FILE = "slug_edit.safetensors", "slug_edit.json"
EDIT_FORMAT = "slug_lightning.hf_edit/1"
# Largest relative difference between a pipeline's tensor and the run's base tensor (rounded to the
# pipeline's dtype first, so fp16/bf16 copies of the same weights differ by ~0) that still counts as "the
# same weights". A fine-tuned or different CLIP differs by far more.
BASE_TOLERANCE = 1e-3


@dataclass
class RunEdit:
    """What an unlearn run changed, in OpenCLIP names.

    Attributes:
        deltas: Edited layer → λ·G_f, summed over the concepts that chose it (METHOD §9); None when the run
            has no ``delta.safetensors`` (then ``unlearned`` is delivered whole).
        entries: The delta's metadata entries ``[{key, concept, layer, step_size}]``.
        model: The run's model identity (name, pretrained, fingerprint).
        unlearned: The unlearned state dict (``model.safetensors``), or None.
    """

    deltas: dict[str, Tensor] | None
    entries: list[dict]
    model: dict
    unlearned: dict[str, Tensor] | None


def read_run(run_dir: str | Path) -> RunEdit:
    """The edit of an ``unlearn`` output directory (``delta.safetensors`` and/or ``model.safetensors``).

    Raises:
        UserError: if the directory holds neither.
    """
    from slug_lightning.deltas import layer_updates, read_delta
    from slug_lightning.models import read_state_dict

    run = Path(run_dir)
    delta_path, model_path = run / "delta.safetensors", run / "model.safetensors"
    if not delta_path.is_file() and not model_path.is_file():
        raise UserError(
            f"{str(run)!r} holds neither delta.safetensors nor model.safetensors; give the output "
            "directory of an unlearn run."
        )
    deltas, entries, model = None, [], {}
    if delta_path.is_file():  # summed per layer (fp32): two concepts that chose one layer add up
        delta = read_delta(delta_path)
        deltas, entries, model = layer_updates(delta), delta.entries, delta.model
    unlearned = read_state_dict(model_path) if model_path.is_file() else None
    return RunEdit(deltas, entries, model, unlearned)


def diffusers_reach(pipeline: Path, component: str = "text_encoder", clip_skip: int = 0) -> Reach:
    """What of the OpenCLIP text tower a diffusers pipeline's text encoder uses.

    The pipeline encodes prompts with ``text_encoder(ids).last_hidden_state``: all the blocks it holds and
    the final LayerNorm, never the projection. With ``clip_skip`` the pipeline takes the output
    ``clip_skip`` blocks earlier (still through the final LayerNorm).
    """
    config = _read_json(pipeline / component / "config.json")
    if any("WithProjection" in a for a in config.get("architectures") or []):
        raise UserError(
            f"{component!r} is a text encoder with projection (an SDXL-style pipeline); only "
            "SD 1.x/2.x-style text encoders (CLIPTextModel) are supported."
        )
    return Reach(
        LANGUAGE,
        layers=config["num_hidden_layers"] - clip_skip,
        final_norm=True,
        projection=False,
        what=f"the diffusers pipeline's {component}",
    )


def llava_reach(model_dir: Path, vision_feature_layer: int | list[int] | None = None) -> Reach:
    """What of the OpenCLIP vision tower a LLaVA-style model uses.

    The model takes ``hidden_states[vision_feature_layer]`` of its CLIP vision tower (LLaVA-1.5: −2, the
    penultimate block), before ``post_layernorm`` and without the projection.
    """
    config = _read_json(model_dir / "config.json")
    if vision_feature_layer is None:
        vision_feature_layer = config.get("vision_feature_layer", config.get("mm_vision_select_layer", -2))
    # A LLaVA config nests the CLIP's; a CLIPModel nests it too; a CLIPVisionModel's config is the CLIP's.
    vision = config.get("vision_config") or config
    blocks = vision.get("num_hidden_layers", 12)  # transformers' CLIPVisionConfig default
    indices = vision_feature_layer if isinstance(vision_feature_layer, list) else [vision_feature_layer]
    # hidden_states has blocks + 1 entries (the embeddings first): entry k is the output of k blocks.
    used = max(i if i >= 0 else blocks + 1 + i for i in indices)
    return Reach(
        VISION,
        layers=used,
        final_norm=False,
        projection=False,
        what=f"the LLaVA model (vision_feature_layer={vision_feature_layer})",
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{str(path)!r} does not exist.")
    return json.loads(path.read_text())


def _check_reach(edit: RunEdit, reach: Reach, tower: str) -> None:
    other = [layer for layer in edit.deltas if tower_of(layer) != tower]
    if other:
        raise UserError(
            f"The run edited {', '.join(other)} ({tower_of(other[0])} tower), but {reach.what} takes the {tower} "
            f"tower. Unlearn again with the {tower} tower only (StepSearch towers: [{tower}])."
        )
    unreachable = reach.unreachable(edit.deltas)
    if unreachable:
        raise UserError(
            f"The run edited {', '.join(unreachable)}, which {reach.what} never uses (it takes the output of the "
            f"first {reach.layers} blocks{', without the final LayerNorm' if not reach.final_norm else ''}, "
            "without the projection): the edit would change nothing. Unlearn again with those layers excluded "
            "(see configs/sd and configs/llava, or PipelineGradientCollector, which excludes them itself)."
        )


def deliver(
    run_dir: str | Path,
    source: str | Path,
    output: str | Path,
    tower: str,
    component: str,
    reach: Reach,
    link: str = "symlink",
    check_base: bool = True,
) -> dict:
    """Write ``output``: the pipeline ``source`` with the run's edit in its CLIP ``tower``.

    Args:
        run_dir: An ``unlearn`` output directory.
        source: The pipeline (a diffusers pipeline directory, a LLaVA model directory, a CLIP directory).
        output: The new directory (must not exist or be empty; never inside ``source``).
        tower: ``"language"`` or ``"vision"``.
        component: The subdirectory of ``source`` holding the tower's weights (``"text_encoder"``; ``""``).
        reach: What of the tower the pipeline uses (:func:`diffusers_reach`, :func:`llava_reach`).
        link: How unchanged files reach the output: ``symlink``, ``hardlink`` or ``copy``.
        check_base: Refuse when the pipeline's tower differs from the CLIP the run started from (needs the
            run's ``model.safetensors``).

    Returns:
        The summary also written to ``slug_edit.json``.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    edit = read_run(run_dir)
    source, output = Path(source), Path(output)
    component_dir = source / component
    layout, keys = find_tower(component_dir, tower)
    present = dict.fromkeys(k for names in keys.values() for k in names)

    if edit.deltas is not None:
        _check_reach(edit, reach, tower)
        changes = to_hf(edit.deltas, towers=[tower])  # canonical name -> delta
    else:  # an unlearned model without its delta: deliver its whole tower
        changes = to_hf(edit.unlearned, towers=[tower])
        changes = {name: value for name, value in changes.items() if layout.key(name) in present}
    expected = to_hf(edit.unlearned, towers=[tower]) if edit.unlearned is not None else None

    missing = [name for name in changes if layout.key(name) not in present]
    if missing:
        raise UserError(f"{str(component_dir)!r} holds no tensor for {', '.join(missing)}.")

    # The new value of each tensor is computed once, from the most precise file that holds it (variants
    # such as model.fp16.safetensors then get the fp32 result rounded once), and cast to each file's dtype.
    edits: dict[Path, dict[str, Tensor]] = {}
    new_values: dict[str, Tensor] = {}
    worst_base, worst_result = 0.0, 0.0
    for path in preferred_first(keys):
        with safe_open(str(path), framework="pt") as handle:
            for name, change in changes.items():
                key = layout.key(name)
                if key not in keys[path]:
                    continue
                stored = handle.get_tensor(key)
                if tuple(stored.shape) != tuple(change.shape):
                    raise UserError(
                        f"{key!r} has shape {tuple(stored.shape)} in {str(path)!r} but "
                        f"{tuple(change.shape)} in the run: not the same architecture."
                    )
                if name not in new_values:
                    if edit.deltas is not None:
                        new_values[name] = stored.double() + change.double()
                        if expected is not None:
                            worst_base = max(worst_base, equal_under_dtype(stored, expected[name].double() - change))
                    elif equal_under_dtype(stored, change) > 0.0:
                        new_values[name] = change.double()
                    else:
                        continue  # the unlearned model holds this tensor as the pipeline does
                value = new_values[name].to(stored.dtype)
                if expected is not None:
                    worst_result = max(worst_result, equal_under_dtype(value, expected[name]))
                edits.setdefault(path, {})[key] = value
    new_values = {name: value.float() for name, value in new_values.items()}
    if check_base and expected is not None and edit.deltas is not None:
        worst_base = max(worst_base, _unchanged_difference(keys, layout, expected, changes))
        if worst_base > BASE_TOLERANCE:
            raise UserError(
                f"The {tower} tower in {str(component_dir)!r} is not the CLIP the run started from (relative "
                f"difference up to {worst_base:.3g}, tolerance {BASE_TOLERANCE:g}). Unlearn that pipeline's own CLIP "
                "(PipelineGradientCollector), or pass --no-check-base to add the delta anyway."
            )

    dropped = [p for p in component_dir.iterdir() if p.is_file() and p.suffix in PICKLED_WEIGHTS]
    summary = {
        "format": EDIT_FORMAT,
        "run": str(Path(run_dir).resolve()),
        "source": str(source.resolve()),
        "component": component,
        "tower": tower,
        "model": edit.model,
        "entries": edit.entries,
        "link": link,
        "mode": "delta" if edit.deltas is not None else "unlearned model (whole tower)",
        "reach": {
            "layers": reach.layers,
            "final_norm": reach.final_norm,
            "projection": reach.projection,
            "what": reach.what,
        },
        "changed": sorted(layout.key(name) for name in new_values),
        "base_relative_difference": worst_base if expected is not None else None,
        "result_relative_difference": worst_result if expected is not None else None,
    }

    def write_edit(path: Path, _) -> None:
        save_file(
            {name: value.contiguous() for name, value in new_values.items()},
            str(path),
            metadata={
                "format": EDIT_FORMAT,
                "tower": tower,
                "component": component,
                "entries": json.dumps(edit.entries),
                "model": json.dumps(public_identity(edit.model)),
            },
        )

    def write_summary(path: Path, files: dict) -> None:
        summary.update(files)
        path.write_text(json.dumps(summary, indent=2) + "\n")

    write_edited_tree(
        source, output, edits, link=link, drop=dropped, extra={EDIT_FILE: write_edit, SUMMARY_FILE: write_summary}
    )
    return summary


def _unchanged_difference(
    keys: dict[Path, list[str]], layout: Layout, expected: dict[str, Tensor], changes: dict[str, Tensor]
) -> float:
    """Largest relative difference between the pipeline's unchanged tower tensors and the run's."""
    from safetensors import safe_open

    worst = 0.0
    for path, names in keys.items():
        with safe_open(str(path), framework="pt") as handle:
            for name, value in expected.items():
                key = layout.key(name)
                if name in changes or key not in names:
                    continue
                worst = max(worst, equal_under_dtype(handle.get_tensor(key), value))
    return worst


def apply_edit(module: torch.nn.Module, path: str | Path) -> list[str]:
    """Load ``slug_edit.safetensors`` into a Hugging Face model in memory (its CLIP tower, any prefix).

    Example::

        pipe = StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1")
        apply_edit(pipe.text_encoder, "sd21-unlearned/slug_edit.safetensors")

    Returns:
        The module's keys that were replaced.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != EDIT_FORMAT:
            raise UserError(f"{str(path)!r} is not an edit written by export-diffusers/export-llava.")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    own = module.state_dict()
    layout = Layout.find(own, metadata["tower"])
    state = {layout.key(name): value.to(own[layout.key(name)].dtype) for name, value in tensors.items()}
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return list(state)
