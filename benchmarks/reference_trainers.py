#!/usr/bin/env python
"""The plain training loops our trainers are measured against, written the way the diffusers examples are.

    accelerate launch benchmarks/reference_trainers.py controlnet --base BASE --data CSV_FOLDER --output_dir OUT
    accelerate launch benchmarks/reference_trainers.py joint --base BASE --data GENERIC_FOLDER --output_dir OUT

`controlnet` follows diffusers' examples/controlnet/train_controlnet.py: a metadata.csv of (image,
conditioning_image, text) rows, torchvision transforms per sample, captions tokenized in the data pipeline,
and at every step the VAE encodes the images and the text encoder the captions. `joint` is the same loop for
the SyntheticGen joint model (reference 000): a 5-channel UNet (4 image + 1 mask latent channels), the
prompt naming one class present in the mask, the mask of that class resized to the latent grid.

Nothing is cached, which is the point: these are the per-step costs a user of those examples pays. The
objective is the same as our trainers' (epsilon MSE on SD's schedule for ControlNet; image + mask MSE for the
joint model), so their losses are comparable. Each run writes train_stats.json like our trainers do:
samples/s from the second optimizer step on, and the mean loss over the timed steps.

This file is a benchmark fixture, not a tool: use train_controlnet_seg.py / train_seg_mask_diffusion.py.
"""

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from transformers import AutoTokenizer, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segdiff.geometry import conditioning_channels_for, vae_scale_factor  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loop", choices=["controlnet", "joint"])
    parser.add_argument("--base", required=True, help="A Stable-Diffusion-format folder.")
    parser.add_argument("--data", required=True, help="controlnet: a metadata.csv folder; joint: images/ + masks/.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=20)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--prompt_template", default="a remote sensing image and mask of {class_name}")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------
# Data, as the examples load it: PIL images through torchvision transforms, captions tokenized per sample.


def resized_and_cropped(resolution: int, interpolation: str, *to_tensor) -> transforms.Compose:
    """Short side to ``resolution``, centre crop, then ``to_tensor`` (the examples' transforms without flips)."""
    mode = transforms.InterpolationMode[interpolation]
    return transforms.Compose(
        [transforms.Resize(resolution, interpolation=mode), transforms.CenterCrop(resolution), *to_tensor]
    )


def image_transforms(resolution: int) -> transforms.Compose:
    return resized_and_cropped(resolution, "BILINEAR", transforms.ToTensor(), transforms.Normalize([0.5], [0.5]))


def tokenize(tokenizer, caption: str) -> torch.Tensor:
    return tokenizer(
        caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids[0]


class ControlNetRows(Dataset):
    """metadata.csv rows: image, conditioning_image, text."""

    def __init__(self, folder: str, resolution: int, tokenizer):
        self.folder = Path(folder)
        with open(self.folder / "metadata.csv", newline="") as file:
            self.rows = list(csv.DictReader(file))
        self.images = image_transforms(resolution)
        self.conditioning = resized_and_cropped(resolution, "BILINEAR", transforms.ToTensor())
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        image = Image.open(self.folder / row["image"]).convert("RGB")
        conditioning = Image.open(self.folder / row["conditioning_image"]).convert("RGB")
        return {
            "pixel_values": self.images(image),
            "conditioning_pixel_values": self.conditioning(conditioning),
            "input_ids": tokenize(self.tokenizer, row["text"]),
        }


class JointRows(Dataset):
    """images/ + masks/ by stem; each sample names one class present in its mask (not 255, the ignore id)."""

    def __init__(self, folder: str, resolution: int, tokenizer, prompt_template: str):
        self.folder = Path(folder)
        self.stems = sorted(path.stem for path in (self.folder / "images").iterdir())
        self.class_names = json.loads((self.folder / "class_names.json").read_text())
        if isinstance(self.class_names, dict):
            self.class_names = self.class_names["class_names"]
        self.images = image_transforms(resolution)
        self.masks = resized_and_cropped(resolution, "NEAREST", transforms.PILToTensor())
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> dict:
        stem = self.stems[index]
        image = Image.open(next((self.folder / "images").glob(f"{stem}.*"))).convert("RGB")
        mask = self.masks(Image.open(next((self.folder / "masks").glob(f"{stem}.*"))))[0].long()
        present = [c for c in mask.unique().tolist() if c != 255 and c < len(self.class_names)]
        class_id = random.choice(present)
        caption = self.prompt_template.format(class_name=self.class_names[class_id])
        return {
            "pixel_values": self.images(image),
            "class_mask": (mask == class_id).float()[None],
            "input_ids": tokenize(self.tokenizer, caption),
        }


def collate(examples: list[dict]) -> dict:
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


# ------------------------------------------------------------------------------------------------
# Models


def widened_for_mask(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """One more input and output channel (the mask), new weights zero, the image channels as pretrained."""
    channels = unet.config.in_channels
    conv_in, conv_out = unet.conv_in, unet.conv_out
    unet.conv_in = torch.nn.Conv2d(channels + 1, conv_in.out_channels, conv_in.kernel_size, padding=conv_in.padding)
    unet.conv_out = torch.nn.Conv2d(conv_out.in_channels, channels + 1, conv_out.kernel_size, padding=conv_out.padding)
    with torch.no_grad():
        for new, old in ((unet.conv_in, conv_in), (unet.conv_out, conv_out)):
            new.weight.zero_()
            new.bias.zero_()
            new.weight[: old.out_channels, : old.in_channels] = old.weight
            new.bias[: old.out_channels] = old.bias
    unet.register_to_config(in_channels=channels + 1, out_channels=channels + 1)
    return unet


# ------------------------------------------------------------------------------------------------
# The loops


def controlnet_loss(batch, models, noise_scheduler) -> torch.Tensor:
    vae, text_encoder, unet, controlnet = models["vae"], models["text_encoder"], models["unet"], models["trained"]
    latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
    down_block_res_samples, mid_block_res_sample = controlnet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=batch["conditioning_pixel_values"],
        return_dict=False,
    )
    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        down_block_additional_residuals=down_block_res_samples,
        mid_block_additional_residual=mid_block_res_sample,
        return_dict=False,
    )[0]
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")


def joint_loss(batch, models, noise_scheduler) -> torch.Tensor:
    vae, text_encoder, unet = models["vae"], models["text_encoder"], models["trained"]
    image_latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
    mask_latents = F.interpolate(batch["class_mask"], size=image_latents.shape[-2:], mode="nearest") * 2 - 1
    latents = torch.cat([image_latents, mask_latents], dim=1)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    image_loss = F.mse_loss(model_pred[:, :-1].float(), noise[:, :-1].float())
    mask_loss = F.mse_loss(model_pred[:, -1:].float(), noise[:, -1:].float())
    return image_loss + mask_loss


def peak_memory_bytes() -> int:
    """As segdiff.training.ThroughputMeter: CUDA allocated on a GPU, the process's max RSS on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(args):
    accelerator = Accelerator()
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(args.base, subfolder="scheduler")

    if args.loop == "controlnet":
        # The example's ControlNet, its conditioning embedding sized for the base's VAE factor (8 for SD, where this
        # is diffusers' default; 2 for the tiny test base), as train_controlnet_seg.py sizes it.
        channels = conditioning_channels_for(vae_scale_factor(vae.config))
        trained = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
        frozen = (vae, unet, text_encoder)
        dataset = ControlNetRows(args.data, args.resolution, tokenizer)
        compute_loss = controlnet_loss
    else:
        trained = unet = widened_for_mask(unet)
        frozen = (vae, text_encoder)
        dataset = JointRows(args.data, args.resolution, tokenizer, args.prompt_template)
        compute_loss = joint_loss
    for model in frozen:
        model.requires_grad_(False)
        model.to(accelerator.device)
    trained.train()

    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    dataloader = DataLoader(dataset, shuffle=True, collate_fn=collate, batch_size=args.train_batch_size)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    trained, optimizer, dataloader, lr_scheduler = accelerator.prepare(trained, optimizer, dataloader, lr_scheduler)
    models = {"vae": vae, "text_encoder": text_encoder, "unet": unet, "trained": trained}

    step, start, losses = 0, None, []
    while step < args.max_train_steps:
        for batch in dataloader:
            with accelerator.accumulate(trained):
                loss = compute_loss(batch, models, noise_scheduler)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step += 1
            if start is None:  # timed from the second step, as segdiff.training.ThroughputMeter
                start = time.perf_counter()
            else:
                losses.append(loss.item())
            if step >= args.max_train_steps:
                break
    elapsed = time.perf_counter() - start
    stats = {
        "train_samples_per_second": round(len(losses) * args.train_batch_size / elapsed, 2),
        "mean_loss": round(float(np.mean(losses)), 4),
        "peak_memory_mb": round(peak_memory_bytes() / 2**20, 1),
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "train_stats.json").write_text(json.dumps(stats, indent=2))
    print(stats)


if __name__ == "__main__":
    main(parse_args())
