"""Dataset layouts, class names, palettes, label-map I/O and joint image/mask transforms.

Every layout yields the same thing: an RGB image, an integer label map (class ids, with
``ignore_index`` marking no-data) and a name.

Check a dataset before training on it::

    python -m segdiff.data check --data_root /path/to/data --dataset generic --num_classes 5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from segdiff.arguments import non_negative_int, positive_int
from segdiff.files import save_image_atomic, write_json_atomic
from segdiff.labels import (
    IGNORE_INDEX,
    LANDSCAPE_CLASSES,
    LANDSCAPE_PALETTE,
    LOVEDA_CLASSES,
    LOVEDA_PALETTE,
    SIDEWALK_CLASSES,
    SIDEWALK_PALETTE,
    default_palette,
    flat_palette,
)
from segdiff.seeds import derive_seed


def save_label_png(label: np.ndarray, path: str | Path, palette=None) -> None:
    """Write a label map as an 8-bit paletted PNG (atomically): pixel values are class ids, the palette is for
    eyes."""
    label = np.asarray(label)
    if label.min() < 0 or label.max() > 255:
        raise ValueError(f"label ids must be in 0..255 to be stored as a PNG, got {label.min()}..{label.max()}")
    image = Image.fromarray(label.astype(np.uint8))  # mode L
    if palette is not None:
        image.putpalette(flat_palette(palette))  # turns it into mode P, pixel values unchanged
    save_image_atomic(image, path)


# ---------------------------------------------------------------------------------------------
# Reading files: every failure becomes a DatasetError that names the file and the fix
# ---------------------------------------------------------------------------------------------

DATASETS = ("loveda", "generic", "sidewalk", "landscape")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# Modes whose pixel values are the stored integers themselves (for "P", the palette index).
LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "1")

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Bad input data. The message names the offending file or folder and says how to fix it."""


def first_line(error: BaseException) -> str:
    """What a library's error says, in one line for a message of ours (diffusers' run over several), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def exit_on_bad_input():
    """End a script with the DatasetError's message (it names the file and the fix), not with a traceback."""
    try:
        yield
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None


def _decode_file(path: Path, kind: str, convert, *, decode: bool = True):
    """Open an image file, decode all of it (unless ``decode`` is False: then ``convert`` reads what it needs), and
    return ``convert(img)`` while it is open."""
    if not path.is_file():
        raise DatasetError(f"{kind} {path} does not exist. Fix: check --data_root and the file name.")
    try:
        with Image.open(path) as img:
            if decode:
                img.load()  # decode now, so a truncated file fails here, naming itself
            return convert(img)
    except (OSError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DatasetError(
            f"cannot read {kind} {path} ({err}). Fix: re-export or re-download the file, "
            "or remove it together with its pair."
        ) from err


def read_image(path: str | Path) -> Image.Image:
    """An RGB image. No EXIF rotation: masks carry none, so turning only the photo would misalign them."""
    return _decode_file(Path(path), "image", lambda img: img.convert("RGB"))


def read_image_size(path: str | Path) -> tuple[int, int]:
    """An image file's (width, height), once the whole file is known to be readable: a PNG by the checksums of its
    chunks (a truncated or damaged file fails them; 0.5 ms for 1024x1024, where decoding takes 17 ms), any other
    format by decoding it."""

    def checked_size(img: Image.Image) -> tuple[int, int]:
        size = img.size
        if img.format == "PNG":
            img.verify()
        else:
            img.load()
        return size

    return _decode_file(Path(path), "image", checked_size, decode=False)


# How a layout's mask files encode classes: class = file id - offset, file ids below it are no-data.
# LoveDA stores 0 for no-data and classes from 1.
LABEL_OFFSETS = {"loveda": 1}


def label_offset_for(layout: str, label_offset: int | None = None) -> int:
    """The file id of class 0 in a layout's mask files: ``label_offset`` (--label_offset) when given, else the
    layout's own (`LABEL_OFFSETS`)."""
    return LABEL_OFFSETS.get(layout, 0) if label_offset is None else label_offset


def decode_label_ids(raw: np.ndarray, label_offset: int, ignore_index: int) -> np.ndarray:
    """File ids -> class ids: minus ``label_offset``, with ``ignore_index`` for ids below it (no-data)."""
    if label_offset == 0:
        return raw
    label = raw - label_offset
    label[(raw < label_offset) | (raw == ignore_index)] = ignore_index
    return label


def read_label_map(path: str | Path) -> np.ndarray:
    """A 2-D int64 array of the ids stored in a mask file (for a paletted PNG: the palette index)."""
    path = Path(path)
    return _decode_file(path, "mask", lambda img: _label_array(img, path)).astype(np.int64, copy=False)


def read_label_ids(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The distinct ids a mask file holds (int64, ascending), the number of pixels of each, and the mask's (width,
    height): what a check of the file needs, counted on the stored integers (bytes for most masks), which is
    several times faster than `read_label_map` followed by ``np.unique``."""
    path = Path(path)
    raw = _decode_file(path, "mask", lambda img: _label_array(img, path))
    flat = raw.ravel()
    if flat.dtype == np.bool_:
        flat = flat.astype(np.uint8)  # not a view: PIL's 1-bit arrays may store True as 255
    if flat.dtype.kind == "u" and flat.dtype.itemsize <= 2:
        counts = np.bincount(flat)
        ids = np.flatnonzero(counts)
        counts = counts[ids]
    else:
        ids, counts = np.unique(flat, return_counts=True)
    return ids.astype(np.int64), counts, (raw.shape[1], raw.shape[0])


def _label_array(img: Image.Image, path: Path) -> np.ndarray:
    """The stored ids, in the file's own integer type (bool for a 1-bit mask)."""
    if img.mode in ("LA", "PA"):
        img = img.getchannel(0)  # the alpha band says nothing about classes
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        # Some tools save label maps as grey RGB pictures: equal channels are still ids.
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0]
        raise DatasetError(
            f"mask {path} is a colour ({img.mode}) mask, not a label map: its pixels are colours, not "
            "class ids. Fix: convert it with the dataset palette (each colour -> its class id) and save "
            "single-channel ids, e.g. with segdiff.data.save_label_png."
        )
    if img.mode == "F":  # float TIFFs: fine as long as every value is a whole number
        values = np.asarray(img)
        if not np.array_equal(values, np.round(values)):
            raise DatasetError(f"mask {path} holds non-integer values. Fix: save class ids as integers.")
        return values.astype(np.int64)
    if img.mode not in LABEL_MODES:
        raise DatasetError(
            f"mask {path} has image mode {img.mode}, which holds no class ids. "
            "Fix: save it as a single-channel PNG of class ids (mode L, P or 16-bit)."
        )
    return np.asarray(img)


def read_json(path: Path, what: str = "JSON file", fix: str = "Fix: correct or rewrite it.", *, an_object=False):
    """The JSON in ``path``; every failure (missing, unreadable, broken; not an object with ``an_object``) is a
    DatasetError that names the file, what it is and the fix."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise DatasetError(f"{what} {path} does not exist. Fix: check the path.") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot parse {what} {path} ({err}). {fix}") from err
    if an_object and not isinstance(data, dict):
        raise DatasetError(f"{what} {path} holds no JSON object. {fix}")
    return data


# ---------------------------------------------------------------------------------------------
# Class names and palettes
# ---------------------------------------------------------------------------------------------


def load_class_names(path: str | Path) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    """Class names, and the palette if the file has one, from a JSON file in one of these forms:

    ``["background", "building", ...]``, ``{"class_names": [...], "palette": [[r, g, b], ...]}``
    (palette optional), or an ``id2label`` file ``{"0": "background", "1": "building", ...}``.
    """
    path = Path(path)
    data = read_json(path, "class names file")
    palette = None
    if isinstance(data, dict) and "class_names" in data:
        names, palette = data["class_names"], data.get("palette")
    elif isinstance(data, dict) and data and all(key.isdigit() for key in data):
        if sorted(map(int, data)) != list(range(len(data))):
            raise DatasetError(f"{path}: the ids of an id -> name file must be 0..N-1 without gaps.")
        names = [data[str(i)] for i in range(len(data))]
    elif isinstance(data, list):
        names = data
    else:
        raise DatasetError(
            f"{path} is not a class names file. Fix: write a JSON list of names, or "
            '{"class_names": [...], "palette": [[r, g, b], ...]}.'
        )
    names = _checked_names(names, str(path))
    if palette is not None:
        palette = _checked_palette(palette, len(names), str(path))
    return names, palette


def _checked_names(names, source: str) -> list[str]:
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise DatasetError(f"{source}: the class names must be a non-empty list of strings.")
    return list(names)


def _checked_palette(palette, num_classes: int, source: str) -> list[tuple[int, int, int]]:
    def is_colour(c):
        return (
            isinstance(c, list | tuple)
            and len(c) == 3
            and all(isinstance(v, int | np.integer) and 0 <= v <= 255 for v in c)
        )

    if not isinstance(palette, list | tuple) or not all(is_colour(c) for c in palette):
        raise DatasetError(f"{source}: the palette must be a list of [r, g, b] triples of integers 0..255.")
    if len(palette) < num_classes:
        raise DatasetError(
            f"{source}: the palette has {len(palette)} colours for {num_classes} classes. "
            "Fix: give one colour per class, or leave the palette out to get a default one."
        )
    return [tuple(int(v) for v in c) for c in palette[:num_classes]]


def write_class_names(path: str | Path, names: list[str], palette=None, **notes) -> None:
    """Write ``{"class_names": [...], "palette": [...]}`` atomically, with any ``notes`` as further keys (the toy
    dataset's ``style``, say); `load_class_names` reads past them."""
    content = {"class_names": list(names)}
    if palette is not None:
        content["palette"] = [[int(v) for v in colour] for colour in palette]
    write_json_atomic(path, {**content, **notes})


def default_class_names(num_classes: int) -> list[str]:
    """The names of classes known only by their count: ``class_0``, ``class_1``..."""
    return [f"class_{i}" for i in range(num_classes)]


def _resolve_classes(layout: str, names, palette, names_source, *, class_names_json, num_classes, data_root):
    """Class names and palette: --class_names_json wins, then the layout's own list, then --num_classes."""
    if class_names_json is not None:
        json_names, json_palette = load_class_names(class_names_json)
        # Keep the layout's colours for a renamed class list of the same length.
        if json_palette is None and palette is not None and len(palette) == len(json_names):
            json_palette = palette
        names, palette, names_source = json_names, json_palette, class_names_json
    if num_classes is not None and num_classes < 1:
        raise DatasetError(f"--num_classes must be at least 1, got {num_classes}.")
    if names is None:
        if num_classes is None:
            raise DatasetError(
                f"--dataset {layout} needs the classes, and {data_root} holds no class_names.json. "
                "Fix: pass --num_classes N (ids 0..N-1) or --class_names_json FILE, or put a "
                f"class_names.json (a JSON list of names) in {data_root}."
            )
        names = default_class_names(num_classes)
    elif num_classes is not None and num_classes != len(names):
        raise DatasetError(
            f"--num_classes {num_classes} disagrees with the {len(names)} class names from {names_source}. "
            "Fix: drop --num_classes, or make the class list match."
        )
    if palette is None or len(palette) != len(names):
        palette = default_palette(len(names))
    return list(names), [tuple(c) for c in palette]


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class SegmentationDataset(Dataset):
    """(image, label map) pairs and their classes; items are ``{"image", "label", "name"}``, plus ``"domain"`` for a
    layout whose pairs have one (LoveDA: the scene, Urban or Rural; ``domains`` lists them).

    ``image`` is a PIL RGB image, ``label`` an int64 HxW array of class ids 0..num_classes-1 with
    ``ignore_index`` for no-data, ``name`` the file stem. ``label_offset`` says how the files
    encode classes: file ids below it are no-data and class = file id - label_offset (LoveDA stores
    no-data as 0 and its 7 classes as 1..7, so its offset is 1).
    """

    pairs: list[tuple[Path, Path]] = field(repr=False)
    class_names: list[str]
    palette: list[tuple[int, int, int]] = field(repr=False)
    ignore_index: int = IGNORE_INDEX
    layout: str = "generic"
    label_offset: int = 0
    split: str = "train"
    data_root: Path | None = None

    def __post_init__(self):
        if 0 <= self.ignore_index < self.num_classes:
            raise DatasetError(
                f"--ignore_index {self.ignore_index} is also a class id (classes are 0..{self.num_classes - 1}). "
                f"Fix: choose an id outside the classes (the default is {IGNORE_INDEX}). For masks whose id 0 marks "
                "unlabelled pixels and 1..N the classes, pass --label_offset 1 instead (and a class list without "
                "the unlabelled entry)."
            )
        self.palette = _checked_palette(list(self.palette), self.num_classes, "the palette")
        self.pairs = [(Path(image), Path(mask)) for image, mask in self.pairs]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        label = self.decode_label(read_label_map(mask_path))
        check_same_size(image.size, (label.shape[1], label.shape[0]), image_path, mask_path)
        self.check_label_ids(label, mask_path)
        item = {"image": image, "label": label, "name": image_path.stem}
        if self.domains:
            item["domain"] = self.domain_of(index)
        return item

    @property
    def domains(self) -> tuple[str, ...]:
        """The domains the pairs of this layout belong to: LoveDA's scenes; none for the others."""
        return LOVEDA_SCENES if self.layout == "loveda" else ()

    def domain_of(self, index: int) -> str | None:
        """Pair ``index``'s domain (read from its path: LoveDA's ``<split>/<Scene>/masks_png/``), or None."""
        return loveda_scene(self.pairs[index][1]) if self.domains else None

    def sample_names(self) -> list[str]:
        """Every pair's name, its image's file stem (the ``name`` of its item)."""
        return [image_path.stem for image_path, _ in self.pairs]

    def select(self, indices: list[int]) -> SegmentationDataset:
        """The same dataset holding only the pairs at ``indices``."""
        return replace(self, pairs=[self.pairs[index] for index in indices])

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        """File ids -> class ids, with ``ignore_index`` for no-data."""
        return decode_label_ids(raw, self.label_offset, self.ignore_index)

    def check_label_ids(self, label: np.ndarray, mask_path: Path) -> None:
        check_label_ids(label, self.num_classes, self.ignore_index, mask_path, self.label_offset)


# ---------------------------------------------------------------------------------------------
# Which pairs a run trains on: --max_train_samples
# ---------------------------------------------------------------------------------------------


def train_sample_order(names: list[str]) -> list[int]:
    """Every pair's index, in the order --max_train_samples takes them: by a hash of the pair's name.

    The order depends on the names alone, not on --seed, the script or the order the files are listed in: given
    the same data and N, the layout model, the renderer and evaluate.py's segmenters all train on the same N pairs,
    and a smaller N keeps a subset of a larger N's pairs.
    """
    return sorted(range(len(names)), key=lambda index: (derive_seed("max_train_samples", names[index]), index))


def choose_train_samples(names: list[str], max_train_samples: int | None) -> list[int]:
    """The indices, in dataset order, of the pairs to train on: all, or the first N of `train_sample_order`."""
    if max_train_samples is None:
        return list(range(len(names)))
    if max_train_samples < 1:
        raise DatasetError(f"--max_train_samples must be at least 1, got {max_train_samples}.")
    return sorted(train_sample_order(names)[:max_train_samples])


def limit_train_samples(dataset, max_train_samples: int | None):
    """``dataset`` cut to the pairs `choose_train_samples` keeps; it has ``sample_names()`` and ``select()``."""
    indices = choose_train_samples(dataset.sample_names(), max_train_samples)
    return dataset if len(indices) == len(dataset) else dataset.select(indices)


def check_label_ids(label: np.ndarray, num_classes: int, ignore_index: int, mask_path, label_offset: int = 0) -> None:
    """A DatasetError naming the mask and its stray ids if ``label`` holds ids that are neither a class
    (0..num_classes-1) nor ``ignore_index``."""
    valid = ((label >= 0) & (label < num_classes)) | (label == ignore_index)
    if valid.all():
        return
    bad = np.unique(label[~valid]).tolist()
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    shift = f" (class = file id - {label_offset})" if label_offset else ""
    from_one = "" if label_offset else ", or --label_offset 1 if the files count the classes from 1 (0 = unlabelled)"
    raise DatasetError(
        f"mask {mask_path} holds class ids {shown}{shift}, but there are {num_classes} classes "
        f"(0..{num_classes - 1}) and ignore_index is {ignore_index}. Fix: pass --num_classes or "
        "--class_names_json (a class_names.json) listing every class, or --ignore_index if that id marks "
        f"no-data{from_one}."
    )


def check_same_size(image_size: tuple[int, int], mask_size: tuple[int, int], image_path: Path, mask_path: Path):
    """A DatasetError naming both files unless the image and its mask, each (width, height), are the same size."""
    if tuple(image_size) != tuple(mask_size):
        raise DatasetError(
            f"image {image_path} is {image_size[0]}x{image_size[1]} but its mask {mask_path} is "
            f"{mask_size[0]}x{mask_size[1]}. Fix: resize the mask to the image size with "
            "nearest-neighbour interpolation, or re-export the pair."
        )


# ---------------------------------------------------------------------------------------------
# Finding pairs on disk
# ---------------------------------------------------------------------------------------------


def _child(folder: Path | None, name: str) -> Path | None:
    """The sub-folder ``name`` of ``folder``, matched case-insensitively (``Train`` or ``train``)."""
    if folder is None or not folder.is_dir():
        return None
    if (folder / name).is_dir():
        return folder / name
    return next((p for p in sorted(folder.iterdir()) if p.is_dir() and p.name.lower() == name.lower()), None)


def _subfolders(folder: Path) -> str:
    names = sorted(p.name + "/" for p in folder.iterdir() if p.is_dir())
    return "found " + (", ".join(names) if names else "no sub-folders")


def _require_subfolders(root: Path, names: tuple[str, ...], layout: str) -> list[Path]:
    found = [_child(root, name) for name in names]
    if None in found:
        wanted = " and ".join(f"{name}/" for name in names)
        raise DatasetError(
            f"expected {wanted} under {root} for --dataset {layout} ({_subfolders(root)}). "
            "Fix: point --data_root at the folder that holds them, or pick the matching --dataset."
        )
    return found


def files_by_stem(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        # Hidden files include the temporaries of interrupted atomic writes.
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem in files:
            raise DatasetError(
                f"{files[path.stem].name} and {path.name} in {folder} share the stem {path.stem!r}, so "
                "pairing by name is ambiguous. Fix: rename or remove one of them."
            )
        files[path.stem] = path
    return files


def first_few(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma separated, for a message ("..." when there are more)."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _pair_by_stem(images_dir: Path, masks_dir: Path, problems: list[str] | None = None) -> list[tuple[Path, Path]]:
    """Match images and masks by file stem, whatever the extensions; an unmatched file is an error.

    With a ``problems`` list (``python -m segdiff.data check``), the error is noted there instead and the
    matched pairs are returned, so that the check goes on to read them.
    """
    images, masks = files_by_stem(images_dir), files_by_stem(masks_dir)
    if not images and not masks:
        return []
    lonely_images = sorted(images.keys() - masks.keys())
    lonely_masks = sorted(masks.keys() - images.keys())
    unpaired = []
    if lonely_images:
        unpaired.append(f"{len(lonely_images)} image(s) in {images_dir} have no mask ({first_few(lonely_images)})")
    if lonely_masks:
        unpaired.append(f"{len(lonely_masks)} mask(s) in {masks_dir} have no image ({first_few(lonely_masks)})")
    if unpaired:
        _note_or_raise(
            problems,
            "; ".join(unpaired) + ". Fix: add the missing files or remove the unpaired ones "
            "(images and masks are paired by file name without extension).",
        )
    return [(images[stem], masks[stem]) for stem in sorted(images.keys() & masks.keys())]


def _note_or_raise(problems: list[str] | None, message: str) -> None:
    """Raise a DatasetError, or, when collecting every problem at once, note it and go on."""
    if problems is None:
        raise DatasetError(message)
    problems.append(message)


def _require_pairs(pairs: list, images_dir: Path, masks_dir: Path) -> None:
    if not pairs:
        raise DatasetError(
            f"no image/mask pairs: {images_dir} and {masks_dir} hold no {' '.join(IMAGE_EXTENSIONS)} files. "
            "Fix: point --data_root at a folder with data."
        )


# Each layout returns (pairs, split, class names, palette, where the names came from);
# names None means the layout does not know its classes.


def _paired_folders(folder: Path, subfolders: tuple[str, str], dataset: str, split: str, default_classes, problems):
    """Images and labels in two sub-folders paired by stem; class names from ``folder/class_names.json`` if
    present, else ``default_classes`` (names, palette, where they came from)."""
    images_dir, labels_dir = _require_subfolders(folder, subfolders, dataset)
    pairs = _pair_by_stem(images_dir, labels_dir, problems)
    _require_pairs(pairs, images_dir, labels_dir)
    names_file = folder / "class_names.json"
    if names_file.is_file():
        return (pairs, split, *load_class_names(names_file), names_file)
    return (pairs, split, *default_classes)


def _generic_layout(root: Path, split: str, problems=None):
    # A generic folder has no splits: the whole folder is the dataset, whichever split is asked for.
    return _paired_folders(root, ("images", "masks"), "generic", split, (None, None, None), problems)


LOVEDA_SPLITS = {"train": "Train", "val": "Val"}
LOVEDA_SCENES = ("Urban", "Rural")


def loveda_scene(mask_path: Path) -> str:
    """Urban or Rural: the scene folder of a LoveDA mask (``<split>/<Scene>/masks_png/<name>.png``)."""
    folder = Path(mask_path).parent.parent.name
    for scene in LOVEDA_SCENES:
        if folder.lower() == scene.lower():
            return scene
    raise DatasetError(
        f"cannot tell the LoveDA scene of {mask_path}: its folder {folder!r} is none of {', '.join(LOVEDA_SCENES)}. "
        "Fix: keep LoveDA's <split>/Urban|Rural/masks_png/ layout."
    )


def _loveda_folder_of_split(root: Path, split_name: str) -> Path:
    """The folder holding Urban/ and Rural/ for a split, whichever nesting this copy of LoveDA has."""

    def has_scenes(folder):
        return any(_child(folder, scene) for scene in LOVEDA_SCENES)

    outer = _child(root, split_name)
    for candidate in (_child(outer, split_name), outer):  # Train/Train/Urban, then Train/Urban
        if candidate is not None and has_scenes(candidate):
            return candidate
    if has_scenes(root):  # --data_root is itself a split folder
        if root.name.lower() in ("train", "val", "test") and root.name.lower() != split_name.lower():
            raise DatasetError(
                f"--data_root {root} is the LoveDA {root.name} split, but the {split_name} split was asked for. "
                "Fix: point --data_root at the LoveDA root (holding Train/ and Val/), or change --split."
            )
        return root
    raise DatasetError(
        f"found no LoveDA {split_name} split under {root} ({_subfolders(root)}): --dataset loveda expects "
        f"{split_name}/Urban/ and/or {split_name}/Rural/ (or {split_name}/{split_name}/Urban/ ...), each holding "
        "images_png/ and masks_png/. Fix: point --data_root at the LoveDA root or at one split folder."
    )


def _loveda_layout(root: Path, split: str, scenes, problems=None):
    if split.lower() not in LOVEDA_SPLITS:
        raise DatasetError(f"LoveDA has no labelled split {split!r}. Fix: use --split train or val.")
    split_name = LOVEDA_SPLITS[split.lower()]
    split_folder = _loveda_folder_of_split(root, split_name)
    pairs, missing = [], []
    for scene in scenes:
        scene_folder = _child(split_folder, scene)
        if scene_folder is None:
            missing.append(scene)
            continue
        try:
            images_dir, masks_dir = _require_subfolders(scene_folder, ("images_png", "masks_png"), "loveda")
        except DatasetError as err:
            _note_or_raise(problems, str(err))  # the check goes on with the other scene
            continue
        pairs += _pair_by_stem(images_dir, masks_dir, problems)
    if len(missing) == len(scenes):
        raise DatasetError(
            f"none of the scenes {', '.join(scenes)} is under {split_folder} ({_subfolders(split_folder)}). "
            "Fix: pass --loveda_scenes with the scenes you have."
        )
    if missing:
        logger.warning("LoveDA scene(s) %s not under %s; using the others", ", ".join(missing), split_folder)
    if not pairs:
        raise DatasetError(
            f"the LoveDA {split_name} split at {split_folder} is empty: its images_png/ folders hold no images. "
            "Fix: finish extracting the archive there, or choose another --split."
        )
    return pairs, split_name.lower(), LOVEDA_CLASSES, LOVEDA_PALETTE, "the LoveDA class list"


def _sidewalk_layout(root: Path, split: str, problems=None):
    images_dir, labels_dir = _require_subfolders(root, ("images", "labels"), "sidewalk")
    pairs = _pair_by_stem(images_dir, labels_dir, problems)
    _require_pairs(pairs, images_dir, labels_dir)
    info_file = root / "dataset_info.json"
    fix = "Fix: re-run prepare_sidewalk.py."
    info = read_json(info_file, "sidewalk dataset info", fix, an_object=True) if info_file.is_file() else {}
    names = _checked_names(info["class_names"], str(info_file)) if "class_names" in info else SIDEWALK_CLASSES
    palette = _checked_palette(info["palette"], len(names), str(info_file)) if "palette" in info else SIDEWALK_PALETTE
    source = info_file if "class_names" in info else "the sidewalk class list"
    splits = info.get("splits")
    if splits is None:
        # Without a split list every pair is training data; anything else does not exist.
        if split != "train":
            raise DatasetError(
                f"{info_file} {'defines no splits' if info else 'is missing'}, so there is no {split!r} split "
                "(every pair is 'train'). "
                'Fix: use --split train, or add "splits": {"train": [stems], "val": [stems]} to it '
                "(prepare_sidewalk.py --val_fraction writes them)."
            )
        return pairs, split, names, palette, source
    if not isinstance(splits, dict) or not all(isinstance(stems, list) for stems in splits.values()):
        raise DatasetError(f'{info_file}: "splits" must map split names to lists of stems.')
    if split not in splits:
        raise DatasetError(
            f"{info_file} has no {split!r} split (it has {', '.join(splits) or 'none'}). Fix: pick one of those."
        )
    # Split lists may hold stems or file names.
    wanted = [Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name for name in splits[split]]
    if not wanted:
        raise DatasetError(
            f"the {split!r} split in {info_file} is empty. Fix: list its stems there, or pick another split."
        )
    by_stem = {image.stem: (image, label) for image, label in pairs}
    absent = [stem for stem in wanted if stem not in by_stem]
    if absent:
        raise DatasetError(
            f"{len(absent)} stem(s) of the {split!r} split in {info_file} have no image/label pair "
            f"({first_few(absent)}). Fix: re-run prepare_sidewalk.py, or remove them from the split."
        )
    return [by_stem[stem] for stem in wanted], split, names, palette, source


def _landscape_layout(root: Path, split: str, problems=None):
    # The competition's folders: imgs/ (jpg) and labels/ (grayscale ids 0..28), at the root or under a split folder.
    folder = root if (_child(root, "imgs") or _child(root, "labels")) else _child(root, split)
    if folder is None:
        raise DatasetError(
            f"expected imgs/ and labels/ under {root}, or under {root}/{split}/, for --dataset landscape "
            f"({_subfolders(root)}). Fix: point --data_root at the folder that holds them."
        )
    defaults = (LANDSCAPE_CLASSES, LANDSCAPE_PALETTE, "the landscape class list")
    return _paired_folders(folder, ("imgs", "labels"), "landscape", split, defaults, problems)


def load_segmentation_dataset(
    data_root: str | Path,
    dataset: str,
    *,
    split: str = "train",
    loveda_scenes=LOVEDA_SCENES,
    class_names_json: str | Path | None = None,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_offset: int | None = None,
    problems: list[str] | None = None,
) -> SegmentationDataset:
    """Find the (image, mask) pairs of one split of a dataset in one of the layouts in ``DATASETS``.

    ``label_offset``: the file id of class 0 (ids below it are no-data); None means the layout's own
    (`label_offset_for`: 1 for LoveDA, else 0).

    Any problem raises a DatasetError, except with a ``problems`` list: then unpaired files (and a LoveDA scene
    without its sub-folders) are noted there and the dataset holds the pairs that were found.
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown --dataset {dataset!r}. Fix: use one of {', '.join(DATASETS)}.")
    if data_root is None:
        raise DatasetError(f"--dataset {dataset} needs --data_root. Fix: pass the dataset folder.")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"--data_root {root} does not exist or is not a folder. Fix: check the path.")
    if dataset == "loveda":
        scenes = [loveda_scenes] if isinstance(loveda_scenes, str) else list(loveda_scenes)
        pairs, split, names, palette, source = _loveda_layout(root, split, scenes, problems)
    elif dataset == "sidewalk":
        pairs, split, names, palette, source = _sidewalk_layout(root, split, problems)
    elif dataset == "landscape":
        pairs, split, names, palette, source = _landscape_layout(root, split, problems)
    else:
        pairs, split, names, palette, source = _generic_layout(root, split, problems)
    names, palette = _resolve_classes(
        dataset,
        names,
        palette,
        source,
        class_names_json=class_names_json,
        num_classes=num_classes,
        data_root=root,
    )
    return SegmentationDataset(
        pairs,
        names,
        palette,
        ignore_index=ignore_index,
        layout=dataset,
        label_offset=label_offset_for(dataset, label_offset),
        split=split,
        data_root=root,
    )


# ---------------------------------------------------------------------------------------------
# Checking a whole dataset
# ---------------------------------------------------------------------------------------------


def _attempt(problems: list[str], fn, *args):
    """``fn(*args)``, or None after noting the message if it raises a DatasetError."""
    try:
        return fn(*args)
    except DatasetError as err:
        problems.append(str(err))
        return None


@dataclass
class DatasetScan:
    """What `scan_dataset` found: every problem (one message each, naming the file and the fix), the pixels of each
    class and those at ``ignore_index``."""

    problems: list[str]
    class_pixels: np.ndarray
    ignored_pixels: int


def scan_dataset(dataset: SegmentationDataset, *, read_images: bool = True, progress: bool = False) -> DatasetScan:
    """Read every pair the way a check needs, and note every problem instead of stopping at the first.

    The one check of a dataset: ``python -m segdiff.data check`` runs it, and every trainer before it loads a model
    (`segdiff.training.check_training_data`). Each mask is decoded and its ids counted (`read_label_ids`): an
    unreadable file, a colour mask or an id that is neither a class nor ``ignore_index`` is a problem. Each image is
    checked whole without decoding where its format allows (`read_image_size`) and must be its mask's size;
    ``read_images=False`` leaves the images out, for a trainer that never reads them (the layout model). On one CPU
    core, 512 px: 1.3 ms a mask, 0.3 ms a PNG image, 2 ms a noisy JPEG one (see the README's "Dataset formats").
    """
    problems = []
    class_pixels = np.zeros(dataset.num_classes, dtype=np.int64)
    ignored_pixels = 0
    for image_path, mask_path in tqdm(dataset.pairs, desc="Checking the data", unit="pair", disable=not progress):
        # Go on after a failure: the report should list every problem, not just the first.
        image_size = _attempt(problems, read_image_size, image_path) if read_images else None
        found = _attempt(problems, read_label_ids, mask_path)
        if found is None:
            continue
        ids, counts, mask_size = found
        if image_size is not None:
            _attempt(problems, check_same_size, image_size, mask_size, image_path, mask_path)
        labels = dataset.decode_label(ids)  # the class id of each distinct file id
        _attempt(problems, dataset.check_label_ids, labels, mask_path)
        in_range = (labels >= 0) & (labels < dataset.num_classes)
        np.add.at(class_pixels, labels[in_range], counts[in_range])
        ignored_pixels += int(counts[labels == dataset.ignore_index].sum())
    return DatasetScan(problems, class_pixels, ignored_pixels)


def bad_data_error(dataset: SegmentationDataset, problems: list[str], shown: int = 20) -> DatasetError:
    """The refusal of a trainer whose `scan_dataset` found ``problems``: the first ``shown`` of them (each names its
    file and the fix), how many more there are, and the command that lists them all."""
    listed = "\n".join(f"- {problem}" for problem in problems[:shown])
    if len(problems) > shown:
        listed += f"\n- ... and {len(problems) - shown} more"
    return DatasetError(
        f"{len(problems)} problem(s) in the training data at {dataset.data_root}; no model was loaded:\n{listed}\n"
        "Fix them as each says; `python -m segdiff.data check` with the same dataset options lists every one."
    )


# ---------------------------------------------------------------------------------------------
# Joint image/mask transforms
# ---------------------------------------------------------------------------------------------


class JointTransform:
    """The same random geometry for an image and its label map; ``(PIL image, label) -> (pixels, label)``.

    Resize so the short side fills ``resolution`` (bilinear with antialias for the image, nearest
    for the label), optionally a random affine (rotation, translation, scale), then a random or
    centre crop to ``resolution`` and a random horizontal flip. Returns ``pixel_values`` (float
    3xHxW in [-1, 1]) and ``label`` (int64 HxW). Pixels the affine brings in from outside are
    black in the image and ``ignore_index`` in the label, so no loss is spent on them.

    Randomness comes from torch's global RNG, so seeding it (or ``torch.random.fork_rng``) makes
    a sample reproducible.
    """

    def __init__(
        self,
        resolution: int | tuple[int, int],
        *,
        center_crop: bool = False,
        random_flip: bool = True,
        affine: bool = False,
        degrees: float = 15.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        ignore_index: int = IGNORE_INDEX,
    ):
        # torchvision is imported here, not at the top: it takes seconds to import and nothing else in
        # this module needs it (``python -m segdiff.data check`` starts twice as fast without it).
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        steps = []
        if affine:
            steps.append(
                v2.RandomAffine(
                    degrees=degrees,
                    translate=(translate, translate),
                    scale=scale,
                    interpolation=v2.InterpolationMode.BILINEAR,  # masks are always resampled nearest
                    fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index},
                )
            )
        steps.append(v2.CenterCrop(self.size) if center_crop else v2.RandomCrop(self.size))
        if random_flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        self.geometry = v2.Compose(steps)

    def cover_size(self, height: int, width: int) -> list[int]:
        """The smallest size with the same aspect ratio that covers ``self.size``."""
        factor = max(self.size[0] / height, self.size[1] / width)
        return [max(self.size[0], round(height * factor)), max(self.size[1], round(width * factor))]

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        image = tv_tensors.Image(TF.pil_to_tensor(image) if isinstance(image, Image.Image) else image)
        mask = tv_tensors.Mask(torch.as_tensor(np.asarray(label), dtype=torch.int64))
        size = self.cover_size(*image.shape[-2:])
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resize(mask, size, interpolation=TF.InterpolationMode.NEAREST)
        # One call on the pair: v2 draws each random parameter once and applies it to both.
        image, mask = self.geometry(image, mask)
        pixel_values = image.as_subclass(torch.Tensor).float() / 127.5 - 1.0
        return pixel_values, mask.as_subclass(torch.Tensor)


class StyleReferenceView:
    """Another random view of a training image, used as its style reference: ``PIL image -> (3, R, R)`` in [-1, 1].

    A random resized crop (keeping ``min_crop_scale`` to all of the area, aspect 3:4 to 4:3) and random
    horizontal and vertical flips: the colours, lighting and texture stay, the layout does not, so a style
    encoder trained on these views cannot copy the target's layout from its reference. Randomness comes from
    torch's global RNG, as in `JointTransform`.
    """

    def __init__(self, resolution: int, min_crop_scale: float = 0.25):
        from torchvision.transforms import v2

        self.views = v2.Compose(
            [
                v2.RandomResizedCrop(resolution, scale=(min_crop_scale, 1.0), antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomVerticalFlip(p=0.5),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        pixels = TF.pil_to_tensor(image.convert("RGB")) if isinstance(image, Image.Image) else image
        return self.views(pixels).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Command-line options shared by the scripts
# ---------------------------------------------------------------------------------------------


def add_dataset_args(parser: argparse.ArgumentParser, *, default_dataset: str = "generic") -> argparse.ArgumentParser:
    """Add the dataset options (``--data_root --dataset --class_names_json --num_classes ...``)."""
    group = parser.add_argument_group(
        "dataset",
        "Check a dataset first with: python -m segdiff.data check --data_root DIR --dataset NAME ...",
    )
    group.add_argument(
        "--data_root",
        type=str,
        default=None,
        help="Dataset folder. Its layout is set by --dataset.",
    )
    group.add_argument(
        "--dataset",
        type=str,
        default=default_dataset,
        choices=DATASETS,
        help=(
            "Layout of --data_root. "
            "generic: images/ and masks/ paired by file stem (any of .png .jpg .jpeg .tif .tiff .bmp .webp); "
            "masks are single-channel label maps of class ids (L, 16-bit or paletted PNG, where the palette "
            "index is the class id); classes from an optional class_names.json in --data_root, or "
            "--class_names_json, or --num_classes. "
            "loveda: the LoveDA root holding Train/ and Val/ (or one split folder), each with Urban/ and Rural/ "
            "(Train/Train/Urban/ nesting also works) holding images_png/ and masks_png/; mask ids 1..7 become "
            "classes 0..6 and 0 (no-data) becomes --ignore_index. "
            "sidewalk: the output of prepare_sidewalk.py: images/, labels/ (ids, 0 = unlabeled is a class) "
            "and dataset_info.json (class names, palette, train/val split lists). "
            "landscape: imgs/ (jpg) and labels/ (grayscale ids 0..28: mountain, sky, water, ... other; 29 classes), "
            "at --data_root or under --data_root/<split>/ (the landscape style-transfer task's layout). "
            "(default: %(default)s)"
        ),
    )
    group.add_argument(
        "--class_names_json",
        type=str,
        default=None,
        help=(
            'JSON file with the class names, in id order: ["background", "building", ...] or '
            '{"class_names": [...], "palette": [[r, g, b], ...]}. Overrides the layout\'s own class list.'
        ),
    )
    group.add_argument(
        "--num_classes",
        type=positive_int,
        default=None,
        help=(
            "Number of classes (ids 0..N-1). Needed by --dataset generic when there is no class_names.json; "
            "otherwise only checked against the class list."
        ),
    )
    group.add_argument(
        "--ignore_index",
        type=non_negative_int,
        default=IGNORE_INDEX,
        help="Label id meaning no-data: excluded from losses and metrics, never a class. (default: %(default)s)",
    )
    group.add_argument(
        "--label_offset",
        type=non_negative_int,
        default=None,
        help=(
            "The mask file id of class 0: a file id i is class i - N, and ids below N are no-data (read as "
            "--ignore_index). Pass 1 for masks whose 0 marks unlabelled pixels and whose classes count from 1 "
            "(ADE20K-style; what other tools call reduce_zero_label or do_reduce_labels); the class names then "
            "leave the unlabelled entry out. Default: 1 for --dataset loveda (its files store 0 for no-data), "
            "else 0."
        ),
    )
    group.add_argument(
        "--split",
        type=str,
        default="train",
        help=(
            "Split to use: train or val. Selects the LoveDA split folder (Train/ or Val/), for "
            "--dataset sidewalk the split list in dataset_info.json, and for --dataset landscape the "
            "<split>/ folder when --data_root has no imgs/ of its own. --dataset generic has no splits "
            "and uses the whole folder. (default: %(default)s)"
        ),
    )
    group.add_argument(
        "--loveda_scenes",
        type=str,
        nargs="+",
        default=list(LOVEDA_SCENES),
        help="LoveDA scenes to use, Urban and/or Rural. (default: %(default)s)",
    )
    return parser


def dataset_from_args(args: argparse.Namespace, problems=None) -> SegmentationDataset:
    """The dataset the options of ``add_dataset_args`` describe; ``problems`` as in `load_segmentation_dataset`."""
    return load_segmentation_dataset(
        args.data_root,
        args.dataset,
        split=getattr(args, "split", "train"),
        loveda_scenes=getattr(args, "loveda_scenes", LOVEDA_SCENES),
        class_names_json=getattr(args, "class_names_json", None),
        num_classes=getattr(args, "num_classes", None),
        ignore_index=getattr(args, "ignore_index", IGNORE_INDEX),
        label_offset=getattr(args, "label_offset", None),
        problems=problems,
    )


# ---------------------------------------------------------------------------------------------
# python -m segdiff.data check ...
# ---------------------------------------------------------------------------------------------


def _summary(dataset: SegmentationDataset, class_pixels: np.ndarray, ignored_pixels: int) -> str:
    total = max(int(class_pixels.sum()) + ignored_pixels, 1)
    lines = [
        f"data_root: {dataset.data_root}",
        f"layout: {dataset.layout}   split: {dataset.split}   pairs: {len(dataset)}   classes: {dataset.num_classes}",
        "pixel share per class:",
    ]
    ignore_row = f"ignore ({dataset.ignore_index})"
    width = max(len(name) for name in [*dataset.class_names, ignore_row])
    for class_id, (name, pixels) in enumerate(zip(dataset.class_names, class_pixels)):
        lines.append(f"  {class_id:3d} {name:<{width}}  {100 * pixels / total:6.2f}%")
    lines.append(f"      {ignore_row:<{width}}  {100 * ignored_pixels / total:6.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segdiff.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        help="read every pair of a dataset and report every problem",
        description="Read every image/mask pair, print a summary and every problem found; exit 1 if any.",
    )
    add_dataset_args(check)
    args = parser.parse_args(argv)

    layout_problems = []  # unpaired files: noted, and the check goes on to read the pairs that were found
    try:
        dataset = dataset_from_args(args, problems=layout_problems)
    except DatasetError as err:
        for problem in layout_problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return 1
    scan = scan_dataset(dataset, progress=True)
    problems = layout_problems + scan.problems
    print(_summary(dataset, scan.class_pixels, scan.ignored_pixels))
    if not problems:
        print("no problems found")
        return 0
    print(f"{len(problems)} problem(s):")
    for problem in problems:
        print(f"- {problem}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
