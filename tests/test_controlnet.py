"""ControlNet on segmentation maps: the trainer and generator run as a user runs them, on the tiny base.

The tiny base's VAE downsamples by 2, not 8, so every run here also checks that the ControlNet's
conditioning embedding follows the base instead of assuming Stable Diffusion's factor.
"""

import csv
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, StableDiffusionControlNetPipeline
from generator_checks import SCHEDULER_CLASSES, expected_miou, run_generator, spy_on_schedulers
from PIL import Image
from safetensors.torch import load_file

import evaluate
from segdiff.data import (
    DatasetError,
    choose_train_samples,
    load_class_names,
    load_segmentation_dataset,
    read_label_map,
)
from segdiff.generation import colour_mask_to_labels
from segdiff.geometry import conditioning_channels_for, conditioning_downsampling
from segdiff.labels import colorize_label
from segdiff.prompts import classes_by_area, label_map_prompt
from segdiff.schedulers import make_scheduler
from segdiff.seeds import derive_seed
from train_controlnet_seg import (
    PromptEmbeddingCache,
    build_training_data,
    cache_dataset,
    parse_args,
    training_source,
)


def train_args(tiny_sd_folder, output_dir, *extra):
    return [
        "train_controlnet_seg.py", "--pretrained_model_name_or_path", tiny_sd_folder, "--output_dir", output_dir,
        "--resolution", "32", "--train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none",
        "--validation_steps", "0", *extra,
    ]  # fmt: skip


def toy_args(toy_data):
    return ["--data_root", toy_data, "--dataset", "generic"]


@pytest.fixture(scope="module")
def trained(toy_data, tiny_sd_folder, tmp_path_factory):
    """diffusers' checkpoint-limit test: 6 steps, a checkpoint every 2, keep 2; with validation at the end."""
    output_dir = tmp_path_factory.mktemp("controlnet") / "model"
    result = run_script(
        "accelerate", "launch",
        *train_args(tiny_sd_folder, output_dir, *toy_args(toy_data), "--max_train_steps", "6",
                    "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--random_affine",
                    "--validation_steps", "6", "--num_validation_images", "1"),
    )  # fmt: skip
    return output_dir, result


def checkpoints(folder):
    return sorted((p.name for p in folder.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def test_checkpoint_limit_keeps_the_newest_two(trained):
    output_dir, _ = trained
    assert checkpoints(output_dir) == ["checkpoint-4", "checkpoint-6"]
    assert (output_dir / "checkpoint-6" / "controlnet" / "config.json").is_file()


def test_resume_from_checkpoint_continues_and_rotates(trained, toy_data, tiny_sd_folder, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained[0], resumed)
    validation_mask = sorted((toy_data / "masks").iterdir())[0]  # a label PNG, coloured by the palette
    result = run_script(
        "accelerate", "launch",
        *train_args(tiny_sd_folder, resumed, *toy_args(toy_data), "--max_train_steps", "8",
                    "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--random_affine",
                    "--resume_from_checkpoint", "checkpoint-6", "--validation_steps", "8",
                    "--validation_image", validation_mask, "--validation_prompt", "a toy", "--num_validation_images", "1"),
    )  # fmt: skip
    assert "Resuming from" in result.stderr and "checkpoint-6" in result.stderr
    assert checkpoints(resumed) == ["checkpoint-6", "checkpoint-8"]
    assert "Validation prompt: 'a toy'" in result.stderr
    assert (resumed / "validation" / "validation-step000008.png").is_file()
    assert json.loads((resumed / "training_config.json").read_text())["max_train_steps"] == 8


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(trained, toy_data, tiny_sd_folder, tmp_path):
    """Resume from checkpoint-4 (plain python this time) and finish at 6: bit for bit the 6-step run's weights."""
    resumed = tmp_path / "resumed"
    shutil.copytree(trained[0] / "checkpoint-4", resumed / "checkpoint-4")
    run_script(
        *train_args(tiny_sd_folder, resumed, *toy_args(toy_data), "--max_train_steps", "6", "--checkpointing_steps",
                    "2", "--random_affine", "--resume_from_checkpoint", "latest"),
    )  # fmt: skip
    straight = load_file(trained[0] / "diffusion_pytorch_model.safetensors")
    again = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


def test_training_writes_a_controlnet_folder_with_its_run_files(trained):
    output_dir, result = trained
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "class_names.json", "training_config.json"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "validation" / "validation-step000006.png").is_file()
    names, palette = load_class_names(output_dir / "class_names.json")
    assert names == ["background", "square", "disk", "triangle"] and len(palette) == 4
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["pipeline"] == "controlnet_seg" and config["max_train_steps"] == 6
    assert config["vae_scale_factor"] == 2 and config["conditioning_embedding_out_channels"] == [16, 32]
    assert config["prompt_template"] == "a photo of {classes}"
    stats = json.loads((output_dir / "train_stats.json").read_text())
    assert stats["train_samples_per_second"] > 0
    # 24 masks give a handful of distinct class prompts: the text encoder ran for far fewer than 6 x 4 prompts
    assert stats["text_encoder_calls"] < 24
    assert "Prompts of the first batch: ['a photo of " in result.stderr
    assert "Validation prompt: 'a photo of background" in result.stderr


def test_output_loads_in_diffusers_pipeline_on_a_vae_factor_2_base(trained, tiny_sd_folder):
    controlnet = ControlNetModel.from_pretrained(trained[0])
    vae = AutoencoderKL.from_pretrained(tiny_sd_folder, subfolder="vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    assert factor == 2 and conditioning_downsampling(controlnet.config) == factor
    embedding = controlnet.controlnet_cond_embedding
    assert sum(conv.stride == (2, 2) for conv in embedding.modules() if isinstance(conv, torch.nn.Conv2d)) == 1
    assert embedding(torch.zeros(1, 3, 32, 48)).shape[-2:] == (16, 24)  # the latent grid

    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd_folder, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    label = np.zeros((32, 48), dtype=np.int64)
    label[8:20, 10:30] = 2
    names, palette = load_class_names(trained[0] / "class_names.json")
    output = pipeline(
        label_map_prompt(label, names),
        colorize_label(label, palette),
        height=32,
        width=48,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert output.images.shape == (1, 32, 48, 3)


# ------------------------------------------------------------------------------------------------
# Prompts, conditioning embedding, arguments
# ------------------------------------------------------------------------------------------------


def test_class_prompt_names_the_classes_by_area():
    names = ["background", "flat-road", "tall_building", "water"]
    label = np.full((10, 10), 255)
    label[:5] = 0  # 50 pixels
    label[5:8] = 2  # 30
    label[8:, :4] = 3  # 8
    label[8:, 4:6] = 1  # 4; the rest (8) stays ignore
    assert classes_by_area(label, 4, 255) == [0, 2, 3, 1]
    assert label_map_prompt(label, names, top_k=0) == "a photo of background, tall building, water, flat road"
    assert label_map_prompt(label, names, "{classes} from above", top_k=2) == "background, tall building from above"
    tie = np.array([[3, 3, 1, 1, 255]])
    assert classes_by_area(tie, 4, 255) == [1, 3]  # equal areas: lower id first
    assert label_map_prompt(np.full((4, 4), 255), names) == "a photo of"  # only no-data: no classes to name
    # a template that names the domain (LoveDA's scene): lower case when the map has one, left out when not
    scene = "an {domain} aerial image of {classes}"
    assert (
        label_map_prompt(label, names, scene, 2, domain="Urban") == "an urban aerial image of background, tall building"
    )
    assert label_map_prompt(label, names, scene, 2) == "an aerial image of background, tall building"


def test_domain_prompts_need_loveda_and_reach_each_sample(toy_data, tiny_sd_folder, tmp_path, monkeypatch, capsys):
    import train_controlnet_seg

    template = "an {domain} aerial image of {classes}"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_folder), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        train_controlnet_seg.parse_args([*argv, "--data_root", str(toy_data), "--dataset", "generic",
                                         "--prompt_template", template])  # fmt: skip
    assert "names {domain}, which only --dataset loveda has" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_controlnet_seg.parse_args([*argv, "--data_root", str(toy_data), "--prompt_template", "{scene}"])
    assert "only {classes} and {domain} may be filled in" in capsys.readouterr().err
    args = train_controlnet_seg.parse_args(
        [*argv, "--data_root", str(toy_data), "--dataset", "loveda", "--prompt_template", template]
    )
    label = np.zeros((4, 4), dtype=np.int64)
    sample = {"domain": "Rural", "name": "x"}
    prompt = train_controlnet_seg.sample_prompt(sample, label, None, TOY_NAMES, TOY_PALETTE, args, None)
    assert prompt == "an rural aerial image of background"  # the template's words, the sample's scene


def test_conditioning_embedding_follows_the_vae_factor():
    assert conditioning_channels_for(8) == (16, 32, 96, 256)  # Stable Diffusion's own
    assert conditioning_channels_for(4) == (16, 32, 96)
    assert conditioning_channels_for(2) == (16, 32)
    assert conditioning_channels_for(16) == (16, 32, 96, 256, 256)
    with pytest.raises(ValueError, match="power of 2"):
        conditioning_channels_for(6)


def test_parse_args_refuses_contradicting_flags(toy_data, tiny_sd_folder, tmp_path, capsys):
    base = [str(a) for a in train_args(tiny_sd_folder, tmp_path)[1:]]
    for extra, message in (
        ([], "give exactly one data source"),
        (toy_args(toy_data) + ["--train_data_dir", tmp_path], "got --data_root, --train_data_dir"),
        (toy_args(toy_data) + ["--cache_latents", "--random_affine"], "cannot be combined with --random_affine"),
        (toy_args(toy_data) + ["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts must be in [0, 1]"),
        (
            toy_args(toy_data) + ["--prompt_template", "a {kind} of {classes}"],
            "only {classes} and {domain} may be filled in",
        ),
    ):
        with pytest.raises(SystemExit):
            parse_args(base + [str(a) for a in extra])
        assert message in capsys.readouterr().err


def test_prompt_embeddings_are_computed_once_per_prompt(tiny_sd_folder):
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_sd_folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_folder, subfolder="text_encoder")
    cache = PromptEmbeddingCache(tokenizer, text_encoder, max_size=2)
    first = cache(["a photo of disk", "", "a photo of disk"])
    assert first.shape[0] == 3 and cache.encoded == 2
    torch.testing.assert_close(first[0], first[2])
    cache(["", "a photo of disk"])
    assert cache.encoded == 2  # both cached
    again = cache(["a photo of square", "a photo of disk"])  # evicts "" (least recently used)
    assert cache.encoded == 3 and list(cache.embeddings) == ["a photo of square", "a photo of disk"]
    torch.testing.assert_close(again[1], first[0])


# ------------------------------------------------------------------------------------------------
# The three data sources: same geometry for image and control, prompts
# ------------------------------------------------------------------------------------------------

TOY_NAMES, TOY_PALETTE = ["background", "square", "disk", "triangle"], [(40, 40, 40), (215, 40, 40), (40, 215, 40), (40, 40, 215)]  # fmt: skip


def processed(args, indices=range(6)):
    dataset, class_names, palette, _ = training_source(args)
    train_dataset, _ = build_training_data(args, dataset, class_names, palette)
    return [train_dataset[(i, 1000 + i)] for i in indices]


def assert_aligned(example):
    """The control image lies on its image: toy pixels are near their class colour, padding black in both."""
    control = (example["conditioning_pixel_values"].permute(1, 2, 0) * 255).round().numpy().astype(np.int64)
    pixels = ((example["pixel_values"].permute(1, 2, 0) + 1) * 127.5).numpy()
    labels = colour_mask_to_labels(control, TOY_PALETTE, 255, "control")
    nearest = np.abs(pixels[:, :, None, :] - np.asarray(TOY_PALETTE)[None, None]).sum(-1).argmin(-1)
    inside = labels != 255
    assert (nearest[inside] == labels[inside]).mean() > 0.9
    if (~inside).any():  # the affine's padding: black image pixels under black control pixels
        assert (pixels[~inside].max(-1) < 40).mean() > 0.9
    return labels


def test_label_maps_are_coloured_after_the_shared_geometry(toy_data, tiny_sd_folder, tmp_path):
    args = parse_args(
        [str(a) for a in train_args(tiny_sd_folder, tmp_path)[1:]]
        + [str(a) for a in toy_args(toy_data)]
        + ["--random_affine", "--resolution", "24", "--prompt_top_k", "2"]
    )
    for example in processed(args):
        assert example["pixel_values"].shape == example["conditioning_pixel_values"].shape == (3, 24, 24)
        labels = assert_aligned(example)
        assert example["prompt"] == label_map_prompt(labels, TOY_NAMES, top_k=2)


def test_raw_loveda_validation_masks_are_read_as_the_loveda_loader_reads_them(tiny_sd_folder, tmp_path):
    """The README's LoveDA example passes a raw LoveDA mask (0 no-data, classes 1..7) as --validation_image."""
    from segdiff.data import save_label_png
    from segdiff.labels import LOVEDA_PALETTE
    from train_controlnet_seg import validation_conditions

    raw = np.repeat(np.arange(8, dtype=np.uint8), 4)[None].repeat(32, axis=0)  # columns of raw ids 0..7
    save_label_png(raw, tmp_path / "3514.png")
    args = parse_args(
        [str(a) for a in train_args(tiny_sd_folder, tmp_path / "out")[1:]]
        + ["--data_root", str(tmp_path), "--dataset", "loveda", "--validation_image", str(tmp_path / "3514.png")]
        + ["--validation_prompt", "a remote sensing image"]
    )
    [(control, prompt)] = validation_conditions(args, None, ["c"] * 7, LOVEDA_PALETTE)
    colours = np.asarray(control)[0, ::4]  # one pixel per raw id
    assert colours[0].tolist() == [0, 0, 0]  # no-data: drawn as ignore
    assert colours[1:].tolist() == [list(colour) for colour in LOVEDA_PALETTE]  # raw id k -> class k - 1


def write_metadata_csv(toy_data, folder, num_rows=8):
    """The reference's layout: image, conditioning_image (the colourised mask), text; every other caption empty."""
    (folder / "conditioning").mkdir(parents=True)
    shutil.copytree(toy_data / "images", folder / "images")
    rows = []
    for i, image in enumerate(sorted((folder / "images").iterdir())[:num_rows]):
        colour = colorize_label(read_label_map(toy_data / "masks" / image.name), TOY_PALETTE)
        colour.save(folder / "conditioning" / image.name)
        rows.append(
            {
                "image": f"images/{image.name}" if i else str(image),  # relative to the folder, or absolute
                "conditioning_image": f"conditioning/{image.name}",
                "text": f"a toy picture {i}" if i % 2 == 0 else "",
            }
        )
    with open(folder / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "conditioning_image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def metadata_folder(toy_data, tmp_path_factory):
    return write_metadata_csv(toy_data, tmp_path_factory.mktemp("csv") / "data")


def test_metadata_csv_rows_get_the_same_geometry_and_their_captions(
    metadata_folder, toy_data, tiny_sd_folder, tmp_path
):
    args = parse_args(
        [str(a) for a in train_args(tiny_sd_folder, tmp_path)[1:]]
        + ["--train_data_dir", str(metadata_folder), "--class_names_json", str(toy_data / "class_names.json")]
        + ["--random_affine", "--resolution", "24"]
    )
    for i, example in zip(range(6), processed(args)):
        labels = assert_aligned(example)
        # captions where the csv has one; the class prompt of the control image where it is empty
        assert example["prompt"] == (f"a toy picture {i}" if i % 2 == 0 else label_map_prompt(labels, TOY_NAMES))


def test_max_train_samples_keeps_the_metadata_csv_rows_a_label_map_trainer_keeps(
    metadata_folder, toy_data, tiny_sd_folder, tmp_path
):
    """A metadata.csv row is named by its image's stem, as the pair of the same image in a --data_root dataset."""
    base = [str(a) for a in train_args(tiny_sd_folder, tmp_path)[1:]] + ["--max_train_samples", "3"]
    class_names = ["--class_names_json", str(toy_data / "class_names.json")]
    from_csv, *_ = training_source(parse_args(base + ["--train_data_dir", str(metadata_folder), *class_names]))
    stems = [path.stem for path in sorted((toy_data / "images").iterdir())[:8]]  # the csv's 8 rows
    assert from_csv.sample_names() == [stems[index] for index in choose_train_samples(stems, 3)]
    assert [from_csv[index]["name"] for index in range(3)] == from_csv.sample_names()
    assert [Path(from_csv[index]["control_source"]).stem for index in range(3)] == from_csv.sample_names()


def test_dataset_name_reads_save_to_disk_folders_and_reference_csv_folders(
    metadata_folder, toy_data, tiny_sd_folder, tmp_path
):
    import datasets

    images = sorted((toy_data / "images").iterdir())[:4]
    rows = {
        "image": [Image.open(p).convert("RGB") for p in images],
        "conditioning_image": [
            colorize_label(read_label_map(toy_data / "masks" / p.name), TOY_PALETTE) for p in images
        ],
        "text": [["a toy", "a toy scene"]] * 4,  # several captions per row: one is picked per sample
    }
    features = datasets.Features(
        image=datasets.Image(), conditioning_image=datasets.Image(), text=datasets.Sequence(datasets.Value("string"))
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    base = [str(a) for a in train_args(tiny_sd_folder, tmp_path / "out")[1:]] + ["--random_affine"]
    examples = processed(parse_args(base + ["--dataset_name", str(tmp_path / "hf")]), range(4))
    for example in examples:
        assert_aligned(example)
    assert {example["prompt"] for example in examples} <= {"a toy", "a toy scene"}
    # Rows whose images are stored in the dataset are named by their row number, also in a --max_train_samples cut.
    limited, *_ = training_source(
        parse_args(base + ["--dataset_name", str(tmp_path / "hf"), "--max_train_samples", "2"])
    )
    row_names = [f"{index:06d}" for index in range(4)]
    assert limited.sample_names() == [row_names[index] for index in choose_train_samples(row_names, 2)]
    assert [limited[index]["name"] for index in range(2)] == limited.sample_names()

    # The reference project passes its metadata.csv folder as --dataset_name.
    example = processed(parse_args(base + ["--dataset_name", str(metadata_folder)]), [0])[0]
    assert example["prompt"] == "a toy picture 0"


@pytest.mark.parametrize("source", ["label maps", "metadata.csv"])
def test_cached_steps_see_what_uncached_ones_do_and_read_no_file(
    source, metadata_folder, toy_data, tiny_sd_folder, tmp_path, monkeypatch
):
    """--cache_latents keeps each centre crop's control image, label map and caption too: a cached step
    gives the uncached step's control image and prompt without opening a file or making a PIL image."""
    from accelerate import Accelerator

    data = toy_args(toy_data) if source == "label maps" else ["--train_data_dir", str(metadata_folder)]
    common = [str(a) for a in train_args(tiny_sd_folder, tmp_path)[1:]] + [str(a) for a in data]
    common += ["--class_names_json", str(toy_data / "class_names.json"), "--resolution", "24", "--no_random_flip"]
    uncached = processed(parse_args(common + ["--center_crop"]))

    args = parse_args(common + ["--cache_latents"])
    dataset, class_names, palette, _ = training_source(args)
    vae = AutoencoderKL.from_pretrained(tiny_sd_folder, subfolder="vae")
    cached = cache_dataset(dataset, args, class_names, palette, vae, Accelerator(cpu=True), torch.float32)
    train_dataset, _ = build_training_data(args, dataset, class_names, palette, cached)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached step opened a file or made a PIL image")

    monkeypatch.setattr(Image, "open", forbidden)
    monkeypatch.setattr(Image, "fromarray", forbidden)
    for i, expected in enumerate(uncached):
        example = train_dataset[(i, 1000 + i)]  # the same seeds: the same caption and prompt-dropout draws
        assert "pixel_values" not in example and example["latent_mean"].shape == (4, 12, 12)
        torch.testing.assert_close(example["conditioning_pixel_values"], expected["conditioning_pixel_values"])
        assert example["prompt"] == expected["prompt"]


def test_metadata_csv_training_with_cached_latents_and_ema(metadata_folder, toy_data, tiny_sd_folder, tmp_path):
    output_dir = tmp_path / "out"
    result = run_script(
        "accelerate", "launch",
        *train_args(tiny_sd_folder, output_dir, "--train_data_dir", metadata_folder, "--class_names_json",
                    toy_data / "class_names.json", "--max_train_steps", "2", "--cache_latents", "--use_ema",
                    "--proportion_empty_prompts", "0.5", "--checkpointing_steps", "2", "--gradient_checkpointing",
                    "--set_grads_to_none", "--mixed_precision", "bf16", "--validation_steps", "2",
                    "--validation_image", metadata_folder / "conditioning" / "train_00001.png"),
    )  # fmt: skip
    assert "Caching latents" in result.stderr
    # bf16: the frozen parts ran in bf16, the ControlNet trained and is saved in float32; validation ran in bf16 too
    assert "Mixed precision type: bf16" in result.stderr and (output_dir / "validation").is_dir()
    saved = load_file(output_dir / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["data_source"].endswith("metadata.csv") and config["cache_latents"]
    assert load_class_names(output_dir / "class_names.json") == (TOY_NAMES, TOY_PALETTE)
    # the saved ControlNet holds the EMA weights of the last checkpoint, not the trained weights they average
    ema = load_file(output_dir / "checkpoint-2" / "controlnet_ema" / "diffusion_pytorch_model.safetensors")
    raw = load_file(output_dir / "checkpoint-2" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert ema.keys() == saved.keys() == raw.keys()
    assert all(torch.equal(ema[k], saved[k]) for k in saved)
    assert not all(torch.equal(raw[k], saved[k]) for k in saved)
    assert ControlNetModel.from_pretrained(output_dir).config.conditioning_embedding_out_channels == [16, 32]


# ------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------


def generate(controlnet, masks_dir, save_dir, *extra, check=True):
    return run_script(
        "generate_controlnet_seg.py", "--model", controlnet, "--masks_dir", masks_dir, "--save_dir", save_dir,
        "--num_inference_steps", "2", *extra, check=check,
    )  # fmt: skip


@pytest.fixture(scope="module")
def masks_dir(toy_data, tmp_path_factory):
    """Two label PNGs and one colour PNG (the third mask drawn in the palette), with their label maps."""
    folder = tmp_path_factory.mktemp("masks")
    labels = {}
    for i, source in enumerate(sorted((toy_data / "masks").iterdir())[:3]):
        labels[source.name if i < 2 else f"colour_{source.name}"] = read_label_map(source)
        if i < 2:
            shutil.copy(source, folder / source.name)
        else:
            colorize_label(labels[f"colour_{source.name}"], TOY_PALETTE).save(folder / f"colour_{source.name}")
    return folder, dict(sorted(labels.items()))  # in file-name order, as the generator numbers masks


def test_generator_writes_a_generic_dataset(trained, masks_dir, tmp_path):
    folder, labels = masks_dir
    save_dir = tmp_path / "synth"
    # no --pretrained_model_name_or_path: the base comes from the ControlNet's training_config.json
    result = generate(trained[0], folder, save_dir, "--num_images_per_mask", "2", "--scheduler", "dpmsolver",
                      "--seed", "10")  # fmt: skip
    assert "Wrote 6 images of 3 masks" in result.stdout
    for name in ("grid.png", "class_names.json", "generation_config.json", "visualizations/sample_train_00001.png"):
        assert (save_dir / name).is_file(), name
    for stem in (name.removesuffix(".png") for name in labels):
        for j in (0, 1):
            assert Image.open(save_dir / f"generated_images/sample_{stem}/generated_{j:02d}.png").size == (32, 32)

    records = [json.loads(line) for line in (save_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert [r["seed"] for r in records] == [derive_seed(10, n.removesuffix(".png"), j) for n in labels for j in (0, 1)]
    assert {r["scheduler"] for r in records} == {"dpmsolver"} and records[0]["num_inference_steps"] == 2
    # masks in file-name order: colour_train_00002.png, train_00000.png, train_00001.png
    assert [r["mask_source"] for r in records[::2]] == list(labels)
    for record in records:
        assert record["prompt"] == label_map_prompt(labels[record["mask_source"]], TOY_NAMES)
    assert records[0]["file_name"] == "images/colour_train_00002_00.png"

    dataset = load_segmentation_dataset(save_dir, "generic")
    assert len(dataset) == 6 and dataset.class_names == TOY_NAMES
    # the label PNGs beside the images are the input masks, the colour one read through the palette
    for i, label in enumerate(labels.values()):
        np.testing.assert_array_equal(dataset[2 * i]["label"], label)

    # evaluate.py reads the generator's own layout: 3 masks of 2 samples, each scored against its mask
    results = evaluate.main(["--generated_dir", str(save_dir), "--segmenter", "palette", "--metrics", "miou",
                             "--results_dir", str(tmp_path / "eval")])  # fmt: skip
    assert results["layout"] == "mask-conditioned" and (results["num_generated_images"], results["num_masks"]) == (6, 3)
    # the score of exactly these files, recomputed with numpy: each image read by palette against its own mask
    miou, per_class = expected_miou(save_dir, joint=False)
    assert results["miou"] == pytest.approx(miou, abs=1e-6)
    assert results["per_class_iou"] == pytest.approx(per_class, abs=1e-6)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["miou"] == pytest.approx(miou, abs=1e-6)


def test_make_scheduler_keeps_the_bases_schedule(tiny_sd_folder):
    base = DDPMScheduler.from_pretrained(tiny_sd_folder, subfolder="scheduler").config  # SD's: epsilon, leading
    assert base.prediction_type == "epsilon" and not base.clip_sample
    for name in ("ddim", "ddpm", "dpmsolver", "unipc"):
        scheduler = make_scheduler(name, base)
        assert type(scheduler) is SCHEDULER_CLASSES[name], name
        for key in ("prediction_type", "timestep_spacing", "steps_offset", "beta_schedule", "beta_start", "beta_end"):
            assert scheduler.config[key] == base[key], (name, key)
        assert not scheduler.config.thresholding  # latents: nothing to clip
    assert make_scheduler("dpmsolver", base).config.algorithm_type == "dpmsolver++"


def test_generator_samples_with_the_scheduler_it_names(trained, masks_dir, tmp_path, monkeypatch):
    one_mask = tmp_path / "one"
    one_mask.mkdir()
    shutil.copy(sorted(masks_dir[0].iterdir())[0], one_mask)
    seen = spy_on_schedulers(monkeypatch)
    for name in ("ddim", "ddpm", "dpmsolver", "unipc"):
        seen["steps"].clear()
        run_generator(
            monkeypatch, "generate_controlnet_seg.py", "--model", trained[0], "--masks_dir", one_mask,
            "--save_dir", tmp_path / name, "--num_images_per_mask", "1", "--num_inference_steps", "3",
            "--scheduler", name,
        )  # fmt: skip
        built_name, built = seen["built"][-1]
        assert built_name == name and type(built) is SCHEDULER_CLASSES[name]
        assert built.config.prediction_type == "epsilon"  # the base's
        # 3 steps, all with the named scheduler and none with another
        assert seen["steps"] == {SCHEDULER_CLASSES[name].__name__: 3}, name
    assert len(seen["built"]) == 4


def test_generator_names_a_mask_with_unknown_colours(trained, masks_dir, tmp_path, monkeypatch):
    folder = tmp_path / "masks"
    shutil.copytree(masks_dir[0], folder)
    bad = np.zeros((32, 32, 3), dtype=np.uint8)
    bad[:, :16] = TOY_PALETTE[1]
    bad[:, 16:] = (12, 34, 56)  # in no palette
    Image.fromarray(bad).save(folder / "bad_colours.png")
    # The script's own __main__, in this process (its imports are already loaded): it exits with the message.
    argv = ["generate_controlnet_seg.py", "--model", str(trained[0]), "--masks_dir", str(folder)]
    monkeypatch.setattr(sys, "argv", argv + ["--save_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "generate_controlnet_seg.py"), run_name="__main__")
    message = str(exit_.value.code)  # a message (not 0 or None): the process exits with status 1
    assert message.startswith("error: ") and "bad_colours.png" in message
    assert "(12, 34, 56)" in message and "not in the palette" in message
    assert not (tmp_path / "x" / "metadata.jsonl").exists()


def test_the_run_loader_opens_checkpoints_and_names_missing_folders(trained, tmp_path):
    from diffusers import ControlNetModel

    from segdiff.runs import RunError, open_run

    run = open_run(trained[0] / "checkpoint-6")  # its controlnet/, the run's files
    assert run.run_dir == trained[0] and run.is_checkpoint and run.kind == "controlnet_seg"
    assert run.weights("controlnet") == (trained[0] / "checkpoint-6", "controlnet")  # trained without EMA
    controlnet = run.load_model(ControlNetModel, "controlnet", at_root=True)
    assert conditioning_downsampling(controlnet.config) == 2
    assert run.classes()[0] == TOY_NAMES and run.base() == str(run.config["pretrained_model_name_or_path"])

    with pytest.raises(RunError, match="--model .*nowhere does not exist"):
        open_run(tmp_path / "nowhere")
    with pytest.raises(RunError, match="holds no training_config.json naming its kind.*train_controlnet_seg.py"):
        open_run(tmp_path).require("controlnet_seg")
    with pytest.raises(RunError, match="no class_names.json .* Fix: copy the class_names.json its trainer wrote there"):
        open_run(tmp_path).classes()


def test_metadata_csv_with_missing_files_is_refused_before_training(tmp_path, tiny_sd_folder):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.csv").write_text("image,conditioning_image,text\nimages/a.png,masks/a.png,a\n")
    args = parse_args(
        [str(a) for a in train_args(tiny_sd_folder, tmp_path)[1:]] + ["--train_data_dir", str(tmp_path / "data")]
    )
    with pytest.raises(
        DatasetError, match=r"2 file\(s\) named in .*metadata.csv do not exist \(line 2 image: images/a.png"
    ):
        training_source(args)
