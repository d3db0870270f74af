"""LayoutDiffusionPipeline: whole multi-class label maps with requested class ratios, from a LayoutUNetModel.

    pipe = LayoutDiffusionPipeline.from_pretrained(folder)        # a train_layout_diffusion.py output folder
    ratios, known = pipe.requests([{"building": 0.4}])           # or build the (B, C) tensors yourself
    out = pipe(ratios, known, guidance_scale=2.0, generator=[torch.Generator().manual_seed(0)])
    out.label_maps                                               # (B, H, W) int64 class ids 0..C-1

A request names the share of the labelled pixels some classes should have (``known`` True) and leaves the rest
to the model (the data's own distribution given the named ones); all False is unconditional. ``domain`` picks
one of ``pipe.domains`` per sample (LoveDA: Urban / Rural), or None.

Classifier-free guidance mixes the logits of the conditional and the unconditional prediction,
``u + s * (c - u)``, before the softmax (a product of the two distributions, sharpened towards the request);
both halves run in one batched forward. The clean sample the scheduler receives is ``2 * softmax - 1``
(see segdiff/models/layout_unet.py), and each label map is the argmax over classes of the last sample.

Ratio matching (``match_ratios=True``, the default): at every step the predicted class probabilities are
rescaled per class, so that each requested class's mean probability over the map is exactly its request
(and the classes left to the model share the rest, with the odds between them the model gave); see
`match_requested_shares`. The model alone follows a request only roughly (toy data, 600 training steps: mean
error 0.06 of the pixels); with matching the error is about 0.002, because the denoising trajectory itself is
steered, and the model still draws the shapes around it. ``match_ratios=False`` samples the model as it is;
``match_strength`` between 0 and 1 steers each step part of the way (see `match_requested_shares`), trading exact
shares for layouts more the model's own. ``num_candidates=K`` draws K layouts per request and keeps the one
whose shares come closest to it: a third way to exact shares, at K times the sampling cost, that leaves every
pixel as the model drew it (the model alone scatters one sample's share widely around the request).

A ``layout_type="d3pm"`` model (discrete tokens, see segdiff/models/layout_unet.py) samples with its own
`MaskedLayoutScheduler`: from an all-[MASK] map, each step reveals some pixels, drawn from the guided and matched
x0 prediction; pixels already revealed enter the matching as their class, so the masked ones are steered to
what the request still lacks.

Sample i depends only on its own generator: its starting noise is drawn on the CPU from ``generator[i]``, and
stochastic schedulers (DDPM) draw each step's noise from the same list, so a sample is the same alone or in any
batch (up to the last bit of batched convolutions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from segdiff.geometry import ImageSize, check_size_multiple
from segdiff.labels import IGNORE_INDEX
from segdiff.models.layout_unet import (
    NO_DOMAIN,
    LayoutUNetModel,
    analog_from_logits,
    class_ratios,
    tokens_to_one_hot,
)
from segdiff.pipelines.remote_code import RemoteCodePipeline
from segdiff.schedulers import MaskedLayoutScheduler, make_scheduler, prepare_extra_step_kwargs


def layout_scheduler() -> DDPMScheduler:
    """The training schedule: 1000 cosine ("squaredcos_cap_v2") betas, x0 prediction, no clipping.

    Cosine betas (improved DDPM's choice for small samples); linear betas measured the same on the toy layouts
    (full-request ratio error 0.031 against 0.033 after 600 steps at 16 px). The prediction is a softmax mixture,
    always inside [-1, 1], so there is nothing to clip.
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=False,
        variance_type="fixed_small",
    )


def match_requested_shares(
    logits: torch.Tensor,
    ratios: torch.Tensor,
    known: torch.Tensor,
    strength: float = 1.0,
    tolerance: float = 1e-5,
    max_iterations: int = 200,
) -> torch.Tensor:
    """Shift the (B, C, H, W) class logits per sample and class so the softmax's mean share of every known class
    equals ``ratios``; the unknown classes get one common shift, so they share what is left and keep, at every
    pixel, the odds between them that the model gave.

    A per-class shift of the logits is a per-class factor on the probabilities; the factors that give the wanted
    column sums, while every pixel's probabilities still sum to 1, are found by Sinkhorn's alternating scaling
    (each round multiplies a class's factor by wanted / current share) until every share is within ``tolerance``
    of its target (a few rounds on a model's logits; ``max_iterations`` at most). A row with nothing known is returned as
    it came; a row where everything is known but the shares add up to less than 1 is matched to its shares
    rescaled to 1. Shifts are bounded (+-30: a class asked at 0 is driven out, not to -inf).

    ``strength`` in [0, 1] scales the shifts found: each pixel's distribution becomes ``p**(1 - s) * q**s``
    (renormalised), between the model's own ``p`` (0) and the matched ``q`` (1): a geometric mixture in log space,
    as classifier-free guidance mixes its two predictions. Why this form: the shift stays one number per class, the
    same at every pixel, so at every strength it changes how much of each class there is, never where the model
    puts it, and every step is steered a little. Matching in only some of the steps instead would leave the early
    ones (where the regions are placed) or the late ones (where the shares settle) to the model alone.

    The mean *probability* is matched, not the count of pixels where a class wins: a class the model gives no
    place (a request far outside what it learned) gains probability thinly everywhere and may still win nowhere.
    Matching winners instead (a sharpened softmax) hits such requests too, but then by scattering the class over
    whatever pixels are least unlikely (outlines, the map's border), which is no layout at all.
    """
    eps = 1e-6
    log_probs = logits.float().log_softmax(dim=1)
    known = known.to(log_probs.device, torch.bool)
    ratios = ratios.to(log_probs.device, torch.float32) * known
    free = ~known
    asked = ratios.sum(1, keepdim=True)
    all_known = ~free.any(1, keepdim=True)
    wanted_known = torch.where(all_known, ratios / asked.clamp(min=eps), ratios)
    left_for_free = (1 - asked).clamp(min=0)
    shift = torch.zeros_like(ratios)
    for _ in range(max_iterations):
        shares = (log_probs + shift[..., None, None]).softmax(dim=1).mean(dim=(2, 3))
        free_share = (shares * free).sum(1, keepdim=True)
        wanted = torch.where(known, wanted_known, shares * left_for_free / free_share.clamp(min=eps))
        if (wanted - shares).abs().max() <= tolerance:
            break
        shift = (shift + wanted.clamp(min=eps).log() - shares.clamp(min=eps).log()).clamp(-30.0, 30.0)
    return (log_probs + strength * shift[..., None, None]).to(logits.dtype)


def keep_revealed_pixels(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """d3pm sampling: the (B, C, H, W) x0 logits with every pixel already revealed in ``tokens`` (B, H, W) set to its
    class (0 there, -1e4 elsewhere), so that ratio matching counts what is drawn and steers only the masked pixels
    (whatever the model would now predict there, a revealed pixel keeps its class)."""
    num_classes = logits.shape[1]
    revealed = tokens < num_classes
    drawn = F.one_hot(tokens.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).to(logits.dtype)
    return torch.where(revealed[:, None], (drawn - 1) * 1e4, logits)


@dataclass
class LayoutDiffusionPipelineOutput(BaseOutput):
    """``label_maps``: (B, H, W) int64 class ids 0..C-1 (never ignore_index)."""

    label_maps: np.ndarray


def closest_candidates(
    label_maps: torch.Tensor, ratios: torch.Tensor, known: torch.Tensor, num_candidates: int
) -> torch.Tensor:
    """(B * K, H, W) label maps, the K candidates of each request in a row, with their rows' ``ratios`` and
    ``known`` (B * K, C) -> (B, H, W): for each request the candidate whose shares of the requested classes are
    closest to the request (mean absolute error; the first candidate on a tie)."""
    if num_candidates == 1:
        return label_maps
    drawn = class_ratios(label_maps, ratios.shape[1])
    errors = ((drawn - ratios).abs() * known).sum(1) / known.sum(1).clamp(min=1)
    best = errors.view(-1, num_candidates).argmin(dim=1)  # argmin gives the first of equal minima
    candidates = label_maps.view(-1, num_candidates, *label_maps.shape[1:])
    return candidates[torch.arange(len(best), device=best.device), best]


class LayoutDiffusionPipeline(RemoteCodePipeline):
    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: LayoutUNetModel,
        scheduler: KarrasDiffusionSchedulers | MaskedLayoutScheduler,
        class_names: list[str] | None = None,
        domains: list[str] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        class_names, domains = list(class_names or []), list(domains or [])
        if class_names and len(class_names) != unet.config.num_classes:
            raise ValueError(f"{len(class_names)} class names for a model of {unet.config.num_classes} classes")
        if len(domains) != unet.config.num_domains:
            raise ValueError(f"{len(domains)} domain names for a model of {unet.config.num_domains} domains")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=class_names, domains=domains, ignore_index=int(ignore_index))

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names) or [str(i) for i in range(self.unet.config.num_classes)]

    @property
    def domains(self) -> list[str]:
        return list(self.config.domains)

    @property
    def ignore_index(self) -> int:
        return int(self.config.ignore_index)

    def requests(self, requests: list[Mapping[str | int, float]]) -> tuple[torch.Tensor, torch.BoolTensor]:
        """The call's inputs for a list of requests: ``[{"building": 0.4}, {}]`` (class names or ids -> share of the
        labelled pixels; ``{}`` asks for nothing) -> ``(ratios (B, C), known (B, C))``. The one conversion of a
        request: generate_synthetic_dataset.py and the layout trainer's validation both go through it."""
        num_classes, names = self.unet.config.num_classes, self.class_names
        ratios = torch.zeros(len(requests), num_classes)
        known = torch.zeros(len(requests), num_classes, dtype=torch.bool)
        for row, shares in enumerate(requests):
            for key, share in shares.items():
                class_id = names.index(key) if key in names else key
                if not isinstance(class_id, int) or not 0 <= class_id < num_classes:
                    raise ValueError(f"unknown class {key!r}: the classes are {', '.join(names)}")
                ratios[row, class_id], known[row, class_id] = float(share), True
        return ratios, known

    # ------------------------------------------------------------------------------------------------
    # Checking the inputs

    def check_request(self, ratios, known) -> tuple[torch.Tensor, torch.Tensor]:
        """(ratios float (B, C), known bool (B, C)), or a ValueError that says what is wrong."""
        num_classes = self.unet.config.num_classes
        ratios = torch.as_tensor(ratios, dtype=torch.float32).cpu()
        known = torch.as_tensor(known).cpu()
        classes = ", ".join(self.class_names)
        if ratios.ndim != 2 or ratios.shape[1] != num_classes:
            raise ValueError(
                f"ratios must be (batch, {num_classes}): one share per class of this model ({classes}); "
                f"got shape {tuple(ratios.shape)}"
            )
        if known.shape != ratios.shape:
            raise ValueError(f"known must have the shape of ratios {tuple(ratios.shape)}, got {tuple(known.shape)}")
        if known.dtype != torch.bool:
            if known.is_floating_point() or not bool(((known == 0) | (known == 1)).all()):
                raise ValueError(f"known must be a bool tensor (True = this class's ratio is requested), got {known}")
            known = known.bool()
        requested = ratios[known]
        if not bool(((requested >= 0) & (requested <= 1)).all()):
            raise ValueError(f"requested ratios must be in [0, 1], got {requested.tolist()}")
        totals = (ratios * known).sum(1)
        if bool((totals > 1 + 1e-4).any()):
            raise ValueError(f"the requested ratios of a sample add up to more than 1: {totals.tolist()}")
        return ratios, known

    def check_domains(self, domain, batch_size: int) -> torch.Tensor:
        """A per-sample list of domain ids (or None) -> (B,) long, NO_DOMAIN where none."""
        if domain is None:
            return torch.full((batch_size,), NO_DOMAIN, dtype=torch.long)
        if isinstance(domain, int | str) or len(domain) != batch_size:
            raise ValueError(f"domain must be None or a list of {batch_size} entries (an int or None per sample)")
        ids = []
        for entry in domain:
            if entry is not None and not self.domains:
                raise ValueError("this layout model was trained without domains: pass domain=None")
            if entry is not None and not (isinstance(entry, int) and 0 <= entry < len(self.domains)):
                choices = ", ".join(f"{i}={name}" for i, name in enumerate(self.domains))
                raise ValueError(f"domain {entry!r} is not a domain id of this model ({choices}) or None")
            ids.append(NO_DOMAIN if entry is None else entry)
        return torch.tensor(ids, dtype=torch.long)

    @property
    def default_size(self) -> ImageSize:
        """(height, width) of the layouts the model was trained on."""
        return ImageSize.of(self.unet.config.sample_size)

    def check_size(self, height: int, width: int) -> None:
        halvings = len(self.unet.config.block_out_channels) - 1
        why = f"its UNet halves the size {halvings} times; trained at {self.default_size}"
        check_size_multiple(ImageSize(height, width), self.unet.size_multiple, why)

    # ------------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    def __call__(
        self,
        ratios,
        known,
        domain: list[int | None] | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        match_ratios: bool = True,
        match_strength: float = 1.0,
        num_candidates: int = 1,
        return_dict: bool = True,
    ):
        """Sample one label map per row of ``ratios``.

        ``ratios`` (B, C) float in [0, 1], the share of labelled pixels asked for each class; entries where
        ``known`` (B, C) bool is False are ignored (the model chooses). ``domain``: None, or one id (an index into
        ``self.domains``) or None per sample. ``guidance_scale``: classifier-free guidance on the request (1 = off).
        ``generator``: one, or one per sample (then sample i depends only on ``generator[i]``).
        ``height``/``width``: the layout size (default: the training size). ``scheduler``: the scheduler of this call
        by name ("ddim", "ddpm", "dpmsolver"), built from the pipeline's scheduler config; default: its own (the
        only one of a d3pm model). ``match_ratios``: steer every step's prediction to the requested shares
        (`match_requested_shares`); False samples the model's own following of the request. ``match_strength``
        in [0, 1]: how far each step is steered (1: exactly to the request; 0: not at all, the model alone, as
        ``match_ratios=False``; between: the geometric mixture of `match_requested_shares`, a trade of exact shares
        for the model's own layouts). ``num_candidates``: layouts drawn per request, of which the one with the
        smallest mean absolute error over the requested classes is kept (the first on a tie, so a row that asks
        for nothing keeps its first); candidate k of sample i draws its noise from ``generator[i]`` after
        candidates 0..k-1, so with a deterministic scheduler (DDIM, the default) candidate 0 is the layout of
        ``num_candidates=1``.
        """
        if not 0 <= match_strength <= 1:
            raise ValueError(
                f"match_strength must be in [0, 1] (1: exact shares, 0: the model alone), got {match_strength}"
            )
        if not match_ratios and match_strength != 1:
            raise ValueError("match_strength steers ratio matching: with match_ratios=False leave it at 1")
        if not (isinstance(num_candidates, int) and num_candidates >= 1):
            raise ValueError(
                f"num_candidates must be a whole number >= 1 (layouts drawn per request), got {num_candidates!r}"
            )
        ratios, known = self.check_request(ratios, known)
        num_requests = ratios.shape[0]
        domains = self.check_domains(domain, num_requests)
        height, width = height or self.default_size[0], width or self.default_size[1]
        self.check_size(height, width)
        if isinstance(generator, list) and len(generator) != num_requests:
            raise ValueError(f"got {len(generator)} generators for {num_requests} samples: pass one per sample")
        # Candidates are rows next to their request's: k of request i at row i * K + k.
        ratios, known, domains = (x.repeat_interleave(num_candidates, dim=0) for x in (ratios, known, domains))
        if isinstance(generator, list):
            generator = [g for g in generator for _ in range(num_candidates)]
        batch_size = ratios.shape[0]
        discrete = self.unet.config.layout_type == "d3pm"
        if discrete and scheduler is not None:
            raise ValueError(
                f"scheduler={scheduler!r}: a d3pm layout model samples with its own MaskedLayoutScheduler. "
                "Fix: leave the scheduler unset."
            )
        noise_scheduler = self.scheduler if scheduler is None else make_scheduler(scheduler, self.scheduler.config)
        device = self._execution_device

        requested_ratios, requested_known = ratios.to(device), known.to(device)
        # The condition, and for guidance the unconditional half (nothing known, no domain) after it.
        guided = guidance_scale != 1.0
        if guided:
            ratios = torch.cat([ratios, torch.zeros_like(ratios)])
            known = torch.cat([known, torch.zeros_like(known)])
            domains = torch.cat([domains, torch.full_like(domains, NO_DOMAIN)])
        ratios, known, domains = ratios.to(device), known.to(device), domains.to(device)

        num_classes = self.unet.config.num_classes
        noise_scheduler.set_timesteps(num_inference_steps, device=device)
        if discrete:  # every pixel [MASK]
            samples = torch.full((batch_size, height, width), num_classes, dtype=torch.long, device=device)
        else:  # starting noise on the CPU: a seed gives the same layout on any device
            shape = (batch_size, num_classes, height, width)
            samples = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
            samples = samples.to(device=device, dtype=self.unet.dtype) * noise_scheduler.init_noise_sigma
        step_kwargs = prepare_extra_step_kwargs(noise_scheduler, generator)

        for t in self.progress_bar(noise_scheduler.timesteps):
            if discrete:
                model_input = tokens_to_one_hot(samples, num_classes).to(self.unet.dtype)
            else:
                model_input = noise_scheduler.scale_model_input(samples, t)
            model_input = torch.cat([model_input, model_input]) if guided else model_input
            logits = self.unet(model_input, t, ratios, known, domains).sample
            if guided:
                conditional, unconditional = logits.chunk(2)
                logits = unconditional + guidance_scale * (conditional - unconditional)
            if discrete:
                logits = keep_revealed_pixels(logits, samples)
            if match_ratios and match_strength > 0:  # strength 0 is the model alone, to the last bit
                logits = match_requested_shares(logits, requested_ratios, requested_known, match_strength)
            model_output = logits if discrete else analog_from_logits(logits).to(samples.dtype)
            samples = noise_scheduler.step(model_output, t, samples, **step_kwargs).prev_sample

        label_maps = samples if discrete else samples.argmax(dim=1)
        label_maps = closest_candidates(label_maps, requested_ratios, requested_known, num_candidates)
        label_maps = label_maps.cpu().numpy().astype(np.int64)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (label_maps,)
        return LayoutDiffusionPipelineOutput(label_maps=label_maps)
