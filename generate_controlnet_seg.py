#!/usr/bin/env python
r"""Generate images from a folder of segmentation masks with a ControlNet trained by train_controlnet_seg.py.

    python generate_controlnet_seg.py --model outputs/controlnet --masks_dir data/val/masks \
      --save_dir outputs/synth --num_images_per_mask 4
    python generate_controlnet_seg.py --model outputs/controlnet --mask val/3514.png --prompt "a photo of roads" \
      --save_dir outputs/one

Every mask of --masks_dir (label PNGs of class ids, or colour PNGs in the palette of the ControlNet's
class_names.json, black = no data), or the one --mask, is coloured by the palette, as in training, and turned
into --num_images_per_mask images by diffusers' StableDiffusionControlNetPipeline over the base model. The
prompt names the classes present, largest area first (the template of training), unless --prompt gives one for
every mask, or --captions one per mask stem (a .jsonl of {"stem": ..., "text": ...} lines, or a .csv with the
columns stem,text; masks without one get their class prompt). The images keep each mask's aspect ratio, short
side --resolution N (default: the training resolution), or have exactly the size --resolution HEIGHT,WIDTH (or
--height/--width).

Writes, under --save_dir (segdiff.generation's layout; --save_dir is itself a *generic* dataset), each mask's
outputs named by its file stem:
  generated_images/sample_<stem>/generated_00.png ...   the N images of each mask
  visualizations/sample_<stem>.png                      colourised mask | its N images
  images/<stem>_00.png, masks/<stem>_00.png             flat (image, label PNG) pairs
  metadata.jsonl                                        one line per image (in stem order): files, prompt, seed, ...
  generation_args.json                                  the arguments that determine the images
  class_names.json, grid.png, generation_config.json

Image j of a mask is drawn with seed derive_seed(--seed, <mask stem>, j), whatever --batch_size and whatever
other masks the folder holds: masks added to --masks_dir later never change the earlier masks' images. A
re-run into the same --save_dir keeps the masks already done and generates only the missing ones; it must use
the same generation arguments (--model, the base, the prompt options and --captions, --scheduler, --eta,
--num_inference_steps, --guidance_scale, --controlnet_conditioning_scale, --resolution, --seed,
--num_images_per_mask, the palette's --class_names_json, --ignore_index, --fp16), or it is refused naming the
differences. --overwrite regenerates everything instead. Under `accelerate launch` (or torchrun) each process
takes every N-th of the missing masks; the images are those of a one-process run.
"""

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from segdiff import check_min_diffusers_version
from segdiff.arguments import non_negative_float, non_negative_int, positive_int
from segdiff.data import exit_on_bad_input
from segdiff.files import write_json_atomic
from segdiff.generation import (
    MaskSampleWriter,
    add_eta_argument,
    add_images_per_mask_argument,
    add_mask_arguments,
    add_model_argument,
    add_output_size_arguments,
    add_save_dir_arguments,
    check_generation_args,
    check_save_dir,
    mask_groups,
    masks_of,
    read_captions,
    recorded_model,
)
from segdiff.geometry import ImageSize
from segdiff.processes import generation_state
from segdiff.prompts import classes_by_area
from segdiff.rendering import (
    CONTROLNET_GUIDANCE_SCALE,
    CONTROLNET_SCHEDULER,
    ControlNetSettings,
    load_controlnet_renderer,
)
from segdiff.runs import open_run, recorded_path
from segdiff.schedulers import SCHEDULERS

# Stops here, naming the upgrade, when the installed diffusers is older than this script needs.
check_min_diffusers_version()


def parse_args(argv=None):
    # No abbreviations: a retired or mistyped flag must not silently set a longer one (--controlnet -> --controlnet_conditioning_scale).
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_model_argument(
        parser,
        "The output folder of train_controlnet_seg.py (or one of its checkpoint-N/ folders, whose EMA weights are "
        "used when present).",
    )
    add_save_dir_arguments(parser, "masks")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="The Stable Diffusion base the ControlNet was trained on. Default: the one in its training_config.json.",
    )
    add_mask_arguments(parser)
    add_images_per_mask_argument(parser, 4)
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompt",
        default=None,
        help="One prompt for every mask. Default: built from each mask's classes with the training template.",
    )
    prompts.add_argument(
        "--captions",
        default=None,
        help='A prompt per mask: a .jsonl file of {"stem" (or "file_name"): ..., "text" (or "caption"): ...} '
        "lines, or a .csv with the columns stem,text. Masks without a caption get their class prompt.",
    )
    parser.add_argument(
        "--prompt_template",
        default=None,
        help="Template of the class prompts, {classes} filled in. Default: the training's.",
    )
    parser.add_argument(
        "--prompt_top_k",
        type=non_negative_int,
        default=None,
        help="Classes named per prompt (0: all). Default: the training's.",
    )
    parser.add_argument("--negative_prompt", default=None, help="What to steer away from (with guidance > 1).")
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=CONTROLNET_SCHEDULER,
        help="Scheduler: unipc (default), dpmsolver (DPM-Solver++), ddim or ddpm.",
    )
    add_eta_argument(parser)
    parser.add_argument("--num_inference_steps", type=positive_int, default=30, help="(default: 30)")
    parser.add_argument(
        "--guidance_scale",
        type=non_negative_float,
        default=CONTROLNET_GUIDANCE_SCALE,
        help="Classifier-free guidance; 1 disables. (default: %(default)s)",
    )
    parser.add_argument(
        "--controlnet_conditioning_scale", type=non_negative_float, default=1.0, help="Strength of the mask's control."
    )
    add_output_size_arguments(
        parser,
        square="the short side, each mask's aspect ratio kept (sides rounded to what the model takes); default: "
        "the training resolution",
    )
    parser.add_argument(
        "--batch_size", type=positive_int, default=8, help="Images per pipeline call (several masks' when they fit)."
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--class_names_json",
        default=None,
        help="Class names and palette, when the ControlNet folder has no class_names.json.",
    )
    parser.add_argument(
        "--ignore_index", type=non_negative_int, default=None, help="No-data id. Default: the training's (255)."
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--fp16", action="store_true", help="Run the models in float16 (GPU).")
    args = parser.parse_args(argv)
    check_generation_args(parser, args)
    return args


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def generation_args(args, base: str, settings: ControlNetSettings, size: ImageSize) -> dict:
    """The arguments that determine the images, defaults resolved from the training config (not --batch_size or
    --device: the seeds keep the images the same whatever they are); recorded in --save_dir, a re-run must match."""
    return {
        "model": recorded_model(args.model, args.revision),
        "pretrained_model_name_or_path": recorded_path(base),
        "num_images_per_mask": args.num_images_per_mask,
        "prompt": args.prompt,
        "captions": recorded_path(args.captions),
        # The class prompts' options matter only without --prompt: changing them then is no different run.
        "prompt_template": None if args.prompt else settings.prompt_template,
        "prompt_top_k": None if args.prompt else settings.prompt_top_k,
        "negative_prompt": args.negative_prompt,
        "scheduler": args.scheduler,
        "eta": args.eta,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "controlnet_conditioning_scale": args.controlnet_conditioning_scale,
        "resolution": size,
        "seed": args.seed,
        "class_names_json": recorded_path(args.class_names_json),
        "ignore_index": settings.ignore_index,
        "label_offset": args.label_offset,  # how the masks' ids are read
        "fp16": args.fp16,
    }


def main(args):
    state = generation_state()
    run = open_run(args.model, revision=args.revision)
    run.require("controlnet_seg")
    # N (or a square): the short side, each mask's aspect ratio kept; a rectangle: exactly that size.
    size = args.resolution or ImageSize.of(run.setting("resolution", 512))
    exact_size = None if size.is_square else size
    settings = ControlNetSettings.of(
        run, args.ignore_index, args.prompt_template, args.prompt_top_k, short_side=min(size)
    )
    class_names, palette = run.classes(args.class_names_json)
    # Every mask (and caption), the save_dir and the base's name are checked before a model loads: a bad file or
    # a refused re-run fails in seconds, named.
    masks = masks_of(args, len(class_names), palette, settings.ignore_index)
    captions = read_captions(args.captions, [mask.stem for mask in masks]) if args.captions else {}
    base = run.base(args.pretrained_model_name_or_path)
    if exact_size:
        run.check_size(exact_size, base=base)  # from the base's configs, before its weights load
    recorded = generation_args(args, base, settings, size)
    check_save_dir(args.save_dir, recorded, args.overwrite)
    renderer = load_controlnet_renderer(
        run,
        settings,
        base=base,
        class_names_json=args.class_names_json,
        device=args.device or state.device,
        # Explicit, also in float32: a base's fp16 --variant weights would otherwise load in half precision.
        dtype=torch.float16 if args.fp16 else torch.float32,
    )

    n = args.num_images_per_mask
    writer = MaskSampleWriter(
        args.save_dir, class_names, palette, settings.ignore_index, n, recorded, overwrite=args.overwrite, state=state
    )
    todo = writer.todo(masks)  # this process's share
    with tqdm(total=len(todo) * n, desc="Images", disable=not state.is_local_main_process) as progress:
        for group in mask_groups(todo, n, args.batch_size):
            conditions = [
                renderer.condition(mask.read(palette, settings.ignore_index), *(exact_size or ())) for mask in group
            ]
            prompts = [args.prompt or captions.get(mask.stem) or c.prompt for mask, c in zip(group, conditions)]
            # Each mask's n images, with their own seeds; masks of one size share pipeline calls of --batch_size.
            images = renderer.render(
                [c.label for c in conditions for _ in range(n)],
                [seed for mask in group for seed in mask.seeds(args.seed, n)],
                prompts=[prompt for prompt in prompts for _ in range(n)],
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                scheduler=args.scheduler,
                batch_size=args.batch_size,
                negative_prompt=args.negative_prompt,
                controlnet_conditioning_scale=args.controlnet_conditioning_scale,
                eta=args.eta or 0.0,  # diffusers passes eta to the schedulers that take one (DDIM)
            )
            for i, (mask, condition, prompt) in enumerate(zip(group, conditions, prompts)):
                classes = [
                    class_names[c] for c in classes_by_area(condition.label, len(class_names), settings.ignore_index)
                ]
                details = [
                    {
                        "prompt": prompt,
                        "negative_prompt": args.negative_prompt,
                        "classes": classes,
                        "seed": seed,
                        "scheduler": args.scheduler,
                        **({} if args.eta is None else {"eta": args.eta}),
                        "num_inference_steps": args.num_inference_steps,
                        "guidance_scale": args.guidance_scale,
                        "controlnet_conditioning_scale": args.controlnet_conditioning_scale,
                    }
                    for seed in mask.seeds(args.seed, n)
                ]
                writer.write(mask, condition.label, images[i * n : (i + 1) * n], details)
                progress.update(n)

    total = writer.finish()
    if state.is_main_process:
        run_files = {"pretrained_model_name_or_path": base, "class_names": class_names}
        write_json_atomic(
            Path(args.save_dir) / "generation_config.json",
            {**vars(args), **run_files, "prompt_template": settings.prompt_template},
        )
        print(f"Wrote {total} images of {len(masks)} masks to {args.save_dir}")


if __name__ == "__main__":
    with exit_on_bad_input():  # bad masks or folders: the message names the file and the fix
        main(parse_args())
