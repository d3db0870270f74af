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
                     then come from --masks_dir, paired with the sample folders in sorted order. The SDM
                     reference's --generated_dir OUTPUT/generated_images (that folder itself) is read as OUTPUT.
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

--downstream asks whether the generated pairs are worth more than what a practitioner tries first. A segmenter
(--downstream_model: a small UNet, or a SegFormer) is trained on four arms with the same steps, batch size and
seeds (--downstream_seeds): real only; real + oversampling (repeat-factor sampling as in LVIS, adding as many
extra copies of real pairs as there are generated pairs); real + synthetic; real + synthetic + oversampling. Each
is scored on the real validation split (--real_dir's val/ split, --real_val_dir, or a held-out
--downstream_val_fraction): per arm the mean and spread over seeds of mIoU and per-class IoU, the change of every
class from real only, synthetic - oversampling per seed (and in how many seeds it is positive), the classes the
synthetic data makes worse, and the render fidelity per class (the real-only segmenter reading the generated
images against their own masks). --max_train_samples N trains on the N real pairs a trainer given the same data
and N trained on. The joint generator's masks are class-vs-rest (its class, and "the rest", written as class 0 or
ignore, where any other class may be): for training, their rest pixels become --ignore_index, so they teach only
their own class.

Writes to --results_dir, by default a folder next to the generated one, GENERATED_DIR_evaluation (e.g.
outputs/sdm_samples -> outputs/sdm_samples_evaluation), so the inputs are left as they were: metrics.json,
evaluation_report.txt, per_class_iou.png (with miou) and comparison_grid.png (colourised mask | real image with
the mask's stem, if any | generated samples).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from segdiff.arguments import (
    finite_float,
    image_size,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
)
from segdiff.data import (
    DATASETS,
    IMAGE_EXTENSIONS,
    DatasetError,
    SegmentationDataset,
    default_class_names,
    exit_on_bad_input,
    files_by_stem,
    first_few,
    limit_train_samples,
    load_class_names,
    load_segmentation_dataset,
    read_image,
    read_json,
    read_label_map,
    train_sample_order,
)
from segdiff.downstream import MODELS, WORSE_THRESHOLD, run_downstream
from segdiff.evaluation import (
    ALEXNET_FILE,
    ALEXNET_URL,
    INCEPTION_FILE,
    INCEPTION_FILES,
    INCEPTION_URL,
    KID_SEED,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    Classes,
    build_segmenter,
    cached_weights,
    check_inception_file,
    class_lookup,
    fid_kid_scores,
    find_weights,
    hub_checkpoints,
    load_inception,
    load_torchscript_extractor,
    lpips_scores,
    match_references,
    resolve_kid_subset_size,
    semantic_consistency,
    style_scores,
)
from segdiff.files import write_json_atomic, write_text_atomic
from segdiff.generation import ARGS_FILE
from segdiff.geometry import ImageSize, short_side_size
from segdiff.labels import IGNORE_INDEX, colorize_label, default_palette
from segdiff.runs import RunError, open_run

ALL_METRICS = ("fid", "kid", "lpips", "miou", "style")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("inputs")
    data.add_argument(
        "--generated_dir",
        required=True,
        help="The generator's output folder (see above); its generated_images/ folder is read as the output folder.",
    )
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
    data.add_argument(
        "--num_classes", type=positive_int, default=None, help="Number of classes when no class names exist."
    )
    data.add_argument(
        "--ignore_index",
        type=non_negative_int,
        default=IGNORE_INDEX,
        help="Mask id meaning no-data: not scored. (default: %(default)s)",
    )
    data.add_argument(
        "--label_offset",
        type=non_negative_int,
        default=None,
        help="The file id of class 0 in the real masks (--real_dir, --real_val_dir): 1 for masks whose 0 marks "
        "unlabelled pixels and whose classes count from 1 (ids below it are no-data). The generated masks hold class "
        "ids, as the generators write them. Default: 1 for --real_dataset loveda, else 0 (the trainers' option too).",
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
        type=non_negative_int,
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

    downstream = parser.add_argument_group("downstream: is the generated data worth more than oversampling?")
    downstream.add_argument(
        "--downstream",
        action="store_true",
        help="Train a segmenter on each arm (real only; real + oversampling; real + synthetic; real + synthetic + "
        "oversampling) with the same steps, batch size and seeds; report each arm's mIoU and per-class IoU on the "
        "real validation split, the changes, and the render fidelity per class.",
    )
    downstream.add_argument(
        "--downstream_steps", type=positive_int, default=300, help="Training steps of each run. (default: %(default)s)"
    )
    downstream.add_argument(
        "--downstream_seeds",
        type=non_negative_int,
        nargs="+",
        default=[0],
        help="Train every arm once per seed (initial weights, batches, the oversampling's rounding); the report "
        "gives the mean and spread over seeds. (default: %(default)s)",
    )
    downstream.add_argument(
        "--downstream_model",
        choices=MODELS,
        default="unet",
        help="The segmenter: a small UNet, or a SegFormer (transformers; random init unless "
        "--downstream_pretrained). (default: %(default)s)",
    )
    downstream.add_argument(
        "--downstream_pretrained",
        default=None,
        help="A local SegFormer folder (save_pretrained) to start --downstream_model segformer from; its head is "
        "replaced by one for our classes.",
    )
    downstream.add_argument(
        "--downstream_resolution",
        type=image_size,
        default=None,
        help="The size every image and mask is resized to: N (N x N) or HEIGHT,WIDTH, multiples of 4. Default: the "
        "real training images' own shape, short side at most 128 (32 for the toy data; a square of the first "
        "image's short side when their shapes differ).",
    )
    downstream.add_argument(
        "--max_train_samples",
        type=positive_int,
        default=None,
        help="Train every arm on N real training pairs: the N every trainer given the same data and "
        "--max_train_samples trains on (chosen by a hash of their names), so the segmenters see the real pairs the "
        "generators saw. metrics.json lists them (downstream.train_samples). Default: all.",
    )
    downstream.add_argument(
        "--downstream_oversampling_threshold",
        type=positive_float,
        default=None,
        help="The threshold t of repeat-factor sampling, r(c) = max(1, sqrt(t / f(c))). Either way the oversampled "
        "arms add as many extra copies as there are synthetic pairs. Default: the t at which the repeat factors "
        "add exactly that many.",
    )
    downstream.add_argument(
        "--downstream_worse_threshold",
        type=finite_float,
        default=WORSE_THRESHOLD,
        help="A class the synthetic data makes worse: its IoU with synthetic data is below its IoU with "
        "oversampling by more than this, on average over seeds. (default: %(default)s)",
    )
    downstream.add_argument("--downstream_batch_size", type=positive_int, default=16)
    downstream.add_argument("--downstream_learning_rate", type=positive_float, default=1e-3)
    downstream.add_argument(
        "--downstream_val_fraction",
        type=finite_float,
        default=0.2,
        help="Share of the real set held out for validation when there is no val split: the last pairs in the "
        "order --max_train_samples takes them in, so no trainer's first N (N up to the rest) is among them. "
        "(default: %(default)s)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--results_dir",
        type=output_folder,
        default=None,
        help="Where results go. Default: GENERATED_DIR_evaluation, a folder next to --generated_dir (e.g. "
        "outputs/sdm_samples -> outputs/sdm_samples_evaluation): nothing is written into the inputs.",
    )
    output.add_argument("--grid_masks", type=positive_int, default=4, help="Masks (rows) in comparison_grid.png.")
    output.add_argument("--grid_samples", type=positive_int, default=4, help="Generated samples per row of the grid.")
    output.add_argument("--batch_size", type=positive_int, default=32, help="Images per batch for the networks.")
    output.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
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
    unpaired_masks: list[Path] = field(default_factory=list)  # generic layout: masks/ files whose image is missing

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
            raise DatasetError(f"{path} line {number} is not JSON ({err}). Fix: correct or delete that line.") from None
        if not isinstance(record, dict) or "file_name" not in record:
            raise DatasetError(
                f'{path} line {number} has no "file_name". Fix: each line must be a JSON object with "file_name" '
                '(the image, relative to the folder) and optionally "mask_file_name".'
            )
        records.append(record)
    if not records:
        raise DatasetError(f"{path} is empty. Fix: re-run the generator, or delete it to evaluate the image files.")
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
    masks = files_by_stem(root / "masks") if (root / "masks").is_dir() else {}
    images = files_by_stem(images_dir)
    samples = [
        GeneratedSample(image=path, mask=masks.get(path.stem), group=path.stem, source=path.stem)
        for path in images.values()
    ]
    unpaired = [mask for stem, mask in masks.items() if stem not in images]
    return GeneratedSet(root, "generic" if masks else "images", samples, unpaired)


def is_bare_sample_folders(folder: Path) -> bool:
    """A generated_images/ folder given on its own: it holds the sample_XXXX/ folders, and no layout of its own."""
    return (
        folder.name == "generated_images"
        and not (folder / "metadata.jsonl").is_file()
        and not (folder / "images").is_dir()
        and not image_files(folder)
    )


def read_generated_set(root: Path, masks_dir: Path | None) -> GeneratedSet:
    """The generated samples of ``root``, whichever layout it has (see the module docstring)."""
    if not root.is_dir():
        raise DatasetError(f"--generated_dir {root} does not exist or is not a folder. Fix: check the path.")
    if is_bare_sample_folders(root):
        # The SDM reference's evaluation is given GENERATOR_OUTPUT/generated_images: read it as its parent, whose
        # metadata.jsonl (our generators write one) pairs the images with their masks.
        print(f"reading {root.parent}: {root} is its generated_images/ folder")
        root = root.parent
    if (root / "metadata.jsonl").is_file():
        generated = samples_from_metadata(root)
    elif (root / "generated_images").is_dir():
        generated = samples_from_sample_folders(root)
    else:
        generated = samples_from_files(root)
    if not generated.samples:
        raise DatasetError(
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
        raise DatasetError(f"--masks_dir {masks_dir} does not exist or is not a folder. Fix: check the path.")
    masks = files_by_stem(masks_dir)
    if generated.layout == "sample-folders":
        # Without metadata, only the order links a sample folder to its mask.
        groups = generated.groups()
        if len(masks) != len(groups):
            raise DatasetError(
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
        raise DatasetError(
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
        raise DatasetError(
            f"{len(missing)} {kind} file(s) listed are missing, e.g. {shown}. Fix: re-run the generator (it "
            "resumes), or remove their lines from metadata.jsonl."
        )


# Generators round each side to what their model takes (a multiple of 8 or 64 pixels), which changes an image's
# aspect ratio by a few percent at most; more than this is another shape, not rounding.
ASPECT_TOLERANCE = 0.1


def same_aspect(shape: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether two (height, width) shapes have one aspect ratio, within ASPECT_TOLERANCE."""
    return abs((shape[1] / shape[0]) / (other[1] / other[0]) - 1) <= ASPECT_TOLERANCE


def check_aspect_ratios(samples: list[GeneratedSample]) -> None:
    """Refuse images whose shape is not their mask's: the segmenter's reading would be stretched onto the mask, and
    mIoU would score the stretch (from the files' headers: no image is decoded)."""
    mismatched = []
    for sample in samples:
        with Image.open(sample.image) as image, Image.open(sample.mask) as mask:
            (image_width, image_height), (mask_width, mask_height) = image.size, mask.size
        if not same_aspect((image_height, image_width), (mask_height, mask_width)):
            mismatched.append(
                f"{sample.image.name} ({image_height}x{image_width}) and its mask {sample.mask.name} "
                f"({mask_height}x{mask_width})"
            )
    if mismatched:
        raise DatasetError(
            f"miou: {len(mismatched)} image(s) have another aspect ratio than their mask (height x width): "
            f"{first_few(mismatched, 3)}. The reading of each image would be stretched to its mask. Fix: generate "
            "at the masks' aspect ratio, or pair the images with the masks they were generated from (--masks_dir)."
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
        raise DatasetError(f"--real_dir {real_dir} does not exist or is not a folder. Fix: check the path.")
    if args.real_dataset != "generic":
        dataset = load_segmentation_dataset(real_dir, args.real_dataset, split=args.real_split)
        return [image for image, _ in dataset.pairs]
    root = real_split_root(real_dir, args.real_split)
    folder = root / "images" if (root / "images").is_dir() else root
    files = image_files(folder)
    if not files:
        raise DatasetError(
            f"--real_dir {real_dir}: found no images in {folder}. Fix: point it at a folder of images, a generic "
            "dataset (images/ + masks/), or a folder with train/ and val/ datasets."
        )
    return files


def resolve_classes(args, generated_dir: Path) -> Classes | None:
    """--class_names_json, else GENERATED_DIR/class_names.json, else --num_classes default names; or None."""
    files = []
    if args.class_names_json is not None:
        if not Path(args.class_names_json).is_file():
            raise DatasetError(f"--class_names_json {args.class_names_json} does not exist. Fix: check the path.")
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
            raise DatasetError(
                f"--num_classes {args.num_classes} disagrees with the {len(names)} class names of {source}. "
                "Fix: drop --num_classes, or pass the matching --class_names_json."
            )
    elif args.num_classes is not None:
        names, palette, source = default_class_names(args.num_classes), None, "--num_classes"
    else:
        return None
    if 0 <= args.ignore_index < len(names):
        raise DatasetError(
            f"--ignore_index {args.ignore_index} is also a class id (0..{len(names) - 1}). Fix: choose an id outside "
            f"the classes (the default is {IGNORE_INDEX}); for real masks whose 0 marks unlabelled pixels, pass "
            "--label_offset 1."
        )
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
        missing["miou"] = masks_missing(generated)
    missing["kid"] = missing["fid"]
    return missing


def masks_missing(generated: GeneratedSet) -> str:
    """Why the images of ``generated`` cannot all be paired with a mask: none has one, or these do not."""
    without = [sample.image.name for sample in generated.samples if sample.mask is None]
    if len(without) == len(generated.samples):
        return "needs masks (metadata.jsonl's mask_file_name, a masks/ folder, or --masks_dir)"
    unpaired = [mask.name for mask in generated.unpaired_masks]
    stray = f"; {len(unpaired)} mask(s) have no image ({first_few(unpaired)})" if unpaired else ""
    return (
        f"needs a mask for every image, but {len(without)} of {len(generated.samples)} image(s) have none "
        f"({first_few(without)}){stray}. Fix: give each image its mask, with the same file stem in masks/ (or pass "
        "--masks_dir)"
    )


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
            raise DatasetError(
                f"unknown metric {unknown[0]!r} in --metrics. Fix: choose among {','.join(ALL_METRICS)}."
            )
        for name in chosen:
            if missing[name] is not None:
                raise DatasetError(f"--metrics {name} {missing[name]}.")
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
        raise DatasetError(f"nothing to evaluate: {reasons}.")
    return chosen, skipped


# ------------------------------------------------------------------------------------------------
# Downstream: real vs real + synthetic
# ------------------------------------------------------------------------------------------------


def downstream_splits(args, classes: Classes) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) datasets of the real data (datasets, not pairs: each knows how its mask files encode classes).

    Train: the --real_split of --real_dir. Val: --real_val_dir, else the val split of --real_dir, else the last
    --downstream_val_fraction of its pairs in `train_sample_order` (the order --max_train_samples takes them in: a
    generator trained on the same folder with --max_train_samples N, N at most the pairs left, saw none of the held
    out ones). --max_train_samples then keeps the N pairs every trainer given the same data and N trains on.
    """
    if args.real_dir is None:
        raise DatasetError("--downstream needs --real_dir (a labelled real dataset to train and validate on).")

    def load(root: Path, layout: str, split: str) -> list:
        dataset = load_segmentation_dataset(
            root,
            layout,
            split=split,
            class_names_json=args.class_names_json,
            num_classes=len(classes.names),
            ignore_index=args.ignore_index,
            label_offset=args.label_offset,
        )
        check_same_classes(dataset, classes, root)
        return dataset

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
            raise DatasetError(f"--downstream_val_fraction must be in (0, 1), got {args.downstream_val_fraction}.")
        num_val = max(1, round(len(train) * args.downstream_val_fraction))
        if len(train) - num_val < 1:
            raise DatasetError(f"--real_dir has {len(train)} pairs: too few to hold some out for validation.")
        order = train_sample_order(train.sample_names())
        kept, held_out = order[: len(train) - num_val], order[len(train) - num_val :]
        val = train.select(sorted(held_out))
        train = train.select(sorted(kept))
    return limit_train_samples(train, args.max_train_samples), val


def check_same_classes(dataset: SegmentationDataset, classes: Classes, root: Path) -> None:
    """Refuse real pairs whose class ids name other classes than the generated set's: a segmenter trained on both
    would learn one id as two classes. Default names (``class_0``...: no names known on one side) match anything."""
    defaults = default_class_names(len(classes.names))
    if dataset.class_names in (classes.names, defaults) or classes.names == defaults:
        return
    raise DatasetError(
        f"{root}: its classes ({', '.join(dataset.class_names)}) are not those of the generated set "
        f"({', '.join(classes.names)}, from {classes.source}), id for id: an id would be one class in the real pairs "
        "and another in the synthetic ones. Fix: generate with models trained on this dataset; if only the names "
        "differ, pass --class_names_json to name both alike."
    )


def same_folder(path, other) -> bool:
    return other is not None and Path(path).resolve() == Path(other).resolve()


def generators_real_pairs(generated_dir: Path, real_train: SegmentationDataset, real_val: SegmentationDataset) -> dict:
    """Which real pairs the trained models behind the generated set saw (generation_args.json's layout_model,
    renderer or model, where its folder is here), against the segmenters': a fair comparison gives every arm the real
    pairs the generators saw, and no generator a validation pair. Names are compared where the model trained on the
    same folder (its training_config.json's data_root) as the segmenters or the validation pairs came from."""
    args_file = generated_dir / ARGS_FILE
    recorded = read_json(args_file) if args_file.is_file() else {}
    train_names, val_names = set(real_train.sample_names()), set(real_val.sample_names())
    models = {}
    for flag in ("layout_model", "renderer", "model"):
        folder = recorded.get(flag)
        if not folder or not Path(folder).is_dir():
            continue
        try:
            run = open_run(folder, flag=f"--{flag}")
        except RunError:
            continue
        seen, data_root = run.config.get("train_samples"), run.config.get("data_root")
        if seen is None or data_root is None:
            continue
        entry = {"folder": str(run.run_dir), "data_root": data_root, "train_samples": len(seen)}
        if same_folder(data_root, real_train.data_root):
            entry["not_among_segmenters"] = len(set(seen) - train_names)
        if same_folder(data_root, real_val.data_root):
            entry["validation_pairs_seen"] = len(set(seen) & val_names)
        models[flag] = entry
    return models


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
        raise DatasetError(
            f"{generated.root}/metadata.jsonl is the joint generator's (class-vs-rest masks), but {len(unknown)} "
            f"record(s) have no class_id, e.g. the one of {unknown[0]}: which class their mask marks is unknown, so "
            "their rest pixels cannot be ignored for --downstream. Fix: re-run generate_joint_image_mask_diffusion.py "
            "(it writes class_id), or pass --masks_dir with full label maps."
        )
    return pairs, [sample.class_id for sample in generated.samples]


def image_shapes(paths: list[Path]) -> list[tuple[int, int]]:
    """Each image's (height, width), from the files' headers (nothing is decoded)."""
    shapes = []
    for path in paths:
        with Image.open(path) as image:
            shapes.append((image.height, image.width))
    return shapes


def common_shape(shapes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The first (height, width), when every shape has its aspect ratio; None for images of several shapes."""
    return shapes[0] if all(same_aspect(shape, shapes[0]) for shape in shapes) else None


def default_downstream_resolution(real_shapes: list[tuple[int, int]]) -> ImageSize:
    """The real training images' shape, scaled to a short side of at most 128, each side a multiple of 4: a 2:1
    street scene stays 2:1, so thin objects are not squeezed to nothing. Images of several shapes (as ADE20K's)
    share none: a square of the first one's short side, at most 128."""
    short = max(8, min(128, min(real_shapes[0])) // 4 * 4)
    shape = common_shape(real_shapes)
    return ImageSize(short, short) if shape is None else short_side_size(*shape, short, 4)


def warn_about_stretched_synthetic(synthetic_shapes: list[tuple[int, int]], real_shapes: list[tuple[int, int]]):
    """Every pair is resized to one --downstream_resolution: synthetic images of another aspect ratio than the real
    ones are stretched differently from them, and teach the segmenter shapes the real images do not have."""
    real = common_shape(real_shapes)
    if real is None:
        return
    other = [shape for shape in synthetic_shapes if not same_aspect(shape, real)]
    if other:
        warnings.warn(
            f"--downstream: {len(other)} of the {len(synthetic_shapes)} synthetic images have another aspect ratio "
            f"than the real ones ({real[0]}x{real[1]}, height x width), e.g. {other[0][0]}x{other[0][1]}; resized "
            "to one size for training, they are stretched where the real images are not. Fix: generate at the real "
            "images' aspect ratio (the layout model and the renderer trained with --resolution HEIGHT,WIDTH).",
            stacklevel=2,
        )


# ------------------------------------------------------------------------------------------------
# Pictures and reports
# ------------------------------------------------------------------------------------------------


def comparison_grid(
    generated: GeneratedSet, real_by_stem: dict, palette, *, num_masks: int, num_samples: int, ignore_index: int
) -> Image.Image:
    """Rows of: colourised mask | real image of the mask's stem | generated samples (a header names them)."""
    rows = list(generated.groups().values())[:num_masks]
    with Image.open(rows[0][0].image) as first:
        scale = min(256, max(64, max(first.size))) / max(first.size)
        tile = (max(1, round(first.width * scale)), max(1, round(first.height * scale)))
    show_mask = any(group[0].mask is not None for group in rows)
    show_real = any(group[0].source in real_by_stem for group in rows)
    samples_shown = min(num_samples, max(len(group) for group in rows))
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
            tiles.append(colorize_label(read_label_map(mask), palette, ignore_index) if mask else None)
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


def size_text(resolution) -> str:
    """A recorded size (N, or [height, width]) as the report says it: "32 px", "64x96 px" (height x width)."""
    size = ImageSize.of(resolution)
    return f"{size.height} px" if size.is_square else f"{size.height}x{size.width} px"


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


ARM_LABELS = {
    "real_only": "real only",
    "real_plus_oversampling": "real + oversampling",
    "real_plus_synthetic": "real + synthetic",
    "real_plus_synthetic_plus_oversampling": "real + synthetic + oversampling",
}
# The per-class table's column of each arm's change from real only.
ARM_COLUMNS = {
    "real_plus_oversampling": "+oversampling",
    "real_plus_synthetic": "+synthetic",
    "real_plus_synthetic_plus_oversampling": "+synth+overs",
}


def _over_seeds(summary: dict, digits: int = 4, signed: bool = False) -> str:
    """A value over seeds as 'mean +-std' ('mean' alone from one seed; 'n/a' when there is none)."""
    mean, std = summary["mean"], summary["std"]
    if mean is None:
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None else f"{text} +-{std:.{digits}f}"


def generator_lines(down: dict) -> list[str]:
    """One line per generator model: the real pairs it saw against the segmenters', flagging an unfair comparison."""
    lines = []
    for flag, entry in down.get("generators", {}).items():
        line = f"  {flag} {entry['folder']}: {entry['train_samples']} real pairs"
        if "not_among_segmenters" not in entry:
            line += f" of {entry['data_root']} (another folder than the segmenters': not compared)"
        elif entry["not_among_segmenters"]:
            line += (
                f", {entry['not_among_segmenters']} of them not among the segmenters' {down['num_real_train']}: NOT A "
                "FAIR COMPARISON (the synthetic arms carry real data the others lack). Fix: pass the --max_train_samples "
                "the generators were trained with"
            )
        else:
            line += ", all among the segmenters'"
        if entry.get("validation_pairs_seen"):
            line += (
                f"; it saw {entry['validation_pairs_seen']} of the validation pairs, which then score what it learned. "
                "Fix: validate on pairs no generator saw (--real_val_dir, or train it with --max_train_samples)"
            )
        lines.append(line)
    return lines


def downstream_report(down: dict) -> list[str]:
    """The arms' scores, synthetic vs oversampling, and the per-class table (rare classes first)."""
    model = {"unet": "a small UNet", "segformer": "a SegFormer"}[down["model"]]
    if down["pretrained"]:
        model += f" from {down['pretrained']}"
    real, synthetic = down["num_real_train"], down["num_synthetic"]
    pairs = {
        "real_only": f"{real}",
        "real_plus_oversampling": f"{real} + {synthetic}",
        "real_plus_synthetic": f"{real} + {synthetic}",
        "real_plus_synthetic_plus_oversampling": f"{real} + {synthetic} + {synthetic}",
    }
    versus = down["synthetic_vs_oversampling"]["miou"]
    thresholds = " and ".join(
        f"{_number(numbers['threshold'], 3)} ({ARM_LABELS[arm]})" for arm, numbers in down["oversampling"].items()
    )
    lines = [
        "",
        f"Downstream: {model} trained {down['steps']} steps at {size_text(down['resolution'])}, batch {down['batch_size']}, "
        f"per arm and seed (seeds {down['seeds']}), scored on {down['num_real_val']} real validation pairs",
        f"  real pairs: {real} (metrics.json downstream.train_samples; the same as a trainer's with the same data "
        "and --max_train_samples)",
        *generator_lines(down),
        f"  synthetic labels: {down['synthetic_labels']}",
        f"  oversampling: repeat-factor sampling (LVIS), {synthetic} extra copies (as many as synthetic pairs), "
        f"threshold {thresholds}",
        f"  {'arm':<33} {'pairs':>12}   {'mIoU':<16} pixel accuracy",
        *(
            f"  {ARM_LABELS[arm]:<33} {pairs[arm]:>12}   {_over_seeds(scores['miou']):<16} "
            f"{_over_seeds(scores['pixel_accuracy'])}"
            for arm, scores in down["arms"].items()
        ),
        f"  synthetic - oversampling, mIoU: {_over_seeds(versus, signed=True)} "
        f"(positive in {versus['positive_seeds']} of {len(down['seeds'])} seeds)",
        "",
        *downstream_class_table(down),
    ]
    worse = down["classes_made_worse"]
    lines.append(
        f"  classes the synthetic data makes worse (synthetic - oversampling below -{down['worse_threshold']}): "
        + (", ".join(worse) if worse else "none")
    )
    return lines


def downstream_class_table(down: dict) -> list[str]:
    """Per class, fewest training pixels first: its IoU with real data only, each arm's change from it, synthetic -
    oversampling (with the seeds where it is positive), and the render fidelity (the real-only segmenter on the
    synthetic images against their own masks)."""
    pixels = down["train_pixels_per_class"]
    total = max(sum(pixels.values()), 1)
    width = max(len("class"), *(len(name) for name in pixels))
    arms, changes = down["arms"], down["change_vs_real_only"]
    versus = down["synthetic_vs_oversampling"]["per_class_iou"]
    render, reader = down["render_fidelity"]["per_class_iou"], down["render_fidelity"]["reader_real_val_iou"]
    lines = [
        "  per class, rarest first (fewest real training pixels): IoU with real data only, each arm's change from",
        "  it, synthetic - oversampling (in how many seeds it is positive), the render IoU: the real-only segmenter",
        f"  of seed {down['render_fidelity']['seed']} reading the synthetic images against their own masks, and "
        "(on real) the same segmenter on the",
        "  real val images. Render IoU well below on real: a class the renderer cannot yet draw; both low: the",
        "  segmenter cannot read the class at all, so its render IoU says nothing of the renderer",
        f"    {'class':<{width}}  {'train pixels':>16}  {'real only':>14}"
        + "".join(f"  {column:>14}" for column in ARM_COLUMNS.values())
        + f"  {'synth - overs':>14} {'>0':>5}  {'render IoU':>10}  {'on real':>7}",
    ]
    for name in sorted(pixels, key=pixels.get):  # stable: equal counts keep the class order
        line = f"    {name:<{width}}  {pixels[name]:>8} ({100 * pixels[name] / total:5.1f}%)"
        line += f"  {_over_seeds(arms['real_only']['per_class_iou'][name], 3):>14}"
        line += "".join(f"  {_over_seeds(changes[arm]['per_class_iou'][name], 3, True):>14}" for arm in ARM_COLUMNS)
        line += (
            f"  {_over_seeds(versus[name], 3, True):>14} {versus[name]['positive_seeds']:>2}/{len(down['seeds']):<2}"
        )
        line += f"  {_number(render[name]):>10}  {_number(reader[name], 3):>7}"
        lines.append(line + ("  worse" if name in down["classes_made_worse"] else ""))
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
        lines += downstream_report(results["downstream"])
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


def write_results(
    results: dict, results_dir: Path, generated: GeneratedSet, classes: Classes | None, real_files: list[Path], args
) -> str:
    """metrics.json, evaluation_report.txt, per_class_iou.png (with miou) and comparison_grid.png; returns the
    report."""
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results_dir / "metrics.json", results)
    report = report_text(results)
    write_text_atomic(results_dir / "evaluation_report.txt", report)
    if "miou" in results:
        title = f"Per-class IoU: {generated.root.name}"
        plot_per_class_iou(results, classes, results_dir / "per_class_iou.png", title)
    grid = comparison_grid(
        generated,
        {path.stem: path for path in real_files},
        classes.palette if classes else default_palette(256),
        num_masks=args.grid_masks,
        num_samples=args.grid_samples,
        ignore_index=args.ignore_index,
    )
    grid.save(results_dir / "comparison_grid.png")
    return report


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def default_results_dir(generated_dir: Path) -> Path:
    """GENERATED_DIR_evaluation, next to the generated folder: results never land among the inputs (where a
    re-run or another tool reading the folder would take them for generated images)."""
    generated_dir = generated_dir.resolve()
    return generated_dir.with_name(f"{generated_dir.name}_evaluation")


def evaluate(args) -> dict:
    generated = read_generated_set(Path(args.generated_dir), Path(args.masks_dir) if args.masks_dir else None)
    generated_dir = generated.root  # the folder given, or the parent of a bare generated_images/ folder
    results_dir = Path(args.results_dir) if args.results_dir else default_results_dir(generated_dir)
    if results_dir.resolve().is_relative_to(generated_dir.resolve()):
        raise DatasetError(
            f"--results_dir {results_dir} is inside --generated_dir {generated_dir}: its grid would be read as a "
            f"generated image by the next evaluation. Fix: pass another folder, or none (the default is "
            f"{default_results_dir(generated_dir)})."
        )
    metrics, skipped = choose_metrics(args, generated)
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}")

    # Everything that can be wrong with the inputs is checked here, before minutes of feature extraction.
    fid_kid = [name for name in metrics if name in ("fid", "kid")]
    inception = torchscript = lpips_weights = None
    if fid_kid and args.feature_extractor_torchscript is not None:
        torchscript = Path(args.feature_extractor_torchscript).expanduser()
        if not torchscript.is_file():
            raise DatasetError(f"--feature_extractor_torchscript {torchscript} does not exist. Fix: check the path.")
    elif fid_kid:
        inception = find_weights(
            args.inception_weights, "--inception_weights", INCEPTION_FILES, INCEPTION_URL, "FID/KID"
        )
        check_inception_file(inception)
    if fid_kid and not 0 <= args.kid_seed < 2**32:
        raise DatasetError(f"--kid_seed must be in 0..{2**32 - 1} (a numpy RandomState seed), got {args.kid_seed}.")
    if "lpips" in metrics:
        lpips_weights = find_weights(args.lpips_weights, "--lpips_weights", (ALEXNET_FILE,), ALEXNET_URL, "LPIPS")
    classes = resolve_classes(args, generated_dir)
    if classes is None and ("miou" in metrics or args.downstream):
        raise DatasetError(
            f"the classes are unknown: {generated_dir} has no class_names.json. Fix: pass --class_names_json FILE "
            "or --num_classes N."
        )
    if args.downstream and not generated.has_masks:
        raise DatasetError(
            f"--downstream trains on the generated (image, mask) pairs, but {generated_dir} has no masks."
        )
    if "miou" in metrics:
        check_aspect_ratios(generated.samples)
    resolution = args.downstream_resolution
    if args.downstream and resolution is not None and (resolution.height % 4 or resolution.width % 4):
        raise DatasetError(f"--downstream_resolution must be multiples of 4, got {resolution}.")
    real_files = real_image_files(args) if args.real_dir else []
    if "kid" in metrics:  # a --kid_subset_size too big stops here
        resolve_kid_subset_size(args.kid_subset_size, len(real_files), len(generated.samples))
    real_train, real_val = downstream_splits(args, classes) if args.downstream else (None, None)
    synthetic, synthetic_class_ids = downstream_synthetic_pairs(generated) if args.downstream else (None, None)
    if args.downstream:
        real_shapes = image_shapes([image for image, _ in real_train.pairs])
        warn_about_stretched_synthetic(image_shapes([image for image, _ in synthetic]), real_shapes)
        resolution = resolution or default_downstream_resolution(real_shapes)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    segmenter = build_segmenter(args.segmenter, classes, device) if "miou" in metrics else None
    lookup = class_lookup(args.segmenter_class_map, segmenter.num_labels, len(classes.names)) if segmenter else None
    references = None
    if "style" in metrics:
        references = match_references(Path(args.reference_dir), [(s.image, s.source) for s in generated.samples])

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
            probe_size = (args.feature_image_size,) * 2 if args.feature_image_size else read_image(real_files[0]).size
            extractor = load_torchscript_extractor(torchscript, probe_size, device)
        results.update(
            fid_kid_scores(
                real_files,
                [sample.image for sample in generated.samples],
                extractor,
                fid_kid,
                device,
                batch_size=args.batch_size,
                image_size=args.feature_image_size,
                kid_subsets=args.kid_subsets,
                kid_subset_size=args.kid_subset_size,
                kid_seed=args.kid_seed,
            )
        )
    if lpips_weights is not None:
        groups = [[sample.image for sample in group] for group in generated.groups().values()]
        results.update(lpips_scores(groups, lpips_weights, device, args.batch_size))
    if segmenter is not None:
        results.update(
            semantic_consistency(
                [(sample.image, sample.mask) for sample in generated.samples],
                segmenter,
                lookup,
                classes,
                ignore_index=args.ignore_index,
                batch_size=args.batch_size,
                class_ids=[sample.class_id for sample in generated.samples],
            )
        )
    if references is not None:
        images = [sample.image for sample in generated.samples]
        results.update(style_scores(images, references, args.histogram_bins), reference_dir=args.reference_dir)
    if real_train is not None:
        downstream = run_downstream(
            real_train.pairs,
            synthetic,
            real_val.pairs,
            classes.names,
            synthetic_class_ids=synthetic_class_ids,
            real_label_offset=real_train.label_offset,
            val_label_offset=real_val.label_offset,
            steps=args.downstream_steps,
            resolution=resolution,
            batch_size=args.downstream_batch_size,
            learning_rate=args.downstream_learning_rate,
            seeds=args.downstream_seeds,
            model=args.downstream_model,
            pretrained=args.downstream_pretrained,
            oversampling_threshold=args.downstream_oversampling_threshold,
            worse_threshold=args.downstream_worse_threshold,
            ignore_index=args.ignore_index,
            device=device,
        )
        # Which real pairs every arm trained on: those of a trainer run with the same data and --max_train_samples.
        results["downstream"] = {
            **downstream,
            "train_samples": real_train.sample_names(),
            "generators": generators_real_pairs(generated_dir, real_train, real_val),
        }

    results = json_ready(results)
    report = write_results(results, results_dir, generated, classes, real_files, args)
    print(report + f"\nWrote metrics.json, evaluation_report.txt and plots to {results_dir}")
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    with exit_on_bad_input():  # bad inputs: the message names the file or option and the fix
        return evaluate(args)


if __name__ == "__main__":
    main()
