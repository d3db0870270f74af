"""JointImageMaskPipeline: sample an image and the binary mask of one class together.

The UNet of a Stable Diffusion base is widened to ``latent_channels + 1`` input and output channels:
the VAE latent of the image, plus one channel holding the class mask at latent resolution, in
{-1, 1} (-1 = not the class, 1 = the class). Both are denoised together, prompted by the class name
("a remote sensing image and mask of building"), so the mask is the model's own segmentation of
the image it draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer

from segdiff.geometry import ImageSize, check_size_multiple, size_multiple, vae_scale_factor
from segdiff.pipelines.remote_code import RemoteCodePipeline
from segdiff.prompts import CLASS_PROMPT_TEMPLATE, class_prompt
from segdiff.schedulers import prepare_extra_step_kwargs


@dataclass
class JointImageMaskPipelineOutput(BaseOutput):
    """``images``: PIL images or an array (N, H, W, 3) in [0, 1]; ``masks``: bool arrays (N, H, W);
    ``class_ids`` and ``prompts``: what each sample was generated for."""

    images: list[Image.Image] | np.ndarray
    masks: np.ndarray
    class_ids: list[int]
    prompts: list[str]


def joint_noise_scheduler(base, prediction_type: str, zero_terminal_snr: bool, revision=None) -> DDPMScheduler:
    """The training schedule of train_seg_mask_diffusion.py: the base's betas, with the run's parametrisation.

    Zero terminal SNR rescales the betas so that the noisiest step holds no trace of the clean latent, and spaces
    sampling timesteps "trailing" so that sampling starts at that step (see the README's joint section).
    """
    schedule = {"prediction_type": prediction_type}
    if zero_terminal_snr:
        schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=revision, **schedule)


def pipeline_over_base(
    base,
    unet: UNet2DConditionModel,
    *,
    text_encoder: CLIPTextModel | None,
    prediction_type: str,
    zero_terminal_snr: bool,
    class_names: list[str],
    prompt_template: str,
    revision=None,
    variant=None,
) -> JointImageMaskPipeline:
    """A trained joint UNet (and text encoder, when it was trained; None: the base's) over the frozen VAE and
    tokenizer of ``base``, sampling with DDIM on the run's training schedule: what train_seg_mask_diffusion.py
    saves, and what the generator rebuilds from a checkpoint-N/ folder. ``variant`` picks the base's weights file
    (e.g. fp16), as in training: a base may hold only that variant."""
    schedule = joint_noise_scheduler(base, prediction_type, zero_terminal_snr, revision)
    return JointImageMaskPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", revision=revision, variant=variant),
        text_encoder=text_encoder
        or CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=revision, variant=variant),
        tokenizer=AutoTokenizer.from_pretrained(base, subfolder="tokenizer", revision=revision),
        unet=unet,
        scheduler=DDIMScheduler.from_config(schedule.config),
        class_names=class_names,
        prompt_template=prompt_template,
    )


class JointImageMaskPipeline(RemoteCodePipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        class_names: list[str] | None = None,
        prompt_template: str = CLASS_PROMPT_TEMPLATE,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names or []), prompt_template=prompt_template)
        self.vae_scale_factor = vae_scale_factor(vae.config)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def image_latent_channels(self) -> int:
        return self.unet.config.in_channels - 1

    def resolve_class_ids(self, classes) -> list[int]:
        """Class ids from ids or names; a clear error for anything the model was not trained on."""
        names = self.class_names
        ids = []
        for item in classes if isinstance(classes, list | tuple) else [classes]:
            if isinstance(item, str) and not item.isdigit():
                if item not in names:
                    raise ValueError(f"unknown class name {item!r}; this model knows {names}")
                ids.append(names.index(item))
                continue
            class_id = int(item)
            if not 0 <= class_id < len(names):
                raise ValueError(
                    f"class id {class_id} is out of range: this model has {len(names)} classes "
                    f"(0..{len(names) - 1}: {', '.join(names)})"
                )
            ids.append(class_id)
        return ids

    def check_size(self, height: int, width: int) -> None:
        """The UNet halves the latent once per down block; the VAE divides by its own factor."""
        why = f"VAE factor {self.vae_scale_factor} x UNet downsampling; trained at {self.default_size} px"
        check_size_multiple(ImageSize(height, width), size_multiple(self.vae.config, self.unet.config), why)

    @property
    def default_size(self) -> ImageSize:
        """(height, width) of the images the model was trained on."""
        return ImageSize.of(self.unet.config.sample_size) * self.vae_scale_factor

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids, padded to the tokenizer's full length as the text encoder was trained."""
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenize(prompts).to(self.text_encoder.device))[0]

    def mask_from_latent(self, mask_latent: torch.Tensor, height: int, width: int) -> np.ndarray:
        """The mask channel, upsampled to image size and thresholded at 0 (the middle of {-1, 1})."""
        upsampled = F.interpolate(mask_latent.float(), size=(height, width), mode="bilinear", align_corners=False)
        return (upsampled[:, 0] > 0).cpu().numpy()

    @torch.no_grad()
    def __call__(
        self,
        class_ids: int | str | list = 0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
    ):
        """Generate ``num_images_per_prompt`` (image, mask) pairs for each class in ``class_ids``.

        ``class_ids``: a class id, a class name, or a list of them. ``guidance_scale`` > 1 uses
        classifier-free guidance against the empty prompt (the model must have been trained with
        ``--prompt_dropout`` for it to mean anything). ``output_type``: "pil", "np" or "latent".
        ``eta``: DDIM's share of fresh noise per step (0: deterministic, 1: as much as DDPM), passed to schedulers
        whose step takes one (as diffusers' pipelines do); a non-zero eta for another scheduler is an error.
        """
        # 1. What to generate
        ids = [i for i in self.resolve_class_ids(class_ids) for _ in range(num_images_per_prompt)]
        prompts = [class_prompt(self.class_names[i], self.config.prompt_template) for i in ids]
        height = height or self.default_size[0]
        width = width or self.default_size[1]
        self.check_size(height, width)
        device = self._execution_device
        do_guidance = guidance_scale > 1.0

        # 2. Prompts: the class prompts, and the empty prompt for guidance
        prompt_embeds = self.encode_prompts(prompts)
        if do_guidance:
            empty = self.encode_prompts([""]).expand(len(prompts), -1, -1)
            prompt_embeds = torch.cat([empty, prompt_embeds])

        # 3. Start from noise in the joint latent space (image latent channels + 1 mask channel)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (
            len(ids),
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != len(ids):
            raise ValueError(f"got {len(generator)} generators for {len(ids)} samples: pass one per sample, or one")
        if latents is None:
            # On the CPU, so a seed gives the same sample on any device; one generator per sample is allowed.
            latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        latents = latents.to(device=device, dtype=self.unet.dtype) * self.scheduler.init_noise_sigma

        # 4. Denoise image and mask together; stochastic steps draw their noise from the same generator(s)
        step_kwargs = prepare_extra_step_kwargs(self.scheduler, generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = self.unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
            if do_guidance:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample

        # 5. Split: the image latent goes through the VAE, the mask channel is thresholded
        image_latents, mask_latent = latents[:, : self.image_latent_channels], latents[:, self.image_latent_channels :]
        masks = self.mask_from_latent(mask_latent, height, width)
        if output_type == "latent":
            images = image_latents
        else:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            image_latents = image_latents / self.vae.config.scaling_factor + shift
            decoded = self.vae.decode(image_latents.to(self.vae.dtype)).sample
            images = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()

        if not return_dict:
            return images, masks
        return JointImageMaskPipelineOutput(images=images, masks=masks, class_ids=ids, prompts=prompts)
