"""Unlearning a pipeline's own CLIP, and the evaluation hooks, on tiny random pipelines, offline.

The last two tests run the whole path: a real ``unlearn`` of the pipeline's own tower on a small demo world, then
delivery, then the pipeline, and check the delivered tensors are the unlearned CLIP's.
"""

import json

import open_clip
import pytest
import torch
from hf_tiny import randomize, tiny_llava, tiny_sd_pipeline
from PIL import Image

import slug_lightning  # noqa: F401  (registers slug-tiny)
from slug_lightning.artifacts import save_state_dict
from slug_lightning.cli import main
from slug_lightning.concepts import Concept
from slug_lightning.errors import UserError
from slug_lightning.hf.evaluate import classify_images, diffusion_forgetting, identity_answers, llava_answerer
from slug_lightning.hf.loading import PipelineGradientCollector
from slug_lightning.hf.mapping import Layout, from_hf
from slug_lightning.layers import LANGUAGE, VISION
from slug_lightning.models import load_clip


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The pipelines' CLIP, and another one saved as the OpenCLIP 'pretrained' weights of the architecture."""
    torch.manual_seed(0)
    clip = randomize(open_clip.create_model("slug-tiny").eval())
    other = randomize(open_clip.create_model("slug-tiny").eval(), seed=3)
    path = tmp_path_factory.mktemp("clip") / "other.safetensors"
    save_state_dict(path, other.state_dict())
    return clip, other, str(path)


@pytest.fixture(scope="module")
def sd2_like(clips, tmp_path_factory):
    return tiny_sd_pipeline(clips[0], tmp_path_factory.mktemp("sd") / "pipeline", text_layers=1)


@pytest.fixture(scope="module")
def llava(clips, tmp_path_factory):
    return tiny_llava(clips[0], tmp_path_factory.mktemp("llava") / "model")


def _tower(model, tower):
    return {
        n: p
        for n, p in model.state_dict().items()
        if n != "attn_mask" and n != "logit_scale" and n.startswith("visual.") == (tower == VISION)
    }


def test_collector_takes_the_text_encoder_and_tokenizer_of_a_diffusers_pipeline(clips, sd2_like):
    clip, other, other_path = clips
    collector = PipelineGradientCollector(str(sd2_like), "diffusers", "slug-tiny", other_path)
    model = collector.model
    # blocks the pipeline holds come from it; the dropped block, the projection and the vision tower from
    # the OpenCLIP weights
    for name, value in _tower(model, LANGUAGE).items():
        source = other if name.startswith(("transformer.resblocks.1.", "text_projection")) else clip
        assert torch.equal(value, source.state_dict()[name]), name
    for name, value in _tower(model, VISION).items():
        assert torch.equal(value, other.state_dict()[name]), name
    # the candidates are what SD 2.x-like pipelines can feel: block 0 and ln_final of the text tower
    assert collector.candidates() == [
        "transformer.resblocks.0.ln_1.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.attn.out_proj.weight",
        "transformer.resblocks.0.ln_2.weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "transformer.resblocks.0.mlp.c_proj.weight",
        "ln_final.weight",
    ]
    texts = ["a photo of a cat", "an oil painting of a lighthouse"]
    assert torch.equal(collector.tokenizer(texts), open_clip.get_tokenizer("slug-tiny")(texts))
    assert collector.identity()["pipeline"] == sd2_like.name  # its name: the identity is shipped, never a path
    everything = PipelineGradientCollector(
        str(sd2_like), "diffusers", "slug-tiny", other_path, restrict_to_pipeline=False
    )
    assert "visual.proj" in everything.candidates() and "text_projection" in everything.candidates()


def test_collector_takes_the_vision_tower_of_a_llava_model(clips, llava):
    clip, other, other_path = clips
    collector = PipelineGradientCollector(str(llava), "llava", "slug-tiny", other_path)
    for name, value in _tower(collector.model, VISION).items():
        assert torch.equal(value, (other if name == "visual.proj" else clip).state_dict()[name]), name
    candidates = collector.candidates()
    assert all(c.startswith("visual.") for c in candidates)
    unused = ("visual.transformer.resblocks.2.", "visual.ln_post", "visual.proj")
    assert not any(c.startswith(unused) for c in candidates)
    assert "visual.transformer.resblocks.1.mlp.c_fc.weight" in candidates


def test_a_tower_of_another_activation_is_refused(tmp_path):
    """An OpenAI-style (QuickGELU) tower loaded into a GELU architecture: the error names the fix."""
    torch.manual_seed(0)
    quick = tiny_llava(open_clip.create_model("slug-tiny", force_quick_gelu=True).eval(), tmp_path / "model")
    with pytest.raises(UserError, match="hidden_act.*quickgelu"):
        PipelineGradientCollector(str(quick), "llava", "slug-tiny")


def test_diffusion_forgetting_plumbing(clips, sd2_like, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd2_like))
    pipe.set_progress_bar_config(disable=True)
    scorer = load_clip("slug-tiny", clips[2])
    settings = dict(seed=0, images_per_prompt=2, num_inference_steps=2, height=16, width=16)
    names = ["Bob Stone", "Carla Diaz"]
    result = diffusion_forgetting(
        pipe,
        ["a photo of Ada Lovelace", "Ada Lovelace at the beach"],
        "Ada Lovelace",
        names,
        scorer,
        save_images=tmp_path / "images",
        **settings,
    )
    assert result["images"] == 4 and len(list((tmp_path / "images").glob("*.png"))) == 4
    predicted = [name for row in result["per_prompt"] for name in row["predicted"]]
    assert set(predicted) <= {"Ada Lovelace", *names}
    assert result["target_rate"] == predicted.count("Ada Lovelace") / 4
    # the classifier is the package's zero-shot classifier over the target and the other names
    images = [Image.open(p) for p in sorted((tmp_path / "images").glob("*.png"))]
    indices = classify_images(images, scorer, ["Ada Lovelace", *names], ["a photo of {}."])
    assert [["Ada Lovelace", *names][i] for i in indices] == predicted
    # same seeds, same pipeline: the same number
    assert (
        diffusion_forgetting(
            pipe, ["a photo of Ada Lovelace", "Ada Lovelace at the beach"], "Ada Lovelace", names, scorer, **settings
        )["target_rate"]
        == result["target_rate"]
    )


def test_identity_answers_counts_names_on_word_boundaries():
    replies = {1: "It is Ada Lovelace.", 2: "Lovelace, probably", 3: "adamant? no idea", 4: "bob stone", 5: "Ada"}
    images = [(1, "Ada Lovelace"), (2, "Ada Lovelace"), (3, "Ada Lovelace"), (4, "Bob Stone"), (5, "Bob Stone")]
    result = identity_answers(replies.get, images, Concept("Ada Lovelace", aliases=("Lovelace", "Ada")))
    assert result["target_named"] == pytest.approx(2 / 3)
    assert result["others_named_target"] == 0.5
    assert result["others_named_correctly"] == 0.5
    assert (result["target_images"], result["other_images"]) == (3, 2)


def test_eval_vlm_runs_a_llava_model_before_and_after(llava, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    for name in ["Ada Lovelace", "Bob Stone"]:
        (tmp_path / "ids" / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40, 40), (40 * k, 100, 200)).save(tmp_path / "ids" / name / f"{k}.png")
    output = tmp_path / "vlm.json"
    assert (
        main(
            [
                "eval-vlm",
                "--model",
                str(llava),
                "--edited",
                str(llava),
                "--identities",
                str(tmp_path / "ids"),
                "--target",
                "Ada Lovelace",
                "--max_new_tokens",
                "3",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    result = json.loads(output.read_text())
    assert result["before"]["target_images"] == 2 and result["before"]["other_images"] == 2
    assert [a["answer"] for a in result["before"]["answers"]] == [a["answer"] for a in result["after"]["answers"]]
    model = LlavaForConditionalGeneration.from_pretrained(str(llava)).eval()
    answer = llava_answerer(model, AutoProcessor.from_pretrained(str(llava)), max_new_tokens=3)
    assert answer(Image.new("RGB", (40, 40), (0, 100, 200))) == result["before"]["answers"][0]["answer"]


# --- the whole path: unlearn the pipeline's own CLIP on a small world, deliver, run -------------------------


def _unlearn(collector, world, output, tower):
    from slug_lightning import SlugTrainer
    from slug_lightning.callbacks import StepSearch
    from slug_lightning.datamodules import LabelledSet, LaionDataModule

    target = world.default_target
    trainer = SlugTrainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    # A random CLIP may never recognise the target, which then has nothing to forget and gets no edit to deliver.
    # Among 4 classes every forget top-5 is 1, so the search runs (and keeps its best probe) whatever the weights.
    competing = [target, *[person for person in world.people if person != target][:3]]
    search = StepSearch(
        sets=[LabelledSet("identities", root=str(world.identities_dir), classes=competing)],
        metric="top5",
        max_steps=3,
        towers=[tower],
        audit=False,
    )
    return trainer.unlearn(
        collector,
        LaionDataModule(world.shards, concepts=[Concept(target)], batch_size=128),
        search,
        output_dir=str(output),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from slug_lightning.demo import make_demo_world

    # Small: what is tested is the path from the pipeline's tower to its delivery, not how well it forgets.
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        people=8,
        objects=2,
        portraits_per_person=12,
        person_object_per_person=2,
        samples_per_object=6,
        scenery_samples=6,
        eval_per_person=4,
        eval_per_object=2,
        shards=2,
    )


@pytest.mark.e2e
def test_unlearn_the_sd_pipeline_text_encoder_and_deliver_it(clips, sd2_like, world, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    collector = PipelineGradientCollector(str(sd2_like), "diffusers", "slug-tiny", clips[2])
    report = _unlearn(collector, world, tmp_path / "run", LANGUAGE)
    (concept,) = report["concepts"]
    assert concept["tower"] == "language" and concept["layer"] in collector.candidates()
    assert (
        main(
            [
                "export-diffusers",
                "--run",
                str(tmp_path / "run"),
                "--pipeline",
                str(sd2_like),
                "--output_dir",
                str(tmp_path / "edited"),
            ]
        )
        == 0
    )
    unlearned = load_file(str(tmp_path / "run" / "model.safetensors"))
    delivered = load_file(str(tmp_path / "edited" / "text_encoder" / "model.safetensors"))
    layout = Layout.find(delivered, LANGUAGE)
    back = from_hf({name: delivered[key] for key, name in layout.canonical(delivered).items()})
    assert concept["layer"] in back
    for name, value in back.items():
        torch.testing.assert_close(value, unlearned[name], atol=1e-6, rtol=1e-6, msg=name)
    original = load_file(str(sd2_like / "text_encoder" / "model.safetensors"))
    assert sum(not torch.equal(delivered[k], original[k]) for k in delivered) >= 1
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "edited"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a photo", num_inference_steps=2, height=16, width=16).images[0].size == (16, 16)


@pytest.mark.e2e
def test_unlearn_the_llava_vision_tower_and_deliver_it(clips, llava, world, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    collector = PipelineGradientCollector(str(llava), "llava", "slug-tiny", clips[2])
    report = _unlearn(collector, world, tmp_path / "run", VISION)
    (concept,) = report["concepts"]
    assert concept["tower"] == "vision" and concept["layer"] in collector.candidates()
    assert (
        main(
            [
                "export-llava",
                "--run",
                str(tmp_path / "run"),
                "--model",
                str(llava),
                "--output_dir",
                str(tmp_path / "edited"),
            ]
        )
        == 0
    )
    unlearned = load_file(str(tmp_path / "run" / "model.safetensors"))
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "edited")).eval()
    vision = model.model.vision_tower.state_dict()
    layout = Layout.find(vision, VISION)
    back = from_hf({name: vision[key] for key, name in layout.canonical(vision).items()})
    assert concept["layer"] in back
    for name, value in back.items():
        torch.testing.assert_close(value, unlearned[name], atol=1e-6, rtol=1e-6, msg=name)
