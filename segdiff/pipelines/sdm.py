"""SemanticDiffusionPipeline: images from segmentation label maps with a SpadeUNetModel (SDM).

Pixel space (``vae=None``) or latent space (an ``AutoencoderKL``). Classifier-free guidance in SDM's form,
against the null map (all zeros, what the trainer feeds when it drops the mask):

    eps = eps(x, null) + s * (eps(x, map) - eps(x, null))

``s = 1`` is plain conditional sampling (and skips the null half); conditional and null halves otherwise run
in one batched forward. A model with a style encoder also takes reference images (``style_images``); guidance
then has two terms, as InstructPix2Pix composes its two conditions (the null style is the zero vector):

    eps = eps(null, no style) + s * (eps(map, no style) - eps(null, no style))
          + s_style * (eps(map, style) - eps(map, no style))

``s = s_style = 1`` is plain sampling with both conditions; each scale that differs from 1 adds its branch to
the batched forward. With a model that learns its variance (``learn_sigma``), guidance applies to the
epsilon half only; the variance half is the conditional one. A ``DDPMScheduler`` with
``variance_type="learned_range"`` (or ``"learned"``) receives both halves and samples with the learned variance;
every other scheduler (DDIM, DPM-Solver, ...) receives the epsilon half only. `sdm_scheduler` gives SDM's
training schedule, with x0 clipping in pixel space; `segdiff.schedulers.make_scheduler(..., stochastic=True)`
the schedulers by name, built from it.

Saved folders load with ``SemanticDiffusionPipeline.from_pretrained(folder)``; ``class_names``, ``ignore_index``
and ``edge_map`` travel in ``model_index.json``. EMA needs nothing here: the trainer saves the EMA weights as
``unet``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from segdiff.geometry import ImageSize, check_size_multiple, size_multiple, vae_scale_factor
from segdiff.labels import IGNORE_INDEX, resize_labels
from segdiff.models.spade_unet import SpadeUNetModel, unexpected_label_ids
from segdiff.pipelines.remote_code import RemoteCodePipeline
from segdiff.schedulers import make_scheduler, prepare_extra_step_kwargs

LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def sdm_scheduler(learn_sigma: bool = False, pixel_space: bool = True) -> DDPMScheduler:
    """SDM's (guided-diffusion's) noise schedule: 1000 linear betas from 1e-4 to 0.02, epsilon prediction.

    ``clip_sample`` is on in pixel space: guided-diffusion samples with ``clip_denoised=True``, keeping the
    predicted x0 in [-1, 1]. Without it, deterministic schedulers (DDIM) follow an imperfect model's wild x0
    guesses at high noise and end far outside the image range (measured on the tiny toy model after 200 steps:
    samples of std 2.5 against 0.34 for real images). Latents have no such range: no clipping there.
    ``variance_type`` is "learned_range" for a model that learns sigma, else "fixed_small". Other schedulers
    inherit all of it: ``DDIMScheduler.from_config(sdm_scheduler(...).config)``.
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="epsilon",
        variance_type="learned_range" if learn_sigma else "fixed_small",
        clip_sample=pixel_space,
    )


@dataclass
class SemanticDiffusionPipelineOutput(BaseOutput):
    """``images``: PIL images, or an array (N, H, W, C) in [0, 1] (a tensor for "pt"/"latent");
    ``mask_indices``: the label map each image was generated from (images of one map are consecutive)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    mask_indices: list[int]


def as_style_images(images, resolution: int) -> torch.Tensor:
    """Reference images -> (B, 3, resolution, resolution) in [-1, 1].

    Takes a PIL image, a uint8 array (H, W, 3), a float tensor (3, H, W) or (B, 3, H, W) in [0, 1], or a list of
    them. Each whole image is resized (stretched, antialiased) to the style encoder's square input.
    """
    if isinstance(images, Image.Image | np.ndarray) or (torch.is_tensor(images) and images.ndim == 3):
        images = [images]
    tensors = []
    for item in images:
        if isinstance(item, Image.Image):
            item = np.asarray(item.convert("RGB"))
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[-1] != 3:
                raise ValueError(f"a style image array must be (H, W, 3), got shape {item.shape}")
            # np.array copies: torch.from_numpy warns on the read-only arrays that PIL hands out
            item = torch.from_numpy(np.array(item)).permute(2, 0, 1).float() / 255.0
        item = item.float()
        batch = item[None] if item.ndim == 3 else item
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"style images must be RGB (3, H, W) in [0, 1], got shape {tuple(item.shape)}")
        size = (resolution, resolution)
        tensors.append(F.interpolate(batch * 2 - 1, size=size, mode="bilinear", antialias=True, align_corners=False))
    if not tensors:
        raise ValueError("no style images given")
    return torch.cat(tensors)


def as_label_maps(label_maps) -> list[torch.Tensor]:
    """Integer label maps (H, W) from a tensor (H, W) / (B, H, W) / (B, 1, H, W), an array, a PIL label image,
    or a list of them. Colour-coded masks (RGB) are refused: ids, not colours, are what the model knows."""
    if isinstance(label_maps, Image.Image | np.ndarray | torch.Tensor):
        label_maps = [label_maps]
    maps = []
    for item in label_maps:
        if isinstance(item, Image.Image):
            if item.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B"):
                raise ValueError(
                    f"a {item.mode} image is not a label map: pass class ids (mode L or P, e.g. read with "
                    "segdiff.data.read_label_map), not a colour-coded mask"
                )
            item = np.array(item)
        if isinstance(item, np.ndarray) and not item.flags.writeable:
            item = item.copy()  # np.asarray of a PIL image is read-only, which torch warns about on every run
        tensor = torch.as_tensor(item) if not torch.is_tensor(item) else item
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise ValueError(f"label maps must hold integer class ids, got dtype {tensor.dtype}")
        if tensor.ndim == 4 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]
        if tensor.ndim == 2:
            maps.append(tensor.long())
        elif tensor.ndim == 3:
            maps.extend(tensor.long())
        else:
            raise ValueError(f"label maps must be (H, W) or (B, H, W), got shape {tuple(tensor.shape)}")
    if not maps:
        raise ValueError("no label maps given")
    return maps


class SemanticDiffusionPipeline(RemoteCodePipeline):
    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: SpadeUNetModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
        class_names: list[str] | None = None,
        ignore_index: int = IGNORE_INDEX,
        edge_map: bool | None = None,
    ):
        super().__init__()
        class_names = list(class_names or [])
        if class_names and len(class_names) != unet.config.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model of {unet.config.num_classes} classes")
        if vae is not None and vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(
                f"the VAE has {vae.config.latent_channels} latent channels, the UNet takes {unet.config.in_channels}"
            )
        # The edge channel is part of the model; the entry here only records it next to the class names.
        if edge_map is not None and bool(edge_map) != bool(unet.config.use_edge_map):
            raise ValueError(f"edge_map={edge_map} but the UNet was built with use_edge_map={unet.config.use_edge_map}")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(
            class_names=class_names, ignore_index=int(ignore_index), edge_map=bool(unet.config.use_edge_map)
        )

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names) or [str(i) for i in range(self.unet.config.num_classes)]

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel and side (1 in pixel space)."""
        if self.vae is None:
            return 1
        return vae_scale_factor(self.vae.config)

    @property
    def default_size(self) -> ImageSize:
        """(height, width) of the images the model was trained on."""
        return ImageSize.of(self.unet.config.sample_size) * self.vae_scale_factor

    def check_label_ids(self, maps: list[torch.Tensor]) -> None:
        """A clear error for ids the model has no channel for (anything but its classes and ignore_index)."""
        num_classes, ignore_index = self.unet.config.num_classes, self.config.ignore_index
        unexpected = sorted({i for m in maps for i in unexpected_label_ids(m, num_classes, ignore_index)})
        if unexpected:
            names = ", ".join(f"{i}={name}" for i, name in enumerate(self.class_names))
            raise ValueError(
                f"a mask holds ids the model was not trained for: {unexpected}. The model knows {num_classes} "
                f"classes ({names}) and ignore_index {ignore_index} (no data)."
            )

    def check_size(self, height: int, width: int) -> None:
        multiple = size_multiple(self.vae.config if self.vae is not None else None, self.unet.config)
        why = f"VAE factor {self.vae_scale_factor} x UNet downsampling; trained at {self.default_size} px"
        check_size_multiple(ImageSize(height, width), multiple, why)

    def split_prediction(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values); the variance half exists only for ``learn_sigma`` models."""
        if self.unet.config.learn_sigma:
            return output.chunk(2, dim=1)
        return output, None

    def scheduler_takes_variance(self, scheduler=None) -> bool:
        """Whether ``scheduler``'s (default: the pipeline's) step gets the variance half too: only DDPM's step
        samples with it."""
        scheduler = scheduler or self.scheduler
        variance_type = getattr(scheduler.config, "variance_type", None)
        if variance_type not in LEARNED_VARIANCE_TYPES:
            return False
        if not isinstance(scheduler, DDPMScheduler):
            # DPM-Solver built from a learned-variance DDPM config (`from_config`) inherits variance_type, which only
            # makes it keep the first 3 output channels: wrong for 4-channel latents. It gets epsilon alone instead.
            scheduler.register_to_config(variance_type=None)
            return False
        if not self.unet.config.learn_sigma:
            raise ValueError(
                f"the scheduler expects a learned variance (variance_type={variance_type!r}) but the UNet was "
                "built without learn_sigma: use variance_type 'fixed_small' (or DDIM)"
            )
        return True

    def encode_style_references(self, style_images, num_maps: int, mask_indices: list[int]) -> torch.Tensor | None:
        """Style vectors, one per image to generate, from one reference for all maps or one per map."""
        if style_images is None:
            return None
        if self.unet.style_encoder is None:
            raise ValueError(
                "style_images were given, but this model has no style encoder: train it with --style_reference"
            )
        references = as_style_images(style_images, self.unet.config.style_resolution)
        if len(references) not in (1, num_maps):
            raise ValueError(f"got {len(references)} style images for {num_maps} label maps: pass one, or one per map")
        vectors = self.unet.encode_style(references.to(self._execution_device))
        return vectors.expand(num_maps, -1)[mask_indices] if len(references) == 1 else vectors[mask_indices]

    def guide(self, predictions: dict, full: torch.Tensor, guidance_scale: float, style_scale: float) -> torch.Tensor:
        """Combine the branches' epsilon predictions (see the module docstring)."""

        def epsilon(branch):
            return self.split_prediction(predictions[branch])[0]

        guided, conditional = full, full
        if "map_only" in predictions:
            conditional = epsilon("map_only")
            guided = conditional + style_scale * (full - conditional)
        if "null" in predictions:
            guided = guided + (guidance_scale - 1.0) * (conditional - epsilon("null"))
        return guided

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] with the VAE's scaling (and shift, if any); pixel samples pass through."""
        if self.vae is None:
            return samples
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = samples / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample

    @torch.no_grad()
    def __call__(
        self,
        label_maps,
        num_images_per_mask: int = 1,
        guidance_scale: float = 1.5,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        height: int | None = None,
        width: int | None = None,
        style_images=None,
        style_scale: float = 1.0,
        scheduler: str | None = None,
        eta: float = 0.0,
    ):
        """Generate ``num_images_per_mask`` images for each label map.

        ``label_maps``: an integer tensor (B, H, W) or (H, W), or a list of arrays / PIL label images (mode L or
        P) / tensors; any size (each is resized, nearest, to the sample size). ``ignore_index`` pixels mean "no
        data": the model fills them freely. ``guidance_scale``: SDM's s (1 = no guidance; 1.5 is SDM's choice).
        ``height``/``width``: image size, by default the training size. ``generator``: one, or one per image;
        the starting noise is drawn on the CPU so a seed gives the same images on any device.
        ``output_type``: "pil", "np" (N, H, W, C in [0, 1]), "pt" (N, C, H, W in [0, 1]) or "latent".
        ``style_images`` (models trained with ``--style_reference``): one reference image for every map, or one
        per map (see `as_style_images`); ``style_scale``: the style guidance scale (1 = no extra guidance).
        ``scheduler``: the scheduler of this call by name ("ddim", "ddpm", "dpmsolver", "unipc"), built from the
        pipeline's scheduler config (its betas, prediction type, clipping) by ``make_scheduler(..., stochastic=True)``
        ("dpmsolver" is the stochastic DPM-Solver++); default: ``self.scheduler``.
        ``eta``: DDIM's share of fresh noise per step (0: deterministic, 1: as much as DDPM), passed to schedulers
        whose step takes one (as diffusers' pipelines do); a non-zero eta for another scheduler is an error.
        """
        noise_scheduler = (
            self.scheduler if scheduler is None else make_scheduler(scheduler, self.scheduler.config, stochastic=True)
        )
        # 1. Label maps: check ids, resize to the sample size, encode; repeat per image
        maps = as_label_maps(label_maps)
        self.check_label_ids(maps)
        default_height, default_width = self.default_size
        height, width = height or default_height, width or default_width
        self.check_size(height, width)
        sample_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        labels = torch.stack([resize_labels(m, *sample_size) for m in maps])
        mask_indices = [i for i in range(len(maps)) for _ in range(num_images_per_mask)]
        segmentation = self.unet.encode_segmentation(labels[mask_indices], ignore_index=self.config.ignore_index)

        device = self._execution_device
        segmentation = segmentation.to(device)
        style = self.encode_style_references(style_images, len(maps), mask_indices)

        # The branches of the batched forward: the full condition, then what guidance compares it with.
        branches = ["full"]
        if style is not None and (style_scale != 1.0 or guidance_scale != 1.0):
            branches.append("map_only")  # the map without the style
        if guidance_scale != 1.0:
            branches.append("null")  # neither
        null_map = torch.zeros_like(segmentation)
        segmentation = torch.cat([null_map if branch == "null" else segmentation for branch in branches])
        if style is not None:
            no_style = torch.zeros_like(style)
            style = torch.cat([style if branch == "full" else no_style for branch in branches])

        # 2. Starting noise
        shape = (len(mask_indices), self.unet.config.in_channels, *sample_size)
        if isinstance(generator, list) and len(generator) != len(mask_indices):
            raise ValueError(f"got {len(generator)} generators for {len(mask_indices)} images: pass one per image")
        samples = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        noise_scheduler.set_timesteps(num_inference_steps, device=device)
        samples = samples.to(device=device, dtype=self.unet.dtype) * noise_scheduler.init_noise_sigma

        # 3. Denoise
        takes_variance = self.scheduler_takes_variance(noise_scheduler)
        # Stochastic steps (DDPM, DDIM with eta > 0) draw their noise from the same generator, when they take one.
        step_kwargs = prepare_extra_step_kwargs(noise_scheduler, generator, eta)
        for t in self.progress_bar(noise_scheduler.timesteps):
            model_input = torch.cat([samples] * len(branches))
            model_input = noise_scheduler.scale_model_input(model_input, t)
            output = self.unet(model_input, t, segmentation, style=style).sample
            prediction, variance = self.split_prediction(output[: len(samples)])  # the variance is the full one's
            predictions = dict(zip(branches, output.chunk(len(branches))))
            prediction = self.guide(predictions, prediction, guidance_scale, style_scale)
            model_output = torch.cat([prediction, variance], dim=1) if takes_variance else prediction
            samples = noise_scheduler.step(model_output, t, samples, **step_kwargs).prev_sample

        # 4. Decode
        if output_type == "latent":
            images = samples
        else:
            images = (self.decode(samples) / 2 + 0.5).clamp(0, 1).float()
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()

        if not return_dict:
            return images, mask_indices
        return SemanticDiffusionPipelineOutput(images=images, mask_indices=mask_indices)
