#!/usr/bin/env python
"""Sample paired (image, mask) data from a model trained by train_seg_mask_diffusion.py.

    python generate_joint_image_mask_diffusion.py --model outputs/joint --save_dir outputs/synth --num_samples 100

Writes, under --save_dir:
  images/000000.png ...     generated images
  masks/000000.png ...      label PNGs (palette attached): the class id on the generated mask's pixels and
                            --fill_label elsewhere, so --save_dir is itself a *generic* dataset
  overlays/000000.png ...   the image with its mask tinted in the class colour
  metadata.jsonl            one line per sample: files, class, prompt, seed, steps, scheduler, guidance
  generation_args.json      the arguments that determine the samples (a re-run must match them)
  class_names.json, grid.png

Sample i is drawn with seed --seed + i, whatever the batch size and the number of processes; a re-run with the
same arguments (generation_args.json) keeps the samples already written and generates only the missing ones (a
larger --num_samples adds samples); one with other arguments is refused, unless --overwrite regenerates
everything. Under `accelerate launch` (or torchrun) each process takes every N-th of the missing samples, and the
main one writes metadata.jsonl.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from segdiff import check_min_diffusers_version
from segdiff.arguments import non_negative_float, non_negative_int, positive_int, weight_list
from segdiff.data import exit_on_bad_input, save_label_png
from segdiff.files import save_image_atomic, write_json_atomic
from segdiff.generation import (
    SampleWriter,
    add_eta_argument,
    add_model_argument,
    add_output_size_arguments,
    add_save_dir_arguments,
    check_generation_args,
    recorded_model,
)
from segdiff.geometry import ImageSize
from segdiff.labels import (
    IGNORE_INDEX,
    LOVEDA_CLASSES,
    LOVEDA_PALETTE,
    SIDEWALK_CLASSES,
    SIDEWALK_PALETTE,
)
from segdiff.pipelines.joint import JointImageMaskPipeline, pipeline_over_base
from segdiff.processes import generation_state
from segdiff.runs import TrainedRun, in_dtype, open_run
from segdiff.schedulers import CORE_SCHEDULERS, make_scheduler
from segdiff.seeds import cpu_generators
from segdiff.visualize import image_grid, overlay_mask

# Stops here, naming the upgrade, when the installed diffusers is older than this script needs.
check_min_diffusers_version()

DATASET_CLASSES = {"loveda": (LOVEDA_CLASSES, LOVEDA_PALETTE), "sidewalk": (SIDEWALK_CLASSES, SIDEWALK_PALETTE)}


def parse_args(argv=None):
    # No abbreviations: a retired or mistyped flag must not silently set a longer one (--controlnet -> --controlnet_conditioning_scale).
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_model_argument(
        parser,
        "The output folder of train_seg_mask_diffusion.py, or one of its checkpoint-N/ folders (then its EMA "
        "weights are used when present).",
        "--checkpoint",  # the spelling of the reference document's command (SyntheticGen's README), kept working
    )
    add_save_dir_arguments(parser, "samples")
    parser.add_argument("--num_samples", type=positive_int, default=100, help="How many (image, mask) pairs.")
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASET_CLASSES),
        default=None,
        help="Use this dataset's default class names when the checkpoint has no class_names.json.",
    )
    parser.add_argument("--class_id", type=non_negative_int, default=None, help="Generate only this class.")
    parser.add_argument(
        "--class_weights",
        type=weight_list,
        default=None,
        help="Draw each sample's class with these relative weights, one per class, e.g. '1,4,1,1,2,1,1' "
        "to balance rare classes. Default: every class of the training pairs in turn (training_config.json's "
        "train_class_pixels: a class without a pixel there is left out).",
    )
    parser.add_argument("--scheduler", choices=CORE_SCHEDULERS, default="ddim")
    add_eta_argument(parser)
    parser.add_argument("--num_inference_steps", type=positive_int, default=50)
    parser.add_argument(
        "--guidance_scale",
        type=non_negative_float,
        default=1.0,
        help="Classifier-free guidance against the empty prompt (> 1 enables; the model needs --prompt_dropout).",
    )
    # --image_size: the spelling of the reference document's command, kept working
    add_output_size_arguments(parser, "N x N images", "--image_size")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--fill_label",
        choices=["background", "ignore"],
        default="background",
        help="Mask value outside the generated class: class 0 (background, default; a class-vs-rest "
        "dataset) or ignore_index (rest unknown). Samples of class 0 itself always get ignore outside.",
    )
    parser.add_argument("--ignore_index", type=non_negative_int, default=IGNORE_INDEX)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--fp16", action="store_true", help="Run the models in float16 (GPU).")
    args = parser.parse_args(argv)
    check_generation_args(parser, args)
    return args


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_classes(run: TrainedRun, dataset: str | None):
    """Class names and palette: the run's class_names.json, else a dataset's defaults."""
    if (run.run_dir / "class_names.json").is_file():
        return run.classes()
    if dataset is None:
        raise SystemExit(
            f"{run.folder} has no class_names.json, so the class of each id is unknown. Fix: point --model at the "
            "output folder of train_seg_mask_diffusion.py, copy its class_names.json next to the model, or pass "
            "--dataset loveda|sidewalk to use that dataset's class list."
        )
    return DATASET_CLASSES[dataset]


def load_pipeline(run: TrainedRun, class_names, dtype: torch.dtype) -> JointImageMaskPipeline:
    """The pipeline of a trained output folder; for a checkpoint-N/ of a run, finished or not, its UNet (EMA weights
    when kept) and, with --train_text_encoder, its text encoder, over the frozen parts and schedule of the base
    named in the run's training_config.json."""
    run.require("joint_image_mask")
    if not run.is_checkpoint:
        return in_dtype(run.load_pipeline(JointImageMaskPipeline, UNet2DConditionModel, class_names=class_names), dtype)
    base = run.base()
    trained_text_encoder = (run.folder / "text_encoder").is_dir()
    try:
        pipeline = pipeline_over_base(
            base,
            run.load_model(UNet2DConditionModel, "unet"),
            text_encoder=run.load_model(CLIPTextModel, "text_encoder") if trained_text_encoder else None,
            prediction_type=run.setting("prediction_type"),
            zero_terminal_snr=run.setting("zero_terminal_snr"),
            class_names=class_names,
            prompt_template=run.setting("prompt_template"),
            revision=run.setting("revision"),
            variant=run.setting("variant"),
        )
    except OSError as error:
        raise SystemExit(
            f"{run.folder}: cannot load the base model {base!r} that training_config.json names ({error}). "
            "Fix: make that path (or hub name) reachable from here, or generate from the finished output folder."
        ) from None
    return in_dtype(pipeline, dtype)


# ------------------------------------------------------------------------------------------------
# What to generate
# ------------------------------------------------------------------------------------------------


def plan_classes(args, num_classes: int, seen: list[bool]) -> list[int]:
    """The class of every sample: --class_id, drawn by --class_weights, or every class the training pairs showed
    (``seen``) in turn."""
    if args.class_id is not None:
        if not 0 <= args.class_id < num_classes:
            raise SystemExit(f"--class_id {args.class_id} is out of range: the model has classes 0..{num_classes - 1}.")
        return [args.class_id] * args.num_samples
    if args.class_weights is not None:
        if len(args.class_weights) != num_classes:
            raise SystemExit(
                f"--class_weights needs {num_classes} non-negative weights (one per class), got "
                f"{len(args.class_weights)}."
            )
        generator = torch.Generator().manual_seed(args.seed)
        return torch.multinomial(
            torch.tensor(args.class_weights), args.num_samples, replacement=True, generator=generator
        ).tolist()
    shown = [class_id for class_id in range(num_classes) if seen[class_id]] or list(range(num_classes))
    return [shown[i % len(shown)] for i in range(args.num_samples)]


def seen_classes(run: TrainedRun, num_classes: int) -> list[bool]:
    """Which classes the model saw: those with pixels in its training pairs (training_config.json's
    ``train_class_pixels``); every class for a folder that does not record them."""
    pixels = run.config.get("train_class_pixels")
    return [True] * num_classes if pixels is None else [count > 0 for count in pixels]


def unseen_class_note(classes: list[int], seen: list[bool], class_names: list[str], args) -> str | None:
    """What to tell the user about the classes the plan includes or leaves out that the model never saw."""
    never_seen = [name for name, was_seen in zip(class_names, seen) if not was_seen]
    asked = sorted({class_names[c] for c in classes if not seen[c]})
    if asked:
        return (
            f"warning: {', '.join(asked)} had no pixel in the model's training pairs (training_config.json's "
            "train_class_pixels): it never learned what the class looks like, so its samples show something else."
        )
    if never_seen and args.class_weights is None and args.class_id is None:
        them = "it" if len(never_seen) == 1 else "them"
        return f"Leaving out {', '.join(never_seen)}: no pixel of {them} in the model's training pairs."
    return None


def label_map(mask: np.ndarray, class_id: int, fill_label: str, ignore_index: int) -> np.ndarray:
    """The label PNG of one sample: the class on its mask, the fill elsewhere."""
    fill = 0 if fill_label == "background" and class_id != 0 else ignore_index
    return np.where(mask, class_id, fill).astype(np.uint8)


def generation_args(args, size: ImageSize) -> dict:
    """The arguments that determine the samples (not --num_samples: a larger one adds samples; not --batch_size or
    --device: the seeds keep the samples the same whatever they are); recorded in --save_dir, a re-run must match."""
    return {
        "model": recorded_model(args.model, args.revision),
        "dataset": args.dataset,
        "class_id": args.class_id,
        "class_weights": args.class_weights,
        "scheduler": args.scheduler,
        "eta": args.eta,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": size,
        "seed": args.seed,
        "fill_label": args.fill_label,
        "ignore_index": args.ignore_index,
        "fp16": args.fp16,
    }


def sample_name(index: int) -> str:
    return f"{index:06d}"


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(args):
    state = generation_state()
    run = open_run(args.model, revision=args.revision)
    run.require("joint_image_mask")
    if args.resolution:
        run.check_size(args.resolution)  # from the model's configs, before its weights load
    class_names, palette = load_classes(run, args.dataset)
    pipeline = load_pipeline(run, class_names, torch.float16 if args.fp16 else torch.float32)  # default: as saved
    pipeline.to(args.device or state.device)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = make_scheduler(args.scheduler, pipeline.scheduler.config)
    size = args.resolution or pipeline.default_size
    seen = seen_classes(run, len(class_names))
    classes = plan_classes(args, len(class_names), seen)
    note = unseen_class_note(classes, seen, class_names, args)
    if note and state.is_main_process:
        print(note, file=sys.stderr)

    writer = SampleWriter(
        args.save_dir,
        class_names,
        palette,
        generation_args(args, size),
        folders=("images", "masks", "overlays"),
        unit_of=lambda record: sample_name(record["index"]),
        overwrite=args.overwrite,
        state=state,
    )
    save_dir = writer.save_dir
    mine = writer.todo(list(range(args.num_samples)), name=sample_name)  # this process's share of the missing ones
    with tqdm(total=len(mine), desc="Samples", disable=not state.is_local_main_process) as progress:
        for start in range(0, len(mine), args.batch_size):
            indices = mine[start : start + args.batch_size]
            # One call: with guidance, the unconditional and class prompts run as one batched forward per step.
            output = pipeline(
                [classes[i] for i in indices],
                height=size.height,
                width=size.width,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                eta=args.eta or 0.0,  # DDIM's; check_generation_args refused it for the other schedulers
                generator=cpu_generators(args.seed + i for i in indices),
            )
            for i, image, mask, prompt in zip(indices, output.images, output.masks, output.prompts):
                class_id, name = classes[i], f"{sample_name(i)}.png"
                save_image_atomic(image, save_dir / "images" / name)
                label = label_map(mask, class_id, args.fill_label, args.ignore_index)
                save_label_png(label, save_dir / "masks" / name, palette)
                save_image_atomic(overlay_mask(image, mask, palette[class_id]), save_dir / "overlays" / name)
                record = {
                    "index": i,
                    "file_name": f"images/{name}",
                    "mask_file_name": f"masks/{name}",
                    "overlay_file_name": f"overlays/{name}",
                    "class_id": class_id,
                    "class_name": class_names[class_id],
                    "prompt": prompt,
                    "seed": args.seed + i,
                    "num_inference_steps": args.num_inference_steps,
                    "scheduler": args.scheduler,
                    **({} if args.eta is None else {"eta": args.eta}),
                    "guidance_scale": args.guidance_scale,
                    "mask_fraction": round(float(mask.mean()), 4),
                }
                writer.save(sample_name(i), [record])  # last: the sample counts as done once its files exist
            progress.update(len(indices))

    # Once every process is done: metadata.jsonl in index order, without duplicates from earlier runs.
    done = sorted(int(name) for name in writer.records)
    ordered = writer.finish([sample_name(i) for i in done])
    if state.is_main_process:
        write_grid(save_dir, ordered[:16])
        write_json_atomic(save_dir / "generation_config.json", {**vars(args), "class_names": class_names})
        print(f"Wrote {len(ordered)} (image, mask) pairs to {save_dir}")


def write_grid(save_dir: Path, records) -> None:
    """grid.png: (image, overlay) pairs, four pairs a row."""
    if records:
        tiles = []
        for record in records:
            tiles += [Image.open(save_dir / record["file_name"]), Image.open(save_dir / record["overlay_file_name"])]
        image_grid(tiles, cols=8).save(save_dir / "grid.png")


if __name__ == "__main__":
    try:
        with exit_on_bad_input():  # bad folders or run files: the message names the file and the fix
            main(parse_args())
    except ValueError as error:  # the pipeline's own checks (class ids, sizes)
        sys.exit(f"error: {error}")
