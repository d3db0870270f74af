"""Render label maps into images with a trained mask -> image model: a ControlNet or a Semantic Diffusion Model.

    from segdiff.rendering import load_renderer

    renderer = load_renderer("outputs/controlnet")           # or a train_spade_sdm.py folder, or a checkpoint-N/
    images = renderer.render(label_maps, seeds, num_inference_steps=30)

``load_renderer`` opens the folder with `segdiff.runs.open_run` (the kind its trainer recorded) and returns a
`ControlNetRenderer` or an `SDMRenderer`. Both take label maps of class ids at any size (resized, nearest, to the
output size with `segdiff.labels.resize_labels`) and draw image i from its own generator seeded with
``seeds[i]``, so an image does not depend on the batch it is rendered in.

The ControlNet sees each map as in training: coloured in the run's palette with no-data black (the control
image), with the class prompt of the map built from the run's ``prompt_template`` and ``prompt_top_k``. The
SDM takes the map itself. Each samples by default as its generator script does (ControlNet: UniPC, guidance
7.5; SDM: DDPM, guidance 1.5). generate_controlnet_seg.py draws its images with a `ControlNetRenderer` too.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from segdiff.geometry import (
    ImageSize,
    conditioning_downsampling,
    short_side_size,
    size_multiple,
    vae_scale_factor,
)
from segdiff.labels import IGNORE_INDEX, colorize_label, default_palette, resize_labels
from segdiff.models.spade_unet import SpadeUNetModel
from segdiff.pipelines.sdm import SemanticDiffusionPipeline
from segdiff.prompts import DEFAULT_PROMPT_TOP_K, LABEL_MAP_PROMPT_TEMPLATE, label_map_prompt
from segdiff.runs import RunError, TrainedRun, in_dtype, open_run
from segdiff.schedulers import SCHEDULERS, make_scheduler
from segdiff.seeds import cpu_generators

# How each kind samples unless told otherwise; the generator scripts' command-line defaults are these.
CONTROLNET_SCHEDULER = "unipc"
CONTROLNET_GUIDANCE_SCALE = 7.5
SDM_SCHEDULER = "ddpm"  # SDM's own scheduler, and the only one that uses a learned variance
SDM_GUIDANCE_SCALE = 1.5  # SDM's choice of s, for a model that learned the null map (see sdm_guidance_scale)


def load_controlnet_pipeline(
    base: str, controlnet: ControlNetModel, dtype: torch.dtype | None = None, variant: str | None = None
) -> StableDiffusionControlNetPipeline:
    """The base (its ``variant`` weights, as in training) with the ControlNet, in ``dtype`` when given (also float32:
    a base's fp16 --variant weights load in half precision); a clear error if the two were not made for each
    other."""
    try:
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(
            base,
            controlnet=controlnet,
            safety_checker=None,
            requires_safety_checker=False,
            variant=variant,
        )
    except (OSError, ValueError) as error:
        raise RunError(f"cannot load the base model {base}: {error}") from None
    # Cast after loading: from_pretrained's dtype argument changed names across the diffusers versions we support.
    pipeline = in_dtype(pipeline, dtype)
    factor = vae_scale_factor(pipeline.vae.config)
    if conditioning_downsampling(controlnet.config) != factor:
        raise RunError(
            f"the ControlNet downsamples control images by {conditioning_downsampling(controlnet.config)} but the VAE of "
            f"{base} by {factor}: it was trained on another base. Fix: pass the base it was trained on."
        )
    for key in ("cross_attention_dim", "block_out_channels"):
        # JSON turns tuples into lists: compare the values, not the container types.
        if json.dumps(pipeline.unet.config[key]) != json.dumps(controlnet.config[key]):
            raise RunError(
                f"the ControlNet's {key} does not match the UNet of {base}: it was trained on another base. "
                "Fix: pass the base it was trained on."
            )
    return pipeline


def load_sdm_pipeline(run: TrainedRun, dtype: torch.dtype | None = None) -> SemanticDiffusionPipeline:
    """The pipeline of a trained SDM output folder; for a checkpoint-N/, its (EMA) UNet in the run's pipeline."""
    run.require("spade_sdm")
    pipeline = run.load_pipeline(SemanticDiffusionPipeline, SpadeUNetModel)
    return in_dtype(pipeline, dtype)


def learned_null_map(run: TrainedRun) -> bool:
    """Whether an SDM run learned the null map that classifier-free guidance samples against: trained or fine-tuned
    with --drop_rate > 0 (its training_config.json). A folder that does not record it (made elsewhere) is trusted."""
    drop_rate = run.setting("drop_rate")
    return drop_rate is None or drop_rate > 0


def sdm_guidance_scale(run: TrainedRun, requested: float | None = None) -> float:
    """The guidance an SDM run samples with: ``requested`` when given, else SDM's s (1.5) for a model that learned
    the null map and 1 (off) for one that did not. Guiding a model that never saw the null map extrapolates away
    from a prediction it was never trained to make: the images come out over-saturated, so that is warned about."""
    if requested is None:
        return SDM_GUIDANCE_SCALE if learned_null_map(run) else 1.0
    if requested != 1.0 and not learned_null_map(run):
        warnings.warn(
            f"guidance scale {requested} on {run.folder}, an SDM trained with --drop_rate 0: it never learned the "
            "null map that guidance samples against, so its images come out over-saturated. Fix: guidance 1, or "
            "fine-tune it for guidance (train_spade_sdm.py --init_from it --drop_rate 0.2).",
            stacklevel=2,
        )
    return requested


@dataclass
class ControlCondition:
    """What a ControlNet is given for one label map: the map at the output size, its control image, its prompt."""

    label: np.ndarray
    control: Image.Image
    prompt: str


class Renderer:
    """Label maps -> images. Subclasses set the kind, the defaults and how one batch of same-size maps is drawn."""

    kind: str
    default_scheduler: str
    default_guidance_scale: float
    stochastic: bool = False  # make_scheduler's: SDM samples "dpmsolver" in its stochastic form

    def __init__(self, pipeline, class_names, palette, ignore_index: int, resolution: int, folder: Path):
        self.pipeline = pipeline
        self.class_names = list(class_names)
        self.palette = [tuple(colour) for colour in palette]
        self.ignore_index = int(ignore_index)
        self.resolution = int(resolution)  # the short side of the training size (of the default output)
        self.folder = Path(folder)
        # The loaded schedule (betas, prediction type, clipping): every scheduler of a render() is built from it.
        self.scheduler_config = pipeline.scheduler.config
        pipeline.set_progress_bar_config(disable=True)

    def guidance_scale(self, requested: float | None) -> float:
        """The guidance a render uses: ``requested``, else the kind's default."""
        return self.default_guidance_scale if requested is None else requested

    def output_size(self, label: np.ndarray) -> ImageSize:
        """(height, width) of a map's image when render() is given no size."""
        raise NotImplementedError

    def prompt(self, label) -> str | None:
        """The text prompt a map is rendered with (for the records): None for models without one."""
        return None

    def check_label(self, label, index: int = 0) -> np.ndarray:
        """A label map as int64 (H, W); an error naming it for other shapes, float values or unknown ids."""
        array = np.asarray(label)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"label map {index}: expected a 2-D array of integer class ids, got shape {array.shape} of "
                f"{array.dtype}"
            )
        array = array.astype(np.int64)
        stray = sorted(
            int(i) for i in np.unique(array) if i != self.ignore_index and not 0 <= i < len(self.class_names)
        )
        if stray:
            raise ValueError(
                f"label map {index} holds ids the renderer in {self.folder} was not trained for: {stray[:10]}. It "
                f"knows classes 0..{len(self.class_names) - 1} and ignore_index {self.ignore_index}."
            )
        return array

    def use_scheduler(self, name: str | None) -> str:
        """Sample with the scheduler ``name`` (default: the kind's own) on the renderer's training schedule."""
        name = name or self.default_scheduler
        self.pipeline.scheduler = make_scheduler(name, self.scheduler_config, stochastic=self.stochastic)
        return name

    def render(
        self,
        label_maps: list[np.ndarray],
        seeds: list[int],
        *,
        num_inference_steps: int,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        prompts: list[str | None] | None = None,
        domains: list[str | None] | None = None,
        **call_options,
    ) -> list[Image.Image]:
        """One image per label map, image i drawn from a generator seeded with ``seeds[i]``.

        ``height``/``width`` (both or neither): the output size; default: `output_size` of each map. Maps of one
        output size are drawn ``batch_size`` at a time; the batches change nothing but speed (batched
        convolutions may differ in the last bit). ``prompts``: a prompt per map in place of its class prompt
        (None entries keep it; ControlNet only). ``domains``: each map's domain (e.g. LoveDA's "Urban"), for a
        ControlNet whose prompt template names {domain}; the SDM has no domain input and draws the same image
        whatever it is. ``call_options`` go to the pipeline call as they are (e.g. the ControlNet's
        negative_prompt, controlnet_conditioning_scale, eta).
        """
        if len(label_maps) != len(seeds):
            raise ValueError(f"got {len(label_maps)} label maps and {len(seeds)} seeds: pass one seed per map")
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or neither (each map's default output size)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        prompts = prompts or [None] * len(label_maps)
        domains = domains or [None] * len(label_maps)
        labels = []
        for i, label in enumerate(label_maps):
            label = self.check_label(label, i)
            size = (height, width) if height is not None else self.output_size(label)
            labels.append(resize_labels(label, *size))
        self.use_scheduler(scheduler)
        guidance_scale = self.guidance_scale(guidance_scale)

        by_size: dict[tuple[int, int], list[int]] = {}
        for i, label in enumerate(labels):
            by_size.setdefault(label.shape, []).append(i)
        images: list[Image.Image | None] = [None] * len(labels)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                drawn = self._draw(
                    [labels[i] for i in chunk],
                    [prompts[i] for i in chunk],
                    [domains[i] for i in chunk],
                    cpu_generators(seeds[i] for i in chunk),
                    num_inference_steps,
                    guidance_scale,
                    call_options,
                )
                for i, image in zip(chunk, drawn):
                    images[i] = image
        return images

    def _draw(self, labels, prompts, domains, generators, num_inference_steps, guidance_scale, options):
        """Images of same-size label maps (already at the output size), one generator each."""
        raise NotImplementedError


class ControlNetRenderer(Renderer):
    kind = "controlnet"
    default_scheduler = CONTROLNET_SCHEDULER
    default_guidance_scale = CONTROLNET_GUIDANCE_SCALE

    def __init__(self, pipeline, class_names, palette, ignore_index, resolution, folder, prompt_template, prompt_top_k):
        super().__init__(pipeline, class_names, palette, ignore_index, resolution, folder)
        self.prompt_template = prompt_template
        self.prompt_top_k = int(prompt_top_k)
        self.size_multiple = size_multiple(pipeline.vae.config, pipeline.unet.config)

    def output_size(self, label):
        # The map's aspect ratio, its short side at the training resolution.
        return short_side_size(*label.shape, self.resolution, self.size_multiple)

    def prompt(self, label, domain: str | None = None) -> str:
        """The class prompt of a map, worded as in training (the run's template and top-k, its domain if named)."""
        return label_map_prompt(
            label, self.class_names, self.prompt_template, self.prompt_top_k, self.ignore_index, domain=domain
        )

    def condition(
        self, label, height: int | None = None, width: int | None = None, domain: str | None = None
    ) -> ControlCondition:
        """The map at the output size (default: `output_size`), coloured as in training (no data black), and
        its class prompt (of the resized map: what the image shows)."""
        label = np.asarray(label)
        size = (height, width) if height is not None else self.output_size(label)
        label = resize_labels(label, *size)
        control = colorize_label(label, self.palette, self.ignore_index)
        return ControlCondition(label, control, self.prompt(label, domain))

    def _draw(self, labels, prompts, domains, generators, num_inference_steps, guidance_scale, options):
        height, width = labels[0].shape  # all of them: render() resized them to the output size
        conditions = [self.condition(label, height, width, domain) for label, domain in zip(labels, domains)]
        options = dict(options)
        negative_prompt = options.pop("negative_prompt", None)  # one for every map: diffusers wants one per prompt
        return self.pipeline(
            [prompt or condition.prompt for prompt, condition in zip(prompts, conditions)],
            [condition.control for condition in conditions],
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(labels),
            generator=generators,
            **options,
        ).images


class SDMRenderer(Renderer):
    kind = "sdm"
    default_scheduler = SDM_SCHEDULER
    default_guidance_scale = SDM_GUIDANCE_SCALE
    stochastic = True  # "dpmsolver": the stochastic DPM-Solver++ (see segdiff.schedulers.make_scheduler)

    def __init__(self, run: TrainedRun, pipeline: SemanticDiffusionPipeline):
        names = pipeline.class_names
        palette = sdm_palette(run, len(names))
        super().__init__(pipeline, names, palette, pipeline.config.ignore_index, min(pipeline.default_size), run.folder)
        self.run = run

    def guidance_scale(self, requested: float | None) -> float:
        # Off by default for a model that never learned the null map (`sdm_guidance_scale`).
        return sdm_guidance_scale(self.run, requested)

    def output_size(self, label):
        # The training size whatever the map's shape, as generate_spade_sdm.py does.
        return self.pipeline.default_size

    def _draw(self, labels, prompts, domains, generators, num_inference_steps, guidance_scale, options):
        height, width = labels[0].shape
        return self.pipeline(
            labels,
            num_images_per_mask=1,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=generators,
            height=height,
            width=width,
            **options,
        ).images


@dataclass
class ControlNetSettings:
    """How a ControlNet run turns a mask into its condition: what its training used (training_config.json;
    train_controlnet_seg.py's defaults for a folder without one), each overridable from a command line."""

    ignore_index: int
    prompt_template: str
    prompt_top_k: int
    short_side: int  # of the default output size; a map keeps its aspect ratio

    @classmethod
    def of(cls, run: TrainedRun, ignore_index=None, prompt_template=None, prompt_top_k=None, short_side=None):
        trained = ImageSize.of(run.setting("resolution", 512))
        return cls(
            run.setting("ignore_index", IGNORE_INDEX) if ignore_index is None else ignore_index,
            prompt_template or run.setting("prompt_template", LABEL_MAP_PROMPT_TEMPLATE),
            run.setting("prompt_top_k", DEFAULT_PROMPT_TOP_K) if prompt_top_k is None else prompt_top_k,
            short_side or min(trained),
        )


def load_controlnet_renderer(
    run: TrainedRun,
    settings: ControlNetSettings | None = None,
    *,
    base: str | None = None,
    base_flag: str = "base=",
    class_names_json: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ControlNetRenderer:
    """The ControlNet of a run (a checkpoint's EMA weights when kept) over the base it trained on (``base``
    overrides it), with the run's `ControlNetSettings` unless others are given."""
    run.require("controlnet_seg")
    settings = settings or ControlNetSettings.of(run)
    class_names, palette = run.classes(class_names_json)
    base = run.base(base, flag=base_flag)
    controlnet = run.load_model(ControlNetModel, "controlnet", at_root=True)
    pipeline = load_controlnet_pipeline(base, controlnet, dtype, variant=run.setting("variant"))
    return ControlNetRenderer(
        pipeline.to(device),
        class_names,
        palette,
        settings.ignore_index,
        settings.short_side,
        run.folder,
        prompt_template=settings.prompt_template,
        prompt_top_k=settings.prompt_top_k,
    )


def sdm_palette(run: TrainedRun, num_classes: int):
    """The palette of an SDM run (its class_names.json); the default one for a folder without it."""
    return run.classes()[1] if (run.run_dir / "class_names.json").is_file() else default_palette(num_classes)


def load_renderer(
    folder: str | Path,
    base: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> Renderer:
    """The renderer of a trained folder (or of a checkpoint-N/ in one, or of a Hub repository id at ``revision``):
    see the module docstring.

    ``base``: the Stable Diffusion base of a ControlNet (default: the one its training_config.json names, loaded
    with the run's --variant); an SDM carries its own models and refuses one.
    """
    run = open_run(folder, flag="--renderer", revision=revision)
    run.require("controlnet_seg", "spade_sdm")
    if run.kind == "controlnet_seg":
        return load_controlnet_renderer(run, base=base, device=device, dtype=dtype)
    if base is not None:
        raise RunError(f"{folder} holds an SDM, which has no separate base: do not pass base={base!r}.")
    return SDMRenderer(run, load_sdm_pipeline(run, dtype).to(device))
