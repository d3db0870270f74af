"""What the generators share: one command line, schedulers, reading masks, the output layout, and multi-process runs.

generate_spade_sdm.py and generate_controlnet_seg.py turn every mask of ``--masks_dir`` (or the one ``--mask``)
into N images and write, under ``--save_dir``, everything keyed by the mask's file stem (``<stem>``)::

    generated_images/sample_<stem>/generated_00.png ... generated_{N-1}.png   (the N images of that mask)
    visualizations/sample_<stem>.png      colourised mask | its N images
    images/<stem>_00.png ...              flat copy of every image (a hard link where the disk allows) ...
    masks/<stem>_00.png ...               ... with the label map it came from (label PNG, palette attached),
                                          so --save_dir is itself a *generic* dataset
    metadata.jsonl                        one line per image, in (stem, image) order: files, mask, seed, scheduler...
    generation_args.json                  the arguments that determine the images (checked by a re-run)
    class_names.json, grid.png            the classes; the first visualizations (in stem order) stacked

Image j of a mask is drawn with seed ``derive_seed(--seed, <stem>, j)`` (segdiff.training), whatever the batch
size and whatever other masks the folder holds. Nothing depends on a mask's position in the folder, so masks
added to --masks_dir later get their own folders and seeds and never move the earlier ones. A re-run with the
same generation arguments keeps the masks already written (also those no longer in --masks_dir) and generates
only the missing ones; one with other arguments is refused, unless --overwrite regenerates everything.

Under ``accelerate launch`` or torchrun with N processes, each process takes every N-th of the masks still
missing (in stem order, `process_share`) and leaves each finished mask's records in ``.records/<stem>.json``;
the main process merges them into metadata.jsonl once all are done. The seeds make the images those of a
one-process run (batched convolutions aside, which may differ in the last bit when masks share a batch).

The command-line vocabulary of the generators (the joint one included) is built here once: `add_model_argument`,
`add_mask_arguments`, `add_images_per_mask_argument`, `add_output_size_arguments`, `add_eta_argument`, checked
by `check_generation_args`. No other spellings, except those a reference document's command prints (the joint
generator's `--checkpoint` and `--image_size`, declared there).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segdiff.arguments import finite_float, image_size, non_negative_int, output_folder, positive_int
from segdiff.data import (
    IMAGE_EXTENSIONS,
    DatasetError,
    _decode_file,
    _label_array,
    decode_label_ids,
    read_json,
    save_label_png,
    write_class_names,
)
from segdiff.files import save_image_atomic, write_bytes_atomic, write_json_atomic, write_jsonl_atomic
from segdiff.geometry import ImageSize
from segdiff.labels import colorize_label, colour_codes, colours_of_codes, resize_labels
from segdiff.processes import OneProcess, process_share
from segdiff.runs import recorded_path
from segdiff.schedulers import SCHEDULERS, takes_eta
from segdiff.seeds import derive_seed
from segdiff.visualize import image_grid

# The arguments of the run that wrote a --save_dir, as far as they determine its images: see check_save_dir.
ARGS_FILE = "generation_args.json"
# Each finished mask's (or sample's) metadata, one file each, written last: what the processes of a multi-process
# run leave for the main process to merge into metadata.jsonl, and what a re-run finds done.
RECORDS_FOLDER = ".records"
# Everything a generator writes in --save_dir: what --overwrite removes. Nothing else there is touched.
OUTPUT_FOLDERS = ("generated_images", "visualizations", "images", "masks", "overlays", RECORDS_FOLDER)
OUTPUT_FILES = (
    "metadata.jsonl",
    "grid.png",
    "class_names.json",
    "generation_config.json",
    "ratio_report.json",
    ARGS_FILE,
)

# ------------------------------------------------------------------------------------------------
# One command line for the generators (the README's table lists these flags and their old spellings)
# ------------------------------------------------------------------------------------------------


def add_model_argument(parser: argparse.ArgumentParser, help: str, *reference_spellings: str) -> None:
    """``--model``: the trained output folder, a checkpoint-N/ in it, or a Hub repository id (``args.model``), and
    ``--revision`` for a repository id. ``reference_spellings``: other names a reference document's command uses for
    it (the joint generator's ``--checkpoint``)."""
    parser.add_argument(
        "--model", *reference_spellings, dest="model", required=True, help=f"{help} Or a Hub repository id."
    )
    parser.add_argument(
        "--revision", default=None, help="The branch, tag or commit of a --model that is a Hub repository id."
    )


def add_save_dir_arguments(parser: argparse.ArgumentParser, units: str) -> None:
    """``--save_dir`` (resumable: a re-run adds the ``units`` it lacks) and ``--overwrite``."""
    parser.add_argument(
        "--save_dir",
        type=output_folder,
        required=True,
        help=f"Where the generated dataset goes. A re-run into it adds the {units} it lacks, with the arguments it "
        "was made with (generation_args.json).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"Regenerate every {units[:-1]} into --save_dir, removing its earlier outputs (needed to change the "
        "generation arguments of an existing --save_dir).",
    )


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    """``--masks_dir DIR`` or ``--mask FILE``: the masks to generate from, a folder of them or a single one."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--masks_dir", default=None, help="A folder of masks: label PNGs, or colour PNGs (palette).")
    source.add_argument(
        "--mask",
        default=None,
        help="A single mask file instead of --masks_dir: its images are written as for a folder of that one mask.",
    )
    parser.add_argument(
        "--label_offset",
        type=non_negative_int,
        default=0,
        help="The file id of class 0 in label PNG masks: 1 for masks whose 0 marks no-data and whose classes "
        "count from 1, such as LoveDA's raw masks_png (the trainers' --label_offset, or LoveDA's own). Ids below it "
        "are no-data. Colour masks are read through the palette. (default: %(default)s: class ids, as the masks/ "
        "of a generated folder hold them)",
    )


def add_images_per_mask_argument(parser: argparse.ArgumentParser, default: int | None) -> None:
    parser.add_argument(
        "--num_images_per_mask",
        type=positive_int,
        default=default,
        help=f"Images per mask. (default: {default})" if default else "Images per mask.",
    )


def add_output_size_arguments(parser: argparse.ArgumentParser, square: str, *reference_spellings: str) -> None:
    """``--resolution N`` or ``--resolution H,W`` (an ImageSize), or ``--height H --width W``. ``square`` says what
    N means for this generator; ``reference_spellings``: other names a reference document's command uses."""
    size = parser.add_argument_group("output size (default: the training size)")
    size.add_argument(
        "--resolution",
        *reference_spellings,
        dest="resolution",
        type=image_size,
        default=None,
        help=f"N: {square}. HEIGHT,WIDTH (e.g. 384,512): exactly that size; masks are resized, nearest, to it.",
    )
    size.add_argument(
        "--height", type=positive_int, default=None, help="Image height; with --width, as --resolution H,W."
    )
    size.add_argument("--width", type=positive_int, default=None, help="Image width; with --height.")


def add_eta_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eta",
        type=finite_float,
        default=None,
        help="DDIM's eta (--scheduler ddim only): the share of fresh noise each step adds, 0 deterministic (DDIM's "
        "default), 1 as much as DDPM (latent diffusion samples with 1.0). Recorded when given.",
    )


def check_generation_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The shared flags' cross-checks, as ``parser.error`` (usage) messages. --height/--width become
    ``args.resolution``, so ``args.resolution`` is None (the training size) or an ImageSize."""
    if (args.height is None) != (args.width is None):
        parser.error("--height and --width go together: give both, or --resolution HEIGHT,WIDTH")
    if args.height is not None:
        if args.resolution is not None:
            parser.error("give the size once: --resolution, or --height and --width")
        args.resolution = ImageSize(args.height, args.width)
    if getattr(args, "eta", None) is not None:
        if not takes_eta(args.scheduler):
            with_eta_names = ", ".join(name for name in SCHEDULERS if takes_eta(name))
            parser.error(
                f"--eta is for schedulers with DDIM's eta ({with_eta_names}); --scheduler {args.scheduler} has none. "
                "Fix: pass --scheduler ddim, or drop --eta."
            )
        if not 0 <= args.eta <= 1:
            parser.error(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {args.eta}")


def mask_groups(masks: list, per_mask: int, batch_size: int) -> list[list]:
    """Consecutive masks whose images fill one batch of ``batch_size`` (at least one mask a group)."""
    masks_per_batch = max(1, batch_size // per_mask)
    return [masks[start : start + masks_per_batch] for start in range(0, len(masks), masks_per_batch)]


def save_records(save_dir: Path, name: str, records: list[dict]) -> None:
    """One finished unit's metadata (a mask's N records, or one sample's), after its files: it counts as done."""
    folder = Path(save_dir) / RECORDS_FOLDER
    folder.mkdir(exist_ok=True)
    write_json_atomic(folder / f"{name}.json", records)


def records_by_unit(save_dir: Path, unit_of) -> dict[str, list[dict]]:
    """The records of metadata.jsonl by unit (``unit_of(record)``), each replaced whole by the unit's later save in
    RECORDS_FOLDER (a unit generated again after an interruption)."""
    save_dir = Path(save_dir)
    by_unit: dict[str, list[dict]] = {}
    if (save_dir / "metadata.jsonl").is_file():
        for line in (save_dir / "metadata.jsonl").read_text().splitlines():
            record = json.loads(line)
            by_unit.setdefault(unit_of(record), []).append(record)
    for path in sorted((save_dir / RECORDS_FOLDER).glob("*.json")):
        records = json.loads(path.read_text())
        by_unit[unit_of(records[0])] = records
    return by_unit


def publish_records(save_dir: Path, ordered: list[dict]) -> None:
    """metadata.jsonl := ``ordered`` (all records, merged), then the per-unit files it now holds go."""
    write_jsonl_atomic(Path(save_dir) / "metadata.jsonl", ordered)
    shutil.rmtree(Path(save_dir) / RECORDS_FOLDER, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Reading a folder of masks
# ------------------------------------------------------------------------------------------------


def colour_mask_to_labels(rgb: np.ndarray, palette, ignore_index: int, path: Path) -> np.ndarray:
    """Class ids of a colour-coded mask: each pixel's exact palette colour; black is ignore unless a class uses it.

    Any other colour is an error that names the file and the colours: guessing the nearest class would
    silently turn anti-aliased edges or a wrong palette into plausible-looking labels.
    """
    codes = colour_codes(rgb)
    palette_codes = colour_codes(np.asarray(palette, dtype=np.int64).reshape(-1, 3))
    lookup = {int(code): class_id for class_id, code in enumerate(palette_codes)}
    lookup.setdefault(0, ignore_index)  # black: no data, as the ControlNet trainer draws ignore pixels
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(code) for code in unique if int(code) not in lookup]
    if unknown:
        shown = ", ".join(str(tuple(colour.tolist())) for colour in colours_of_codes(unknown[:5]))
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
    label_offset: int = 0  # how its ids encode classes (--label_offset)

    def read(self, palette, ignore_index: int) -> np.ndarray:
        """Its label map of class ids (`read_mask`)."""
        return read_mask(self.path, palette, ignore_index, self.label_offset)

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


def list_masks(
    masks_dir: str | Path, num_classes: int, palette, ignore_index: int, label_offset: int = 0
) -> list[MaskFile]:
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
    return checked_masks(paths, f"{masks_dir}", num_classes, palette, ignore_index, label_offset)


def masks_of(args, num_classes: int, palette, ignore_index: int) -> list[MaskFile]:
    """The masks of ``--masks_dir`` or the single ``--mask`` (add_mask_arguments), checked."""
    if args.masks_dir is not None:
        return list_masks(args.masks_dir, num_classes, palette, ignore_index, args.label_offset)
    path = Path(args.mask)
    if not path.is_file():
        raise DatasetError(f"--mask {path} does not exist. Fix: pass a label PNG or a colour PNG in the palette.")
    return checked_masks([path], f"--mask {path}", num_classes, palette, ignore_index, args.label_offset)


def checked_masks(
    paths: list[Path], where: str, num_classes: int, palette, ignore_index: int, label_offset: int = 0
) -> list[MaskFile]:
    """The masks, each read once to check it decodes and holds only the model's ids; all problems at once."""
    masks = [MaskFile(path, label_offset) for path in paths]
    problems = []
    for mask in masks:
        path = mask.path
        try:
            label = mask.read(palette, ignore_index)
        except DatasetError as error:
            problems.append(str(error))
            continue
        stray = sorted(int(i) for i in np.unique(label) if i != ignore_index and not 0 <= i < num_classes)
        if stray:
            problems.append(
                f"mask {path} holds ids the model was not trained for: {stray[:10]}. The model knows classes "
                f"0..{num_classes - 1} and ignore_index {ignore_index}. Fix: for files that count the classes "
                "from 1 (0 = no-data, as LoveDA's raw masks), pass --label_offset 1; else remap the ids, or use "
                "the model trained on this label set."
            )
    if problems:
        raise DatasetError(f"{len(problems)} bad mask(s) in {where}:\n  " + "\n  ".join(problems))
    return masks


def read_captions(path: str | Path, stems: list[str]) -> dict[str, str]:
    """Mask stem -> caption, from a JSON-lines file ({"stem" or "file_name": ..., "text" or "caption": ...} a
    line) or a CSV with a header (stem or file_name, text or caption). An empty caption counts as none (the mask
    gets its class prompt, as in training). Every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--captions {path} does not exist. Fix: pass a .jsonl or .csv file of stem -> text.")
    rows: list[tuple[int, object]] = []  # (line number, row)
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DatasetError(f"--captions {path} line {number} is not JSON ({error}).") from None
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            header = reader.fieldnames or []
            if not {"stem", "file_name"} & set(header) or not {"text", "caption"} & set(header):
                raise DatasetError(
                    f"--captions {path} line 1: the header must name the columns stem (or file_name) and text (or "
                    f"caption), got {','.join(header) or 'nothing'}."
                )
            rows = [(number, row) for number, row in enumerate(reader, start=2)]
    else:
        raise DatasetError(f"--captions {path}: expected a .jsonl or .csv file, got {path.suffix or 'no extension'}.")
    captions, lines = {}, {}
    known = set(stems)
    for number, row in rows:
        where = f"--captions {path} line {number}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where} is not an object with a stem and a text.")
        stem = row.get("stem") or (Path(row["file_name"]).stem if isinstance(row.get("file_name"), str) else None)
        text = row.get("text", row.get("caption"))
        if not isinstance(stem, str) or not stem or not (text is None or isinstance(text, str)):
            raise DatasetError(
                f'{where} names no mask or has no text: each line needs "stem" (or "file_name") and "text" '
                f'(or "caption") strings, got {json.dumps(row)[:200]}.'
            )
        if stem not in known:
            raise DatasetError(
                f"{where}: no mask has the stem {stem!r}. Fix: correct the name, or drop the line (captions pair "
                "with the masks by file stem)."
            )
        if stem in lines:
            raise DatasetError(f"{where}: a second caption for {stem!r} (the first is on line {lines[stem]}).")
        lines[stem] = number
        if text:
            captions[stem] = text
    return captions


# ------------------------------------------------------------------------------------------------
# Writing the output layout
# ------------------------------------------------------------------------------------------------


def recorded_model(name: str | Path | None, revision: str | None) -> str | None:
    """A trained model's flag as recorded in ARGS_FILE: `segdiff.runs.recorded_path`, with the revision of a Hub
    repository after an @ (samples of two revisions are two experiments)."""
    if name is None:
        return None
    return recorded_path(name) + (f"@{revision}" if revision else "")


def holds_earlier_output(save_dir: Path) -> bool:
    """Whether --save_dir holds samples of an earlier run: its metadata, or any file in the output folders. A
    generation_args.json alone (a run stopped before its first sample) is no output: it does not bind a re-run."""
    if (save_dir / "metadata.jsonl").is_file():
        return True
    return any(folder.is_dir() and any(folder.iterdir()) for folder in (save_dir / name for name in OUTPUT_FOLDERS))


def check_save_dir(save_dir: str | Path, generation_args: dict, overwrite: bool = False) -> None:
    """Refuse to add images to an earlier run's --save_dir unless ``generation_args`` are the ones it recorded.

    A --save_dir is one experiment: a re-run only fills in the masks it lacks. Images drawn with another model,
    scheduler, step count, guidance... added to it would make its metrics describe no single setting, and nothing
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
            f"--save_dir {save_dir} holds generated files but no {ARGS_FILE}: another tool wrote them, with "
            f"arguments unknown. {fix}"
        )
    recorded = read_json(args_file, "the record of arguments", fix, an_object=True)
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


class SampleWriter:
    """The one resumable output folder of the generators: a run writes *units* (a mask's N images, or one sample),
    each unit's files first and its records last, so a unit counts as done only once all of its files exist.

    ``generation_args`` are the arguments that determine the samples (each script's own list): checked against an
    earlier run's (`check_save_dir`), then recorded in ARGS_FILE, with the classes, before the first sample.
    ``state`` (`segdiff.processes.generation_state`): with several processes, the main one prepares --save_dir and
    merges the records; `todo` gives each process its share of the missing units. ``unit_of`` names a record's
    unit; a unit is done when its records are saved and every file they name (``*file_name`` keys) exists.
    """

    def __init__(
        self,
        save_dir: str | Path,
        class_names,
        palette,
        generation_args: dict,
        *,
        folders: tuple[str, ...],
        unit_of,
        overwrite: bool = False,
        state=None,
    ):
        self.save_dir = Path(save_dir)
        self.palette = palette
        self.unit_of = unit_of
        self.state = state or OneProcess()
        check_save_dir(self.save_dir, generation_args, overwrite)  # in every process: all stop alike
        if self.state.is_main_process:
            if overwrite and holds_earlier_output(self.save_dir):
                clear_outputs(self.save_dir)
            for folder in folders:
                (self.save_dir / folder).mkdir(parents=True, exist_ok=True)
            # Before any sample: a folder that holds samples always says which arguments made them.
            write_json_atomic(self.save_dir / ARGS_FILE, generation_args)
            write_class_names(self.save_dir / "class_names.json", class_names, palette)
        self.state.wait_for_everyone()
        self.records = self._finished_records()
        # Every process reads what is done before any writes more: the shares of `todo` then agree.
        self.state.wait_for_everyone()

    def is_complete(self, records: list[dict]) -> bool:
        """Whether a unit's files are all on disk (subclasses add their own conditions)."""
        return all(
            (self.save_dir / value).is_file()
            for record in records
            for key, value in record.items()
            if key.endswith("file_name") and value is not None
        )

    def _finished_records(self) -> dict[str, list[dict]]:
        """Records of an earlier run (or of this run's other processes), by unit, for the complete units."""
        by_unit = records_by_unit(self.save_dir, self.unit_of)
        return {unit: records for unit, records in by_unit.items() if self.is_complete(records)}

    def is_done(self, unit: str) -> bool:
        return unit in self.records

    def todo(self, units: list, name=str) -> list:
        """This process's share of ``units`` not done yet (all of them in a one-process run); ``name(unit)`` is the
        unit's name."""
        missing = [unit for unit in units if not self.is_done(name(unit))]
        if len(missing) < len(units) and self.state.is_main_process:
            print(
                f"{len(units) - len(missing)} of {len(units)} already done in {self.save_dir}; generating the "
                f"{len(missing)} missing ones."
            )
        return process_share(missing, self.state)

    def save(self, unit: str, records: list[dict]) -> None:
        """A unit's records, once its files are written: it counts as done from now on."""
        save_records(self.save_dir, unit, records)
        self.records[unit] = records

    def finish(self, units: list[str] | None = None) -> list[dict] | None:
        """Once every process is done, the main one writes metadata.jsonl: the records of ``units`` in that order
        (default: every done unit, by name), without an earlier run's leftovers. Returns them (the others None)."""
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            return None
        self.records = self._finished_records()  # every process's
        ordered = [record for unit in (units or sorted(self.records)) for record in self.records[unit]]
        publish_records(self.save_dir, ordered)
        return ordered


class MaskSampleWriter(SampleWriter):
    """Writes the layout of the module docstring, one mask (its N images) a unit."""

    def __init__(self, save_dir, class_names, palette, ignore_index: int, num_per_mask: int, generation_args: dict,
                 overwrite: bool = False, state=None):  # fmt: skip
        self.ignore_index = ignore_index
        self.num_per_mask = num_per_mask
        super().__init__(
            save_dir,
            class_names,
            palette,
            generation_args,
            folders=("generated_images", "visualizations", "images", "masks", RECORDS_FOLDER),
            unit_of=lambda record: record["mask_stem"],
            overwrite=overwrite,
            state=state,
        )

    def is_complete(self, records: list[dict]) -> bool:
        indices = [record["image_index"] for record in records]
        return indices == list(range(self.num_per_mask)) and super().is_complete(records)

    def todo(self, masks: list[MaskFile]) -> list[MaskFile]:
        return super().todo(masks, name=lambda mask: mask.stem)

    def write(self, mask: MaskFile, label: np.ndarray, images: list[Image.Image], details: list[dict]) -> None:
        """Save the N images of one mask, its label map beside each flat copy, its row picture and records."""
        sample_dir = self.save_dir / mask.sample_dir
        sample_dir.mkdir(parents=True, exist_ok=True)
        width, height = images[0].size
        label = resize_labels(label, height, width)
        records = []
        for j, (image, detail) in enumerate(zip(images, details)):
            generated = sample_dir / f"generated_{j:02d}.png"
            save_image_atomic(image, generated)
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
        save_image_atomic(row, self.save_dir / "visualizations" / f"{Path(mask.sample_dir).name}.png")
        self.save(mask.stem, records)  # last: the mask counts as done once all of its files exist

    def finish(self, grid_rows: int = 8) -> int | None:
        """metadata.jsonl in (stem, image) order, and grid.png: the first ``grid_rows`` visualizations stacked;
        returns the image count (None in the other processes)."""
        ordered = super().finish()
        if ordered is None:
            return None
        rows = [self.records[stem][0]["sample_dir"] for stem in sorted(self.records)[:grid_rows]]
        if rows:
            pictures = [Image.open(self.save_dir / "visualizations" / f"{Path(row).name}.png") for row in rows]
            save_image_atomic(image_grid(pictures, cols=1), self.save_dir / "grid.png")
        return len(ordered)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy on disk) where the file system allows one, else a copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        write_bytes_atomic(target, source.read_bytes())
