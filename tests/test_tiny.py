"""The tiny offline Stable Diffusion folder: layout, loading with diffusers, tokenizer, VAE fitting, CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from segdiff.geometry import vae_scale_factor
from segdiff.tiny import (
    SD_SCALING_FACTOR,
    ImageFolderDataset,
    build_tiny_sd,
    fit_vae,
    reconstruction_l1,
    tiny_vae,
)
from segdiff.toy import make_toy_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a remote sensing image and mask of building"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    summary = build_tiny_sd(folder, sample_size=32, seed=0)
    return folder, summary


def _config(folder: Path, component: str) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / component / name).read_text())


def test_folder_has_every_component(tiny_sd):
    folder, summary = tiny_sd
    expected = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ]
    for name in expected:
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(".*tmp"))  # the staging folder was renamed away

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert summary["vae_scale_factor"] == 2 and summary["latent_size"] == 16


def test_configs_are_tiny_and_consistent(tiny_sd):
    folder, summary = tiny_sd
    vae, unet = _config(folder, "vae"), _config(folder, "unet")
    text_encoder, scheduler = _config(folder, "text_encoder"), _config(folder, "scheduler")
    tokenizer_vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())

    assert vae["block_out_channels"] == [32, 64] and vae["latent_channels"] == 4
    assert vae["sample_size"] == 32 and vae["scaling_factor"] == SD_SCALING_FACTOR
    assert unet["sample_size"] == 32 // 2 and unet["block_out_channels"] == [32, 64]
    assert unet["cross_attention_dim"] == text_encoder["hidden_size"] == 32
    assert text_encoder["num_hidden_layers"] == 2 and text_encoder["num_attention_heads"] == 4
    assert text_encoder["vocab_size"] == len(tokenizer_vocab) == summary["vocab_size"]
    assert text_encoder["eos_token_id"] == tokenizer_vocab["<|endoftext|>"]
    assert text_encoder["bos_token_id"] == tokenizer_vocab["<|startoftext|>"]
    assert scheduler["_class_name"] == "DDPMScheduler"
    assert scheduler["num_train_timesteps"] == 1000 and scheduler["beta_schedule"] == "scaled_linear"
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert scheduler["prediction_type"] == "epsilon" and scheduler["clip_sample"] is False
    assert scheduler["steps_offset"] == 1 and scheduler["set_alpha_to_one"] is False


def test_diffusers_loads_and_runs_it(tiny_sd):
    folder, _ = tiny_sd
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae_scale_factor == 2
    images = pipeline(
        PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_tokenizer_gives_short_prompts_and_round_trips(tiny_sd):
    folder, _ = tiny_sd
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer.model_max_length == 77

    ids = tokenizer(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split()) + 2  # one token per word, plus start and end
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT

    # Class names of every dataset are whole words; hyphens split off as CLIP does.
    assert len(tokenizer("vehicle-car and flat-road", add_special_tokens=False).input_ids) == 7
    # Unknown words still tokenize, down to byte symbols, and decode back.
    unknown = tokenizer("zqxj", add_special_tokens=False).input_ids
    assert len(unknown) == 4 and tokenizer.decode(unknown) == "zqxj"

    padded = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77


def test_same_seed_same_weights(tiny_sd, tmp_path):
    folder, _ = tiny_sd
    build_tiny_sd(tmp_path / "again", seed=0)
    build_tiny_sd(tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    reference, again, other = (load_file(f / weights) for f in (folder, tmp_path / "again", tmp_path / "other"))
    assert all(torch.equal(reference[name], again[name]) for name in reference)
    assert not all(torch.equal(reference[name], other[name]) for name in reference)
    with pytest.raises(FileExistsError):
        build_tiny_sd(tmp_path / "again")


def test_vae_scale_factor_is_read_from_the_config():
    assert vae_scale_factor(tiny_vae().config) == 2
    # SD's VAE config.json, read before any weights
    assert vae_scale_factor({"block_out_channels": [128, 256, 512, 512]}) == 8


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), num_images=32, size=32, seed=0)


def test_fitting_the_vae_lowers_reconstruction_error(toy_dir):
    torch.manual_seed(0)
    vae = tiny_vae(32)
    images = torch.stack([ImageFolderDataset(toy_dir, 32, random_flip=False)[i] for i in range(16)])
    assert images.shape == (16, 3, 32, 32) and images.min() >= -1 and images.max() <= 1

    before = reconstruction_l1(vae, images)
    losses = fit_vae(vae, toy_dir, steps=10, batch_size=8, seed=0)
    after = reconstruction_l1(vae, images)
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    assert after < 0.7 * before, (before, after)


def test_cli_builds_a_fitted_folder(toy_dir, tmp_path):
    output_dir = tmp_path / "fitted"
    result = subprocess.run(
        [sys.executable, "-m", "segdiff.tiny", "--output_dir", str(output_dir), "--fit_vae_data", str(toy_dir),
         "--fit_vae_steps", "3", "--fit_vae_batch_size", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert "VAE fitted" in result.stdout and "L1" in result.stdout
    assert (output_dir / "model_index.json").is_file()
    scaling_factor = _config(output_dir, "vae")["scaling_factor"]
    assert math.isfinite(scaling_factor) and scaling_factor > 0 and scaling_factor != SD_SCALING_FACTOR
