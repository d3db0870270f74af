#!/usr/bin/env python
r"""Generate images from a folder of segmentation masks with a ControlNet trained by train_controlnet_seg.py.

    python generate_controlnet_seg.py --controlnet outputs/controlnet --masks_dir data/val/masks \
      --save_dir outputs/synth --num_images_per_mask 4

Every mask of --masks_dir (label PNGs of class ids, or colour PNGs in the palette of the ControlNet's
class_names.json, black = no data) is coloured by the palette, as in training, and turned into
--num_images_per_mask images by diffusers' StableDiffusionControlNetPipeline over the base model. The
prompt names the classes present, largest area first (the template of training), unless --prompt is given.

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
the same generation arguments (--controlnet, the base, the prompt options, --scheduler, --num_inference_steps,
--guidance_scale, --controlnet_conditioning_scale, --resolution, --seed, --num_images_per_mask, the palette's
--class_names_json, --ignore_index, --fp16), or it is refused naming the differences. --overwrite
regenerates everything instead.
"""

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from segdiff.data import exit_on_bad_input
from segdiff.generation import (
    SCHEDULERS,
    MaskSampleWriter,
    check_save_dir,
    list_masks,
    make_scheduler,
    read_mask,
    recorded_path,
)
from segdiff.prompts import classes_by_area
from segdiff.rendering import (
    CONTROLNET_GUIDANCE_SCALE,
    CONTROLNET_SCHEDULER,
    ControlNetRenderer,
    load_controlnet,
    load_controlnet_pipeline,
    load_run_files,
    recorded_base,
    run_setting,
)
from segdiff.training import write_json_atomic


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--controlnet",
        required=True,
        help="The output folder of train_controlnet_seg.py (or one of its checkpoint-N/ folders, whose EMA "
        "weights are used when present).",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="The Stable Diffusion base the ControlNet was trained on. Default: the one in its training_config.json.",
    )
    parser.add_argument("--masks_dir", required=True, help="A folder of masks: label PNGs, or colour PNGs.")
    parser.add_argument(
        "--save_dir",
        required=True,
        help="Where the generated dataset goes. A re-run into it adds the masks it lacks, with the arguments it "
        "was made with.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Regenerate every mask into --save_dir, removing its earlier outputs (needed to change the "
        "generation arguments of an existing --save_dir).",
    )
    parser.add_argument("--num_images_per_mask", type=int, default=4, help="Images per mask. (default: 4)")
    parser.add_argument(
        "--prompt",
        default=None,
        help="One prompt for every mask. Default: built from each mask's classes with the training template.",
    )
    parser.add_argument(
        "--prompt_template",
        default=None,
        help="Template of the class prompts, {classes} filled in. Default: the training's.",
    )
    parser.add_argument(
        "--prompt_top_k", type=int, default=None, help="Classes named per prompt (0: all). Default: the training's."
    )
    parser.add_argument("--negative_prompt", default=None, help="What to steer away from (with guidance > 1).")
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=CONTROLNET_SCHEDULER,
        help="Sampler: unipc (default), dpmsolver (DPM-Solver++), ddim or ddpm.",
    )
    parser.add_argument("--num_inference_steps", type=int, default=30, help="(default: 30)")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=CONTROLNET_GUIDANCE_SCALE,
        help="Classifier-free guidance; 1 disables. (default: %(default)s)",
    )
    parser.add_argument(
        "--controlnet_conditioning_scale", type=float, default=1.0, help="Strength of the mask's control."
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Short side of the generated images (the mask's aspect ratio is kept, sides rounded to what the "
        "model takes). Default: the training resolution.",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Images per pipeline call.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--class_names_json",
        default=None,
        help="Class names and palette, when the ControlNet folder has no class_names.json.",
    )
    parser.add_argument("--ignore_index", type=int, default=None, help="No-data id. Default: the training's (255).")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--fp16", action="store_true", help="Run the models in float16 (GPU).")
    args = parser.parse_args(argv)
    if args.num_images_per_mask < 1 or args.batch_size < 1:
        parser.error("--num_images_per_mask and --batch_size must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def generation_args(args, base: str, template: str, top_k: int, short_side: int, ignore_index: int) -> dict:
    """The arguments that determine the images, defaults resolved from the training config (not --batch_size or
    --device: the seeds keep the images the same whatever they are); recorded in --save_dir, a re-run must match."""
    return {
        "controlnet": recorded_path(args.controlnet),
        "pretrained_model_name_or_path": recorded_path(base),
        "num_images_per_mask": args.num_images_per_mask,
        "prompt": args.prompt,
        # The class prompts' options matter only without --prompt: changing them then is no different run.
        "prompt_template": None if args.prompt else template,
        "prompt_top_k": None if args.prompt else top_k,
        "negative_prompt": args.negative_prompt,
        "scheduler": args.scheduler,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "controlnet_conditioning_scale": args.controlnet_conditioning_scale,
        "resolution": short_side,
        "seed": args.seed,
        "class_names_json": recorded_path(args.class_names_json),
        "ignore_index": ignore_index,
        "fp16": args.fp16,
    }


def main(args):
    # Explicit, also in float32: a base's fp16 --variant weights would otherwise load in half precision.
    dtype = torch.float16 if args.fp16 else torch.float32
    controlnet, run_dir = load_controlnet(args.controlnet, dtype)
    config, class_names, palette = load_run_files(run_dir, args.class_names_json)
    ignore_index = run_setting(config, "ignore_index", args.ignore_index)
    template = run_setting(config, "prompt_template", args.prompt_template or None)
    top_k = run_setting(config, "prompt_top_k", args.prompt_top_k)
    # Every mask is read and checked before the models load: a bad file fails in seconds, named.
    masks = list_masks(args.masks_dir, len(class_names), palette, ignore_index)

    base = recorded_base(config, run_dir, args.pretrained_model_name_or_path, flag="--pretrained_model_name_or_path")
    short_side = run_setting(config, "resolution", args.resolution or None)
    recorded = generation_args(args, base, template, top_k, short_side, ignore_index)
    check_save_dir(args.save_dir, recorded, args.overwrite)  # before the models load: a refusal takes seconds
    pipeline = load_controlnet_pipeline(base, controlnet, dtype, variant=config.get("variant"))
    pipeline.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # The renderer turns each mask into what the ControlNet sees (control image, prompt), as segdiff.rendering's
    # load_renderer does, with this command line's overrides of the run's settings.
    renderer = ControlNetRenderer(
        pipeline, class_names, palette, ignore_index, short_side, run_dir, prompt_template=template, prompt_top_k=top_k
    )
    pipeline.scheduler = make_scheduler(args.scheduler, renderer.scheduler_config)

    n = args.num_images_per_mask
    writer = MaskSampleWriter(args.save_dir, class_names, palette, ignore_index, n, recorded, overwrite=args.overwrite)
    todo = [mask for mask in masks if not writer.is_done(mask)]
    if len(todo) < len(masks):
        print(f"{len(masks) - len(todo)} masks already in {args.save_dir}; generating the {len(todo)} missing ones.")
    for mask in tqdm(todo, desc="Masks"):
        condition = renderer.condition(read_mask(mask.path, palette, ignore_index))
        label = condition.label
        height, width = label.shape
        prompt = args.prompt or condition.prompt
        # CPU generators: the same seed gives the same noise on any device.
        seeds = mask.seeds(args.seed, n)
        images = []
        for start in range(0, n, args.batch_size):
            chunk = seeds[start : start + args.batch_size]
            images += pipeline(
                prompt,
                condition.control,
                height=height,
                width=width,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                negative_prompt=args.negative_prompt,
                num_images_per_prompt=len(chunk),
                controlnet_conditioning_scale=args.controlnet_conditioning_scale,
                generator=[torch.Generator().manual_seed(seed) for seed in chunk],
            ).images
        classes = [class_names[c] for c in classes_by_area(label, len(class_names), ignore_index)]
        details = [
            {
                "prompt": prompt,
                "negative_prompt": args.negative_prompt,
                "classes": classes,
                "seed": seed,
                "scheduler": args.scheduler,
                "num_inference_steps": args.num_inference_steps,
                "guidance_scale": args.guidance_scale,
                "controlnet_conditioning_scale": args.controlnet_conditioning_scale,
            }
            for seed in seeds
        ]
        writer.write(mask, label, images, details)

    total = writer.finish()
    write_json_atomic(
        Path(args.save_dir) / "generation_config.json",
        {**vars(args), "pretrained_model_name_or_path": base, "class_names": class_names, "prompt_template": template},
    )
    print(f"Wrote {total} images of {len(masks)} masks to {args.save_dir}")


if __name__ == "__main__":
    with exit_on_bad_input():  # bad masks or folders: the message names the file and the fix
        main(parse_args())
