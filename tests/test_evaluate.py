"""evaluate.py: FID/KID, LPIPS diversity, semantic consistency, style and --downstream, on every generator layout.

Cases with known answers: a set against itself, identical samples, exact segmenters on toy images, values worked
out from how the test data is built. All weights are random and made here (a TorchScript feature extractor,
AlexNet features), so nothing is downloaded. FID/KID against torch-fidelity itself: tests/test_fid_protocol.py.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, run_script, write_stand_in_weights
from PIL import Image

import evaluate
import train_controlnet_seg
from segdiff.data import (
    DatasetError,
    choose_train_samples,
    load_segmentation_dataset,
    read_image,
    read_label_map,
    save_label_png,
    train_sample_order,
)
from segdiff.downstream import (
    ARMS,
    build_segmentation_net,
    class_pixels,
    class_repeat_factors,
    class_vs_rest_labels,
    classes_present,
    evaluate_segmentation_net,
    extra_copies,
    load_pairs,
    repeat_factors,
    threshold_for_extra_pairs,
    tiny_segformer,
    train_segmentation_net,
)
from segdiff.evaluation import (
    ALEXNET_FILE,
    ALEXNET_URL,
    INCEPTION_FILE,
    INCEPTION_URL,
    load_inception,
    load_lpips,
    lpips_diversity,
    match_references,
    style_similarity,
)
from segdiff.labels import IGNORE_INDEX
from segdiff.metrics import (
    color_histogram_similarity,
    color_histograms,
    confusion_matrix,
    histogram_correlation,
    mean_pairwise_distance,
    segmentation_summary,
)
from segdiff.toy import TOY_CLASSES, TOY_PALETTE, make_toy_dataset

RESULT_FILES = ("metrics.json", "evaluation_report.txt", "per_class_iou.png", "comparison_grid.png")


# ---------------------------------------------------------------------------------------------------------
# Inputs: weights, and the layouts each generator writes, built by hand from toy data.


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_stand_in_weights(tmp_path_factory.mktemp("weights"))


def make_mask_conditioned_layout(toy, folder, num_masks=4, per_mask=3):
    """What the SDM and ControlNet generators write: sample folders, flat copies, metadata.jsonl.

    Sample 0 of each mask is the mask's own toy image (a perfect generation); the others are other toy
    images (wrong for the mask, and different from each other).
    """
    images = sorted((toy / "images").iterdir())
    for sub in ("generated_images", "images", "masks", "visualizations"):
        (folder / sub).mkdir(parents=True)
    records = []
    for mask_index, image in enumerate(images[:num_masks]):
        sample_dir = f"generated_images/sample_{mask_index + 1:06d}"
        (folder / sample_dir).mkdir()
        for image_index in range(per_mask):
            source = images[(mask_index + image_index * num_masks) % len(images)]
            name = f"{image.stem}_{image_index:02d}.png"
            shutil.copy(source, folder / sample_dir / f"generated_{image_index:02d}.png")
            shutil.copy(source, folder / "images" / name)
            shutil.copy(toy / "masks" / image.name, folder / "masks" / name)
            records.append(
                {
                    "file_name": f"images/{name}",
                    "mask_file_name": f"masks/{name}",
                    "sample_dir": sample_dir,
                    "mask_index": mask_index,
                    "image_index": image_index,
                    "mask_source": image.name,
                    "seed": mask_index * 100 + image_index,
                    "scheduler": "ddim",
                    "num_inference_steps": 2,
                    "guidance_scale": 2.0,
                }
            )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    shutil.copy(toy / "class_names.json", folder / "class_names.json")
    return folder


def make_joint_layout(toy, folder, num_samples=8):
    """What generate_joint_image_mask_diffusion.py writes: each image with its class-vs-rest mask."""
    for sub in ("images", "masks", "overlays"):
        (folder / sub).mkdir(parents=True)
    records = []
    for index, image in enumerate(sorted((toy / "images").iterdir())[:num_samples]):
        class_id = index % len(TOY_CLASSES)
        label = read_label_map(toy / "masks" / image.name)
        fill = 0 if class_id != 0 else 255  # the generator's --fill_label background; class 0 gets ignore
        name = f"{index:06d}.png"
        shutil.copy(image, folder / "images" / name)
        shutil.copy(image, folder / "overlays" / name)
        save_label_png(np.where(label == class_id, class_id, fill), folder / "masks" / name, TOY_PALETTE)
        records.append(
            {
                "index": index,
                "file_name": f"images/{name}",
                "mask_file_name": f"masks/{name}",
                "overlay_file_name": f"overlays/{name}",
                "class_id": class_id,
                "class_name": TOY_CLASSES[class_id],
                "seed": index,
            }
        )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    shutil.copy(toy / "class_names.json", folder / "class_names.json")
    return folder


def recoloured_copy(toy, folder):
    """The toy images in negative: same shapes, other colours."""
    (folder / "images").mkdir(parents=True)
    for path in sorted((toy / "images").iterdir()):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(255 - pixels).save(folder / "images" / path.name)
    return folder


def mask_conditioned_sources(toy, num_masks, per_mask):
    """(mask image, source image) per sample of make_mask_conditioned_layout, in its order."""
    images = sorted((toy / "images").iterdir())
    return [
        (image, images[(mask_index + image_index * num_masks) % len(images)])
        for mask_index, image in enumerate(images[:num_masks])
        for image_index in range(per_mask)
    ]


def expected_consistency(toy, num_masks, per_mask):
    """mIoU and pixel accuracy of make_mask_conditioned_layout's samples under the palette segmenter.

    It reads a toy image exactly (test_palette_segmenter_on_true_toy_images_gives_miou_one), so each sample is
    read as its source image's own label map, and scored against the mask it stands for.
    """
    confusion = torch.zeros((len(TOY_CLASSES), len(TOY_CLASSES)), dtype=torch.long)
    for mask_image, source in mask_conditioned_sources(toy, num_masks, per_mask):
        prediction = read_label_map(toy / "masks" / source.name)
        confusion += confusion_matrix(prediction, read_label_map(toy / "masks" / mask_image.name), len(TOY_CLASSES))
    return segmentation_summary(confusion, list(TOY_CLASSES))


def file_listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------------------
# Pure functions.


def test_histogram_correlation_is_opencvs_correl():
    first, second = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 1.0, 4.0, 3.0])
    # Pearson correlation by hand: deviations (-1.5, -.5, .5, 1.5) and (-.5, -1.5, 1.5, .5) -> 2 / 5
    assert histogram_correlation(first, second) == pytest.approx(0.6)
    assert histogram_correlation(first, 10 * first) == pytest.approx(1.0)  # scale-free: image sizes need not match
    assert histogram_correlation(first, first[::-1]) == pytest.approx(-1.0)
    assert histogram_correlation(np.ones(4), np.ones(4)) == 1.0  # OpenCV's answer for zero variance


def test_style_similarity_is_one_for_the_same_image_and_lower_for_other_colours(toy_data):
    image = Image.open(sorted((toy_data / "images").iterdir())[0]).convert("RGB")
    recoloured = Image.fromarray(255 - np.asarray(image))
    assert color_histograms(image, bins=64).shape == (3, 64)
    assert color_histograms(image).sum() == 3 * image.width * image.height
    assert color_histogram_similarity(image, image) == pytest.approx(1.0)
    assert color_histogram_similarity(image, image.resize((64, 64), Image.NEAREST)) == pytest.approx(1.0, abs=1e-6)
    assert color_histogram_similarity(image, recoloured) < 0.9


def test_mean_pairwise_distance_and_segmentation_summary():
    def distance(a, b):
        return (a - b).abs()

    assert mean_pairwise_distance(torch.tensor([0.0, 1.0, 3.0]), distance, batch_size=2) == pytest.approx(2.0)
    assert mean_pairwise_distance(torch.zeros(4), distance) == 0.0
    # 2 classes + a trailing "none of ours" column: class 1 loses 1 of its 2 pixels to it
    confusion = torch.tensor([[2, 0, 0], [0, 1, 1], [0, 0, 0]])
    summary = segmentation_summary(confusion, ["a", "b"])
    assert summary["per_class_iou"] == {"a": 1.0, "b": 0.5}
    assert summary["miou"] == pytest.approx(0.75) and summary["pixel_accuracy"] == pytest.approx(0.75)


def test_lpips_diversity_is_zero_for_identical_samples_and_positive_for_different_ones(toy_data, weights):
    model = load_lpips(weights.alexnet, "cpu")
    images = sorted((toy_data / "images").iterdir())
    identical, different = [images[0]] * 3, images[:3]
    per_mask = lpips_diversity([identical, different, images[:1]], model, batch_size=2, device="cpu")
    assert len(per_mask) == 2  # a mask with a single sample has no pairs
    assert per_mask[0] == pytest.approx(0.0, abs=1e-7)
    assert per_mask[1] > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Weights: never a download, a clear message at once.


def test_missing_inception_weights_stop_at_once_with_the_file_to_download(toy_data, weights):
    # How fast it stops is a row of benchmarks/bench_startup.py, not a timed assert.
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--generated_dir", toy_data, "--real_dir", toy_data, "--metrics", "fid"],
        cwd=ROOT,
        env={**SCRIPT_ENV, "TORCH_HOME": str(weights.empty_hub)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert INCEPTION_URL in result.stderr and "--inception_weights" in result.stderr
    assert str(weights.empty_hub / "hub" / "checkpoints" / INCEPTION_FILE) in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_lpips_weights_stop_at_once_and_cached_ones_are_found(toy_data, weights, tmp_path, monkeypatch):
    generated = make_mask_conditioned_layout(toy_data, tmp_path / "sdm", num_masks=2, per_mask=2)
    command = ["--generated_dir", str(generated), "--metrics", "lpips", "--results_dir", str(tmp_path / "eval")]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(command)
    message = str(stopped.value)
    assert ALEXNET_URL in message and "--lpips_weights" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_FILE) in message

    # the same file in the torch hub cache, where torchvision keeps it, is used without a flag
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(weights.alexnet, tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_FILE)
    results = evaluate.main(command)
    assert results["lpips_num_masks"] == 2 and results["lpips_diversity"] > 0
    assert results["lpips_backbone"].endswith(ALEXNET_FILE)


def test_without_weights_the_default_metrics_skip_fid_and_say_why(toy_data, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(weights.empty_hub))
    results = evaluate.main(
        ["--generated_dir", str(toy_data), "--real_dir", str(toy_data), "--segmenter", "palette"]
        + ["--results_dir", str(tmp_path)]
    )
    assert results["metrics"] == ["miou"]
    assert INCEPTION_URL in results["skipped"]["fid"]
    assert "Skipped:" in (tmp_path / "evaluation_report.txt").read_text()


def test_wrong_weight_files_are_named_with_the_fix(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "not_inception.pth")
    with pytest.raises(DatasetError, match="is not the Inception-v3 state dict of torch-fidelity"):
        load_inception(tmp_path / "not_inception.pth", "cpu")
    with pytest.raises(DatasetError, match="not a torchvision AlexNet state dict"):
        load_lpips(tmp_path / "not_inception.pth", "cpu")


def test_weights_files_are_never_run_as_code(toy_data, weights, tmp_path, monkeypatch):
    """--inception_weights is read with torch.load(weights_only=True): a TorchScript archive is refused without
    torch.jit.load, and a pickle that would run code on loading is refused without running it."""

    def no_jit_load(*args, **kwargs):
        raise AssertionError("torch.jit.load was called on --inception_weights")

    monkeypatch.setattr(torch.jit, "load", no_jit_load)
    command = ["--generated_dir", str(toy_data), "--real_dir", str(toy_data), "--metrics", "fid"]
    command += ["--results_dir", str(tmp_path / "eval")]
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(command + ["--inception_weights", str(weights.extractor)])
    message = str(stopped.value)
    assert "is a TorchScript archive" in message and "runs code" in message
    assert f"--feature_extractor_torchscript {weights.extractor}" in message  # the fix, for a trusted file

    class Payload:  # unpickled without weights_only, it makes a folder: code from the file, run
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "code_ran"),))

    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Payload()}, tmp_path / "trojan.pth")
    with pytest.raises(SystemExit, match=r"does not load as plain weights with torch.load\(weights_only=True\)"):
        evaluate.main(command + ["--inception_weights", str(tmp_path / "trojan.pth")])
    assert not (tmp_path / "code_ran").exists()
    assert not (tmp_path / "eval").exists()  # stopped before writing anything


# ---------------------------------------------------------------------------------------------------------
# FID and KID with a custom TorchScript extractor, given explicitly.


def test_fid_and_kid_of_a_set_against_itself_are_near_zero(toy_data, weights, tmp_path):
    def fid_kid(generated):
        return evaluate.main(
            ["--generated_dir", str(generated), "--real_dir", str(toy_data), "--metrics", "fid,kid"]
            + ["--feature_extractor_torchscript", str(weights.extractor)]
            + ["--results_dir", str(tmp_path / f"eval_{generated.name}")]  # never inside --generated_dir
        )

    same = fid_kid(toy_data)
    other = fid_kid(recoloured_copy(toy_data, tmp_path / "recoloured"))
    assert same["feature_extractor"].startswith("TorchScript") and same["num_real_images"] == 24
    assert same["fid_kid_standard"] is False and same["fid_kid_protocol"].startswith("non-standard: custom")
    assert same["kid_subset_size"] == 24  # torch-fidelity's 1000, shrunk to the 24 images (and recorded)
    report = (tmp_path / f"eval_{toy_data.name}" / "evaluation_report.txt").read_text()
    assert "100 subsets of 24, seed 2020; torch-fidelity's: 100 of 1000, seed 2020" in report
    assert abs(same["fid"]) < 1e-4
    assert other["fid"] > 1e3 * max(abs(same["fid"]), 1e-6)
    assert abs(same["kid_mean"]) < 0.1 * other["kid_mean"]
    for name in ("metrics.json", "evaluation_report.txt", "comparison_grid.png"):
        assert (tmp_path / f"eval_{toy_data.name}" / name).is_file()


# ---------------------------------------------------------------------------------------------------------
# Semantic consistency.


def test_palette_segmenter_on_true_toy_images_gives_miou_one(toy_data, tmp_path):
    results = evaluate.main(
        ["--generated_dir", str(toy_data), "--segmenter", "palette", "--metrics", "miou"]
        + ["--results_dir", str(tmp_path)]
    )
    assert results["layout"] == "generic"
    assert results["miou"] == 1.0 and results["pixel_accuracy"] == 1.0
    assert set(results["per_class_iou"]) == set(TOY_CLASSES)
    for name in RESULT_FILES:
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "evaluation_report.txt").read_text()
    assert "per-class IoU" in report and "triangle" in report


def test_joint_layout_scores_the_class_against_the_rest(toy_data, tmp_path):
    generated = make_joint_layout(toy_data, tmp_path / "joint")
    results = evaluate.main(
        ["--generated_dir", str(generated), "--segmenter", "palette", "--results_dir", str(tmp_path / "eval")]
    )
    assert results["layout"] == "joint" and results["metrics"] == ["miou"]
    # Other shapes in an image are "the rest", as in its mask: the true images agree perfectly.
    assert results["miou"] == 1.0
    assert (tmp_path / "eval" / "comparison_grid.png").is_file()


def test_segformer_folder_loads_and_maps_its_classes(toy_data, tmp_path):
    """A SegFormer that predicts its id 4 everywhere (zero classifier weights, bias favouring 4): mapped to null,
    every pixel is none of our classes and counts as wrong; mapped to background, exactly the background is right."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[4, 2],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=5,  # one more than ours
    )
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(config)
    with torch.no_grad():
        model.decode_head.classifier.weight.zero_()
        model.decode_head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))
    model.save_pretrained(tmp_path / "segformer")
    generated = tmp_path / "six"  # six toy images and masks: enough, and quick
    for sub in ("images", "masks"):
        (generated / sub).mkdir(parents=True)
        for path in sorted((toy_data / sub).iterdir())[:6]:
            shutil.copy(path, generated / sub / path.name)
    shutil.copy(toy_data / "class_names.json", generated)
    common = ["--generated_dir", str(generated), "--segmenter", str(tmp_path / "segformer"), "--metrics", "miou"]

    with pytest.raises(SystemExit, match="--segmenter_class_map"):
        evaluate.main(common + ["--results_dir", str(tmp_path / "unmapped")])

    def scores(mapping):
        (tmp_path / "map.json").write_text(json.dumps(mapping))
        results = evaluate.main(
            common + ["--segmenter_class_map", str(tmp_path / "map.json"), "--results_dir", str(tmp_path / "eval")]
        )
        assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == results
        return results

    masks = np.stack([read_label_map(path) for path in sorted((generated / "masks").iterdir())])
    present = [name for class_id, name in enumerate(TOY_CLASSES) if (masks == class_id).any()]
    assert present == list(TOY_CLASSES)  # each class is in the targets, so each has an IoU

    nothing_ours = scores({"0": 0, "1": 1, "2": 2, "3": 3, "4": None})
    assert nothing_ours["segmenter"].startswith("SegformerForSemanticSegmentation")
    assert nothing_ours["miou"] == 0.0 and nothing_ours["pixel_accuracy"] == 0.0
    assert nothing_ours["per_class_iou"] == dict.fromkeys(TOY_CLASSES, 0.0)

    # All read as background: right on the background pixels; background's IoU is their share of all pixels.
    background_share = float((masks == 0).mean())
    all_background = scores({"4": 0})
    assert all_background["pixel_accuracy"] == pytest.approx(background_share, abs=1e-12)
    assert all_background["per_class_iou"] == {
        TOY_CLASSES[0]: pytest.approx(background_share, abs=1e-12)
    } | dict.fromkeys(TOY_CLASSES[1:], 0.0)
    assert all_background["miou"] == pytest.approx(background_share / len(TOY_CLASSES), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The mask-conditioned layout, end to end as a user runs it; and the same without metadata.


def test_mask_conditioned_layout_end_to_end(toy_data, weights, tmp_path):
    generated = make_mask_conditioned_layout(toy_data, tmp_path / "sdm")
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--generated_dir", generated, "--real_dir", toy_data]
        + ["--feature_extractor_torchscript", weights.extractor, "--feature_image_size", "64"]
        + ["--lpips_weights", weights.alexnet]
        + ["--segmenter", "palette", "--reference_dir", toy_data, "--results_dir", tmp_path / "eval"],
        cwd=ROOT,
        env={**SCRIPT_ENV, "TORCH_HOME": str(weights.empty_hub)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["layout"] == "mask-conditioned"
    assert metrics["metrics"] == ["fid", "kid", "lpips", "miou", "style"]
    assert (metrics["num_generated_images"], metrics["num_masks"], metrics["lpips_num_masks"]) == (12, 4, 4)
    assert metrics["lpips_diversity"] > 0  # the samples of each mask differ
    assert metrics["fid_kid_protocol"] == (
        f"non-standard: custom feature extractor (TorchScript {weights.extractor} (32 features, uint8)), images "
        "first resized to 64 px (PIL bicubic); not comparable with published FID/KID"
    )
    # One sample in three is the mask's own image, the others other toy images' label maps.
    expected = expected_consistency(toy_data, num_masks=4, per_mask=3)
    assert metrics["miou"] == pytest.approx(expected["miou"], abs=1e-12)
    assert metrics["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-12)
    # Each sample is compared with the reference of its mask's name: sample 0 is that very image, so exactly 1.0.
    samples = evaluate.read_generated_set(generated, None).samples
    images = [sample.image for sample in samples]
    per_sample = style_similarity(images, match_references(toy_data, [(s.image, s.source) for s in samples]), bins=64)
    sources = mask_conditioned_sources(toy_data, num_masks=4, per_mask=3)
    assert [value for value, (mask_image, source) in zip(per_sample, sources) if source == mask_image] == [1.0] * 4
    assert per_sample == [
        color_histogram_similarity(read_image(source), read_image(mask_image)) for mask_image, source in sources
    ]
    assert metrics["style_histogram_correlation"] == pytest.approx(np.mean(per_sample), abs=1e-12)
    for name in RESULT_FILES:
        assert (tmp_path / "eval" / name).is_file(), name
    assert "per-class IoU" in (tmp_path / "eval" / "evaluation_report.txt").read_text()


def test_sample_folders_without_metadata_take_masks_by_order(toy_data, weights, tmp_path):
    generated = make_mask_conditioned_layout(toy_data, tmp_path / "sdm", num_masks=2, per_mask=2)
    (generated / "metadata.jsonl").unlink()
    masks = tmp_path / "input_masks"
    masks.mkdir()
    for path in sorted((toy_data / "masks").iterdir())[:2]:
        shutil.copy(path, masks / path.name)
    classes = ["--class_names_json", str(toy_data / "class_names.json")]
    # The folder of the sample folders itself, as the SDM reference passes it, is read as its parent.
    results = evaluate.main(
        ["--generated_dir", str(generated / "generated_images"), *classes, "--masks_dir", str(masks)]
        + ["--segmenter", "palette", "--lpips_weights", str(weights.alexnet)]
        + ["--metrics", "lpips,miou", "--results_dir", str(tmp_path / "eval")]
    )  # fmt: skip
    assert results["generated_dir"] == str(generated)
    assert results["layout"] == "sample-folders" and results["lpips_num_masks"] == 2
    expected = expected_consistency(toy_data, num_masks=2, per_mask=2)
    assert results["miou"] == pytest.approx(expected["miou"], abs=1e-12)
    assert results["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-12)

    shutil.copy(sorted((toy_data / "masks").iterdir())[5], masks / "extra.png")
    with pytest.raises(SystemExit, match="sorted order"):
        evaluate.main(
            ["--generated_dir", str(generated), *classes, "--masks_dir", str(masks), "--segmenter", "palette"]
            + ["--metrics", "miou"]
        )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--metrics", "fid,sharpness"], "unknown metric 'sharpness'"),
        (["--metrics", "miou"], "needs --segmenter"),
        (["--metrics", "fid"], "needs --real_dir"),
        (["--segmenter", "/no/such/model"], "neither 'palette' nor a model folder"),
        (["--metrics", "style", "--reference_dir", "/no/such/dir"], "--reference_dir /no/such/dir does not exist"),
        (["--masks_dir", "/no/such/masks"], "--masks_dir /no/such/masks does not exist"),
    ],
)
def test_bad_inputs_stop_with_a_message(toy_data, tmp_path, arguments, message):
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--generated_dir", str(toy_data), "--results_dir", str(tmp_path), *arguments])


# ---------------------------------------------------------------------------------------------------------
# Downstream: the arms (real only, + oversampling, + synthetic, + both), over seeds, per class.


@pytest.fixture
def real_split(tmp_path):
    """A real dataset with train/ (8 pairs) and val/ (4 pairs), as python -m segdiff.toy --val_images writes."""
    real = tmp_path / "real"
    make_toy_dataset(real / "train", num_images=8, size=32, seed=1, split="train")
    make_toy_dataset(real / "val", num_images=4, size=32, seed=1, split="val")
    return real


@pytest.fixture
def training_sets(monkeypatch):
    """The (images, labels) each downstream training run is given, in call order."""
    import segdiff.downstream

    seen = []
    train = segdiff.downstream.train_segmentation_net

    def recording(images, labels, *args, **kwargs):
        seen.append((images.clone(), labels.clone()))
        return train(images, labels, *args, **kwargs)

    monkeypatch.setattr(segdiff.downstream, "train_segmentation_net", recording)
    return seen


def run_downstream(generated, real, results_dir, *extra):
    return evaluate.main(
        ["--generated_dir", str(generated), "--real_dir", str(real), "--downstream", "--downstream_steps", "20"]
        + ["--downstream_batch_size", "4", "--metrics", "", "--results_dir", str(results_dir), *extra]
    )["downstream"]


# A hand-made set for repeat-factor sampling: 4 label maps (2x2, 255 = no data), 3 classes. Class 0 is in every
# image (f = 1), class 1 in two (f = 0.5), class 2 in one (f = 0.25).
HAND_MADE_LABELS = torch.tensor(
    [[[0, 0], [0, 255]], [[0, 1], [1, 255]], [[1, 0], [0, 0]], [[0, 2], [255, 255]]], dtype=torch.int16
)
PRESENT = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
ROOT2 = math.sqrt(2)


def test_repeat_factors_are_lvis_numbers_and_the_threshold_gives_the_asked_number_of_copies():
    assert classes_present(HAND_MADE_LABELS, 3).tolist() == PRESENT.tolist()
    # r(c) = max(1, sqrt(t / f(c))); an image's is its classes' largest.
    assert class_repeat_factors(PRESENT, 1.0).tolist() == pytest.approx([1.0, ROOT2, 2.0], abs=1e-12)
    assert repeat_factors(PRESENT, 1.0).tolist() == pytest.approx([1.0, ROOT2, ROOT2, 2.0], abs=1e-12)
    assert repeat_factors(PRESENT, 0.25).tolist() == [1.0, 1.0, 1.0, 1.0]  # no class rarer than t: no repeats

    # One extra copy: images 1-3 repeated, sqrt(t) = (1 + 3) / (2 + 2 sqrt(2)), t = 12 - 8 sqrt(2).
    threshold = threshold_for_extra_pairs(PRESENT, 1)
    assert threshold == pytest.approx(12 - 8 * ROOT2, abs=1e-12)
    extra = (repeat_factors(PRESENT, threshold) - 1).tolist()
    assert extra == pytest.approx([0.0, 3 - 2 * ROOT2, 3 - 2 * ROOT2, 4 * ROOT2 - 5], abs=1e-12)
    # Two: all four repeated (t above class 0's f = 1), sqrt(t) = (2 + 4) / (3 + 2 sqrt(2)).
    assert threshold_for_extra_pairs(PRESENT, 2) == pytest.approx((6 / (3 + 2 * ROOT2)) ** 2, abs=1e-12)


def test_extra_copies_are_exactly_as_many_as_asked_each_image_its_expected_count_rounded():
    threshold = threshold_for_extra_pairs(PRESENT, 5)
    expected = repeat_factors(PRESENT, threshold) - 1
    assert float(expected.sum()) == pytest.approx(5, abs=1e-12)
    draws = [extra_copies(PRESENT, 5, threshold, seed) for seed in range(20)]
    for copies in draws:
        counts = torch.bincount(copies, minlength=4).double()
        assert len(copies) == 5
        assert (counts >= expected.floor()).all() and (counts <= expected.ceil()).all()
    assert len({tuple(copies.tolist()) for copies in draws}) > 1  # the rounding is seeded: seeds differ
    assert extra_copies(PRESENT, 5, threshold, 3).tolist() == draws[3].tolist()  # and the same seed repeats

    # A threshold given: its repeat factors set the shares (r - 1 = 0, 0.41, 0.41, 1 at t = 1), still 3 copies.
    for seed in range(10):
        counts = torch.bincount(extra_copies(PRESENT, 3, 1.0, seed), minlength=4).tolist()
        assert sum(counts) == 3 and counts[0] == 0 and counts[3] in (1, 2) and counts[1] <= 1 and counts[2] <= 1
    with pytest.raises(DatasetError, match="no image would be repeated"):
        extra_copies(PRESENT, 3, 0.25, 0)


def test_downstream_trains_each_arm_on_its_pairs_with_the_same_seeds(toy_data, real_split, training_sets, tmp_path):
    first = run_downstream(toy_data, real_split, tmp_path / "first", "--downstream_seeds", "0", "1")
    assert (first["num_real_train"], first["num_synthetic"], first["num_real_val"]) == (8, 24, 4)
    assert (first["steps"], first["resolution"], first["seeds"], first["model"]) == (20, 32, [0, 1], "unet")
    assert first["synthetic_labels"] == "full label maps"
    assert first["train_samples"] == [f"train_{index:05d}" for index in range(8)]

    # Each oversampled arm adds as many pairs as the synthetic data: the same count, other pairs.
    sizes = {
        "real_only": 8,
        "real_plus_oversampling": 8 + 24,
        "real_plus_synthetic": 8 + 24,
        "real_plus_synthetic_plus_oversampling": 8 + 24 + 24,
    }
    assert {arm: scores["num_pairs"] for arm, scores in first["arms"].items()} == sizes
    assert [len(images) for images, _ in training_sets] == list(sizes.values()) * 2  # arm after arm, per seed
    (real, real_labels), oversampled, (pooled, pooled_labels), both = training_sets[:4]
    assert torch.equal(pooled[:8], real) and torch.equal(pooled_labels[:8], real_labels)
    for (images, _), (base, base_labels) in ((oversampled, (real, real_labels)), (both, (pooled, pooled_labels))):
        present = classes_present(base_labels, 4)
        copies = extra_copies(present, 24, threshold_for_extra_pairs(present, 24), seed=0)
        assert torch.equal(images, torch.cat([base, base[copies]]))
    present = classes_present(real_labels, 4)
    oversampling = first["oversampling"]["real_plus_oversampling"]
    assert oversampling["threshold"] == threshold_for_extra_pairs(present, 24)
    assert (
        list(oversampling["class_repeat_factors"].values())
        == class_repeat_factors(present, oversampling["threshold"]).tolist()
    )
    assert first["train_pixels_per_class"] == dict(zip(TOY_CLASSES, class_pixels(real_labels, 4)))

    # Means and spreads over the seeds; the changes per seed, with the seeds where they are positive.
    miou = first["arms"]["real_only"]["miou"]
    assert miou["mean"] == pytest.approx(np.mean(miou["per_seed"]), abs=1e-12)
    assert miou["std"] == pytest.approx(np.std(miou["per_seed"], ddof=1), abs=1e-12)
    arms, versus = first["arms"], first["synthetic_vs_oversampling"]
    synthetic, oversampled_scores = arms["real_plus_synthetic"], arms["real_plus_oversampling"]
    differences = [a - b for a, b in zip(synthetic["miou"]["per_seed"], oversampled_scores["miou"]["per_seed"])]
    assert versus["miou"]["per_seed"] == differences
    assert versus["miou"]["positive_seeds"] == sum(difference > 0 for difference in differences)
    for name in TOY_CLASSES:
        after, before = (
            synthetic["per_class_iou"][name]["per_seed"],
            arms["real_only"]["per_class_iou"][name]["per_seed"],
        )
        change = first["change_vs_real_only"]["real_plus_synthetic"]["per_class_iou"][name]
        assert change["per_seed"] == [a - b for a, b in zip(after, before)]
    assert first["classes_made_worse"] == [
        name for name, change in versus["per_class_iou"].items() if change["mean"] < -first["worse_threshold"]
    ]

    # The render fidelity: the real-only segmenter of seed 0 on the synthetic pairs, and the same segmenter on the
    # real val pairs (what it can read at all), which is the real-only arm's first seed.
    network = train_segmentation_net(real, real_labels, 4, steps=20, batch_size=4, seed=0)
    confusion = evaluate_segmentation_net(network, pooled[8:], pooled_labels[8:], 4)
    val_pairs = load_segmentation_dataset(real_split / "val", "generic").pairs
    val, val_labels = load_pairs(val_pairs, 32, 4)
    reader = segmentation_summary(evaluate_segmentation_net(network, val, val_labels, 4), list(TOY_CLASSES))
    assert first["render_fidelity"] == {
        **segmentation_summary(confusion, list(TOY_CLASSES)),
        "seed": 0,
        "reader_real_val_iou": reader["per_class_iou"],
    }
    assert [arms["real_only"]["per_class_iou"][name]["per_seed"][0] for name in TOY_CLASSES] == [
        reader["per_class_iou"][name] for name in TOY_CLASSES
    ]

    # The report: the arms with their pair counts, and the per-class table, rarest class first.
    report = (tmp_path / "first" / "evaluation_report.txt").read_text()
    assert "real + synthetic + oversampling    8 + 24 + 24" in report
    assert "synthetic - oversampling, mIoU:" in report and "of 2 seeds" in report
    rows = [
        line.split()[0] for line in report.splitlines() if line.startswith("    ") and line.split()[0] in TOY_CLASSES
    ]
    assert rows == sorted(TOY_CLASSES, key=first["train_pixels_per_class"].get)
    render = first["render_fidelity"]
    for line in report.splitlines():
        fields = [field for field in line.split() if field != "worse"]
        if line.startswith("    ") and fields[0] in TOY_CLASSES:  # render IoU, then the same reader on real val
            name = fields[0]
            shown = [
                evaluate._number(render["per_class_iou"][name]),
                evaluate._number(render["reader_real_val_iou"][name], 3),
            ]
            assert fields[-2:] == shown

    # The same seeds give the same result; a threshold of -1 calls every class made worse.
    again = run_downstream(
        toy_data, real_split, tmp_path / "again", "--downstream_seeds", "0", "1", "--downstream_worse_threshold", "-1"
    )
    differing = ("seconds", "classes_made_worse", "worse_threshold")
    assert {key: value for key, value in again.items() if key not in differing} == {
        key: value for key, value in first.items() if key not in differing
    }
    assert again["classes_made_worse"] == list(TOY_CLASSES)


def test_downstream_segformer_from_random_or_pretrained_weights(toy_data, real_split, tmp_path):
    network = build_segmentation_net("segformer", 4)
    assert network(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 32, 32)  # upsampled from 8 x 8
    assert sum(parameter.numel() for parameter in network.parameters()) == 456_036  # hidden sizes 16..128, depth 1

    # A local folder with 7 classes: its encoder is kept, its head replaced by one of our 4.
    original = tiny_segformer(7)
    original.save_pretrained(tmp_path / "pretrained")
    loaded = build_segmentation_net("segformer", 4, tmp_path / "pretrained")
    assert loaded(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    kept = loaded.segformer.state_dict()
    encoder = {key: value for key, value in original.state_dict().items() if key.startswith("segformer.")}
    assert encoder and all(torch.equal(kept[key], value) for key, value in encoder.items())
    assert kept["decode_head.classifier.weight"].shape[0] == 4

    down = run_downstream(
        toy_data, real_split, tmp_path / "eval", "--downstream_model", "segformer",
        "--downstream_pretrained", str(tmp_path / "pretrained"), "--downstream_steps", "5",
    )  # fmt: skip
    assert (down["model"], down["pretrained"]) == ("segformer", str(tmp_path / "pretrained"))
    assert list(down["arms"]) == list(ARMS)
    report = (tmp_path / "eval" / "evaluation_report.txt").read_text()
    assert f"a SegFormer from {tmp_path / 'pretrained'} trained 5 steps" in report
    with pytest.raises(SystemExit, match="use it with --downstream_model segformer"):
        run_downstream(toy_data, real_split, tmp_path / "unet", "--downstream_pretrained", str(tmp_path / "pretrained"))


def resize_dataset(folder: Path, height: int, width: int, stems=None) -> None:
    """Resize a generic dataset's images (bilinear) and masks (nearest) in place: all of them, or those ``stems``."""
    for sub, method in (("images", Image.BILINEAR), ("masks", Image.NEAREST)):
        for path in (folder / sub).iterdir():
            if stems is None or path.stem in stems:
                with Image.open(path) as image:
                    image.resize((width, height), method).save(path)


def test_downstream_keeps_the_real_images_shape_and_warns_of_synthetic_ones_it_stretches(
    toy_data, real_split, training_sets, tmp_path
):
    """Street scenes are not square: every arm trains at the real images' own aspect ratio (short side at most 128),
    and synthetic images of another shape, which that size stretches where it does not stretch the real ones, are
    warned about before any training."""
    for split in ("train", "val"):
        resize_dataset(real_split / split, 32, 48)  # height x width, 2:3
    with pytest.warns(UserWarning, match=r"24 of the 24 synthetic images have another aspect ratio .*\(32x48, "):
        down = run_downstream(toy_data, real_split, tmp_path / "square", "--downstream_steps", "1")
    assert down["resolution"] == [32, 48]
    assert {tuple(images.shape[1:]) for images, _ in training_sets} == {(3, 32, 48)}
    assert {tuple(labels.shape[1:]) for _, labels in training_sets} == {(32, 48)}
    assert "trained 1 steps at 32x48 px" in (tmp_path / "square" / "evaluation_report.txt").read_text()

    # Synthetic images of the real shape (here 16x24): no warning; an explicit HEIGHT,WIDTH is used as given.
    synthetic = tmp_path / "synthetic"
    shutil.copytree(toy_data, synthetic)
    resize_dataset(synthetic, 16, 24)
    training_sets.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="--downstream")
        down = run_downstream(synthetic, real_split, tmp_path / "given", "--downstream_resolution", "16,20")
    assert down["resolution"] == [16, 20] and {tuple(images.shape[1:]) for images, _ in training_sets} == {(3, 16, 20)}
    with pytest.raises(SystemExit, match="--downstream_resolution must be multiples of 4, got 16,18"):
        run_downstream(synthetic, real_split, tmp_path / "refused", "--downstream_resolution", "16,18")

    # Real images of several shapes share none: a square of the first one's short side, and no synthetic warning.
    resize_dataset(real_split / "train", 48, 32, stems={"train_00003"})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="--downstream")
        down = run_downstream(toy_data, real_split, tmp_path / "mixed", "--downstream_steps", "1")
    assert down["resolution"] == 32


def test_every_script_given_the_same_n_trains_on_the_same_real_pairs(toy_data, tiny_sd_folder, tmp_path):
    """--max_train_samples 5 of the 24 toy pairs: the layout model, the SDM renderer, the ControlNet and evaluate.py's
    segmenters take the same 5; evaluate.py's held-out validation pairs are none of them. A trainer given the data as
    a relative path records it absolute, so evaluate.py run from another folder still finds it the segmenters'."""
    relative = os.path.relpath(toy_data, ROOT)  # the scripts run in the repository root
    data = ["--data_root", relative, "--dataset", "generic", "--max_train_samples", "5"]
    short = ["--max_train_steps", "1", "--train_batch_size", "4", "--resolution", "16", "--report_to", "none"]
    short += ["--validation_steps", "0"]
    layout_config = ["--model_config", "configs/models/layout_tiny.json"]
    run_script("accelerate", "launch", "train_layout_diffusion.py", *data, *short, *layout_config, "--output_dir", tmp_path / "layout")  # fmt: skip
    run_script("train_spade_sdm.py", *data, *short, "--model_config", "configs/models/sdm_tiny.json", "--output_dir", tmp_path / "sdm")  # fmt: skip
    layout, sdm = (json.loads((tmp_path / run / "training_config.json").read_text()) for run in ("layout", "sdm"))
    assert layout["data_root"] == sdm["data_root"] == str(toy_data.resolve())
    controlnet_args = train_controlnet_seg.parse_args(
        [str(argument) for argument in data]
        + ["--pretrained_model_name_or_path", str(tiny_sd_folder), "--output_dir", "unused", "--resolution", "16"]
    )
    controlnet, *_ = train_controlnet_seg.training_source(controlnet_args)
    down = run_downstream(toy_data, toy_data, tmp_path / "eval", "--max_train_samples", "5", "--downstream_steps", "1")

    stems = [path.stem for path in sorted((toy_data / "images").iterdir())]
    chosen = [stems[index] for index in choose_train_samples(stems, 5)]
    assert layout["train_samples"] == sdm["train_samples"] == controlnet.sample_names() == chosen
    assert down["train_samples"] == chosen
    # No val split: evaluate.py holds out the last 5 pairs of the same order (24 * 0.2), which no N <= 19 reaches.
    held_out = [stems[index] for index in train_sample_order(stems)[-5:]]
    assert down["num_real_val"] == 5 and not set(held_out) & set(chosen)

    for parse in (train_controlnet_seg.parse_args, evaluate.parse_args):
        with pytest.raises(SystemExit):
            parse(["--max_train_samples", "0"])


def test_downstream_refuses_real_pairs_whose_ids_name_other_classes(toy_data, real_split, tmp_path):
    """A synthetic set from models of another class list would teach one id as two classes: refused at once."""
    names_file = real_split / "train" / "class_names.json"
    names = json.loads(names_file.read_text())
    listed = names["class_names"] if isinstance(names, dict) else names
    listed[1], listed[2] = listed[2], listed[1]
    names_file.write_text(json.dumps(names))
    with pytest.raises(SystemExit) as refused:
        run_downstream(toy_data, real_split, tmp_path / "eval")
    message = str(refused.value)
    assert f"{real_split / 'train'}: its classes (background, disk, square, triangle)" in message
    assert "generated set (background, square, disk, triangle" in message and "--class_names_json" in message
    assert not (tmp_path / "eval").exists()  # nothing trained, nothing written


def test_downstream_reads_real_masks_whose_zero_is_unlabelled_with_label_offset(
    toy_data, real_split, training_sets, tmp_path
):
    """Real masks that store 0 for unlabelled pixels and the classes from 1: --label_offset 1 trains every arm on
    the class ids, the unlabelled pixels ignored; without it they are refused, naming the option."""
    expected = {}
    for split in ("train", "val"):
        for mask in sorted((real_split / split / "masks").glob("*.png")):
            label = read_label_map(mask)
            unlabelled = np.zeros_like(label, dtype=bool)
            unlabelled[:4] = True  # the top rows: no-data
            expected[mask.stem] = np.where(unlabelled, IGNORE_INDEX, label)
            Image.fromarray(np.where(unlabelled, 0, label + 1).astype(np.uint8)).save(mask)
    with pytest.raises(SystemExit, match=r"holds class ids 4, .*--label_offset 1 if the files count the classes"):
        run_downstream(toy_data, real_split, tmp_path / "refused", "--downstream_steps", "1")
    training_sets.clear()
    down = run_downstream(
        toy_data, real_split, tmp_path / "eval", "--label_offset", "1", "--downstream_steps", "1",
        "--downstream_seeds", "0",
    )  # fmt: skip
    _, real_labels = training_sets[0]  # the real-only arm
    wanted = np.stack([expected[name] for name in down["train_samples"]])
    np.testing.assert_array_equal(real_labels.numpy(), wanted)


def test_downstream_says_which_real_pairs_the_generators_saw(toy_data, real_split, tmp_path):
    """generation_args.json names the models behind the set; their training_config.json, the real pairs they saw."""
    generated = tmp_path / "generated"
    shutil.copytree(toy_data, generated)
    train_names = sorted(path.stem for path in (real_split / "train" / "masks").iterdir())
    val_names = sorted(path.stem for path in (real_split / "val" / "masks").iterdir())
    models = {
        "layout_model": (real_split / "train", train_names),  # all 8 train pairs
        "renderer": (real_split / "val", val_names[:3]),  # 3 validation pairs
        "model": (tmp_path / "elsewhere", ["x"]),  # another folder: not compared
    }
    for flag, (data_root, seen) in models.items():
        (tmp_path / flag).mkdir()
        config = {"pipeline": "spade_sdm", "data_root": str(data_root), "train_samples": seen}
        (tmp_path / flag / "training_config.json").write_text(json.dumps(config))
    (generated / "generation_args.json").write_text(json.dumps({flag: str(tmp_path / flag) for flag in models}))

    down = run_downstream(generated, real_split, tmp_path / "eval", "--max_train_samples", "5")
    assert down["generators"]["layout_model"]["train_samples"] == 8
    assert down["generators"]["layout_model"]["not_among_segmenters"] == 3  # 8 seen, 5 given to the segmenters
    assert down["generators"]["renderer"]["validation_pairs_seen"] == 3
    assert "not_among_segmenters" not in down["generators"]["model"]
    report = (tmp_path / "eval" / "evaluation_report.txt").read_text()
    assert "8 real pairs, 3 of them not among the segmenters' 5: NOT A FAIR COMPARISON" in report
    assert (
        "it saw 3 of the validation pairs" in report and "(another folder than the segmenters': not compared)" in report
    )

    fair = run_downstream(generated, real_split, tmp_path / "fair")["generators"]["layout_model"]
    assert fair["not_among_segmenters"] == 0 and "validation_pairs_seen" not in fair


def test_class_vs_rest_labels_keep_only_the_masks_class():
    mask = np.array([[0, 2, 2], [0, 0, 2]])  # a class-2 sample; the rest written as background
    assert class_vs_rest_labels(mask, 2, 255).tolist() == [[255, 2, 2], [255, 255, 2]]
    mask = np.array([[0, 255], [0, 255]])  # a class-0 sample: the generator writes its rest as ignore
    assert class_vs_rest_labels(mask, 0, 255).tolist() == [[0, 255], [0, 255]]


def test_load_pairs_with_class_ids_ignores_the_rest(toy_data):
    pairs = [(toy_data / "images" / path.name, path) for path in sorted((toy_data / "masks").iterdir())[:2]]
    full = [read_label_map(mask) for _, mask in pairs]
    _, labels = load_pairs(pairs, 32, len(TOY_CLASSES), class_ids=[3, 0])
    assert labels[0].tolist() == np.where(full[0] == 3, 3, IGNORE_INDEX).tolist()
    assert labels[1].tolist() == np.where(full[1] == 0, 0, IGNORE_INDEX).tolist()
    _, unchanged = load_pairs(pairs, 32, len(TOY_CLASSES))
    assert unchanged.tolist() == np.stack(full).tolist()


def test_downstream_on_the_joint_layout_ignores_the_rest(toy_data, real_split, training_sets, tmp_path):
    """Issue #15: the joint generator's "rest" (class 0 in its masks) holds other classes: not background."""
    generated = make_joint_layout(toy_data, tmp_path / "joint", num_samples=8)
    down = run_downstream(generated, real_split, tmp_path / "eval")
    assert down["num_synthetic"] == 8
    assert (
        down["synthetic_labels"] == "class-vs-rest masks (joint layout): each mask's class labelled, the rest ignored"
    )
    (_, real_only), _, (_, combined), _ = training_sets  # the arms: real only, + oversampling, + synthetic, + both
    assert combined[:8].tolist() == real_only.tolist()
    records = [json.loads(line) for line in (generated / "metadata.jsonl").read_text().splitlines()]
    for fed, record in zip(combined[8:], records):
        mask = read_label_map(generated / record["mask_file_name"])
        class_id = record["class_id"]
        assert fed.tolist() == np.where(mask == class_id, class_id, IGNORE_INDEX).tolist()
        if class_id != 0:  # the file says background where the image shows other classes; training ignores it
            assert ((mask == 0) & (fed.numpy() == IGNORE_INDEX)).any()

    broken = evaluate.read_generated_set(generated, None)
    broken.samples[3].class_id = None  # a joint record without its class_id
    with pytest.raises(DatasetError, match="have no class_id"):
        evaluate.downstream_synthetic_pairs(broken)


# ---------------------------------------------------------------------------------------------------------
# Where results go, and --help.


def test_results_go_next_to_the_generated_folder_not_into_it(toy_data, tmp_path, monkeypatch):
    generated = make_mask_conditioned_layout(toy_data, tmp_path / "sdm", num_masks=2, per_mask=2)
    before = file_listing(generated)
    results = evaluate.main(["--generated_dir", str(generated), "--segmenter", "palette", "--metrics", "miou"])
    assert file_listing(generated) == before
    results_dir = tmp_path / "sdm_evaluation"
    assert sorted(path.name for path in results_dir.iterdir()) == sorted(RESULT_FILES)
    assert json.loads((results_dir / "metrics.json").read_text()) == results
    # Its generated_images/ folder, as the SDM reference passes it, is the same folder: same results, same place.
    command = ["--generated_dir", str(generated / "generated_images"), "--segmenter", "palette", "--metrics", "miou"]
    assert evaluate.main(command) == results
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sdm", "sdm_evaluation"]
    monkeypatch.chdir(generated)  # "." is named after the folder it stands for
    assert evaluate.default_results_dir(Path(".")) == results_dir.resolve()


def test_help_lists_the_required_options(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for option in (
        "--real_dir", "--generated_dir", "--masks_dir", "--results_dir", "--metrics", "--inception_weights",
        "--segmenter", "--num_classes", "--class_names_json", "--downstream", "--lpips_weights",
        "--feature_extractor_torchscript", "--kid_subset_size", "--kid_seed",
    ):  # fmt: skip
        assert option in help_text
    words = " ".join(help_text.split())  # argparse wraps lines anywhere
    assert "Loading it RUNS CODE FROM THE FILE: use only files you trust." in words
    assert "torch.load(weights_only=True)" in words
    assert "Default: GENERATED_DIR_evaluation, a folder next to" in words
