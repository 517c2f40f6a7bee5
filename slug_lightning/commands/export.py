"""``export-diffusers`` and ``export-llava``: the command lines of :func:`slug_lightning.hf.export.deliver`.

They parse the arguments, work out what of the CLIP tower the pipeline uses
(:func:`~slug_lightning.hf.export.diffusers_reach`, :func:`~slug_lightning.hf.export.llava_reach`), deliver
the run's edit and print what was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slug_lightning.commands.parsing import CommandParser
from slug_lightning.hf import LINK_MODES


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, help="output directory of an unlearn run (delta.safetensors and/or model.safetensors)"
    )
    parser.add_argument("--output_dir", required=True, help="new directory to write (must not exist or be empty)")
    parser.add_argument(
        "--link",
        choices=LINK_MODES,
        default="symlink",
        help="how unchanged files get into the output (default: symlink into the input)",
    )
    parser.add_argument(
        "--no_check_base",
        action="store_true",
        help="add the delta even if the pipeline's CLIP differs from the run's base model",
    )


def _report(summary: dict, output: str) -> None:
    print(
        f"wrote {output}: {len(summary['changed'])} changed tensors in {len(summary['rewritten'])} rewritten "
        f"file(s) ({', '.join(summary['rewritten'])}); {len(summary['linked'])} file(s) unchanged "
        f"({'linked' if summary.get('link') != 'copy' else 'copied'})"
        + (f"; left out pickled weights {', '.join(summary['dropped'])}" if summary["dropped"] else "")
    )
    if summary["base_relative_difference"] is not None:
        print(
            f"checked against the run's model.safetensors: base differs by "
            f"{summary['base_relative_difference']:.2g}, result by {summary['result_relative_difference']:.2g} "
            "(relative, at the stored precision)"
        )


def export_diffusers_main(argv: list[str] | None = None, prog: str = "export-diffusers") -> int:
    """``export-diffusers``: put a language-tower edit into a diffusers pipeline's text encoder."""
    parser = CommandParser(
        prog=prog,
        description=(
            "Write a copy of a diffusers pipeline (e.g. Stable Diffusion 2.1) whose text encoder carries an "
            "unlearn run's edit. Only the text encoder's safetensors file(s) are new; the rest are links (or "
            "copies). Refuses edits the pipeline cannot feel (SD 2.x drops the last text block and the projection)."
        ),
    )
    parser.add_argument("--pipeline", required=True, help="the diffusers pipeline directory (model_index.json)")
    _common_arguments(parser)
    parser.add_argument(
        "--component", default="text_encoder", help="subfolder of the text encoder (default: text_encoder)"
    )
    parser.add_argument("--clip_skip", type=int, default=0, help="the clip_skip you run the pipeline with")
    args = parser.parse_args(argv)
    from slug_lightning.hf.export import deliver, diffusers_reach
    from slug_lightning.layers import LANGUAGE

    pipeline = Path(args.pipeline)
    summary = deliver(
        args.run,
        pipeline,
        args.output_dir,
        LANGUAGE,
        args.component,
        diffusers_reach(pipeline, args.component, args.clip_skip),
        args.link,
        not args.no_check_base,
    )
    _report(summary, args.output_dir)
    return 0


def export_llava_main(argv: list[str] | None = None, prog: str = "export-llava") -> int:
    """``export-llava``: put a vision-tower edit into a LLaVA-style model (or a CLIP vision directory)."""
    parser = CommandParser(
        prog=prog,
        description=(
            "Write a copy of a LLaVA-style model (transformers LlavaForConditionalGeneration directory, e.g. "
            "llava-hf/llava-1.5-7b-hf) whose CLIP vision tower carries an unlearn run's edit. Only the "
            "safetensors shard(s) holding changed tensors are new; the rest are links (or copies). Refuses edits "
            "the model cannot feel (LLaVA-1.5 reads the penultimate vision block: not the last block, ln_post "
            "or the projection). For the original LLaVA code, whose config names a separate CLIP "
            "(mm_vision_tower), give that CLIP's directory as --model and --vision_feature_layer -2."
        ),
    )
    parser.add_argument("--model", required=True, help="the model directory (config.json + safetensors)")
    _common_arguments(parser)
    parser.add_argument(
        "--vision_feature_layer",
        type=int,
        default=None,
        help="hidden state the model reads (default: from config.json, else -2)",
    )
    args = parser.parse_args(argv)
    from slug_lightning.hf.export import deliver, llava_reach
    from slug_lightning.layers import VISION

    model = Path(args.model)
    summary = deliver(
        args.run,
        model,
        args.output_dir,
        VISION,
        "",
        llava_reach(model, args.vision_feature_layer),
        args.link,
        not args.no_check_base,
    )
    _report(summary, args.output_dir)
    return 0
