#!/usr/bin/env python
"""Generate images from label maps with a model trained by train_spade_sdm.py.

    python generate_spade_sdm.py --model outputs/sdm --masks_dir data/val/labels --save_dir outputs/sdm_samples \
      --num_images_per_mask 5 --guidance_scale 1.5

Every mask of --masks_dir (label PNGs of class ids, or colour PNGs drawn with the model's palette), or the one
--mask, gets --num_images_per_mask images, at the training size or --resolution (N, or HEIGHT,WIDTH such as
384,512; or --height/--width). Under --save_dir, each mask's outputs named by its file stem:
  generated_images/sample_<stem>/generated_00.png ...  the images of each mask
  visualizations/sample_<stem>.png                     colourised mask | its images
  images/<stem>_00.png + masks/<stem>_00.png           flat copies: a *generic* dataset of (image, label map)
  metadata.jsonl                                       one line per image (in stem order): files, mask, seed, ...
  generation_args.json                                 the arguments that determine the images
  class_names.json, grid.png, generation_config.json

Image j of a mask is drawn with seed derive_seed(--seed, <mask stem>, j), whatever --batch_size, the number of
processes and whatever other masks the folder holds: masks added to --masks_dir later never change the earlier
masks' images. A re-run into the same --save_dir keeps the masks already written and generates only the missing
ones; it must use the same generation arguments (--model, --num_images_per_mask, --guidance_scale,
--num_inference_steps, --scheduler, --eta, --style_images or --style_map, --style_scale, --seed, --resolution,
--fp16), or it is refused naming the differences. --overwrite regenerates everything instead. Under
`accelerate launch` (or torchrun) each process takes every N-th of the missing masks.

A model trained with --style_reference also takes --style_images: one reference image for every mask, or a
folder whose images pair with the masks by file stem; or --style_map, a JSON file {label stem: reference image}
(paths relative to the JSON's folder). --style_scale strengthens the style (guidance).

Competition submissions (the landscape task): --submission_dir DIR also writes one image per label, its first,
as DIR/<label stem>.jpg at the label's own size (resized back from the generation size).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from segdiff import check_min_diffusers_version
from segdiff.arguments import non_negative_float, non_negative_int, output_folder, positive_int
from segdiff.data import DatasetError, exit_on_bad_input, files_by_stem, read_image
from segdiff.files import save_image_atomic, write_json_atomic
from segdiff.generation import (
    MaskFile,
    MaskSampleWriter,
    add_eta_argument,
    add_images_per_mask_argument,
    add_mask_arguments,
    add_model_argument,
    add_output_size_arguments,
    add_save_dir_arguments,
    check_generation_args,
    mask_groups,
    masks_of,
    recorded_model,
)
from segdiff.geometry import ImageSize
from segdiff.labels import resize_labels
from segdiff.processes import generation_state
from segdiff.rendering import SDM_GUIDANCE_SCALE, SDM_SCHEDULER, load_sdm_pipeline, sdm_guidance_scale, sdm_palette
from segdiff.runs import open_run, recorded_path
from segdiff.schedulers import CORE_SCHEDULERS, make_scheduler

# Stops here, naming the upgrade, when the installed diffusers is older than this script needs.
check_min_diffusers_version()

DEFAULT_IMAGES_PER_MASK = 5  # SDM's evaluation protocol; a --submission_dir run makes 1


def parse_args(argv=None):
    # No abbreviations: a retired or mistyped flag must not silently set a longer one (--controlnet -> --controlnet_conditioning_scale).
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_model_argument(
        parser, "The output folder of train_spade_sdm.py, or one of its checkpoint-N/ folders (EMA weights when there)."
    )
    add_save_dir_arguments(parser, "masks")
    add_mask_arguments(parser)
    add_images_per_mask_argument(parser, None)
    parser.add_argument(
        "--guidance_scale",
        type=non_negative_float,
        default=None,
        help=f"Classifier-free guidance scale s; 1 turns guidance off. Guidance needs a model trained or fine-tuned "
        f"with --drop_rate > 0 (the null map it samples against). Default: {SDM_GUIDANCE_SCALE} (SDM's s) for such a "
        "model, else 1.",
    )
    parser.add_argument("--num_inference_steps", type=positive_int, default=50)
    parser.add_argument(
        "--scheduler",
        choices=CORE_SCHEDULERS,
        default=SDM_SCHEDULER,
        help="Scheduler: ddpm (default; SDM's own, and the learned variance of learn_sigma models), dpmsolver "
        "(stochastic DPM-Solver++: as good as ddpm at 50 steps with 20-25 on the toy benchmark, mIoU 0.996 vs "
        "0.998), ddim (deterministic: it keeps the noise an imperfect model misses; toy mIoU 0.49 at 50 steps).",
    )
    add_eta_argument(parser)
    style = parser.add_mutually_exclusive_group()
    style.add_argument(
        "--style_images",
        default=None,
        help="Style references (models trained with --style_reference): one image for every mask, or a folder "
        "of images paired with the masks by file stem. Without it a style model samples with the null style.",
    )
    style.add_argument(
        "--style_map",
        default=None,
        help="Style references as a JSON file {label stem: reference image} (paths relative to its folder): each "
        "mask its own reference, as the landscape competition pairs them.",
    )
    parser.add_argument(
        "--style_scale",
        type=non_negative_float,
        default=1.0,
        help="Guidance scale of the style reference; 1 adds no extra guidance. Default: %(default)s",
    )
    parser.add_argument(
        "--submission_dir",
        type=output_folder,
        default=None,
        help="Also write each mask's first image as <submission_dir>/<mask stem>.jpg at the mask's own size: one "
        "file per input label, named like it (a competition submission). --num_images_per_mask then defaults to 1.",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=16,
        help="Images per forward pass (whole masks: at least one mask's N).",
    )
    add_output_size_arguments(parser, square="N x N images")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--fp16", action="store_true", help="Run the models in float16 (GPU).")
    args = parser.parse_args(argv)
    if args.num_images_per_mask is None:
        args.num_images_per_mask = 1 if args.submission_dir else DEFAULT_IMAGES_PER_MASK
    check_generation_args(parser, args)
    return args


def style_references(args, masks: list[MaskFile]) -> dict[str, Path] | None:
    """Mask stem -> its reference image, from --style_images or --style_map (None without either)."""
    if args.style_map is not None:
        return style_map_references(Path(args.style_map), masks)
    if args.style_images is None:
        return None
    path = Path(args.style_images)
    if path.is_file():
        return {mask.stem: path for mask in masks}
    if not path.is_dir():
        raise DatasetError(f"--style_images {path} does not exist. Fix: pass an image file or a folder of images.")
    by_stem = files_by_stem(path)
    missing = [mask.stem for mask in masks if mask.stem not in by_stem]
    if missing:
        raise DatasetError(
            f"--style_images {path} has no image for {len(missing)} mask(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); references pair with masks by file stem. "
            "Fix: add them, or pass a single image file to use for every mask."
        )
    return {mask.stem: by_stem[mask.stem] for mask in masks}


def style_map_references(path: Path, masks: list[MaskFile]) -> dict[str, Path]:
    """The --style_map file's reference of every mask; relative paths are read from the file's folder."""
    if not path.is_file():
        raise DatasetError(f"--style_map {path} does not exist. Fix: pass a JSON file {{label stem: reference image}}.")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"--style_map {path} is not valid JSON ({error}).") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DatasetError(f"--style_map {path} must hold one JSON object {{label stem: reference image file}}.")
    missing = [mask.stem for mask in masks if mask.stem not in mapping]
    if missing:
        raise DatasetError(
            f"--style_map {path} names no reference for {len(missing)} label(s): {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}. Fix: add an entry for each label stem."
        )
    references = {mask.stem: path.parent / mapping[mask.stem] for mask in masks}
    absent = [f"{stem}: {reference}" for stem, reference in references.items() if not reference.is_file()]
    if absent:
        raise DatasetError(
            f"--style_map {path} names {len(absent)} reference image(s) that do not exist ({'; '.join(absent[:5])}"
            f"{'; ...' if len(absent) > 5 else ''}). Fix: correct the paths (relative ones start at {path.parent})."
        )
    return references


def generation_args(args, size: ImageSize) -> dict:
    """The arguments that determine the images (not --batch_size, --device or --submission_dir: the seeds keep the
    images the same whatever they are); recorded in --save_dir, a re-run must match them."""
    return {
        "model": recorded_model(args.model, args.revision),
        "num_images_per_mask": args.num_images_per_mask,
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.num_inference_steps,
        "scheduler": args.scheduler,
        "eta": args.eta,
        "style_images": recorded_path(args.style_images),
        "style_map": recorded_path(args.style_map),
        "style_scale": args.style_scale,
        "seed": args.seed,
        "resolution": size,
        "label_offset": args.label_offset,  # how the masks' ids are read
        "fp16": args.fp16,
    }


def write_submission(submission_dir: Path, save_dir: Path, masks: list[MaskFile]) -> None:
    """<stem>.jpg of each mask: its first image, resized back to the size of the label file."""
    submission_dir.mkdir(parents=True, exist_ok=True)
    for mask in masks:
        with Image.open(mask.path) as label_file:
            size = label_file.size
        image = Image.open(save_dir / mask.sample_dir / "generated_00.png").convert("RGB")
        target = submission_dir / f"{mask.stem}.jpg"
        save_image_atomic(image.resize(size, Image.Resampling.BICUBIC), target, "JPEG", quality=95)


def main(args):
    state = generation_state()
    run = open_run(args.model, revision=args.revision)
    run.require("spade_sdm")
    if args.resolution:
        run.check_size(args.resolution)  # from the model's configs, before its weights load
    pipeline = load_sdm_pipeline(run, torch.float16 if args.fp16 else None)  # default: as saved
    args.guidance_scale = sdm_guidance_scale(run, args.guidance_scale)  # recorded as the value used
    pipeline.to(args.device or state.device)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = make_scheduler(args.scheduler, pipeline.scheduler.config, stochastic=True)
    size = args.resolution or pipeline.default_size
    height, width = size

    class_names = pipeline.class_names
    palette = sdm_palette(run, len(class_names))
    ignore_index = pipeline.config.ignore_index
    masks = masks_of(args, len(class_names), palette, ignore_index)
    references = style_references(args, masks)
    if references is not None and pipeline.unet.style_encoder is None:
        flag = "--style_map" if args.style_map else "--style_images"
        raise SystemExit(
            f"{flag} was given, but the model in {args.model} has no style encoder. "
            f"Fix: train it with train_spade_sdm.py --style_reference, or drop {flag}."
        )
    per_mask = args.num_images_per_mask
    recorded = generation_args(args, size)
    writer = MaskSampleWriter(
        args.save_dir, class_names, palette, ignore_index, per_mask, recorded, overwrite=args.overwrite, state=state
    )
    todo = writer.todo(masks)  # this process's share

    with tqdm(total=len(todo) * per_mask, desc="Images", disable=not state.is_local_main_process) as progress:
        for group in mask_groups(todo, per_mask, args.batch_size):
            # At the output size, nearest: the map the model sees is the one saved beside its images.
            labels = [resize_labels(mask.read(palette, ignore_index), height, width) for mask in group]
            seeds = [seed for mask in group for seed in mask.seeds(args.seed, per_mask)]
            styles = None if references is None else [read_image(references[mask.stem]) for mask in group]
            # One call: the group's masks and, with guidance, the null branch in one batched forward per step.
            output = pipeline(
                labels,
                num_images_per_mask=per_mask,
                guidance_scale=args.guidance_scale,
                num_inference_steps=args.num_inference_steps,
                eta=args.eta or 0.0,  # DDIM's; check_generation_args refused it for the other schedulers
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                height=height,
                width=width,
                style_images=styles,
                style_scale=args.style_scale,
            )
            for i, (mask, label) in enumerate(zip(group, labels)):
                images = output.images[i * per_mask : (i + 1) * per_mask]
                details = [
                    {
                        "seed": seeds[i * per_mask + j],
                        "scheduler": args.scheduler,
                        "num_inference_steps": args.num_inference_steps,
                        "guidance_scale": args.guidance_scale,
                        **({} if args.eta is None else {"eta": args.eta}),
                        **(
                            {}
                            if references is None
                            else {"style_image": str(references[mask.stem]), "style_scale": args.style_scale}
                        ),
                    }
                    for j in range(per_mask)
                ]
                writer.write(mask, label, images, details)
                progress.update(per_mask)

    count = writer.finish()
    if state.is_main_process:
        if args.submission_dir:
            write_submission(Path(args.submission_dir), Path(args.save_dir), masks)
            print(f"Wrote {len(masks)} submission images to {args.submission_dir}")
        write_json_atomic(Path(args.save_dir) / "generation_config.json", {**vars(args), "class_names": class_names})
        print(f"Wrote {count} images for {len(masks)} masks to {args.save_dir}")


if __name__ == "__main__":
    try:
        with exit_on_bad_input():
            main(parse_args())
    except ValueError as error:  # the pipeline's own checks
        sys.exit(f"error: {error}")
