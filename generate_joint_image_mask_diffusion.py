#!/usr/bin/env python
"""Sample paired (image, mask) data from a model trained by train_seg_mask_diffusion.py.

    python generate_joint_image_mask_diffusion.py --model outputs/joint --save_dir outputs/synth --num_samples 100

Writes, under --save_dir:
  images/000000.png ...     generated images
  masks/000000.png ...      label PNGs (palette attached): the class id on the generated mask's pixels and
                            --fill_label elsewhere, so --save_dir is itself a *generic* dataset
  overlays/000000.png ...   the image with its mask tinted in the class colour
  metadata.jsonl            one line per sample: files, class, prompt, seed, steps, scheduler, guidance
  class_names.json, grid.png

Sample i is drawn with seed --seed + i, whatever the batch size and the number of processes; a re-run with the
same arguments keeps the samples already written and generates only the missing ones. Under `accelerate launch`
(or torchrun) each process takes every N-th of the missing samples, and the main one writes metadata.jsonl.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from segdiff.data import load_class_names, save_label_png, write_class_names
from segdiff.files import save_image_atomic, write_json_atomic
from segdiff.generation import (
    add_eta_argument,
    add_model_argument,
    add_output_size_arguments,
    check_generation_args,
    load_records,
    publish_records,
    save_records,
)
from segdiff.labels import (
    IGNORE_INDEX,
    LOVEDA_CLASSES,
    LOVEDA_PALETTE,
    SIDEWALK_CLASSES,
    SIDEWALK_PALETTE,
    default_palette,
)
from segdiff.pipelines.joint import JointImageMaskPipeline, pipeline_over_base
from segdiff.processes import generation_state, process_share
from segdiff.schedulers import CORE_SCHEDULERS, make_scheduler
from segdiff.visualize import image_grid, overlay_mask

DATASET_CLASSES = {"loveda": (LOVEDA_CLASSES, LOVEDA_PALETTE), "sidewalk": (SIDEWALK_CLASSES, SIDEWALK_PALETTE)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(
        parser,
        "The output folder of train_seg_mask_diffusion.py, or one of its checkpoint-N/ folders (then its EMA "
        "weights are used when present).",
    )
    parser.add_argument("--save_dir", required=True, help="Where the generated dataset goes.")
    parser.add_argument("--num_samples", type=int, default=100, help="How many (image, mask) pairs.")
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASET_CLASSES),
        default=None,
        help="Use this dataset's default class names when the checkpoint has no class_names.json.",
    )
    parser.add_argument("--class_id", type=int, default=None, help="Generate only this class.")
    parser.add_argument(
        "--class_weights",
        type=str,
        default=None,
        help="Draw each sample's class with these relative weights, one per class, e.g. '1,4,1,1,2,1,1' "
        "to balance rare classes. Default: every class in turn.",
    )
    parser.add_argument("--scheduler", choices=CORE_SCHEDULERS, default="ddim")
    add_eta_argument(parser)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="Classifier-free guidance against the empty prompt (> 1 enables; the model needs --prompt_dropout).",
    )
    add_output_size_arguments(parser, square="N x N images")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fill_label",
        choices=["background", "ignore"],
        default="background",
        help="Mask value outside the generated class: class 0 (background, default; a class-vs-rest "
        "dataset) or ignore_index (rest unknown). Samples of class 0 itself always get ignore outside.",
    )
    parser.add_argument("--ignore_index", type=int, default=IGNORE_INDEX)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--fp16", action="store_true", help="Run the models in float16 (GPU).")
    args = parser.parse_args(argv)
    check_generation_args(parser, args)
    return args


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_classes(checkpoint: Path, dataset: str | None):
    """Class names and palette: the checkpoint's class_names.json, else a dataset's defaults."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / "class_names.json").is_file():
            names, palette = load_class_names(folder / "class_names.json")
            return names, palette or default_palette(len(names))
    if dataset is not None:
        return DATASET_CLASSES[dataset]
    raise SystemExit(
        f"{checkpoint} has no class_names.json, so the class of each id is unknown. Fix: point --model at "
        "the output folder of train_seg_mask_diffusion.py, copy its class_names.json next to the model, "
        "or pass --dataset loveda|sidewalk to use that dataset's class list."
    )


def load_pipeline(checkpoint: Path, class_names, args) -> JointImageMaskPipeline:
    """The pipeline of a trained output folder, or of one of its checkpoint-N/ folders."""
    dtype = torch.float16 if args.fp16 else torch.float32  # default: as saved (float32)
    if (checkpoint / "model_index.json").is_file():
        pipeline = JointImageMaskPipeline.from_pretrained(checkpoint, class_names=class_names, torch_dtype=dtype)
    elif (checkpoint / "unet").is_dir() and (checkpoint.parent / "training_config.json").is_file():
        pipeline = load_checkpoint_pipeline(checkpoint, class_names).to(dtype=dtype)
    else:
        raise SystemExit(
            f"{checkpoint} is not a trained joint model: expected model_index.json (the training output folder) "
            "or unet/ inside a checkpoint-N folder of one (next to its training_config.json)."
        )
    if pipeline.unet.config.in_channels != pipeline.vae.config.latent_channels + 1:
        raise SystemExit(
            f"{checkpoint}: the UNet takes {pipeline.unet.config.in_channels} channels, not the image latent + 1 mask "
            "channel of a joint model. Was it trained by train_seg_mask_diffusion.py?"
        )
    return pipeline


def load_checkpoint_pipeline(checkpoint: Path, class_names) -> JointImageMaskPipeline:
    """checkpoint-N/ of a run, finished or not: its UNet (EMA weights when kept) and, with --train_text_encoder,
    its text encoder, over the frozen parts and schedule of the base named in the run's training_config.json."""
    config = json.loads((checkpoint.parent / "training_config.json").read_text())
    base, revision = config["pretrained_model_name_or_path"], config.get("revision")
    unet_folder = "unet_ema" if (checkpoint / "unet_ema").is_dir() else "unet"
    trained_text_encoder = (checkpoint / "text_encoder").is_dir()
    try:
        return pipeline_over_base(
            base,
            UNet2DConditionModel.from_pretrained(checkpoint, subfolder=unet_folder),
            text_encoder=CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder")
            if trained_text_encoder
            else None,
            prediction_type=config["prediction_type"],
            zero_terminal_snr=config["zero_terminal_snr"],
            class_names=class_names,
            prompt_template=config["prompt_template"],
            revision=revision,
            variant=config.get("variant"),
        )
    except OSError as error:
        raise SystemExit(
            f"{checkpoint}: cannot load the base model {base!r} that training_config.json names ({error}). "
            "Fix: make that path (or hub name) reachable from here, or generate from the finished output folder."
        ) from None


# ------------------------------------------------------------------------------------------------
# What to generate
# ------------------------------------------------------------------------------------------------


def plan_classes(args, num_classes: int) -> list[int]:
    """The class of every sample: --class_id, drawn by --class_weights, or every class in turn."""
    if args.class_id is not None:
        if not 0 <= args.class_id < num_classes:
            raise SystemExit(f"--class_id {args.class_id} is out of range: the model has classes 0..{num_classes - 1}.")
        return [args.class_id] * args.num_samples
    if args.class_weights is not None:
        weights = [float(w) for w in args.class_weights.split(",")]
        if len(weights) != num_classes or min(weights) < 0 or sum(weights) <= 0:
            raise SystemExit(
                f"--class_weights needs {num_classes} non-negative weights (one per class), got {args.class_weights!r}."
            )
        generator = torch.Generator().manual_seed(args.seed)
        return torch.multinomial(
            torch.tensor(weights), args.num_samples, replacement=True, generator=generator
        ).tolist()
    return [i % num_classes for i in range(args.num_samples)]


def label_map(mask: np.ndarray, class_id: int, fill_label: str, ignore_index: int) -> np.ndarray:
    """The label PNG of one sample: the class on its mask, the fill elsewhere."""
    fill = 0 if fill_label == "background" and class_id != 0 else ignore_index
    return np.where(mask, class_id, fill).astype(np.uint8)


def finished_samples(save_dir: Path) -> dict[int, dict]:
    """Samples of an earlier run (or of this run's other processes) whose files are all on disk, by index."""
    done = {}
    for record in load_records(save_dir):
        if all((save_dir / record[key]).is_file() for key in ("file_name", "mask_file_name", "overlay_file_name")):
            done[record["index"]] = record
    return done


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(args):
    state = generation_state()
    checkpoint = Path(args.model)
    if not checkpoint.is_dir():
        raise SystemExit(f"--model {checkpoint} does not exist.")
    class_names, palette = load_classes(checkpoint, args.dataset)
    pipeline = load_pipeline(checkpoint, class_names, args)
    pipeline.to(args.device or state.device)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = make_scheduler(args.scheduler, pipeline.scheduler.config)
    size = args.resolution or pipeline.default_size
    height, width = (size, size) if isinstance(size, int) else size
    try:
        pipeline.check_size(height, width)
    except ValueError as error:
        raise SystemExit(f"--resolution {size if isinstance(size, int) else f'{height},{width}'}: {error}") from None

    save_dir = Path(args.save_dir)
    if state.is_main_process:
        for folder in ("images", "masks", "overlays"):
            (save_dir / folder).mkdir(parents=True, exist_ok=True)
        write_class_names(save_dir / "class_names.json", class_names, palette)
    state.wait_for_everyone()

    classes = plan_classes(args, len(class_names))
    records = finished_samples(save_dir)
    todo = [i for i in range(args.num_samples) if i not in records]
    if records and state.is_main_process:
        print(f"{len(records)} samples already in {save_dir}; generating the {len(todo)} missing ones.")
    mine = process_share(todo, state)

    with tqdm(total=len(mine), desc="Samples", disable=not state.is_local_main_process) as progress:
        for start in range(0, len(mine), args.batch_size):
            indices = mine[start : start + args.batch_size]
            # One call: with guidance, the unconditional and class prompts run as one batched forward per step.
            output = pipeline(
                [classes[i] for i in indices],
                height=height,
                width=width,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                eta=args.eta or 0.0,  # DDIM's; check_generation_args refused it for the other samplers
                generator=[torch.Generator().manual_seed(args.seed + i) for i in indices],
            )
            for i, image, mask, prompt in zip(indices, output.images, output.masks, output.prompts):
                class_id = classes[i]
                name = f"{i:06d}.png"
                save_image_atomic(image, save_dir / "images" / name)
                save_label_png(
                    label_map(mask, class_id, args.fill_label, args.ignore_index), save_dir / "masks" / name, palette
                )
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
                save_records(save_dir, f"{i:06d}", [record])  # last: the sample counts as done once its files exist
            progress.update(len(indices))

    # Once every process is done: metadata.jsonl in index order, without duplicates from earlier runs.
    state.wait_for_everyone()
    if state.is_main_process:
        records = finished_samples(save_dir)
        ordered = [records[i] for i in sorted(records)]
        publish_records(save_dir, ordered)
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
        main(parse_args())
    except ValueError as error:  # the pipeline's own checks (class ids, sizes)
        sys.exit(f"error: {error}")
