"""The toy dataset, its exact palette segmenter, and the segmentation metrics they are scored with."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segdiff.labels import IGNORE_INDEX
from segdiff.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from segdiff.toy import (
    TOY_CLASSES,
    TOY_PALETTE,
    LongTail,
    PaletteSegmenter,
    make_toy_dataset,
    toy_classes,
    toy_style,
)

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


# ---------------------------------------------------------------------------------------------------------
# Long-tailed toy data: one rare, small class.


def _present(folder: Path, class_id: int) -> list[bool]:
    return [bool((np.asarray(mask) == class_id).any()) for _, mask in _read_pairs(folder)]


def _mean_area_when_present(folder: Path, class_id: int) -> float:
    areas = [(np.asarray(mask) == class_id).sum() for _, mask in _read_pairs(folder)]
    return float(np.mean([a for a in areas if a > 0]))


def _pixel_digest(folder: Path) -> str:
    """A hash of every image's and mask's pixels, in file order (not of the PNG bytes, which a Pillow upgrade may
    encode differently)."""
    digest = hashlib.sha256()
    for image, mask in _read_pairs(folder):
        digest.update(np.asarray(image).tobytes())
        digest.update(np.asarray(mask).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def long_tail_dir(tmp_path_factory):
    return make_toy_dataset(
        tmp_path_factory.mktemp("long_tail"), num_images=200, size=32, seed=0, long_tail=LongTail("triangle", 0.04)
    )


def test_long_tail_rare_class_is_rare_and_small(long_tail_dir):
    triangle = TOY_CLASSES.index("triangle")
    present = _present(long_tail_dir, triangle)
    assert sum(present) == 8  # exactly round(0.04 x 200) images
    assert sum(present) / len(present) == pytest.approx(0.04, abs=0.005)
    rare_area = _mean_area_when_present(long_tail_dir, triangle)
    other_areas = {name: _mean_area_when_present(long_tail_dir, TOY_CLASSES.index(name)) for name in ("square", "disk")}
    assert 4 <= rare_area < min(other_areas.values()) / 3, (rare_area, other_areas)
    # the other shape classes stay common
    for name in ("square", "disk"):
        assert np.mean(_present(long_tail_dir, TOY_CLASSES.index(name))) > 0.5


def test_long_tail_class_stats_record_what_was_written(long_tail_dir):
    stats = json.loads((long_tail_dir / "class_stats.json").read_text())
    assert (stats["rare_class"], stats["rare_rate"], stats["rare_scale"], stats["num_images"]) == (
        "triangle",
        0.04,
        0.5,
        200,
    )
    masks = np.stack([np.asarray(mask) for _, mask in _read_pairs(long_tail_dir)])
    for class_id, name in enumerate(TOY_CLASSES):
        in_image = (masks == class_id).reshape(len(masks), -1)
        recorded = stats["classes"][name]
        assert recorded["image_share"] == pytest.approx(in_image.any(axis=1).mean(), abs=1e-6)
        assert recorded["pixel_share"] == pytest.approx(in_image.mean(), abs=1e-6)
        present = in_image.any(axis=1)
        assert recorded["pixel_share_when_present"] == pytest.approx(in_image[present].mean(axis=1).mean(), abs=1e-6)
    assert stats["classes"]["triangle"]["image_share"] == 0.04


def test_long_tail_is_deterministic_and_val_keeps_a_minimum(tmp_path, long_tail_dir):
    again = make_toy_dataset(tmp_path / "again", num_images=200, size=32, seed=0, long_tail=LongTail("triangle", 0.04))
    assert _pixel_digest(again) == _pixel_digest(long_tail_dir)
    # 4% of 64 would be 3 images; the val minimum makes it 8, still placed at random
    val = make_toy_dataset(
        tmp_path / "val",
        num_images=64,
        size=32,
        seed=0,
        split="val",
        long_tail=LongTail("triangle", 0.04, min_images=8),
    )
    assert sum(_present(val, TOY_CLASSES.index("triangle"))) == 8
    for bad, message in (
        (LongTail("background"), "background cannot be rare"),
        (LongTail("ring"), "not a shape class of the 4-class"),
        (LongTail("triangle", rate=1.5), "rare rate must be in"),
    ):
        with pytest.raises(ValueError, match=message):
            make_toy_dataset(tmp_path / "bad", num_images=2, long_tail=bad)


def test_default_toy_data_is_unchanged_by_the_long_tail_option(tmp_path):
    """Pixel digests of the toy data as written before the long-tail option existed: other tests and recorded
    benchmark figures rely on these exact datasets."""
    plain = make_toy_dataset(tmp_path / "a", num_images=12, size=32, seed=0)
    assert _pixel_digest(plain) == "66f1c7e17f7d8f2ae1ae7333b6b7961985f133159eeed2aa1e275799aaa7ba24"
    eight = make_toy_dataset(tmp_path / "b", num_images=6, size=40, num_classes=8, seed=1, split="val")
    assert _pixel_digest(eight) == "d118f92b789d45888fc1a94f5cd40e9b61ca2b9bb19e496c17f8977dbacad15a"
    assert sorted(p.name for p in plain.iterdir()) == ["class_names.json", "images", "masks"]  # no class_stats.json


def test_cli_long_tail_writes_both_splits_with_stats(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "segdiff.toy", "--output_dir", str(tmp_path / "toy"), "--num_images", "50",
         "--val_images", "20", "--rare_class", "disk", "--rare_rate", "0.04", "--rare_val_min_images", "5"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "rare class disk: in 4.0% of the images" in result.stdout
    assert "rare class disk: in 25.0% of the images" in result.stdout  # val: at least 5 of 20
    disk = TOY_CLASSES.index("disk")
    for split, count in (("train", 2), ("val", 5)):  # round(0.04 x 50) = 2; val max(round(0.8), 5) = 5
        folder = tmp_path / "toy" / split
        assert sum(_present(folder, disk)) == count
        assert json.loads((folder / "class_stats.json").read_text())["classes"]["disk"]["image_share"] == count / (
            50 if split == "train" else 20
        )
    refused = subprocess.run(
        [sys.executable, "-m", "segdiff.toy", "--output_dir", str(tmp_path / "x"), "--rare_class", "bar"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "rare class 'bar' is not a shape class of the 4-class" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_flat_long_tail_and_themes_are_unchanged_by_the_textured_style(tmp_path):
    """Digests of flat toy data with a long tail and with two themes, as written before the textured style existed
    (the flat and textured samplers now share the shape placement and the long tail's class draws)."""
    rare = make_toy_dataset(tmp_path / "rare", num_images=50, size=32, seed=2, long_tail=LongTail("triangle", 0.1))
    assert _pixel_digest(rare) == "91edf5f18532f5a0d7cf576fedb33dc571e2ede9c028cab792b297dbb3baf129"
    assert hashlib.sha256((rare / "class_stats.json").read_bytes()).hexdigest() == (
        "5a07ff67fe4a0cc56a03e980f0f6d3c3810a7ccc9dc50627baa5163f442c05bc"
    )
    themed = make_toy_dataset(tmp_path / "themes", num_images=8, size=24, seed=4, themes=("plain", "inverted"))
    assert _pixel_digest(themed) == "6e0c9ded6159ed3901fe3906f02f78537d336b14ad3a2a6736bd9c59302bc567"
    assert hashlib.sha256((themed / "themes.json").read_bytes()).hexdigest() == (
        "6250fa9c4039706274b57f701e9a2bb574e290358d78940b52816ed983c0b5cb"
    )
    assert toy_style(rare / "class_names.json") == "flat"
    assert "style" not in json.loads((rare / "class_names.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# The textured style: classes share colours.

TEXTURED_CLASSES = ["background", "striped", "checkered", "square", "triangle"]


@pytest.fixture(scope="module")
def textured_dir(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("textured"), num_images=40, size=32, seed=5, style="textured")


def test_textured_style_writes_five_classes_and_says_so(textured_dir):
    assert toy_classes(style="textured") == (TEXTURED_CLASSES, list(TOY_PALETTE) + [(215, 215, 40)])
    assert json.loads((textured_dir / "class_names.json").read_text()) == {
        "class_names": TEXTURED_CLASSES,
        "palette": [list(colour) for colour in toy_classes(style="textured")[1]],
        "style": "textured",
    }
    assert toy_style(textured_dir / "class_names.json") == "textured"
    stats = json.loads((textured_dir / "class_stats.json").read_text())
    assert (stats["style"], stats["num_images"], list(stats["classes"])) == ("textured", 40, TEXTURED_CLASSES)
    present = set()
    for _, mask in _read_pairs(textured_dir):
        present.update(np.unique(np.asarray(mask)).tolist())
    assert present == set(range(5))


def test_textured_style_is_deterministic(tmp_path, textured_dir):
    again = make_toy_dataset(tmp_path / "again", num_images=40, size=32, seed=5, style="textured")
    for name in ("images/train_00000.png", "masks/train_00000.png", "images/train_00039.png"):
        assert (again / name).read_bytes() == (textured_dir / name).read_bytes()
    assert _pixel_digest(again) == _pixel_digest(textured_dir)
    other = make_toy_dataset(tmp_path / "other", num_images=40, size=32, seed=6, style="textured")
    assert _pixel_digest(other) != _pixel_digest(textured_dir)


def _mean_colours(image: Image.Image, mask: Image.Image) -> dict[int, np.ndarray]:
    pixels, ids = np.asarray(image).astype(float), np.asarray(mask)
    return {int(c): pixels[ids == c].mean(axis=0) for c in np.unique(ids)}


def test_textured_classes_share_their_colour_in_pairs(textured_dir):
    """Within an image, striped and checkered have nearly the same mean colour, and so do square and triangle: their
    base colours are equal, the textures have mean 0, and what differs is each object's tint (+-10 per channel) under
    the image's lighting (x 1.5 at most), plus the noise. Orange and teal differ by 130 in red and 105 in blue, which
    the darkest, flattest lighting (x 0.7 x 0.75) keeps above 50 after tints."""
    pairs_seen = {(1, 2): 0, (3, 4): 0}
    for image, mask in _read_pairs(textured_dir):
        means = _mean_colours(image, mask)
        for first, second in pairs_seen:
            if first in means and second in means:
                pairs_seen[first, second] += 1
                assert np.abs(means[first] - means[second]).max() < 35, (first, second, means)
        for orange, teal in ((1, 3), (2, 4), (1, 4), (2, 3)):
            if orange in means and teal in means:
                assert np.abs(means[orange] - means[teal]).max() > 50, (orange, teal, means)
    assert min(pairs_seen.values()) >= 3  # the checks above did run, on several images each


def test_textured_long_tail_is_rare_and_small(tmp_path):
    folder = make_toy_dataset(
        tmp_path / "rare", num_images=100, size=32, seed=0, style="textured", long_tail=LongTail("triangle", 0.05)
    )
    triangle = TEXTURED_CLASSES.index("triangle")
    assert sum(_present(folder, triangle)) == 5  # exactly round(0.05 x 100)
    stats = json.loads((folder / "class_stats.json").read_text())
    assert (stats["style"], stats["rare_class"], stats["classes"]["triangle"]["image_share"]) == (
        "textured",
        "triangle",
        0.05,
    )
    rare_area = _mean_area_when_present(folder, triangle)
    for name in ("striped", "checkered", "square"):
        class_id = TEXTURED_CLASSES.index(name)
        assert np.mean(_present(folder, class_id)) > 0.4
        assert rare_area < _mean_area_when_present(folder, class_id) / 3, name
    with pytest.raises(ValueError, match="'disk' is not a shape class of the 5-class textured toy dataset"):
        make_toy_dataset(tmp_path / "bad", num_images=2, style="textured", long_tail=LongTail("disk"))


def test_palette_segmenter_refuses_textured_data(textured_dir):
    with pytest.raises(ValueError, match="textured toy dataset: its classes share colours"):
        PaletteSegmenter.from_class_names_json(textured_dir / "class_names.json")


def test_cli_textured_style(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "segdiff.toy", "--output_dir", str(tmp_path / "toy"), "--num_images", "20",
         "--val_images", "10", "--style", "textured", "--rare_class", "triangle", "--rare_rate", "0.1",
         "--rare_val_min_images", "3"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "wrote 20 32x32 textured toy images + masks (5 classes)" in result.stdout
    assert "rare class triangle: in 10.0% of the images" in result.stdout  # train: 2 of 20
    assert "rare class triangle: in 30.0% of the images" in result.stdout  # val: at least 3 of 10
    assert toy_style(tmp_path / "toy" / "val" / "class_names.json") == "textured"
    refused = subprocess.run(
        [sys.executable, "-m", "segdiff.toy", "--output_dir", str(tmp_path / "x"), "--style", "textured",
         "--num_classes", "6"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "the textured toy dataset has 2..5 classes, got 6" in refused.stderr
