"""The toy dataset, its exact palette segmenter, and the segmentation metrics they are scored with."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segdiff.data import IGNORE_INDEX
from segdiff.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from segdiff.toy import TOY_CLASSES, TOY_PALETTE, PaletteSegmenter, make_toy_dataset, toy_classes

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Metrics, on cases small enough to work out by hand.


def test_confusion_matrix_counts_target_rows_and_pred_columns():
    target = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(confusion_matrix(pred, target, num_classes=3), expected)
    # torch input and an extra batch dimension give the same counts
    assert torch.equal(confusion_matrix(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], 3), expected)


def test_confusion_matrix_skips_ignored_pixels_and_rejects_unknown_ids():
    target = np.array([0, IGNORE_INDEX, 1, IGNORE_INDEX])
    pred = np.array([0, 1, 1, 1])
    assert torch.equal(confusion_matrix(pred, target, 2), torch.tensor([[1, 0], [0, 1]]))
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 2)


def test_iou_accuracy_and_mean_iou_match_hand_computation():
    target = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    confusion = confusion_matrix(pred, target, num_classes=4)
    ious = iou_per_class(confusion)
    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 1, union 2; class 3 absent: NaN
    assert torch.allclose(ious[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert math.isnan(ious[3])
    assert mean_iou(pred, target, num_classes=4) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert pixel_accuracy(confusion) == pytest.approx(4 / 6)


def test_perfect_prediction_scores_one():
    labels = np.random.default_rng(0).integers(0, 3, size=(2, 8, 8))
    assert mean_iou(labels, labels, num_classes=5) == 1.0
    assert pixel_accuracy(confusion_matrix(labels, labels, 5)) == 1.0


# ---------------------------------------------------------------------------------------------------------
# Toy dataset.


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), num_images=24, size=32, seed=3)


def _read_pairs(folder: Path):
    for image_path in sorted((folder / "images").glob("*.png")):
        with Image.open(image_path) as image, Image.open(folder / "masks" / image_path.name) as mask:
            yield image.convert("RGB"), mask.copy()


def test_generator_writes_the_generic_layout(toy_dir):
    images = sorted(p.name for p in (toy_dir / "images").glob("*.png"))
    masks = sorted(p.name for p in (toy_dir / "masks").glob("*.png"))
    assert len(images) == 24 and images == masks
    assert json.loads((toy_dir / "class_names.json").read_text()) == {
        "class_names": TOY_CLASSES,
        "palette": [list(colour) for colour in TOY_PALETTE],
    }
    for image, mask in _read_pairs(toy_dir):
        assert image.size == mask.size == (32, 32)
        assert mask.mode == "P"  # a label PNG: values are class ids, the palette is for viewing
        ids = np.asarray(mask)
        assert ids.min() >= 0 and ids.max() < len(TOY_CLASSES)
        assert (ids > 0).any()  # every image shows at least one shape
        assert np.asarray(image).std() > 5  # textured, not flat colours


def test_all_shape_classes_occur(toy_dir):
    present = set()
    for _, mask in _read_pairs(toy_dir):
        present.update(np.unique(np.asarray(mask)).tolist())
    assert present == set(range(len(TOY_CLASSES)))


def test_generator_is_deterministic_and_splits_differ(tmp_path, toy_dir):
    again = make_toy_dataset(tmp_path / "again", num_images=24, size=32, seed=3)
    for name in ("images/train_00000.png", "masks/train_00007.png", "images/train_00023.png"):
        assert (again / name).read_bytes() == (toy_dir / name).read_bytes()
    val = make_toy_dataset(tmp_path / "val", num_images=2, size=32, seed=3, split="val")
    val_image = np.asarray(Image.open(val / "images" / "val_00000.png"))
    assert not np.array_equal(val_image, np.asarray(Image.open(toy_dir / "images" / "train_00000.png")))


def test_palette_segmenter_reads_toy_images_back_exactly(toy_dir):
    segmenter = PaletteSegmenter(TOY_PALETTE)
    pairs = list(_read_pairs(toy_dir))
    masks = np.stack([np.asarray(mask) for _, mask in pairs])

    from_pil = np.stack([segmenter(image) for image, _ in pairs])
    assert from_pil.dtype == np.int64
    confusion = confusion_matrix(from_pil, masks, len(TOY_CLASSES))
    assert mean_iou(from_pil, masks, len(TOY_CLASSES)) == 1.0
    assert pixel_accuracy(confusion) == 1.0

    # The same images as model tensors: Bx3xHxW in [-1, 1] (default) or [0, 1] (pipeline output).
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image, _ in pairs])).permute(0, 3, 1, 2) / 255.0
    assert torch.equal(segmenter(pixels * 2 - 1), torch.from_numpy(masks).long())
    assert torch.equal(segmenter(pixels, value_range=(0, 1)), torch.from_numpy(masks).long())
    assert segmenter(pixels[0] * 2 - 1).shape == (32, 32)
    # ...and as pipelines' output_type="np": BxHxWx3 floats in [0, 1]
    np_images = pixels.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(PaletteSegmenter(TOY_PALETTE, value_range=(0, 1))(np_images), masks)


def test_palette_segmenter_picks_nearest_colour():
    segmenter = PaletteSegmenter([(0, 0, 0), (255, 0, 0), (0, 0, 255)])
    image = np.array([[[10, 10, 10], [200, 30, 30], [40, 0, 180], [130, 0, 0]]], dtype=np.uint8)
    assert segmenter(image).tolist() == [[0, 1, 2, 1]]


def test_more_classes_stay_exact(tmp_path):
    names, palette = toy_classes(8)
    assert len(set(names)) == len(set(palette)) == 8
    folder = make_toy_dataset(tmp_path / "toy8", num_images=12, size=48, num_classes=8, seed=1)
    segmenter = PaletteSegmenter.from_class_names_json(folder / "class_names.json")
    for image, mask in _read_pairs(folder):
        assert np.array_equal(segmenter(image), np.asarray(mask))
    with pytest.raises(ValueError):
        toy_classes(9)


def test_cli_writes_train_and_val(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "segdiff.toy", "--output_dir", str(tmp_path / "toy"), "--num_images", "5",
         "--val_images", "3", "--size", "24", "--seed", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "train" in result.stdout and "val" in result.stdout
    for split, count in (("train", 5), ("val", 3)):
        folder = tmp_path / "toy" / split
        assert len(list((folder / "images").glob("*.png"))) == count
        assert len(list((folder / "masks").glob("*.png"))) == count
        assert (folder / "class_names.json").is_file()
        with Image.open(next((folder / "images").glob("*.png"))) as image:
            assert image.size == (24, 24)
