#!/usr/bin/env python
"""Convert the sidewalk dataset (segments/sidewalk-semantic, 35 classes) into a `sidewalk` layout folder.

Reads the dataset from the Hugging Face Hub, or from a local copy given with --data_dir, resizes
every (image, label map) pair to a square --resolution and writes a folder that the trainers read
with ``--dataset sidewalk --data_root OUTPUT_DIR``:

    python prepare_sidewalk.py --output_dir data/sidewalk_processed --resolution 1024 --num_workers 8
    python prepare_sidewalk.py --data_dir /path/to/sidewalk-semantic --output_dir data/sidewalk_processed

Output (under --output_dir)::

    images/{stem}.png          RGB images (.jpg with --image_format jpg)
    labels/{stem}.png          single-channel class ids 0..34 (the palette is attached for viewing;
                               --ignore_index, 255, marks padding)
    colored_masks/{stem}.png   the label maps in colour (SIDEWALK_PALETTE, 35 distinct colours)
    class_names.json           {"class_names": [...], "palette": [[r, g, b], ...]}
    dataset_info.json          class names, palette, settings, class_pixel_frequency (each class's
                               share of the labelled pixels: padding excluded) and the split
                               {"train": [stems], "val": [stems]}

Stems are the zero-padded row number ("000000") unless the dataset has an id/name column.

Geometry (--aspect): ``crop`` (default) resizes the short side to --resolution and cuts the centre
square, so every output pixel is data but the long side loses its ends; ``pad`` resizes the long side
to --resolution and centres the picture on a square, so nothing is lost, with black image borders
and --ignore_index label borders (losses and metrics skip those pixels). Images are resampled with
antialiased Lanczos, label maps nearest-neighbour, so they keep their exact class ids.

Split: ``round(val_fraction * N)`` rows (half rounds up; at least one and never all of them when
--val_fraction > 0 and N > 1) chosen with --seed go to "val", the rest to "train". It depends only
on N, --val_fraction and --seed, never on --num_workers.

Re-running is cheap and safe: an item whose three files all exist is skipped (its pixel counts are
read back from its label file, so the frequencies stay right); each file is written under a hidden
temporary name and renamed, so an interrupted run never leaves a half-written file, and
dataset_info.json is written last. --overwrite redoes everything.
"""

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from segdiff.arguments import finite_float, non_negative_int, output_folder, positive_int
from segdiff.data import load_class_names, read_label_map, save_label_png, write_class_names
from segdiff.files import save_image_atomic, write_json_atomic
from segdiff.labels import IGNORE_INDEX, SIDEWALK_CLASSES, SIDEWALK_PALETTE, colorize_label, default_palette

logger = logging.getLogger("prepare_sidewalk")

DEFAULT_DATASET = "segments/sidewalk-semantic"
# Columns that name the rows; the first one present gives the file stems.
STEM_COLUMNS = ("id", "name", "image_id", "file_name", "filename")
# --image_format -> (PIL format, save options)
IMAGE_FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95})}
# Settings that change the pixels of every file: a re-run with other values must not mix old and new files.
GEOMETRY_SETTINGS = ("resolution", "aspect", "ignore_index")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the layout of the epilog (the module docstring) and shows every default."""


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=DEFAULT_DATASET,
        help="The dataset on the Hugging Face Hub (needs the network once; cached in --cache_dir). "
        "Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), pass --data_dir instead.",
    )
    parser.add_argument(
        "--data_dir",
        type=str,
        default=None,
        help="A local copy instead of the hub: a folder of parquet files (e.g. a clone of the hub repo: "
        "data/*.parquet + id2label.json), a single .parquet file, or a folder written by datasets' save_to_disk.",
    )
    parser.add_argument("--dataset_split", type=str, default="train", help="Which split of the source to convert.")
    parser.add_argument("--image_column", type=str, default="pixel_values", help="The column holding the images.")
    parser.add_argument("--label_column", type=str, default="label", help="The column holding the label maps.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where `datasets` keeps downloads and caches.")
    parser.add_argument("--output_dir", type=output_folder, default="data/sidewalk_processed", help="Where to write.")
    parser.add_argument("--resolution", type=positive_int, default=1024, help="Side of the square outputs, in pixels.")
    parser.add_argument(
        "--aspect",
        choices=["crop", "pad"],
        default="crop",
        help="crop: resize the short side to --resolution, then cut the centre square (the long side loses "
        "its ends). pad: resize the long side to --resolution and centre it on a square (image borders black, "
        "label borders --ignore_index).",
    )
    parser.add_argument(
        "--ignore_index",
        type=non_negative_int,
        default=IGNORE_INDEX,
        help="Label id written where --aspect pad adds borders (no class; skipped by losses and metrics).",
    )
    parser.add_argument("--image_format", choices=sorted(IMAGE_FORMATS), default="png", help="File type of images/.")
    parser.add_argument(
        "--val_fraction",
        type=finite_float,
        default=0.1,
        help="Fraction of rows in the 'val' split: round(val_fraction * N), half up; at least 1 and at most "
        "N - 1 when > 0 and N > 1. 0 puts every row in 'train'.",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="Seed of the train/val split.")
    parser.add_argument(
        "--num_workers",
        type=non_negative_int,
        default=min(8, os.cpu_count() or 1),
        help="Worker processes that decode, resize and write (0 or 1: in this process). "
        "The output does not depend on it. Default: the number of CPUs, at most 8.",
    )
    parser.add_argument(
        "--max_samples", type=positive_int, default=None, help="Convert only the first N rows (quick tries)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Redo every item, even those already written.")
    args = parser.parse_args(input_args)

    if not 0 <= args.val_fraction < 1:
        parser.error("--val_fraction must be in [0, 1)")
    if args.ignore_index > 255:
        parser.error("--ignore_index must be in 0..255: label maps are stored as 8-bit PNGs")
    return args


# ---------------------------------------------------------------------------------------------
# Loading the source dataset
# ---------------------------------------------------------------------------------------------


def hub_is_offline() -> bool:
    """True when the environment forbids downloads (the same spellings huggingface_hub accepts)."""
    return any(
        os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a failed connection, whichever HTTP library raised it."""
    while err is not None:
        name = type(err).__name__
        if isinstance(err, ConnectionError | TimeoutError) or any(
            word in name for word in ("Connect", "Timeout", "Offline")
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def load_source(args) -> tuple[datasets.Dataset, Path | None]:
    """The split to convert, and the local folder or file it came from (None for the hub)."""
    local = args.data_dir
    if local is None and Path(args.dataset_name).expanduser().exists():
        local = args.dataset_name  # a local path given as the dataset name works too
    if local is not None:
        return load_local_copy(Path(local).expanduser(), args.dataset_split, args.cache_dir), Path(local).expanduser()

    if hub_is_offline():
        # Fail now rather than wait on (or retry) a download that cannot happen.
        raise SystemExit(
            f"prepare_sidewalk.py: error: offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set), so "
            f"{args.dataset_name} cannot be fetched from the hub. Fix: pass --data_dir with a local copy (the "
            "hub repo's parquet files, or a save_to_disk folder), or unset the variables and run online."
        )
    try:
        dataset = datasets.load_dataset(args.dataset_name, split=args.dataset_split, cache_dir=args.cache_dir)
    except Exception as err:
        if is_network_error(err):
            raise SystemExit(
                f"prepare_sidewalk.py: error: could not download {args.dataset_name} ({type(err).__name__}: {err}). "
                "Fix: check the network connection, or pass --data_dir with a local copy."
            ) from err
        raise
    return dataset, None


def parquet_split(path: Path) -> str:
    """The split a parquet file belongs to, from its name as the hub writes it ("train-00000-of-00002.parquet")."""
    match = re.match(r"(train|validation|valid|val|test)(?=[-_.])", path.name)
    return match.group(1) if match else "train"


def load_local_copy(path: Path, split: str, cache_dir: str | None) -> datasets.Dataset:
    if not path.exists():
        raise SystemExit(f"prepare_sidewalk.py: error: --data_dir {path} does not exist. Fix: check the path.")

    # A save_to_disk folder: one Dataset (state.json) or a DatasetDict (dataset_dict.json).
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise SystemExit(
                    f"prepare_sidewalk.py: error: {path} has no split {split!r} (it has {', '.join(loaded)}). "
                    "Fix: pass --dataset_split."
                )
            loaded = loaded[split]
        return loaded

    # Parquet files: the hub repo layout (data/train-*.parquet), any folder of them, or one file.
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if not files:
        raise SystemExit(
            f"prepare_sidewalk.py: error: {path} holds no parquet files and is no save_to_disk folder. "
            "Fix: point --data_dir at a copy of the dataset (e.g. a clone of the hub repo)."
        )
    by_split = {}
    for file in files:
        by_split.setdefault(parquet_split(file), []).append(str(file))
    if split not in by_split:
        raise SystemExit(
            f"prepare_sidewalk.py: error: no parquet files of split {split!r} under {path} "
            f"(found {', '.join(sorted(by_split))}). Fix: pass --dataset_split."
        )
    return datasets.load_dataset("parquet", data_files={split: by_split[split]}, split=split, cache_dir=cache_dir)


def load_sidewalk_classes(local: Path | None) -> tuple[list[str], str]:
    """The class names: the id2label.json shipped with a local copy, else the 35 sidewalk classes (the same list)."""
    if local is not None:
        root = local if local.is_dir() else local.parent
        for folder in (root, root.parent):
            if (folder / "id2label.json").is_file():
                names, _ = load_class_names(folder / "id2label.json")
                return names, str(folder / "id2label.json")
    return list(SIDEWALK_CLASSES), "segdiff.data.SIDEWALK_CLASSES"


def select_columns(dataset: datasets.Dataset, args) -> tuple[datasets.Dataset, str | None]:
    """Keep the columns we need, as undecoded files (workers decode), and the first --max_samples rows."""
    missing = [column for column in (args.image_column, args.label_column) if column not in dataset.column_names]
    if missing:
        raise SystemExit(
            f"prepare_sidewalk.py: error: the dataset has no column {' or '.join(map(repr, missing))} "
            f"(it has {', '.join(dataset.column_names)}). Fix: pass --image_column / --label_column."
        )
    stem_column = next((c for c in STEM_COLUMNS if c in dataset.column_names and c != args.label_column), None)
    dataset = dataset.select_columns([args.image_column, args.label_column] + ([stem_column] if stem_column else []))
    # Undecoded, a row is a few hundred kB of PNG bytes: cheap to hand to a worker, which decodes it.
    for column in (args.image_column, args.label_column):
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = dataset.select(range(args.max_samples))
    return dataset, stem_column


# ---------------------------------------------------------------------------------------------
# Stems and the train/val split
# ---------------------------------------------------------------------------------------------


def safe_stem(value) -> str:
    """A file stem from an id or file name: no folders, no extension, no leading dot (hidden files are skipped)."""
    text = str(value)
    name = Path(text).name
    if Path(name).suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"):
        name = Path(name).stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")


def make_stems(dataset: datasets.Dataset, stem_column: str | None) -> list[str]:
    if stem_column is not None:
        stems = [safe_stem(value) for value in dataset[stem_column]]
        if all(stems) and len(set(stems)) == len(stems):
            return stems
        logger.warning("column %r does not name every row uniquely; naming the files by row number", stem_column)
    return [f"{index:06d}" for index in range(len(dataset))]


def split_stems(stems: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """A deterministic train/val split (see --val_fraction); each split keeps the dataset order."""
    n = len(stems)
    num_val = math.floor(val_fraction * n + 0.5)  # round half up (Python's round() goes to even)
    if val_fraction > 0 and n > 1:
        num_val = min(max(num_val, 1), n - 1)
    else:
        num_val = 0
    val = set(np.random.default_rng(seed).permutation(n)[:num_val].tolist())
    return {
        "train": [stem for index, stem in enumerate(stems) if index not in val],
        "val": [stem for index, stem in enumerate(stems) if index in val],
    }


# ---------------------------------------------------------------------------------------------
# One item: decode, resize, write
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemOptions:
    output_dir: Path
    resolution: int
    aspect: str
    ignore_index: int
    image_format: str
    image_column: str
    label_column: str
    palette: tuple


def output_paths(output_dir: Path, stem: str, image_format: str) -> dict[str, Path]:
    return {
        "image": output_dir / "images" / f"{stem}.{image_format}",
        "label": output_dir / "labels" / f"{stem}.png",
        "colored_mask": output_dir / "colored_masks" / f"{stem}.png",
    }


def open_image(value) -> Image.Image:
    """A decoded PIL image from a `datasets` Image cell ({"bytes", "path"}), raw bytes, a path or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
    if isinstance(value, bytes):
        data = value
    image = Image.open(io.BytesIO(data) if data is not None else path)
    image.load()
    return image


def label_image(image: Image.Image, where: str) -> Image.Image:
    """The label map as a mode-L image of the stored ids (for a paletted file: the palette indices, not colours)."""
    if image.mode in ("LA", "PA"):
        image = image.getchannel(0)
    ids = np.asarray(image)
    if ids.ndim == 3:  # a grey picture saved as RGB still holds ids; a colour one does not
        if not (ids[..., :1] == ids[..., :3]).all():
            raise ValueError(f"{where}: the label is a colour image, not a map of class ids")
        ids = ids[..., 0]
    if ids.min() < 0 or ids.max() > 255:
        raise ValueError(f"{where}: label ids {ids.min()}..{ids.max()} do not fit the 8-bit label PNGs")
    return Image.fromarray(ids.astype(np.uint8))


def resize_pair(
    image: Image.Image, label: Image.Image, resolution: int, aspect: str, ignore_index: int = IGNORE_INDEX
) -> tuple[Image.Image, Image.Image]:
    """Resize an (RGB image, L label) pair to ``resolution`` x ``resolution`` with the same geometry (see --aspect)."""
    width, height = image.size
    if aspect == "crop":
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    else:
        scale = resolution / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Lanczos in PIL widens its kernel when shrinking, i.e. it antialiases; nearest keeps ids exact.
    image = image.resize(size, Image.Resampling.LANCZOS)
    label = label.resize(size, Image.Resampling.NEAREST)
    if aspect == "crop":
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        box = (left, top, left + resolution, top + resolution)
        return image.crop(box), label.crop(box)
    offset = ((resolution - size[0]) // 2, (resolution - size[1]) // 2)
    padded_image = Image.new("RGB", (resolution, resolution), (0, 0, 0))
    padded_label = Image.new("L", (resolution, resolution), ignore_index)
    padded_image.paste(image, offset)
    padded_label.paste(label, offset)
    return padded_image, padded_label


def save_atomically(image: Image.Image, path: Path, image_format: str = "png") -> None:
    """Save in ``image_format`` (--image_format's png or jpg) under a temporary name, then rename."""
    pil_format, options = IMAGE_FORMATS[image_format]
    save_image_atomic(image, path, pil_format, **options)


# Set once per worker process by init_worker (and in this process when --num_workers is 0 or 1).
_worker_state = {}


def init_worker(dataset: datasets.Dataset, options: ItemOptions) -> None:
    _worker_state["dataset"] = dataset
    _worker_state["options"] = options


def process_item(task: tuple[int, str, bool]) -> tuple[np.ndarray, bool]:
    """Write one item (or read back a finished one); return its label id histogram and whether it was written."""
    index, stem, finished = task
    options: ItemOptions = _worker_state["options"]
    paths = output_paths(options.output_dir, stem, options.image_format)
    if finished:
        ids = read_label_map(paths["label"])
    else:
        row = _worker_state["dataset"][index]
        where = f"row {index} ({stem})"
        image = open_image(row[options.image_column]).convert("RGB")
        label = label_image(open_image(row[options.label_column]), where)
        if image.size != label.size:
            raise ValueError(f"{where}: the image is {image.size} but its label map {label.size} (width, height)")
        image, label = resize_pair(image, label, options.resolution, options.aspect, options.ignore_index)
        ids = np.asarray(label)
        # The label goes last among the three, but any order works: an item counts as finished only once all
        # three files exist, and each appears whole or not at all.
        save_atomically(image, paths["image"], options.image_format)
        for other in IMAGE_FORMATS:  # a stem with two image files would make pairing by name ambiguous
            if other != options.image_format:
                paths["image"].with_suffix(f".{other}").unlink(missing_ok=True)
        save_atomically(colorize_label(ids, options.palette, options.ignore_index), paths["colored_mask"])
        save_label_png(ids, paths["label"], palette=options.palette)
    return np.bincount(np.asarray(ids).ravel(), minlength=256), not finished


def process_all(dataset, tasks, options: ItemOptions, num_workers: int) -> tuple[np.ndarray, int]:
    """Run every task, in worker processes or here; the summed id histogram and the number of items written."""
    counts = np.zeros(256, dtype=np.int64)
    written = 0
    with contextlib.ExitStack() as stack:
        if num_workers > 1:
            pool = stack.enter_context(Pool(num_workers, initializer=init_worker, initargs=(dataset, options)))
            results = pool.imap_unordered(process_item, tasks)
        else:
            init_worker(dataset, options)
            results = map(process_item, tasks)
        # Integer sums do not depend on the order results arrive in.
        for item_counts, wrote in tqdm(results, total=len(tasks), desc="Preparing sidewalk", unit="image"):
            counts += item_counts
            written += wrote
    return counts, written


# ---------------------------------------------------------------------------------------------
# dataset_info.json
# ---------------------------------------------------------------------------------------------


def class_frequencies(counts: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Each class's share of the labelled pixels (everything but --ignore_index and unknown ids); sums to 1."""
    labelled = counts[: len(class_names)]
    total = int(labelled.sum())
    return {name: (int(count) / total if total else 0.0) for name, count in zip(class_names, labelled)}


def check_previous_settings(output_dir: Path, settings: dict) -> None:
    """Refuse to skip files written with another geometry: the folder would mix two resolutions."""
    info_path = output_dir / "dataset_info.json"
    try:
        previous = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return
    changed = [
        f"--{key} {previous[key]} (now {settings[key]})"
        for key in GEOMETRY_SETTINGS
        if isinstance(previous, dict) and key in previous and previous[key] != settings[key]
    ]
    if changed:
        raise SystemExit(
            f"prepare_sidewalk.py: error: {output_dir} was prepared with {', '.join(changed)}; reusing its files "
            "would mix the two. Fix: pass --overwrite to redo every item, or choose another --output_dir."
        )


def main(args):
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)

    dataset, local = load_source(args)
    class_names, names_source = load_sidewalk_classes(local)
    palette = SIDEWALK_PALETTE if len(class_names) == len(SIDEWALK_PALETTE) else default_palette(len(class_names))
    if args.ignore_index < len(class_names):
        raise SystemExit(
            f"prepare_sidewalk.py: error: --ignore_index {args.ignore_index} is a class id "
            f"(classes are 0..{len(class_names) - 1}). Fix: use 255."
        )
    dataset, stem_column = select_columns(dataset, args)
    stems = make_stems(dataset, stem_column)
    splits = split_stems(stems, args.val_fraction, args.seed)
    logger.info(
        "%d rows from %s; classes from %s; %d train / %d val",
        len(stems),
        local or args.dataset_name,
        names_source,
        len(splits["train"]),
        len(splits["val"]),
    )

    settings = {"resolution": args.resolution, "aspect": args.aspect, "ignore_index": args.ignore_index}
    if not args.overwrite:
        check_previous_settings(output_dir, settings)
    for folder in ("images", "labels", "colored_masks"):
        (output_dir / folder).mkdir(parents=True, exist_ok=True)

    # An item is finished when all three of its files exist (each is written whole or not at all).
    tasks = []
    for index, stem in enumerate(stems):
        paths = output_paths(output_dir, stem, args.image_format)
        finished = not args.overwrite and all(path.is_file() for path in paths.values())
        tasks.append((index, stem, finished))
    options = ItemOptions(
        output_dir=output_dir,
        resolution=args.resolution,
        aspect=args.aspect,
        ignore_index=args.ignore_index,
        image_format=args.image_format,
        image_column=args.image_column,
        label_column=args.label_column,
        palette=tuple(palette),
    )
    counts, written = process_all(dataset, tasks, options, args.num_workers)
    skipped = len(tasks) - written
    if skipped:
        logger.info(
            "Skipped %d finished item(s) already in %s (pass --overwrite to redo them); wrote %d.",
            skipped,
            output_dir,
            written,
        )

    unknown = [i for i in range(len(class_names), 256) if counts[i] and i != args.ignore_index]
    if unknown:
        logger.warning(
            "label ids %s are neither classes (0..%d) nor --ignore_index; the training data loader will reject them",
            unknown,
            len(class_names) - 1,
        )

    # Written last and atomically, so a crash above leaves the previous dataset_info.json (if any) intact.
    write_class_names(output_dir / "class_names.json", class_names, palette)
    info = {
        "dataset_name": args.dataset_name,
        "data_dir": str(local) if local is not None else None,
        "class_names": class_names,
        "palette": [list(colour) for colour in palette],
        "num_images": len(stems),
        "resolution": args.resolution,
        "aspect": args.aspect,
        "ignore_index": args.ignore_index,
        "image_format": args.image_format,
        "class_pixel_frequency": class_frequencies(counts, class_names),
        "ignored_pixels": int(counts[args.ignore_index]),
        "splits": splits,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
    }
    write_json_atomic(output_dir / "dataset_info.json", info)
    logger.info(
        "Done: %d images in %s (%d train, %d val). Train with --dataset sidewalk --data_root %s",
        len(stems),
        output_dir,
        len(splits["train"]),
        len(splits["val"]),
        output_dir,
    )


if __name__ == "__main__":
    main(parse_args())
