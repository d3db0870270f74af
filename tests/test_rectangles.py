"""The joint, ControlNet and layout trainers train on ``--resolution HEIGHT,WIDTH``, and what they save samples at
that size by default (the SDM trainer's rectangles: tests/test_sdm.py and tests/test_style.py)."""

import json

import numpy as np
import torch
from conftest import run_script
from PIL import Image

HEIGHT, WIDTH = 16, 24  # multiples of the tiny base's 4 (VAE factor 2 x UNet downsampling 2) and of the layout's 2
COMMON = [
    "--dataset", "generic", "--resolution", f"{HEIGHT},{WIDTH}", "--train_batch_size", "2", "--max_train_steps", "1",
    "--report_to", "none", "--validation_steps", "0",
]  # fmt: skip


def trained_at_the_rectangle(output_dir) -> bool:
    return json.loads((output_dir / "training_config.json").read_text())["resolution"] == [HEIGHT, WIDTH]


def test_joint_trainer_trains_and_samples_at_a_rectangle(toy_data, tiny_sd_folder, tmp_path):
    from segdiff.pipelines.joint import JointImageMaskPipeline

    output_dir = tmp_path / "joint"
    run_script(
        "train_seg_mask_diffusion.py", "--pretrained_model_name_or_path", tiny_sd_folder, "--data_root", toy_data,
        "--output_dir", output_dir, *COMMON,
    )  # fmt: skip
    assert trained_at_the_rectangle(output_dir)
    pipeline = JointImageMaskPipeline.from_pretrained(output_dir)
    assert pipeline.default_size == (HEIGHT, WIDTH)
    output = pipeline([1], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert output.images[0].size == (WIDTH, HEIGHT) and np.asarray(output.masks[0]).shape == (HEIGHT, WIDTH)


def test_controlnet_trainer_trains_and_generates_at_a_rectangle(toy_data, tiny_sd_folder, tmp_path):
    output_dir, masks_dir = tmp_path / "controlnet", tmp_path / "masks"
    run_script(
        "train_controlnet_seg.py", "--pretrained_model_name_or_path", tiny_sd_folder, "--data_root", toy_data,
        "--output_dir", output_dir, *COMMON,
    )  # fmt: skip
    assert trained_at_the_rectangle(output_dir)
    masks_dir.mkdir()
    mask = sorted((toy_data / "masks").iterdir())[0]
    (masks_dir / mask.name).write_bytes(mask.read_bytes())
    save_dir = tmp_path / "generated"
    run_script(
        "generate_controlnet_seg.py", "--model", output_dir, "--masks_dir", masks_dir, "--save_dir", save_dir,
        "--num_images_per_mask", "1", "--num_inference_steps", "2",
    )  # fmt: skip
    (image,) = save_dir.glob("images/*.png")
    assert Image.open(image).size == (WIDTH, HEIGHT)


def test_layout_trainer_trains_and_samples_at_a_rectangle(toy_data, tmp_path):
    from segdiff.pipelines.layout import LayoutDiffusionPipeline

    output_dir = tmp_path / "layout"
    run_script(
        "train_layout_diffusion.py", "--model_config", "configs/models/layout_tiny.json", "--data_root", toy_data,
        "--output_dir", output_dir, *COMMON,
    )  # fmt: skip
    assert trained_at_the_rectangle(output_dir)
    pipeline = LayoutDiffusionPipeline.from_pretrained(output_dir)
    assert pipeline.default_size == (HEIGHT, WIDTH)
    ratios, known = pipeline.requests([{1: 0.5}])
    layouts = pipeline(ratios, known, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert layouts.label_maps.shape == (1, HEIGHT, WIDTH)
