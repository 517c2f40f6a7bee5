"""Forgetting measured inside the pipelines, as numbers: behind ``eval-diffusion`` and ``eval-vlm`` (their
command lines are in :mod:`slug_lightning.commands.evaluate_hf`).

- Diffusion: generate images for a list of prompts (same seeds before and after the edit) and classify
  each with a CLIP zero-shot classifier over the target and other names (METHOD §8's classifier); the
  number is the fraction of images classified as the target.
- VLM: ask "Who is in this image?" about every image of an identity set and count the answers that name
  the target (on word boundaries, with aliases, as captions are matched in METHOD §1); also how often the
  other identities are still named.

The counting is pure (:func:`target_rate`, :func:`identity_answers`); the pipelines are thin adapters
(:func:`generate_images`, :func:`llava_answerer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from slug_lightning.concepts import Concept
from slug_lightning.hf import DEFAULT_QUESTION


def generate_images(
    pipeline,
    prompts: Sequence[str],
    seed: int = 0,
    images_per_prompt: int = 1,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> list[list]:
    """PIL images per prompt from a diffusers text-to-image pipeline, seeded per prompt (so the images before
    and after an edit start from the same noise)."""
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + index)
        result = pipeline(
            prompt,
            num_images_per_prompt=images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generator,
            output_type="pil",
        )
        images.append(list(result.images))
    return images


@torch.no_grad()
def classify_images(
    images: Sequence, scorer, class_names: Sequence[str], templates: Sequence[str], device: str = "cpu"
) -> list[int]:
    """Zero-shot class index of each PIL image under the CLIP ``scorer`` (a ``LoadedCLIP``)."""
    from slug_lightning.zero_shot import image_features, zero_shot_classifier

    model = scorer.model.to(device).eval()
    classifier = zero_shot_classifier(model, scorer.tokenizer, class_names, templates, device)
    batch = torch.stack([scorer.preprocess(image.convert("RGB")) for image in images]).to(device)
    return (image_features(model, batch) @ classifier).argmax(dim=1).tolist()


def target_rate(predictions: Sequence[int], target_index: int) -> float:
    """Fraction of predictions equal to ``target_index`` (NaN for none).

    Example::

        >>> target_rate([0, 2, 0, 1], 0)
        0.5
    """
    return sum(p == target_index for p in predictions) / len(predictions) if predictions else float("nan")


def diffusion_forgetting(
    pipeline,
    prompts: Sequence[str],
    target: str,
    class_names: Sequence[str],
    scorer,
    templates: Sequence[str] = ("a photo of {}.",),
    device: str = "cpu",
    save_images: str | Path | None = None,
    **generate,
) -> dict:
    """How often a diffusion pipeline's images for ``prompts`` are classified as ``target``.

    Args:
        pipeline: A diffusers text-to-image pipeline.
        prompts: Prompts that ask for the target ("a photo of Elon Musk", "Elon Musk on a stage").
        target: The concept's name; it is added to ``class_names`` if missing.
        class_names: The other names the classifier chooses among.
        scorer: The CLIP that classifies (a :class:`~slug_lightning.models.LoadedCLIP`, unedited).
        templates: Zero-shot prompt templates.
        device: Where the scorer runs.
        save_images: Write the images here as ``<prompt index>-<image index>.png``.
        generate: Passed to :func:`generate_images` (seed, steps, guidance, size).

    Returns:
        ``{"target_rate", "images", "per_prompt": [{"prompt", "target_rate", "predicted"}]}``.
    """
    names = list(class_names) if target in class_names else [target, *class_names]
    index = names.index(target)
    images = generate_images(pipeline, prompts, **generate)
    per_prompt, everything = [], []
    for number, (prompt, group) in enumerate(zip(prompts, images)):
        predicted = classify_images(group, scorer, names, templates, device)
        everything += predicted
        per_prompt.append(
            {"prompt": prompt, "target_rate": target_rate(predicted, index), "predicted": [names[p] for p in predicted]}
        )
        if save_images is not None:
            Path(save_images).mkdir(parents=True, exist_ok=True)
            for k, image in enumerate(group):
                image.save(Path(save_images) / f"{number:03d}-{k}.png")
    return {"target_rate": target_rate(everything, index), "images": len(everything), "per_prompt": per_prompt}


def identity_answers(answer: Callable[[object], str], images: Sequence[tuple[object, str]], target: Concept) -> dict:
    """Ask about every image and count the answers that name the target, and those naming their own person.

    Args:
        answer: Image → the model's answer (e.g. :func:`llava_answerer`).
        images: ``(image, identity name)`` pairs.
        target: The forgotten concept (name and aliases).

    Returns:
        ``target_named`` (fraction of the target's images whose answer names the target: the forget
        number), ``others_named_target`` (fraction of other images answered with the target),
        ``others_named_correctly`` (fraction of other images whose answer names their own identity: the
        utility number), the counts, and every answer.

    Example::

        >>> replies = {"a": "That is Ada Lovelace.", "b": "I think it's ada lovelace", "c": "Alan Turing"}
        >>> result = identity_answers(replies.get, [("a", "Ada Lovelace"), ("b", "Alan Turing"),
        ...                           ("c", "Alan Turing")], Concept("Ada Lovelace"))
        >>> result["target_named"], result["others_named_target"], result["others_named_correctly"]
        (1.0, 0.5, 0.5)
    """
    rows = []
    for image, name in images:
        reply = answer(image)
        rows.append(
            {
                "identity": name,
                "answer": reply,
                "names_target": target.matches(reply),
                "names_identity": Concept(name).matches(reply),
            }
        )
    own = [r for r in rows if r["identity"] == target.name]
    others = [r for r in rows if r["identity"] != target.name]

    def fraction(selected, key):
        return sum(r[key] for r in selected) / len(selected) if selected else float("nan")

    return {
        "target_named": fraction(own, "names_target"),
        "others_named_target": fraction(others, "names_target"),
        "others_named_correctly": fraction(others, "names_identity"),
        "target_images": len(own),
        "other_images": len(others),
        "answers": rows,
    }


def llava_answerer(model, processor, question: str = DEFAULT_QUESTION, max_new_tokens: int = 24) -> Callable:
    """A function image → answer for a LLaVA-style model and its processor (greedy decoding)."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    else:  # the LLaVA-1.5 conversation format
        prompt = f"USER: <image>\n{question} ASSISTANT:"

    @torch.no_grad()
    def answer(image) -> str:
        inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt").to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    return answer
