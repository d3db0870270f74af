"""SpadeUNetModel: the denoiser of the Semantic Diffusion Model (SDM, Wang et al. 2022), as a diffusers model.

SDM's idea is to keep the two jobs of a UNet apart. The encoder (down path) sees only the noisy input, so it
learns to read the noise; the semantic layout enters the middle and the decoder (up path), where every
res-block normalises its features with SPADE (spatially-adaptive normalisation, Park et al. 2019):

    SPADE(x, seg) = GroupNorm(x, no affine) * (1 + gamma(seg)) + beta(seg)

with ``seg`` resized (nearest) to the feature size and gamma, beta computed from it by a small conv net. The
timestep enters every res-block by scale-shift on its second norm (AdaGN, as guided-diffusion):
``norm(h) * (1 + scale) + shift``. The rest is guided-diffusion's UNet: ``num_res_blocks`` res-blocks per
level, self-attention at chosen levels and in the middle, skip connections from every encoder step.

``conditioning="concat"`` gives instead the semantic-synthesis variant of latent diffusion (LDM): the map is
projected by a learned 1x1 conv (LDM's SpatialRescaler without its rescaling stages) and concatenated to the
noisy input; then every norm is a plain GroupNorm and the encoder sees the map too.

The semantic map is passed already encoded, as ``segmentation`` (B, C, H, W) at any resolution; see
`encode_label_map` and `SpadeUNetModel.encode_segmentation` for the layout of its C channels. A null map
for classifier-free guidance is all zeros: ``torch.zeros_like(segmentation)``.

Config conventions (all saved in ``config.json`` by ``save_pretrained``):

- ``in_channels`` counts only the noisy sample (3 for pixels, the VAE's latent channels for latents); the
  concat variant adds its ``concat_channels`` itself (LDM's configs count them in: ``in_channels: 6``).
- ``out_channels`` is the prediction's channels (defaults to ``in_channels``); ``learn_sigma=True`` doubles
  the output: the first half is the prediction (epsilon), the second the interpolation weights of the learned
  variance between beta_t and beta~_t (Nichol & Dhariwal 2021), as diffusers' ``DDPMScheduler`` reads them with
  ``variance_type="learned_range"``. Other schedulers take only the first half.
- Level widths are ``int(model_channels * mult)`` for ``mult`` in ``channel_mult`` (fractions allowed, as in
  guided-diffusion's 512 px config ``(0.5, 1, 1, 2, 2, 4, 4)``).
- ``attention_resolutions`` are *downsampling factors* (guided-diffusion's internal ``attention_ds``): 1 is the
  input resolution, 2 the first downsampled level, and so on. They do not depend on ``sample_size``, so one
  config serves pixels and latents at any size. guided-diffusion's command line takes feature sizes in pixels
  instead; convert with ``factor = image_size // pixels`` (256 px with attention at 32, 16, 8 px -> 8, 16, 32).
- Heads: ``num_head_channels`` channels per head when set (SDM: 64), else ``num_heads`` heads.

Style reference (``style_channels > 0``): a `StyleEncoder` maps a reference image to one global vector that is
added to the timestep embedding, so it reaches every res-block through the same scale-shift (AdaGN) as the
timestep. Its last layer starts at zero, so a new style encoder leaves a trained model's predictions unchanged.
The null style (for guidance, and for samples trained without a reference) is the zero vector: no style.

Load a config file with ``SpadeUNetModel.from_config_file("configs/models/sdm_256.json", num_classes=35)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.upsampling import Upsample2D
from torch import nn

from segdiff.labels import IGNORE_INDEX, LABEL_RESIZE_MODE, resize_labels

CONDITIONINGS = ("spade", "concat")
UNKNOWN_CLASS_MODES = ("zeros", "channel")

# One-hot maps inside the UNet are resized with segdiff.data's LABEL_RESIZE_MODE ("nearest-exact"), as label maps
# are: for its power-of-two downsampling, "nearest" would pick the same pixels.


# ---------------------------------------------------------------------------------------------------------
# Encoding label maps


def label_boundaries(labels: torch.Tensor) -> torch.Tensor:
    """Bool map of the pixels whose 4-neighbourhood holds another id (both sides of every boundary).

    ``labels``: integer (..., H, W). Boundaries with ``ignore_index`` pixels count too: they are edges of the
    layout all the same. This is SDM's instance-edge map computed from the semantic labels.
    """
    edges = torch.zeros_like(labels, dtype=torch.bool)
    horizontal = labels[..., :, 1:] != labels[..., :, :-1]
    edges[..., :, 1:] |= horizontal
    edges[..., :, :-1] |= horizontal
    vertical = labels[..., 1:, :] != labels[..., :-1, :]
    edges[..., 1:, :] |= vertical
    edges[..., :-1, :] |= vertical
    return edges


def unexpected_label_ids(labels, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """The ids in ``labels`` that are neither a class (0..num_classes-1) nor ``ignore_index``, sorted."""
    ids = torch.unique(torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels))
    return [int(i) for i in ids if not (0 <= i < num_classes or i == ignore_index)]


def encode_label_map(
    labels,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    edge_map: bool = False,
    unknown_channel: bool = False,
) -> torch.FloatTensor:
    """One-hot encode integer label maps (B, H, W) or (H, W) into a float map (B, C, H, W).

    Channels, in order:

    - ``num_classes`` one-hot channels. Pixels holding ``ignore_index`` get ALL ZEROS here: "unknown" is
      encoded as "no class", so the model is never told a wrong class for no-data pixels, and a map that is
      entirely unknown is exactly the null map used for classifier-free guidance.
    - with ``unknown_channel=True``, one channel that is 1 on ``ignore_index`` pixels (``unknown_class="channel"``
      of the model), for data where "unknown" is a look of its own rather than a don't-care.
    - with ``edge_map=True``, one channel that is 1 on label boundaries (`label_boundaries`): pixels whose
      4-neighbours hold a different id.

    Any other id (negative, or >= ``num_classes`` and not ``ignore_index``) is an error: it would otherwise be
    encoded silently as unknown.
    """
    labels = torch.as_tensor(np.asarray(labels)) if not torch.is_tensor(labels) else labels
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"label maps must hold integer class ids, got dtype {labels.dtype}")
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3:
        raise ValueError(f"label maps must be (H, W) or (B, H, W), got shape {tuple(labels.shape)}")
    labels = labels.long()

    unexpected = unexpected_label_ids(labels, num_classes, ignore_index)
    if unexpected:
        raise ValueError(
            f"label ids {unexpected} are neither classes (0..{num_classes - 1}) nor ignore_index {ignore_index}"
        )

    unknown = labels == ignore_index
    # contiguous: one_hot's channels-last strides would make the convs reading it pick other kernels
    one_hot = F.one_hot(labels.masked_fill(unknown, 0), num_classes).permute(0, 3, 1, 2).float().contiguous()
    channels = [one_hot * (~unknown[:, None])]
    if unknown_channel:
        channels.append(unknown[:, None].float())
    if edge_map:
        channels.append(label_boundaries(labels)[:, None].float())
    return torch.cat(channels, dim=1)


# ---------------------------------------------------------------------------------------------------------
# Building blocks


class GroupNorm(nn.GroupNorm):
    """A plain, affine GroupNorm that takes (and ignores) the segmentation, so every norm is called alike."""

    def forward(self, x: torch.Tensor, segmentation: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class SpadeGroupNorm(nn.Module):
    """GroupNorm without affine, then a per-pixel affine predicted from the semantic map (SPADE).

    ``gamma`` and ``beta`` come from a shared 3x3 conv + ReLU over the map, then one 3x3 conv each. The map is
    resized (nearest) to the features, so one map serves every resolution.
    """

    def __init__(self, channels: int, segmentation_channels: int, num_groups: int, hidden_channels: int = 128):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(segmentation_channels, hidden_channels, 3, padding=1), nn.ReLU())
        self.to_gamma = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        self.to_beta = nn.Conv2d(hidden_channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
        segmentation = F.interpolate(segmentation.to(x.dtype), size=x.shape[-2:], mode=LABEL_RESIZE_MODE)
        features = self.shared(segmentation)
        return self.norm(x) * (1 + self.to_gamma(features)) + self.to_beta(features)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: a residual branch ending in it starts as the identity (guided-diffusion)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """guided-diffusion's res-block with scale-shift timestep conditioning, SPADE or plain norms.

    ``norm_in -> SiLU -> [resample] -> conv -> norm_out * (1 + scale) + shift -> SiLU -> dropout -> conv``, plus
    a skip (1x1 conv when the width changes). With ``segmentation_channels`` both norms are SPADE; without,
    plain GroupNorms. ``resample`` ("down" | "up") makes it the resampling step of a level (guided-diffusion's
    ``resblock_updown``): average pooling / nearest upsampling of both branches, after the first norm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_groups: int,
        dropout: float = 0.0,
        segmentation_channels: int | None = None,
        spade_hidden_channels: int = 128,
        resample: str | None = None,
    ):
        super().__init__()

        def norm(channels):
            if segmentation_channels is None:
                return GroupNorm(num_groups, channels)
            return SpadeGroupNorm(channels, segmentation_channels, num_groups, spade_hidden_channels)

        self.norm_in = norm(in_channels)
        if resample == "down":
            self.resample = Downsample2D(in_channels, use_conv=False)  # 2x2 average pooling, no parameters
        elif resample == "up":
            self.resample = Upsample2D(in_channels, use_conv=False)  # nearest x2, no parameters
        elif resample is None:
            self.resample = None
        else:
            raise ValueError(f"resample must be 'down', 'up' or None, got {resample!r}")
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)  # -> (scale, shift)
        self.norm_out = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, segmentation: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.norm_in(x, segmentation))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv_in(h)

        scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].to(h.dtype).chunk(2, dim=1)
        h = self.norm_out(h, segmentation) * (1 + scale) + shift
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


def self_attention(channels: int, num_groups: int, num_heads: int, num_head_channels: int | None) -> Attention:
    """Spatial self-attention over all pixels (diffusers' Attention on 4-D input), residual, starting as identity."""
    if num_head_channels:
        if channels % num_head_channels:
            raise ValueError(f"num_head_channels {num_head_channels} does not divide a level width of {channels}")
        num_heads = channels // num_head_channels
    elif channels % num_heads:
        raise ValueError(f"num_heads {num_heads} does not divide a level width of {channels}")
    attention = Attention(
        query_dim=channels,
        heads=num_heads,
        dim_head=channels // num_heads,
        norm_num_groups=num_groups,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
    )
    zero_module(attention.to_out[0])
    return attention


class UNetBlock(nn.Module):
    """One step of either path: a res-block, then optionally self-attention, then optionally a resampler.

    Encoder steps are either (res-block [+ attention]) or a lone downsampler; a decoder step may end with the
    upsampler of its level. The whole step is the unit of gradient checkpointing.
    """

    def __init__(
        self, resnet: ResBlock | None = None, attention: nn.Module | None = None, resample: nn.Module | None = None
    ):
        super().__init__()
        self.resnet = resnet
        self.attention = attention
        self.resample = resample

    def forward(self, h: torch.Tensor, temb: torch.Tensor, segmentation: torch.Tensor | None) -> torch.Tensor:
        if self.resnet is not None:
            h = self.resnet(h, temb, segmentation)
        if self.attention is not None:
            h = self.attention(h)
        if isinstance(self.resample, ResBlock):
            h = self.resample(h, temb, segmentation)
        elif self.resample is not None:
            h = self.resample(h)
        return h


class StyleEncoder(nn.Module):
    """A reference image -> one global style vector (hue, lighting, contrast), with no layout in it.

    Images (B, 3, H, W) in [-1, 1], any size, are resized to ``resolution``; a small strided CNN follows,
    and only global statistics leave it: the mean and standard deviation of its last features over all
    pixels, together with the mean and standard deviation of the input's RGB channels (colour statistics
    that every scene of one style shares, whatever its layout). An MLP maps them to ``out_channels``; its
    last layer starts at zero, so a new encoder adds nothing until it has learned something.
    """

    def __init__(self, out_channels: int, channels: int = 32, resolution: int = 64, num_groups: int = 8):
        super().__init__()
        self.resolution = resolution
        widths = [channels, 2 * channels, 4 * channels]
        layers = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for cin, cout in zip(widths, widths[1:] + widths[-1:]):
            layers += [nn.GroupNorm(min(num_groups, cin), cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, stride=2, padding=1)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(2 * widths[-1] + 6, out_channels), nn.SiLU(), zero_module(nn.Linear(out_channels, out_channels))
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"style images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        size = (self.resolution, self.resolution)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        features = self.features(images)
        statistics = [
            features.mean(dim=(2, 3)),
            features.std(dim=(2, 3)),
            images.mean(dim=(2, 3)),
            images.std(dim=(2, 3)),
        ]
        return self.head(torch.cat(statistics, dim=1))


# ---------------------------------------------------------------------------------------------------------
# The model


class SpadeUNetModel(ModelMixin, ConfigMixin):
    r"""SDM's denoiser: encoder on the noisy input only, SPADE-normalised middle and decoder.

    Parameters:
        sample_size (`int`): side of the samples it is trained on (pixels, or latent pixels); informative, the
            model runs at any size divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels (`int`): channels of the noisy sample (3 for RGB pixels, 4 for SD-style latents).
        out_channels (`int`, *optional*): channels of the prediction; defaults to ``in_channels``.
        model_channels (`int`): base width; level ``i`` has ``int(model_channels * channel_mult[i])`` channels.
        channel_mult (`tuple`): width multiplier per level; one level per entry, halving the size between levels.
        num_res_blocks (`int`): res-blocks per encoder level (the decoder has one more per level, for the
            downsampler's skip).
        attention_resolutions (`tuple[int]`): downsampling factors (1, 2, 4, ...) of the levels with
            self-attention. The middle always has it.
        dropout (`float`): dropout in the res-blocks.
        num_classes (`int`): classes of the label maps.
        use_edge_map (`bool`): one more input channel for label boundaries.
        unknown_class (`str`): how ``ignore_index`` pixels are encoded: ``"zeros"`` (no class: all one-hot
            channels 0) or ``"channel"`` (one more channel marking them).
        conditioning (`str`): ``"spade"`` (SDM) or ``"concat"`` (LDM's semantic synthesis: the map, projected to
            ``concat_channels`` by a learned 1x1 conv, is concatenated to the input; plain GroupNorms).
        concat_channels (`int`): width of that projection (LDM's SpatialRescaler uses 3).
        learn_sigma (`bool`): also predict the variance; doubles the output channels (see module docstring).
        num_groups (`int`): groups of every GroupNorm.
        num_heads (`int`), num_head_channels (`int`, *optional*): attention heads; ``num_head_channels`` wins.
        spade_hidden_channels (`int`): width of SPADE's shared conv (SDM: 128).
        resblock_updown (`bool`): resample with res-blocks (SDM) instead of a strided conv / upsample + conv.
        style_channels (`int`): width of the `StyleEncoder` for reference-image style (0: no style input).
        style_resolution (`int`): side the reference images are resized to before the style encoder.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: tuple[float, ...] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (2, 4, 8),
        dropout: float = 0.0,
        num_classes: int = 35,
        use_edge_map: bool = False,
        unknown_class: str = "zeros",
        conditioning: str = "spade",
        concat_channels: int = 3,
        learn_sigma: bool = False,
        num_groups: int = 32,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        spade_hidden_channels: int = 128,
        resblock_updown: bool = False,
        style_channels: int = 0,
        style_resolution: int = 64,
    ):
        super().__init__()
        self._check_config(channel_mult, attention_resolutions, conditioning, unknown_class)
        out_channels = out_channels or in_channels
        temb_channels = 4 * model_channels
        spade_channels = self.segmentation_channels if conditioning == "spade" else None

        # Timestep: sinusoidal features (cos first, like guided-diffusion) and a 2-layer MLP.
        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(model_channels, temb_channels)
        # Reference style: a global vector added to the timestep embedding (AdaGN in every res-block).
        self.style_encoder = None
        if style_channels:
            self.style_encoder = StyleEncoder(temb_channels, style_channels, style_resolution, num_groups)

        # Concat variant: the learned projection of the map, concatenated to the noisy input.
        self.segmentation_projection = None
        if conditioning == "concat":
            self.segmentation_projection = nn.Conv2d(self.segmentation_channels, concat_channels, 1)
            in_channels = in_channels + concat_channels

        def width(mult):
            return int(model_channels * mult)

        def res_block(cin, cout, spade, resample=None):
            return ResBlock(
                cin,
                cout,
                temb_channels,
                num_groups,
                dropout,
                segmentation_channels=spade,
                spade_hidden_channels=spade_hidden_channels,
                resample=resample,
            )

        def attention(ch):
            return self_attention(ch, num_groups, num_heads, num_head_channels)

        ch = width(channel_mult[0])
        self._check_width(ch, num_groups)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Encoder: noisy input only (plain norms). Every step's output is kept as a skip for the decoder.
        self.down_blocks = nn.ModuleList()
        skip_channels = [ch]
        factor = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = width(mult)
                self._check_width(out, num_groups)
                attn = attention(out) if factor in attention_resolutions else None
                self.down_blocks.append(UNetBlock(res_block(ch, out, None), attn))
                ch = out
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                if resblock_updown:
                    downsampler = UNetBlock(res_block(ch, ch, None, resample="down"))
                else:
                    downsampler = UNetBlock(resample=Downsample2D(ch, use_conv=True, name="op"))
                self.down_blocks.append(downsampler)
                skip_channels.append(ch)
                factor *= 2

        # Middle: res-block, attention, res-block; SPADE from here on.
        self.mid_blocks = nn.ModuleList(
            [
                UNetBlock(res_block(ch, ch, spade_channels), attention(ch)),
                UNetBlock(res_block(ch, ch, spade_channels)),
            ]
        )

        # Decoder: each step takes the previous output concatenated with one skip; the last step of a level
        # upsamples.
        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out = width(mult)
                resnet = res_block(ch + skip_channels.pop(), out, spade_channels)
                attn = attention(out) if factor in attention_resolutions else None
                upsampler = None
                if level > 0 and i == num_res_blocks:
                    if resblock_updown:
                        upsampler = res_block(out, out, spade_channels, resample="up")
                    else:
                        upsampler = Upsample2D(out, use_conv=True)
                    factor //= 2
                self.up_blocks.append(UNetBlock(resnet, attn, upsampler))
                ch = out

        self.norm_out = nn.GroupNorm(num_groups, ch)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels * (2 if learn_sigma else 1), 3, padding=1))

        self.gradient_checkpointing = False

    @staticmethod
    def _check_config(channel_mult, attention_resolutions, conditioning, unknown_class) -> None:
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        if unknown_class not in UNKNOWN_CLASS_MODES:
            raise ValueError(f"unknown_class must be one of {UNKNOWN_CLASS_MODES}, got {unknown_class!r}")
        factors = [2**level for level in range(len(channel_mult))]
        stray = [f for f in attention_resolutions if f not in factors]
        if stray:
            raise ValueError(
                f"attention_resolutions {list(attention_resolutions)} are downsampling factors, and {stray} are not "
                f"among this model's levels {factors}. (Feature sizes in pixels, as guided-diffusion's command "
                "line takes them, convert with factor = image_size // pixels.)"
            )

    @staticmethod
    def _check_width(channels: int, num_groups: int) -> None:
        if channels % num_groups:
            raise ValueError(f"num_groups {num_groups} does not divide a level width of {channels}")

    @classmethod
    def from_config_file(cls, path: str | Path, **overrides) -> SpadeUNetModel:
        """A randomly initialised model from a JSON config (keys starting with ``_`` are comments), with overrides."""
        config = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
        return cls.from_config({**config, **overrides})

    # -----------------------------------------------------------------------------------------------------
    # The semantic map

    @property
    def segmentation_channels(self) -> int:
        """Channels of the encoded map: the classes, then "unknown" and "edge" channels if configured."""
        config = self.config
        return config.num_classes + (config.unknown_class == "channel") + bool(config.use_edge_map)

    def encode_segmentation(
        self, labels, size: tuple[int, int] | None = None, ignore_index: int = IGNORE_INDEX
    ) -> torch.FloatTensor:
        """Integer label maps (B, H, W) -> the ``segmentation`` input of this model, on its device and dtype.

        The maps are first resized (nearest) to ``size`` = (height, width), the size of the noisy sample (image
        or latent), then encoded by `encode_label_map` with this model's channels; edges are thus drawn at the
        sample's resolution. Trainer and pipeline both encode this way, so they see the same maps.
        """
        labels = torch.as_tensor(np.asarray(labels)) if not torch.is_tensor(labels) else labels
        if size is not None:
            labels = resize_labels(labels, *size)
        encoded = encode_label_map(
            labels,
            self.config.num_classes,
            ignore_index=ignore_index,
            edge_map=self.config.use_edge_map,
            unknown_channel=self.config.unknown_class == "channel",
        )
        return encoded.to(device=self.device, dtype=self.dtype)

    # -----------------------------------------------------------------------------------------------------
    # Forward

    def _embed_timestep(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """One embedding per sample from an int, a float, a 0-d tensor or a (B,) tensor."""
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        timesteps = timesteps.expand(sample.shape[0]) if timesteps.numel() == 1 else timesteps
        # The sinusoids are computed in float32; the MLP runs in the model's dtype.
        return self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))

    def _run(self, block: UNetBlock, h, temb, segmentation) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, h, temb, segmentation)
        return block(h, temb, segmentation)

    def _check_inputs(self, sample: torch.Tensor, segmentation: torch.Tensor) -> None:
        multiple = 2 ** (len(self.config.channel_mult) - 1)
        if sample.shape[-1] % multiple or sample.shape[-2] % multiple:
            raise ValueError(
                f"sample size {tuple(sample.shape[-2:])} must be divisible by {multiple} "
                f"({len(self.config.channel_mult)} levels)"
            )
        if segmentation.ndim != 4 or segmentation.shape[1] != self.segmentation_channels:
            raise ValueError(
                f"segmentation must be (B, {self.segmentation_channels}, H, W) ({self.config.num_classes} classes"
                f"{', unknown' if self.config.unknown_class == 'channel' else ''}"
                f"{', edges' if self.config.use_edge_map else ''}; see encode_segmentation), "
                f"got {tuple(segmentation.shape)}"
            )
        if segmentation.shape[0] != sample.shape[0]:
            raise ValueError(f"got {segmentation.shape[0]} segmentation maps for {sample.shape[0]} samples")

    def _require_style_encoder(self) -> None:
        if self.style_encoder is None:
            raise ValueError("this model has no style encoder (style_channels is 0): it takes no style reference")

    def encode_style(self, images: torch.Tensor) -> torch.Tensor:
        """Reference images (B, 3, H, W) in [-1, 1] -> style vectors (B, D), to pass as ``style`` repeatedly."""
        self._require_style_encoder()
        return self.style_encoder(images.to(device=self.device, dtype=self.dtype))

    def _style_embedding(self, style, drop_style, temb: torch.Tensor) -> torch.Tensor | None:
        if style is None:
            return None
        self._require_style_encoder()
        embedding = self.style_encoder(style.to(temb.dtype)) if style.ndim == 4 else style.to(temb.dtype)
        if embedding.shape != temb.shape:
            raise ValueError(
                f"style must be images (B, 3, H, W) or style vectors (B, {temb.shape[1]}) for {temb.shape[0]} "
                f"samples, got shape {tuple(style.shape)}"
            )
        if drop_style is not None:  # dropped samples get the null style, the zero vector
            embedding = embedding * (~drop_style.bool()).to(embedding.dtype).view(-1, 1)
        return embedding

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        segmentation: torch.Tensor | None,
        return_dict: bool = True,
        *,
        style: torch.Tensor | None = None,
        drop_style: torch.Tensor | None = None,
    ) -> UNet2DOutput | tuple:
        """Predict from ``sample`` (B, in_channels, H, W) at ``timestep`` given the encoded ``segmentation``.

        ``segmentation``: (B, segmentation_channels, h, w) at any resolution, or None for the null map (zeros).
        ``style`` (models with a style encoder): reference images (B, 3, H, W) in [-1, 1], or their vectors from
        `encode_style` (B, D); None is the null style. ``drop_style`` (B,) bool: samples that get the null style.
        Returns ``UNet2DOutput(sample=...)`` with (B, out_channels [x2 with learn_sigma], H, W), or a tuple.
        """
        if segmentation is None:
            shape = (sample.shape[0], self.segmentation_channels, *sample.shape[-2:])
            segmentation = sample.new_zeros(shape)
        self._check_inputs(sample, segmentation)
        segmentation = segmentation.to(sample.dtype)
        temb = self._embed_timestep(timestep, sample)
        style_embedding = self._style_embedding(style, drop_style, temb)
        if style_embedding is not None:
            temb = temb + style_embedding

        h = sample
        if self.segmentation_projection is not None:
            resized = F.interpolate(segmentation, size=sample.shape[-2:], mode=LABEL_RESIZE_MODE)
            h = torch.cat([h, self.segmentation_projection(resized)], dim=1)
        # Only SPADE norms read the map; with concat it has already entered through the input.
        spade_segmentation = segmentation if self.config.conditioning == "spade" else None

        h = self.conv_in(h)
        skips = [h]
        for block in self.down_blocks:
            h = self._run(block, h, temb, None)  # the encoder never sees the map
            skips.append(h)
        for block in self.mid_blocks:
            h = self._run(block, h, temb, spade_segmentation)
        for block in self.up_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), temb, spade_segmentation)
        h = self.conv_out(F.silu(self.norm_out(h)))

        if not return_dict:
            return (h,)
        return UNet2DOutput(sample=h)
