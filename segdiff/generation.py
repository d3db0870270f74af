"""What the mask -> image generators share: samplers, reading a folder of masks, and the output layout.

generate_spade_sdm.py and generate_controlnet_seg.py turn every mask of ``--masks_dir`` into N images and
write, under ``--save_dir``, everything keyed by the mask's file stem (``<stem>``)::

    generated_images/sample_<stem>/generated_00.png ... generated_{N-1}.png   (the N images of that mask)
    visualizations/sample_<stem>.png      colourised mask | its N images
    images/<stem>_00.png ...              flat copy of every image (a hard link where the disk allows) ...
    masks/<stem>_00.png ...               ... with the label map it came from (label PNG, palette attached),
                                          so --save_dir is itself a *generic* dataset
    metadata.jsonl                        one line per image, in (stem, image) order: files, mask, seed, sampler...
    generation_args.json                  the arguments that determine the images (checked by a re-run)
    class_names.json, grid.png            the classes; the first visualizations (in stem order) stacked

Image j of a mask is drawn with seed ``derive_seed(--seed, <stem>, j)`` (segdiff.training), whatever the batch
size and whatever other masks the folder holds. Nothing depends on a mask's position in the folder, so masks
added to --masks_dir later get their own folders and seeds and never move the earlier ones. A re-run with the
same generation arguments keeps the masks already written (also those no longer in --masks_dir) and generates
only the missing ones; one with other arguments is refused, unless --overwrite regenerates everything.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from PIL import Image

from segdiff.data import (
    IMAGE_EXTENSIONS,
    DatasetError,
    _decode_file,
    _label_array,
    colorize_label,
    decode_label_ids,
    save_label_png,
    write_class_names,
)
from segdiff.training import derive_seed, write_json_atomic, write_jsonl_atomic
from segdiff.visualize import image_grid

# The arguments of the run that wrote a --save_dir, as far as they determine its images: see check_save_dir.
ARGS_FILE = "generation_args.json"
# Everything a generator writes in --save_dir: what --overwrite removes. Nothing else there is touched.
OUTPUT_FOLDERS = ("generated_images", "visualizations", "images", "masks")
OUTPUT_FILES = ("metadata.jsonl", "grid.png", "class_names.json", "generation_config.json", ARGS_FILE)

# Samplers by command-line name. Each inherits the training schedule (betas, prediction type, clipping...).
SCHEDULERS = {
    "ddim": DDIMScheduler.from_config,
    "ddpm": DDPMScheduler.from_config,
    "dpmsolver": lambda config, **kwargs: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", **kwargs
    ),
    "unipc": UniPCMultistepScheduler.from_config,
}
# The samplers the joint and SDM generators offer (the --scheduler {ddim,ddpm,dpmsolver} of DESIGN.md), in
# this order; the ControlNet generator offers all of SCHEDULERS, its default UniPC included.
CORE_SCHEDULERS = ("ddim", "ddpm", "dpmsolver")


def make_scheduler(name: str, config):
    """The sampler ``name`` (a key of SCHEDULERS) built from a trained pipeline's scheduler config.

    A schedule that clips the predicted x0 to [-1, 1] (pixel-space SDM) keeps doing so in the multistep
    solvers, which know no ``clip_sample``: their thresholding with ``sample_max_value=1`` is that clipping.
    Without it they follow an imperfect model's out-of-range x0 guesses (tiny toy SDM after 400 steps,
    DPM-Solver++ with 50 steps: mIoU 0.22 unclipped, 0.50 clipped; DDPM reaches 1.00 on the same model).
    """
    kwargs = {}
    if name in ("dpmsolver", "unipc") and config.get("clip_sample"):
        kwargs = {"thresholding": True, "sample_max_value": float(config.get("clip_sample_range", 1.0))}
    return SCHEDULERS[name](config, **kwargs)


def save_png_atomic(image: Image.Image, path: Path) -> None:
    """Write to a temporary name, then rename: an interrupted run never leaves a half-written PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# Reading a folder of masks
# ------------------------------------------------------------------------------------------------


def colour_mask_to_labels(rgb: np.ndarray, palette, ignore_index: int, path: Path) -> np.ndarray:
    """Class ids of a colour-coded mask: each pixel's exact palette colour; black is ignore unless a class uses it.

    Any other colour is an error that names the file and the colours: guessing the nearest class would
    silently turn anti-aliased edges or a wrong palette into plausible-looking labels.
    """
    colours = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    lookup = {int((r << 16) | (g << 8) | b): class_id for class_id, (r, g, b) in enumerate(colours)}
    lookup.setdefault(0, ignore_index)  # black: no data, as the ControlNet trainer draws ignore pixels
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(code) for code in unique if int(code) not in lookup]
    if unknown:
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown[:5])
        raise DatasetError(
            f"mask {path} has {len(unknown)} colour(s) that are not in the palette, e.g. {shown}. Fix: save the "
            "mask as a label map (class ids), or draw it with exactly the palette of class_names.json (no "
            "anti-aliasing, no JPEG); black means no data."
        )
    return np.asarray([lookup[int(code)] for code in unique], dtype=np.int64)[inverse].reshape(codes.shape)


def read_mask(path: Path, palette, ignore_index: int, label_offset: int = 0) -> np.ndarray:
    """A label map from a label PNG (ids, read as a dataset of that ``label_offset`` stores them: 1 for raw LoveDA
    masks), or from a colour PNG mapped through the palette."""

    def convert(img: Image.Image) -> np.ndarray:
        if img.mode in ("RGB", "RGBA"):
            rgb = np.asarray(img.convert("RGB"))
            if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                return colour_mask_to_labels(rgb, palette, ignore_index, path)
        return decode_label_ids(_label_array(img, path), label_offset, ignore_index)

    return _decode_file(path, "mask", convert)


@dataclass
class MaskFile:
    """One input mask. Its stem, not its position in the folder, names its outputs and seeds its images."""

    path: Path

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def sample_dir(self) -> str:
        return f"generated_images/sample_{self.stem}"

    def seeds(self, seed: int, count: int) -> list[int]:
        """The seeds of its ``count`` images: the same for this stem whatever else the masks folder holds."""
        return [derive_seed(seed, self.stem, j) for j in range(count)]


def same_stem_files(paths: list[Path]) -> list[list[Path]]:
    """Groups of files whose stems are equal, compared ignoring case: their outputs would share one name
    (ignoring case because macOS and Windows disks do: ``A/`` and ``a/`` would be one sample folder there)."""
    by_stem: dict[str, list[Path]] = {}
    for path in paths:
        by_stem.setdefault(path.stem.casefold(), []).append(path)
    return [group for group in by_stem.values() if len(group) > 1]


def list_masks(masks_dir: str | Path, num_classes: int, palette, ignore_index: int) -> list[MaskFile]:
    """Every mask of the folder, in stem order, checked before anything is generated: all problems at once."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise DatasetError(f"--masks_dir {masks_dir} does not exist. Fix: point it at a folder of mask PNGs.")
    paths = sorted(
        (p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: (p.stem, p.name),
    )
    if not paths:
        raise DatasetError(
            f"--masks_dir {masks_dir} holds no mask files ({', '.join(IMAGE_EXTENSIONS)}). Fix: point it at a "
            "folder of label PNGs, e.g. the masks/ folder of a dataset."
        )
    clashes = same_stem_files(paths)
    if clashes:
        shown = "; ".join(" and ".join(p.name for p in group) for group in clashes[:5])
        raise DatasetError(
            f"--masks_dir {masks_dir} has {len(clashes)} file name(s) used by more than one mask: {shown}"
            f"{'; ...' if len(clashes) > 5 else ''}. A mask's file stem names its sample folder, its output files "
            "and seeds its images (stems are compared ignoring case). Fix: rename or remove one file of each pair."
        )
    problems = []
    for path in paths:
        try:
            label = read_mask(path, palette, ignore_index)
        except DatasetError as error:
            problems.append(str(error))
            continue
        stray = sorted(int(i) for i in np.unique(label) if i != ignore_index and not 0 <= i < num_classes)
        if stray:
            problems.append(
                f"mask {path} holds ids the model was not trained for: {stray[:10]}. The model knows classes "
                f"0..{num_classes - 1} and ignore_index {ignore_index}. Fix: remap the ids, or use the model "
                "trained on this label set."
            )
    if problems:
        raise DatasetError(f"{len(problems)} bad mask(s) in {masks_dir}:\n  " + "\n  ".join(problems))
    return [MaskFile(path) for path in paths]


def resize_labels(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (ids are never blended)."""
    if label.shape == (height, width):
        return label
    resized = Image.fromarray(label.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Writing the output layout
# ------------------------------------------------------------------------------------------------


def recorded_path(name: str | Path | None) -> str | None:
    """A path argument (model, checkpoint, reference image) as recorded in ARGS_FILE: a local path made absolute (the
    same file from any working directory, so a re-run from elsewhere still matches), anything else (a hub id) as given."""
    if name is None:
        return None
    return str(Path(name).resolve()) if Path(name).exists() else str(name)


def holds_earlier_output(save_dir: Path) -> bool:
    generated = save_dir / "generated_images"
    return (
        (save_dir / ARGS_FILE).is_file()
        or (save_dir / "metadata.jsonl").is_file()
        or (generated.is_dir() and any(generated.iterdir()))
    )


def check_save_dir(save_dir: str | Path, generation_args: dict, overwrite: bool = False) -> None:
    """Refuse to add images to an earlier run's --save_dir unless ``generation_args`` are the ones it recorded.

    A --save_dir is one experiment: a re-run only fills in the masks it lacks. Images drawn with another model,
    sampler, step count, guidance... added to it would make its metrics describe no single setting, and nothing
    in it would say which image came from which. ``overwrite`` (--overwrite) allows anything: the writer then
    removes the old outputs first. The generators call this before loading their models too, to fail in seconds.
    """
    save_dir = Path(save_dir)
    if overwrite or not holds_earlier_output(save_dir):
        return
    fix = "Fix: pass --overwrite to regenerate everything there, or choose a new --save_dir."
    args_file = save_dir / ARGS_FILE
    if not args_file.is_file():
        raise DatasetError(
            f"--save_dir {save_dir} holds generated images but no {ARGS_FILE}: an earlier version of the generator "
            f"(which numbered masks by their position in the folder) or another tool wrote them, with arguments "
            f"unknown. {fix}"
        )
    try:
        recorded = json.loads(args_file.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{args_file} is not valid JSON ({error}). {fix}") from None
    if not isinstance(recorded, dict):
        raise DatasetError(f"{args_file} holds no JSON object of arguments. {fix}")
    current = json.loads(json.dumps(generation_args))  # as it would be read back: tuples become lists
    keys = [*current, *(key for key in recorded if key not in current)]
    missing = object()
    differing = [key for key in keys if recorded.get(key, missing) != current.get(key, missing)]
    if differing:

        def shown(values, key):
            return json.dumps(values[key]) if key in values else "(not recorded)"

        changes = "; ".join(f"--{key}: {shown(recorded, key)} there, {shown(current, key)} now" for key in differing)
        raise DatasetError(
            f"--save_dir {save_dir} was generated with other arguments ({args_file.name}): {changes}. Its images "
            "and new ones would not be one experiment. Fix: re-run with the recorded values to add the missing "
            "masks only, pass --overwrite to regenerate everything with the new ones, or choose a new --save_dir."
        )


def clear_outputs(save_dir: Path) -> None:
    """What --overwrite removes: the generator's own folders and files (OUTPUT_FOLDERS, OUTPUT_FILES), nothing else."""
    for name in OUTPUT_FOLDERS:
        if (save_dir / name).is_dir():
            shutil.rmtree(save_dir / name)
    for name in OUTPUT_FILES:
        (save_dir / name).unlink(missing_ok=True)


class MaskSampleWriter:
    """Writes the layout of the module docstring, one mask at a time, and knows what an earlier run finished.

    ``generation_args`` are the arguments that determine the images (each script's own list): checked against
    an earlier run's (check_save_dir), then recorded in ARGS_FILE before the first image is written.
    """

    def __init__(
        self,
        save_dir: str | Path,
        class_names,
        palette,
        ignore_index: int,
        num_per_mask: int,
        generation_args: dict,
        overwrite: bool = False,
    ):
        self.save_dir = Path(save_dir)
        self.palette = palette
        self.ignore_index = ignore_index
        self.num_per_mask = num_per_mask
        check_save_dir(self.save_dir, generation_args, overwrite)
        if overwrite and holds_earlier_output(self.save_dir):
            clear_outputs(self.save_dir)
        for folder in OUTPUT_FOLDERS:
            (self.save_dir / folder).mkdir(parents=True, exist_ok=True)
        # Before any image: a folder that holds images always says which arguments made them.
        write_json_atomic(self.save_dir / ARGS_FILE, generation_args)
        write_class_names(self.save_dir / "class_names.json", class_names, palette)
        self.metadata_path = self.save_dir / "metadata.jsonl"
        self.records = self._finished_records()

    def _finished_records(self) -> dict[str, list[dict]]:
        """Records of an earlier run, by mask stem, for the masks whose N images are all on disk."""
        by_mask: dict[str, dict[int, dict]] = {}
        if self.metadata_path.is_file():
            for line in self.metadata_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of an interrupted run: that mask is generated again
                # A mask generated again after an interruption has its records twice: the later ones count.
                by_mask.setdefault(record["mask_stem"], {})[record["image_index"]] = record
        return {
            stem: [records[j] for j in sorted(records)]
            for stem, records in by_mask.items()
            if sorted(records) == list(range(self.num_per_mask))
            and all(
                (self.save_dir / r[key]).is_file() for r in records.values() for key in ("file_name", "mask_file_name")
            )
        }

    def is_done(self, mask: MaskFile) -> bool:
        return mask.stem in self.records

    def write(self, mask: MaskFile, label: np.ndarray, images: list[Image.Image], details: list[dict]) -> None:
        """Save the N images of one mask, its label map beside each flat copy, its row picture and metadata."""
        sample_dir = self.save_dir / mask.sample_dir
        sample_dir.mkdir(parents=True, exist_ok=True)
        width, height = images[0].size
        label = resize_labels(label, height, width)
        records = []
        for j, (image, detail) in enumerate(zip(images, details)):
            generated = sample_dir / f"generated_{j:02d}.png"
            save_png_atomic(image, generated)
            flat_name = f"{mask.stem}_{j:02d}.png"
            link_or_copy(generated, self.save_dir / "images" / flat_name)
            save_label_png(label, self.save_dir / "masks" / flat_name, self.palette)
            records.append(
                {
                    "file_name": f"images/{flat_name}",
                    "mask_file_name": f"masks/{flat_name}",
                    "sample_dir": mask.sample_dir,
                    "generated_file_name": f"{mask.sample_dir}/{generated.name}",
                    "mask_source": mask.path.name,
                    "mask_stem": mask.stem,
                    "image_index": j,
                    **detail,
                }
            )
        colourised = colorize_label(label, self.palette, self.ignore_index)
        row = image_grid([colourised, *images], cols=len(images) + 1)
        save_png_atomic(row, self.save_dir / "visualizations" / f"{Path(mask.sample_dir).name}.png")
        # Metadata last, appended and flushed: a mask counts as done only once all of its files exist.
        with open(self.metadata_path, "a") as metadata:
            metadata.write("".join(json.dumps(record) + "\n" for record in records))
        self.records[mask.stem] = records

    def finish(self, grid_rows: int = 8) -> int:
        """Rewrite metadata.jsonl in (stem, image) order, without an earlier run's leftovers, and draw grid.png."""
        ordered = [record for stem in sorted(self.records) for record in self.records[stem]]
        write_jsonl_atomic(self.metadata_path, ordered)
        rows = [self.records[stem][0]["sample_dir"] for stem in sorted(self.records)[:grid_rows]]
        if rows:
            pictures = [Image.open(self.save_dir / "visualizations" / f"{Path(row).name}.png") for row in rows]
            save_png_atomic(image_grid(pictures, cols=1), self.save_dir / "grid.png")
        return len(ordered)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy on disk) where the file system allows one, else a copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(source.read_bytes())
        tmp.replace(target)
