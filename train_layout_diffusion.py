#!/usr/bin/env python
"""Train a layout diffusion model: whole multi-class label maps, conditioned on class ratios (and a domain).

The model draws NEW label maps with chosen class proportions, to be rendered into images by a mask-to-image
model (train_controlnet_seg.py or train_spade_sdm.py): new training pairs with more of the rare classes
(SyntheticGen's recipe for LoveDA). See segdiff/models/layout_unet.py for the representation (one-hot maps in
[-1, 1], x0 predicted as class logits, cross-entropy; or, with --layout_type d3pm, discrete tokens with a [MASK]
state) and segdiff/pipelines/layout.py for sampling.

    accelerate launch --config_file configs/accelerate/single_gpu.yaml train_layout_diffusion.py \
      --data_root /data/LoveDA --dataset loveda --resolution 128 --condition_on_domain \
      --model_config configs/models/layout_128.json --train_batch_size 32 --learning_rate 2e-4 \
      --max_train_steps 100000 --use_ema --output_dir outputs/layout-loveda

Data: only the label maps are read (never the images). Each is brought once to --resolution (its short side),
by majority pooling: every layout pixel takes the label most of the source pixels it covers have, so regions
stay whole and a road at least half a layout pixel wide stays a connected line, where nearest sampling
(--label_downsampling nearest) would alias it into dots; anything thinner is lost (nearest keeps it as scattered
dots). Training samples are then random (or --center_crop) square crops of those maps with random flips
(horizontal; vertical too for LoveDA's overhead views, see --vertical_flip).

Conditioning: the ratio vector of each training layout (each class's share of its labelled pixels) with a random
subset of the classes hidden (each sample draws a keep probability uniformly in [0, 1] and keeps each class with
it), so a request may name only some classes; --condition_dropout hides everything (and the domain) for
classifier-free guidance. --condition_on_domain (LoveDA) adds the scene, Urban or Rural.

The output folder: ``LayoutDiffusionPipeline.from_pretrained(output_dir)`` (EMA weights with --use_ema), plus
class_names.json, training_config.json and class_prior.json (the training maps' class frequencies at
--resolution, which generate_synthetic_dataset.py --balance reads).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils import make_image_grid
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from segdiff import check_min_diffusers_version, training
from segdiff.arguments import add_switch, finite_float, fraction, non_negative_float, positive_float, positive_int
from segdiff.data import (
    LOVEDA_SCENES,
    JointTransform,
    add_dataset_args,
    dataset_from_args,
    exit_on_bad_input,
    limit_train_samples,
    loveda_scene,
    read_label_map,
)
from segdiff.files import write_json_atomic
from segdiff.geometry import ImageSize, unet_downsampling
from segdiff.labels import colorize_label, resize_labels
from segdiff.models.layout_unet import (
    LAYOUT_TYPES,
    NO_DOMAIN,
    LayoutUNetModel,
    class_ratios,
    labels_to_analog,
    tokens_to_one_hot,
)
from segdiff.pipelines.layout import LayoutDiffusionPipeline, layout_scheduler
from segdiff.schedulers import MaskedLayoutScheduler

# Stops here, naming the upgrade, when the installed diffusers is older than this script needs.
check_min_diffusers_version()

logger = training.logger
CONFIGS = Path(__file__).resolve().parent / "configs" / "models"
LABEL_DOWNSAMPLING = ("majority", "nearest")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    training.add_training_args(parser, default_resolution=128)
    add_dataset_args(parser, default_dataset="loveda")
    group = parser.add_argument_group("layout diffusion")
    group.add_argument(
        "--model_config",
        type=str,
        default=str(CONFIGS / "layout_128.json"),
        help="LayoutUNetModel size, a JSON under configs/models/: layout_tiny.json (tests, CPU) or layout_128.json "
        "(LoveDA at 128 px on one A100). num_classes, sample_size and num_domains are set from the data. "
        "Default: %(default)s",
    )
    group.add_argument(
        "--layout_type",
        choices=LAYOUT_TYPES,
        default="analog",
        help="analog: Gaussian diffusion of the one-hot maps, sampled with any diffusers scheduler. d3pm: discrete "
        "absorbing-state diffusion ([MASK] tokens revealed step by step, MaskedLayoutScheduler); on the toy "
        "benchmark it followed requests about as closely and drew less realistic layouts (benchmarks/RESULTS.md). "
        "Default: %(default)s",
    )
    group.add_argument(
        "--timestep_sampling",
        choices=("logit_normal", "uniform"),
        default=None,
        help="How training timesteps are drawn: logit_normal (t = T * sigmoid(N(--logit_mean, --logit_std)), SD3's "
        "density: more steps at high noise, where the regions and their classes are decided) or uniform. Default: "
        "logit_normal for --layout_type analog (on the toy benchmark: layouts closer to the real shapes and class "
        "frequencies), uniform for d3pm (logit_normal made its layouts worse; benchmarks/RESULTS.md).",
    )
    group.add_argument(
        "--logit_mean",
        type=finite_float,
        default=0.9,
        help="Mean of --timestep_sampling logit_normal. Default: %(default)s",
    )
    group.add_argument(
        "--logit_std",
        type=positive_float,
        default=1.5,
        help="Std of --timestep_sampling logit_normal. Default: %(default)s",
    )
    group.add_argument(
        "--region_perturbation",
        type=fraction,
        default=0.0,
        help="--layout_type analog: probability per sample that the map the noise is added to has one of its "
        "classes grown by 1 to --region_perturbation_radius pixels, while the model still learns the real map. "
        "In training every noisy map agrees with its ratios; in sampling the regions drift from the request, and "
        "this teaches the model to pull them back. On the toy benchmark (0.3-0.5, the model alone, no ratio "
        "matching) full requests were followed to 0.015-0.019 instead of 0.024-0.026 and one-class requests to "
        "0.031-0.041 instead of 0.046-0.048, at layout realism from as good to worse (benchmarks/RESULTS.md, "
        "'Region perturbation'). Off by default: with ratio matching (generate_synthetic_dataset.py's default) the "
        "toy benchmark's synthetic pairs gained no more downstream and drew less realistic layouts. Default: "
        "%(default)s",
    )
    group.add_argument(
        "--region_perturbation_radius",
        type=positive_int,
        default=None,
        help="Largest growth of --region_perturbation, in pixels of --resolution (each perturbed sample draws 1 "
        "to this many). Default: a tenth of --resolution's short side (3 at 32 px, 12 at 128 px).",
    )
    group.add_argument(
        "--label_downsampling",
        choices=LABEL_DOWNSAMPLING,
        default="majority",
        help="How label maps are brought to --resolution: majority (each layout pixel takes the most frequent label "
        "of the source pixels it covers; no-data only where it is the majority) or nearest (one source pixel). "
        "Default: %(default)s",
    )
    add_switch(
        group,
        "vertical_flip",
        default=None,
        help="Also flip layouts vertically at random (unless --no_random_flip). Default: on for --dataset loveda "
        "(overhead views have no up), off otherwise (street and landscape scenes keep the sky on top).",
    )
    group.add_argument(
        "--condition_dropout",
        type=finite_float,
        default=0.1,
        help="Probability of training a sample with nothing known (no ratio, no domain): the unconditional model "
        "that classifier-free guidance compares with. Default: %(default)s",
    )
    group.add_argument(
        "--condition_on_domain",
        action="store_true",
        help="LoveDA only: also condition on the scene (Urban or Rural, from each map's folder), so generation "
        "can ask for a domain.",
    )
    group.add_argument(
        "--domain_dropout",
        type=finite_float,
        default=0.2,
        help="With --condition_on_domain: probability of hiding a sample's domain while keeping its ratios, so "
        "ratios can also be requested without a domain. Default: %(default)s",
    )
    group.add_argument(
        "--num_validation_images",
        type=positive_int,
        default=4,
        help="Validation layouts per request (the grid's columns); the rows are: unconditional, then one class "
        "each asked at about twice its usual share. Default: %(default)s",
    )
    group.add_argument(
        "--validation_guidance_scale",
        type=non_negative_float,
        default=1.0,
        help="Guidance scale of the validation samples (1 = none: the logged shares then show how closely plain "
        "sampling follows the request; above 1 pushes the named classes further, and overshoots). "
        "Default: %(default)s",
    )
    args = parser.parse_args(argv)
    if args.data_root is None:
        parser.error("--data_root is required")
    if args.pretrained_model_name_or_path is not None:
        parser.error(
            "--pretrained_model_name_or_path: the layout model is trained from scratch and uses no base model. "
            "Fix: drop the flag (the model's size comes from --model_config)."
        )
    if args.random_affine:
        parser.error("--random_affine is not used for layouts (it pads maps with no-data). Fix: drop the flag.")
    if not 0 <= args.condition_dropout < 1:
        parser.error("--condition_dropout must be in [0, 1)")
    if not 0 <= args.domain_dropout < 1:
        parser.error("--domain_dropout must be in [0, 1)")
    if args.vertical_flip is None:
        args.vertical_flip = args.dataset == "loveda"
    if args.timestep_sampling is None:
        args.timestep_sampling = "logit_normal" if args.layout_type == "analog" else "uniform"
    if args.layout_type == "d3pm" and args.region_perturbation:
        parser.error(
            "--region_perturbation is for --layout_type analog (a d3pm model is given its revealed pixels as they "
            "are). Fix: drop the flag."
        )
    if args.region_perturbation_radius is None:
        args.region_perturbation_radius = max(1, min(args.resolution.height, args.resolution.width) // 10)
    training.check_training_args(parser, args)
    # The model's size, checked before anything is built or written: its levels must halve --resolution evenly.
    config = training.read_model_config(args.model_config, LayoutUNetModel)
    why = f"the {len(config['block_out_channels'])} levels of --model_config {args.model_config}"
    training.check_resolution(args.resolution, unet_downsampling(config), why)
    return args


def check_domain_flag(args) -> None:
    """--condition_on_domain needs a dataset whose maps say their domain: LoveDA's scene folders."""
    if args.condition_on_domain and args.dataset != "loveda":
        raise SystemExit(
            f"error: --condition_on_domain needs --dataset loveda (the domain is the Urban/Rural scene folder of "
            f"each map); --dataset {args.dataset} has no domains. Fix: drop --condition_on_domain."
        )


# ------------------------------------------------------------------------------------------------
# Data: label maps only, brought once to the layout resolution
# ------------------------------------------------------------------------------------------------


def majority_pool(label: np.ndarray, size: tuple[int, int], ignore_index: int) -> np.ndarray:
    """Resize a label map to ``size``: each output pixel gets the label covering most of its area.

    Each present label's indicator map is area-averaged to ``size`` (exact shares for integer factors, area
    weights otherwise) and the largest share wins; ties go to the lower class id, and no-data (ignore_index,
    checked last) wins only with a strict majority over every class.
    """
    best_share = np.full(size, -1.0, dtype=np.float32)
    pooled = np.full(size, ignore_index, dtype=np.int64)
    labelled_ids = [int(i) for i in np.unique(label) if i != ignore_index]
    for label_id in [*labelled_ids, ignore_index]:
        indicator = torch.from_numpy((label == label_id).astype(np.float32))[None, None]
        share = F.interpolate(indicator, size=size, mode="area")[0, 0].numpy()
        wins = share > best_share
        pooled[wins], best_share[wins] = label_id, share[wins]
    return pooled


def downsample_label(label: np.ndarray, size: tuple[int, int], method: str, ignore_index: int) -> np.ndarray:
    """A decoded label map resized to ``size``, by majority pooling or nearest sampling."""
    if tuple(label.shape) == tuple(size):
        return label
    if method == "nearest":
        return resize_labels(label, *size)
    return majority_pool(label, size, ignore_index)


class LayoutMaps(Dataset):
    """The dataset's label maps at --resolution (cover size), with each map's domain id; images are never read."""

    def __init__(self, dataset, resolution: ImageSize, method: str, domains: list[str]):
        self.dataset, self.method, self.domains = dataset, method, domains
        # Only for its cover_size: the size with the map's aspect ratio whose short side is --resolution, the same
        # size images are brought to before cropping (the crops themselves are taken per sample, in training).
        self.geometry = JointTransform(resolution, center_crop=True, random_flip=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        _, mask_path = self.dataset.pairs[index]
        label = self.dataset.decode_label(read_label_map(mask_path))
        self.dataset.check_label_ids(label, mask_path)
        ignore_index = self.dataset.ignore_index
        size = tuple(self.geometry.cover_size(*label.shape))
        layout = downsample_label(label, size, self.method, ignore_index)
        domain = self.domains.index(loveda_scene(mask_path)) if self.domains else NO_DOMAIN
        # Bytes when every id fits: the maps of a whole dataset stay in memory.
        fits_in_bytes = self.dataset.num_classes <= 256 and 0 <= ignore_index < 256
        dtype = torch.uint8 if fits_in_bytes else torch.int32
        return {"layout": torch.from_numpy(np.asarray(layout)).to(dtype), "domain": domain}


def load_layouts(dataset, args, domains: list[str], progress: bool = True) -> list[dict]:
    """Every training map at --resolution, read once (in --dataloader_num_workers processes) and kept in memory;
    ``progress``: show a progress bar (one process of a run shows it)."""
    maps = LayoutMaps(dataset, args.resolution, args.label_downsampling, domains)
    loader = DataLoader(maps, batch_size=None, num_workers=args.dataloader_num_workers)
    return [item for item in tqdm(loader, desc="Reading label maps", unit="map", disable=not progress)]


def crop(layout: torch.Tensor, size: ImageSize, top: int, left: int) -> torch.Tensor:
    return layout[top : top + size.height, left : left + size.width]


def center_crop(layout: torch.Tensor, size: ImageSize) -> torch.Tensor:
    return crop(layout, size, (layout.shape[0] - size.height) // 2, (layout.shape[1] - size.width) // 2)


def grow_one_class(
    labels: torch.Tensor,
    num_classes: int,
    probability: float,
    max_radius: int,
    generator: torch.Generator,
    ignore_index: int,
) -> torch.Tensor:
    """--region_perturbation: each (H, W) map of the batch (B, H, W), with ``probability``, gets one of the classes
    it shows (drawn uniformly) grown by a radius drawn in 1..``max_radius``: every pixel within that many pixels of
    the class (a square neighbourhood) takes it, except no-data pixels. The other maps are returned as they are.

    The noisy map built from the result no longer matches its ratios (the grown class has too much, its
    neighbours too little), while the loss still asks for the real map: the model learns to move region borders
    back to the requested shares, as it must when sampling drifts from them."""
    batch = labels.shape[0]
    perturbed = torch.rand(batch, generator=generator, device=labels.device) < probability
    radius = torch.randint(1, max_radius + 1, (batch,), generator=generator, device=labels.device)
    choice = torch.rand(batch, generator=generator, device=labels.device)
    # The class: the k-th of those each map shows (ascending ids), k = floor(choice x how many it shows).
    labelled = labels != ignore_index
    shown = class_ratios(labels, num_classes, ignore_index) > 0
    k = torch.minimum((choice * shown.sum(1)).long(), shown.sum(1) - 1)
    picked = (shown.cumsum(1) > k[:, None]).long().argmax(1)
    perturbed &= shown.any(1)
    # Grown by r pixels = r dilations by a 3x3 square; each map keeps the growth of its own radius.
    region = (labels == picked[:, None, None]).float()[:, None]
    near = torch.zeros_like(labelled)
    for r in range(1, max_radius + 1):
        region = F.max_pool2d(region, kernel_size=3, stride=1, padding=1)
        near = torch.where((radius == r)[:, None, None], region[:, 0] > 0, near)
    grow = perturbed[:, None, None] & near & labelled
    return torch.where(grow, picked[:, None, None], labels)


class TrainingLayouts(Dataset):
    """Per sample: a crop of a map with random flips, its class ratios, which of them are known, and its domain."""

    def __init__(self, layouts: list[dict], args, num_classes: int, ignore_index: int):
        self.layouts, self.args = layouts, args
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, index: int) -> dict:
        return self.layouts[index]

    def process(self, item: dict, generator: torch.Generator) -> dict:
        """Every random draw comes from the sample's own generator, always in the same order (exact resume)."""
        args, layout = self.args, item["layout"].long()
        size = args.resolution
        draws = torch.rand(4, generator=generator)  # crop offsets, horizontal and vertical flips
        if args.center_crop:
            layout = center_crop(layout, size)
        else:
            top = int(draws[0] * (layout.shape[0] - size.height + 1))
            left = int(draws[1] * (layout.shape[1] - size.width + 1))
            layout = crop(layout, size, top, left)
        if args.random_flip and draws[2] < 0.5:
            layout = layout.flip(-1)
        if args.random_flip and args.vertical_flip and draws[3] < 0.5:
            layout = layout.flip(-2)

        ratios = class_ratios(layout[None], self.num_classes, self.ignore_index)[0]
        # Sparse requests: a keep probability per sample, then each class kept with it.
        keep_probability, hide_domain, drop_all = torch.rand(3, generator=generator).tolist()
        known = torch.rand(self.num_classes, generator=generator) < keep_probability
        domain = item["domain"]
        if hide_domain < args.domain_dropout:
            domain = NO_DOMAIN
        if drop_all < args.condition_dropout:  # the unconditional model, for classifier-free guidance
            known[:], domain = False, NO_DOMAIN
        return {"label": layout.contiguous(), "ratios": ratios, "known": known, "domain": domain}


def collate(examples: list[dict]) -> dict:
    return {
        "label": torch.stack([e["label"] for e in examples]),
        "ratios": torch.stack([e["ratios"] for e in examples]),
        "known": torch.stack([e["known"] for e in examples]),
        "domain": torch.tensor([e["domain"] for e in examples], dtype=torch.long),
        "seed": torch.tensor([e["seed"] for e in examples]),
    }


# ------------------------------------------------------------------------------------------------
# The class-frequency prior
# ------------------------------------------------------------------------------------------------


def share_statistics(counts: np.ndarray) -> dict:
    """From per-map pixel counts (N, C): pixel share, share of maps holding each class, mean share where present."""
    per_map = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    present = counts > 0
    total = counts.sum(0)
    return {
        "pixel_share": (total / max(total.sum(), 1)).tolist(),
        "image_share": present.mean(0).tolist() if len(counts) else [0.0] * counts.shape[1],
        "mean_share_when_present": [
            float(per_map[present[:, c], c].mean()) if present[:, c].any() else 0.0 for c in range(counts.shape[1])
        ],
        "num_maps": int(len(counts)),
    }


def class_prior(layouts: list[dict], args, class_names: list[str], ignore_index: int, domains: list[str]) -> dict:
    """class_prior.json: class frequencies of the training maps at --resolution (the centre crop of each),
    over labelled pixels only; per domain too when the model has domains."""
    num_classes = len(class_names)
    counts = np.zeros((len(layouts), num_classes), dtype=np.int64)
    for row, item in enumerate(layouts):
        layout = center_crop(item["layout"].long(), args.resolution).numpy().ravel()
        counts[row] = np.bincount(layout[layout != ignore_index], minlength=num_classes)[:num_classes]
    prior = {"class_names": list(class_names), **share_statistics(counts), "domains": list(domains)}
    prior.update(resolution=args.resolution, label_downsampling=args.label_downsampling)
    if domains:
        domain_ids = np.array([item["domain"] for item in layouts])
        prior["per_domain"] = {name: share_statistics(counts[domain_ids == i]) for i, name in enumerate(domains)}
    return prior


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def validation_requests(prior: dict, max_classes: int = 8) -> list[tuple[str, dict[int, float]]]:
    """(title, {class id: share}) per grid row: unconditional, then single classes at about twice their usual share
    (the rarest classes first when there are more than ``max_classes``)."""
    shares = prior["mean_share_when_present"]
    order = sorted(range(len(shares)), key=lambda c: prior["pixel_share"][c])[:max_classes]
    requests = [("unconditional", {})]
    for class_id in sorted(order):
        share = round(min(0.8, max(0.1, 2 * shares[class_id])), 2)
        requests.append((f"{prior['class_names'][class_id]}={share}", {class_id: share}))
    return requests


def log_validation(pipeline, args, accelerator, dataset, prior, global_step):
    """A grid of colourised layouts: one row per request, --num_validation_images samples each."""
    pipeline.set_progress_bar_config(disable=True)
    requests = validation_requests(prior)
    count, num_classes = args.num_validation_images, dataset.num_classes
    # Each request's (ratios, known) row, repeated for its --num_validation_images samples.
    ratios, known = (rows.repeat_interleave(count, 0) for rows in pipeline.requests([s for _, s in requests]))
    generators = [torch.Generator().manual_seed(args.seed + i % count) for i in range(len(ratios))]
    layouts = pipeline(
        ratios,
        known,
        guidance_scale=args.validation_guidance_scale,
        num_inference_steps=25,
        generator=generators,
    ).label_maps
    achieved = class_ratios(torch.from_numpy(layouts), num_classes, dataset.ignore_index)
    for row, (title, request) in enumerate(requests):
        got = achieved[row * count : (row + 1) * count].mean(0)
        shares = ", ".join(f"{dataset.class_names[c]} {got[c]:.2f}" for c in request) or "see the grid"
        logger.info(f"Validation {title}: mean achieved share {shares}")
    # Layouts are small: enlarged (nearest) so one pixel stays one flat block, with a white frame between tiles.
    scale = max(1, 128 // max(args.resolution))
    tiles = []
    for layout in layouts:
        tile = colorize_label(layout, dataset.palette, dataset.ignore_index)
        tile = tile.resize((layout.shape[1] * scale, layout.shape[0] * scale), Image.Resampling.NEAREST)
        tiles.append(ImageOps.expand(tile, border=2, fill=(255, 255, 255)))
    grid = make_image_grid(tiles, rows=len(requests), cols=count)
    rows = f"rows: {', '.join(title for title, _ in requests)}"
    training.log_validation_images(accelerator, grid, global_step, "validation", args.output_dir, rows)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def build_model(args, num_classes: int, num_domains: int) -> LayoutUNetModel:
    config = training.read_model_config(args.model_config, LayoutUNetModel)
    size = {"num_classes": num_classes, "sample_size": args.resolution.config_value(), "num_domains": num_domains}
    return LayoutUNetModel.from_config({**config, **size, "layout_type": args.layout_type})


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of the batch (0, not NaN, for a batch with none)."""
    summed = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return summed / (labels != ignore_index).sum().clamp(min=1)


def main(args):
    check_domain_flag(args)
    accelerator = training.make_accelerator(args)
    hub_repo = training.create_hub_repo(accelerator, args)  # --push_to_hub: fail now, not after training
    dataset = limit_train_samples(dataset_from_args(args), args.max_train_samples)
    # Only the masks: the images are never read.
    class_pixels = training.check_training_data(accelerator, dataset, read_images=False)
    num_classes, ignore_index = dataset.num_classes, dataset.ignore_index
    domains = list(LOVEDA_SCENES) if args.condition_on_domain else []
    logger.info(f"{len(dataset)} training maps, {num_classes} classes: {dataset.class_names}; domains: {domains}")

    unet = build_model(args, num_classes, len(domains))
    logger.info(f"LayoutUNetModel: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters")
    noise_scheduler = layout_scheduler() if args.layout_type == "analog" else MaskedLayoutScheduler()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    training.use_channels_last(args, unet)
    ema_models = {}
    if args.use_ema:
        ema_models["unet_ema"] = training.make_ema(unet, args)
    training.register_checkpoint_hooks(accelerator, {"unet": unet}, ema_models)

    layouts = load_layouts(dataset, args, domains, progress=accelerator.is_local_main_process)
    for domain_id, name in enumerate(domains):
        if not any(item["domain"] == domain_id for item in layouts):
            logger.warning(f"No training map of the domain {name}: the model will not learn it (see --loveda_scenes).")
    layout_data = TrainingLayouts(layouts, args, num_classes, ignore_index)
    train_dataset = training.SeededDataset(layout_data, layout_data.process)
    train_dataloader, sampler = training.make_train_dataloader(train_dataset, args, collate)
    optimizer = training.make_optimizer(args, unet.parameters(), accelerator)
    updates_per_epoch = training.plan_steps(args, train_dataloader, accelerator)
    lr_scheduler = training.make_lr_scheduler(args, optimizer, accelerator)
    # One prepare call, as in diffusers' examples: DeepSpeed builds its engine from all of them together.
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    for ema in ema_models.values():
        ema.to(accelerator.device)

    def layout_pipeline(model) -> LayoutDiffusionPipeline:
        # An analog model samples with DDIM by default; a d3pm one with its own schedule.
        sampler = DDIMScheduler.from_config(noise_scheduler.config) if args.layout_type == "analog" else noise_scheduler
        return LayoutDiffusionPipeline(
            unet=model,
            scheduler=sampler,
            class_names=dataset.class_names,
            domains=domains,
            ignore_index=ignore_index,
        )

    # Data and models are known good: only now is --output_dir made, so a refused run leaves no folder behind.
    training.make_output_dir(accelerator, args)
    global_step, first_epoch, skip_batches = training.resume_from_checkpoint(accelerator, args, updates_per_epoch)
    prior = class_prior(layouts, args, dataset.class_names, ignore_index, domains)
    if accelerator.is_main_process:
        training.write_run_files(
            args.output_dir,
            args,
            dataset.class_names,
            dataset.palette,
            train_samples=dataset.sample_names(),
            train_class_pixels=class_pixels,
            pipeline="layout_diffusion",
            domains=domains,
            unet_config=dict(training.unwrap_model(accelerator, unet).config),
        )
        write_json_atomic(Path(args.output_dir) / "class_prior.json", prior)
    training.init_trackers(accelerator, args, "train_layout_diffusion")

    loop = training.TrainingLoop(accelerator, args, unet, ema_models, lr_scheduler, hub_repo, global_step)
    model = training.unwrap_model(accelerator, unet)
    timestep_density = (args.logit_mean, args.logit_std) if args.timestep_sampling == "logit_normal" else None
    for batch in loop.batches(train_dataloader, sampler, first_epoch, skip_batches):
        with accelerator.accumulate(unet):
            generator = training.batch_generator(batch["seed"], accelerator.device)
            labels = batch["label"]
            if args.layout_type == "analog":
                clean = labels_to_analog(labels, num_classes, ignore_index)
                noise, timesteps = training.draw_noise(noise_scheduler, clean, generator, timestep_density)
                noised = clean
                if args.region_perturbation > 0:  # the noise goes on a map with one class grown; the target stays
                    grown = grow_one_class(
                        labels,
                        num_classes,
                        args.region_perturbation,
                        args.region_perturbation_radius,
                        generator,
                        ignore_index,
                    )
                    noised = labels_to_analog(grown, num_classes, ignore_index)
                noisy = noise_scheduler.add_noise(noised, noise, timesteps)
                targets = labels
            else:  # d3pm: mask pixels, learn the masked ones (the others are given)
                timesteps = training.draw_timesteps(noise_scheduler, len(labels), generator, timestep_density)
                tokens = noise_scheduler.add_noise(labels, timesteps, num_classes, generator)
                noisy = tokens_to_one_hot(tokens, num_classes)
                targets = torch.where(tokens == num_classes, labels, ignore_index)
            logits = unet(noisy, timesteps, batch["ratios"], batch["known"], batch["domain"]).sample
            loss = masked_cross_entropy(logits, targets, ignore_index)
            loop.check_loss(loss)

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)

        if loop.end_of_batch(loss, {"loss": loss.item()}):
            with loop.ema_weights():
                log_validation(layout_pipeline(model), args, accelerator, dataset, prior, loop.global_step)

    loop.finish(lambda model: layout_pipeline(model).save_pretrained(args.output_dir))


if __name__ == "__main__":
    with exit_on_bad_input():
        main(parse_args())
