"""What the mask -> image generators share: samplers, reading a folder of masks, and the output layout.

generate_spade_sdm.py and generate_controlnet_seg.py turn every mask of ``--masks_dir`` into N images and
write, under ``--save_dir``::

    generated_images/sample_000001/generated_00.png ... generated_{N-1}.png   (N images of mask 1)
    visualizations/sample_000001.png      colourised mask | its N images
    images/<mask stem>_00.png ...         flat copy of every image (a hard link where the disk allows) ...
    masks/<mask stem>_00.png ...          ... with the label map it came from (label PNG, palette attached),
                                          so --save_dir is itself a *generic* dataset
    metadata.jsonl                        one line per image: files, mask, seed, sampler, steps, guidance
    class_names.json, grid.png            the classes; the first visualizations stacked

Masks are numbered in sorted file-name order. Image j of mask i is drawn with seed ``--seed + i * N + j``,
whatever the batch size, and a re-run with the same arguments keeps the masks already written.
"""

from __future__ import annotations

import json
import os
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
    save_label_png,
    write_class_names,
)
from segdiff.visualize import image_grid

# Samplers by command-line name. Each inherits the training schedule (betas, prediction type, clipping...).
SCHEDULERS = {
    "ddim": DDIMScheduler.from_config,
    "ddpm": DDPMScheduler.from_config,
    "dpmsolver": lambda config, **kwargs: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", **kwargs
    ),
    "unipc": UniPCMultistepScheduler.from_config,
}


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


def read_mask(path: Path, palette, ignore_index: int) -> np.ndarray:
    """A label map from a label PNG (ids), or from a colour PNG mapped through the palette."""

    def convert(img: Image.Image) -> np.ndarray:
        if img.mode in ("RGB", "RGBA"):
            rgb = np.asarray(img.convert("RGB"))
            if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                return colour_mask_to_labels(rgb, palette, ignore_index, path)
        return _label_array(img, path)

    return _decode_file(path, "mask", convert)


@dataclass
class MaskFile:
    index: int
    path: Path

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def sample_dir(self) -> str:
        return f"generated_images/sample_{self.index + 1:06d}"


def list_masks(masks_dir: str | Path, num_classes: int, palette, ignore_index: int) -> list[MaskFile]:
    """Every mask of the folder, checked before anything is generated: all problems reported at once."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise DatasetError(f"--masks_dir {masks_dir} does not exist. Fix: point it at a folder of mask PNGs.")
    paths = sorted(p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DatasetError(
            f"--masks_dir {masks_dir} holds no mask files ({', '.join(IMAGE_EXTENSIONS)}). Fix: point it at a "
            "folder of label PNGs, e.g. the masks/ folder of a dataset."
        )
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise DatasetError(f"--masks_dir {masks_dir} has several files per name: {twice}. Fix: keep one of each.")
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
    return [MaskFile(index, path) for index, path in enumerate(paths)]


def resize_labels(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (ids are never blended)."""
    if label.shape == (height, width):
        return label
    resized = Image.fromarray(label.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Writing the output layout
# ------------------------------------------------------------------------------------------------


class MaskSampleWriter:
    """Writes the layout of the module docstring, one mask at a time, and knows what an earlier run finished."""

    def __init__(self, save_dir: str | Path, class_names, palette, ignore_index: int, num_per_mask: int):
        self.save_dir = Path(save_dir)
        self.palette = palette
        self.ignore_index = ignore_index
        self.num_per_mask = num_per_mask
        for folder in ("generated_images", "visualizations", "images", "masks"):
            (self.save_dir / folder).mkdir(parents=True, exist_ok=True)
        write_class_names(self.save_dir / "class_names.json", class_names, palette)
        self.metadata_path = self.save_dir / "metadata.jsonl"
        self.records = self._finished_records()

    def _finished_records(self) -> dict[str, list[dict]]:
        """Records of an earlier run, by mask source, for the masks whose N images are all on disk."""
        by_mask: dict[str, list[dict]] = {}
        if self.metadata_path.is_file():
            for line in self.metadata_path.read_text().splitlines():
                record = json.loads(line)
                by_mask.setdefault(record["mask_source"], []).append(record)
        return {
            mask: records
            for mask, records in by_mask.items()
            if len({r["image_index"] for r in records}) == self.num_per_mask
            and all((self.save_dir / r[key]).is_file() for r in records for key in ("file_name", "mask_file_name"))
        }

    def is_done(self, mask: MaskFile) -> bool:
        return mask.path.name in self.records

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
                    "mask_index": mask.index,
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
        self.records[mask.path.name] = records

    def finish(self, grid_rows: int = 8) -> int:
        """Rewrite metadata.jsonl in mask order (no duplicates from earlier runs) and draw grid.png."""
        ordered = sorted(
            (r for records in self.records.values() for r in records), key=lambda r: (r["mask_index"], r["image_index"])
        )
        tmp = self.save_dir / ".metadata.jsonl.tmp"
        tmp.write_text("".join(json.dumps(record) + "\n" for record in ordered))
        tmp.replace(self.metadata_path)
        rows = sorted({r["sample_dir"] for r in ordered})[:grid_rows]
        if rows:
            pictures = [Image.open(self.save_dir / "visualizations" / f"{Path(row).name}.png") for row in rows]
            image_grid(pictures, cols=1).save(self.save_dir / "grid.png")
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
