"""Schedulers by command-line name: the one table every generator, renderer and pipeline builds them from.

A trained model's folder holds its *training* schedule (betas, prediction type, x0 clipping...); sampling with
another algorithm ("ddim", "ddpm", "dpmsolver", "unipc") builds that scheduler class from the same config, so it
inherits the schedule. diffusers calls both a "scheduler", and so does this project (``--scheduler``).

`MaskedLayoutScheduler` is the one scheduler of its own here: the discrete (absorbing-state D3PM) schedule of the
layout model's ``layout_type="d3pm"``, which no diffusers scheduler steps with fewer steps than it was trained on.

A leaf module (diffusers only): the pipelines use it without pulling in command lines or output writers.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

# name -> (class, options on top of the training schedule's config)
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpmsolver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}
# The schedulers the joint and SDM generators offer (--scheduler {ddim,ddpm,dpmsolver}), in this order; the
# ControlNet generator and the renderers offer all of SCHEDULERS, UniPC included.
CORE_SCHEDULERS = ("ddim", "ddpm", "dpmsolver")


def make_scheduler(name: str, config, *, stochastic: bool = False):
    """The scheduler ``name`` (a key of SCHEDULERS) built from a trained pipeline's scheduler ``config``.

    A schedule that clips the predicted x0 to [-1, 1] (pixel-space SDM) keeps doing so in the multistep
    solvers, which know no ``clip_sample``: their thresholding with ``sample_max_value=1`` is that clipping.
    Without it they follow an imperfect model's out-of-range x0 guesses (tiny toy SDM after 400 steps,
    DPM-Solver++ with 50 steps: mIoU 0.22 unclipped, 0.50 clipped; DDPM reaches 1.00 on the same model).

    ``stochastic`` (what SDM samples with): "dpmsolver" becomes DPM-Solver++ in its SDE form
    (``algorithm_type="sde-dpmsolver++"``, "DPM++ 2M SDE"). Deterministic solvers follow the model's
    probability-flow ODE, which keeps every error of its noise prediction: the tiny toy SDM under-predicts the
    noise by about 1% at high noise levels, and what it misses stays in the image as noise. More steps do not help
    (DDIM: mIoU 0.53 at 50 steps, 0.54 at 250), nor do trailing timesteps or an unclipped x0; fresh noise at every
    step does, as in DDPM. Toy val mIoU after 300 training steps (16 masks): DDPM 50 steps 0.999, DPM-Solver++
    20 steps 0.469 deterministic, 0.997 stochastic. The other names are unchanged by it.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    scheduler_class, options = SCHEDULERS[name]
    options = dict(options)
    if name in ("dpmsolver", "unipc") and config.get("clip_sample"):
        options.update(thresholding=True, sample_max_value=float(config.get("clip_sample_range", 1.0)))
    scheduler = scheduler_class.from_config(config, **options)
    if stochastic and name == "dpmsolver":
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="sde-dpmsolver++")
    return scheduler


def takes_eta(name: str) -> bool:
    """Whether the scheduler ``name`` has DDIM's eta (the share of fresh noise per step): of ours, DDIM only."""
    return "eta" in inspect.signature(SCHEDULERS[name][0].step).parameters


def prepare_extra_step_kwargs(scheduler, generator, eta: float = 0.0) -> dict:
    """What ``scheduler.step`` gets besides (model output, timestep, sample), as diffusers' pipelines pass it
    (StableDiffusionPipeline.prepare_extra_step_kwargs): ``eta`` only if the step takes one (DDIM's), the
    ``generator`` only if it draws noise with one. For the pipelines of segdiff.pipelines, whose scheduler may be
    the call's own rather than ``self.scheduler``.

    A non-zero ``eta`` for a step that has none is refused (diffusers drops it silently): the caller asked for
    noise that the scheduler would never add.
    """
    parameters = inspect.signature(scheduler.step).parameters
    if eta and "eta" not in parameters:
        raise ValueError(
            f"eta={eta} is DDIM's share of fresh noise per step, and {type(scheduler).__name__} has none: "
            "sample with DDIM (scheduler 'ddim'), or leave eta at 0"
        )
    kwargs = {}
    if "eta" in parameters:
        kwargs["eta"] = eta
    if "generator" in parameters:
        kwargs["generator"] = generator
    return kwargs


# ------------------------------------------------------------------------------------------------
# The discrete layout schedule
# ------------------------------------------------------------------------------------------------


def uniform_tensor(shape: tuple[int, ...], generator=None, device=None) -> torch.Tensor:
    """Uniform draws in [0, 1) of ``shape``; with a list of generators, row i from ``generator[i]`` alone (as
    diffusers' ``randn_tensor`` draws Gaussian noise), so a sample is the same alone or in any batch."""
    if isinstance(generator, list):
        rows = [torch.rand((1, *shape[1:]), generator=g, device=g.device) for g in generator]
        return torch.cat([row.to(device) for row in rows])
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniform draws: argmax(log p + gumbel) is a draw from p."""
    return -torch.log(-torch.log(uniform.clamp(min=1e-20)))


def most_confident(confidence: torch.Tensor, masked: torch.Tensor, share: float) -> torch.Tensor:
    """(B, H, W) bool: per sample, the ``round(share * masked pixels)`` pixels of highest ``confidence`` (every
    masked pixel when ``share`` is 1)."""
    count = (masked.flatten(1).sum(1) * share).round().long()
    flat = confidence.flatten(1)
    rank = flat.argsort(dim=1, descending=True).argsort(dim=1)  # 0 for the most confident pixel
    return (rank < count[:, None]).view_as(masked)


class MaskedLayoutScheduler(SchedulerMixin, ConfigMixin):
    """Absorbing-state discrete diffusion over label maps (D3PM with a [MASK] state, Austin et al. 2021), with
    MaskGIT's cosine schedule: at training time t (0..T-1) a pixel is [MASK] with probability
    ``sin(pi/2 * (t + 1) / T)`` (MaskGIT's mask ratio ``cos(pi/2 * r)`` with r = 1 - (t + 1) / T) and still shows
    its class with probability ``alpha(t)``, the rest; the last step hides the whole map. Two thirds of the
    training pixels on average are masked (2 / pi), and sampling reveals few pixels in its first steps, where the
    regions are placed, and more in the last ones (a linear schedule in a first toy run: the masked-map marginals
    far from the data's, one class 3x too rare).

    Tokens are class ids 0..C-1 and [MASK] = C (the model's one extra input channel). Sampling starts from an
    all-[MASK] map; `step` goes from t to the previous timestep s of the schedule, draws a class for every masked
    pixel from the model's x0 prediction and reveals a share ``(alpha(s) - alpha(t)) / (1 - alpha(t))`` of them;
    revealed pixels never change again, and the last step (s = -1, alpha 1) reveals every pixel left. Any number
    of steps samples the same schedule, strided. Which pixels are revealed (``reveal_order``):

    - ``"confidence"`` (the default, MaskGIT's sampler): the ones whose drawn class the model is surest of, with
      Gumbel noise of scale ``confidence_noise`` times the share still masked after the step added to the log
      confidences (some randomness early, none at the end);
    - ``"random"``: each masked pixel independently with that probability: the exact posterior of the process.

    Measured on bench_synthetic.py's layout model (600 steps on 64 toy maps, 50 sampling steps, 128 held-out
    requests, the model alone): the random order leaves ragged regions and stray pixels (realism distance 0.80-0.87
    against the training maps, 0.73-0.77 at 200 steps), confidence order with noise 1 draws whole regions (0.25-0.28)
    at nearly the same ratio error (one class 0.050 against 0.047); noise 0.5 and 2 were worse on both.
    """

    order = 1

    @register_to_config
    def __init__(
        self, num_train_timesteps: int = 1000, reveal_order: str = "confidence", confidence_noise: float = 1.0
    ):
        if reveal_order not in ("confidence", "random"):
            raise ValueError(f"reveal_order must be 'confidence' or 'random', got {reveal_order!r}")
        self.timesteps = torch.arange(num_train_timesteps).flip(0)
        self.num_inference_steps = None

    def kept_share(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha(t): the probability that a pixel still shows its class at ``timesteps`` (1 at t = -1)."""
        progress = (timesteps.double() + 1) / self.config.num_train_timesteps
        return (1 - torch.sin(progress.clamp(0, 1) * math.pi / 2)).float()

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``num_inference_steps`` timesteps from T-1 down to 0, evenly spaced."""
        total = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(
                f"num_inference_steps must be in 1..{total} (the training steps), got {num_inference_steps}"
            )
        steps = torch.linspace(total - 1, 0, num_inference_steps).round().long()
        self.timesteps = steps.to(device)
        self.num_inference_steps = num_inference_steps

    def add_noise(self, labels: torch.Tensor, timesteps: torch.Tensor, num_classes: int, generator=None):
        """(B, H, W) class ids -> the tokens at ``timesteps`` (B,): each pixel kept with probability alpha(t),
        [MASK] (= ``num_classes``) otherwise. Unlabelled pixels (outside 0..C-1: ignore_index) are always [MASK]."""
        kept = uniform_tensor(labels.shape, generator, labels.device) < self.kept_share(timesteps)[:, None, None].to(
            labels.device
        )
        labelled = (labels >= 0) & (labels < num_classes)
        return torch.where(kept & labelled, labels, num_classes)

    def previous_timestep(self, timestep: int) -> int:
        later = self.timesteps[self.timesteps < timestep]
        return int(later.max()) if len(later) else -1

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict=True):
        """One step back: ``model_output`` (B, C, H, W) the x0 class logits, ``sample`` (B, H, W) the tokens at
        ``timestep``; returns the tokens at the previous timestep (``prev_sample``)."""
        mask_token = model_output.shape[1]
        timestep = int(timestep)
        now, before = self.kept_share(torch.tensor([timestep, self.previous_timestep(timestep)]))
        reveal_share = float((before - now) / (1 - now).clamp(min=1e-12))
        masked = sample == mask_token
        # Both draws for every pixel, in this order, whatever is masked: a sample's draws depend on its seed only.
        order_draws = uniform_tensor(sample.shape, generator, sample.device)
        class_draws = uniform_tensor(model_output.shape, generator, sample.device)
        log_probs = model_output.float().log_softmax(dim=1)
        drawn = (log_probs + gumbel(class_draws)).argmax(dim=1)
        if self.config.reveal_order == "random":
            reveal = order_draws < reveal_share
        else:
            noise_scale = self.config.confidence_noise * float(1 - before)
            confidence = log_probs.gather(1, drawn[:, None])[:, 0] + noise_scale * gumbel(order_draws)
            reveal = most_confident(confidence.masked_fill(~masked, -torch.inf), masked, reveal_share)
        prev_sample = torch.where(masked & reveal, drawn, sample)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
