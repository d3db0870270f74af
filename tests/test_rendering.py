"""segdiff.rendering: label maps -> images with a trained ControlNet or SDM folder, as the generators draw them.

The models are untrained tiny ones (random weights from a fixed seed) in the folders the trainers write: what is
checked is which kind a folder is, what each model is given (control image, prompt, label map, size, scheduler,
guidance) and which seed draws which image, not what the images show.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from PIL import Image

import generate_controlnet_seg
import generate_spade_sdm
from segdiff.data import read_label_map, write_class_names
from segdiff.geometry import conditioning_channels_for
from segdiff.labels import colorize_label, resize_labels
from segdiff.models.spade_unet import SpadeUNetModel
from segdiff.pipelines.sdm import SemanticDiffusionPipeline, sdm_scheduler
from segdiff.prompts import label_map_prompt
from segdiff.rendering import ControlNetRenderer, SDMRenderer, load_renderer
from segdiff.runs import RunError, open_run
from segdiff.seeds import derive_seed
from segdiff.toy import TOY_CLASSES, TOY_PALETTE

TEMPLATE = "toy shapes: {classes}"  # not the trainer's default: the renderer must use the run's


@pytest.fixture(scope="module")
def controlnet_folder(tiny_sd_folder, tmp_path_factory):
    """An untrained ControlNet over the tiny base, with the run files train_controlnet_seg.py writes beside it
    (a prompt template and top-k of its own), and a checkpoint-3/ holding its copy in controlnet/."""
    folder = tmp_path_factory.mktemp("controlnet") / "run"
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(2))
    controlnet.save_pretrained(folder)
    controlnet.save_pretrained(folder / "checkpoint-3" / "controlnet")
    write_class_names(folder / "class_names.json", TOY_CLASSES, TOY_PALETTE)
    config = {
        "pipeline": "controlnet_seg",
        "pretrained_model_name_or_path": str(tiny_sd_folder),
        "resolution": 32,
        "prompt_template": TEMPLATE,
        "prompt_top_k": 2,
        "ignore_index": 255,
        "variant": None,
    }
    (folder / "training_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def sdm_folder(tmp_path_factory):
    """An untrained pixel-space SDM pipeline folder (configs/models/sdm_tiny.json) with the toy classes, as
    train_spade_sdm.py writes it, and a checkpoint-2/ holding its UNet in unet/."""
    folder = tmp_path_factory.mktemp("sdm") / "run"
    config = json.loads((ROOT / "configs/models/sdm_tiny.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = SpadeUNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    SemanticDiffusionPipeline(unet, sdm_scheduler(), class_names=TOY_CLASSES).save_pretrained(folder)
    unet.save_pretrained(folder / "checkpoint-2" / "unet")
    write_class_names(folder / "class_names.json", TOY_CLASSES, TOY_PALETTE)
    (folder / "training_config.json").write_text(json.dumps({"pipeline": "spade_sdm", "resolution": 32}))
    return folder


@pytest.fixture(scope="module")
def controlnet_renderer(controlnet_folder):
    return load_renderer(controlnet_folder)


@pytest.fixture(scope="module")
def sdm_renderer(sdm_folder):
    return load_renderer(sdm_folder)


def toy_labels(toy_data, count=3):
    return [read_label_map(path) for path in sorted((toy_data / "masks").iterdir())[:count]]


def record_calls(monkeypatch, pipeline_class) -> list[dict]:
    """Every call of ``pipeline_class`` from now on: its positional arguments (``args``) and keywords."""
    calls = []
    original = pipeline_class.__call__

    def recording(self, *args, **kwargs):
        calls.append({"args": args, **kwargs, "scheduler_type": type(self.scheduler)})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", recording)
    return calls


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# Which kind a folder holds


def test_kinds_are_read_from_the_run_record_or_the_class_names(controlnet_folder, sdm_folder, tmp_path):
    assert open_run(controlnet_folder).kind == "controlnet_seg"
    assert open_run(controlnet_folder / "checkpoint-3").kind == "controlnet_seg"  # the run's record, one level up
    assert open_run(sdm_folder).kind == "spade_sdm"
    assert open_run(sdm_folder / "checkpoint-2").kind == "spade_sdm"
    # Without training_config.json (assembled by hand, or downloaded): the diffusers class it saves tells.
    for folder, kind in ((controlnet_folder, "controlnet_seg"), (sdm_folder, "spade_sdm")):
        bare = tmp_path / f"bare-{kind}"
        shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("checkpoint-*", "training_config.json"))
        assert open_run(bare).kind == kind


def test_other_folders_are_refused_naming_the_folder_and_what_was_expected(tmp_path):
    expected = "Fix: pass the output folder of train_controlnet_seg.py or train_spade_sdm.py"
    with pytest.raises(RunError, match=f"--renderer {tmp_path / 'nowhere'} does not exist"):
        load_renderer(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunError, match=f"{empty} holds no training_config.json naming its kind. {expected}"):
        load_renderer(empty)
    joint = tmp_path / "joint"
    joint.mkdir()
    (joint / "training_config.json").write_text(json.dumps({"pipeline": "joint_image_mask"}))
    with pytest.raises(RunError, match=f"{joint} holds a 'joint_image_mask' model. {expected}"):
        load_renderer(joint)


# ------------------------------------------------------------------------------------------------
# ControlNet


def test_controlnet_renderer_reads_the_run(controlnet_renderer, controlnet_folder):
    renderer = controlnet_renderer
    assert isinstance(renderer, ControlNetRenderer) and renderer.kind == "controlnet"
    assert renderer.class_names == TOY_CLASSES and renderer.palette == [tuple(c) for c in TOY_PALETTE]
    assert (renderer.ignore_index, renderer.resolution) == (255, 32)
    assert (renderer.prompt_template, renderer.prompt_top_k) == (TEMPLATE, 2)
    assert renderer.pipeline.dtype == torch.float32 and renderer.pipeline.device.type == "cpu"
    # a checkpoint-N/ renders with its own weights and its run's settings
    from_checkpoint = load_renderer(controlnet_folder / "checkpoint-3")
    assert from_checkpoint.kind == "controlnet" and from_checkpoint.prompt_template == TEMPLATE


def test_controlnet_gets_the_coloured_map_and_its_class_prompt(controlnet_renderer, toy_data, monkeypatch):
    calls = record_calls(monkeypatch, StableDiffusionControlNetPipeline)
    labels = toy_labels(toy_data, 2)
    labels[1] = labels[1].copy()
    labels[1][:4] = 255  # no data: drawn black
    small = labels[0][::2, ::2]  # 16 px: resized (nearest) to the 32 px training resolution
    images = controlnet_renderer.render([small, labels[1]], [5, 6], num_inference_steps=2)
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    (call,) = calls  # one batch
    prompts, controls = call["args"]
    expected_labels = [resize_labels(small, 32, 32), labels[1]]
    assert prompts == [label_map_prompt(label, TOY_CLASSES, TEMPLATE, 2) for label in expected_labels]
    assert all(prompt.startswith("toy shapes: ") for prompt in prompts)
    for control, label in zip(controls, expected_labels):
        assert np.array_equal(np.asarray(control), np.asarray(colorize_label(label, TOY_PALETTE, 255)))
    assert not np.asarray(controls[1])[:4].any()  # the no-data rows are black
    # the generator's defaults: UniPC, guidance 7.5, one CPU generator per image
    assert call["scheduler_type"] is UniPCMultistepScheduler and call["guidance_scale"] == 7.5
    assert (call["height"], call["width"], call["num_inference_steps"]) == (32, 32, 2)
    assert [g.initial_seed() for g in call["generator"]] == [5, 6]


def test_controlnet_prompts_name_each_maps_domain(controlnet_renderer, toy_data, monkeypatch):
    calls = record_calls(monkeypatch, StableDiffusionControlNetPipeline)
    labels = toy_labels(toy_data, 2)
    monkeypatch.setattr(controlnet_renderer, "prompt_template", "{domain} toy shapes: {classes}")
    controlnet_renderer.render(labels, [1, 2], num_inference_steps=1, domains=["Urban", None])
    prompts = calls[0]["args"][0]
    assert prompts == [
        label_map_prompt(labels[0], TOY_CLASSES, "urban toy shapes: {classes}", 2),
        label_map_prompt(labels[1], TOY_CLASSES, "toy shapes: {classes}", 2),
    ]


def test_controlnet_sizes_follow_the_map_or_the_caller(controlnet_renderer, toy_data):
    label = toy_labels(toy_data, 1)[0]
    wide = np.concatenate([label, label], axis=1)  # 32 x 64: the aspect ratio is kept, short side 32
    images = controlnet_renderer.render([label, wide], [1, 2], num_inference_steps=1)
    assert [image.size for image in images] == [(32, 32), (64, 32)]
    images = controlnet_renderer.render([label], [1], num_inference_steps=1, height=48, width=64)
    assert images[0].size == (64, 48)
    with pytest.raises(ValueError, match="give both height and width"):
        controlnet_renderer.render([label], [1], num_inference_steps=1, height=48)


def test_controlnet_images_depend_on_their_seed_only(controlnet_renderer, toy_data):
    labels = toy_labels(toy_data, 3)
    batch = controlnet_renderer.render(labels, [11, 12, 13], num_inference_steps=2)
    again = controlnet_renderer.render(labels, [11, 12, 13], num_inference_steps=2)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(batch, again))
    alone = controlnet_renderer.render([labels[1]], [12], num_inference_steps=2)[0]
    assert np.abs(pixels(alone) - pixels(batch[1])).max() <= 1  # batched convolutions may differ in the last bit
    in_pairs = controlnet_renderer.render(labels, [11, 12, 13], num_inference_steps=2, batch_size=2)
    assert all(np.abs(pixels(a) - pixels(b)).max() <= 1 for a, b in zip(in_pairs, batch))
    other_seed = controlnet_renderer.render([labels[1]], [99], num_inference_steps=2)[0]
    assert np.abs(pixels(other_seed) - pixels(alone)).mean() > 5


def test_controlnet_renderer_draws_what_the_generator_draws(controlnet_renderer, controlnet_folder, toy_data, tmp_path):
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    source = sorted((toy_data / "masks").iterdir())[0]
    shutil.copy(source, masks_dir / "m.png")
    args = ["--model", controlnet_folder, "--masks_dir", masks_dir, "--save_dir", tmp_path / "out",
            "--num_images_per_mask", "1", "--num_inference_steps", "2", "--seed", "3"]  # fmt: skip
    generate_controlnet_seg.main(generate_controlnet_seg.parse_args([str(a) for a in args]))
    record = json.loads((tmp_path / "out" / "metadata.jsonl").read_text().splitlines()[0])
    label = read_label_map(source)
    assert record["prompt"] == controlnet_renderer.condition(label).prompt
    rendered = controlnet_renderer.render([label], [derive_seed(3, "m", 0)], num_inference_steps=2)[0]
    assert np.array_equal(pixels(rendered), pixels(Image.open(tmp_path / "out" / "images" / "m_00.png")))


def test_unknown_ids_and_mismatched_seeds_are_refused(controlnet_renderer):
    label = np.zeros((32, 32), dtype=np.uint8)
    label[:2] = 9
    with pytest.raises(ValueError, match=r"label map 1 holds ids the renderer in .* was not trained for: \[9\]"):
        controlnet_renderer.render([label * 0, label], [1, 2], num_inference_steps=1)
    with pytest.raises(ValueError, match="got 1 label maps and 2 seeds"):
        controlnet_renderer.render([label * 0], [1, 2], num_inference_steps=1)
    with pytest.raises(ValueError, match="integer class ids"):
        controlnet_renderer.render([np.zeros((32, 32), dtype=np.float32)], [1], num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown scheduler 'euler': choose one of ddim, ddpm, dpmsolver, unipc"):
        controlnet_renderer.render([label * 0], [1], num_inference_steps=1, scheduler="euler")


def test_a_controlnet_made_for_another_base_is_refused(controlnet_folder, tiny_sd_folder, tmp_path):
    """A ControlNet whose embedding downsamples by 8 (Stable Diffusion's) over the tiny base (VAE factor 2)."""
    folder = tmp_path / "sd-shaped"
    shutil.copytree(controlnet_folder, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(8)).save_pretrained(
        folder
    )
    with pytest.raises(RunError, match="downsamples control images by 8 but the VAE of .* by 2"):
        load_renderer(folder)


# ------------------------------------------------------------------------------------------------
# SDM


def test_sdm_renderer_reads_the_model(sdm_renderer, sdm_folder):
    assert isinstance(sdm_renderer, SDMRenderer) and sdm_renderer.kind == "sdm"
    assert sdm_renderer.class_names == TOY_CLASSES and sdm_renderer.palette == [tuple(c) for c in TOY_PALETTE]
    assert (sdm_renderer.ignore_index, sdm_renderer.resolution) == (255, 32)
    assert load_renderer(sdm_folder / "checkpoint-2").kind == "sdm"
    assert sdm_renderer.prompt(np.zeros((4, 4), dtype=np.int64)) is None  # an SDM has no text prompt
    with pytest.raises(RunError, match="has no separate base"):
        load_renderer(sdm_folder, base="some/base")


def test_sdm_gets_the_resized_maps_with_its_defaults(sdm_renderer, toy_data, monkeypatch):
    calls = record_calls(monkeypatch, SemanticDiffusionPipeline)
    labels = toy_labels(toy_data, 2)
    small = labels[0][::2, ::2]
    images = sdm_renderer.render([small, labels[1]], [5, 6], num_inference_steps=2)
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    (call,) = calls
    (maps,) = call["args"]
    assert [m.shape for m in maps] == [(32, 32), (32, 32)]
    assert np.array_equal(maps[0], resize_labels(small, 32, 32)) and np.array_equal(maps[1], labels[1])
    # the SDM generator's defaults: DDPM, guidance 1.5; one generator per image
    assert call["scheduler_type"] is DDPMScheduler and call["guidance_scale"] == 1.5
    assert call["num_images_per_mask"] == 1 and [g.initial_seed() for g in call["generator"]] == [5, 6]
    # the caller's scheduler and guidance instead, built from the model's own schedule (its x0 clipping kept)
    sdm_renderer.render([small], [5], num_inference_steps=2, scheduler="ddim", guidance_scale=1.0)
    assert calls[-1]["scheduler_type"] is DDIMScheduler and calls[-1]["guidance_scale"] == 1.0
    assert sdm_renderer.pipeline.scheduler.config.clip_sample


def test_sdm_images_depend_on_their_seed_only_and_match_the_generator(sdm_renderer, sdm_folder, toy_data, tmp_path):
    labels = toy_labels(toy_data, 3)
    batch = sdm_renderer.render(labels, [21, 22, 23], num_inference_steps=3)
    again = sdm_renderer.render(labels, [21, 22, 23], num_inference_steps=3)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(batch, again))
    alone = sdm_renderer.render([labels[2]], [23], num_inference_steps=3)[0]
    assert np.abs(pixels(alone) - pixels(batch[2])).max() <= 1
    assert np.abs(pixels(sdm_renderer.render([labels[2]], [1], num_inference_steps=3)[0]) - pixels(alone)).mean() > 5

    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    source = sorted((toy_data / "masks").iterdir())[0]
    shutil.copy(source, masks_dir / "m.png")
    args = ["--model", sdm_folder, "--masks_dir", masks_dir, "--save_dir", tmp_path / "out",
            "--num_images_per_mask", "1", "--num_inference_steps", "3", "--seed", "4"]  # fmt: skip
    generate_spade_sdm.main(generate_spade_sdm.parse_args([str(a) for a in args]))
    rendered = sdm_renderer.render([read_label_map(source)], [derive_seed(4, "m", 0)], num_inference_steps=3)[0]
    assert np.array_equal(pixels(rendered), pixels(Image.open(tmp_path / "out" / "images" / "m_00.png")))
