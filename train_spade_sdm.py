#!/usr/bin/env python
"""Train a Semantic Diffusion Model (SDM, Wang et al. 2022): label map -> image, with a SPADE UNet.

The UNet's encoder sees only the noisy image; the label map enters the middle and the decoder through
SPADE normalisation (segdiff/models/spade_unet.py). `--conditioning concat` trains the latent-diffusion
variant instead (the one-hot map, projected by a learned 1x1 conv, concatenated to the input).
`--space pixel` is SDM's own; `--space latent` diffuses in the VAE latents of --pretrained_model_name_or_path.

Classifier-free guidance, SDM's recipe: train with --drop_rate 0, then fine-tune with --init_from the trained
folder, --drop_rate 0.2 and --learning_rate 2e-5, so the model also learns the null map (all zeros).

    accelerate launch --config_file configs/accelerate/8xa100_ddp.yaml train_spade_sdm.py \
      --data_root data/sidewalk_processed --dataset sidewalk --resolution 256 \
      --model_config configs/models/sdm_256.json --output_dir outputs/sdm --train_batch_size 2 --use_ema

Latent diffusion's recipe: --space latent --conditioning concat --loss_type l1 --beta_schedule scaled_linear
--beta_start 0.0015 --beta_end 0.0205 (configs/models/ldm_concat_semantic.json). --resolution 384,512 trains on
height x width rectangles.

Style reference (the landscape task): --style_reference adds a style encoder; each sample is trained with a
differently-augmented view of its own image (random crop, flips) as the reference, so the style vector carries
colours and lighting, not layout; --style_drop_rate drops it so sampling can guide on the style too.

The output folder is a pipeline: ``SemanticDiffusionPipeline.from_pretrained(output_dir)`` (EMA weights when
--use_ema), with class_names.json and training_config.json beside it for generate_spade_sdm.py.
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from diffusers.utils import make_image_grid
from PIL import Image

from segdiff import check_min_diffusers_version, training
from segdiff.arguments import add_switch, finite_float, non_negative_float, positive_int
from segdiff.data import (
    JointTransform,
    StyleReferenceView,
    add_dataset_args,
    dataset_from_args,
    exit_on_bad_input,
    limit_train_samples,
)
from segdiff.geometry import size_multiple, unet_downsampling, vae_scale_factor
from segdiff.labels import colorize_label
from segdiff.models.spade_unet import CONDITIONINGS, UNKNOWN_CLASS_MODES, SpadeUNetModel
from segdiff.pipelines.sdm import SemanticDiffusionPipeline, sdm_scheduler
from segdiff.runs import open_run, read_run_file

# Stops here, naming the upgrade, when the installed diffusers is older than this script needs.
check_min_diffusers_version()

logger = training.logger
CONFIGS = Path(__file__).resolve().parent / "configs" / "models"
# diffusers' beta schedules that this trainer offers (its "sigmoid" is GeoDiff's, for molecules).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    training.add_training_args(parser, default_resolution=256)
    add_dataset_args(parser, default_dataset="sidewalk")
    group = parser.add_argument_group("semantic diffusion model")
    group.add_argument(
        "--model_config",
        type=str,
        default=str(CONFIGS / "sdm_256.json"),
        help="SpadeUNetModel size, a JSON under configs/models/: sdm_tiny.json (tests, CPU demo), sdm_256.json and "
        "sdm_512.json (SDM's published models). num_classes, channels and sample size are set from the data and "
        "--space. Ignored with --init_from. Default: %(default)s",
    )
    group.add_argument(
        "--space",
        choices=["pixel", "latent"],
        default="pixel",
        help="Diffuse images (pixel, SDM) or the latents of the VAE of --pretrained_model_name_or_path (latent; "
        "label maps are resized, nearest, to the latent size). Default: %(default)s",
    )
    group.add_argument(
        "--conditioning",
        choices=CONDITIONINGS,
        default=None,
        help="spade (SDM: label map through SPADE norms in the decoder) or concat (LDM: the projected one-hot map "
        "concatenated to the input). Default: the --model_config's (spade in every shipped config).",
    )
    group.add_argument(
        "--drop_rate",
        type=finite_float,
        default=0.0,
        help="Probability of replacing a sample's whole label map by the null map (zeros), so that sampling can "
        "use classifier-free guidance. SDM: 0 for training, 0.2 for the fine-tune. Default: %(default)s",
    )
    group.add_argument(
        "--init_from",
        type=str,
        default=None,
        help="Start from a trained model: an output folder of this script, one of its checkpoint-N folders (its EMA "
        "weights when present), or a Hub repository id. The SDM fine-tune for guidance: --drop_rate 0.2 "
        "--learning_rate 2e-5.",
    )
    group.add_argument("--init_from_revision", default=None, help="The revision of a Hub --init_from.")
    add_switch(
        group,
        "edge_map",
        default=None,
        help="Add the label boundaries as one more input channel of the map (SDM uses instance edges; these are "
        "class boundaries). Default: the --model_config's.",
    )
    group.add_argument(
        "--unknown_class",
        choices=UNKNOWN_CLASS_MODES,
        default=None,
        help="How ignore_index pixels are encoded: zeros (no class: every one-hot channel 0, the model fills them "
        "freely) or channel (one more channel marks them). Default: the --model_config's (zeros).",
    )
    add_switch(
        group,
        "learn_sigma",
        default=None,
        help="Also learn the variance (improved DDPM's hybrid loss: MSE on the noise + the variational bound "
        "for the variance). Default: the --model_config's (on in sdm_256/512, as SDM).",
    )
    group.add_argument(
        "--loss_type",
        choices=training.LOSS_TYPES,
        default="l2",
        help="Loss on the predicted noise: l2 (mean squared error, SDM's) or l1 (mean absolute error, as latent "
        "diffusion's semantic-synthesis config and the landscape project trained). The learned-variance term "
        "is added to either. Default: %(default)s",
    )
    schedule = parser.add_argument_group(
        "noise schedule (saved with the pipeline, so generation samples with the same one)"
    )
    schedule.add_argument(
        "--beta_schedule",
        choices=BETA_SCHEDULES,
        default=None,
        help="How the 1000 betas go from --beta_start to --beta_end: linear (SDM's, guided-diffusion's), "
        "scaled_linear (linear in sqrt(beta): what latent diffusion's configs call \"linear\"; so LDM's "
        "linear_start 0.0015 / linear_end 0.0205 is --beta_schedule scaled_linear --beta_start 0.0015 --beta_end "
        "0.0205), squaredcos_cap_v2 (improved DDPM's cosine; ignores --beta_start/--beta_end). Default: linear, "
        "or the --init_from model's.",
    )
    schedule.add_argument(
        "--beta_start",
        type=finite_float,
        default=None,
        help="First beta. Default: 0.0001 (SDM), or the --init_from model's.",
    )
    schedule.add_argument(
        "--beta_end",
        type=finite_float,
        default=None,
        help="Last beta. Default: 0.02 (SDM), or the --init_from model's.",
    )
    group.add_argument(
        "--num_validation_images", type=positive_int, default=4, help="Validation masks (the first training masks)."
    )
    group.add_argument(
        "--validation_guidance_scale",
        type=non_negative_float,
        default=None,
        help="Guidance scale of the validation samples. Default: 1.5 with --drop_rate > 0, else 1 (no guidance).",
    )
    style = parser.add_argument_group("style reference (mask + reference image -> image)")
    style.add_argument(
        "--style_reference",
        action="store_true",
        help="Add a style encoder: a reference image's global style vector joins the timestep embedding "
        "(AdaGN). Trained with another random view (crop, flips) of the target image as the reference. With "
        "--init_from a model without one, the encoder is added (its output starts at zero).",
    )
    style.add_argument(
        "--style_drop_rate",
        type=finite_float,
        default=0.1,
        help="Probability of training a sample with the null style (no reference), drawn independently of "
        "--drop_rate, so generation can guide on the style (--style_scale). Default: %(default)s",
    )
    style.add_argument(
        "--style_channels", type=positive_int, default=32, help="Width of the style encoder's CNN. Default: %(default)s"
    )
    style.add_argument(
        "--style_resolution",
        type=positive_int,
        default=64,
        help="Side the reference images are resized to for the style encoder. Default: %(default)s",
    )
    style.add_argument(
        "--style_crop_scale",
        type=finite_float,
        default=0.25,
        help="Smallest share of the image area the reference view's random crop keeps. Default: %(default)s",
    )
    style.add_argument(
        "--style_offset_noise",
        type=non_negative_float,
        default=0.1,
        help="Offset noise for models with a style encoder: the training noise gets this much of one more random "
        "value per sample and channel, constant over the image. It hides the global colour of the noisy sample, "
        "so the model takes the colours from the reference instead of from the noise (without it the toy "
        "benchmark's themes are barely followed). 0 turns it off. Default: %(default)s",
    )
    args = parser.parse_args(argv)
    if args.data_root is None:
        parser.error("--data_root is required")
    if args.space == "latent" and args.pretrained_model_name_or_path is None:
        parser.error("--space latent needs --pretrained_model_name_or_path (a Stable Diffusion folder or a VAE folder)")
    if not 0 <= args.drop_rate < 1:
        parser.error("--drop_rate must be in [0, 1)")
    if not 0 <= args.style_drop_rate < 1:
        parser.error("--style_drop_rate must be in [0, 1)")
    if not 0 < args.style_crop_scale <= 1:
        parser.error("--style_crop_scale must be in (0, 1]")
    for name in ("beta_start", "beta_end"):
        value = getattr(args, name)
        if value is not None and not 0 < value < 1:
            parser.error(f"--{name} must be in (0, 1), got {value}")
    if args.beta_start is not None and args.beta_end is not None and args.beta_start >= args.beta_end:
        parser.error(f"--beta_start {args.beta_start} must be below --beta_end {args.beta_end}")
    if args.validation_guidance_scale is None:
        args.validation_guidance_scale = 1.5 if args.drop_rate > 0 else 1.0
    training.check_training_args(parser, args)
    check_model_resolution(args)
    return args


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def vae_subfolder(path: str) -> str | None:
    """Where the VAE of --pretrained_model_name_or_path is: vae/ of a Stable Diffusion folder, or a VAE folder itself."""
    return "vae" if not (Path(path) / "config.json").is_file() else None


def load_vae(path: str, args) -> AutoencoderKL:
    """The VAE of a Stable Diffusion folder, or a VAE folder itself."""
    return AutoencoderKL.from_pretrained(
        path, subfolder=vae_subfolder(path), revision=args.revision, variant=args.variant
    )


def check_model_resolution(args) -> None:
    """Refuse, from the configs alone (before any weights load or file is written), a --model_config of another
    model and a --resolution the model cannot take: a multiple of the VAE's factor (--space latent) times the
    UNet's downsampling."""
    if args.init_from is not None:
        run = open_run(args.init_from, flag="--init_from")
        run.require("spade_sdm")
        folder, subfolder = run.weights("unet")
        unet_config, source = SpadeUNetModel.load_config(folder, subfolder=subfolder), f"--init_from {args.init_from}"
    else:
        unet_config, source = training.read_model_config(args.model_config, SpadeUNetModel), args.model_config
    vae_config = None
    if args.space == "latent":
        subfolder = vae_subfolder(args.pretrained_model_name_or_path)
        vae_config = training.base_model_config(AutoencoderKL, args, subfolder)
    factor = vae_scale_factor(vae_config) if vae_config is not None else 1
    why = f"{args.space} space: VAE factor {factor} x the downsampling {unet_downsampling(unet_config)} of {source}"
    training.check_resolution(args.resolution, size_multiple(vae_config, unet_config), why)


def build_unet(args, num_classes: int, channels: int, sample_size: int | list[int]) -> SpadeUNetModel:
    """A new model from --model_config, or the --init_from one; checked against the data and --space."""
    overrides = {
        name: value
        for name, value in {
            "conditioning": args.conditioning,
            "use_edge_map": args.edge_map,
            "unknown_class": args.unknown_class,
            "learn_sigma": args.learn_sigma,
        }.items()
        if value is not None
    }
    style = {"style_channels": args.style_channels, "style_resolution": args.style_resolution}
    if args.init_from is None:
        if args.style_reference:
            overrides.update(style)
        config = training.read_model_config(args.model_config, SpadeUNetModel)
        size = {
            "num_classes": num_classes,
            "in_channels": channels,
            "out_channels": channels,
            "sample_size": sample_size,
        }
        return SpadeUNetModel.from_config({**config, **size, **overrides})

    run = open_run(args.init_from, flag="--init_from", revision=args.init_from_revision)
    run.require("spade_sdm")
    unet = run.load_model(SpadeUNetModel, "unet")  # a checkpoint's EMA weights when kept
    config = unet.config
    conflicts = [
        f"{name}={value} (the model has {config[name]})" for name, value in overrides.items() if config[name] != value
    ]
    if config.num_classes != num_classes:
        conflicts.append(f"{num_classes} classes in the data (the model has {config.num_classes})")
    if config.in_channels != channels:
        conflicts.append(f"--space {args.space} with {channels} channels (the model takes {config.in_channels})")
    if conflicts:
        raise SystemExit(f"--init_from {run.folder} does not match this run: {'; '.join(conflicts)}.")
    logger.info(f"Initialised from {args.init_from}")
    if args.style_reference and unet.style_encoder is None:
        unet = with_style_encoder(unet, **style)
        logger.info("Added a style encoder to it (its output starts at zero: the model's predictions are unchanged)")
    return unet


def with_style_encoder(unet: SpadeUNetModel, **style_config) -> SpadeUNetModel:
    """The same model with a new style encoder: every trained weight copied, the encoder's output at zero."""
    # keyword overrides, not a merged dict: diffusers resets the keys listed in `_use_default_values`
    extended = SpadeUNetModel.from_config(unet.config, **style_config)
    missing, unexpected = extended.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not key.startswith("style_encoder.") for key in missing):
        raise RuntimeError(f"cannot extend the model: missing {missing}, unexpected {unexpected}")
    return extended


def noise_schedule(args, learn_sigma: bool, pixel_space: bool) -> DDPMScheduler:
    """SDM's training scheduler (`sdm_scheduler`: epsilon, variance type, clipping) with this run's betas.

    Each of --beta_schedule/--beta_start/--beta_end not given comes from the --init_from model's saved
    scheduler, so the guidance fine-tune keeps the schedule its model was trained with, else from SDM's.
    The pipeline saves this scheduler's config, and the generator builds every scheduler from it.
    """
    scheduler = sdm_scheduler(learn_sigma=learn_sigma, pixel_space=pixel_space)
    trained_with = init_from_schedule(args.init_from, args.init_from_revision) if args.init_from else {}
    betas = {}
    for name in ("beta_schedule", "beta_start", "beta_end"):
        value = getattr(args, name)
        betas[name] = value if value is not None else trained_with.get(name, scheduler.config[name])
    if betas["beta_start"] >= betas["beta_end"]:
        raise SystemExit(
            f"The noise schedule's beta_start {betas['beta_start']} must be below its beta_end {betas['beta_end']} "
            "(one of them from the flags, the other from the defaults or the --init_from model): pass both."
        )
    # Keyword overrides, not a merged dict: diffusers resets the keys listed in `_use_default_values`.
    return DDPMScheduler.from_config(scheduler.config, **betas)


def init_from_schedule(init_from: str, revision: str | None) -> dict:
    """The betas the --init_from model was trained with: its run's pipeline's scheduler config; empty when there is
    none (a run still in training has no pipeline yet)."""
    path = open_run(init_from, flag="--init_from", revision=revision).run_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    config = read_run_file(path)
    return {name: config[name] for name in ("beta_schedule", "beta_start", "beta_end") if name in config}


# ------------------------------------------------------------------------------------------------
# Learned variance: the variational-bound term of improved DDPM's hybrid loss
# ------------------------------------------------------------------------------------------------


def variational_bound(scheduler, clean, noisy, timesteps, predicted_noise, variance_values, pixel_space: bool):
    """Per-sample L_vlb (bits per dimension) for a model that learns its variance (Nichol & Dhariwal 2021).

    The model's variance interpolates, in log space, between the posterior variance (clipped at t=0) and
    beta_t by ``(v + 1) / 2``, as the scheduler's "learned_range" samples it. The mean comes from the
    predicted noise with its gradient stopped: this term trains the variance only, the MSE trains the mean.
    At t = 0 the term is the decoder's negative log-likelihood of the clean sample (discretised to 256 levels
    for images, a plain Gaussian density for latents).
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(clean.device, torch.float64)
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    betas = 1 - alphas_cumprod / previous
    posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
    posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))

    def at_t(values):
        return values[timesteps].float().view(-1, 1, 1, 1)

    coef_clean = at_t(betas * previous.sqrt() / (1 - alphas_cumprod))
    coef_noisy = at_t((1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod))
    true_mean = coef_clean * clean + coef_noisy * noisy
    true_log_variance = at_t(posterior_log_variance)

    predicted_clean = (noisy - at_t((1 - alphas_cumprod).sqrt()) * predicted_noise.detach()) / at_t(
        alphas_cumprod.sqrt()
    )
    model_mean = coef_clean * predicted_clean + coef_noisy * noisy
    fraction = (variance_values.float() + 1) / 2
    model_log_variance = fraction * at_t(betas.log()) + (1 - fraction) * true_log_variance

    kl = 0.5 * (
        -1.0
        + model_log_variance
        - true_log_variance
        + torch.exp(true_log_variance - model_log_variance)
        + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance)
    )
    if pixel_space:
        decoder_nll = -discretized_gaussian_log_likelihood(clean, model_mean, model_log_variance)
    else:
        decoder_nll = 0.5 * (
            math.log(2 * math.pi) + model_log_variance + (clean - model_mean) ** 2 * torch.exp(-model_log_variance)
        )
    per_dimension = torch.where(timesteps.view(-1, 1, 1, 1) == 0, decoder_nll, kl)
    return per_dimension.mean(dim=(1, 2, 3)) / math.log(2.0)


def discretized_gaussian_log_likelihood(x, mean, log_variance):
    """log p(x) of images in [-1, 1] quantised to 256 levels under N(mean, exp(log_variance)), per pixel."""
    inverse_std = torch.exp(-0.5 * log_variance)
    centered = x - mean
    cdf_plus = torch.special.ndtr(inverse_std * (centered + 1 / 255))
    cdf_minus = torch.special.ndtr(inverse_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # the lowest level takes all mass below it
    log_one_minus_cdf_minus = torch.log((1 - cdf_minus).clamp(min=1e-12))  # the highest, all above
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


# ------------------------------------------------------------------------------------------------
# Data and validation
# ------------------------------------------------------------------------------------------------


def build_training_data(args, dataset, style_resolution: int | None = None):
    """Per sample: the shared joint transform, and whether its label map is dropped (replaced by the null map).

    With a style encoder (``style_resolution``), also the reference: another random view of the same image,
    and whether that is dropped (the null style).
    """
    transform = JointTransform(
        args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        affine=args.random_affine,
        ignore_index=dataset.ignore_index,
    )
    reference_view = None
    if style_resolution:
        reference_view = StyleReferenceView(style_resolution, min_crop_scale=args.style_crop_scale)

    def process(sample, generator):
        pixel_values, label = transform(sample["image"], sample["label"])
        drop = torch.rand(1, generator=generator).item() < args.drop_rate
        example = {"pixel_values": pixel_values, "label": label, "drop_label": drop}
        if reference_view is not None:
            example["style_reference"] = reference_view(sample["image"])
            example["drop_style"] = torch.rand(1, generator=generator).item() < args.style_drop_rate
        return example

    def collate(examples):
        batch = {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "label": torch.stack([e["label"] for e in examples]),
            "drop_label": torch.tensor([e["drop_label"] for e in examples]),
            "seed": torch.tensor([e["seed"] for e in examples]),
        }
        if reference_view is not None:
            batch["style_reference"] = torch.stack([e["style_reference"] for e in examples])
            batch["drop_style"] = torch.tensor([e["drop_style"] for e in examples])
        return batch

    return training.SeededDataset(dataset, process), collate


def validation_examples(args, dataset):
    """The first --num_validation_images masks, center-cropped, with their real images."""
    transform = JointTransform(args.resolution, center_crop=True, random_flip=False, ignore_index=dataset.ignore_index)
    count = min(args.num_validation_images, len(dataset))
    examples = [transform(dataset[i]["image"], dataset[i]["label"]) for i in range(count)]
    return [pixels for pixels, _ in examples], [label for _, label in examples]


def log_validation(pipeline, args, accelerator, dataset, examples, global_step):
    """A grid with one row per validation mask: colourised mask | real image | generated image."""
    pipeline.set_progress_bar_config(disable=True)
    real_images, labels = examples
    # A style model gets each mask's own real image as its reference.
    references = [(pixels + 1) / 2 for pixels in real_images] if pipeline.unet.style_encoder is not None else None
    height, width = args.resolution
    output = pipeline(
        labels,
        style_images=references,
        guidance_scale=args.validation_guidance_scale,
        num_inference_steps=20,
        generator=torch.Generator().manual_seed(args.seed),
        height=height,
        width=width,
    )
    tiles = []
    for pixels, label, generated in zip(real_images, labels, output.images):
        real = Image.fromarray(((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        tiles += [colorize_label(label.numpy(), dataset.palette, dataset.ignore_index), real, generated]
    grid = make_image_grid(tiles, rows=len(labels), cols=3)
    training.log_validation_images(accelerator, grid, global_step, "validation", args.output_dir)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(args):
    accelerator = training.make_accelerator(args)
    hub_repo = training.create_hub_repo(accelerator, args)  # --push_to_hub: fail now, not after training
    weight_dtype = training.weight_dtype_for(accelerator)
    dataset = limit_train_samples(dataset_from_args(args), args.max_train_samples)
    # Bad pairs stop the run here, before a model loads.
    class_pixels = training.check_training_data(accelerator, dataset)
    logger.info(f"{len(dataset)} training pairs, {dataset.num_classes} classes: {dataset.class_names}")

    # The space: pixels, or the latents of the base's frozen VAE.
    vae = None
    channels, factor = 3, 1
    if args.space == "latent":
        vae = load_vae(args.pretrained_model_name_or_path, args)
        vae.requires_grad_(False)
        vae.to(accelerator.device, dtype=weight_dtype)
        channels, factor = vae.config.latent_channels, vae_scale_factor(vae.config)

    # The pipeline's default output size (parse_args checked that the model can take it).
    unet = build_unet(args, dataset.num_classes, channels, (args.resolution // factor).config_value())
    logger.info(
        f"SpadeUNetModel: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
        f"{unet.config.conditioning} conditioning, {args.space} space, learn_sigma={unet.config.learn_sigma}"
    )
    noise_scheduler = noise_schedule(args, learn_sigma=unet.config.learn_sigma, pixel_space=vae is None)
    logger.info(
        f"Noise schedule: {noise_scheduler.config.beta_schedule} betas from {noise_scheduler.config.beta_start} "
        f"to {noise_scheduler.config.beta_end}, {args.loss_type} loss on the noise"
    )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    training.use_channels_last(args, unet, vae)
    ema_models = {}
    if args.use_ema:
        ema_models["unet_ema"] = training.make_ema(unet, args)
    training.register_checkpoint_hooks(accelerator, {"unet": unet}, ema_models)

    style_resolution = unet.config.style_resolution if unet.style_encoder is not None else None
    train_dataset, collate = build_training_data(args, dataset, style_resolution)
    train_dataloader, scheduler = training.make_train_dataloader(train_dataset, args, collate)
    optimizer = training.make_optimizer(args, unet.parameters(), accelerator)
    updates_per_epoch = training.plan_steps(args, train_dataloader, accelerator)
    lr_scheduler = training.make_lr_scheduler(args, optimizer, accelerator)
    # One prepare call, as in diffusers' examples: DeepSpeed builds its engine from all of them together.
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    for ema in ema_models.values():
        ema.to(accelerator.device)

    # Data and models are known good: only now is --output_dir made, so a refused run leaves no folder behind.
    training.make_output_dir(accelerator, args)
    global_step, first_epoch, skip_batches = training.resume_from_checkpoint(accelerator, args, updates_per_epoch)
    if accelerator.is_main_process:
        training.write_run_files(
            args.output_dir,
            args,
            dataset.class_names,
            dataset.palette,
            train_samples=dataset.sample_names(),
            train_class_pixels=class_pixels,
            pipeline="spade_sdm",
            unet_config=dict(training.unwrap_model(accelerator, unet).config),
        )
    training.init_trackers(accelerator, args, "train_spade_sdm")
    validation = validation_examples(args, dataset) if accelerator.is_main_process and args.validation_steps else None

    loop = training.TrainingLoop(accelerator, args, unet, ema_models, lr_scheduler, hub_repo, global_step)
    model = training.unwrap_model(accelerator, unet)
    for batch in loop.batches(train_dataloader, scheduler, first_epoch, skip_batches):
        with accelerator.accumulate(unet):
            generator = training.batch_generator(batch["seed"], accelerator.device)

            # The clean sample: the image itself, or its VAE latent.
            if vae is None:
                clean = batch["pixel_values"]
            else:
                clean = training.image_latents(batch, vae, generator, weight_dtype)

            # The label map at the sample's size; dropped samples get the null map (all zeros).
            segmentation = model.encode_segmentation(
                batch["label"], size=clean.shape[-2:], ignore_index=dataset.ignore_index
            )
            segmentation = segmentation * (~batch["drop_label"]).to(segmentation.dtype).view(-1, 1, 1, 1)

            noise, timesteps = training.draw_noise(noise_scheduler, clean, generator)
            if model.style_encoder is not None and args.style_offset_noise:
                # Offset noise (drawn after the timesteps, which stay those of a run without it): a constant per
                # sample and channel. Otherwise the global colour of a noisy sample still shows through at high
                # noise, the model learns to read it there, and at sampling it follows the colour of the starting
                # noise rather than the reference's.
                offset = torch.randn((*clean.shape[:2], 1, 1), generator=generator, device=clean.device)
                noise = noise + args.style_offset_noise * offset
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            # The reference's style vector (zero for samples whose style is dropped) joins the timestep's.
            style = batch.get("style_reference")
            output = unet(noisy, timesteps, segmentation, style=style, drop_style=batch.get("drop_style")).sample
            predicted_noise, variance_values = output, None
            if model.config.learn_sigma:
                predicted_noise, variance_values = output.chunk(2, dim=1)

            noise_loss = training.noise_prediction_loss(predicted_noise, noise, args.loss_type)
            loss = noise_loss
            if variance_values is not None:
                loss = loss + variational_bound(
                    noise_scheduler, clean, noisy, timesteps, predicted_noise, variance_values, vae is None
                )
            loss = loss.mean()
            loop.check_loss(loss)

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)

        # the noise term under its own name ("mse" for l2, as before; "l1"), apart from the learned-variance term
        logs = {"loss": loss.item(), "mse" if args.loss_type == "l2" else "l1": noise_loss.mean().item()}
        if loop.end_of_batch(loss, logs):
            with loop.ema_weights():
                pipeline = SemanticDiffusionPipeline(
                    unet=model,
                    scheduler=DDIMScheduler.from_config(noise_scheduler.config),
                    vae=vae,
                    class_names=dataset.class_names,
                    ignore_index=dataset.ignore_index,
                )
                log_validation(pipeline, args, accelerator, dataset, validation, loop.global_step)

    def save(model):
        """The pipeline, the VAE reloaded in full precision."""
        pipeline = SemanticDiffusionPipeline(
            unet=model,
            scheduler=noise_scheduler,
            vae=load_vae(args.pretrained_model_name_or_path, args) if vae is not None else None,
            class_names=dataset.class_names,
            ignore_index=dataset.ignore_index,
        )
        pipeline.save_pretrained(args.output_dir)

    loop.finish(save)


if __name__ == "__main__":
    with exit_on_bad_input():
        main(parse_args())
