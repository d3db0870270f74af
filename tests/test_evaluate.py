"""evaluate.py: FID/KID, LPIPS diversity, semantic consistency, style and --downstream, on every generator layout.

Cases with known answers: a set against itself, identical samples, exact segmenters on toy images. All weights
are random and made here (a TorchScript feature extractor, AlexNet features), so nothing is downloaded.
"""

import json
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV
from PIL import Image

import evaluate
from segdiff.data import read_label_map, save_label_png
from segdiff.metrics import (
    color_histogram_similarity,
    color_histograms,
    histogram_correlation,
    mean_pairwise_distance,
    segmentation_summary,
)
from segdiff.toy import TOY_CLASSES, TOY_PALETTE, make_toy_dataset

RESULT_FILES = ("metrics.json", "evaluation_report.txt", "per_class_iou.png", "comparison_grid.png")


# ---------------------------------------------------------------------------------------------------------
# Inputs: weights, and the layouts each generator writes, built by hand from toy data.


class RandomFeatures(torch.nn.Module):
    """A stand-in for Inception: uint8 images -> 32 features (random conv, pooled)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)

    def forward(self, images):
        return self.pool(torch.relu(self.conv(images.float() / 127.5 - 1))).flatten(1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torchvision

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    extractor = torch.jit.trace(RandomFeatures().eval(), torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    torch.jit.save(extractor, folder / "extractor.pt")
    # Only the convolutional part: all LPIPS uses (the full state dict would be 240 MB).
    alexnet = torchvision.models.alexnet().state_dict()
    torch.save({key: value for key, value in alexnet.items() if key.startswith("features.")}, folder / "alexnet.pth")
    return SimpleNamespace(extractor=folder / "extractor.pt", alexnet=folder / "alexnet.pth", empty_hub=folder / "hub")


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
    model = evaluate.load_lpips(weights.alexnet, "cpu")
    images = sorted((toy_data / "images").iterdir())
    identical, different = [images[0]] * 3, images[:3]
    per_mask = evaluate.lpips_diversity([identical, different, images[:1]], model, batch_size=2, device="cpu")
    assert len(per_mask) == 2  # a mask with a single sample has no pairs
    assert per_mask[0] == pytest.approx(0.0, abs=1e-7)
    assert per_mask[1] > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Weights: never a download, a clear message at once.


def test_missing_inception_weights_stop_at_once_with_the_file_to_download(toy_data, weights):
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--generated_dir", toy_data, "--real_dir", toy_data, "--metrics", "fid"],
        cwd=ROOT,
        env={**SCRIPT_ENV, "TORCH_HOME": str(weights.empty_hub)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert time.perf_counter() - started < 30  # the time to import torch, not a download's timeout
    assert evaluate.INCEPTION_URL in result.stderr and "--inception_weights" in result.stderr
    assert str(weights.empty_hub / "hub" / "checkpoints" / evaluate.INCEPTION_FILE) in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_lpips_weights_stop_at_once_and_cached_ones_are_found(toy_data, weights, tmp_path, monkeypatch):
    generated = make_mask_conditioned_layout(toy_data, tmp_path / "sdm", num_masks=2, per_mask=2)
    command = ["--generated_dir", str(generated), "--metrics", "lpips", "--results_dir", str(tmp_path / "eval")]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(command)
    message = str(stopped.value)
    assert evaluate.ALEXNET_URL in message and "--lpips_weights" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / evaluate.ALEXNET_FILE) in message

    # the same file in the torch hub cache, where torchvision keeps it, is used without a flag
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(weights.alexnet, tmp_path / "torch" / "hub" / "checkpoints" / evaluate.ALEXNET_FILE)
    results = evaluate.main(command)
    assert results["lpips_num_masks"] == 2 and results["lpips_diversity"] > 0
    assert results["lpips_backbone"].endswith(evaluate.ALEXNET_FILE)


def test_without_weights_the_default_metrics_skip_fid_and_say_why(toy_data, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(weights.empty_hub))
    results = evaluate.main(
        ["--generated_dir", str(toy_data), "--real_dir", str(toy_data), "--segmenter", "palette"]
        + ["--results_dir", str(tmp_path)]
    )
    assert results["metrics"] == ["miou"]
    assert evaluate.INCEPTION_URL in results["skipped"]["fid"]
    assert "Skipped:" in (tmp_path / "evaluation_report.txt").read_text()


def test_wrong_weight_files_are_named_with_the_fix(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "not_inception.pth")
    with pytest.raises(SystemExit, match="neither a TorchScript module nor the Inception-v3 weights"):
        evaluate.load_feature_extractor(tmp_path / "not_inception.pth", 299, "cpu")
    with pytest.raises(SystemExit, match="not a torchvision AlexNet state dict"):
        evaluate.load_lpips(tmp_path / "not_inception.pth", "cpu")


# ---------------------------------------------------------------------------------------------------------
# FID and KID through torchmetrics, with a custom TorchScript extractor.


def test_fid_and_kid_of_a_set_against_itself_are_near_zero(toy_data, weights, tmp_path):
    def fid_kid(generated):
        return evaluate.main(
            ["--generated_dir", str(generated), "--real_dir", str(toy_data), "--metrics", "fid,kid"]
            + ["--inception_weights", str(weights.extractor), "--feature_image_size", "64"]
            + ["--results_dir", str(tmp_path / generated.name)]
        )

    same = fid_kid(toy_data)
    other = fid_kid(recoloured_copy(toy_data, tmp_path / "recoloured"))
    assert same["feature_extractor"].startswith("TorchScript") and same["num_real_images"] == 24
    assert same["kid_subset_size"] == 24  # adapted to the small set (torchmetrics' default is 1000)
    assert abs(same["fid"]) < 1e-4
    assert other["fid"] > 1e3 * max(abs(same["fid"]), 1e-6)
    assert abs(same["kid_mean"]) < 0.1 * other["kid_mean"]
    for name in ("metrics.json", "evaluation_report.txt", "comparison_grid.png"):
        assert (tmp_path / toy_data.name / name).is_file()


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
        num_labels=5,  # one more than ours: mapped to "none of ours" below
    )
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "segformer")
    common = ["--generated_dir", str(toy_data), "--segmenter", str(tmp_path / "segformer"), "--metrics", "miou"]

    with pytest.raises(SystemExit, match="--segmenter_class_map"):
        evaluate.main(common + ["--results_dir", str(tmp_path / "unmapped")])

    (tmp_path / "map.json").write_text(json.dumps({"0": 0, "1": 1, "2": 2, "3": 3, "4": None}))
    results = evaluate.main(
        common + ["--segmenter_class_map", str(tmp_path / "map.json"), "--results_dir", str(tmp_path / "eval")]
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["segmenter"].startswith("SegformerForSemanticSegmentation")
    assert 0.0 <= metrics["miou"] <= 1.0 and 0.0 <= metrics["pixel_accuracy"] <= 1.0
    assert set(metrics["per_class_iou"]) == set(TOY_CLASSES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["per_class_iou"].values())
    assert results["miou"] == metrics["miou"]


# ---------------------------------------------------------------------------------------------------------
# The mask-conditioned layout, end to end as a user runs it; and the same without metadata.


def test_mask_conditioned_layout_end_to_end(toy_data, weights, tmp_path):
    generated = make_mask_conditioned_layout(toy_data, tmp_path / "sdm")
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--generated_dir", generated, "--real_dir", toy_data]
        + ["--inception_weights", weights.extractor, "--feature_image_size", "64", "--lpips_weights", weights.alexnet]
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
    # One sample in three is the mask's own image: mIoU well above chance, below 1.
    assert 0.2 < metrics["miou"] < 1.0 and 0.0 <= metrics["pixel_accuracy"] <= 1.0
    # Each sample is compared with the reference of its own name, or its mask's: 1.0 exactly for sample 0.
    assert 0.0 < metrics["style_histogram_correlation"] < 1.0
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
    common = ["--generated_dir", str(generated), "--class_names_json", str(toy_data / "class_names.json")]
    results = evaluate.main(
        common + ["--masks_dir", str(masks), "--segmenter", "palette", "--lpips_weights", str(weights.alexnet)]
        + ["--metrics", "lpips,miou", "--results_dir", str(tmp_path / "eval")]
    )  # fmt: skip
    assert results["layout"] == "sample-folders" and results["lpips_num_masks"] == 2
    assert 0.0 < results["miou"] < 1.0

    shutil.copy(sorted((toy_data / "masks").iterdir())[5], masks / "extra.png")
    with pytest.raises(SystemExit, match="sorted order"):
        evaluate.main(common + ["--masks_dir", str(masks), "--segmenter", "palette", "--metrics", "miou"])


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
# Downstream: real only vs real + synthetic.


def test_downstream_reports_both_mious_and_the_gain(toy_data, tmp_path):
    real = tmp_path / "real"
    make_toy_dataset(real / "train", num_images=8, size=32, seed=1, split="train")
    make_toy_dataset(real / "val", num_images=4, size=32, seed=1, split="val")
    results = evaluate.main(
        ["--generated_dir", str(toy_data), "--real_dir", str(real), "--downstream", "--downstream_steps", "3"]
        + ["--downstream_batch_size", "4", "--metrics", "miou", "--segmenter", "palette"]
        + ["--results_dir", str(tmp_path / "eval")]
    )
    down = results["downstream"]
    assert (down["num_real_train"], down["num_synthetic"], down["num_real_val"]) == (8, 24, 4)
    assert (down["steps"], down["resolution"]) == (3, 32)  # the toy images' own size by default
    for key in ("miou_real_only", "miou_real_plus_synthetic", "pixel_accuracy_real_only"):
        assert 0.0 <= down[key] <= 1.0, key
    assert down["miou_gain"] == pytest.approx(down["miou_real_plus_synthetic"] - down["miou_real_only"])
    assert set(down["per_class_iou_real_only"]) == set(TOY_CLASSES)
    report = (tmp_path / "eval" / "evaluation_report.txt").read_text()
    assert "real + synthetic" in report and "gain" in report


def test_help_lists_the_required_options(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for option in (
        "--real_dir", "--generated_dir", "--masks_dir", "--results_dir", "--metrics", "--inception_weights",
        "--segmenter", "--num_classes", "--class_names_json", "--downstream", "--lpips_weights",
    ):  # fmt: skip
        assert option in help_text
