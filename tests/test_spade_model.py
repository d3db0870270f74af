"""SpadeUNetModel and SemanticDiffusionPipeline on tiny models, on the CPU."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from segdiff.labels import resize_labels
from segdiff.models.spade_unet import (
    SpadeUNetModel,
    encode_label_map,
    label_boundaries,
)
from segdiff.pipelines.sdm import SemanticDiffusionPipeline, sdm_scheduler
from segdiff.tiny import tiny_vae

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
TINY = CONFIGS / "sdm_tiny.json"
CLASS_NAMES = ["background", "square", "disk", "triangle"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and tests run beside other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed: int = 0, **overrides) -> SpadeUNetModel:
    """The tiny preset with every parameter nudged off its initial value.

    Zero-initialised output layers (guided-diffusion's choice) make a fresh model predict exactly 0 whatever its
    inputs, which would let every comparison below pass vacuously.
    """
    torch.manual_seed(seed)
    model = SpadeUNetModel.from_config_file(TINY, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def random_labels(batch: int, size: int, num_classes: int = 4, seed: int = 0) -> torch.Tensor:
    """Blocky label maps (4x4 px cells), so that nearest resizing keeps their layout."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, num_classes, (batch, size // 4, size // 4), generator=generator)
    return cells.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)


# ---------------------------------------------------------------------------------------------------------
# Encoding label maps


def test_ignore_pixels_encode_to_zeros_and_edges_mark_boundaries():
    labels = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 1, 1], [2, 2, 1, 1]])
    encoded = encode_label_map(labels, num_classes=3, edge_map=True)
    assert encoded.shape == (1, 4, 4, 4) and encoded.dtype == torch.float32
    one_hot = encoded[0, :3]
    assert one_hot[:, 1, 1].tolist() == [0, 0, 0]  # ignore_index: no class at all
    assert one_hot.sum(0)[labels != 255].eq(1).all()
    assert one_hot[2, 3, 0] == 1 and one_hot[1, 0, 3] == 1

    expected_edges = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(label_boundaries(labels), expected_edges)
    assert torch.equal(encoded[0, 3].bool(), expected_edges)

    with_unknown = encode_label_map(labels, num_classes=3, unknown_channel=True)
    assert with_unknown.shape == (1, 4, 4, 4) and with_unknown[0, 3].nonzero().tolist() == [[1, 1]]


def test_encoding_refuses_ids_that_are_not_classes():
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        encode_label_map(np.array([[0, 3], [7, 255]]), num_classes=3)
    with pytest.raises(ValueError, match="integer"):
        encode_label_map(torch.zeros(4, 4), num_classes=3)


def test_resizing_label_maps_keeps_ids():
    labels = random_labels(2, 32, num_classes=200)
    assert torch.equal(resize_labels(resize_labels(labels, 64, 64), 32, 32), labels)
    assert resize_labels(labels[0], 16, 8).shape == (16, 8)
    assert set(resize_labels(labels, 13, 13).unique().tolist()) <= set(labels.unique().tolist())


# ---------------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize(
    "conditioning, in_channels, use_edge_map, learn_sigma, unknown_class",
    [
        ("spade", 3, False, False, "zeros"),
        ("spade", 4, True, True, "channel"),
        ("concat", 3, True, False, "zeros"),
        ("concat", 4, False, True, "channel"),
    ],
)
def test_forward_shapes(conditioning, in_channels, use_edge_map, learn_sigma, unknown_class):
    size = 32 if in_channels == 3 else 16  # pixels, or latents of a factor-2 VAE
    model = tiny_unet(
        conditioning=conditioning,
        in_channels=in_channels,
        out_channels=in_channels,
        use_edge_map=use_edge_map,
        learn_sigma=learn_sigma,
        unknown_class=unknown_class,
        sample_size=size,
    )
    expected_channels = 4 + use_edge_map + (unknown_class == "channel")
    assert model.segmentation_channels == expected_channels

    labels = random_labels(2, 32)  # the map at image resolution, whatever the sample size
    segmentation = model.encode_segmentation(labels)
    assert segmentation.shape == (2, expected_channels, 32, 32)
    sample = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        output = model(sample, torch.tensor([10, 500]), segmentation)
        out_tuple = model(sample, 10, segmentation, return_dict=False)
    assert output.sample.shape == (2, in_channels * (2 if learn_sigma else 1), size, size)
    assert isinstance(out_tuple, tuple) and out_tuple[0].shape == output.sample.shape
    assert torch.isfinite(output.sample).all()


def test_timestep_forms_agree_and_null_map_is_zeros():
    model = tiny_unet()
    sample, segmentation = torch.randn(2, 3, 32, 32), tiny_unet().encode_segmentation(random_labels(2, 32))
    with torch.no_grad():
        reference = model(sample, torch.tensor([7, 7]), segmentation).sample
        assert torch.allclose(model(sample, 7, segmentation).sample, reference, atol=1e-6)
        assert torch.allclose(model(sample, torch.tensor(7), segmentation).sample, reference, atol=1e-6)
        null = model(sample, 7, torch.zeros_like(segmentation)).sample
        assert torch.equal(model(sample, 7, None).sample, null)


def test_spade_encoder_does_not_see_the_segmentation():
    model = tiny_unet()
    sample = torch.randn(2, 3, 32, 32)
    activations = []
    hooks = [block.register_forward_hook(lambda m, i, o: activations.append(o)) for block in model.down_blocks]
    with torch.no_grad():
        first = model(sample, 100, model.encode_segmentation(random_labels(2, 32, seed=1))).sample
        second = model(sample, 100, model.encode_segmentation(random_labels(2, 32, seed=2))).sample
    for hook in hooks:
        hook.remove()

    half = len(activations) // 2
    assert half == len(model.down_blocks)
    for a, b in zip(activations[:half], activations[half:]):
        assert torch.equal(a, b)  # every encoder step, bit for bit
    assert not torch.allclose(first, second, atol=1e-4)  # yet the map changes the prediction


def test_concat_encoder_does_see_the_segmentation():
    model = tiny_unet(conditioning="concat")
    assert not any("to_gamma" in name for name, _ in model.named_parameters())  # plain GroupNorms only
    sample = torch.randn(1, 3, 32, 32)
    activations = []
    hook = model.down_blocks[0].register_forward_hook(lambda m, i, o: activations.append(o))
    with torch.no_grad():
        for seed in (1, 2):
            model(sample, 100, model.encode_segmentation(random_labels(1, 32, seed=seed)))
    hook.remove()
    assert not torch.allclose(activations[0], activations[1])


def test_save_and_load_give_identical_outputs(tmp_path):
    model = tiny_unet(use_edge_map=True, learn_sigma=True)
    model.save_pretrained(tmp_path / "unet")
    loaded = SpadeUNetModel.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config.use_edge_map and loaded.config.learn_sigma
    sample, segmentation = torch.randn(2, 3, 32, 32), model.encode_segmentation(random_labels(2, 32))
    with torch.no_grad():
        assert torch.equal(model(sample, 3, segmentation).sample, loaded(sample, 3, segmentation).sample)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_unet(num_res_blocks=1).train()
    sample, segmentation = torch.randn(2, 3, 32, 32), model.encode_segmentation(random_labels(2, 32))

    def gradients():
        model.zero_grad()
        model(sample, torch.tensor([1, 900]), segmentation).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="downsampling factors"):
        SpadeUNetModel.from_config_file(TINY, attention_resolutions=[16])
    with pytest.raises(ValueError, match="conditioning"):
        SpadeUNetModel.from_config_file(TINY, conditioning="crossattn")
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"segmentation must be \(B, 4, H, W\)"):
        model(torch.randn(1, 3, 32, 32), 1, torch.zeros(1, 5, 32, 32))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 3, 31, 31), 1, torch.zeros(1, 4, 31, 31))


def test_presets_parse_and_build():
    tiny = SpadeUNetModel.from_config_file(TINY)
    assert 1_000_000 < sum(p.numel() for p in tiny.parameters()) < 2_000_000
    counts = {}
    for name in ("sdm_256", "sdm_512"):
        config = json.loads((CONFIGS / f"{name}.json").read_text())
        assert config["_class_name"] == "SpadeUNetModel" and config["learn_sigma"] and "_comment" in config
        with torch.device("meta"):  # shapes only: no memory, no time
            model = SpadeUNetModel.from_config_file(CONFIGS / f"{name}.json")
        counts[name] = sum(p.numel() for p in model.parameters())
        assert model.conv_out.out_channels == 6
    # guided-diffusion's 256 px UNet of the same topology has ~554 M parameters; SPADE adds ~100 M.
    assert 600e6 < counts["sdm_256"] < 700e6 and 600e6 < counts["sdm_512"] < 700e6


def attention_levels(model) -> list[int]:
    """The widths of the blocks that attend, encoder then middle then decoder."""
    return [block.attention.to_q.in_features for block in model.down_blocks if block.attention is not None] + [
        block.attention.to_q.in_features for block in (*model.mid_blocks, *model.up_blocks) if block.attention
    ]


def test_the_1024_latent_and_ldm_concat_presets_build():
    with torch.device("meta"):
        sdm = SpadeUNetModel.from_config_file(CONFIGS / "sdm_1024_latent.json")
        ldm = SpadeUNetModel.from_config_file(CONFIGS / "ldm_concat_semantic.json")
    # SDM on 128 px SD latents: 5 levels (128 ... 8 px), attention at 32, 16, 8 px (widths 512, 768, 1024)
    assert (sdm.config.in_channels, sdm.conv_out.out_channels, sdm.config.conditioning) == (4, 8, "spade")
    assert sorted(set(attention_levels(sdm))) == [512, 768, 1024]
    assert sum(p.numel() for p in sdm.parameters()) == 501_837_576
    # latent diffusion's semantic-synthesis UNet: widths 128, 512, 1024; it attends in the middle only (16 px)
    widths = {m.out_channels for m in ldm.down_blocks.modules() if isinstance(m, torch.nn.Conv2d)}
    assert sorted(widths) == [128, 512, 1024]
    assert attention_levels(ldm) == [1024] and ldm.mid_blocks[0].attention.heads == 8
    assert ldm.config.conditioning == "concat" and ldm.conv_in.in_channels == 3 + 3  # as its in_channels: 6


def test_memory_estimate_of_the_tiny_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(CONFIGS.parents[1] / "benchmarks"))
    import estimate_memory

    results = tmp_path / "results.md"
    common = ["--model_config", str(TINY), "--resolution", "32", "--results", str(results)]
    numbers = estimate_memory.main([*common, "--batch_size", "2"])
    parameters = sum(p.numel() for p in SpadeUNetModel.from_config_file(TINY).parameters())
    assert numbers["parameters"] == parameters == 1_249_603
    memory = numbers["memory"]
    assert memory["weights (float32)"] == memory["gradients (float32)"] == memory["EMA weights (float32)"]
    assert memory["weights (float32)"] == 4 * parameters and memory["AdamW moments (2 x float32)"] == 8 * parameters
    assert numbers["total"] == 20 * parameters + memory["activations"]
    assert "| sdm_tiny.json, 32x32 px, batch 2, float32 | parameters | 1,249,603 (1.2 M) |  |" in results.read_text()

    # activations: per sample, so twice the batch saves twice (but a scalar); checkpointing keeps far less
    doubled = estimate_memory.main([*common, "--batch_size", "4"])
    assert doubled["memory"]["activations"] == pytest.approx(2 * memory["activations"], rel=1e-6)  # + a scalar
    assert doubled["flops"] == 2 * numbers["flops"]
    checkpointed = estimate_memory.main([*common, "--batch_size", "2", "--gradient_checkpointing"])
    assert checkpointed["memory"]["activations (checkpointed)"] < memory["activations"] / 2
    # the meta-device trace saves what a real CPU step saves (to 3%: real views may share storages differently)
    torch.manual_seed(0)
    real = estimate_memory.trace_training_step(
        SpadeUNetModel.from_config_file(TINY), 2, 32, 32, mixed_precision=False, device="cpu"
    )
    assert real["activations"] == pytest.approx(memory["activations"], rel=0.03)
    assert "does not exist" in str(
        pytest.raises(
            SystemExit, estimate_memory.main, [*common[2:], "--model_config", "nope.json", "--batch_size", "1"]
        ).value
    )


# ---------------------------------------------------------------------------------------------------------
# The pipeline


def make_pipeline(latent: bool = False, learn_sigma: bool = False, scheduler=None, class_names=CLASS_NAMES):
    overrides = {"learn_sigma": learn_sigma, "num_classes": len(class_names)}
    if latent:
        overrides.update(in_channels=4, out_channels=4, sample_size=16)
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    pipeline = SemanticDiffusionPipeline(
        unet=tiny_unet(**overrides),
        scheduler=scheduler,
        vae=tiny_vae(32).eval() if latent else None,
        class_names=class_names,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, labels, seed=0, **kwargs):
    kwargs = {"num_images_per_mask": 2, "guidance_scale": 1.5, "num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipeline(labels, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("latent", [False, True], ids=["pixel", "latent"])
def test_pipeline_generates_deterministically(latent):
    pipeline = make_pipeline(latent=latent)
    labels = random_labels(2, 32)
    output = generate(pipeline, labels)
    assert output.images.shape == (4, 32, 32, 3)
    assert output.images.min() >= 0 and output.images.max() <= 1
    assert output.mask_indices == [0, 0, 1, 1]
    assert np.array_equal(generate(pipeline, labels).images, output.images)
    assert not np.allclose(generate(pipeline, labels, seed=1).images, output.images)

    # A list of PIL label images (any size) and the default PIL output.
    masks = [Image.fromarray(m.numpy().astype(np.uint8)) for m in random_labels(2, 64)]
    pil = generate(pipeline, masks, num_images_per_mask=1, output_type="pil", guidance_scale=1.0).images
    assert len(pil) == 2 and pil[0].size == (32, 32)


def channels_stepped(pipeline) -> list:
    """The channel count of every model output the pipeline's scheduler steps with."""
    seen, step = [], pipeline.scheduler.step

    def spy(model_output, *args, **kwargs):
        seen.append(model_output.shape[1])
        return step(model_output, *args, **kwargs)

    pipeline.scheduler.step = spy
    return seen


def test_pipeline_with_learned_sigma_feeds_each_scheduler_what_it_reads():
    labels = random_labels(1, 32)
    ddpm = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range", clip_sample=False)
    for scheduler in (ddpm, DDIMScheduler(num_train_timesteps=1000, clip_sample=False)):
        pipeline = make_pipeline(learn_sigma=True, scheduler=scheduler)
        assert pipeline.scheduler_takes_variance() == (scheduler is ddpm)
        stepped = channels_stepped(pipeline)
        images = generate(pipeline, labels).images
        assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
        # 2 steps: DDPM's learned range reads epsilon and the variance interpolation (3 + 3), DDIM epsilon alone
        assert stepped == [6, 6] if scheduler is ddpm else stepped == [3, 3]
    with pytest.raises(ValueError, match="learn_sigma"):
        generate(make_pipeline(scheduler=ddpm), labels)

    # DPM-Solver made from the learned-range DDPM config, on 4-channel latents: gets epsilon alone.
    pipeline = make_pipeline(
        latent=True, learn_sigma=True, scheduler=DPMSolverMultistepScheduler.from_config(ddpm.config)
    )
    assert pipeline.scheduler.config.variance_type == "learned_range" and not pipeline.scheduler_takes_variance()
    stepped = channels_stepped(pipeline)
    images = generate(pipeline, labels, num_images_per_mask=1).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert stepped == [4, 4]  # the epsilon half of the 8 channels


def test_guided_sampling_runs_both_branches_in_one_forward_and_takes_a_sampler_by_name():
    pipeline = make_pipeline(scheduler=sdm_scheduler(pixel_space=True))
    labels = random_labels(2, 32)
    batches = []
    pipeline.unet.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    guided = generate(pipeline, labels, guidance_scale=1.5, num_inference_steps=3, scheduler="ddim").images
    assert batches == [8, 8, 8]  # 2 maps x 2 images, conditional and null, once per step
    batches.clear()
    generate(pipeline, labels, guidance_scale=1.0, num_inference_steps=3, scheduler="ddim")
    assert batches == [4, 4, 4]  # no guidance: the conditional branch alone

    # scheduler="ddim" is the training schedule's DDIM, as if set on the pipeline; the pipeline's own is unchanged
    assert isinstance(pipeline.scheduler, DDPMScheduler)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    np.testing.assert_allclose(generate(pipeline, labels, guidance_scale=1.5, num_inference_steps=3).images, guided)
    assert not np.allclose(generate(pipeline, labels, guidance_scale=3.0, num_inference_steps=3).images, guided)


@pytest.mark.parametrize("latent", [False, True], ids=["pixel", "latent"])
def test_pipeline_save_and_load(tmp_path, latent):
    # Two classes: a two-item class_names list must not be mistaken for a (library, class) component entry.
    pipeline = make_pipeline(latent=latent, class_names=["road", "sky"])
    pipeline.save_pretrained(tmp_path / "sdm")
    index = json.loads((tmp_path / "sdm" / "model_index.json").read_text())
    assert index["unet"] == ["spade_unet", "SpadeUNetModel"]  # unet/spade_unet.py, for diffusers' remote code
    assert index["class_names"] == ["road", "sky"] and index["ignore_index"] == 255 and index["edge_map"] is False

    loaded = SemanticDiffusionPipeline.from_pretrained(tmp_path / "sdm")
    loaded.set_progress_bar_config(disable=True)
    assert (loaded.vae is not None) == latent and loaded.class_names == ["road", "sky"]
    labels = random_labels(1, 32, num_classes=2)
    assert np.array_equal(generate(loaded, labels).images, generate(pipeline, labels).images)


def test_pipeline_refuses_masks_it_cannot_read():
    pipeline = make_pipeline()
    labels = random_labels(1, 32)
    labels[0, :4, :4] = 9
    labels[0, -4:, -4:] = 255  # ignore_index is fine
    with pytest.raises(ValueError, match=r"a mask holds ids the model was not trained for: \[9\].*0=background"):
        generate(pipeline, labels)
    with pytest.raises(ValueError, match="colour-coded"):
        generate(pipeline, [Image.new("RGB", (32, 32))])
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(pipeline, random_labels(1, 32), height=33)
    with pytest.raises(ValueError, match="class names"):
        SemanticDiffusionPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(), class_names=["a", "b"])


def test_sdm_scheduler_clips_in_pixel_space_only():
    pixel, latent = sdm_scheduler(learn_sigma=True), sdm_scheduler(pixel_space=False)
    assert pixel.config.clip_sample and pixel.config.variance_type == "learned_range"
    assert not latent.config.clip_sample and latent.config.variance_type == "fixed_small"
    ddim = DDIMScheduler.from_config(pixel.config)
    assert ddim.config.clip_sample and ddim.config.beta_schedule == "linear" and ddim.config.beta_end == 0.02
