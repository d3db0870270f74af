"""Dataset layouts, label-map I/O, error messages, checks and joint transforms (segdiff/data.py).

Every dataset here is a handful of tiny images written into pytest's tmp_path.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segdiff.data import (
    DATASETS,
    DatasetError,
    JointTransform,
    add_dataset_args,
    choose_train_samples,
    dataset_from_args,
    limit_train_samples,
    load_class_names,
    load_segmentation_dataset,
    read_image,
    read_image_size,
    read_label_ids,
    read_label_map,
    save_label_png,
    scan_dataset,
    write_class_names,
)
from segdiff.data import main as data_main
from segdiff.labels import (
    IGNORE_INDEX,
    LOVEDA_CLASSES,
    LOVEDA_PALETTE,
    SIDEWALK_CLASSES,
    SIDEWALK_PALETTE,
    colorize_label,
    default_palette,
)
from segdiff.seeds import derive_seed

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Helpers that write tiny datasets
# ---------------------------------------------------------------------------------------------


def label_map(seed: int, num_classes: int, height: int = 20, width: int = 24, block: int = 4) -> np.ndarray:
    """A blocky random label map (blocks of ``block`` x ``block`` pixels of one class)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, num_classes, (height // block, width // block))
    return np.kron(blocks, np.ones((block, block), dtype=np.int64))


def write_image(path: Path, height: int = 20, width: int = 24, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_mask(path: Path, label: np.ndarray, mode: str = "L") -> None:
    """Save ids as a single-channel mask; mode "P" attaches a palette whose colours are unlike the ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(label.astype(np.uint8))
    if mode == "P":
        mask.putpalette([200, 10, 30] + [v for i in range(1, 256) for v in (i * 7 % 256, 255 - i, i)])
    mask.save(path)


def make_generic(root: Path, stems=("a", "b", "c"), image_ext=".png", mask_ext=".png", mask_mode="L", num_classes=4):
    labels = {}
    for i, stem in enumerate(stems):
        labels[stem] = label_map(i, num_classes)
        write_image(root / "images" / f"{stem}{image_ext}", seed=i)
        write_mask(root / "masks" / f"{stem}{mask_ext}", labels[stem], mask_mode)
    return labels


def make_loveda(root: Path, split="Train", scenes=("Urban", "Rural"), nested=False, per_scene=2):
    """LoveDA-style files: raw mask ids 0 (no-data) and 1..7. Returns {stem: raw mask}."""
    split_folder = root / split / split if nested else root / split
    raws, start = {}, {"Train": 0, "Val": 100}[split]
    for scene_index, scene in enumerate(scenes):
        for k in range(per_scene):
            stem = str(start + 10 * scene_index + k)
            raws[stem] = label_map(int(stem), 8)
            write_image(split_folder / scene / "images_png" / f"{stem}.png", seed=int(stem))
            write_mask(split_folder / scene / "masks_png" / f"{stem}.png", raws[stem])
    return raws


def make_sidewalk(root: Path, stems=("s0", "s1", "s2", "s3"), info=None):
    for i, stem in enumerate(stems):
        write_image(root / "images" / f"{stem}.png", seed=i)
        write_mask(root / "labels" / f"{stem}.png", label_map(i, 35))
    if info is not None:
        (root / "dataset_info.json").write_text(json.dumps(info))


def mode_of(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------
# generic layout
# ---------------------------------------------------------------------------------------------


def test_generic_png_images_with_grey_masks(tmp_path):
    labels = make_generic(tmp_path, num_classes=4)
    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=4)

    assert len(dataset) == 3 and dataset.num_classes == 4 and dataset.layout == "generic"
    assert dataset.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert dataset.palette == default_palette(4)
    item = dataset[1]
    assert item["name"] == "b"
    assert item["image"].mode == "RGB" and item["image"].size == (24, 20)
    assert item["label"].dtype == np.int64 and item["label"].shape == (20, 24)
    np.testing.assert_array_equal(item["label"], labels["b"])


def test_generic_jpg_images_with_paletted_masks_keep_the_palette_index(tmp_path):
    labels = make_generic(tmp_path, image_ext=".jpg", mask_mode="P", num_classes=6)
    assert mode_of(tmp_path / "masks" / "a.png") == "P"
    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=6)

    for item in dataset:
        np.testing.assert_array_equal(item["label"], labels[item["name"]])


def test_generic_pairs_mixed_extensions_by_stem(tmp_path):
    files = {"a": (".png", ".tif"), "b": (".JPG", ".bmp"), "c": (".webp", ".PNG"), "d": (".jpeg", ".tiff")}
    for i, (stem, (image_ext, mask_ext)) in enumerate(files.items()):
        write_image(tmp_path / "images" / f"{stem}{image_ext}", seed=i)
        write_mask(tmp_path / "masks" / f"{stem}{mask_ext}", label_map(i, 3))
    (tmp_path / "images" / "notes.txt").write_text("not an image")  # ignored

    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=3)

    assert [(image.name, mask.name) for image, mask in dataset.pairs] == [
        ("a.png", "a.tif"),
        ("b.JPG", "b.bmp"),
        ("c.webp", "c.PNG"),
        ("d.jpeg", "d.tiff"),
    ]
    np.testing.assert_array_equal(dataset[3]["label"], label_map(3, 3))


@pytest.mark.parametrize("form", ["list", "dict"])
def test_generic_reads_class_names_json_from_the_root(tmp_path, form):
    make_generic(tmp_path, num_classes=3)
    names, palette = ["sea", "land", "cloud"], [[0, 0, 255], [0, 255, 0], [250, 250, 250]]
    content = names if form == "list" else {"class_names": names, "palette": palette}
    (tmp_path / "class_names.json").write_text(json.dumps(content))

    dataset = load_segmentation_dataset(tmp_path, "generic")

    assert dataset.class_names == names
    expected_palette = default_palette(3) if form == "list" else [tuple(c) for c in palette]
    assert dataset.palette == expected_palette


def test_class_names_json_argument_overrides_the_layout(tmp_path):
    make_generic(tmp_path / "data", num_classes=3)
    (tmp_path / "data" / "class_names.json").write_text(json.dumps(["x", "y", "z"]))
    override = tmp_path / "names.json"
    write_class_names(override, ["sea", "land", "cloud"], [(1, 2, 3), (4, 5, 6), (7, 8, 9)])

    dataset = load_segmentation_dataset(tmp_path / "data", "generic", class_names_json=override)

    assert dataset.class_names == ["sea", "land", "cloud"]
    assert dataset.palette == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]


def test_class_names_files_round_trip_in_every_form(tmp_path):
    path = tmp_path / "class_names.json"
    write_class_names(path, ["a", "b"], [(1, 2, 3), (4, 5, 6)])
    assert json.loads(path.read_text()) == {"class_names": ["a", "b"], "palette": [[1, 2, 3], [4, 5, 6]]}
    assert load_class_names(path) == (["a", "b"], [(1, 2, 3), (4, 5, 6)])
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away

    path.write_text(json.dumps(["a", "b"]))
    assert load_class_names(path) == (["a", "b"], None)
    path.write_text(json.dumps({"1": "b", "0": "a"}))  # an id2label file
    assert load_class_names(path) == (["a", "b"], None)

    path.write_text("{broken")
    with pytest.raises(DatasetError, match="cannot parse"):
        load_class_names(path)
    path.write_text(json.dumps({"class_names": ["a", "b"], "palette": [[1, 2, 3]]}))
    with pytest.raises(DatasetError, match="1 colours for 2 classes"):
        load_class_names(path)


def test_num_classes_must_match_the_class_names(tmp_path):
    make_generic(tmp_path, num_classes=3)
    (tmp_path / "class_names.json").write_text(json.dumps(["sea", "land", "cloud"]))
    with pytest.raises(
        DatasetError, match=r"--num_classes 5 disagrees with the 3 class names from .*class_names\.json"
    ):
        load_segmentation_dataset(tmp_path, "generic", num_classes=5)


def test_generic_without_class_names_asks_for_them(tmp_path):
    make_generic(tmp_path)
    with pytest.raises(DatasetError, match=r"no class_names\.json\. Fix: pass --num_classes N .*--class_names_json"):
        load_segmentation_dataset(tmp_path, "generic")


def test_ignore_index_may_not_be_a_class_id(tmp_path):
    make_generic(tmp_path, num_classes=4)
    with pytest.raises(DatasetError, match="--ignore_index 0 is also a class id"):
        load_segmentation_dataset(tmp_path, "generic", num_classes=4, ignore_index=0)


def test_label_offset_reads_masks_whose_zero_is_unlabelled(tmp_path, capsys):
    """Masks storing 0 for unlabelled pixels and the 3 classes as 1..3: read as class ids they hold a 4th class, and
    the error names --label_offset; with --label_offset 1 file id i is class i - 1 and 0 is ignore_index, for the
    trainers' options and for python -m segdiff.data check alike."""
    raws = make_generic(tmp_path, num_classes=4)
    (tmp_path / "class_names.json").write_text(json.dumps(["sea", "land", "cloud"]))
    parser = add_dataset_args(argparse.ArgumentParser())
    as_ids = dataset_from_args(parser.parse_args(["--data_root", str(tmp_path)]))
    with pytest.raises(DatasetError, match=r"holds class ids 3, .*--label_offset 1 if the files count the classes"):
        as_ids[0]
    dataset = dataset_from_args(parser.parse_args(["--data_root", str(tmp_path), "--label_offset", "1"]))
    assert dataset.label_offset == 1
    for item in dataset:
        raw = raws[item["name"]]
        assert (raw == 0).any() and (raw == 3).any()
        np.testing.assert_array_equal(item["label"], np.where(raw == 0, IGNORE_INDEX, raw - 1))
    assert data_main(["check", "--data_root", str(tmp_path), "--label_offset", "1"]) == 0
    assert "pairs: 3   classes: 3" in capsys.readouterr().out
    assert data_main(["check", "--data_root", str(tmp_path)]) == 1
    # LoveDA's files count from 1 by default; an explicit --label_offset replaces the layout's own.
    make_loveda(tmp_path / "loveda", scenes=("Urban",), per_scene=1)
    assert load_segmentation_dataset(tmp_path / "loveda", "loveda").label_offset == 1
    assert load_segmentation_dataset(tmp_path / "loveda", "loveda", label_offset=0).label_offset == 0


# ---------------------------------------------------------------------------------------------
# loveda layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["Train-Urban", "Train-Train-Urban"])
@pytest.mark.parametrize("point_at", ["dataset_root", "split_folder"])
def test_loveda_nestings_and_roots(tmp_path, nested, point_at):
    raws = make_loveda(tmp_path, nested=nested)
    data_root = tmp_path if point_at == "dataset_root" else tmp_path / "Train"

    dataset = load_segmentation_dataset(data_root, "loveda")

    assert dataset.layout == "loveda" and dataset.split == "train"
    assert sorted(image.stem for image, _ in dataset.pairs) == sorted(raws)
    assert {mask.parent.parent.name for _, mask in dataset.pairs} == {"Urban", "Rural"}
    # each item says its scene (the domain a layout model or a ControlNet prompt can be conditioned on)
    assert dataset.domains == ("Urban", "Rural")
    assert [dataset[i]["domain"] for i in range(len(dataset))] == [m.parent.parent.name for _, m in dataset.pairs]
    assert dataset.class_names == LOVEDA_CLASSES and dataset.palette == LOVEDA_PALETTE


def test_loveda_shifts_ids_and_makes_no_data_ignore(tmp_path):
    make_loveda(tmp_path, scenes=("Urban",), per_scene=1)
    raw = np.zeros((20, 24), dtype=np.int64)
    raw[:, 8:16], raw[:, 16:] = 3, 7
    write_mask(tmp_path / "Train" / "Urban" / "masks_png" / "0.png", raw)

    label = load_segmentation_dataset(tmp_path, "loveda", loveda_scenes=["Urban"])[0]["label"]

    assert (label[:, :8] == 255).all()  # raw 0 = no-data
    assert (label[:, 8:16] == 2).all()  # raw 3 = class 2 ("road")
    assert (label[:, 16:] == 6).all()  # raw 7 = class 6 ("agriculture")


def test_loveda_scene_selection_and_val_split(tmp_path):
    make_loveda(tmp_path, split="Train", scenes=("Urban", "Rural"))
    val_raws = make_loveda(tmp_path, split="Val", scenes=("Urban", "Rural"), nested=True)

    urban = load_segmentation_dataset(tmp_path, "loveda", loveda_scenes=["Urban"])
    val = load_segmentation_dataset(tmp_path, "loveda", split="VAL")

    assert {mask.parent.parent.name for _, mask in urban.pairs} == {"Urban"} and len(urban) == 2
    assert val.split == "val" and sorted(image.stem for image, _ in val.pairs) == ["100", "101", "110", "111"]
    for item in val:
        raw = val_raws[item["name"]]
        np.testing.assert_array_equal(item["label"], np.where(raw == 0, 255, raw - 1))


def test_loveda_with_only_one_scene_on_disk_uses_it(tmp_path):
    make_loveda(tmp_path, scenes=("Rural",))
    assert len(load_segmentation_dataset(tmp_path, "loveda")) == 2  # default scenes: Urban and Rural
    with pytest.raises(DatasetError, match="none of the scenes Urban is under .*Fix: pass --loveda_scenes"):
        load_segmentation_dataset(tmp_path, "loveda", loveda_scenes=["Urban"])


def test_loveda_folder_of_the_other_split_is_refused(tmp_path):
    make_loveda(tmp_path, split="Train")
    with pytest.raises(DatasetError, match=r"is the LoveDA Train split, but the Val split was asked for"):
        load_segmentation_dataset(tmp_path / "Train", "loveda", split="val")


def test_loveda_without_the_split_folder_says_what_it_expects(tmp_path):
    make_loveda(tmp_path, split="Train")
    with pytest.raises(DatasetError, match=r"found no LoveDA Val split under .*expects Val/Urban/ and/or Val/Rural/"):
        load_segmentation_dataset(tmp_path, "loveda", split="val")


# ---------------------------------------------------------------------------------------------
# sidewalk layout
# ---------------------------------------------------------------------------------------------


def test_sidewalk_splits_from_dataset_info(tmp_path):
    info = {
        "class_names": SIDEWALK_CLASSES,
        "palette": [list(c) for c in SIDEWALK_PALETTE],
        "splits": {"train": ["s0", "s2", "s3"], "val": ["s1"]},
    }
    make_sidewalk(tmp_path, info=info)

    train = load_segmentation_dataset(tmp_path, "sidewalk", split="train")
    val = load_segmentation_dataset(tmp_path, "sidewalk", split="val")

    assert [image.stem for image, _ in train.pairs] == ["s0", "s2", "s3"]
    assert [image.stem for image, _ in val.pairs] == ["s1"]
    assert val.num_classes == 35 and val.palette == SIDEWALK_PALETTE
    label = val[0]["label"]
    np.testing.assert_array_equal(label, label_map(1, 35))
    assert 0 in label  # "unlabeled" is a class like any other, not ignore


def test_sidewalk_without_splits_is_all_train_and_has_no_val(tmp_path):
    make_sidewalk(tmp_path, info={"class_names": SIDEWALK_CLASSES})
    assert len(load_segmentation_dataset(tmp_path, "sidewalk")) == 4
    with pytest.raises(DatasetError, match=r"dataset_info\.json defines no splits, so there is no 'val' split"):
        load_segmentation_dataset(tmp_path, "sidewalk", split="val")


def test_sidewalk_defaults_to_its_own_class_list(tmp_path):
    make_sidewalk(tmp_path, info={"splits": {"train": ["s0.png", "s1"], "val": ["s2"]}})
    dataset = load_segmentation_dataset(tmp_path, "sidewalk")
    assert dataset.class_names == SIDEWALK_CLASSES and dataset.palette == SIDEWALK_PALETTE
    assert [image.stem for image, _ in dataset.pairs] == ["s0", "s1"]


# ---------------------------------------------------------------------------------------------
# Label maps and images on disk
# ---------------------------------------------------------------------------------------------


def test_read_label_map_accepts_every_single_channel_mode(tmp_path):
    ids = label_map(0, 6)
    Image.fromarray(ids.astype(np.uint8)).save(tmp_path / "l.png")
    write_mask(tmp_path / "p.png", ids, mode="P")
    Image.fromarray((ids * 1000).astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(ids.astype(np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(ids > 2).save(tmp_path / "bits.png")
    Image.fromarray(np.repeat(ids.astype(np.uint8)[..., None], 3, axis=2)).save(tmp_path / "grey_rgb.png")

    assert mode_of(tmp_path / "bits.png") == "1"
    for name, expected in [
        ("l.png", ids),
        ("p.png", ids),
        ("i16.png", ids * 1000),
        ("i32.tif", ids),
        ("bits.png", (ids > 2).astype(np.int64)),
        ("grey_rgb.png", ids),
    ]:
        label = read_label_map(tmp_path / name)
        assert label.dtype == np.int64 and label.ndim == 2, name
        np.testing.assert_array_equal(label, expected, err_msg=name)
        # What the check reads: the distinct ids and their pixel counts, counted on the stored integers.
        ids, counts, size = read_label_ids(tmp_path / name)
        expected_ids, expected_counts = np.unique(expected, return_counts=True)
        assert ids.dtype == np.int64 and size == (expected.shape[1], expected.shape[0]), name
        np.testing.assert_array_equal(ids, expected_ids, err_msg=name)
        np.testing.assert_array_equal(counts, expected_counts, err_msg=name)


def test_colour_mask_is_refused_with_the_fix(tmp_path):
    colours = np.array(LOVEDA_PALETTE, dtype=np.uint8)[label_map(0, 7)]
    Image.fromarray(colours).save(tmp_path / "colour.png")
    with pytest.raises(DatasetError, match=r"colour\.png is a colour \(RGB\) mask, not a label map.*palette"):
        read_label_map(tmp_path / "colour.png")


@pytest.mark.parametrize("reader", [read_image, read_image_size, read_label_map, read_label_ids])
def test_truncated_or_garbage_files_name_themselves(tmp_path, reader):
    write_image(tmp_path / "half.png", 40, 40)
    truncate(tmp_path / "half.png")
    write_image(tmp_path / "half.jpg", 40, 40)
    truncate(tmp_path / "half.jpg")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")

    for name in ("half.png", "half.jpg", "junk.png"):
        with pytest.raises(DatasetError, match=rf"cannot read (image|mask) .*{name} .*re-export or re-download"):
            reader(tmp_path / name)


def test_save_label_png_round_trips_with_the_palette(tmp_path):
    label = label_map(0, 7)
    label[0, :5] = 255
    save_label_png(label, tmp_path / "mask.png", LOVEDA_PALETTE)

    with Image.open(tmp_path / "mask.png") as mask:
        assert mask.mode == "P"
        assert mask.getpalette()[:21] == [v for colour in LOVEDA_PALETTE for v in colour]
    np.testing.assert_array_equal(read_label_map(tmp_path / "mask.png"), label)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind

    save_label_png(label, tmp_path / "plain.png")
    assert mode_of(tmp_path / "plain.png") == "L"
    np.testing.assert_array_equal(read_label_map(tmp_path / "plain.png"), label)


def test_colorize_label_paints_classes_and_blacks_out_ignore():
    label = np.array([[0, 1, 255], [2, 9, 1]])
    rgb = np.asarray(colorize_label(label, [(10, 20, 30), (40, 50, 60), (70, 80, 90)]))
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], [[10, 20, 30], [40, 50, 60], [0, 0, 0]])
    np.testing.assert_array_equal(rgb[1], [[70, 80, 90], [0, 0, 0], [40, 50, 60]])  # 9 is unknown: black
    rgb = np.asarray(colorize_label(np.array([[-1, 0]]), [(1, 1, 1)], ignore_index=-1))
    np.testing.assert_array_equal(rgb[0], [[0, 0, 0], [1, 1, 1]])


# ---------------------------------------------------------------------------------------------
# Bad input: every message names the file or folder and the fix
# ---------------------------------------------------------------------------------------------


def test_missing_data_root_and_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match=r"--data_root .*nowhere does not exist"):
        load_segmentation_dataset(tmp_path / "nowhere", "generic", num_classes=2)
    with pytest.raises(
        DatasetError, match=r"unknown --dataset 'cityscapes'. Fix: use one of loveda, generic, sidewalk"
    ):
        load_segmentation_dataset(tmp_path, "cityscapes")


@pytest.mark.parametrize(
    ("layout", "expected"),
    [("generic", "images/ and masks/"), ("sidewalk", "images/ and labels/")],
)
def test_missing_subfolders_say_what_the_layout_expects(tmp_path, layout, expected):
    (tmp_path / "images").mkdir()
    (tmp_path / "other").mkdir()
    with pytest.raises(
        DatasetError, match=rf"expected {expected} under .* for --dataset {layout} \(found images/, other/\)"
    ):
        load_segmentation_dataset(tmp_path, layout, num_classes=2)


def test_loveda_scene_without_masks_png(tmp_path):
    write_image(tmp_path / "Train" / "Urban" / "images_png" / "0.png")
    with pytest.raises(DatasetError, match=r"expected images_png/ and masks_png/ under .*Urban for --dataset loveda"):
        load_segmentation_dataset(tmp_path, "loveda")


def test_empty_folders_hold_no_pairs(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"no image/mask pairs: .*images and .*masks hold no \.png"):
        load_segmentation_dataset(tmp_path, "generic", num_classes=2)


def test_unpaired_files_are_counted_and_named(tmp_path):
    make_generic(tmp_path, stems=("a", "b"))
    for stem in ("only_image_1", "only_image_2"):
        write_image(tmp_path / "images" / f"{stem}.jpg")
    write_mask(tmp_path / "masks" / "only_mask.png", label_map(0, 2))

    with pytest.raises(DatasetError) as raised:
        load_segmentation_dataset(tmp_path, "generic", num_classes=4)

    message = str(raised.value)
    assert "2 image(s) in" in message and "have no mask (only_image_1, only_image_2)" in message
    assert "1 mask(s) in" in message and "have no image (only_mask)" in message
    assert "paired by file name without extension" in message


def test_many_unpaired_files_name_only_five(tmp_path):
    make_generic(tmp_path, stems=("a",))
    for i in range(7):
        write_image(tmp_path / "images" / f"lonely{i}.png")
    with pytest.raises(
        DatasetError, match=r"7 image\(s\) in .* \(lonely0, lonely1, lonely2, lonely3, lonely4, \.\.\.\)"
    ):
        load_segmentation_dataset(tmp_path, "generic", num_classes=4)


def test_two_files_with_one_stem_are_ambiguous(tmp_path):
    make_generic(tmp_path, stems=("a",))
    write_image(tmp_path / "images" / "a.jpg")
    with pytest.raises(DatasetError, match=r"a\.jpg and a\.png in .*images share the stem 'a'"):
        load_segmentation_dataset(tmp_path, "generic", num_classes=4)


def test_empty_splits(tmp_path):
    make_loveda(tmp_path, split="Train")
    (tmp_path / "Val" / "Urban" / "images_png").mkdir(parents=True)
    (tmp_path / "Val" / "Urban" / "masks_png").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"the LoveDA Val split at .*Val is empty"):
        load_segmentation_dataset(tmp_path, "loveda", split="val")

    make_sidewalk(tmp_path / "sw", info={"splits": {"train": ["s0"], "val": []}})
    with pytest.raises(DatasetError, match=r"the 'val' split in .*dataset_info\.json is empty"):
        load_segmentation_dataset(tmp_path / "sw", "sidewalk", split="val")
    with pytest.raises(DatasetError, match=r"has no 'test' split \(it has train, val\)"):
        load_segmentation_dataset(tmp_path / "sw", "sidewalk", split="test")


def test_truncated_file_in_a_dataset_is_named_on_access(tmp_path):
    make_generic(tmp_path)
    truncate(tmp_path / "masks" / "b.png")
    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=4)
    assert dataset[0]["name"] == "a"
    with pytest.raises(DatasetError, match=r"cannot read mask .*masks/b\.png"):
        dataset[1]


def test_class_id_out_of_range_names_file_ids_and_fix(tmp_path):
    labels = make_generic(tmp_path, num_classes=4)
    labels["c"][0, 0], labels["c"][1, 1] = 9, 4
    write_mask(tmp_path / "masks" / "c.png", labels["c"])
    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=4)

    with pytest.raises(DatasetError) as raised:
        dataset[2]

    message = str(raised.value)
    assert "masks/c.png holds class ids 4, 9, but there are 4 classes (0..3) and ignore_index is 255" in message
    assert "--num_classes" in message and "class_names.json" in message and "--ignore_index" in message


def test_ignore_index_is_not_out_of_range(tmp_path):
    labels = make_generic(tmp_path, num_classes=4)
    labels["a"][:4] = 255
    write_mask(tmp_path / "masks" / "a.png", labels["a"])
    label = load_segmentation_dataset(tmp_path, "generic", num_classes=4)[0]["label"]
    assert (label[:4] == 255).all()


def test_colour_mask_in_a_dataset(tmp_path):
    make_generic(tmp_path)
    Image.fromarray(np.array(default_palette(4), dtype=np.uint8)[label_map(0, 4)]).save(tmp_path / "masks" / "a.png")
    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=4)
    with pytest.raises(DatasetError, match=r"masks/a\.png is a colour \(RGB\) mask, not a label map"):
        dataset[0]


def test_image_and_mask_sizes_must_match(tmp_path):
    make_generic(tmp_path)
    write_image(tmp_path / "images" / "a.png", height=16, width=16)
    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=4)
    with pytest.raises(DatasetError, match=r"image .*images/a\.png is 16x16 but its mask .*masks/a\.png is 24x20"):
        dataset[0]


# ---------------------------------------------------------------------------------------------
# scan_dataset and the command line
# ---------------------------------------------------------------------------------------------


def make_broken_generic(root: Path) -> None:
    """Five pairs, four of them broken in different ways."""
    labels = make_generic(root, stems=("a", "b", "c", "d", "e"), num_classes=4)
    truncate(root / "images" / "a.png")
    write_image(root / "images" / "b.png", height=8, width=8)
    colours = np.array(default_palette(4), dtype=np.uint8)[labels["c"]]
    Image.fromarray(colours).save(root / "masks" / "c.png")
    labels["d"][0, 0] = 7
    write_mask(root / "masks" / "d.png", labels["d"])


def test_scan_dataset_reports_every_problem(tmp_path):
    make_broken_generic(tmp_path)
    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=4)

    problems = scan_dataset(dataset).problems

    assert len(problems) == 4
    assert "cannot read image" in problems[0] and "a.png" in problems[0]
    assert "is 8x8 but its mask" in problems[1]
    assert "c.png is a colour (RGB) mask" in problems[2]
    assert "d.png holds class ids 7" in problems[3]
    assert scan_dataset(load_segmentation_dataset(tmp_path, "generic", num_classes=8)).problems == problems[:3]


def start_cli(*args) -> subprocess.Popen:
    command = [sys.executable, "-m", "segdiff.data", "check", *map(str, args)]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_check_good_and_bad_datasets(tmp_path):
    make_generic(tmp_path / "good", num_classes=4)
    make_broken_generic(tmp_path / "bad")

    # Both at once: most of each run is importing torch.
    good = start_cli("--data_root", tmp_path / "good", "--dataset", "generic", "--num_classes", "4")
    bad = start_cli("--data_root", tmp_path / "bad", "--dataset", "generic", "--num_classes", "4", "--split", "train")
    good_out, good_err = good.communicate(timeout=120)
    bad_out, _ = bad.communicate(timeout=120)

    assert good.returncode == 0, good_err
    assert "layout: generic   split: train   pairs: 3   classes: 4" in good_out
    assert "class_0" in good_out and "%" in good_out and "no problems found" in good_out
    assert bad.returncode == 1
    assert "4 problem(s):" in bad_out
    for fragment in ("cannot read image", "is 8x8 but its mask", "colour (RGB) mask", "holds class ids 7"):
        assert fragment in bad_out


def test_check_reports_unpaired_files_together_with_the_problems_of_the_pairs(tmp_path, capsys):
    make_broken_generic(tmp_path)
    write_image(tmp_path / "images" / "lonely_image.png")
    write_mask(tmp_path / "masks" / "lonely_mask.png", label_map(0, 4))

    assert data_main(["check", "--data_root", str(tmp_path), "--dataset", "generic", "--num_classes", "4"]) == 1

    out = capsys.readouterr().out
    assert "pairs: 5" in out and "5 problem(s):" in out  # the unpaired files are one problem
    assert "1 image(s) in" in out and "have no mask (lonely_image)" in out
    assert "1 mask(s) in" in out and "have no image (lonely_mask)" in out
    for fragment in ("cannot read image", "is 8x8 but its mask", "colour (RGB) mask", "holds class ids 7"):
        assert fragment in out
    # Loading for training still refuses the unpaired files outright.
    with pytest.raises(DatasetError, match="have no mask"):
        load_segmentation_dataset(tmp_path, "generic", num_classes=4)


def test_check_goes_on_past_a_broken_loveda_scene(tmp_path, capsys):
    make_loveda(tmp_path, split="Train")
    shutil.rmtree(tmp_path / "Train" / "Rural" / "masks_png")
    truncate(tmp_path / "Train" / "Urban" / "masks_png" / "0.png")

    assert data_main(["check", "--data_root", str(tmp_path), "--dataset", "loveda"]) == 1

    out = capsys.readouterr().out
    assert "2 problem(s):" in out and "pairs: 2" in out
    assert "expected images_png/ and masks_png/ under" in out and "Rural" in out
    assert "cannot read" in out and "0.png" in out


def test_cli_check_reports_a_dataset_that_does_not_load(tmp_path, capsys):
    assert data_main(["check", "--data_root", str(tmp_path / "nowhere"), "--dataset", "loveda"]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err


def test_dataset_args_reach_the_loader(tmp_path):
    make_loveda(tmp_path, split="Val", scenes=("Urban",))
    parser = add_dataset_args(argparse.ArgumentParser(), default_dataset="loveda")
    help_text = parser.format_help()
    for option in ("--data_root", "--class_names_json", "--num_classes", "--ignore_index", "--loveda_scenes"):
        assert option in help_text
    assert "images_png/" in help_text and "dataset_info.json" in help_text
    assert all(layout in help_text for layout in DATASETS)

    args = parser.parse_args(["--data_root", str(tmp_path), "--split", "val", "--loveda_scenes", "Urban"])
    assert args.dataset == "loveda" and args.ignore_index == 255
    dataset = dataset_from_args(args)
    assert dataset.split == "val" and len(dataset) == 2
    args.split = "train"
    with pytest.raises(DatasetError, match="found no LoveDA Train split"):
        dataset_from_args(args)


# ---------------------------------------------------------------------------------------------
# --max_train_samples: which pairs a run trains on
# ---------------------------------------------------------------------------------------------


def test_max_train_samples_keeps_the_pairs_whose_name_hashes_come_first_whatever_the_listing():
    names = [f"tile_{index:03d}" for index in range(50)]
    by_hash = sorted(names, key=lambda name: derive_seed("max_train_samples", name))
    five = choose_train_samples(names, 5)
    assert [names[index] for index in five] == sorted(by_hash[:5])  # in dataset order
    listed_backwards = names[::-1]
    assert sorted(listed_backwards[index] for index in choose_train_samples(listed_backwards, 5)) == sorted(by_hash[:5])
    assert set(five) < set(choose_train_samples(names, 20))  # a smaller N: a subset of a larger N's pairs
    assert choose_train_samples(names, 50) == choose_train_samples(names, 1000) == list(range(50))  # N >= all: all
    assert choose_train_samples(names, None) == list(range(50))
    for refused in (0, -3):
        with pytest.raises(DatasetError, match="--max_train_samples must be at least 1"):
            choose_train_samples(names, refused)


def test_limit_train_samples_cuts_a_dataset_to_the_chosen_pairs(tmp_path):
    make_generic(tmp_path, stems=("a", "b", "c", "d", "e", "f"))
    dataset = load_segmentation_dataset(tmp_path, "generic", num_classes=4)
    limited = limit_train_samples(dataset, 4)
    chosen = choose_train_samples(dataset.sample_names(), 4)
    assert limited.pairs == [dataset.pairs[index] for index in chosen]
    assert limited.sample_names() == [dataset[index]["name"] for index in chosen]
    assert (limited.class_names, limited.palette, limited.layout) == (
        dataset.class_names,
        dataset.palette,
        dataset.layout,
    )
    assert limit_train_samples(dataset, 6) is dataset and limit_train_samples(dataset, None) is dataset


# ---------------------------------------------------------------------------------------------
# Joint transforms
# ---------------------------------------------------------------------------------------------

# Four classes in colours far apart, none of them black (the image padding colour).
CLASS_COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)], dtype=np.float32)


def coloured_pair(height=40, width=56, block=8):
    """An image whose colour at every pixel says the class of the label there."""
    label = label_map(3, len(CLASS_COLOURS), height, width, block)
    return Image.fromarray(CLASS_COLOURS[label].astype(np.uint8)), label


def interior(label: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)x(2r+1) neighbourhood is all one class: there, resampling cannot blend classes."""
    padded = np.pad(label, radius, constant_values=-1)  # the border has unseen neighbours: never interior
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
    return (windows == label[..., None, None]).all(axis=(-1, -2))


def nearest_class(pixel_values: torch.Tensor) -> np.ndarray:
    rgb = ((pixel_values.permute(1, 2, 0).numpy() + 1) * 127.5)[..., None, :]
    return np.argmin(((rgb - CLASS_COLOURS) ** 2).sum(-1), axis=-1)


def test_joint_transform_keeps_image_and_label_aligned():
    image, label = coloured_pair()
    transform = JointTransform(32, affine=True, random_flip=True, degrees=20.0, translate=0.15)

    outputs = []
    for seed in range(20):
        torch.manual_seed(seed)
        pixel_values, out_label = transform(image, label)
        assert pixel_values.shape == (3, 32, 32) and pixel_values.dtype == torch.float32
        assert out_label.shape == (32, 32) and out_label.dtype == torch.int64
        assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
        out_label = out_label.numpy()
        checked = interior(out_label) & (out_label != 255)
        assert checked.sum() > 100, f"seed {seed}: too few pixels to check"
        np.testing.assert_array_equal(nearest_class(pixel_values)[checked], out_label[checked], err_msg=f"seed {seed}")
        outputs.append(out_label)
    # The seeds really gave different geometry (otherwise alignment would be trivially true).
    assert len({o.tobytes() for o in outputs}) == 20


def test_joint_transform_is_reproducible_from_the_global_seed():
    image, label = coloured_pair()
    transform = JointTransform(32, affine=True)
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        results.append(transform(image, label))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_affine_padding_is_ignore_in_the_label_and_black_in_the_image():
    image, label = coloured_pair(32, 32, 4)
    transform = JointTransform(
        32,
        center_crop=True,
        random_flip=False,
        affine=True,
        degrees=(45, 45),
        translate=0.0,
        scale=(1.0, 1.0),
    )

    torch.manual_seed(0)
    pixel_values, out_label = transform(image, label)

    assert set(out_label.unique().tolist()) <= {0, 1, 2, 3, 255}
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert out_label[corner] == 255
        assert (pixel_values[(slice(None), *corner)] == -1).all()
    assert (out_label[12:20, 12:20] != 255).all()  # the middle stays labelled


def test_resize_covers_the_resolution_and_keeps_label_values():
    image, label = coloured_pair(40, 56, 8)
    torch.manual_seed(0)
    pixel_values, out_label = JointTransform((16, 24), center_crop=True, random_flip=False)(image, label)
    assert pixel_values.shape == (3, 16, 24) and out_label.shape == (16, 24)
    assert set(out_label.unique().tolist()) <= set(np.unique(label).tolist())
    np.testing.assert_array_equal(
        nearest_class(pixel_values)[interior(out_label.numpy(), 1)],
        out_label.numpy()[interior(out_label.numpy(), 1)],
    )
