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
    ratio_report.json                 mean |achieved - requested| share, per requested class and overall; and
                                      layout_quality: diversity, copying of training maps, shapes of regions
                                      (segdiff/layout_quality.py), against the layout model's training maps
    generation_args.json              the arguments that determine the samples (a re-run must match them)

Sample i uses seed --seed + i for its request, its layout and its image, whatever the batch size or the
number of processes. A re-run adds only the missing samples (also to grow a dataset: a larger --num_samples
keeps the samples already there). Under ``accelerate launch`` (or torchrun) each
process takes every num_processes-th sample; the outputs equal a one-process run's.
"""

import argparse
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from segdiff import check_min_diffusers_version
from segdiff.arguments import (
    add_switch,
    finite_float,
    image_size,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from segdiff.data import (
    DatasetError,
    dataset_from_args,
    exit_on_bad_input,
    limit_train_samples,
    read_label_map,
    save_label_png,
)
from segdiff.files import save_image_atomic, write_json_atomic
from segdiff.generation import SampleWriter, add_save_dir_arguments, recorded_model
from segdiff.geometry import ImageSize
from segdiff.labels import IGNORE_INDEX, resize_labels
from segdiff.layout_quality import evenly_spaced, layout_quality
from segdiff.models.layout_unet import LayoutUNetModel, class_ratios
from segdiff.pipelines.layout import LayoutDiffusionPipeline
from segdiff.processes import generation_state
from segdiff.runs import TrainedRun, open_run, read_run_file, recorded_path
from segdiff.schedulers import CORE_SCHEDULERS, SCHEDULERS
from segdiff.seeds import cpu_generators
from segdiff.synthetic import balanced_request, parse_class_weights, parse_ratios, ratio_report, unseen_classes

# Stops here, naming the upgrade, when the installed diffusers is older than this script needs.
check_min_diffusers_version()


def parse_args(argv=None):
    # No abbreviations: a retired or mistyped flag must not silently set a longer one (--controlnet -> --controlnet_conditioning_scale).
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--layout_model",
        required=True,
        help="A train_layout_diffusion.py output folder, a checkpoint-N/ in one, or a Hub repository id.",
    )
    parser.add_argument("--layout_model_revision", default=None, help="The revision of a Hub --layout_model.")
    parser.add_argument("--num_samples", type=positive_int, required=True, help="Samples in the dataset.")
    add_save_dir_arguments(parser, "samples")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="Sample i uses seed SEED + i. (default: %(default)s)"
    )
    request = parser.add_mutually_exclusive_group()
    request.add_argument("--ratios", default=None, help='Shares of named classes, e.g. "water:0.4,road:0.1".')
    request.add_argument(
        "--balance", action="store_true", help="Ask for rare classes most, from the layout model's class_prior.json."
    )
    parser.add_argument(
        "--balance_class_weights",
        default=None,
        help='With --balance: "CLASS:FACTOR,..." multiplies how often a class is asked for; 0 leaves it out (e.g. '
        "a class the renderer draws badly: evaluate.py --downstream's render IoU well below its on-real column).",
    )
    parser.add_argument(
        "--guidance_scale",
        type=non_negative_float,
        default=1.0,
        help="Classifier-free guidance on the requested ratios (1: none; above 1 the model leans further towards "
        "the request: without --match_ratios a requested class is then drawn more surely, and larger than asked). "
        "(default: %(default)s)",
    )
    add_switch(
        parser,
        "match_ratios",
        default=True,
        help="Steer every layout sampling step to the requested shares exactly (LayoutDiffusionPipeline's "
        "match_ratios; on by default); --no_match_ratios samples the model's own following of the request.",
    )
    parser.add_argument(
        "--match_strength",
        type=finite_float,
        default=1.0,
        help="How far ratio matching steers each step, 0..1: 1 exactly to the request, 0 not at all (the model "
        "alone); between, a trade of exact shares for layouts more the model's own (segdiff/pipelines/layout.py's "
        "match_requested_shares says how). (default: %(default)s)",
    )
    parser.add_argument(
        "--layout_candidates",
        type=positive_int,
        default=1,
        help="Layouts drawn per request, of which the one whose shares come closest to it is kept "
        "(LayoutDiffusionPipeline's num_candidates): closer shares without editing the model's shapes, at this "
        "many times the layout sampling cost and batch (lower --batch_size if memory runs short); for "
        "--no_match_ratios or a --match_strength below 1. "
        "(default: %(default)s)",
    )
    parser.add_argument("--num_inference_steps", type=positive_int, default=50, help="Layout sampling steps.")
    parser.add_argument(
        "--scheduler",
        choices=CORE_SCHEDULERS,
        default=None,
        help="Layout scheduler of an analog layout model (a d3pm one has only its own). Default: the model's own.",
    )
    parser.add_argument(
        "--domain",
        default=None,
        help="The layouts' domain (LoveDA: Urban or Rural), or several, comma separated, to mix them in one run: "
        "sample i gets the (i mod k)-th. It conditions the layout model, picks the per-domain class prior of "
        "--balance, and fills a ControlNet renderer's {domain} prompt.",
    )

    render = parser.add_argument_group("rendering")
    target = render.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--renderer",
        default=None,
        help="A train_controlnet_seg.py or train_spade_sdm.py output folder, or a Hub repository id.",
    )
    target.add_argument("--layouts_only", action="store_true", help="Write the label maps only, no images.")
    render.add_argument("--renderer_revision", default=None, help="The revision of a Hub --renderer.")
    render.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="The base of a ControlNet renderer (default: the one its training_config.json names).",
    )
    render.add_argument("--render_steps", type=positive_int, default=30, help="Rendering steps. (default: %(default)s)")
    render.add_argument(
        "--render_guidance_scale", type=non_negative_float, default=None, help="Default: the renderer's own."
    )
    render.add_argument(
        "--render_scheduler", choices=sorted(SCHEDULERS), default=None, help="Default: the renderer's own."
    )
    render.add_argument(
        "--resolution",
        type=image_size,
        default=None,
        help="Size of images and masks, N or HEIGHT,WIDTH; layouts are resized, nearest. Default: what the "
        "renderer's own generator makes of a layout (a ControlNet: the layout's aspect ratio at its training short "
        "side; an SDM: its training size); --layouts_only: the layout model's size.",
    )
    parser.add_argument(
        "--quality_reference_maps",
        type=non_negative_int,
        default=512,
        help="Training maps of the layout model (evenly spaced over its split) that ratio_report.json's "
        "layout_quality compares the layouts with; 0 skips it. (default: %(default)s)",
    )
    parser.add_argument("--batch_size", type=positive_int, default=8, help="Samples per forward pass.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    args = parser.parse_args(argv)
    if not 0 <= args.match_strength <= 1:
        parser.error(
            f"--match_strength must be in [0, 1] (1: exact shares, 0: the model alone), not {args.match_strength}"
        )
    if not args.match_ratios and args.match_strength != 1:
        parser.error("--match_strength steers ratio matching: drop it with --no_match_ratios (the model alone)")
    if args.balance_class_weights is not None and not args.balance:
        parser.error("--balance_class_weights weighs the classes --balance asks for: add --balance, or drop it")
    return args


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------


def load_prior(run: TrainedRun) -> dict:
    path = run.run_dir / "class_prior.json"
    if not path.is_file():
        raise DatasetError(
            f"--balance needs {path}, the class frequencies of the layout model's training data, which "
            "train_layout_diffusion.py writes. Fix: point --layout_model at its output folder."
        )
    return read_run_file(path)


def requests(args, class_names: list[str], prior: dict | None, domains: list[str | None]) -> list[dict[int, float]]:
    """The request of every sample: the same --ratios for all, a --balance draw seeded by the sample's own seed
    (from the class prior of the sample's domain, when training wrote one), or none (the data's distribution)."""
    if args.ratios is not None:
        fixed = parse_ratios(args.ratios, class_names)
        return [fixed] * args.num_samples
    if args.balance:
        weights = parse_class_weights(args.balance_class_weights, class_names) if args.balance_class_weights else None
        return [
            balanced_request(prior_of(prior, domains[i]), np.random.default_rng(args.seed + i), weights)
            for i in range(args.num_samples)
        ]
    return [{}] * args.num_samples


def unseen_class_note(
    args, prior: dict | None, class_names: list[str], domains: list[str | None], all_requests: list[dict[int, float]]
) -> str | None:
    """What the requests cannot get, if anything: the classes of which the layout model's training maps (of a
    sample's domain) have no pixel. --balance leaves them out; a --ratios request (every sample's) for one is
    extrapolation."""
    if prior is None:
        return None
    unseen = {domain: unseen_classes(prior_of(prior, domain), class_names) for domain in dict.fromkeys(domains)}
    where = "the layout model's training maps (its class_prior.json) have no pixel of such a class"
    if args.balance:
        parts = [
            f"{', '.join(names)} (the {domain} maps)" if domain else ", ".join(names)
            for domain, names in unseen.items()
            if names
        ]
        return f"--balance leaves out {'; '.join(parts)}: {where}, so the model never drew one." if parts else None
    asked = [class_names[c] for c, share in all_requests[0].items() if share > 0]
    lacking = [name for name in asked if any(name in names for names in unseen.values())]
    if lacking:
        return (
            f"warning: --ratios asks for {', '.join(lacking)}, but {where}: the model never drew one, so the regions "
            "it draws for the request are unlike any real one."
        )
    return None


def prior_of(prior: dict, domain: str | None) -> dict:
    """The class frequencies of one domain's training maps (class_prior.json's ``per_domain``), else of all."""
    return prior.get("per_domain", {}).get(domain, prior) if domain else prior


def sample_domains(pipeline: LayoutDiffusionPipeline, text: str | None, num_samples: int) -> list[str | None]:
    """Each sample's domain: --domain's names in turn (sample i gets the (i mod k)-th), or None without it."""
    if text is None:
        return [None] * num_samples
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not pipeline.domains:
        raise DatasetError(f"--domain {text}: this layout model was trained without domains. Fix: drop --domain.")
    unknown = [name for name in names if name not in pipeline.domains]
    if unknown or not names:
        raise DatasetError(
            f"--domain {text}: {', '.join(unknown) or 'no name'} is not a domain of the layout model; its domains "
            f"are {', '.join(pipeline.domains)}."
        )
    return [names[i % len(names)] for i in range(num_samples)]


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def stem(index: int) -> str:
    return f"synthetic_{index:06d}"


def write_sample(writer: SampleWriter, index: int, label: np.ndarray, image, record: dict) -> None:
    """Image, mask, then the record: a sample whose record exists is complete on disk."""
    if image is not None:
        save_image_atomic(image, writer.save_dir / "images" / f"{stem(index)}.png")
    save_label_png(label, writer.save_dir / "masks" / f"{stem(index)}.png", palette=writer.palette)
    writer.save(stem(index), [record])


# ------------------------------------------------------------------------------------------------
# Layout quality
# ------------------------------------------------------------------------------------------------


def generated_layouts(save_dir, records: list[dict], layout_size: ImageSize) -> np.ndarray:
    """Every sample's mask (this run's and earlier runs' alike), back at the size the layout model drew it: the
    masks are its layouts enlarged nearest, so nothing is lost (exactly so for whole factors), and the comparison
    with the training maps does not depend on --resolution."""
    return np.stack([resize_labels(read_label_map(save_dir / r["mask_file_name"]), *layout_size) for r in records])


def training_maps(layout_run: TrainedRun, size: ImageSize, cap: int) -> tuple[np.ndarray, int]:
    """At most ``cap`` of the maps the layout model trained on (evenly spaced over them, resized nearest to
    ``size``) and how many it trained on, from the dataset and --max_train_samples its training_config.json
    records. A DatasetError when they cannot be read."""
    if "data_root" not in layout_run.config:
        raise DatasetError(f"{layout_run.run_dir} has no training_config.json naming the layout model's training data")
    dataset = dataset_from_args(argparse.Namespace(**layout_run.config))
    dataset = limit_train_samples(dataset, layout_run.setting("max_train_samples"))
    chosen = evenly_spaced(len(dataset), cap)
    maps = []
    for index in chosen:
        mask_path = dataset.pairs[index][1]
        label = dataset.decode_label(read_label_map(mask_path))
        dataset.check_label_ids(label, mask_path)
        maps.append(resize_labels(label, *size))
    return np.stack(maps), len(dataset)


def quality_section(layout_run: TrainedRun, generated: np.ndarray, class_names: list[str], cap: int) -> dict:
    """ratio_report.json's layout_quality, or why there is none (a note, not a failure: the samples are written)."""
    if cap == 0:
        return {"skipped": "--quality_reference_maps 0"}
    try:
        real, in_split = training_maps(layout_run, ImageSize.of(generated.shape[1:]), cap)
    except DatasetError as error:
        return {"skipped": f"the layout model's training maps could not be read: {error}"}
    ignore_index = int(layout_run.setting("ignore_index", IGNORE_INDEX))
    section = layout_quality(generated, real, class_names, ignore_index, max_pairwise_maps=cap)
    data = {key: layout_run.setting(key) for key in ("data_root", "dataset", "split")}
    return {**section, "reference": {**data, "maps_trained_on": in_split}}


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(args):
    state = generation_state()  # accelerate launch / torchrun: every num_processes-th sample is this process's
    device = args.device or state.device
    layout_run = open_run(args.layout_model, flag="--layout_model", revision=args.layout_model_revision)
    layout_run.require("layout_diffusion")
    if args.renderer and args.resolution:  # from the renderer's configs, before any weights load
        renderer_run = open_run(args.renderer, flag="--renderer", revision=args.renderer_revision)
        renderer_run.require("controlnet_seg", "spade_sdm")
        renderer_run.check_size(args.resolution, base=args.pretrained_model_name_or_path)
    pipeline = layout_run.load_pipeline(LayoutDiffusionPipeline, LayoutUNetModel).to(device)
    pipeline.set_progress_bar_config(disable=True)
    if args.scheduler and pipeline.unet.config.layout_type == "d3pm":
        raise DatasetError(
            f"--scheduler {args.scheduler}: --layout_model {args.layout_model} is a d3pm layout model, which samples "
            "with its own MaskedLayoutScheduler. Fix: drop --scheduler."
        )
    class_names, num_classes = list(pipeline.class_names), len(pipeline.class_names)
    has_prior = (layout_run.run_dir / "class_prior.json").is_file()
    prior = load_prior(layout_run) if args.balance or (args.ratios and has_prior) else None
    domains = sample_domains(pipeline, args.domain, args.num_samples)
    all_requests = requests(args, class_names, prior, domains)
    note = unseen_class_note(args, prior, class_names, domains, all_requests)
    if note and state.is_main_process:
        print(note, file=sys.stderr)

    renderer = None
    if args.renderer:
        from segdiff.rendering import load_renderer

        renderer = load_renderer(
            args.renderer, base=args.pretrained_model_name_or_path, device=device, revision=args.renderer_revision
        )
        if list(renderer.class_names) != class_names:
            raise DatasetError(
                f"--renderer {args.renderer} was trained on classes {renderer.class_names}, the layout model on "
                f"{class_names}. Fix: use a renderer and a layout model of the same dataset."
            )
    palette = renderer.palette if renderer else layout_run.classes()[1]
    # Default: the size the renderer's own generator gives a layout of the layout model's training size (ControlNet:
    # its aspect ratio at the renderer's training short side; SDM: the renderer's training size), or that size.
    layout_size = pipeline.default_size
    size = args.resolution or (
        renderer.output_size(np.zeros((layout_size.height, layout_size.width))) if renderer else layout_size
    )

    generation_args = {
        "layout_model": recorded_model(args.layout_model, args.layout_model_revision),
        "renderer": recorded_model(args.renderer, args.renderer_revision),
        "pretrained_model_name_or_path": recorded_path(args.pretrained_model_name_or_path),
        "layouts_only": args.layouts_only,
        "seed": args.seed,
        "ratios": args.ratios,
        "balance": args.balance,
        "balance_class_weights": args.balance_class_weights,
        "guidance_scale": args.guidance_scale,
        "match_ratios": args.match_ratios,
        "match_strength": args.match_strength,
        "layout_candidates": args.layout_candidates,
        "num_inference_steps": args.num_inference_steps,
        "scheduler": args.scheduler,
        "domain": args.domain,
        "render_steps": args.render_steps,
        "render_guidance_scale": args.render_guidance_scale,
        "render_scheduler": args.render_scheduler,
        "resolution": size,
    }
    writer = SampleWriter(
        args.save_dir,
        class_names,
        palette,
        generation_args,
        folders=("masks",) if args.layouts_only else ("masks", "images"),
        unit_of=lambda record: stem(record["index"]),
        overwrite=args.overwrite,
        state=state,
    )
    mine = writer.todo(list(range(args.num_samples)), name=stem)  # this process's share of the missing samples
    batches = [mine[start : start + args.batch_size] for start in range(0, len(mine), args.batch_size)]
    for batch in tqdm(batches, desc="Samples", disable=not state.is_local_main_process):
        layouts = pipeline(
            *pipeline.requests([all_requests[index] for index in batch]),  # (ratios, known), as the model takes them
            domain=[None if domains[i] is None else pipeline.domains.index(domains[i]) for i in batch],
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            generator=cpu_generators(args.seed + i for i in batch),
            scheduler=args.scheduler,
            match_ratios=args.match_ratios,
            match_strength=args.match_strength,
            num_candidates=args.layout_candidates,
        ).label_maps
        labels = [resize_labels(layout, *size) for layout in layouts]
        images = [None] * len(batch)
        if renderer is not None:
            images = renderer.render(
                labels,
                [args.seed + i for i in batch],
                num_inference_steps=args.render_steps,
                guidance_scale=args.render_guidance_scale,
                scheduler=args.render_scheduler,
                height=size.height,
                width=size.width,
                domains=[domains[i] for i in batch],
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
                "domain": domains[index],
                "renderer": None if renderer is None else renderer.kind,
                "match_strength": args.match_strength if args.match_ratios else 0.0,
            }
            write_sample(writer, index, label, image, record)

    records = writer.finish([stem(i) for i in range(args.num_samples)])  # metadata.jsonl, in index order
    if state.is_main_process:
        report = ratio_report(records, class_names)
        generated = generated_layouts(writer.save_dir, records, pipeline.default_size)
        report["layout_quality"] = quality_section(layout_run, generated, class_names, args.quality_reference_maps)
        write_json_atomic(writer.save_dir / "ratio_report.json", report)
        mae = "no class requested" if report["mae"] is None else f"MAE {report['mae']:.4f}"
        print(f"Wrote {args.num_samples} samples to {writer.save_dir}; requested vs achieved ratios: {mae}")
        for name, count in report["not_drawn"].items():
            asked = report["per_class"][name]["requests"]
            print(
                f"  {name}: asked for in {asked} samples, not drawn in {count} of them (ratio matching cannot draw a "
                "class asked at a few pixels' share: ask for more, or train the layout model at a higher --resolution)"
            )


if __name__ == "__main__":
    with exit_on_bad_input():
        main(parse_args())
