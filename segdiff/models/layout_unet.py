"""LayoutUNetModel: a diffusion denoiser over whole multi-class label maps, conditioned on class ratios.

What it is for: drawing NEW label maps with chosen class proportions (SyntheticGen's idea for long-tailed
datasets such as LoveDA): a layout with, say, 40 % building is sampled here, then a mask-to-image model
(ControlNet or SDM) renders the image that goes with it.

Representation: continuous one-hot ("analog") diffusion with an x0 prediction trained by cross-entropy.

- A label map of C classes is the one-hot tensor scaled to [-1, 1]: (B, C, H, W), +1 on the pixel's class and
  -1 elsewhere (`labels_to_analog`). Gaussian noise is added to it by an ordinary diffusers scheduler (cosine
  betas, ``prediction_type="sample"``; see ``layout_scheduler`` in segdiff/pipelines/layout.py).
- The UNet predicts class logits per pixel; the clean sample it hands the scheduler is ``2 * softmax - 1``,
  so any diffusers scheduler (DDIM, DDPM, DPM-Solver) runs unchanged, and the label map is the argmax of the
  last sample. Training is cross-entropy between those logits and the true classes, ignore_index pixels
  excluded (they enter the noisy input as 0: no class).

The other representation, ``layout_type="d3pm"``: discrete absorbing-state diffusion (D3PM with a [MASK] state,
`MaskedLayoutScheduler` in segdiff/schedulers.py). The input is the one-hot of C + 1 tokens (the classes and
[MASK], `tokens_to_one_hot`), the output the same C class logits, trained by cross-entropy on the masked pixels
only; sampling reveals pixels from an all-[MASK] map. Why analog stays the default: on the same 64 toy maps and
600 steps, and the same 50 sampling steps, the discrete model followed held-out requests by itself about as
closely (one class 0.050 against 0.057) but drew less realistic layouts, and far less realistic ones under ratio
matching (benchmarks/RESULTS.md, "analog against d3pm"); and the continuous form keeps every diffusers scheduler
(``scheduler="ddim" | "ddpm" | "dpmsolver"``).

Conditioning: the class-ratio vector ``ratios`` (B, C) (each class's fraction of the labelled pixels) is given
with a mask ``known`` (B, C) (1 = this class's ratio is requested) as ``concat(ratios * known, known)``, so
"class c at 0" (known, absent) differs from "class c unspecified". Each ratio enters as sinusoidal features (as
SDXL embeds its size and crop scalars), an optional domain id (LoveDA's Urban / Rural) as a learned embedding
with one extra "none" row, and a small MLP maps the sum to the width of the timestep embedding, where it is
added (diffusers' ``UNet2DModel`` with ``class_embed_type="identity"``): it reaches every res-block the way the
timestep does. All unknown and no domain is the unconditional model that classifier-free guidance compares
with; the trainer hides a random subset of the ratios per sample, so a request may name only some classes.

Measured on the toy data (``python -m segdiff.toy --num_images 256 --size 32``, 4 classes: background ~80 %,
square, disk, triangle), 2-core CPU, one thread; layout_tiny.json (0.73 M parameters), batch 32, lr 1e-3,
EMA; requests from the 64 toy val maps; DDIM 50 steps, guidance 1 unless said; MAE = mean absolute error
between requested and achieved shares over the requested classes (unconditional samples of the same seeds in
brackets: what ignoring the request scores):

=====================================  ===============  =======================  ===========================
run                                    full request     one class requested      square asked 0.05 / 0.6
=====================================  ===============  =======================  ===========================
16 px layouts, 2000 steps (4.6 min)    0.032 (0.085)    0.059 (0.097)            0.052 / 0.120
  same, guidance 2                     0.037            0.072 (overshoots +0.05) 0.036 / 0.173
32 px layouts, 550 steps (5.5 min)     0.032 (0.089)    0.053 (0.094)            0.049 / 0.142
  same, guidance 2                     0.049            0.086 (overshoots +0.06) 0.032 / 0.248
=====================================  ===============  =======================  ===========================

"Full request": every class at a real val map's shares. "One class": square, disk or triangle at the share it
has in a val map where it is present, the other classes left to the model. 0.6 square is beyond the data (a
toy square covers at most 0.38). Other schedulers on the 16 px model (full / one class): DDIM 100 steps
0.031 / 0.059, DDPM 50 0.031 / 0.058, DPM-Solver++ 20 0.037 / 0.061. The main remaining error: about 15 % of
one-class requests (mostly below 0.1) get none of the class. The pipeline's ratio matching (on by default,
``match_ratios`` in segdiff/pipelines/layout.py) steers every sampling step to the requested shares instead:
MAE 0.001-0.002 on bench_synthetic.py's requests, where this model alone scores 0.06. On 64 training maps, FiLM
conditioning, the request as input planes, an auxiliary share loss, smoother ratio features (x30), self-conditioning
on the predicted shares, EMA, a 5x bigger model and twice the steps each left one-class requests at 0.04-0.07
(benchmarks/RESULTS.md). What did help: training on noisy maps whose regions disagree with their ratios
(train_layout_diffusion.py --region_perturbation: one class grown, the real map still the target), 0.031-0.041.

Design choices, one run each at 600 steps (16 px, full-request MAE; unconditional about 0.08): the raw ratio
vector through a linear layer instead of sinusoidal features 0.069 (the shares, mostly a few percent, barely
move a linear layer: the model learns to follow them far more slowly); sinusoidal features 0.033; plus an
auxiliary L1 loss between the mean predicted class shares and the requested ones 0.044; one-hot scaled to
[-0.5, 0.5] (more noise for the same schedule) 0.038; self-conditioning (Analog Bits) 0.041. Guidance above 1
pushes the named classes further (useful for "as much as possible") but overshoots exact requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from torch import nn

from segdiff.geometry import unet_downsampling
from segdiff.labels import IGNORE_INDEX

# Ratios in [0, 1] are embedded like timesteps in [0, 1000]: the sinusoids then resolve differences of 0.1 %.
RATIO_FEATURE_SCALE = 1000.0
# The two representations of a layout model: continuous one-hot, or discrete tokens with a [MASK] state.
LAYOUT_TYPES = ("analog", "d3pm")
# The domain id meaning "no domain" in `LayoutUNetModel.forward` (the embedding's extra last row).
NO_DOMAIN = -1


def class_ratios(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, H, W) integer label maps -> (B, C) float: each class's fraction of the map's labelled pixels.

    ignore_index pixels count for nothing; a map with no labelled pixel gets all zeros.
    """
    batch = labels.reshape(labels.shape[0], -1).long()
    labelled = (batch >= 0) & (batch < num_classes) & (batch != ignore_index)
    counts = torch.zeros(batch.shape[0], num_classes, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, torch.where(labelled, batch, 0), labelled.to(torch.float64))
    return (counts / counts.sum(1, keepdim=True).clamp(min=1)).float()


def labels_to_analog(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, H, W) label maps -> (B, C, H, W) one-hot scaled to [-1, 1]; ignore_index pixels are all 0 (no class)."""
    labelled = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    one_hot = F.one_hot(torch.where(labelled, labels, 0).long(), num_classes).permute(0, 3, 1, 2).float()
    return (2 * one_hot - 1) * labelled[:, None].float()


def tokens_to_one_hot(tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) tokens of a d3pm layout (class ids, and [MASK] = ``num_classes``) -> the model's input: their
    one-hot over C + 1 channels, scaled to [-1, 1] as the analog input is (every token is a class of it: no
    ignore_index)."""
    return labels_to_analog(tokens, num_classes + 1, ignore_index=-1)


def analog_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The clean sample the scheduler gets from the model's logits: class probabilities scaled to [-1, 1]."""
    return 2 * logits.float().softmax(dim=1) - 1


class LayoutUNetModel(ModelMixin, ConfigMixin):
    """Denoiser of analog one-hot label maps: ``(noisy (B, C, H, W), t, ratios, known, domain) -> logits (B, C, H, W)``.

    Config (saved by ``save_pretrained``):

    - ``num_classes``: C, the input and output channels; ``sample_size``: the layout side it was trained at.
    - ``block_out_channels``, ``layers_per_block``: the UNet's levels (each level after the first halves the
      size, so sizes must be multiples of ``2 ** (levels - 1)``).
    - ``attention_levels``: one bool per level, self-attention in that level's blocks (global context is what
      places large regions consistently); ``mid_block_attention``: attention in the middle block.
    - ``attention_head_dim``, ``norm_num_groups``, ``dropout``: as in diffusers' ``UNet2DModel``.
    - ``num_domains``: 0 = no domain input; otherwise domain ids 0..num_domains-1, and ``NO_DOMAIN`` (-1) = none.
    - ``condition_hidden_dim``: width of the MLP from (ratios, known, domain) to the timestep embedding.
    - ``layout_type``: ``"analog"`` (the noisy analog map in, C channels) or ``"d3pm"`` (the one-hot of the
      discrete tokens in, C + 1 channels: `tokens_to_one_hot`); the output is C class logits either way.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        num_classes: int = 4,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        attention_levels: tuple[bool, ...] = (False, False, True),
        mid_block_attention: bool = True,
        attention_head_dim: int = 32,
        norm_num_groups: int = 8,
        dropout: float = 0.0,
        num_domains: int = 0,
        condition_hidden_dim: int = 128,
        ratio_embedding_dim: int = 16,
        layout_type: str = "analog",
    ):
        super().__init__()
        if layout_type not in LAYOUT_TYPES:
            raise ValueError(f"layout_type must be one of {', '.join(LAYOUT_TYPES)}, got {layout_type!r}")
        if num_classes < 2:
            raise ValueError(f"a layout model needs at least 2 classes, got num_classes={num_classes}")
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries for {len(block_out_channels)} levels "
                "(block_out_channels): give one true/false per level"
            )
        down_blocks = ["AttnDownBlock2D" if attention else "DownBlock2D" for attention in attention_levels]
        up_blocks = ["AttnUpBlock2D" if attention else "UpBlock2D" for attention in reversed(attention_levels)]
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=num_classes + (layout_type == "d3pm"),  # d3pm: one more input channel, [MASK]
            out_channels=num_classes,
            down_block_types=tuple(down_blocks),
            up_block_types=tuple(up_blocks),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            add_attention=mid_block_attention,
            # The conditioning vector is already embedded (by `condition_embedding`): added to the timestep's as is.
            class_embed_type="identity",
        )
        time_embed_dim = block_out_channels[0] * 4  # UNet2DModel's own choice
        # Each ratio through a sinusoidal embedding (as SDXL embeds its size/crop scalars): raw shares of a few
        # percent barely move a linear layer, and the model then learns to follow them far more slowly.
        self.ratio_features = Timesteps(ratio_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.ratio_projection = nn.Linear(num_classes * (ratio_embedding_dim + 1), condition_hidden_dim)
        # The last row is "no domain"; a model without domains keeps only that row (a learned constant).
        self.domain_embedding = nn.Embedding(num_domains + 1, condition_hidden_dim)
        self.condition_embedding = nn.Sequential(nn.SiLU(), nn.Linear(condition_hidden_dim, time_embed_dim))

    @classmethod
    def from_config_file(cls, path: str | Path, **overrides) -> LayoutUNetModel:
        """A randomly initialised model from a JSON config (keys starting with ``_`` are comments), with overrides."""
        config = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
        return cls.from_config({**config, **overrides})

    @property
    def size_multiple(self) -> int:
        """Layout height and width must be multiples of this (one halving per level after the first)."""
        return unet_downsampling(self.config)

    def embed_condition(self, batch_size: int, ratios=None, known=None, domain=None, device=None) -> torch.Tensor:
        """(B, time_embed_dim): the MLP of ``concat(ratios * known, known)`` plus the domain embedding.

        Missing ``ratios``/``known`` mean nothing known; missing ``domain`` (or ``NO_DOMAIN`` entries) mean none.
        """
        num_classes = self.config.num_classes
        device = device or self.device
        if known is None:
            known = torch.zeros(batch_size, num_classes, device=device)
        if ratios is None:
            ratios = torch.zeros(batch_size, num_classes, device=device)
        known = known.to(device=device, dtype=self.dtype)
        ratios = ratios.to(device=device, dtype=self.dtype)
        if ratios.shape != (batch_size, num_classes) or known.shape != (batch_size, num_classes):
            raise ValueError(
                f"ratios {tuple(ratios.shape)} and known {tuple(known.shape)} must both be ({batch_size}, {num_classes}):"
                f" one value per class of the model ({num_classes} classes) for each of the {batch_size} samples"
            )
        no_domain = self.config.num_domains
        if domain is None:
            domain = torch.full((batch_size,), no_domain, dtype=torch.long, device=device)
        domain = torch.as_tensor(domain, dtype=torch.long, device=device)
        domain = torch.where(domain == NO_DOMAIN, no_domain, domain)
        # The id check reads values back to the host: a graph break under torch.compile, which skips it there.
        out_of_range = not torch.compiler.is_compiling() and bool(((domain < 0) | (domain > no_domain)).any())
        if domain.shape != (batch_size,) or out_of_range:
            raise ValueError(
                f"domain must hold {batch_size} ids in 0..{no_domain - 1} or {NO_DOMAIN} (none); got {domain.tolist()}"
                + ("" if no_domain else ": this model was trained without domains")
            )
        # concat(ratios * known, known), each ratio as its sinusoidal features (zeros where unknown)
        features = self.ratio_features((ratios * RATIO_FEATURE_SCALE).flatten()).to(self.dtype)
        features = features.view(batch_size, num_classes, -1) * known[..., None]
        hidden = self.ratio_projection(torch.cat([features.flatten(1), known], dim=1)) + self.domain_embedding(domain)
        return self.condition_embedding(hidden)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        ratios: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        domain: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        """Class logits (B, C, H, W) for the noisy map ``sample`` at ``timestep``: the analog map (B, C, H, W), or
        for ``layout_type="d3pm"`` the one-hot of the tokens (B, C + 1, H, W).

        ``ratios`` (B, C) float and ``known`` (B, C) bool/float: the requested class shares and which of them are
        requested (None: nothing known). ``domain`` (B,) long: domain ids, ``NO_DOMAIN`` for none (None: none).
        """
        condition = self.embed_condition(sample.shape[0], ratios, known, domain, device=sample.device)
        logits = self.unet(sample, timestep, class_labels=condition).sample
        if not return_dict:
            return (logits,)
        return UNet2DOutput(sample=logits)
