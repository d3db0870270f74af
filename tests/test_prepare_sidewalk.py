"""prepare_sidewalk.py on a tiny fake copy of segments/sidewalk-semantic, built offline.

The fake has 6 rows of 20x30 (height x width) RGB images and label maps with ids in 0..34, stored like
the hub repo (data/train-*.parquet + id2label.json) and as a save_to_disk folder. The script runs as a
user would run it, in a subprocess, offline, at --resolution 16.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segdiff.data import load_segmentation_dataset
from segdiff.labels import SIDEWALK_CLASSES, SIDEWALK_PALETTE

ROOT = Path(__file__).resolve().parents[1]
NUM_ROWS, HEIGHT, WIDTH, RESOLUTION = 6, 20, 30, 16
STEMS = [f"{i:06d}" for i in range(NUM_ROWS)]

# Row 0 is three vertical stripes, 10 columns each, of ids 1, 2 and 3. --aspect crop scales the short
# side 20 -> 16 (so 30 -> 24: 8 columns per stripe) and keeps the centre 16 columns, 4..19.
STRIPES = np.repeat(np.array([1, 2, 3], dtype=np.uint8), 10)[None, :].repeat(HEIGHT, axis=0)
STRIPES_CROPPED = np.repeat(np.array([1, 2, 3], dtype=np.uint8), [4, 8, 4])[None, :].repeat(RESOLUTION, axis=0)
# --aspect pad scales the long side 30 -> 16 (so 20 -> 11) and centres it: rows 2..12 hold data.
PAD_DATA_ROWS = slice(2, 13)


def fake_labels() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    labels = [STRIPES]
    for _ in range(NUM_ROWS - 1):
        blocks = rng.integers(0, len(SIDEWALK_CLASSES), (HEIGHT // 5, WIDTH // 5), dtype=np.uint8)
        labels.append(np.kron(blocks, np.ones((5, 5), dtype=np.uint8)))
    return labels


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The fake dataset as a hub-repo clone (parquet) and as a save_to_disk folder; also its label arrays."""
    import datasets

    root = tmp_path_factory.mktemp("sidewalk_source")
    rng = np.random.default_rng(1)
    labels = fake_labels()
    images = [Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)) for _ in labels]
    label_images = [Image.fromarray(label) for label in labels]
    # The last label is paletted, with colours unlike its ids: the ids are the palette indices.
    label_images[-1].putpalette([255 - v for v in range(256)] * 3)
    features = datasets.Features({"pixel_values": datasets.Image(), "label": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"pixel_values": images, "label": label_images}, features=features)

    hub = root / "sidewalk-semantic"
    (hub / "data").mkdir(parents=True)
    dataset.to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    (hub / "id2label.json").write_text(json.dumps({str(i): name for i, name in enumerate(SIDEWALK_CLASSES)}))
    dataset.save_to_disk(str(root / "saved"))
    return {"hub": hub, "saved": root / "saved", "labels": labels, "cache": root / "hf_cache"}


def run_prepare(source, *args, env_extra=None):
    """Run the script offline in the repo root; returns the CompletedProcess (stdout and stderr joined)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(source["cache"]),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        **(env_extra or {}),
    }
    return subprocess.run(
        [sys.executable, "prepare_sidewalk.py", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )


def prepare_ok(source, *args):
    result = run_prepare(source, *args)
    assert result.returncode == 0, result.stdout[-4000:]
    return result


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    """The parquet copy prepared in-process (--num_workers 0) with a 2-row val split."""
    out = tmp_path_factory.mktemp("prepared") / "sidewalk"
    prepare_ok(
        source, "--data_dir", source["hub"], "--output_dir", out, "--resolution", RESOLUTION,
        "--val_fraction", 0.34, "--num_workers", 0,
    )  # fmt: skip
    return out


def label_ids(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode in ("L", "P"), f"{path} is {image.mode}, not single-channel"
        return np.asarray(image)


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The pieces, in this process
# ---------------------------------------------------------------------------------------------


def test_help_documents_aspect_and_split(capsys):
    from prepare_sidewalk import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--aspect {crop,pad}", "centre square", "--ignore_index", "--data_dir", "save_to_disk"):
        assert words in text
    assert "round(val_fraction * N)" in text


def test_split_is_deterministic_and_rounds_half_up():
    from prepare_sidewalk import split_stems

    stems = [f"{i:06d}" for i in range(10)]
    split = split_stems(stems, 0.25, seed=0)  # 2.5 -> 3
    assert len(split["val"]) == 3 and sorted(split["train"] + split["val"]) == stems
    assert split == split_stems(stems, 0.25, seed=0)
    assert len(split_stems(stems, 0.01, seed=0)["val"]) == 1  # never empty when asked for
    assert split_stems(stems, 0.0, seed=0) == {"train": stems, "val": []}


def test_stems_come_from_an_id_column_when_it_names_rows_uniquely():
    import datasets

    from prepare_sidewalk import make_stems

    named = datasets.Dataset.from_dict({"id": ["photos/a b.png", "c", ".d"]})
    assert make_stems(named, "id") == ["a_b", "c", "d"]
    repeated = datasets.Dataset.from_dict({"id": ["x", "x"]})
    assert make_stems(repeated, "id") == ["000000", "000001"]


def test_resize_pair_crop_and_pad_geometry():
    from prepare_sidewalk import resize_pair

    image = Image.new("RGB", (WIDTH, HEIGHT), (200, 100, 50))
    cropped_image, cropped = resize_pair(image, Image.fromarray(STRIPES), RESOLUTION, "crop")
    assert cropped_image.size == cropped.size == (RESOLUTION, RESOLUTION)
    np.testing.assert_array_equal(np.asarray(cropped), STRIPES_CROPPED)

    padded_image, padded = resize_pair(image, Image.fromarray(STRIPES), RESOLUTION, "pad", ignore_index=255)
    padded, padded_image = np.asarray(padded), np.asarray(padded_image)
    assert (padded[PAD_DATA_ROWS] != 255).all() and (padded[:2] == 255).all() and (padded[13:] == 255).all()
    assert (padded_image[:2] == 0).all() and (padded_image[13:] == 0).all()
    np.testing.assert_array_equal(np.unique(padded[PAD_DATA_ROWS]), [1, 2, 3])


# ---------------------------------------------------------------------------------------------
# The script's output
# ---------------------------------------------------------------------------------------------


def test_writes_documented_files_at_resolution(prepared):
    for folder in ("images", "labels", "colored_masks"):
        assert sorted(p.name for p in (prepared / folder).iterdir()) == [f"{stem}.png" for stem in STEMS]
    for stem in STEMS:
        for folder in ("images", "colored_masks"):
            with Image.open(prepared / folder / f"{stem}.png") as image:
                assert image.size == (RESOLUTION, RESOLUTION) and image.mode == "RGB"
    assert json.loads((prepared / "class_names.json").read_text())["class_names"] == SIDEWALK_CLASSES


def test_labels_keep_original_ids_and_colored_masks_use_palette(prepared, source):
    np.testing.assert_array_equal(label_ids(prepared / "labels" / "000000.png"), STRIPES_CROPPED)
    palette = np.array(SIDEWALK_PALETTE, dtype=np.uint8)
    assert len({tuple(c) for c in SIDEWALK_PALETTE}) == len(SIDEWALK_CLASSES) == 35
    for stem, original in zip(STEMS, source["labels"]):
        ids = label_ids(prepared / "labels" / f"{stem}.png")
        assert ids.shape == (RESOLUTION, RESOLUTION)
        assert set(np.unique(ids)) <= set(np.unique(original))  # nearest: no new ids (paletted row included)
        colored = np.asarray(Image.open(prepared / "colored_masks" / f"{stem}.png"))
        np.testing.assert_array_equal(colored, palette[ids])


def test_dataset_info_counts_splits_and_frequencies(prepared):
    info = json.loads((prepared / "dataset_info.json").read_text())
    assert info["dataset_name"] == "segments/sidewalk-semantic"
    assert info["class_names"] == SIDEWALK_CLASSES
    assert [tuple(c) for c in info["palette"]] == SIDEWALK_PALETTE
    assert (info["num_images"], info["resolution"], info["aspect"]) == (NUM_ROWS, RESOLUTION, "crop")
    assert (info["val_fraction"], info["seed"]) == (0.34, 0)
    train, val = info["splits"]["train"], info["splits"]["val"]
    assert len(val) == round(0.34 * NUM_ROWS) == 2
    assert sorted(train + val) == STEMS and not set(train) & set(val)

    counts = sum(np.bincount(label_ids(p).ravel(), minlength=256) for p in (prepared / "labels").glob("*.png"))
    expected = counts[:35] / counts[:35].sum()
    frequency = info["class_pixel_frequency"]
    assert list(frequency) == SIDEWALK_CLASSES
    np.testing.assert_allclose([frequency[name] for name in SIDEWALK_CLASSES], expected)
    assert sum(frequency.values()) == pytest.approx(1.0)


def test_loader_reads_train_and_val(prepared):
    info = json.loads((prepared / "dataset_info.json").read_text())
    for split in ("train", "val"):
        dataset = load_segmentation_dataset(prepared, "sidewalk", split=split)
        assert [item["name"] for item in dataset] == info["splits"][split]
        assert dataset.class_names == SIDEWALK_CLASSES
        item = dataset[0]
        assert item["image"].size == (RESOLUTION, RESOLUTION) and item["label"].shape == (RESOLUTION, RESOLUTION)


def file_stats(paths) -> dict[Path, tuple[int, int]]:
    """(mtime, inode) of each file: os.replace gives a rewritten file a new inode, whatever the clock says."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in paths}


def test_rerun_skips_finished_items(prepared, source, tmp_path):
    out = tmp_path / "sidewalk"
    shutil.copytree(prepared, out)
    (out / "colored_masks" / "000003.png").unlink()  # item 3 is now unfinished
    before = file_stats(out.glob("*/*.png"))

    result = prepare_ok(
        source, "--data_dir", source["hub"], "--output_dir", out, "--resolution", RESOLUTION,
        "--val_fraction", 0.34, "--num_workers", 0,
    )  # fmt: skip
    assert "Skipped 5 finished item(s)" in result.stdout and "wrote 1" in result.stdout
    finished = {p: stat for p, stat in before.items() if p.stem != "000003"}
    assert file_stats(finished) == finished  # untouched
    assert all(file_stats([p])[p][1] != before[p][1] for p in before if p.stem == "000003")  # written anew
    assert (out / "colored_masks" / "000003.png").is_file() and not list(out.rglob(".*.tmp"))
    # The same frequencies (and everything else) although five items were only read back.
    assert all_files(out) == all_files(prepared)


def test_a_write_killed_midway_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    from prepare_sidewalk import save_atomically

    final = tmp_path / "labels" / "000001.png"
    final.parent.mkdir()

    def write_half_and_die(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n")  # what a killed writer leaves: the start of a PNG
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", write_half_and_die)
    with pytest.raises(KeyboardInterrupt):
        save_atomically(Image.new("L", (8, 8), 3), final)
    monkeypatch.undo()
    assert not final.exists()  # so a re-run sees the item unfinished and writes it again
    # The half-written temporary is removed by the failed write itself (a SIGKILL would leave it, hidden: no
    # loader pairs hidden files).
    assert list(final.parent.iterdir()) == []

    save_atomically(Image.new("L", (8, 8), 3), final)  # the re-run's write replaces the leftover
    assert np.array_equal(np.asarray(Image.open(final)), np.full((8, 8), 3)) and not list(tmp_path.rglob(".*.tmp"))


def test_other_geometry_over_finished_files_is_refused(tmp_path):
    from prepare_sidewalk import check_previous_settings

    (tmp_path / "dataset_info.json").write_text(json.dumps({"resolution": 16, "aspect": "crop", "ignore_index": 255}))
    check_previous_settings(tmp_path, {"resolution": 16, "aspect": "crop", "ignore_index": 255})
    with pytest.raises(SystemExit, match=r"--resolution 16 \(now 8\).*--overwrite"):
        check_previous_settings(tmp_path, {"resolution": 8, "aspect": "crop", "ignore_index": 255})


def test_overwrite_with_two_workers_rewrites_the_same_files(prepared, source, tmp_path):
    """--overwrite from the save_to_disk copy with 2 worker processes: every file new, byte-identical."""
    out = tmp_path / "sidewalk"
    shutil.copytree(prepared, out)
    before = file_stats(out.glob("*/*.png"))
    result = prepare_ok(
        source, "--data_dir", source["saved"], "--output_dir", out, "--resolution", RESOLUTION,
        "--val_fraction", 0.34, "--num_workers", 2, "--overwrite",
    )  # fmt: skip
    assert "Skipped" not in result.stdout
    assert all(file_stats([p])[p][1] != inode for p, (_, inode) in before.items())
    ours, theirs = all_files(out), all_files(prepared)
    info, reference = (json.loads(files.pop("dataset_info.json")) for files in (ours, theirs))
    assert ours == theirs
    assert info.pop("data_dir") == str(source["saved"]) and reference.pop("data_dir") == str(source["hub"])
    assert info == reference


def test_pad_fills_label_borders_with_ignore_index(source, tmp_path):
    out = tmp_path / "sidewalk"
    prepare_ok(
        source, "--data_dir", source["saved"], "--output_dir", out, "--resolution", RESOLUTION,
        "--aspect", "pad", "--image_format", "jpg", "--max_samples", 3, "--val_fraction", 0, "--num_workers", 0,
    )  # fmt: skip
    stems = STEMS[:3]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{stem}.jpg" for stem in stems]
    for stem in stems:
        ids = label_ids(out / "labels" / f"{stem}.png")
        assert (ids[:2] == 255).all() and (ids[13:] == 255).all() and (ids[PAD_DATA_ROWS] < 35).all()
        colored = np.asarray(Image.open(out / "colored_masks" / f"{stem}.png"))
        assert (colored[:2] == 0).all()  # ignore is black
        image = np.asarray(Image.open(out / "images" / f"{stem}.jpg"), dtype=float)
        assert image[0].mean() < 20  # black border (JPEG blurs the edge a little)
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["num_images"] == 3 and info["splits"] == {"train": stems, "val": []}
    assert info["ignored_pixels"] == 3 * RESOLUTION * (RESOLUTION - 11)
    assert sum(info["class_pixel_frequency"].values()) == pytest.approx(1.0)  # over labelled pixels only
    dataset = load_segmentation_dataset(out, "sidewalk", split="train")
    assert len(dataset) == 3 and (dataset[0]["label"][:2] == 255).all()


def test_offline_without_data_dir_fails_fast_naming_data_dir(source, tmp_path):
    # How fast it stops is a row of benchmarks/bench_startup.py, not a timed assert.
    result = run_prepare(source, "--output_dir", tmp_path / "out")
    assert result.returncode != 0
    assert "--data_dir" in result.stdout and "offline (" in result.stdout
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "out").exists()
