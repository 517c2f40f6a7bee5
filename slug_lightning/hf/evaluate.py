"""Forgetting measured inside the pipelines, as numbers: ``eval-diffusion`` and ``eval-vlm``.

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

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from slug_lightning.concepts import Concept
from slug_lightning.errors import UserError

DEFAULT_QUESTION = "Who is in this image? Answer with the person's name."


def generate_images(pipeline, prompts: Sequence[str], seed: int = 0, images_per_prompt: int = 1,
                    num_inference_steps: int = 30, guidance_scale: float = 7.5, height: int | None = None,
                    width: int | None = None) -> list[list]:
    """PIL images per prompt from a diffusers text-to-image pipeline, seeded per prompt (so the images before
    and after an edit start from the same noise)."""
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + index)
        result = pipeline(prompt, num_images_per_prompt=images_per_prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, height=height, width=width, generator=generator,
                          output_type="pil")
        images.append(list(result.images))
    return images


@torch.no_grad()
def classify_images(images: Sequence, scorer, class_names: Sequence[str], templates: Sequence[str],
                    device: str = "cpu") -> list[int]:
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


def diffusion_forgetting(pipeline, prompts: Sequence[str], target: str, class_names: Sequence[str], scorer,
                         templates: Sequence[str] = ("a photo of {}.",), device: str = "cpu",
                         save_images: str | Path | None = None, **generate) -> dict:
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
        per_prompt.append({"prompt": prompt, "target_rate": target_rate(predicted, index),
                           "predicted": [names[p] for p in predicted]})
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
        rows.append({"identity": name, "answer": reply, "names_target": target.matches(reply),
                     "names_identity": Concept(name).matches(reply)})
    own = [r for r in rows if r["identity"] == target.name]
    others = [r for r in rows if r["identity"] != target.name]

    def fraction(selected, key):
        return sum(r[key] for r in selected) / len(selected) if selected else float("nan")

    return {"target_named": fraction(own, "names_target"), "others_named_target": fraction(others, "names_target"),
            "others_named_correctly": fraction(others, "names_identity"), "target_images": len(own),
            "other_images": len(others), "answers": rows}


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
        return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return answer


def _names(values: list[str] | None, path: str | None, what: str) -> list[str]:
    names = list(values or [])
    if path:
        names += [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"Give at least one {what}.")
    return names


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="the forgotten concept's name")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--output", help="write the result as JSON here")


def _finish(result: dict, output: str | None) -> None:
    if output:
        from slug_lightning.artifacts import write_json

        write_json(output, result)


def diffusion_main(argv: list[str] | None = None, prog: str = "eval-diffusion") -> int:
    """``eval-diffusion``: fraction of generated images a CLIP classifies as the target, before and after."""
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Generate images for prompts with a diffusers pipeline (and with its edited copy) and classify them "
        "with a CLIP zero-shot classifier over the target and other names: the fraction classified as the "
        "target, before and after."))
    parser.add_argument("--pipeline", required=True, help="the original diffusers pipeline directory")
    parser.add_argument("--edited", help="the edited pipeline (export-diffusers output)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat), e.g. 'a photo of Elon Musk'")
    parser.add_argument("--prompts", help="a file with one prompt per line")
    parser.add_argument("--class", dest="classes", action="append", help="another name to choose among (repeat)")
    parser.add_argument("--classes", dest="classes_file", help="a file with one name per line")
    parser.add_argument("--template", action="append", help="zero-shot template (default: 'a photo of {}.')")
    parser.add_argument("--clip-model", default="ViT-B-32", help="OpenCLIP model that classifies (default ViT-B-32)")
    parser.add_argument("--clip-pretrained", default=None, help="its weights: tag or file")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the pipeline's)")
    parser.add_argument("--save-images", help="write the images under this directory (before/, after/)")
    _common(parser)
    args = parser.parse_args(argv)
    from slug_lightning.hf import require
    from slug_lightning.models import load_clip

    DiffusionPipeline = require("diffusers", "diffusion").DiffusionPipeline

    prompts = _names(args.prompt, args.prompts, "--prompt or --prompts")
    classes = _names(args.classes, args.classes_file, "--class or --classes")
    scorer = load_clip(args.clip_model, args.clip_pretrained)
    result = {}
    for side, path in (("before", args.pipeline), ("after", args.edited)):
        if path is None:
            continue
        pipeline = DiffusionPipeline.from_pretrained(path, torch_dtype=_dtype(args.dtype)).to(args.device)
        pipeline.set_progress_bar_config(disable=True)
        images_dir = Path(args.save_images) / side if args.save_images else None
        result[side] = diffusion_forgetting(
            pipeline, prompts, args.target, classes, scorer, templates=args.template or ["a photo of {}."],
            device=args.device, save_images=images_dir, seed=args.seed, images_per_prompt=args.images_per_prompt,
            num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size)
        print(f"{side}: {100 * result[side]['target_rate']:.1f}% of {result[side]['images']} images classified "
              f"as {args.target!r}")
    _finish(result, args.output)
    return 0


def vlm_main(argv: list[str] | None = None, prog: str = "eval-vlm") -> int:
    """``eval-vlm``: how often a LLaVA-style model names the target in its images, before and after."""
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Ask a LLaVA-style model (and its edited copy) who is in each image of an identity set "
        "(root/<name>/*.jpg) and count the answers naming the target: on the target's images (forgetting) "
        "and on the others (how often their own name is still given)."))
    parser.add_argument("--model", required=True, help="the original model directory (with its processor)")
    parser.add_argument("--edited", help="the edited model (export-llava output)")
    parser.add_argument("--identities", required=True, help="image folder, one subfolder per person")
    parser.add_argument("--alias", action="append", default=[], help="another spelling of the target (repeat)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--fraction", type=float, default=1.0, help="seeded per-class subset of the other "
                        "identities' images (the target's are all kept)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    _common(parser)
    args = parser.parse_args(argv)
    from slug_lightning.datamodules.labelled import LabelledImages, LabelledSet
    from slug_lightning.hf import require

    transformers = require("transformers", "vlm")

    target = Concept(args.target, tuple(args.alias))
    dataset = LabelledImages(LabelledSet("identities", root=args.identities, fraction=args.fraction),
                             keep_classes=[target.name])
    if target.name not in dataset.class_names:
        dataset.class_index(target.name)  # raises with near matches
    images = [(dataset[i][0], dataset.class_names[dataset[i][1]]) for i in range(len(dataset))]
    result = {}
    for side, path in (("before", args.model), ("after", args.edited)):
        if path is None:
            continue
        model = transformers.LlavaForConditionalGeneration.from_pretrained(path, torch_dtype=_dtype(args.dtype))
        model = model.to(args.device)
        processor = transformers.AutoProcessor.from_pretrained(path)
        result[side] = identity_answers(llava_answerer(model.eval(), processor, args.question, args.max_new_tokens),
                                        images, target)
        r = result[side]
        print(f"{side}: names {target.name!r} for {100 * r['target_named']:.1f}% of its {r['target_images']} images; "
              f"other people named correctly {100 * r['others_named_correctly']:.1f}% of {r['other_images']}")
    _finish(result, args.output)
    return 0
