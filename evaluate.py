#!/usr/bin/env python
"""Score generated images: realism (FID, KID), diversity (LPIPS), faithfulness to their masks (mIoU),
colour style, and usefulness as training data (--downstream).

    python evaluate.py --generated_dir outputs/sdm_samples --real_dir data/toy/train \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth --lpips_weights alexnet-owt-7be5be79.pth \\
        --segmenter palette --results_dir outputs/sdm_eval

--generated_dir may hold (detected in this order):
  metadata.jsonl     what every generator of this project writes: one JSON line per image, with "file_name"
                     and "mask_file_name" (paths relative to the folder). Images with the same "mask_index"
                     (or "sample_dir") were generated from the same input mask (SDM, ControlNet); records with
                     a "class_id" and no mask_index are the joint generator's (image, class-vs-rest mask) pairs.
  generated_images/sample_XXXXXX/generated_NN.png, without metadata: one folder per input mask; the masks
                     then come from --masks_dir, paired with the sample folders in sorted order.
  images/ (+ masks/) a generic dataset: images and label maps paired by file stem.
  image files        just images (FID, KID, LPIPS, style only).
--masks_dir replaces the masks named there: a mask is looked up by the stem of the metadata's "mask_source"
(the generator's input mask), else of its "mask_file_name", else of the image.

Metrics (--metrics, a comma list). By default, every metric whose inputs are here, weights included; the
others are skipped, each with its reason (printed, and in the report). A metric named in --metrics must have
its inputs, or the script stops at once saying what is missing (for weights: the file, its URL, where to put it).
  fid, kid  against the images of --real_dir, by torch-fidelity's protocol, so that the numbers compare with
            published ones: each image goes as uint8 at its own size into torch-fidelity's Inception-v3, which
            resizes it to 299 itself (TensorFlow-1-compatible bilinear); FID and KID of its 2048 pool3 features
            are what torch_fidelity.calculate_metrics(input1=generated, input2=real) reports. KID: 100 subsets
            of 1000 images, seed 2020 (torch-fidelity's defaults; --kid_subsets, --kid_subset_size, --kid_seed),
            the subset shrunk to the smaller set when there are fewer images (recorded). Images of different
            sizes are batched by size (an image's features do not depend on its batch-mates). The report and
            metrics.json name the protocol; --feature_image_size (resize first) and
            --feature_extractor_torchscript (another network) depart from it, and say so there.
  lpips     diversity: the mean pairwise LPIPS (AlexNet) among the images generated from one mask, averaged
            over masks. Higher means more varied samples; 0 means identical ones.
  miou      semantic consistency: a segmenter (--segmenter) reads each generated image, and its label map is
            compared with the mask the image was generated from: mIoU, pixel accuracy, per-class IoU. For the
            joint layout the prediction is reduced to the same class-vs-rest form as the mask.
  style     colour-histogram correlation (64 bins per RGB channel, OpenCV's HISTCMP_CORREL) between each
            generated image and its reference image from --reference_dir, averaged over channels and images.

Weights, offline: evaluate.py never downloads. FID/KID take --inception_weights (torch-fidelity's
weights-inception-2015-12-05-6726825d.pth, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth), else that file
from the torch hub cache (TORCH_HOME/hub/checkpoints). It is read with torch.load(weights_only=True) only, which
reads tensors and runs no code from the file; a file that needs more (a TorchScript archive, a pickled object) is
refused. A custom feature extractor is explicit: --feature_extractor_torchscript FILE, a TorchScript module mapping
(B, 3, H, W) images to (B, D) features, called with uint8 0..255 images, or, if that raises, float images in
[0, 1]. Loading a TorchScript module runs code from its file: pass only files you trust. LPIPS takes
--lpips_weights (torchvision's AlexNet alexnet-owt-7be5be79.pth, or any state dict with its "features.*" keys;
also weights_only=True), else that file from the hub cache. Without them the script stops at once and says which
file to download and where to put it.

--downstream trains a small UNet twice with the same seed, steps and settings, on the real training split
only and on it plus the generated (image, mask) pairs, and scores both on the real validation split (--real_dir's
val/ split, --real_val_dir, or a held-out --downstream_val_fraction): both mIoUs and the gain. The joint
generator's masks are class-vs-rest (its class, and "the rest", written as class 0 or ignore, where any other
class may be): for training, their rest pixels become --ignore_index, so they teach only their own class.

Writes to --results_dir, by default a folder next to the generated one, GENERATED_DIR_evaluation (e.g.
outputs/sdm_samples -> outputs/sdm_samples_evaluation), so the inputs are left as they were: metrics.json,
evaluation_report.txt, per_class_iou.png (with miou) and comparison_grid.png (colourised mask | real image with
the mask's stem, if any | generated samples).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from segdiff.data import (
    DATASETS,
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    DatasetError,
    _files_by_stem,
    colorize_label,
    default_palette,
    load_class_names,
    load_segmentation_dataset,
    read_image,
    read_label_map,
)

ALL_METRICS = ("fid", "kid", "lpips", "miou", "style")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# pytorch-fid's copy of the same TensorFlow Inception weights, under the same parameter names.
INCEPTION_FILES = (INCEPTION_FILE, "pt_inception-2015-12-05-6726825d.pth")
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
# AlexNet shrinks 32 px to 1x1 before its last layers: LPIPS needs images at least this big.
LPIPS_MIN_SIZE = 64
# torch-fidelity's KID defaults (torch_fidelity.defaults.DEFAULTS: kid_subsets, kid_subset_size, rng_seed), written
# out so that --help needs no torch-fidelity import; a test checks they still agree.
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a zero batch size or step count is a mistake, not a request)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("inputs")
    data.add_argument("--generated_dir", required=True, help="The generator's output folder (see above).")
    data.add_argument(
        "--real_dir",
        default=None,
        help="Real images, for FID/KID, the grid and --downstream: a folder of images, a generic dataset "
        "(images/ + masks/), a folder holding train/ and val/ generic datasets (what python -m segdiff.toy "
        "--val_images N writes; --real_split picks one), or a LoveDA / sidewalk root with --real_dataset.",
    )
    data.add_argument(
        "--real_dataset",
        choices=DATASETS,
        default="generic",
        help="Layout of --real_dir (see python -m segdiff.data check --help). (default: %(default)s)",
    )
    data.add_argument(
        "--real_split",
        default="train",
        help="The split of --real_dir whose images FID/KID compare with, and --downstream trains on, when "
        "--real_dir has splits. (default: %(default)s)",
    )
    data.add_argument(
        "--real_val_dir",
        default=None,
        help="Real validation set (generic layout) for --downstream. Default: the val split of --real_dir, or, "
        "if it has none, a held-out --downstream_val_fraction of it.",
    )
    data.add_argument("--masks_dir", default=None, help="Take the masks from this folder instead (see above).")
    data.add_argument(
        "--class_names_json",
        default=None,
        help='Class names (and palette): a JSON list, or {"class_names": [...], "palette": [...]}. '
        "Default: GENERATED_DIR/class_names.json, else --num_classes.",
    )
    data.add_argument("--num_classes", type=int, default=None, help="Number of classes when no class names exist.")
    data.add_argument(
        "--ignore_index",
        type=int,
        default=IGNORE_INDEX,
        help="Mask id meaning no-data: not scored. (default: %(default)s)",
    )
    data.add_argument(
        "--reference_dir",
        default=None,
        help="Reference images for the style metric: one image for all, or a folder whose images pair with the "
        "generated ones by file stem (the image's own stem, else the stem of the mask it came from).",
    )

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--metrics",
        default=None,
        help=f"Comma list among {','.join(ALL_METRICS)}. Default: those whose inputs are given: fid,kid with "
        "--real_dir and Inception weights found; lpips when masks have several samples each and AlexNet weights are "
        "found; miou with --segmenter and masks; style with --reference_dir. The others are skipped with the reason. "
        "Naming a metric whose inputs are missing is an error that says what is missing.",
    )
    extractor = metrics.add_mutually_exclusive_group()
    extractor.add_argument(
        "--inception_weights",
        default=None,
        help=f"FID/KID Inception-v3 weights: torch-fidelity's {INCEPTION_FILE} ({INCEPTION_URL}) or pytorch-fid's "
        "copy, read with torch.load(weights_only=True) only (tensors, no code). Default: that file in the torch hub "
        "cache.",
    )
    extractor.add_argument(
        "--feature_extractor_torchscript",
        default=None,
        metavar="FILE",
        help="A custom FID/KID feature extractor instead of Inception: a TorchScript module (torch.jit.save) mapping "
        "(B, 3, H, W) uint8 (or, failing that, float 0..1) images to (B, D) features. Loading it RUNS CODE FROM THE "
        "FILE: use only files you trust. The scores are then not comparable with published FID/KID.",
    )
    metrics.add_argument(
        "--feature_image_size",
        type=positive_int,
        default=None,
        help="Non-standard: resize every image to this side (PIL bicubic, stretched if not square) before the "
        "FID/KID extractor. Default: none; images go in at their own size and Inception resizes them to 299 "
        "itself, as torch-fidelity does (the protocol of published FIDs).",
    )
    metrics.add_argument(
        "--kid_subsets",
        type=positive_int,
        default=KID_SUBSETS,
        help="KID subsets. (default: %(default)s, torch-fidelity's)",
    )
    metrics.add_argument(
        "--kid_subset_size",
        type=positive_int,
        default=None,
        help=f"Images per KID subset. Default: torch-fidelity's {KID_SUBSET_SIZE}, or the number of real or "
        "generated images if either is smaller (recorded in the report: such a KID is not comparable with "
        "published ones).",
    )
    metrics.add_argument(
        "--kid_seed",
        type=int,
        default=KID_SEED,
        help="Seed of the KID subsets (numpy RandomState, as torch-fidelity draws them). (default: %(default)s, "
        "torch-fidelity's)",
    )
    metrics.add_argument(
        "--lpips_weights",
        default=None,
        help=f"AlexNet backbone for LPIPS: torchvision's {ALEXNET_FILE} ({ALEXNET_URL}) or any state dict with "
        "its features.* keys. Default: that file in the torch hub cache. (LPIPS' own linear layers ship with "
        "the lpips package.)",
    )
    metrics.add_argument(
        "--segmenter",
        default=None,
        help="For miou: 'palette' (nearest class colour of the class_names.json palette: exact on the toy "
        "data) or a transformers semantic-segmentation folder (SegFormer: config.json + weights, and "
        "preprocessor_config.json; without one, images are resized to 512x512 and normalised with the "
        "ImageNet mean/std, SegformerImageProcessor's defaults).",
    )
    metrics.add_argument(
        "--segmenter_class_map",
        default=None,
        help='JSON file {"segmenter id": our class id, or null / "ignore"} for a segmenter whose classes differ '
        "from ours. Pixels predicted as a null/ignore or unlisted id are no class of ours: they count as "
        "wrong. Required when the segmenter's number of classes differs from ours.",
    )
    metrics.add_argument("--histogram_bins", type=positive_int, default=64, help="Style histogram bins per channel.")

    downstream = parser.add_argument_group("downstream: train a small segmenter on real vs real + generated")
    downstream.add_argument(
        "--downstream",
        action="store_true",
        help="Train a small UNet on the real training split only, and on it plus the generated (image, mask) "
        "pairs, with the same seed, steps and settings; report both mIoUs on the real validation split and "
        "the gain.",
    )
    downstream.add_argument(
        "--downstream_steps", type=positive_int, default=300, help="Training steps of each run. (default: %(default)s)"
    )
    downstream.add_argument(
        "--downstream_resolution",
        type=positive_int,
        default=None,
        help="Side images and masks are resized to (multiple of 4; stretched if not square). Default: the short "
        "side of the first real training image, at most 128 (32 for the toy data).",
    )
    downstream.add_argument(
        "--downstream_real_limit",
        type=positive_int,
        default=None,
        help="Train on only this many (seeded, random) real training pairs, in both runs: synthetic data "
        "matters most when real data is scarce.",
    )
    downstream.add_argument("--downstream_batch_size", type=positive_int, default=16)
    downstream.add_argument("--downstream_learning_rate", type=float, default=1e-3)
    downstream.add_argument(
        "--downstream_val_fraction",
        type=float,
        default=0.2,
        help="Share of the real set held out for validation when there is no val split. (default: %(default)s)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--results_dir",
        default=None,
        help="Where results go. Default: GENERATED_DIR_evaluation, a folder next to --generated_dir (e.g. "
        "outputs/sdm_samples -> outputs/sdm_samples_evaluation): nothing is written into the inputs.",
    )
    output.add_argument("--grid_masks", type=positive_int, default=4, help="Masks (rows) in comparison_grid.png.")
    output.add_argument("--grid_samples", type=positive_int, default=4, help="Generated samples per row of the grid.")
    output.add_argument("--batch_size", type=positive_int, default=32, help="Images per batch for the networks.")
    output.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    output.add_argument(
        "--seed", type=int, default=0, help="Seeds the downstream runs (KID's subsets: --kid_seed). (default: 0)"
    )
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# What was generated
# ------------------------------------------------------------------------------------------------


@dataclass
class GeneratedSample:
    image: Path
    mask: Path | None = None
    # Images generated from the same input mask share a group (LPIPS diversity, grid rows).
    group: str = ""
    # Stem of the input mask: pairs the sample with real and reference images of that name.
    source: str = ""
    # Joint layout only: the class the mask marks, the rest being background or ignore.
    class_id: int | None = None


@dataclass
class GeneratedSet:
    root: Path
    layout: str
    samples: list[GeneratedSample]

    def groups(self) -> dict[str, list[GeneratedSample]]:
        """Samples by input mask, in the order the masks first appear."""
        groups: dict[str, list[GeneratedSample]] = {}
        for sample in self.samples:
            groups.setdefault(sample.group, []).append(sample)
        return groups

    @property
    def has_masks(self) -> bool:
        return bool(self.samples) and all(sample.mask is not None for sample in self.samples)


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; hidden files (unfinished atomic writes) skipped."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def read_metadata(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path} line {number} is not JSON ({err}). Fix: correct or delete that line.") from None
        if not isinstance(record, dict) or "file_name" not in record:
            raise SystemExit(
                f'{path} line {number} has no "file_name". Fix: each line must be a JSON object with "file_name" '
                '(the image, relative to the folder) and optionally "mask_file_name".'
            )
        records.append(record)
    if not records:
        raise SystemExit(f"{path} is empty. Fix: re-run the generator, or delete it to evaluate the image files.")
    return records


def samples_from_metadata(root: Path) -> GeneratedSet:
    records = read_metadata(root / "metadata.jsonl")
    mask_conditioned = any("mask_index" in r or "sample_dir" in r for r in records)
    joint = not mask_conditioned and any("class_id" in r for r in records)
    samples = []
    for record in records:
        if "mask_index" in record:
            group = f"mask_{record['mask_index']}"
        else:
            group = record.get("sample_dir", record["file_name"])
        source_file = record.get("mask_source") or record.get("mask_file_name") or record["file_name"]
        mask = record.get("mask_file_name")
        samples.append(
            GeneratedSample(
                image=root / record["file_name"],
                mask=root / mask if mask else None,
                group=str(group),
                source=Path(source_file).stem,
                class_id=int(record["class_id"]) if joint and mask and "class_id" in record else None,
            )
        )
    layout = "mask-conditioned" if mask_conditioned else "joint" if joint else "metadata"
    return GeneratedSet(root, layout, samples)


def samples_from_sample_folders(root: Path) -> GeneratedSet:
    folders = sorted(path for path in (root / "generated_images").iterdir() if path.is_dir())
    samples = [
        GeneratedSample(image=image, group=folder.name, source=folder.name)
        for folder in folders
        for image in image_files(folder)
    ]
    return GeneratedSet(root, "sample-folders", samples)


def samples_from_files(root: Path) -> GeneratedSet:
    images_dir = root / "images" if (root / "images").is_dir() else root
    masks = _files_by_stem(root / "masks") if (root / "masks").is_dir() else {}
    samples = [
        GeneratedSample(image=path, mask=masks.get(path.stem), group=path.stem, source=path.stem)
        for path in _files_by_stem(images_dir).values()
    ]
    return GeneratedSet(root, "generic" if masks else "images", samples)


def read_generated_set(root: Path, masks_dir: Path | None) -> GeneratedSet:
    """The generated samples of ``root``, whichever layout it has (see the module docstring)."""
    if not root.is_dir():
        raise SystemExit(f"--generated_dir {root} does not exist or is not a folder. Fix: check the path.")
    if (root / "metadata.jsonl").is_file():
        generated = samples_from_metadata(root)
    elif (root / "generated_images").is_dir():
        generated = samples_from_sample_folders(root)
    else:
        generated = samples_from_files(root)
    if not generated.samples:
        raise SystemExit(
            f"found no generated images in {root}: expected metadata.jsonl, generated_images/sample_*/, images/ or "
            f"image files ({' '.join(IMAGE_EXTENSIONS)}). Fix: point --generated_dir at a generator's --save_dir."
        )
    if masks_dir is not None:
        replace_masks(generated, masks_dir)
    check_files_exist([s.image for s in generated.samples], "generated image")
    check_files_exist([s.mask for s in generated.samples if s.mask is not None], "mask")
    return generated


def replace_masks(generated: GeneratedSet, masks_dir: Path) -> None:
    if not masks_dir.is_dir():
        raise SystemExit(f"--masks_dir {masks_dir} does not exist or is not a folder. Fix: check the path.")
    masks = _files_by_stem(masks_dir)
    if generated.layout == "sample-folders":
        # Without metadata, only the order links a sample folder to its mask.
        groups = generated.groups()
        if len(masks) != len(groups):
            raise SystemExit(
                f"{generated.root}/generated_images holds {len(groups)} sample folders but --masks_dir {masks_dir} "
                f"holds {len(masks)} masks; without metadata.jsonl they are paired in sorted order, so the counts "
                "must match. Fix: pass the --masks_dir the generator was given."
            )
        for (stem, mask), group in zip(sorted(masks.items()), groups.values()):
            for sample in group:
                sample.mask, sample.source = mask, stem
        return
    missing = sorted({sample.source for sample in generated.samples if sample.source not in masks})
    if missing:
        raise SystemExit(
            f"--masks_dir {masks_dir} has no mask for {len(missing)} generated sample(s), looked up by stem: "
            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}. Fix: pass the folder of the masks the "
            "images were generated from."
        )
    for sample in generated.samples:
        sample.mask, sample.class_id = masks[sample.source], None  # whole label maps now, not class-vs-rest


def check_files_exist(paths: list[Path], kind: str) -> None:
    missing = [path for path in paths if not path.is_file()]
    if missing:
        shown = ", ".join(str(path) for path in missing[:3])
        raise SystemExit(
            f"{len(missing)} {kind} file(s) listed are missing, e.g. {shown}. Fix: re-run the generator (it "
            "resumes), or remove their lines from metadata.jsonl."
        )


# ------------------------------------------------------------------------------------------------
# Real images and classes
# ------------------------------------------------------------------------------------------------


def real_split_root(real_dir: Path, split: str) -> Path:
    """For a generic --real_dir: its ``split``/ sub-dataset when it has one, else the folder itself."""
    return real_dir / split if (real_dir / split / "images").is_dir() else real_dir


def real_image_files(args) -> list[Path]:
    real_dir = Path(args.real_dir)
    if not real_dir.is_dir():
        raise SystemExit(f"--real_dir {real_dir} does not exist or is not a folder. Fix: check the path.")
    if args.real_dataset != "generic":
        dataset = load_segmentation_dataset(real_dir, args.real_dataset, split=args.real_split)
        return [image for image, _ in dataset.pairs]
    root = real_split_root(real_dir, args.real_split)
    folder = root / "images" if (root / "images").is_dir() else root
    files = image_files(folder)
    if not files:
        raise SystemExit(
            f"--real_dir {real_dir}: found no images in {folder}. Fix: point it at a folder of images, a generic "
            "dataset (images/ + masks/), or a folder with train/ and val/ datasets."
        )
    return files


@dataclass
class Classes:
    names: list[str]
    palette: list[tuple[int, int, int]]
    palette_is_real: bool  # False when made up by default_palette: the palette segmenter cannot use it
    source: str


def resolve_classes(args, generated_dir: Path) -> Classes | None:
    """--class_names_json, else GENERATED_DIR/class_names.json, else --num_classes default names; or None."""
    files = []
    if args.class_names_json is not None:
        if not Path(args.class_names_json).is_file():
            raise SystemExit(f"--class_names_json {args.class_names_json} does not exist. Fix: check the path.")
        files.append(Path(args.class_names_json))
    if (generated_dir / "class_names.json").is_file():
        files.append(generated_dir / "class_names.json")
    if files:
        names, palette = load_class_names(files[0])
        source = str(files[0])
        if palette is None and len(files) > 1:
            # A --class_names_json without colours keeps the generated folder's palette if the classes line up.
            _, other_palette = load_class_names(files[1])
            palette = other_palette if other_palette and len(other_palette) == len(names) else None
        if args.num_classes is not None and args.num_classes != len(names):
            raise SystemExit(
                f"--num_classes {args.num_classes} disagrees with the {len(names)} class names of {source}. "
                "Fix: drop --num_classes, or pass the matching --class_names_json."
            )
    elif args.num_classes is not None:
        if args.num_classes < 1:
            raise SystemExit(f"--num_classes must be at least 1, got {args.num_classes}.")
        names, palette, source = [f"class_{i}" for i in range(args.num_classes)], None, "--num_classes"
    else:
        return None
    if 0 <= args.ignore_index < len(names):
        raise SystemExit(f"--ignore_index {args.ignore_index} is also a class id (0..{len(names) - 1}).")
    return Classes(names, list(palette or default_palette(len(names))), palette is not None, source)


# ------------------------------------------------------------------------------------------------
# Which metrics, and are their weights here? Checked before any long work, so a mistake stops at once.
# ------------------------------------------------------------------------------------------------


def missing_inputs(args, generated: GeneratedSet) -> dict[str, str | None]:
    """For each metric, what it lacks (None when its inputs are all here)."""
    largest_group = max(len(group) for group in generated.groups().values())
    missing = {
        "fid": None if args.real_dir else "needs --real_dir (the real images to compare with)",
        "lpips": None
        if largest_group >= 2
        else f"needs several images per mask, but every mask of {generated.root} ({generated.layout} layout) has one",
        "miou": None,
        "style": None if args.reference_dir else "needs --reference_dir (the images whose colours to match)",
    }
    if not args.segmenter:
        missing["miou"] = "needs --segmenter (palette, or a SegFormer folder)"
    elif not generated.has_masks:
        missing["miou"] = "needs masks (metadata.jsonl's mask_file_name, a masks/ folder, or --masks_dir)"
    missing["kid"] = missing["fid"]
    return missing


def choose_metrics(args, generated: GeneratedSet) -> tuple[list[str], dict[str, str]]:
    """The metrics to compute, and why each of the others is skipped.

    Named in --metrics: each must have its inputs, or the script stops saying what is missing. By default:
    each metric whose inputs are here, weights included (found ones, or a path given); the rest are skipped
    with the reason, which is printed and reported.
    """
    missing = missing_inputs(args, generated)
    if args.metrics is not None:
        chosen = list(dict.fromkeys(name.strip().lower() for name in args.metrics.split(",") if name.strip()))
        unknown = [name for name in chosen if name not in ALL_METRICS]
        if unknown:
            raise SystemExit(f"unknown metric {unknown[0]!r} in --metrics. Fix: choose among {','.join(ALL_METRICS)}.")
        for name in chosen:
            if missing[name] is not None:
                raise SystemExit(f"--metrics {name} {missing[name]}.")
        return chosen, {}

    extractor = args.inception_weights or args.feature_extractor_torchscript
    weights = {"fid": (extractor, INCEPTION_FILES, INCEPTION_URL, "--inception_weights")}
    weights["kid"] = weights["fid"]
    weights["lpips"] = (args.lpips_weights, (ALEXNET_FILE,), ALEXNET_URL, "--lpips_weights")
    for name, (given, file_names, url, option) in weights.items():
        if missing[name] is None and given is None and cached_weights(file_names) is None:
            missing[name] = f"no weights: download {url} and pass {option} PATH (or put it in {hub_checkpoints()})"
    chosen = [name for name in ALL_METRICS if missing[name] is None]
    skipped = {name: reason for name, reason in missing.items() if reason is not None}
    if not chosen and not args.downstream:
        reasons = "; ".join(f"{name} {reason}" for name, reason in skipped.items())
        raise SystemExit(f"nothing to evaluate: {reasons}.")
    return chosen, skipped


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights(file_names: tuple[str, ...]) -> Path | None:
    """The first of these files present in the torch hub cache (where torch-fidelity and torchvision keep them)."""
    return next((hub_checkpoints() / name for name in file_names if (hub_checkpoints() / name).is_file()), None)


def find_weights(given: str | None, option: str, file_names: tuple[str, ...], url: str, needed_by: str) -> Path:
    """The weights file: the option's path, else a known file name in the torch hub cache; else stop now."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise SystemExit(f"{option} {path} does not exist. Fix: check the path (download: {url}).")
        return path
    cached = cached_weights(file_names)
    if cached is not None:
        return cached
    raise SystemExit(
        f"{needed_by} need the weights file {file_names[0]}, and none was given ({option}) or found in the torch hub "
        f"cache {hub_checkpoints()}. evaluate.py never downloads (offline machines would hang). Fix: download "
        f"{url} and pass {option} /path/to/{file_names[0]}, or put it at {hub_checkpoints() / file_names[0]}; "
        "or leave those metrics out of --metrics."
    )


# ------------------------------------------------------------------------------------------------
# FID and KID, by torch-fidelity's protocol
# ------------------------------------------------------------------------------------------------

STANDARD_PROTOCOL = (
    "torch-fidelity: uint8 images at their own size into its Inception-v3 (resized to 299 inside, TF1-compatible "
    "bilinear), 2048 pool3 features; FID and KID as torch_fidelity.calculate_metrics(input1=generated, input2=real)"
)


class FeatureExtractor(torch.nn.Module):
    """uint8 ``(B, 3, H, W)`` images -> float ``(B, D)`` features, whatever network computes them."""

    def __init__(self, network: torch.nn.Module, takes_float: bool, description: str, standard: bool):
        super().__init__()
        self.network, self.takes_float = network, takes_float
        # standard: torch-fidelity's Inception, whose FID/KID compare with published ones.
        self.description, self.standard = description, standard

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.network(images.float() / 255.0 if self.takes_float else images)
        if isinstance(features, tuple):  # torch-fidelity's extractors return one tensor per requested layer
            features = features[0]
        return features.reshape(len(images), -1).float()


def is_torchscript_archive(path: Path) -> bool:
    """A torch.jit.save file: a zip archive with a code/ folder (the module's code, which loading it runs)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def check_inception_file(path: Path) -> None:
    """Refuse a TorchScript archive given as weights at once, before any long work (its code is never run)."""
    if is_torchscript_archive(path):
        raise SystemExit(
            f"--inception_weights {path} is a TorchScript archive, not a state dict. Loading one runs code from the "
            f"file, so --inception_weights never does. Fix: pass torch-fidelity's {INCEPTION_FILE} ({INCEPTION_URL}); "
            "or, only if you trust the file and want it as a custom (non-standard) feature extractor, pass it as "
            f"--feature_extractor_torchscript {path}."
        )


def load_inception(path: Path, device) -> FeatureExtractor:
    """torch-fidelity's Inception-v3 with the weights of ``path``, read with torch.load(weights_only=True) only."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    check_inception_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled object, not plain tensors; or not a torch file at all
        raise SystemExit(
            f"--inception_weights {path} does not load as plain weights with torch.load(weights_only=True) "
            f"({type(err).__name__}: {str(err)[:300]}). evaluate.py reads weights no other way: unpickling anything "
            f"more can run code from the file. Fix: pass torch-fidelity's {INCEPTION_FILE} ({INCEPTION_URL})."
        ) from None
    # torch-fidelity's constructor torch.loads what it is given with weights_only=False: give it a buffer written
    # here from the tensors just read safely, so that nothing but tensor data from the file reaches that unpickler.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    except Exception as err:  # another network's state dict
        raise SystemExit(
            f"--inception_weights {path} is not the Inception-v3 state dict of torch-fidelity "
            f"({type(err).__name__}: {str(err)[:300]}). Fix: pass {INCEPTION_FILE} from {INCEPTION_URL}."
        ) from None
    description = f"torch-fidelity Inception-v3 pool3 (2048 features), weights {path}"
    return FeatureExtractor(inception.to(device), False, description, standard=True)


def load_torchscript_extractor(path: Path, probe_size: tuple[int, int], device) -> FeatureExtractor:
    """--feature_extractor_torchscript: a module the user vouches for (torch.jit.load runs code from the file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in recent torch, but still the portable format
        try:
            scripted = torch.jit.load(str(path), map_location=device)
        except Exception as err:
            raise SystemExit(
                f"--feature_extractor_torchscript {path} is not a TorchScript module ({type(err).__name__}: "
                f"{str(err)[:300]}). Fix: save one with torch.jit.save, or pass Inception weights with "
                "--inception_weights instead."
            ) from None
    return _probe_scripted(scripted.eval(), path, probe_size, device)


def _probe_scripted(module, path: Path, size: tuple[int, int], device) -> FeatureExtractor:
    """Find out on a dummy batch whether the module takes uint8 or float images, and that it gives (B, D)."""
    width, height = size
    dummy = torch.zeros((2, 3, height, width), dtype=torch.uint8, device=device)
    errors = []
    for takes_float in (False, True):
        try:
            with torch.no_grad():
                features = module(dummy.float() / 255.0 if takes_float else dummy)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {str(err)[:200]}")
            continue
        if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[0] != 2:
            errors.append(f"returned {type(features).__name__} {getattr(features, 'shape', '')}, not (B, D)")
            continue
        num_features = int(features[0].numel())
        kind = "float 0..1" if takes_float else "uint8"
        description = f"TorchScript {path} ({num_features} features, {kind})"
        return FeatureExtractor(module, takes_float, description, standard=False)
    raise SystemExit(
        f"--feature_extractor_torchscript {path} maps neither uint8 nor float (B, 3, {height}, {width}) images to "
        f"(B, D) features: {' | '.join(errors)}. Fix: save a module that does, or set --feature_image_size."
    )


def first_image_size(files: list[Path]) -> tuple[int, int]:
    return read_image(files[0]).size


def uint8_tensor(image: Image.Image, size: int | None = None) -> torch.Tensor:
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def batches_by_size(files: list[Path], batch_size: int, resized: bool) -> list[list[int]]:
    """Indices of ``files`` in batches of one image size each (a batch is one stacked tensor).

    torch-fidelity stacks the images of a batch, so it needs them all one size; in eval mode an image's features do
    not depend on its batch-mates, so batching by size gives each image the features torch-fidelity gives it alone.
    """
    by_size: dict[tuple[int, int] | None, list[int]] = {}
    for index, path in enumerate(files):
        if resized:  # all the same size once resized: no need to open them here
            by_size.setdefault(None, []).append(index)
            continue
        try:
            with Image.open(path) as image:
                size = image.size
        except OSError as err:
            raise SystemExit(f"cannot read image {path} ({err}). Fix: re-export it, or remove it.") from None
        by_size.setdefault(size, []).append(index)
    return [
        indices[start : start + batch_size]
        for indices in by_size.values()
        for start in range(0, len(indices), batch_size)
    ]


def extract_features(files, extractor: FeatureExtractor, args, device, desc: str) -> torch.Tensor:
    """The extractor's ``(N, D)`` features of ``files``, in their order (KID's subsets are drawn by index)."""
    features: torch.Tensor | None = None
    for indices in tqdm(
        batches_by_size(files, args.batch_size, args.feature_image_size is not None),
        desc=desc,
        unit="batch",
        leave=False,
    ):
        images = torch.stack([uint8_tensor(read_image(files[index]), args.feature_image_size) for index in indices])
        batch = extractor(images.to(device)).cpu()
        if features is None:
            features = torch.empty((len(files), batch.shape[1]), dtype=batch.dtype)
        features[indices] = batch
    return features


def protocol(extractor: FeatureExtractor, args) -> str:
    """What the FID/KID numbers mean: torch-fidelity's protocol, or how they depart from it."""
    resized = f"images first resized to {args.feature_image_size} px (PIL bicubic)" if args.feature_image_size else ""
    if not extractor.standard:
        return (
            f"non-standard: custom feature extractor ({extractor.description})"
            + (f", {resized}" if resized else "")
            + "; not comparable with published FID/KID"
        )
    return f"non-standard: {resized}, then {STANDARD_PROTOCOL}" if resized else STANDARD_PROTOCOL


def kid_subset_size(args, num_real: int, num_generated: int) -> int:
    """--kid_subset_size, else torch-fidelity's 1000, shrunk to the smaller set (it would refuse: recorded)."""
    fewest = min(num_real, num_generated)
    if args.kid_subset_size is None:
        return min(KID_SUBSET_SIZE, fewest)
    if args.kid_subset_size > fewest:
        raise SystemExit(
            f"--kid_subset_size {args.kid_subset_size} is more than the {num_real} real / {num_generated} generated "
            f"images: KID subsets are drawn without replacement. Fix: pass at most {fewest}, or omit it."
        )
    return args.kid_subset_size


def fid_and_kid(real: torch.Tensor, generated: torch.Tensor, wanted: list[str], args) -> dict:
    """FID and KID as torch_fidelity.calculate_metrics(input1=generated, input2=real) computes them from these
    features: its own functions, so that the numbers are the same, subset draws included."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if min(len(real), len(generated)) < 2:
        raise SystemExit(
            f"FID/KID need at least 2 real and 2 generated images, got {len(real)} and {len(generated)}. "
            "Fix: generate more images, or leave fid,kid out with --metrics."
        )
    results = {}
    if "fid" in wanted:
        statistics = [fid_features_to_statistics(features) for features in (generated, real)]
        results["fid"] = fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID]
    if "kid" in wanted:
        subset_size = kid_subset_size(args, len(real), len(generated))
        kid = kid_features_to_metric(
            generated,
            real,
            kid_subsets=args.kid_subsets,
            kid_subset_size=subset_size,
            rng_seed=args.kid_seed,
            verbose=False,
        )
        results.update(
            kid_mean=kid[KEY_METRIC_KID_MEAN],
            kid_std=kid[KEY_METRIC_KID_STD],
            kid_subsets=args.kid_subsets,
            kid_subset_size=subset_size,
            kid_seed=args.kid_seed,
        )
    return results


# ------------------------------------------------------------------------------------------------
# LPIPS diversity
# ------------------------------------------------------------------------------------------------


def load_lpips(weights: Path, device) -> torch.nn.Module:
    """lpips' AlexNet LPIPS with its shipped linear layers, the backbone taken from a torchvision state dict."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated", from inside lpips
        # pnet_rand=True builds the backbone with random weights instead of downloading them.
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SystemExit(
            f"--lpips_weights {weights} is not a torch state dict ({err}). Fix: pass {ALEXNET_FILE}."
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    # lpips splits torchvision's alexnet.features into slices that keep the layer numbers: features.3 -> sliceK.3
    backbone = {}
    for slice_name, layers in model.net.named_children():
        for layer_name, parameter in layers.state_dict().items():
            key = f"features.{layer_name}"
            if key not in state or state[key].shape != parameter.shape:
                raise SystemExit(
                    f"--lpips_weights {weights} is not a torchvision AlexNet state dict: {key} is missing or has "
                    f"the wrong shape. Fix: pass {ALEXNET_FILE} from {ALEXNET_URL}."
                )
            backbone[f"{slice_name}.{layer_name}"] = state[key]
    model.net.load_state_dict(backbone)
    return model.eval().to(device)


def lpips_group_tensor(paths: list[Path]) -> torch.Tensor:
    """The images of one mask as a ``(N, 3, H, W)`` batch in [-1, 1], all at the first one's size (at least 64)."""
    images = [read_image(path) for path in paths]
    width, height = images[0].size
    scale = max(1.0, LPIPS_MIN_SIZE / min(width, height))
    size = (round(width * scale), round(height * scale))
    return torch.stack([uint8_tensor(image.resize(size, Image.BICUBIC)) for image in images]).float() / 127.5 - 1


@torch.no_grad()
def lpips_diversity(groups: list[list[Path]], model: torch.nn.Module, batch_size: int, device) -> list[float]:
    """Mean pairwise LPIPS within each group of two or more images (one value per group)."""
    from segdiff.metrics import mean_pairwise_distance

    def distance(first, second):
        return model(first.to(device), second.to(device))

    return [
        mean_pairwise_distance(lpips_group_tensor(paths), distance, batch_size)
        for paths in tqdm(groups, desc="LPIPS diversity", unit="mask", leave=False)
        if len(paths) >= 2
    ]


# ------------------------------------------------------------------------------------------------
# Semantic consistency
# ------------------------------------------------------------------------------------------------


class PaletteLabeller:
    """segdiff.toy.PaletteSegmenter on a list of PIL images."""

    def __init__(self, palette):
        from segdiff.toy import PaletteSegmenter

        self.segmenter = PaletteSegmenter(palette)
        self.num_labels = len(palette)
        self.description = "palette (nearest class colour)"

    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        return [self.segmenter(image) for image in images]


class TransformersLabeller:
    """A transformers semantic-segmentation model (SegFormer) on a list of PIL images, logits upsampled to each."""

    def __init__(self, folder: Path, device):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, SegformerImageProcessor

        try:
            self.model = AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True)
        except Exception as err:
            raise SystemExit(
                f"--segmenter {folder} does not load as a transformers semantic-segmentation model ({err}). Fix: "
                "pass a folder written by SegformerForSemanticSegmentation.save_pretrained (config.json + weights)."
            ) from None
        self.model.eval().to(device)
        if (folder / "preprocessor_config.json").is_file():
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        else:
            self.processor = SegformerImageProcessor()  # 512x512, ImageNet mean/std: SegFormer's usual input
        self.device = device
        self.num_labels = int(self.model.config.num_labels)
        self.description = f"{type(self.model).__name__} from {folder}"

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        inputs = self.processor(images=images, return_tensors="pt")
        logits = self.model(pixel_values=inputs["pixel_values"].to(self.device)).logits
        labels = []
        for logit, image in zip(logits, images):
            resized = torch.nn.functional.interpolate(
                logit[None].float(), size=(image.height, image.width), mode="bilinear", align_corners=False
            )
            labels.append(resized.argmax(dim=1)[0].cpu().numpy())
        return labels


def build_segmenter(args, classes: Classes, device):
    if args.segmenter == "palette":
        if not classes.palette_is_real:
            raise SystemExit(
                f"--segmenter palette reads classes by colour, but the class list ({classes.source}) has no palette. "
                'Fix: pass --class_names_json with {"class_names": [...], "palette": [[r, g, b], ...]}.'
            )
        return PaletteLabeller(classes.palette)
    folder = Path(args.segmenter).expanduser()
    if not (folder / "config.json").is_file():
        raise SystemExit(
            f"--segmenter {args.segmenter!r} is neither 'palette' nor a model folder with a config.json. "
            "Fix: pass palette, or the folder of a SegformerForSemanticSegmentation.save_pretrained model."
        )
    return TransformersLabeller(folder, device)


def class_lookup(args, num_labels: int, num_classes: int) -> np.ndarray:
    """Segmenter id -> our class id, with ``num_classes`` meaning "none of ours" (always counted as wrong)."""
    if args.segmenter_class_map is None:
        if num_labels != num_classes:
            raise SystemExit(
                f"the segmenter predicts {num_labels} classes and the masks have {num_classes}. Fix: pass "
                '--segmenter_class_map JSON mapping each segmenter id to ours, e.g. {"0": 0, "7": 2, "12": null}.'
            )
        return np.arange(num_classes)
    path = Path(args.segmenter_class_map)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(
            f"cannot read --segmenter_class_map {path} ({err}). Fix: check the path and the JSON."
        ) from None
    if not isinstance(mapping, dict):
        raise SystemExit(f'--segmenter_class_map {path} must be a JSON object {{"segmenter id": our id or null}}.')
    lookup = np.full(num_labels, num_classes)
    for key, value in mapping.items():
        if not str(key).isdigit() or int(key) >= num_labels:
            raise SystemExit(f"--segmenter_class_map {path}: key {key!r} is not a segmenter id 0..{num_labels - 1}.")
        if value is None or (isinstance(value, str) and value.lower() == "ignore"):
            continue
        if not isinstance(value, int) or not 0 <= value < num_classes:
            raise SystemExit(
                f"--segmenter_class_map {path}: {key} -> {value!r} is not one of our class ids 0..{num_classes - 1} "
                "(or null for none of ours)."
            )
        lookup[int(key)] = value
    return lookup


def semantic_consistency(generated: GeneratedSet, segmenter, lookup, classes: Classes, args) -> dict:
    """Confusion of the masks (targets) and the segmenter's reading of the generated images (predictions)."""
    from segdiff.metrics import confusion_matrix, segmentation_summary

    num_classes = len(classes.names)
    other = num_classes  # an extra column: predictions that are none of our classes
    confusion = torch.zeros((num_classes + 1, num_classes + 1), dtype=torch.long)
    samples = generated.samples
    for start in tqdm(range(0, len(samples), args.batch_size), desc="segmenting", unit="batch", leave=False):
        batch = samples[start : start + args.batch_size]
        predictions = segmenter([read_image(sample.image) for sample in batch])
        for sample, prediction in zip(batch, predictions):
            target = read_label_map(sample.mask)
            bad = np.unique(target[((target < 0) | (target >= num_classes)) & (target != args.ignore_index)])
            if bad.size:
                raise SystemExit(
                    f"mask {sample.mask} holds ids {bad[:10].tolist()}, but there are {num_classes} classes "
                    f"({classes.source}) and ignore_index is {args.ignore_index}. Fix: pass the right "
                    "--class_names_json / --num_classes, or --ignore_index."
                )
            prediction = lookup[prediction]
            if prediction.shape != target.shape:  # an image generated at another size than its mask
                resized = Image.fromarray(prediction.astype(np.int32)).resize(target.shape[::-1], Image.NEAREST)
                prediction = np.asarray(resized)
            if sample.class_id is not None:  # joint layout: the mask only says "this class" vs "the rest"
                rest = 0 if sample.class_id != 0 else other
                prediction = np.where(prediction == sample.class_id, sample.class_id, rest)
            confusion += confusion_matrix(prediction, target, num_classes + 1, args.ignore_index)
    summary = segmentation_summary(confusion, classes.names)
    summary["target_pixels_per_class"] = dict(zip(classes.names, confusion.sum(dim=1)[:num_classes].tolist()))
    return summary


# ------------------------------------------------------------------------------------------------
# Style
# ------------------------------------------------------------------------------------------------


def reference_lookup(reference: Path) -> Callable[[GeneratedSample], Path]:
    """Which reference image goes with a sample: one image for all, or by stem (image's, then mask's)."""
    if reference.is_file():
        return lambda sample: reference
    if not reference.is_dir():
        raise SystemExit(f"--reference_dir {reference} does not exist. Fix: pass an image or a folder of images.")
    folder = reference / "images" if (reference / "images").is_dir() else reference
    by_stem = _files_by_stem(folder)
    if not by_stem:
        raise SystemExit(f"--reference_dir {reference} holds no images ({' '.join(IMAGE_EXTENSIONS)}).")
    if len(by_stem) == 1:
        only = next(iter(by_stem.values()))
        return lambda sample: only

    def lookup(sample: GeneratedSample) -> Path:
        for stem in (sample.image.stem, sample.source):
            if stem in by_stem:
                return by_stem[stem]
        raise SystemExit(
            f"--reference_dir {folder} has no image named {sample.image.stem} or {sample.source} for {sample.image}. "
            "Fix: name references after the generated images or their masks, or pass a single reference image."
        )

    return lookup


def style_similarity(generated: GeneratedSet, reference: Callable, bins: int) -> list[float]:
    from segdiff.metrics import color_histogram_similarity

    return [
        color_histogram_similarity(read_image(sample.image), read_image(reference(sample)), bins)
        for sample in tqdm(generated.samples, desc="style", unit="image", leave=False)
    ]


# ------------------------------------------------------------------------------------------------
# Downstream: real vs real + synthetic
# ------------------------------------------------------------------------------------------------


def downstream_splits(args, classes: Classes) -> tuple[list, list]:
    """(train pairs, val pairs) of the real data.

    Train: the --real_split of --real_dir. Val: --real_val_dir, else the val split of --real_dir, else a
    seeded --downstream_val_fraction held out of the training pairs. --downstream_real_limit then keeps a
    seeded subset of the training pairs (scarce real data is where synthetic data should help most).
    """
    if args.real_dir is None:
        raise SystemExit("--downstream needs --real_dir (a labelled real dataset to train and validate on).")

    def load(root: Path, layout: str, split: str) -> list:
        dataset = load_segmentation_dataset(
            root,
            layout,
            split=split,
            class_names_json=args.class_names_json,
            num_classes=len(classes.names),
            ignore_index=args.ignore_index,
        )
        return list(dataset.pairs)

    real_dir = Path(args.real_dir)
    generic = args.real_dataset == "generic"
    train_root = real_split_root(real_dir, args.real_split) if generic else real_dir
    train = load(train_root, args.real_dataset, args.real_split)
    if args.real_val_dir is not None:
        val = load(Path(args.real_val_dir), "generic", "val")
    elif not generic:
        val = load(real_dir, args.real_dataset, "val")
    elif train_root != real_dir and (real_dir / "val" / "images").is_dir():
        val = load(real_dir / "val", "generic", "val")
    else:
        if not 0 < args.downstream_val_fraction < 1:
            raise SystemExit(f"--downstream_val_fraction must be in (0, 1), got {args.downstream_val_fraction}.")
        num_val = max(1, round(len(train) * args.downstream_val_fraction))
        if len(train) - num_val < 1:
            raise SystemExit(f"--real_dir has {len(train)} pairs: too few to hold some out for validation.")
        shuffled = random.Random(args.seed).sample(train, len(train))
        train, val = shuffled[num_val:], shuffled[:num_val]
    if args.downstream_real_limit is not None:
        train = random.Random(args.seed).sample(train, min(args.downstream_real_limit, len(train)))
    return train, val


def downstream_synthetic_pairs(generated: GeneratedSet) -> tuple[list[tuple[Path, Path]], list[int] | None]:
    """The generated (image, mask) pairs to train on, and, for the joint layout, the class each mask marks.

    The joint generator's masks are class-vs-rest: its class id on the class's pixels, and "the rest" elsewhere,
    written as class 0 (or ignore_index), though other classes may be there. Read as full label maps they would
    teach the segmenter that every other class is background; with the class ids, run_downstream labels only each
    mask's own class and ignores the rest (segdiff.downstream.class_vs_rest_labels).
    """
    pairs = [(sample.image, sample.mask) for sample in generated.samples]
    if generated.layout != "joint":
        return pairs, None
    unknown = [sample.image for sample in generated.samples if sample.class_id is None]
    if unknown:
        raise SystemExit(
            f"{generated.root}/metadata.jsonl is the joint generator's (class-vs-rest masks), but {len(unknown)} "
            f"record(s) have no class_id, e.g. the one of {unknown[0]}: which class their mask marks is unknown, so "
            "their rest pixels cannot be ignored for --downstream. Fix: re-run generate_joint_image_mask_diffusion.py "
            "(it writes class_id), or pass --masks_dir with full label maps."
        )
    return pairs, [sample.class_id for sample in generated.samples]


def default_downstream_resolution(pairs: list) -> int:
    """The short side of the first real training image, at most 128, as a multiple of 4."""
    with Image.open(pairs[0][0]) as image:
        return max(8, min(128, min(image.size)) // 4 * 4)


# ------------------------------------------------------------------------------------------------
# Pictures and reports
# ------------------------------------------------------------------------------------------------


def comparison_grid(generated: GeneratedSet, real_by_stem: dict, palette, args) -> Image.Image:
    """Rows of: colourised mask | real image of the mask's stem | generated samples (a header names them)."""
    rows = list(generated.groups().values())[: args.grid_masks]
    with Image.open(rows[0][0].image) as first:
        scale = min(256, max(64, max(first.size))) / max(first.size)
        tile = (max(1, round(first.width * scale)), max(1, round(first.height * scale)))
    show_mask = any(group[0].mask is not None for group in rows)
    show_real = any(group[0].source in real_by_stem for group in rows)
    samples_shown = min(args.grid_samples, max(len(group) for group in rows))
    headers = ["mask"] * show_mask + ["real"] * show_real + [f"sample {i + 1}" for i in range(samples_shown)]
    header_height = 14
    grid = Image.new("RGB", (tile[0] * len(headers), header_height + tile[1] * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, header in enumerate(headers):
        draw.text((column * tile[0] + 3, 1), header, fill="black")
    for row, group in enumerate(rows):
        tiles = []
        if show_mask:
            mask = group[0].mask
            tiles.append(colorize_label(read_label_map(mask), palette, args.ignore_index) if mask else None)
        if show_real:
            real = real_by_stem.get(group[0].source)
            tiles.append(read_image(real) if real else None)
        tiles += [read_image(sample.image) for sample in group[:samples_shown]]
        for column, picture in enumerate(tiles):
            if picture is not None:
                resample = Image.NEAREST if show_mask and column == 0 else Image.BICUBIC
                grid.paste(picture.resize(tile, resample), (column * tile[0], header_height + row * tile[1]))
    return grid


def plot_per_class_iou(summary: dict, classes: Classes, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["per_class_iou"])
    values = [summary["per_class_iou"][name] for name in names]
    colours = [tuple(channel / 255 for channel in colour) for colour in classes.palette]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), [0 if v is None else v for v in values], color=colours, edgecolor="black")
    for index, value in enumerate(values):
        ax.text(index, (value or 0) + 0.02, "n/a" if value is None else f"{value:.2f}", ha="center", fontsize=8)
    ax.axhline(summary["miou"], color="black", linestyle="--", linewidth=1)
    ax.set_xticks(
        range(len(names)), names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center"
    )
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("IoU")
    ax.set_title(f"{title}   (dashed: mIoU {summary['miou']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def iou_table(per_class: dict, pixels: dict | None = None) -> list[str]:
    width = max(len("class"), *(len(name) for name in per_class))
    total = sum(pixels.values()) if pixels else 0
    lines = [f"    {'id':>3}  {'class':<{width}}  {'IoU':>7}" + ("  target pixels" if pixels else "")]
    for class_id, (name, iou) in enumerate(per_class.items()):
        line = f"    {class_id:>3}  {name:<{width}}  {_number(iou):>7}"
        if pixels:
            line += f"  {pixels[name]:>10}  ({100 * pixels[name] / max(total, 1):5.1f}%)"
        lines.append(line)
    return lines


def report_text(results: dict) -> str:
    lines = [
        f"Evaluation of {results['generated_dir']} ({results['layout']} layout): "
        f"{results['num_generated_images']} images from {results['num_masks']} masks",
    ]
    if "fid" in results or "kid_mean" in results:
        lines += ["", f"Realism against {results['num_real_images']} real images of {results['real_dir']}"]
        lines.append(f"  protocol: {results['fid_kid_protocol']}")
        lines.append(f"  features: {results['feature_extractor']}")
        if "fid" in results:
            lines.append(f"  FID                 {_number(results['fid'], 3)}   (lower is better)")
        if "kid_mean" in results:
            defaults = (results["kid_subsets"], results["kid_subset_size"], results["kid_seed"]) == (
                KID_SUBSETS,
                KID_SUBSET_SIZE,
                KID_SEED,
            )
            lines.append(
                f"  KID                 {_number(results['kid_mean'], 5)} +- {_number(results['kid_std'], 5)}   "
                f"({results['kid_subsets']} subsets of {results['kid_subset_size']}, seed {results['kid_seed']}"
                + ("" if defaults else f"; torch-fidelity's: {KID_SUBSETS} of {KID_SUBSET_SIZE}, seed {KID_SEED}")
                + "; lower is better)"
            )
    if "lpips_diversity" in results:
        lines += [
            "",
            f"Diversity: mean pairwise LPIPS among the samples of each mask, over {results['lpips_num_masks']} masks",
            f"  LPIPS diversity     {_number(results['lpips_diversity'])} +- {_number(results['lpips_diversity_std'])}"
            "   (0 = identical samples)",
        ]
    if "miou" in results:
        lines += [
            "",
            f"Semantic consistency: masks vs {results['segmenter']} on the generated images",
            f"  mIoU                {_number(results['miou'])}",
            f"  pixel accuracy      {_number(results['pixel_accuracy'])}",
            "  per-class IoU:",
            *iou_table(results["per_class_iou"], results["target_pixels_per_class"]),
        ]
    if "style_histogram_correlation" in results:
        lines += [
            "",
            f"Style: colour-histogram correlation ({results['style_bins']} bins per channel) with {results['reference_dir']}",
            f"  similarity          {_number(results['style_histogram_correlation'])} +- "
            f"{_number(results['style_histogram_correlation_std'])}   (1 = same colour distribution)",
        ]
    if "downstream" in results:
        down = results["downstream"]
        lines += [
            "",
            f"Downstream: a small UNet trained {down['steps']} steps at {down['resolution']} px (seed {down['seed']}), "
            f"scored on {down['num_real_val']} real validation pairs",
            *(
                f"  {label:<34} mIoU {_number(down[f'miou_{key}'])}   pixel accuracy "
                f"{_number(down[f'pixel_accuracy_{key}'])}"
                for label, key in (
                    (f"real only ({down['num_real_train']} pairs)", "real_only"),
                    (f"real + synthetic ({down['num_real_train']} + {down['num_synthetic']})", "real_plus_synthetic"),
                )
            ),
            f"  {'gain from the synthetic data':<34} mIoU {down['miou_gain']:+.4f}",
            f"  synthetic labels: {down['synthetic_labels']}",
            "  per-class IoU, real only:",
            *iou_table(down["per_class_iou_real_only"]),
            "  per-class IoU, real + synthetic:",
            *iou_table(down["per_class_iou_real_plus_synthetic"]),
        ]
    if results.get("skipped"):
        lines += ["", "Skipped:", *(f"  {name}: {reason}" for name, reason in results["skipped"].items())]
    return "\n".join(lines) + "\n"


def json_ready(value):
    """NaN -> null (json.dumps would write NaN, which is not JSON); Paths -> strings."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def default_results_dir(generated_dir: Path) -> Path:
    """GENERATED_DIR_evaluation, next to the generated folder: results never land among the inputs (where a
    re-run or another tool reading the folder would take them for generated images)."""
    generated_dir = generated_dir.resolve()
    return generated_dir.with_name(f"{generated_dir.name}_evaluation")


def evaluate(args) -> dict:
    generated_dir = Path(args.generated_dir)
    generated = read_generated_set(generated_dir, Path(args.masks_dir) if args.masks_dir else None)
    metrics, skipped = choose_metrics(args, generated)
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}")

    # Everything that can be wrong with the inputs is checked here, before minutes of feature extraction.
    inception = torchscript = lpips_weights = None
    if {"fid", "kid"} & set(metrics) and args.feature_extractor_torchscript is not None:
        torchscript = Path(args.feature_extractor_torchscript).expanduser()
        if not torchscript.is_file():
            raise SystemExit(f"--feature_extractor_torchscript {torchscript} does not exist. Fix: check the path.")
    elif {"fid", "kid"} & set(metrics):
        inception = find_weights(
            args.inception_weights, "--inception_weights", INCEPTION_FILES, INCEPTION_URL, "FID/KID"
        )
        check_inception_file(inception)
    if {"fid", "kid"} & set(metrics) and not 0 <= args.kid_seed < 2**32:
        raise SystemExit(f"--kid_seed must be in 0..{2**32 - 1} (a numpy RandomState seed), got {args.kid_seed}.")
    if "lpips" in metrics:
        lpips_weights = find_weights(args.lpips_weights, "--lpips_weights", (ALEXNET_FILE,), ALEXNET_URL, "LPIPS")
    classes = resolve_classes(args, generated_dir)
    if classes is None and ("miou" in metrics or args.downstream):
        raise SystemExit(
            f"the classes are unknown: {generated_dir} has no class_names.json. Fix: pass --class_names_json FILE "
            "or --num_classes N."
        )
    if args.downstream and not generated.has_masks:
        raise SystemExit(f"--downstream trains on the generated (image, mask) pairs, but {generated_dir} has no masks.")
    resolution = args.downstream_resolution
    if args.downstream and resolution is not None and resolution % 4:
        raise SystemExit(f"--downstream_resolution must be a multiple of 4, got {resolution}.")
    real_files = real_image_files(args) if args.real_dir else []
    if "kid" in metrics:
        kid_subset_size(args, len(real_files), len(generated.samples))  # a --kid_subset_size too big stops here
    splits = downstream_splits(args, classes) if args.downstream else None
    synthetic, synthetic_class_ids = downstream_synthetic_pairs(generated) if args.downstream else (None, None)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    segmenter = build_segmenter(args, classes, device) if "miou" in metrics else None
    lookup = class_lookup(args, segmenter.num_labels, len(classes.names)) if segmenter else None
    reference = reference_lookup(Path(args.reference_dir)) if "style" in metrics else None

    results = {
        "generated_dir": str(generated_dir),
        "layout": generated.layout,
        "num_generated_images": len(generated.samples),
        "num_masks": len(generated.groups()),
        "metrics": metrics,
        "skipped": skipped,
        "class_names": classes.names if classes else None,
    }
    if real_files:
        results.update(real_dir=args.real_dir, num_real_images=len(real_files))
    if inception is not None or torchscript is not None:
        if inception is not None:
            extractor = load_inception(inception, device)
        else:
            probe_size = (args.feature_image_size,) * 2 if args.feature_image_size else first_image_size(real_files)
            extractor = load_torchscript_extractor(torchscript, probe_size, device)
        real_features = extract_features(real_files, extractor, args, device, "features: real")
        generated_features = extract_features(
            [s.image for s in generated.samples], extractor, args, device, "features: generated"
        )
        results.update(
            fid_kid_protocol=protocol(extractor, args),
            fid_kid_standard=extractor.standard and args.feature_image_size is None,
            feature_extractor=extractor.description,
            feature_image_size=args.feature_image_size,
        )
        results.update(fid_and_kid(real_features, generated_features, metrics, args))
    if lpips_weights is not None:
        groups = [[sample.image for sample in group] for group in generated.groups().values()]
        per_mask = lpips_diversity(groups, load_lpips(lpips_weights, device), args.batch_size, device)
        results.update(
            lpips_diversity=float(np.mean(per_mask)),
            lpips_diversity_std=float(np.std(per_mask)),
            lpips_num_masks=len(per_mask),
            lpips_backbone=str(lpips_weights),
        )
    if segmenter is not None:
        results["segmenter"] = segmenter.description
        results.update(semantic_consistency(generated, segmenter, lookup, classes, args))
    if reference is not None:
        similarities = style_similarity(generated, reference, args.histogram_bins)
        results.update(
            style_histogram_correlation=float(np.mean(similarities)),
            style_histogram_correlation_std=float(np.std(similarities)),
            style_bins=args.histogram_bins,
            reference_dir=args.reference_dir,
        )
    if splits is not None:
        from segdiff.downstream import run_downstream

        results["downstream"] = run_downstream(
            splits[0],
            synthetic,
            splits[1],
            classes.names,
            synthetic_class_ids=synthetic_class_ids,
            steps=args.downstream_steps,
            resolution=resolution or default_downstream_resolution(splits[0]),
            batch_size=args.downstream_batch_size,
            learning_rate=args.downstream_learning_rate,
            seed=args.seed,
            ignore_index=args.ignore_index,
            device=device,
        )

    results_dir = Path(args.results_dir) if args.results_dir else default_results_dir(generated_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    results = json_ready(results)
    write_atomic(results_dir / "metrics.json", json.dumps(results, indent=2) + "\n")
    report = report_text(results)
    write_atomic(results_dir / "evaluation_report.txt", report)
    if "miou" in results:
        plot_per_class_iou(results, classes, results_dir / "per_class_iou.png", f"Per-class IoU: {generated_dir.name}")
    palette = classes.palette if classes else default_palette(256)
    real_by_stem = {path.stem: path for path in real_files}
    comparison_grid(generated, real_by_stem, palette, args).save(results_dir / "comparison_grid.png")
    print(report + f"\nWrote metrics.json, evaluation_report.txt and plots to {results_dir}")
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return evaluate(args)
    except DatasetError as err:  # data.py's readers name the file and the fix
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
