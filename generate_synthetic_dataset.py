#!/usr/bin/env python
"""Generate a synthetic segmentation dataset: new label maps with chosen class ratios, rendered to images.

A layout model (train_layout_diffusion.py) draws whole multi-class label maps for a requested class-ratio
vector; a renderer (a train_controlnet_seg.py or train_spade_sdm.py output folder) turns each into an image.

    python generate_synthetic_dataset.py --layout_model outputs/layout-loveda --renderer outputs/controlnet-loveda \
      --num_samples 2000 --balance --save_dir outputs/synthetic-loveda --seed 0

Requests (one of them, or neither for the data's own distribution):
  --ratios "water:0.4,road:0.1"   the share of labelled pixels of the named classes; the others follow the data
  --balance                       per sample, a class drawn so that rare classes are asked for most (from the
                                  layout model's class_prior.json), at its usual size when present, or somewhat
                                  larger (segdiff/synthetic.py says exactly how)

The output is a *generic* dataset that every trainer here takes as it is::

    images/synthetic_000000.png ...   the rendered images (not with --layouts_only)
    masks/synthetic_000000.png ...    full multi-class label PNGs (palette attached), at the image size
    class_names.json                  the classes and palette
    metadata.jsonl                    per sample: files, seed, requested and achieved ratios, domain, renderer
    ratio_report.json                 mean |achieved - requested| share, per requested class and overall
    generation_args.json              the arguments that determine the samples (a re-run must match them)

Sample i uses seed --seed + i for its request, its layout and its image, whatever the batch size or the
number of processes. A re-run adds only the missing samples (also to grow a dataset: a larger --num_samples
keeps the samples already there). Under ``accelerate launch`` (or torchrun) each
process takes every num_processes-th sample; the outputs equal a one-process run's.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from segdiff.data import DatasetError, exit_on_bad_input, save_label_png, write_class_names
from segdiff.files import save_image_atomic, write_json_atomic
from segdiff.generation import check_save_dir, clear_outputs, load_records, publish_records, recorded_path, save_records
from segdiff.labels import resize_labels
from segdiff.models.layout_unet import class_ratios
from segdiff.pipelines.layout import LayoutDiffusionPipeline
from segdiff.processes import generation_state, process_share
from segdiff.synthetic import balanced_request, parse_ratios, ratio_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout_model", required=True, help="A train_layout_diffusion.py output folder.")
    parser.add_argument("--num_samples", type=int, required=True, help="Samples in the dataset.")
    parser.add_argument("--save_dir", required=True, help="Where the dataset goes.")
    parser.add_argument("--seed", type=int, default=0, help="Sample i uses seed SEED + i. (default: %(default)s)")
    request = parser.add_mutually_exclusive_group()
    request.add_argument("--ratios", default=None, help='Shares of named classes, e.g. "water:0.4,road:0.1".')
    request.add_argument(
        "--balance", action="store_true", help="Ask for rare classes most, from the layout model's class_prior.json."
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="Classifier-free guidance on the requested ratios (1: none; above 1 the model leans further towards "
        "the request: without --match_ratios a requested class is then drawn more surely, and larger than asked). "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--match_ratios",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Steer every layout sampling step to the requested shares exactly (LayoutDiffusionPipeline's "
        "match_ratios); --no-match_ratios samples the model's own following of the request. (default: %(default)s)",
    )
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Layout sampling steps.")
    parser.add_argument("--scheduler", choices=["ddim", "ddpm", "dpmsolver"], default=None, help="Layout sampler.")
    parser.add_argument("--domain", default=None, help="Domain of every layout (e.g. Urban or Rural for LoveDA).")

    render = parser.add_argument_group("rendering")
    target = render.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--renderer", default=None, help="A train_controlnet_seg.py or train_spade_sdm.py output folder."
    )
    target.add_argument("--layouts_only", action="store_true", help="Write the label maps only, no images.")
    render.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="The base of a ControlNet renderer (default: the one its training_config.json names).",
    )
    render.add_argument("--render_steps", type=int, default=30, help="Rendering steps. (default: %(default)s)")
    render.add_argument("--render_guidance_scale", type=float, default=None, help="Default: the renderer's own.")
    render.add_argument("--render_scheduler", default=None, help="Default: the renderer's own.")
    render.add_argument(
        "--resolution",
        "--image_size",
        dest="image_size",
        type=int,
        default=None,
        help="Side of images and masks. Default: the renderer's training "
        "resolution (--layouts_only: the layout model's); layouts are upsampled nearest.",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Samples per forward pass.")
    parser.add_argument("--overwrite", action="store_true", help="Regenerate everything in --save_dir.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        parser.error("--num_samples and --batch_size must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------


def check_layout_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    kind = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if kind != LayoutDiffusionPipeline.__name__:
        found = f"a {kind} folder" if kind else "no model_index.json"
        raise DatasetError(
            f"--layout_model {folder} is not a layout model folder ({found}). Fix: pass the output folder of "
            "train_layout_diffusion.py."
        )


def load_prior(layout_model: Path) -> dict:
    path = layout_model / "class_prior.json"
    if not path.is_file():
        raise DatasetError(
            f"--balance needs {path}, the class frequencies of the layout model's training data, which "
            "train_layout_diffusion.py writes. Fix: point --layout_model at its output folder."
        )
    return json.loads(path.read_text())


def requests(args, class_names: list[str], prior: dict | None) -> list[dict[int, float]]:
    """The request of every sample: the same --ratios for all, a --balance draw seeded by the sample's own seed,
    or none (the data's distribution)."""
    if args.ratios is not None:
        fixed = parse_ratios(args.ratios, class_names)
        return [fixed] * args.num_samples
    if args.balance:
        return [balanced_request(prior, np.random.default_rng(args.seed + i)) for i in range(args.num_samples)]
    return [{}] * args.num_samples


def domain_index(pipeline: LayoutDiffusionPipeline, domain: str | None) -> int | None:
    if domain is None:
        return None
    if not pipeline.domains:
        raise DatasetError(f"--domain {domain}: this layout model was trained without domains. Fix: drop --domain.")
    if domain not in pipeline.domains:
        raise DatasetError(f"--domain {domain}: the layout model's domains are {', '.join(pipeline.domains)}.")
    return pipeline.domains.index(domain)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def stem(index: int) -> str:
    return f"synthetic_{index:06d}"


def finished_records(save_dir: Path, num_samples: int) -> dict[int, dict]:
    """Sample index -> its record, for the samples of this dataset already complete on disk: recorded (in
    metadata.jsonl, or in the per-sample record a process writes after each sample's files), files present."""
    return {
        record["index"]: record
        for record in load_records(save_dir)
        if record["index"] < num_samples
        and all((save_dir / record[key]).is_file() for key in ("file_name", "mask_file_name") if record[key])
    }


def write_sample(save_dir: Path, index: int, label: np.ndarray, image, record: dict, palette) -> None:
    """Image, mask, then the record: a sample whose record exists is complete on disk."""
    if image is not None:
        save_image_atomic(image, save_dir / "images" / f"{stem(index)}.png")
    save_label_png(label, save_dir / "masks" / f"{stem(index)}.png", palette=palette)
    save_records(save_dir, stem(index), [record])


def write_metadata_and_report(save_dir: Path, num_samples: int, class_names: list[str]) -> dict:
    """metadata.jsonl (every sample, in index order) and ratio_report.json, by the main process at the end."""
    done = finished_records(save_dir, num_samples)
    records = [done[i] for i in range(num_samples)]
    publish_records(save_dir, records)
    report = ratio_report(records, class_names)
    write_json_atomic(save_dir / "ratio_report.json", report)
    return report


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(args):
    state = generation_state()  # accelerate launch / torchrun: every num_processes-th sample is this process's
    device = args.device or state.device
    save_dir, layout_dir = Path(args.save_dir), Path(args.layout_model)
    check_layout_folder(layout_dir)
    pipeline = LayoutDiffusionPipeline.from_pretrained(layout_dir).to(device)
    pipeline.set_progress_bar_config(disable=True)
    class_names, num_classes = list(pipeline.class_names), len(pipeline.class_names)
    prior = load_prior(layout_dir) if args.balance else None
    all_requests = requests(args, class_names, prior)
    domain = domain_index(pipeline, args.domain)

    renderer = None
    if args.renderer:
        from segdiff.rendering import load_renderer

        renderer = load_renderer(args.renderer, base=args.pretrained_model_name_or_path, device=device)
        if list(renderer.class_names) != class_names:
            raise DatasetError(
                f"--renderer {args.renderer} was trained on classes {renderer.class_names}, the layout model on "
                f"{class_names}. Fix: use a renderer and a layout model of the same dataset."
            )
    palette = renderer.palette if renderer else json.loads((layout_dir / "class_names.json").read_text())["palette"]
    size = args.image_size or (renderer.resolution if renderer else pipeline.unet.config.sample_size)

    generation_args = {
        "layout_model": recorded_path(layout_dir),
        "renderer": recorded_path(args.renderer),
        "pretrained_model_name_or_path": recorded_path(args.pretrained_model_name_or_path),
        "layouts_only": args.layouts_only,
        "seed": args.seed,
        "ratios": args.ratios,
        "balance": args.balance,
        "guidance_scale": args.guidance_scale,
        "match_ratios": args.match_ratios,
        "num_inference_steps": args.num_inference_steps,
        "scheduler": args.scheduler,
        "domain": args.domain,
        "render_steps": args.render_steps,
        "render_guidance_scale": args.render_guidance_scale,
        "render_scheduler": args.render_scheduler,
        "image_size": size,
    }
    if state.is_main_process:
        check_save_dir(save_dir, generation_args, args.overwrite)
        if args.overwrite:
            clear_outputs(save_dir)
        for folder in ("masks", *(() if args.layouts_only else ("images",))):
            (save_dir / folder).mkdir(parents=True, exist_ok=True)
        write_json_atomic(save_dir / "generation_args.json", generation_args)
        write_class_names(save_dir / "class_names.json", class_names, palette)
    state.wait_for_everyone()

    # This process's share of the samples still missing: every num_processes-th one.
    done = finished_records(save_dir, args.num_samples)
    state.wait_for_everyone()  # every process reads what is done before any writes more: the shares agree
    mine = process_share([i for i in range(args.num_samples) if i not in done], state)
    if state.is_main_process and done:
        print(f"{len(done)} of {args.num_samples} samples already in {save_dir}")
    batches = [mine[start : start + args.batch_size] for start in range(0, len(mine), args.batch_size)]
    for batch in tqdm(batches, desc="Samples", disable=not state.is_local_main_process):
        ratios = torch.zeros(len(batch), num_classes)
        known = torch.zeros(len(batch), num_classes, dtype=torch.bool)
        for row, index in enumerate(batch):
            for class_id, share in all_requests[index].items():
                ratios[row, class_id], known[row, class_id] = share, True
        layouts = pipeline(
            ratios,
            known,
            domain=None if domain is None else [domain] * len(batch),
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            generator=[torch.Generator().manual_seed(args.seed + i) for i in batch],
            scheduler=args.scheduler,
            match_ratios=args.match_ratios,
        ).label_maps
        labels = [resize_labels(layout, size, size) for layout in layouts]
        images = [None] * len(batch)
        if renderer is not None:
            images = renderer.render(
                labels,
                [args.seed + i for i in batch],
                num_inference_steps=args.render_steps,
                guidance_scale=args.render_guidance_scale,
                scheduler=args.render_scheduler,
                height=size,
                width=size,
            )
        for index, label, image in zip(batch, labels, images):
            achieved = class_ratios(torch.from_numpy(label)[None], num_classes, pipeline.ignore_index)[0]
            record = {
                "file_name": None if image is None else f"images/{stem(index)}.png",
                "mask_file_name": f"masks/{stem(index)}.png",
                "index": index,
                "seed": args.seed + index,
                "requested_ratios": {class_names[c]: share for c, share in all_requests[index].items()},
                "achieved_ratios": {name: round(float(v), 4) for name, v in zip(class_names, achieved)},
                "domain": args.domain,
                "renderer": None if renderer is None else renderer.kind,
            }
            write_sample(save_dir, index, label, image, record, palette)

    state.wait_for_everyone()
    if state.is_main_process:
        report = write_metadata_and_report(save_dir, args.num_samples, class_names)
        mae = "no class requested" if report["mae"] is None else f"MAE {report['mae']:.4f}"
        print(f"Wrote {args.num_samples} samples to {save_dir}; requested vs achieved ratios: {mae}")


if __name__ == "__main__":
    with exit_on_bad_input():
        main(parse_args())
