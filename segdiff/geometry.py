"""Image geometry: the one image-size type, and the shapes a VAE and UNet allow, read from their configs, never assumed.

``ImageSize`` is (height, width), height first as everywhere in torch: what ``--resolution N`` or
``--resolution HEIGHT,WIDTH`` parses to (`segdiff.arguments.image_size`), what training_config.json records, and what the pipelines
are called with. A single N is the square N x N.

A ControlNet's conditioning embedding downsamples the control image to the latent grid, so it must
downsample by exactly the VAE's factor: 8 for Stable Diffusion, 2 for the tiny test base. The trainer sizes
a new ControlNet's embedding with these helpers; whatever loads a trained one (segdiff.rendering) checks it
against the base with the same ones.
"""

from __future__ import annotations

from typing import NamedTuple


class ImageSize(NamedTuple):
    """(height, width) in pixels."""

    height: int
    width: int

    @classmethod
    def of(cls, value) -> ImageSize:
        """An ImageSize from what a config records: N (a square), or [height, width]."""
        if isinstance(value, int):
            return cls(value, value)
        height, width = value
        return cls(int(height), int(width))

    @property
    def is_square(self) -> bool:
        return self.height == self.width

    def __mul__(self, factor: int) -> ImageSize:
        """The size ``factor`` times larger on both sides: a latent size's image size (not tuple repetition)."""
        return ImageSize(self.height * factor, self.width * factor)

    def __floordiv__(self, factor: int) -> ImageSize:
        """The size ``factor`` times smaller on both sides: an image size's latent or sample size."""
        return ImageSize(self.height // factor, self.width // factor)

    def config_value(self) -> int | list[int]:
        """As a model config records a size (`of` reads it back): N for a square, as the shipped configs have it,
        else [height, width] (diffusers' UNets take either as ``sample_size``)."""
        return self.height if self.is_square else [self.height, self.width]

    def __str__(self) -> str:
        """As typed on a command line: N for a square, else HEIGHT,WIDTH."""
        return str(self.height) if self.is_square else f"{self.height},{self.width}"


def short_side_size(height: int, width: int, short_side: int, multiple: int) -> ImageSize:
    """The size of a ``height`` x ``width`` shape's aspect ratio with ``short_side`` as its short side, both sides
    rounded to ``multiple`` (and at least ``multiple``)."""
    scale = short_side / min(height, width)
    return ImageSize(*(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width)))


# Stable Diffusion's ControlNet conditioning embedding: 3 stride-2 convolutions for its VAE's factor of 8.
SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)


def vae_scale_factor(vae_config) -> int:
    """How much the VAE downsamples: 8 for SD's, 2 for the tiny test base. Never assumed to be 8. ``vae_config``: a
    model's config, or the dict of its config.json (read before any weights)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def unet_downsampling(unet_config) -> int:
    """How much a UNet halves its input: once per level after the first (diffusers' ``block_out_channels``, the SPADE
    UNet's ``channel_mult``)."""
    levels = unet_config["block_out_channels"] if "block_out_channels" in unet_config else unet_config["channel_mult"]
    return 2 ** (len(levels) - 1)


def size_multiple(vae_config, unet_config) -> int:
    """Image sides must be multiples of this: the VAE's factor (none for a pixel-space model: ``vae_config`` None)
    times the UNet's own downsampling."""
    return (vae_scale_factor(vae_config) if vae_config is not None else 1) * unet_downsampling(unet_config)


def check_size_multiple(size: ImageSize, multiple: int, why: str) -> None:
    """A ValueError unless both sides of ``size`` are multiples of ``multiple`` (``why``: the factors it comes from,
    for the message, which names the nearest size that is)."""
    if size.height % multiple or size.width % multiple:
        nearest = ImageSize(*(max(multiple, round(side / multiple) * multiple) for side in size))
        raise ValueError(
            f"height and width must be multiples of {multiple} ({why}); the nearest size that is: {nearest}"
        )


def conditioning_channels_for(scale_factor: int) -> tuple[int, ...]:
    """Channels of a conditioning embedding that downsamples the control image by ``scale_factor``.

    ControlNet's embedding has one stride-2 convolution per step between its channel counts, so it must
    have log2(factor) + 1 of them for its output to land on the latent grid. SD's (16, 32, 96, 256) is the
    answer for factor 8; other factors take a prefix of it (or extend it with 256s).
    """
    steps = scale_factor.bit_length() - 1
    if scale_factor < 1 or 2**steps != scale_factor:
        raise ValueError(f"the VAE downsampling factor must be a power of 2, got {scale_factor}")
    channels = list(SD_CONDITIONING_CHANNELS[: steps + 1])
    return tuple(channels + [SD_CONDITIONING_CHANNELS[-1]] * (steps + 1 - len(channels)))


def conditioning_downsampling(controlnet_config) -> int:
    """How much a ControlNetModel's conditioning embedding downsamples its control image, from its config (a
    ``config.json`` read as a dict, or a model's ``.config``), so a folder is checked before its weights load."""
    # A config.json without the key gets diffusers' default, as ControlNetModel.from_pretrained gives it.
    channels = controlnet_config.get("conditioning_embedding_out_channels", SD_CONDITIONING_CHANNELS)
    return 2 ** (len(channels) - 1)
