"""``eval-diffusion`` and ``eval-vlm``: the command lines of :mod:`slug_lightning.hf.evaluate`.

They parse the arguments, load the pipelines (before and after the edit) and the scorer, run
:func:`~slug_lightning.hf.evaluate.diffusion_forgetting` / :func:`~slug_lightning.hf.evaluate.identity_answers`
and print (and optionally write) the numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slug_lightning.commands.parsing import CommandParser
from slug_lightning.concepts import Concept
from slug_lightning.errors import UserError
from slug_lightning.hf import DEFAULT_QUESTION


def _names(values: list[str] | None, path: str | None, what: str) -> list[str]:
    names = list(values or [])
    if path:
        names += [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise UserError(f"Give at least one {what}.")
    return names


def _dtype(name: str):
    import torch

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
    parser = CommandParser(
        prog=prog,
        description=(
            "Generate images for prompts with a diffusers pipeline (and with its edited copy) and classify them "
            "with a CLIP zero-shot classifier over the target and other names: the fraction classified as the "
            "target, before and after."
        ),
    )
    parser.add_argument("--pipeline", required=True, help="the original diffusers pipeline directory")
    parser.add_argument("--edited", help="the edited pipeline (export-diffusers output)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat), e.g. 'a photo of Elon Musk'")
    parser.add_argument("--prompts", help="a file with one prompt per line")
    parser.add_argument("--class", dest="classes", action="append", help="another name to choose among (repeat)")
    parser.add_argument("--classes", dest="classes_file", help="a file with one name per line")
    parser.add_argument("--template", action="append", help="zero-shot template (default: 'a photo of {}.')")
    parser.add_argument("--clip_model", default="ViT-B-32", help="OpenCLIP model that classifies (default ViT-B-32)")
    parser.add_argument("--clip_pretrained", default=None, help="its weights: tag or file")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--images_per_prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the pipeline's)")
    parser.add_argument("--save_images", help="write the images under this directory (before/, after/)")
    _common(parser)
    args = parser.parse_args(argv)
    from slug_lightning.hf import require
    from slug_lightning.hf.evaluate import diffusion_forgetting
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
            pipeline,
            prompts,
            args.target,
            classes,
            scorer,
            templates=args.template or ["a photo of {}."],
            device=args.device,
            save_images=images_dir,
            seed=args.seed,
            images_per_prompt=args.images_per_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
        )
        print(
            f"{side}: {100 * result[side]['target_rate']:.1f}% of {result[side]['images']} images classified "
            f"as {args.target!r}"
        )
    _finish(result, args.output)
    return 0


def vlm_main(argv: list[str] | None = None, prog: str = "eval-vlm") -> int:
    """``eval-vlm``: how often a LLaVA-style model names the target in its images, before and after."""
    parser = CommandParser(
        prog=prog,
        description=(
            "Ask a LLaVA-style model (and its edited copy) who is in each image of an identity set "
            "(root/<name>/*.jpg) and count the answers naming the target: on the target's images (forgetting) "
            "and on the others (how often their own name is still given)."
        ),
    )
    parser.add_argument("--model", required=True, help="the original model directory (with its processor)")
    parser.add_argument("--edited", help="the edited model (export-llava output)")
    parser.add_argument("--identities", required=True, help="image folder, one subfolder per person")
    parser.add_argument("--alias", action="append", default=[], help="another spelling of the target (repeat)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="seeded per-class subset of the other identities' images (the target's are all kept)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=24)
    _common(parser)
    args = parser.parse_args(argv)
    from slug_lightning.datamodules.labelled import LabelledImages
    from slug_lightning.hf import require
    from slug_lightning.hf.evaluate import identity_answers, llava_answerer
    from slug_lightning.labelled_sets import LabelledSet

    transformers = require("transformers", "vlm")

    target = Concept(args.target, tuple(args.alias))
    dataset = LabelledImages(
        LabelledSet("identities", root=args.identities, fraction=args.fraction), keep_classes=[target.name]
    )
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
        result[side] = identity_answers(
            llava_answerer(model.eval(), processor, args.question, args.max_new_tokens), images, target
        )
        r = result[side]
        print(
            f"{side}: names {target.name!r} for {100 * r['target_named']:.1f}% of its {r['target_images']} images; "
            f"other people named correctly {100 * r['others_named_correctly']:.1f}% of {r['other_images']}"
        )
    _finish(result, args.output)
    return 0
