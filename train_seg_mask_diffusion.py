#!/usr/bin/env python
"""Train a joint image + mask latent diffusion model on a segmentation dataset.

A Stable Diffusion UNet is widened from 4 to 5 latent channels: the image latent, plus the binary
mask of one class at latent resolution. The prompt names the class ("a remote sensing image and
mask of building"). After training, the model samples an image *and* the mask of the named class
together, which makes paired (image, mask) training data for segmentation models.

    accelerate launch train_seg_mask_diffusion.py \
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
      --data_root /path/to/LoveDA --dataset loveda --output_dir outputs/joint

The output folder is a pipeline: ``JointImageMaskPipeline.from_pretrained(output_dir)``, with
class_names.json and training_config.json beside it for generate_joint_image_mask_diffusion.py.
"""

import argparse

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel

from segdiff import check_min_diffusers_version, training
from segdiff.arguments import add_switch, finite_float, non_negative_float, positive_float, positive_int
from segdiff.data import JointTransform, add_dataset_args, dataset_from_args, exit_on_bad_input, limit_train_samples
from segdiff.geometry import vae_scale_factor
from segdiff.pipelines.joint import JointImageMaskPipeline, joint_noise_scheduler, pipeline_over_base
from segdiff.prompts import CLASS_PROMPT_TEMPLATE, class_prompt
from segdiff.visualize import overlay_mask

# Stops here, naming the upgrade, when the installed diffusers is older than this script needs.
check_min_diffusers_version()

logger = training.logger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    training.add_training_args(parser, default_resolution=512)
    add_dataset_args(parser, default_dataset="loveda")
    group = parser.add_argument_group("joint image + mask")
    group.add_argument(
        "--prompt_template",
        type=str,
        default=CLASS_PROMPT_TEMPLATE,
        help='Prompt for the selected class; {class_name} is replaced. Default: "%(default)s".',
    )
    add_switch(
        group,
        "sample_present_class",
        default=True,
        help="Pick the class of each sample among those present in its mask (default), or uniformly "
        "among all classes with --no_sample_present_class (then some masks are empty). ignore_index is never picked.",
    )
    group.add_argument(
        "--mask_loss_weight",
        type=non_negative_float,
        default=1.0,
        help="Weight of the mask channel's loss against the image's.",
    )
    group.add_argument(
        "--prompt_dropout",
        type=finite_float,
        default=0.1,
        help="Probability of training on the empty prompt, so generation can use classifier-free guidance.",
    )
    group.add_argument(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default="v_prediction",
        help="What the UNet predicts. v_prediction (default) is needed with --zero_terminal_snr; pass the base's own "
        "(epsilon for SD 1.x) with --no_zero_terminal_snr to keep its parametrisation.",
    )
    add_switch(
        group,
        "zero_terminal_snr",
        default=True,
        help="Rescale the noise schedule so the last timestep is pure noise (Lin et al. 2024), with trailing "
        "timesteps at sampling. On by default: SD's schedule leaks the mean of the clean latent into its noisiest "
        "step, the model learns to read the mask's extent from that leak, and at sampling (pure noise) masks "
        "come out as noise. Measured on the toy data (800 steps, trained text encoder): agreement IoU 0.27 -> 0.80.",
    )
    group.add_argument(
        "--snr_gamma",
        type=positive_float,
        default=None,
        help="Min-SNR loss weighting (Hang et al. 2023); 5.0 is the paper's value. Off by default.",
    )
    group.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Train the text encoder too (in fp32). For bases whose text encoder cannot tell the class names "
        "apart, such as the random tiny base of the demo; a real SD text encoder can stay frozen.",
    )
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every training image (and its mirror) with the VAE once and train from the cache. "
        "Implies center crops and no --random_affine.",
    )
    group.add_argument(
        "--num_validation_images", type=positive_int, default=8, help="Validation samples (one per class, in turn)."
    )
    args = parser.parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        parser.error("--pretrained_model_name_or_path is required (a Stable Diffusion folder)")
    if args.data_root is None:
        parser.error("--data_root is required")
    if not 0 <= args.prompt_dropout < 1:
        parser.error("--prompt_dropout must be in [0, 1)")
    if args.zero_terminal_snr and args.prediction_type == "epsilon":
        parser.error("--zero_terminal_snr needs --prediction_type v_prediction (epsilon is undefined at zero SNR)")
    if args.cache_latents and args.random_affine:
        parser.error("--cache_latents encodes each image once, so it cannot be combined with --random_affine")
    training.check_training_args(parser, args)
    training.check_base_resolution(args)  # the base's configs: before its weights load
    return args


# ------------------------------------------------------------------------------------------------
# The 5-channel UNet and the mask channel
# ------------------------------------------------------------------------------------------------


def widen_unet_for_mask(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Add one input and one output channel for the mask.

    The pretrained weights are kept for the image channels and the new ones start at zero, so at
    step 0 the image channels behave exactly as the base model and the mask output is 0.
    """
    if unet.config.in_channels != unet.config.out_channels:
        raise SystemExit(
            f"The base UNet has {unet.config.in_channels} input and {unet.config.out_channels} output channels; "
            "a text-to-image base (same number in and out) is needed."
        )
    channels = unet.config.in_channels

    def widened(conv: torch.nn.Conv2d, in_channels: int, out_channels: int) -> torch.nn.Conv2d:
        new = torch.nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[: conv.out_channels, : conv.in_channels] = conv.weight
            new.bias.zero_()
            new.bias[: conv.out_channels] = conv.bias
        return new

    unet.conv_in = widened(unet.conv_in, channels + 1, unet.conv_in.out_channels)
    unet.conv_out = widened(unet.conv_out, unet.conv_out.in_channels, channels + 1)
    unet.register_to_config(in_channels=channels + 1, out_channels=channels + 1)
    return unet


def pick_class(label: torch.Tensor, num_classes: int, ignore_index: int, present_only: bool, generator) -> int:
    """A class for this sample: among those present in its mask, or uniform. Never ignore_index."""
    if present_only:
        present = [c for c in torch.unique(label).tolist() if c != ignore_index and c < num_classes]
        if present:
            return present[torch.randint(len(present), (1,), generator=generator).item()]
    candidates = [c for c in range(num_classes) if c != ignore_index]
    return candidates[torch.randint(len(candidates), (1,), generator=generator).item()]


def class_mask_latents(labels: torch.Tensor, class_ids: torch.Tensor, size, ignore_index: int):
    """The mask channel and its loss weight at latent resolution.

    The binary mask of the class is area-downsampled to the latent grid and thresholded at one half,
    then mapped to {-1, 1} (-1: not the class, 1: the class), the value range of the image latents'
    noise. Latent cells that are mostly ignore_index get weight 0 in the mask loss: there is no truth
    to learn there.
    """
    labels = labels.long()
    is_class = (labels == class_ids.view(-1, 1, 1)).float().unsqueeze(1)
    is_ignored = (labels == ignore_index).float().unsqueeze(1)
    class_share = F.interpolate(is_class, size=size, mode="area")
    ignored_share = F.interpolate(is_ignored, size=size, mode="area")
    mask = torch.where(class_share > 0.5, 1.0, -1.0)
    weight = (ignored_share < 0.5).float()
    return mask, weight


def joint_loss(prediction, target, mask_weight, mask_loss_weight: float, snr_weights=None):
    """Image MSE + mask_loss_weight x mask MSE (over the cells with a truth), per sample, then averaged."""
    image_channels = prediction.shape[1] - 1
    image_error = (prediction[:, :image_channels].float() - target[:, :image_channels].float()) ** 2
    mask_error = (prediction[:, image_channels:].float() - target[:, image_channels:].float()) ** 2 * mask_weight
    image_loss = image_error.mean(dim=(1, 2, 3))
    mask_loss = mask_error.sum(dim=(1, 2, 3)) / mask_weight.sum(dim=(1, 2, 3)).clamp(min=1)
    loss = image_loss + mask_loss_weight * mask_loss
    if snr_weights is not None:
        loss = loss * snr_weights
    return loss.mean(), image_loss.mean().detach(), mask_loss.mean().detach()


class PromptEmbeddings:
    """Embeddings of the fixed prompt set: one prompt per class, and the empty prompt (last).

    The prompts are tokenized once. A frozen text encoder embeds them once too; a trained one embeds
    the batch's distinct prompts at every step, so its gradients flow.
    """

    def __init__(self, prompts, pipeline: JointImageMaskPipeline, text_encoder, trainable: bool, dtype):
        self.input_ids = pipeline.tokenize(prompts).to(text_encoder.device)
        self.text_encoder = text_encoder
        self.cached = None
        if not trainable:
            with torch.no_grad():
                self.cached = text_encoder(self.input_ids)[0].to(dtype)

    @property
    def empty_prompt(self) -> int:
        return len(self.input_ids) - 1

    def __call__(self, prompt_index: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[prompt_index]
        distinct, inverse = torch.unique(prompt_index, return_inverse=True)
        return self.text_encoder(self.input_ids[distinct])[0][inverse]


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def build_training_data(args, dataset, accelerator, vae, weight_dtype):
    """The per-sample processing: transform, class choice, prompt dropout, and (optionally) cached latents."""
    transform = JointTransform(
        args.resolution,
        center_crop=args.center_crop or args.cache_latents,
        random_flip=args.random_flip and not args.cache_latents,
        affine=args.random_affine,
        ignore_index=dataset.ignore_index,
    )
    # With the cache, each sample is its cached latents and label map (and their mirrors): no image is read again.
    samples = cache_dataset(dataset, transform, vae, accelerator, weight_dtype) if args.cache_latents else dataset

    def process(sample, generator):
        if args.cache_latents:
            flip = args.random_flip and torch.rand(1, generator=generator).item() < 0.5
            (mean, std), label = sample["latents"][int(flip)], sample["label"]
            example = {"latent_mean": mean, "latent_std": std, "label": label.flip(-1) if flip else label}
        else:
            pixel_values, label = transform(sample["image"], sample["label"])
            example = {"pixel_values": pixel_values, "label": label}
        example["class_id"] = pick_class(
            example["label"], dataset.num_classes, dataset.ignore_index, args.sample_present_class, generator
        )
        example["drop_prompt"] = torch.rand(1, generator=generator).item() < args.prompt_dropout
        return example

    def collate(examples):
        batch = {
            key: torch.stack([e[key] for e in examples]) for key in examples[0] if torch.is_tensor(examples[0][key])
        }
        for key in ("class_id", "drop_prompt", "seed"):
            batch[key] = torch.tensor([e[key] for e in examples])
        return batch

    return training.SeededDataset(samples, process), collate


def cache_dataset(dataset, transform, vae, accelerator, weight_dtype) -> list[dict]:
    """Every sample's centre crop, encoded once: ``{"latents": [(mean, std), mirror's], "label": label map}``.

    The transform is deterministic here (centre crop, no flip, no affine), so its label map is the same at
    every step and is kept too.
    """
    labels = []

    def pixels():
        for index in tqdm(range(len(dataset)), desc="Caching latents", disable=not accelerator.is_local_main_process):
            sample = dataset[index]
            pixel_values, label = transform(sample["image"], sample["label"])
            labels.append(label)
            yield pixel_values

    latents = training.encode_latent_distributions(pixels(), vae, accelerator, weight_dtype)
    return [{"latents": views, "label": label} for views, label in zip(latents, labels)]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def log_validation(pipeline_parts, args, accelerator, dataset, global_step):
    """One sample per class (in turn), shown as image | mask overlay, in a PNG grid and the trackers."""
    pipeline = JointImageMaskPipeline(**pipeline_parts).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    class_ids = [i % dataset.num_classes for i in range(args.num_validation_images)]
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    output = pipeline(
        class_ids,
        num_inference_steps=20,
        generator=generator,
        height=args.resolution.height,
        width=args.resolution.width,
    )
    tiles = []
    for image, mask, class_id in zip(output.images, output.masks, output.class_ids):
        tiles += [image, overlay_mask(image, mask, dataset.palette[class_id])]
    grid = make_image_grid(tiles, rows=len(class_ids), cols=2)
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

    # Models: the base's frozen VAE, its text encoder (frozen unless --train_text_encoder), its UNet widened.
    base = args.pretrained_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(
        base, subfolder="text_encoder", revision=args.revision, variant=args.variant
    )
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", revision=args.revision, variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", revision=args.revision, variant=args.variant)
    noise_scheduler = joint_noise_scheduler(base, args.prediction_type, args.zero_terminal_snr, args.revision)
    unet = widen_unet_for_mask(unet)
    # The saved pipeline's default size is the training size.
    unet.register_to_config(sample_size=(args.resolution // vae_scale_factor(vae.config)).config_value())
    vae.requires_grad_(False)
    text_encoder.requires_grad_(args.train_text_encoder)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=torch.float32 if args.train_text_encoder else weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    trained_models = {"unet": unet, **({"text_encoder": text_encoder} if args.train_text_encoder else {})}

    parts = dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config),
        class_names=dataset.class_names,
        prompt_template=args.prompt_template,
    )

    training.use_channels_last(args, unet, vae)
    ema_models = {}
    if args.use_ema:
        ema_models["unet_ema"] = training.make_ema(unet, args)
    training.register_checkpoint_hooks(accelerator, trained_models, ema_models)

    train_dataset, collate = build_training_data(args, dataset, accelerator, vae, weight_dtype)
    train_dataloader, sampler = training.make_train_dataloader(train_dataset, args, collate)
    parameters = [p for model in trained_models.values() for p in model.parameters()]
    optimizer = training.make_optimizer(args, parameters, accelerator)
    updates_per_epoch = training.plan_steps(args, train_dataloader, accelerator)
    lr_scheduler = training.make_lr_scheduler(args, optimizer, accelerator)
    # One prepare call, as in diffusers' examples: DeepSpeed builds its engine from all of them together. Only
    # trained models are prepared: DDP refuses a model without trainable parameters.
    if args.train_text_encoder:
        unet, text_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, train_dataloader, lr_scheduler
        )
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler
        )
    accumulated = [unet, text_encoder] if args.train_text_encoder else [unet]
    # The prompts are one per class plus the empty prompt: tokenized (and, when frozen, encoded) once.
    prompts = [class_prompt(name, args.prompt_template) for name in dataset.class_names] + [""]
    prompt_embeddings = PromptEmbeddings(
        prompts, JointImageMaskPipeline(**parts), text_encoder, args.train_text_encoder, weight_dtype
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
            pipeline="joint_image_mask",
        )
    training.init_trackers(accelerator, args, "train_seg_mask_diffusion")

    loop = training.TrainingLoop(accelerator, args, unet, ema_models, lr_scheduler, hub_repo, global_step)
    for batch in loop.batches(train_dataloader, sampler, first_epoch, skip_batches):
        with accelerator.accumulate(*accumulated):
            generator = training.batch_generator(batch["seed"], accelerator.device)

            # Clean joint latents: the image latent and the class mask channel.
            latents = training.image_latents(batch, vae, generator, weight_dtype)
            mask, mask_weight = class_mask_latents(
                batch["label"], batch["class_id"], latents.shape[-2:], dataset.ignore_index
            )
            clean = torch.cat([latents, mask], dim=1)

            # Forward diffusion, and the target of --prediction_type.
            noise, timesteps = training.draw_noise(noise_scheduler, clean, generator)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            target = training.prediction_target(noise_scheduler, clean, noise, timesteps)

            prompt_index = torch.where(batch["drop_prompt"], prompt_embeddings.empty_prompt, batch["class_id"])
            prediction = unet(noisy, timesteps, encoder_hidden_states=prompt_embeddings(prompt_index)).sample

            snr_weights = None
            if args.snr_gamma is not None:
                snr_weights = training.min_snr_weights(noise_scheduler, timesteps, args.snr_gamma)
            loss, image_loss, mask_loss = joint_loss(
                prediction, target, mask_weight, args.mask_loss_weight, snr_weights
            )
            loop.check_loss(loss)

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)

        logs = {"loss": loss.item(), "image_loss": image_loss.item(), "mask_loss": mask_loss.item()}
        if loop.end_of_batch(loss, logs):
            with loop.ema_weights():
                trained = {"unet": unet, "text_encoder": text_encoder}
                trained = {name: training.unwrap_model(accelerator, model) for name, model in trained.items()}
                log_validation({**parts, **trained}, args, accelerator, dataset, loop.global_step)

    def save(unet):
        """The pipeline, with the frozen parts reloaded in full precision."""
        pipeline = pipeline_over_base(
            base,
            unet,
            text_encoder=training.unwrap_model(accelerator, text_encoder) if args.train_text_encoder else None,
            prediction_type=args.prediction_type,
            zero_terminal_snr=args.zero_terminal_snr,
            class_names=dataset.class_names,
            prompt_template=args.prompt_template,
            revision=args.revision,
            variant=args.variant,
        )
        pipeline.save_pretrained(args.output_dir)

    loop.finish(save)


if __name__ == "__main__":
    with exit_on_bad_input():
        main(parse_args())
