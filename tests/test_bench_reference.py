"""benchmarks/bench_reference.py's fixtures: the data it writes for the diffusers-style ControlNet loop, and the
reference loops themselves (benchmarks/reference_trainers.py), run as the benchmark runs them on the tiny base."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV
from diffusers import UNet2DConditionModel

from segdiff.data import load_segmentation_dataset, read_image
from segdiff.generation import colour_mask_to_labels
from segdiff.prompts import label_map_prompt


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as running the scripts would: `from common import`


@pytest.fixture(scope="module")
def metadata_rows(toy_data, tmp_path_factory):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_reference import write_controlnet_rows
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    folder = tmp_path_factory.mktemp("reference") / "rows"
    write_controlnet_rows(toy_data, folder)
    return folder


def test_controlnet_rows_are_the_label_maps_in_palette_colours_with_their_class_prompts(metadata_rows, toy_data):
    dataset = load_segmentation_dataset(toy_data, "generic")
    with open(metadata_rows / "metadata.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(dataset) == 24
    for row, sample in zip(rows, dataset):
        assert row["image"].endswith(f"{sample['name']}.png")
        control = np.asarray(read_image(metadata_rows / row["conditioning_image"]))
        labels = colour_mask_to_labels(control, dataset.palette, dataset.ignore_index, row["conditioning_image"])
        np.testing.assert_array_equal(labels, sample["label"])
        assert row["text"] == label_map_prompt(sample["label"], dataset.class_names) != ""


@pytest.mark.parametrize("loop", ["controlnet", "joint"])
def test_reference_loops_train_and_time_themselves(loop, metadata_rows, toy_data, tiny_sd_folder, tmp_path):
    data = metadata_rows if loop == "controlnet" else toy_data
    command = [
        sys.executable, str(ROOT / "benchmarks" / "reference_trainers.py"), loop, "--base", str(tiny_sd_folder),
        "--data", str(data), "--output_dir", str(tmp_path), "--resolution", "32", "--train_batch_size", "4",
        "--max_train_steps", "3", "--learning_rate", "1e-3",
    ]  # fmt: skip
    subprocess.run(command, env=SCRIPT_ENV, check=True, capture_output=True, text=True)
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["train_samples_per_second"] > 0 and stats["peak_memory_mb"] > 0
    # Two timed steps (the first is warm-up) of a noise-prediction loss: about 1 per predicted channel group
    # from a random base (the joint loss adds the image's and the mask's, each near 1).
    expected = 2.0 if loop == "joint" else 1.0
    assert abs(stats["mean_loss"] - expected) < 0.5 * expected


def test_widened_unet_keeps_the_base_on_the_image_channels(tiny_sd_folder, benchmarks_on_path):
    from reference_trainers import widened_for_mask

    base = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    widened = widened_for_mask(UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet"))
    assert widened.config.in_channels == widened.config.out_channels == 5
    latents, mask = torch.randn(2, 4, 16, 16), torch.randn(2, 1, 16, 16)
    text = torch.randn(2, 77, base.config.cross_attention_dim)
    with torch.no_grad():
        expected = base(latents, 10, encoder_hidden_states=text).sample
        output = widened(torch.cat([latents, mask], 1), 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(output[:, :4], expected)
    assert output[:, 4].abs().max() == 0  # the mask output starts at zero
