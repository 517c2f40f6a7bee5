"""GradientCollector on the demo world with a random tiny CLIP: the gradients are the ones METHOD §2
defines, for candidate tensors only, independent of the batch size, and they point the right way."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from slug_lightning import GradientCollector, SlugTrainer
from slug_lightning.concepts import Concept
from slug_lightning.datamodules import LaionDataModule
from slug_lightning.demo import make_demo_world
from slug_lightning.layers import candidate_layers, tower_of


def _trainer():
    return SlugTrainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )


def _collect(world, batch_size, seed=0):
    torch.manual_seed(seed)
    collector = GradientCollector("slug-tiny")
    laion = LaionDataModule(world.shards, concepts=[Concept(world.default_target)], batch_size=batch_size)
    _trainer().predict(collector, datamodule=laion, return_predictions=False)
    return collector, laion


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        portraits_per_person=8,
        person_object_per_person=2,
        samples_per_object=8,
        scenery_samples=20,
        eval_per_person=2,
        eval_per_object=2,
        shards=4,
    )


@pytest.fixture(scope="module")
def collected(world):
    return _collect(world, batch_size=64)


def _all_pairs(laion, loader):
    images, texts = [], []
    for batch in loader:
        images.append(batch["image"])
        texts.append(batch["text"])
    return torch.cat(images), torch.cat(texts)


def test_store_holds_candidates_and_counts(collected, world):
    collector, laion = collected
    store = collector.gradients
    candidates = candidate_layers(collector.model.named_parameters())
    assert store.layers == candidates
    assert list(store.forget[world.default_target]) == candidates
    concept = laion.concepts[0]
    assert store.forget_samples[world.default_target] == laion.count_pairs(concept) > 0
    assert store.retain_samples == laion.count_pairs(None) > 0
    assert store.skipped_samples == 0
    # nothing of the model changed, and requires_grad flags are back
    assert all(p.requires_grad for p in collector.model.parameters())


def test_forget_gradient_is_mean_over_all_pairs(collected):
    collector, laion = collected
    model = collector.model
    images, texts = _all_pairs(laion, laion.forget_dataloader(laion.concepts[0]))
    model.zero_grad()
    loss = (1 - F.cosine_similarity(model.encode_image(images), model.encode_text(texts))).mean()
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in collector.gradients.forget[laion.concepts[0].name].items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), name
    model.zero_grad()


def test_retain_gradient_is_clip_loss_mean_per_pair(collected):
    """Reference: open_clip's own ClipLoss on each global batch, weighted by its size."""
    collector, laion = collected
    model = collector.model
    clip_loss = open_clip.loss.ClipLoss()
    model.zero_grad()
    total = 0
    for batch in laion.retain_dataloader():
        n = batch["image"].shape[0]
        image = F.normalize(model.encode_image(batch["image"]), dim=-1)
        text = F.normalize(model.encode_text(batch["text"]), dim=-1)
        (clip_loss(image, text, model.logit_scale.exp()) * n).backward()
        total += n
    for name, grad in collector.gradients.retain.items():
        expected = dict(model.named_parameters())[name].grad / total
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7), name
    model.zero_grad()


def test_forget_gradient_does_not_depend_on_batch_size(collected, world):
    other, _ = _collect(world, batch_size=7)
    reference = collected[0].gradients.forget[world.default_target]
    for name, grad in other.gradients.forget[world.default_target].items():
        assert (grad - reference[name]).norm() <= 1e-4 * reference[name].norm() + 1e-8, name


def test_small_step_along_forget_gradient_lowers_forget_cosine(collected):
    """METHOD §5: θ_l + λ·G_f,l with small λ > 0 must lower the mean cosine of forget pairs."""
    collector, laion = collected
    model = collector.model
    concept = laion.concepts[0].name
    images, texts = _all_pairs(laion, laion.forget_dataloader(laion.concepts[0]))

    @torch.no_grad()
    def mean_cosine():
        return F.cosine_similarity(model.encode_image(images), model.encode_text(texts)).mean().item()

    base = mean_cosine()
    parameters = dict(model.named_parameters())
    layers = collector.gradients.layers
    by_tower = {t: [n for n in layers if tower_of(n) == t] for t in ("vision", "language")}
    probe = [names[i] for names in by_tower.values() for i in (0, len(names) // 2, -1)]
    for name in probe:
        gradient = collector.gradients.forget[concept][name]
        step = 1e-3 * parameters[name].norm() / gradient.norm()
        with torch.no_grad():
            parameters[name].add_(step * gradient)
        moved = mean_cosine()
        with torch.no_grad():
            parameters[name].sub_(step * gradient)
        assert moved < base, f"{name}: cosine {base:.6f} -> {moved:.6f}"


def _collect_with(world, batch_size=64, precision="32-true", **collector_kwargs):
    torch.manual_seed(0)
    collector = GradientCollector("slug-tiny", **collector_kwargs)
    laion = LaionDataModule(world.shards, concepts=[Concept(world.default_target)], batch_size=batch_size)
    trainer = SlugTrainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=precision,
    )
    trainer.predict(collector, datamodule=laion, return_predictions=False)
    return collector.gradients


def test_activation_checkpointing_gives_the_same_gradients(collected, world):
    reference = collected[0].gradients
    store = _collect_with(world, activation_checkpointing=True)
    for stream, grads in [("retain", store.retain), *[(c, g) for c, g in store.forget.items()]]:
        expected = reference.retain if stream == "retain" else reference.forget[stream]
        for name, grad in grads.items():
            assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), (stream, name)


def test_bf16_autocast_keeps_fp32_sums_close_to_fp32(collected, world):
    reference = collected[0].gradients
    store = _collect_with(world, precision="bf16-mixed")
    concept = world.default_target
    for name, grad in store.forget[concept].items():
        assert grad.dtype == torch.float32
        cosine = F.cosine_similarity(grad.flatten(), reference.forget[concept][name].flatten(), dim=0)
        assert cosine > 0.98, (name, cosine.item())
    assert store.retain_samples == reference.retain_samples


def test_fp16_precision_is_refused(world):
    from slug_lightning.errors import UserError

    with pytest.raises(UserError, match="bf16-mixed"):
        _collect_with(world, precision="16-true")  # (16-mixed becomes bf16 on CPU)


def test_the_gradient_pass_measures_its_peak_memory(collected):
    """The pass records its peak RSS (and no CUDA peak without CUDA); that the sampling catches a peak is the
    next test."""
    collector, _ = collected
    assert collector.memory.result.keys() == {"peak_rss_mib"}
    assert collector.memory.result["peak_rss_mib"] > 0


def test_peak_memory_sees_an_allocation_freed_before_the_phase_ends():
    """A 256 MiB block written and freed inside the phase: the sampled peak holds it, the RSS after does not."""
    import time

    from slug_lightning.memory import PeakMemory, current_rss_mib

    with PeakMemory(interval=0.005) as phase:
        start = current_rss_mib()
        block = torch.ones(64 * 2**20)  # 256 MiB of float32, every page written
        time.sleep(0.1)  # a few samples while it is held
        del block
    assert phase.result["peak_rss_mib"] >= start + 0.9 * 256
    assert current_rss_mib() < phase.result["peak_rss_mib"] - 0.5 * 256
