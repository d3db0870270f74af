"""Render label maps into images with a trained mask -> image model: a ControlNet or a Semantic Diffusion Model.

    from segdiff.rendering import load_renderer

    renderer = load_renderer("outputs/controlnet")           # or a train_spade_sdm.py folder, or a checkpoint-N/
    images = renderer.render(label_maps, seeds, num_inference_steps=30)

``load_renderer`` reads what kind of model a folder holds (the ``pipeline`` its trainer records in
training_config.json, else the files present) and returns a `ControlNetRenderer` or an `SDMRenderer`. Both
take label maps of class ids at any size (resized, nearest, to the output size with
`segdiff.data.resize_labels`) and draw image i from its own generator seeded with ``seeds[i]``, so an
image does not depend on the batch it is rendered in.

The ControlNet sees each map as in training: coloured in the run's palette with no-data black (the control
image), with the class prompt of the map built from the run's ``prompt_template`` and ``prompt_top_k``. The
SDM takes the map itself. Each samples by default as its generator script does (ControlNet: UniPC, guidance
7.5; SDM: DDPM, guidance 1.5).

The loading functions here are also what generate_controlnet_seg.py and generate_spade_sdm.py load with:
one way to read a trained folder, its checkpoints, its run files and its base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from segdiff.data import DatasetError, load_class_names
from segdiff.geometry import conditioning_downsampling, size_multiple, vae_scale_factor
from segdiff.labels import IGNORE_INDEX, colorize_label, default_palette, resize_labels
from segdiff.models.spade_unet import SpadeUNetModel
from segdiff.pipelines.sdm import SemanticDiffusionPipeline
from segdiff.prompts import DEFAULT_PROMPT_TOP_K, LABEL_MAP_PROMPT_TEMPLATE, label_map_prompt
from segdiff.schedulers import SCHEDULERS, make_scheduler

# How each kind samples unless told otherwise; the generator scripts' command-line defaults are these.
CONTROLNET_SCHEDULER = "unipc"
CONTROLNET_GUIDANCE_SCALE = 7.5
SDM_SCHEDULER = "ddpm"  # SDM's own sampler, and the only one that uses a learned variance
SDM_GUIDANCE_SCALE = 1.5  # SDM's choice of s

# What a ControlNet run's settings are when its training_config.json does not record them (a hand-made
# folder, or a run from before they were recorded): train_controlnet_seg.py's defaults.
CONTROLNET_RUN_DEFAULTS = {
    "ignore_index": IGNORE_INDEX,
    "prompt_template": LABEL_MAP_PROMPT_TEMPLATE,
    "prompt_top_k": DEFAULT_PROMPT_TOP_K,
    "resolution": 512,
}

# The "pipeline" entry each trainer writes in training_config.json, by renderer kind.
RECORDED_PIPELINES = {"controlnet_seg": "controlnet", "spade_sdm": "sdm"}
EXPECTED = (
    "expected the output folder of train_controlnet_seg.py or train_spade_sdm.py, or one of their checkpoint-N folders"
)


class RendererError(DatasetError):
    """A model folder that cannot render masks. The message names the folder and what was expected there.

    A DatasetError, so the scripts' `segdiff.data.exit_on_bad_input` turns it into a one-line error."""


# ------------------------------------------------------------------------------------------------
# ControlNet folders (train_controlnet_seg.py) and their base
# ------------------------------------------------------------------------------------------------


def _dtype_kwargs(dtype: torch.dtype | None) -> dict:
    # Explicit when given, also float32: a base's fp16 --variant weights would otherwise load in half precision.
    return {"torch_dtype": dtype} if dtype else {}


def load_controlnet(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[ControlNetModel, Path]:
    """The ControlNet of a training output folder, or of a checkpoint-N/ in one (its EMA weights if kept).

    Returns it with the folder holding the run files (class_names.json, training_config.json).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RendererError(
            f"the ControlNet folder {folder} does not exist. Fix: pass the output folder of train_controlnet_seg.py."
        )
    if (folder / "config.json").is_file():
        return ControlNetModel.from_pretrained(folder, **_dtype_kwargs(dtype)), folder
    for subfolder in ("controlnet_ema", "controlnet"):
        if (folder / subfolder / "config.json").is_file():
            return ControlNetModel.from_pretrained(folder, subfolder=subfolder, **_dtype_kwargs(dtype)), folder.parent
    raise RendererError(
        f"{folder} holds no ControlNet: expected config.json (the output folder of train_controlnet_seg.py) or "
        "controlnet/ (one of its checkpoint-N folders)."
    )


def load_run_files(run_dir: str | Path, class_names_json: str | Path | None = None):
    """A ControlNet run's training config (or {}), class names and palette (its class_names.json, else
    ``class_names_json``): the palette is what maps classes to control colours, so it is required."""
    run_dir = Path(run_dir)
    config_file = run_dir / "training_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    names_file = Path(class_names_json) if class_names_json else run_dir / "class_names.json"
    if not names_file.is_file():
        raise RendererError(
            f"{run_dir} has no class_names.json, so the palette that maps classes to control colours is unknown. "
            "Fix: pass --class_names_json with the class names and palette the ControlNet was trained with."
        )
    class_names, palette = load_class_names(names_file)
    return config, class_names, palette or default_palette(len(class_names))


def run_setting(config: dict, key: str, override=None):
    """A ControlNet run's setting: ``override`` when given, else its training_config.json's, else the trainer's
    default (CONTROLNET_RUN_DEFAULTS)."""
    if override is not None:
        return override
    return config.get(key, CONTROLNET_RUN_DEFAULTS[key])


def recorded_base(config: dict, run_dir: Path, base: str | None = None, flag: str = "base=") -> str:
    """The Stable Diffusion base of a ControlNet run: ``base`` when given, else the one its training used."""
    base = base or config.get("pretrained_model_name_or_path")
    if base is None:
        raise RendererError(
            f"{run_dir} has no training_config.json naming the base the ControlNet was trained on. Fix: pass {flag} "
            "(a Stable Diffusion folder or hub id)."
        )
    return str(base)


def load_controlnet_pipeline(
    base: str, controlnet: ControlNetModel, dtype: torch.dtype | None = None, variant: str | None = None
) -> StableDiffusionControlNetPipeline:
    """The base (its ``variant`` weights, as in training) with the ControlNet; a clear error if the two were not
    made for each other."""
    try:
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(
            base,
            controlnet=controlnet,
            safety_checker=None,
            requires_safety_checker=False,
            variant=variant,
            **_dtype_kwargs(dtype),
        )
    except (OSError, ValueError) as error:
        raise RendererError(f"cannot load the base model {base}: {error}") from None
    factor = vae_scale_factor(pipeline.vae.config)
    if conditioning_downsampling(controlnet) != factor:
        raise RendererError(
            f"the ControlNet downsamples control images by {conditioning_downsampling(controlnet)} but the VAE of "
            f"{base} by {factor}: it was trained on another base. Fix: pass the base it was trained on."
        )
    for key in ("cross_attention_dim", "block_out_channels"):
        # JSON turns tuples into lists: compare the values, not the container types.
        if json.dumps(pipeline.unet.config[key]) != json.dumps(controlnet.config[key]):
            raise RendererError(
                f"the ControlNet's {key} does not match the UNet of {base}: it was trained on another base. "
                "Fix: pass the base it was trained on."
            )
    return pipeline


def output_size(height: int, width: int, short_side: int, multiple: int) -> tuple[int, int]:
    """A map's aspect ratio with ``short_side`` as its short side, both sides rounded to ``multiple``."""
    scale = short_side / min(height, width)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


# ------------------------------------------------------------------------------------------------
# SDM folders (train_spade_sdm.py)
# ------------------------------------------------------------------------------------------------


def load_sdm_pipeline(folder: str | Path, dtype: torch.dtype | None = None) -> SemanticDiffusionPipeline:
    """The pipeline of a trained output folder; for checkpoint-N/, its (EMA) UNet in the parent's pipeline."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return SemanticDiffusionPipeline.from_pretrained(folder, **_dtype_kwargs(dtype))
    if (folder / "unet").is_dir() and (folder.parent / "model_index.json").is_file():
        subfolder = "unet_ema" if (folder / "unet_ema").is_dir() else "unet"
        unet = SpadeUNetModel.from_pretrained(folder, subfolder=subfolder, **_dtype_kwargs(dtype))
        return SemanticDiffusionPipeline.from_pretrained(folder.parent, unet=unet, **_dtype_kwargs(dtype))
    raise RendererError(
        f"{folder} is not a trained SDM: expected model_index.json (the output folder of train_spade_sdm.py) "
        "or unet/ inside one of its checkpoint-N folders."
    )


def load_sdm_palette(folder: str | Path, num_classes: int):
    """The palette of an SDM folder (or of the run a checkpoint-N/ belongs to); the default one without it."""
    folder = Path(folder)
    for candidate in (folder, folder.parent):
        if (candidate / "class_names.json").is_file():
            _, palette = load_class_names(candidate / "class_names.json")
            if palette:
                return palette
    return default_palette(num_classes)


# ------------------------------------------------------------------------------------------------
# Which kind a folder holds
# ------------------------------------------------------------------------------------------------


def _json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def renderer_kind(folder: str | Path) -> str:
    """The kind of model a folder holds, "controlnet" or "sdm": the ``pipeline`` its trainer recorded in
    training_config.json (a checkpoint-N/'s is in its run folder), else what the files present are."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RendererError(f"the renderer folder {folder} does not exist: {EXPECTED}.")
    in_checkpoint = re.fullmatch(r"checkpoint-\d+", folder.name) is not None
    for run_dir in (folder, folder.parent) if in_checkpoint else (folder,):
        recorded = _json_file(run_dir / "training_config.json").get("pipeline")
        if recorded in RECORDED_PIPELINES:
            return RECORDED_PIPELINES[recorded]
        if recorded is not None:
            raise RendererError(
                f"{folder} holds a {recorded!r} model (training_config.json), which does not render given label "
                f"maps into images: {EXPECTED}."
            )
    # No record (a hand-assembled folder, an older run): the files tell.
    if _json_file(folder / "config.json").get("_class_name") == "ControlNetModel":
        return "controlnet"
    if any((folder / sub / "config.json").is_file() for sub in ("controlnet", "controlnet_ema")):
        return "controlnet"
    if _json_file(folder / "model_index.json").get("_class_name") == SemanticDiffusionPipeline.__name__:
        return "sdm"
    if (folder / "unet").is_dir() and _json_file(folder.parent / "model_index.json").get("_class_name") == (
        SemanticDiffusionPipeline.__name__
    ):
        return "sdm"
    raise RendererError(
        f"{folder} holds no model that renders label maps: {EXPECTED} (a ControlNet config.json, or an SDM "
        "model_index.json)."
    )


# ------------------------------------------------------------------------------------------------
# Renderers
# ------------------------------------------------------------------------------------------------


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

    def __init__(self, pipeline, class_names, palette, ignore_index: int, resolution: int, folder: Path):
        self.pipeline = pipeline
        self.class_names = list(class_names)
        self.palette = [tuple(colour) for colour in palette]
        self.ignore_index = int(ignore_index)
        self.resolution = int(resolution)  # the training resolution (short side of the default output)
        self.folder = Path(folder)
        # The loaded schedule (betas, prediction type, clipping): every sampler of a render() is built from it.
        self.scheduler_config = pipeline.scheduler.config
        pipeline.set_progress_bar_config(disable=True)

    def output_size(self, label: np.ndarray) -> tuple[int, int]:
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

    def make_sampler(self, name: str):
        """The sampler ``name`` on the renderer's training schedule."""
        return make_scheduler(name, self.scheduler_config)

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
    ) -> list[Image.Image]:
        """One image per label map, image i drawn from a generator seeded with ``seeds[i]``.

        ``height``/``width`` (both or neither): the output size; default: `output_size` of each map. Maps of one
        output size are drawn ``batch_size`` at a time; the batches change nothing but speed (batched
        convolutions may differ in the last bit).
        """
        if len(label_maps) != len(seeds):
            raise ValueError(f"got {len(label_maps)} label maps and {len(seeds)} seeds: pass one seed per map")
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or neither (each map's default output size)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        scheduler = scheduler or self.default_scheduler
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        labels = []
        for i, label in enumerate(label_maps):
            label = self.check_label(label, i)
            size = (height, width) if height is not None else self.output_size(label)
            labels.append(resize_labels(label, *size))
        self.pipeline.scheduler = self.make_sampler(scheduler)
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale

        by_size: dict[tuple[int, int], list[int]] = {}
        for i, label in enumerate(labels):
            by_size.setdefault(label.shape, []).append(i)
        images: list[Image.Image | None] = [None] * len(labels)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                # CPU generators: the same seed gives the same noise on any device.
                generators = [torch.Generator().manual_seed(int(seeds[i])) for i in chunk]
                drawn = self._draw([labels[i] for i in chunk], generators, num_inference_steps, guidance_scale)
                for i, image in zip(chunk, drawn):
                    images[i] = image
        return images

    def _draw(self, labels, generators, num_inference_steps: int, guidance_scale: float) -> list[Image.Image]:
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
        # The map's aspect ratio, its short side at the training resolution, as generate_controlnet_seg.py does.
        return output_size(*label.shape, self.resolution, self.size_multiple)

    def prompt(self, label) -> str:
        """The class prompt of a map, worded as in training (the run's template and top-k)."""
        return label_map_prompt(label, self.class_names, self.prompt_template, self.prompt_top_k, self.ignore_index)

    def condition(self, label, height: int | None = None, width: int | None = None) -> ControlCondition:
        """The map at the output size (default: `output_size`), coloured as in training (no data black), and
        its class prompt (of the resized map: what the image shows)."""
        label = np.asarray(label)
        size = (height, width) if height is not None else self.output_size(label)
        label = resize_labels(label, *size)
        return ControlCondition(label, colorize_label(label, self.palette, self.ignore_index), self.prompt(label))

    def _draw(self, labels, generators, num_inference_steps, guidance_scale):
        height, width = labels[0].shape  # all of them: render() resized them to the output size
        conditions = [self.condition(label, height, width) for label in labels]
        return self.pipeline(
            [c.prompt for c in conditions],
            [c.control for c in conditions],
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
        ).images


class SDMRenderer(Renderer):
    kind = "sdm"
    default_scheduler = SDM_SCHEDULER
    default_guidance_scale = SDM_GUIDANCE_SCALE

    def make_sampler(self, name: str):
        return make_scheduler(
            name, self.scheduler_config, stochastic=True
        )  # "dpmsolver": the stochastic DPM-Solver++ (see there)

    def output_size(self, label):
        # The training size whatever the map's shape, as generate_spade_sdm.py does.
        return self.pipeline.default_size

    def _draw(self, labels, generators, num_inference_steps, guidance_scale):
        height, width = labels[0].shape
        return self.pipeline(
            labels,
            num_images_per_mask=1,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=generators,
            height=height,
            width=width,
        ).images


def load_renderer(
    folder: str | Path, base: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Renderer:
    """The renderer of a trained folder (or of a checkpoint-N/ in one): see the module docstring.

    ``base``: the Stable Diffusion base of a ControlNet (default: the one its training_config.json names, loaded
    with the run's --variant); an SDM carries its own models and refuses one.
    """
    folder = Path(folder)
    kind = renderer_kind(folder)
    if kind == "sdm":
        if base is not None:
            raise RendererError(f"{folder} holds an SDM, which has no separate base: do not pass base={base!r}.")
        pipeline = load_sdm_pipeline(folder, dtype).to(device)
        class_names = pipeline.class_names
        return SDMRenderer(
            pipeline,
            class_names,
            load_sdm_palette(folder, len(class_names)),
            pipeline.config.ignore_index,
            min(pipeline.default_size),
            folder,
        )
    controlnet, run_dir = load_controlnet(folder, dtype)
    config, class_names, palette = load_run_files(run_dir)
    base = recorded_base(config, run_dir, base)
    pipeline = load_controlnet_pipeline(base, controlnet, dtype, variant=config.get("variant")).to(device)
    return ControlNetRenderer(
        pipeline,
        class_names,
        palette,
        run_setting(config, "ignore_index"),
        run_setting(config, "resolution"),
        folder,
        prompt_template=run_setting(config, "prompt_template"),
        prompt_top_k=run_setting(config, "prompt_top_k"),
    )
