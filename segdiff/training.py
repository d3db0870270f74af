"""Accelerate plumbing shared by every trainer.

Each ``train_*.py`` script keeps its own readable loop (data, model, loss); what they would all
repeat lives here once:

* command-line arguments common to every trainer (names follow diffusers' train_controlnet.py),
* accelerator, logging and tracker set-up,
* optimizer (8-bit Adam on request) and learning-rate schedule (diffusers' ``get_scheduler``),
* a data sampler whose shuffling and per-sample randomness are pure functions of
  (seed, epoch, index), so a resumed run sees exactly the batches and augmentations an
  uninterrupted run would,
* checkpoints: diffusers-format models inside ``accelerator.save_state`` folders, written under a
  temporary name and renamed, rotated by ``--checkpoints_total_limit``, resumed with
  ``--resume_from_checkpoint latest|PATH`` at the exact batch inside the epoch,
* EMA through diffusers' ``EMAModel``, a stop on a non-finite loss, and the
  ``training_config.json`` / ``class_names.json`` that travel with every trained folder,
* the GPU speed options (``--allow_tf32 --channels_last --torch_compile``, fused AdamW, foreach EMA, pinned
  batches with non-blocking copies), each one helper every trainer calls in the same place.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DynamoBackend, ProjectConfiguration, set_seed
from packaging.version import Version
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from segdiff.arguments import (
    fraction,
    image_size,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
)
from segdiff.data import DatasetError, SegmentationDataset, bad_data_error, first_line, read_json, scan_dataset
from segdiff.files import write_json_atomic
from segdiff.geometry import ImageSize, check_size_multiple, size_multiple, unet_downsampling, vae_scale_factor
from segdiff.processes import launched_on_cpus_only
from segdiff.runs import LOCAL_FOLDER, recorded_path
from segdiff.seeds import derive_seed

logger = get_logger(__name__)

# diffusers' examples' default warmup, which their default constant schedule ignores, as ours does.
DEFAULT_LR_WARMUP_STEPS = 500

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# --lr_scheduler: diffusers' get_scheduler names that need no other argument, and `exponential_lr_schedule`.
LR_SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "exponential",
)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def add_training_args(parser: argparse.ArgumentParser, *, default_resolution: int = 512) -> None:
    """The arguments every trainer shares, named as in diffusers' examples/controlnet/train_controlnet.py."""
    group = parser.add_argument_group("training")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A Stable-Diffusion-format folder (or hub id when online): model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/. `python -m segdiff.tiny --output_dir DIR` writes a tiny one offline.",
    )
    group.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model (hub only).")
    group.add_argument("--variant", type=str, default=None, help="Weights variant of the pretrained model, e.g. fp16.")
    group.add_argument(
        "--output_dir", type=output_folder, required=True, help="Where the trained model and checkpoints go."
    )
    group.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="Seeds model init, shuffling, augmentation and noise. Resumed runs reproduce uninterrupted ones.",
    )
    group.add_argument(
        "--resolution",
        type=image_size,
        default=ImageSize.of(default_resolution),
        help="Training size: N (a square) or HEIGHT,WIDTH (e.g. 384,512). Images are resized to cover it, then "
        "cropped to it. (default: %(default)s)",
    )
    group.add_argument("--center_crop", action="store_true", help="Center-crop instead of random-crop to --resolution.")
    group.add_argument("--no_random_flip", dest="random_flip", action="store_false", help="Disable horizontal flips.")
    group.add_argument(
        "--random_affine",
        action="store_true",
        help="Apply the same random rotation/scale/translation to image and mask (labels padded with ignore).",
    )
    group.add_argument("--train_batch_size", type=positive_int, default=4, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=positive_int, default=1)
    group.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=None,
        help="Total optimizer steps. If given, overrides --num_train_epochs; training stops exactly here.",
    )
    group.add_argument(
        "--max_train_samples",
        type=positive_int,
        default=None,
        help="Train on N of the pairs only, chosen by a hash of their names, not by --seed: every trainer and "
        "evaluate.py --downstream given the same data and N take the same pairs, and a smaller N keeps a subset "
        "of a larger N's. training_config.json lists them (train_samples). Default: all.",
    )
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    group.add_argument(
        "--gradient_checkpointing", action="store_true", help="Trade compute for memory in the trained model."
    )
    group.add_argument(
        "--learning_rate", type=non_negative_float, default=1e-4, help="Initial learning rate (after warmup)."
    )
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x number of processes.",
    )
    group.add_argument(
        "--lr_scheduler",
        choices=LR_SCHEDULES,
        default="constant",
        help="One of diffusers' schedules (linear, cosine, cosine_with_restarts, polynomial, constant, "
        "constant_with_warmup), or exponential: linear warmup, then the rate times --lr_exponential_gamma at every "
        "optimizer step. (default: %(default)s)",
    )
    group.add_argument(
        "--lr_warmup_steps",
        type=non_negative_int,
        default=DEFAULT_LR_WARMUP_STEPS,
        help="Warmup steps of the lr schedule (every schedule but constant, which has none). (default: %(default)s)",
    )
    group.add_argument("--lr_num_cycles", type=positive_int, default=1, help="Hard resets of cosine_with_restarts.")
    group.add_argument("--lr_power", type=positive_float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument(
        "--lr_exponential_gamma",
        type=fraction,
        default=0.9999,
        help="Per-step decay of --lr_scheduler exponential, in (0, 1] (0.9999 halves the rate every 6931 steps "
        "after warmup). Default: %(default)s",
    )
    group.add_argument(
        "--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (CUDA only; pip install bitsandbytes)."
    )
    group.add_argument("--adam_beta1", type=fraction, default=0.9)
    group.add_argument("--adam_beta2", type=fraction, default=0.999)
    group.add_argument("--adam_weight_decay", type=non_negative_float, default=1e-2)
    group.add_argument("--adam_epsilon", type=non_negative_float, default=1e-08)
    group.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="Gradient clipping norm.")
    group.add_argument(
        "--deterministic",
        action="store_true",
        help="Deterministic algorithms only (torch.use_deterministic_algorithms, and CUBLAS_WORKSPACE_CONFIG=:4096:8 "
        "for cuBLAS): on CUDA, what makes a resumed run end bit for bit where an uninterrupted one does (on CPUs it "
        "does without the flag). Slower; an operation without a deterministic version stops the run with torch's "
        "error naming it.",
    )
    group.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    group.add_argument("--ema_decay", type=fraction, default=0.9999, help="Maximum EMA decay (warmup ramps up to it).")
    group.add_argument(
        "--dataloader_num_workers",
        type=non_negative_int,
        default=0,
        help="Data loading subprocesses (0: main process).",
    )
    group.add_argument(
        "--checkpointing_steps",
        type=positive_int,
        default=500,
        help="Save a resumable checkpoint (checkpoint-N/) every N optimizer steps.",
    )
    group.add_argument(
        "--checkpoints_total_limit", type=positive_int, default=None, help="Keep only the newest N checkpoints."
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder, or "latest" for the newest complete one in --output_dir.',
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides the accelerate config. bf16 needs Ampere or newer (A100).",
    )
    group.add_argument(
        "--set_grads_to_none", action="store_true", help="Free gradients instead of zeroing them (less memory)."
    )
    group.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Tracker: "tensorboard" (default), "wandb", "comet_ml", "all" or "none".',
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--tracker_project_name", type=str, default=None, help="Project name for the trackers.")
    group.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the trained output folder to the Hugging Face Hub at the end.",
    )
    group.add_argument("--hub_token", type=str, default=None, help="Token for --push_to_hub (default: your login).")
    group.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="Repository for --push_to_hub (default: the output folder's name).",
    )
    group.add_argument(
        "--validation_steps",
        type=non_negative_int,
        default=500,
        help="Generate validation samples every N optimizer steps (0 disables); grids go to output_dir/validation/.",
    )
    add_speed_args(parser)


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """GPU-side speed options: each leaves the maths as it is (results equal up to float rounding) and does nothing
    on a CPU but what its help says."""
    group = parser.add_argument_group("GPU speed (see the README's 'Speed options on GPUs')")
    group.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Let Ampere and newer GPUs run float32 matmuls and convolutions in TF32 (10-bit mantissa): much faster "
        "fp32 maths, as diffusers' examples offer. Sets torch.backends.cuda.matmul.allow_tf32 and "
        "torch.backends.cudnn.allow_tf32 (PyTorch already allows TF32 convolutions by default). "
        "No effect without CUDA.",
    )
    group.add_argument(
        "--channels_last",
        action="store_true",
        help="Keep the trained model and the frozen convolutional models (UNet, ControlNet, VAE) in the channels-last "
        "(NHWC) memory format, which tensor-core convolutions read without transposing (mixed precision on recent "
        "NVIDIA GPUs). Inputs need no conversion: a convolution with channels-last weights returns channels-last "
        "output. Saved weights are the same, in the usual layout.",
    )
    group.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the trained model with torch.compile, through accelerate (in accelerator.prepare, as "
        "`accelerate launch --dynamo_backend` does). The first steps pay for the compilation (minutes for a full-size "
        "UNet); checkpoints, resume, EMA, validation and the saved model use the plain module.",
    )
    group.add_argument(
        "--torch_compile_mode",
        choices=["default", "reduce-overhead", "max-autotune"],
        default="default",
        help="torch.compile's mode, with --torch_compile: reduce-overhead adds CUDA graphs, max-autotune also "
        "benchmarks kernels (longest compile). Modes are inductor's. (default: %(default)s)",
    )
    group.add_argument(
        "--torch_compile_backend",
        choices=[backend.value.lower() for backend in DynamoBackend if backend is not DynamoBackend.NO],
        default="inductor",
        help="torch.compile's backend, with --torch_compile: inductor generates fused kernels; eager and aot_eager "
        "only trace (for debugging, and the tests). (default: %(default)s)",
    )


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the types of add_training_args cannot refuse on their own, as usage errors: before any file is read or
    written (every trainer's parse_args ends with this)."""
    for name in ("adam_beta1", "adam_beta2"):
        if getattr(args, name) == 1:
            parser.error(f"--{name} must be below 1: AdamW's running average would never move from its start")
    if args.lr_exponential_gamma == 0:
        parser.error("--lr_exponential_gamma must be in (0, 1]: it is the per-step decay factor of the rate")


def check_resolution(resolution: ImageSize, multiple: int, why: str) -> None:
    """Stop unless both sides of ``--resolution`` are multiples of ``multiple``, the model's factor (``why``: where
    it comes from)."""
    try:
        check_size_multiple(resolution, multiple, why)
    except ValueError as error:
        raise DatasetError(f"--resolution {resolution}: {error}.") from None


def base_model_config(model_class, args: argparse.Namespace, subfolder: str | None) -> dict:
    """The config of one model of ``--pretrained_model_name_or_path`` (its config file only, no weights): a path that
    holds no such model is refused here, naming the flag, before anything is loaded or written."""
    base = args.pretrained_model_name_or_path
    try:
        return model_class.load_config(base, subfolder=subfolder, revision=args.revision)
    except (OSError, ValueError) as error:
        raise DatasetError(
            f"--pretrained_model_name_or_path {base} holds no {model_class.__name__} in {subfolder or '.'}/ "
            f"({first_line(error)}). Fix: pass a Stable Diffusion folder (model_index.json, vae/, unet/, "
            "text_encoder/, tokenizer/, scheduler/; python -m segdiff.tiny --output_dir DIR writes a tiny one), or a "
            "hub id."
        ) from None


def check_base_resolution(args: argparse.Namespace) -> None:
    """Refuse a base that is no Stable Diffusion model, and a ``--resolution`` that does not land on whole latent
    cells its UNet can halve at every level: from the base's configs, before its weights load."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = base_model_config(AutoencoderKL, args, "vae")
    unet = base_model_config(UNet2DConditionModel, args, "unet")
    why = f"for this base: VAE factor {vae_scale_factor(vae)} x UNet downsampling {unet_downsampling(unet)}"
    check_resolution(args.resolution, size_multiple(vae, unet), why)


def read_model_config(path: str | Path, model_class, flag: str = "--model_config") -> dict:
    """A model size file (configs/models/*.json) as the keyword arguments of ``model_class`` (keys starting with
    ``_`` are comments). A file of another model (its ``_class_name``), a key the model does not take, or a broken
    file is refused, naming the flag and the file."""
    fix = "Fix: pass one of the JSON files in configs/models/, or a copy of one."
    config = read_json(Path(path), f"{flag}", fix, an_object=True)
    class_name = config.get("_class_name", model_class.__name__)
    if class_name != model_class.__name__:
        raise DatasetError(f"{flag} {path} is a config of {class_name}, not of {model_class.__name__}. {fix}")
    accepted = inspect.signature(model_class.__init__).parameters
    unknown = sorted(key for key in config if not key.startswith("_") and key not in accepted)
    if unknown:
        raise DatasetError(
            f"{flag} {path} has keys that {model_class.__name__} does not take: {', '.join(unknown)}. {fix}"
        )
    return {key: value for key, value in config.items() if not key.startswith("_")}


def create_hub_repo(accelerator: Accelerator, args: argparse.Namespace) -> str | None:
    """The repository id --push_to_hub uploads to, created (or found) before training, so that a missing network
    or a bad token fails now and not after hours of training; None without --push_to_hub or off the main process."""
    if not args.push_to_hub:
        return None
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise SystemExit(
            "--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set. Fix: unset it, or drop --push_to_hub."
        )
    if not accelerator.is_main_process:
        return None
    repo_id = args.hub_model_id or Path(args.output_dir).name
    return huggingface_hub.create_repo(repo_id=repo_id, exist_ok=True, token=args.hub_token).repo_id


def upload_to_hub(args: argparse.Namespace, repo_id: str | None) -> None:
    """Upload the finished output folder (not its checkpoints or logs), with its model card (`save_model_card`), to
    ``repo_id`` from `create_hub_repo`.

    JSON files go up as `shareable_config` makes them: training_config.json names the data and base folders, and
    diffusers writes the base's path into each model's config.json (``_name_or_path``); the uploaded copies carry
    only the folders' names. The local files keep full paths, which the generators read back.
    """
    if repo_id is None:
        return
    import huggingface_hub

    output_dir = Path(args.output_dir)
    save_model_card(args, repo_id)
    logger.info(f"Uploading {output_dir} to the Hub repository {repo_id}")
    operations = []
    for path in sorted(output_dir.rglob("*")):
        relative = path.relative_to(output_dir)
        if not path.is_file() or _kept_off_the_hub(relative, args.logging_dir):
            continue
        content = path
        if path.suffix == ".json":
            content = (json.dumps(shareable_config(json.loads(path.read_text())), indent=2) + "\n").encode()
        operations.append(huggingface_hub.CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=content))
    huggingface_hub.create_commit(
        repo_id=repo_id, operations=operations, commit_message="End of training", token=args.hub_token
    )


# Per kind of model (training_config.json's "pipeline"): its Hub tag, what it is, and how it loads.
MODEL_CARD_KINDS = {
    "joint_image_mask": (
        "joint-image-mask",
        "A joint image + mask latent diffusion model: a Stable Diffusion UNet widened to denoise an image latent and "
        "the mask of one class together, prompted by the class name.",
        "DiffusionPipeline.from_pretrained({repo_id!r}, trust_remote_code=True)",
    ),
    "controlnet_seg": (
        "controlnet",
        "A ControlNet on colour-coded segmentation maps: each class drawn in its colour below, no-data black.",
        "ControlNetModel.from_pretrained({repo_id!r})",
    ),
    "spade_sdm": (
        "sdm",
        "A Semantic Diffusion Model (SPADE UNet): images drawn from label maps.",
        "DiffusionPipeline.from_pretrained({repo_id!r}, trust_remote_code=True)",
    ),
    "layout_diffusion": (
        "layout",
        "A layout diffusion model: multi-class label maps drawn for requested class ratios.",
        "DiffusionPipeline.from_pretrained({repo_id!r}, trust_remote_code=True)",
    ),
}


def save_model_card(args: argparse.Namespace, repo_id: str) -> Path:
    """``README.md`` of the output folder, the Hub's model card, written with diffusers' helpers as diffusers'
    examples write theirs: the base model, the data, the classes and their colours, the command that trained the
    model (no secret, local paths shortened as `shareable_config` does), the last validation grid, and the tags."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    from segdiff.data import load_class_names
    from segdiff.labels import default_palette

    output_dir = Path(args.output_dir)
    config = json.loads((output_dir / "training_config.json").read_text())
    tag, summary, loading = MODEL_CARD_KINDS[config["pipeline"]]
    base = args.pretrained_model_name_or_path
    base_on_hub = base is not None and not Path(base).exists()
    if base is None:
        base_shown = "none (trained from scratch)"
    else:
        base_shown = f"[{base}](https://huggingface.co/{base})" if base_on_hub else f"`{local_name(base)}`"
    data_root, train_data_dir, dataset_name = (
        getattr(args, name, None) for name in ("data_root", "train_data_dir", "dataset_name")
    )
    hub_dataset = dataset_name if dataset_name and not Path(dataset_name).exists() else None
    if hub_dataset:
        data = f"[{hub_dataset}](https://huggingface.co/datasets/{hub_dataset})"
    else:  # --data_root in --dataset's layout, or the ControlNet trainer's --train_data_dir or local --dataset_name
        data = f"`{local_name(data_root or train_data_dir or dataset_name)}`"
        data += f" (`--dataset {args.dataset}`)" if data_root else ""
    lines = [
        summary,
        "",
        "```python",
        f"from diffusers import {loading.split('.')[0]}",
        "",
        f"model = {loading.format(repo_id=repo_id)}",
        "```",
        "",
        f"- Base model: {base_shown}",
        f"- Data: {data}, {len(config['train_samples'])} training pairs",
        f"- Steps: {args.max_train_steps}, batch {args.train_batch_size} per process, learning rate {args.learning_rate}",
    ]
    names_file = output_dir / "class_names.json"
    if names_file.is_file():
        names, palette = load_class_names(names_file)
        palette = palette or default_palette(len(names))
        lines += ["", "| id | class | colour |", "| --- | --- | --- |"]
        lines += [
            f"| {i} | {name} | `#{r:02x}{g:02x}{b:02x}` |" for i, (name, (r, g, b)) in enumerate(zip(names, palette))
        ]
    command = [Path(sys.argv[0]).name, *command_line(sys.argv[1:])]
    lines += [
        "",
        f"Trained with segdiff's `{command[0]}`:",
        "",
        "```bash",
        f"accelerate launch {shlex.join(command)}",
        "```",
    ]
    grids = sorted((output_dir / "validation").glob("*.png"))
    if grids:
        lines += ["", f"![validation at the last step](validation/{grids[-1].name})"]
    card = load_or_create_model_card(
        repo_id_or_path=repo_id,
        token=args.hub_token,
        from_training=True,
        base_model=base if base_on_hub else None,
        model_description="\n".join(lines),
    )
    if hub_dataset:
        card.data.datasets = [hub_dataset]
    card = populate_model_card(card, tags=["diffusers", "semantic-image-synthesis", tag])
    card.save(output_dir / "README.md")
    return output_dir / "README.md"


def local_name(path: str) -> str:
    """A local path as the Hub is shown it: `<local>/<folder name>` (see `shareable_config`)."""
    return shareable_config(str(Path(path).resolve()))


def command_line(arguments: list[str]) -> list[str]:
    """A command's arguments as they may be shown: secrets left out, absolute paths shortened."""
    shown, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
            continue
        name = argument.split("=", 1)[0].removeprefix("--")
        if name in SECRET_ARGUMENTS:
            skip = "=" not in argument
            continue
        shown.append(shareable_config(argument))
    return shown


def _kept_off_the_hub(relative: Path, logging_dir: str) -> bool:
    """Checkpoints (resume state: pickled optimizer and RNG), half-written files and the tracker logs."""
    top = relative.parts[0]
    return CHECKPOINT_PATTERN.fullmatch(top) is not None or top.startswith(".") or top == Path(logging_dir).parts[0]


# Arguments that are never written to disk, logged, sent to a tracker or uploaded.
SECRET_ARGUMENTS = ("hub_token",)


def run_config(args: argparse.Namespace) -> dict:
    """The run's arguments as they may be written down: every argument except the secrets."""
    return {key: value for key, value in vars(args).items() if key not in SECRET_ARGUMENTS}


def shareable_config(config):
    """A copy of a JSON config for the Hub: absolute paths of this machine become ``<local>/<name>``, which still
    tells a reader which folder was used, without the user's directory tree."""
    if isinstance(config, dict):
        return {key: shareable_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [shareable_config(value) for value in config]
    if isinstance(config, str) and os.path.isabs(config):
        return f"{LOCAL_FOLDER}/{Path(config).name}"
    return config


# --------------------------------------------------------------------------------------------
# Accelerator, optimizer, schedule
# --------------------------------------------------------------------------------------------


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """Accelerator with project folders (made later, by `make_output_dir`), logging and seeding.

    It also carries two speed options: ``--torch_compile`` (accelerate compiles each prepared model) and
    non-blocking host-to-device copies of the batches on CUDA (`dataloader_configuration`); and ``--deterministic``
    (`use_deterministic_algorithms`), and the libraries' logs on one process per machine (`quiet_other_processes`).
    """
    use_deterministic_algorithms(args)  # before any CUDA work: cuBLAS reads its workspace setting once
    output_dir = Path(args.output_dir)
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(
        cpu=launched_on_cpus_only(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
        dataloader_config=dataloader_configuration(),
        dynamo_plugin=torch_compile_plugin(args),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    quiet_other_processes(accelerator)
    if args.deterministic:
        logger.info(f"Deterministic algorithms only (CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']})")
    set_seed(args.seed)
    allow_tf32(args)
    return accelerator


def make_output_dir(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Create ``--output_dir`` once the run's data and models are known good (a refused run leaves no folder), and
    sweep the half-written checkpoints a crash left there (`recover_checkpoints`) before a resume looks for one."""
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        recover_checkpoints(Path(args.output_dir))
    accelerator.wait_for_everyone()


def quiet_other_processes(accelerator: Accelerator) -> None:
    """The libraries' logs and progress bars on one process per machine, as in diffusers' examples: there,
    transformers' warnings and diffusers' info; elsewhere errors only, and no loading or download bars (8 GPUs would
    print 8 copies of each)."""
    import diffusers
    import huggingface_hub
    import transformers

    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
        return
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def use_deterministic_algorithms(args: argparse.Namespace) -> None:
    """``--deterministic``: torch's deterministic algorithms only, and cuBLAS's fixed workspace that they need
    (``CUBLAS_WORKSPACE_CONFIG``, unless already set), with cuDNN's autotuner off. Without it, some CUDA kernels
    add in an order that changes from run to run (atomic adds in index and scatter backward passes, cuBLAS's
    workspaces, the cuDNN algorithm the autotuner picks), so two runs agree only up to rounding."""
    if not args.deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def allow_tf32(args: argparse.Namespace) -> None:
    """``--allow_tf32`` on CUDA: TF32 for float32 matmuls (cuBLAS) and convolutions (cuDNN; torch's default already).

    Set through the ``allow_tf32`` switches diffusers' examples use; torch reports the same state through its newer
    ``fp32_precision`` settings, which are left alone (torch refuses reads after both kinds were set).
    """
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def dataloader_configuration():
    """Non-blocking host-to-device copies of the batches where they overlap with compute: on CUDA, from the pinned
    memory `make_train_dataloader` asks for there. Elsewhere accelerate's defaults, so CPU runs are unchanged."""
    from accelerate.utils import DataLoaderConfiguration

    return DataLoaderConfiguration(non_blocking=torch.cuda.is_available())


def torch_compile_plugin(args: argparse.Namespace):
    """accelerate's dynamo plugin for ``--torch_compile``, or None (then accelerate's own config decides, e.g.
    ``accelerate launch --dynamo_backend``).

    accelerate compiles each model in ``accelerator.prepare``, after wrapping it for distributed training, which is
    what torch recommends for DDP; only the trained models are prepared, so frozen ones stay uncompiled. Code that
    needs the plain module (saving, hooks, validation) goes through `unwrap_model`.
    """
    if not args.torch_compile:
        if (args.torch_compile_mode, args.torch_compile_backend) != ("default", "inductor"):
            raise SystemExit(
                "--torch_compile_mode and --torch_compile_backend only apply to a compiled model: add --torch_compile."
            )
        return None
    if args.torch_compile_mode != "default" and args.torch_compile_backend != "inductor":
        raise SystemExit(
            f"--torch_compile_mode {args.torch_compile_mode} is a mode of the inductor backend, not of "
            f"--torch_compile_backend {args.torch_compile_backend}. Fix: use --torch_compile_backend inductor, or "
            "drop --torch_compile_mode."
        )
    from accelerate.utils import TorchDynamoPlugin

    return TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)


def unwrap_model(accelerator: Accelerator, model):
    """The plain model under what ``accelerator.prepare`` wrapped around it: DDP/FSDP/DeepSpeed and torch.compile
    (diffusers' examples' ``unwrap_model``). accelerate's own unwrap keeps the compiled wrapper by default, which
    is not the module that was registered, saved or given to a pipeline."""
    from accelerate.utils import is_compiled_module

    model = accelerator.unwrap_model(model)
    return model._orig_mod if is_compiled_module(model) else model


def use_channels_last(args: argparse.Namespace, *models) -> None:
    """``--channels_last``: convert the models' 4-d weights to the channels-last memory format, in place.

    Called before the EMA copy, the optimizer and ``accelerator.prepare``, so all of them see the final layout.
    ``None`` entries (an absent VAE) are skipped.
    """
    if not args.channels_last:
        return
    for model in models:
        if model is not None:
            model.to(memory_format=torch.channels_last)


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    """The dtype for frozen models (VAE, text encoder): half precision when training in mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def adamw_implementation(device) -> dict:
    """AdamW's keyword for the fastest implementation on ``device``, where the parameters train.

    torch's fused kernel where it has one: CUDA, and CPUs from torch 2.4. It updates all parameters in a few
    passes instead of a loop over tensors: for the medium ControlNet of benchmarks/bench_reference.py (15 M
    parameters in 340 tensors) a CPU optimizer step takes 10.7 ms against the per-tensor loop's 29.9 ms. Its results
    equal the per-tensor loop's up to float rounding (tests/test_speed_options.py). ``foreach`` on a CUDA torch
    without it; elsewhere torch's own default.
    """
    kind = torch.device(device).type
    has_fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
    if has_fused and (kind == "cuda" or (kind == "cpu" and Version(torch.__version__).release >= (2, 4))):
        return {"fused": True}
    return {"foreach": True} if kind == "cuda" else {}


def make_optimizer(args: argparse.Namespace, parameters, accelerator: Accelerator) -> torch.optim.Optimizer:
    """AdamW (fused where torch has it, see `adamw_implementation`), or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam``."""
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer_class, implementation = torch.optim.AdamW, adamw_implementation(accelerator.device)
    if args.use_8bit_adam:
        if not torch.cuda.is_available():
            raise SystemExit("--use_8bit_adam needs a CUDA GPU (bitsandbytes); drop the flag to train on CPU.")
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise SystemExit("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from error
        optimizer_class, implementation = bnb.optim.AdamW8bit, {}
    logger.info(
        f"Optimizer: {optimizer_class.__name__} ({', '.join(implementation) or 'torch default'} implementation)"
    )
    return optimizer_class(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **implementation,
    )


def make_ema(model, args: argparse.Namespace):
    """diffusers' ``EMAModel`` of ``model``'s weights (saved as a ``type(model)``), updated with torch's multi-tensor
    ``foreach`` kernels: one launch per step for all the weights instead of one per tensor, the same values."""
    from diffusers.training_utils import EMAModel

    return EMAModel(
        model.parameters(), decay=args.ema_decay, model_cls=type(model), model_config=model.config, foreach=True
    )


def plan_steps(args: argparse.Namespace, train_dataloader: DataLoader, accelerator: Accelerator) -> int:
    """Fill in ``args.max_train_steps``/``args.num_train_epochs`` from each other; returns updates per epoch.

    Called before ``accelerator.prepare``, which then takes the lr schedule with the models, optimizer and
    dataloader in one call (as diffusers' examples, and DeepSpeed, need): each process gets every n-th batch, the
    last ones evened out (accelerate's default ``even_batches``), so ceil(batches / processes) per process.
    """
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    updates_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    return updates_per_epoch


def make_lr_scheduler(args: argparse.Namespace, optimizer, accelerator: Accelerator):
    """diffusers' get_scheduler, or `exponential_lr_schedule` for ``--lr_scheduler exponential``; step counts are
    multiplied by the process count because the prepared scheduler steps once per process per update (as in
    diffusers' examples)."""
    from diffusers.optimization import get_scheduler

    warn_about_the_warmup(args)

    if args.lr_scheduler == "exponential":
        return exponential_lr_schedule(
            optimizer,
            warmup_steps=args.lr_warmup_steps,
            gamma=args.lr_exponential_gamma,
            steps_per_update=accelerator.num_processes,
        )
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def warn_about_the_warmup(args: argparse.Namespace) -> None:
    """Say when ``--lr_warmup_steps`` does not do what it reads as: diffusers' constant schedule has no warmup, so a
    warmup asked for with it is silently ignored (the default's 500 is not warned about: diffusers' examples pair it
    with "constant" too); and a warmup as long as the run never reaches ``--learning_rate``."""
    warmup, steps = args.lr_warmup_steps, args.max_train_steps
    if args.lr_scheduler == "constant" and warmup not in (0, DEFAULT_LR_WARMUP_STEPS):
        logger.warning(
            f"--lr_warmup_steps {warmup} has no effect: --lr_scheduler constant does not warm up. Fix: "
            "--lr_scheduler constant_with_warmup to warm up, or leave --lr_warmup_steps out."
        )
    elif args.lr_scheduler != "constant" and warmup >= steps:
        logger.warning(
            f"--lr_warmup_steps {warmup} is not below --max_train_steps {steps}: the learning rate rises for the "
            f"whole run and ends at {steps / warmup:.0%} of --learning_rate. Fix: a shorter warmup (a few percent of "
            "the run)."
        )


def exponential_lr_schedule(optimizer, *, warmup_steps: int, gamma: float, steps_per_update: int = 1):
    """Linear warmup over ``warmup_steps`` optimizer updates (from 0, as diffusers' warmups), then the rate times
    ``gamma`` at every update: ``lr * gamma ** (update - warmup_steps)``. diffusers has no exponential schedule;
    the earlier landscape project trained with one (torch's ExponentialLR, which has no warmup).

    ``steps_per_update``: how often the scheduler is stepped per optimizer update (accelerate's prepared
    scheduler steps once per process), so the rate depends on the update count alone.
    """
    if not 0 < gamma <= 1:
        raise SystemExit(f"--lr_exponential_gamma must be in (0, 1], got {gamma}: it is the per-step decay factor.")
    if warmup_steps < 0:
        raise SystemExit(f"--lr_warmup_steps must be >= 0, got {warmup_steps}.")

    def factor(step: int) -> float:
        update = step / steps_per_update
        if update < warmup_steps:
            return update / warmup_steps
        return gamma ** (update - warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# The --loss_type choices of the trainers that offer one.
LOSS_TYPES = ("l2", "l1")


def noise_prediction_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2") -> torch.Tensor:
    """Per-sample loss, averaged over every other dimension (in float32): ``l2`` the mean squared error (DDPM's
    "simple" loss), ``l1`` the mean absolute error (latent diffusion's ``loss_type: l1``)."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        error = torch.nn.functional.mse_loss(prediction, target, reduction="none")
    elif loss_type == "l1":
        error = torch.nn.functional.l1_loss(prediction, target, reduction="none")
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return error.mean(dim=tuple(range(1, error.ndim)))


def init_trackers(accelerator: Accelerator, args: argparse.Namespace, default_project: str) -> None:
    """Start the trackers with the run's arguments (only values tensorboard can show)."""
    if not accelerator.is_main_process or args.report_to == "none":
        return
    config = {k: v for k, v in run_config(args).items() if isinstance(v, int | float | str | bool)}
    accelerator.init_trackers(args.tracker_project_name or default_project, config=config)


# --------------------------------------------------------------------------------------------
# Data: deterministic shuffling and per-sample randomness
# --------------------------------------------------------------------------------------------


def check_training_data(
    accelerator: Accelerator, dataset: SegmentationDataset, *, read_images: bool = True
) -> list[int]:
    """Refuse bad training data before any model loads, with every problem found, not at the batch that draws it.

    This is the check of ``python -m segdiff.data check`` (`segdiff.data.scan_dataset`; ``read_images=False``
    for a trainer that reads only the masks), split across the processes: each scans a contiguous share of the
    pairs, and the problems are gathered, in dataset order, to every process, so all of them stop together (none
    waits for one that has left) and a run of N processes pays 1/N of the time.

    Returns the pixels of each class over all the pairs, which the trainers record (training_config.json's
    ``train_class_pixels``): a generator can then tell the classes the model has seen from those it never has.
    """
    from accelerate.utils import gather_object

    share = np.array_split(np.arange(len(dataset)), accelerator.num_processes)[accelerator.process_index]
    scan = scan_dataset(
        dataset.select(share.tolist()), read_images=read_images, progress=accelerator.is_local_main_process
    )
    problems = gather_object(scan.problems)
    if problems:
        raise bad_data_error(dataset, problems)
    logger.info(f"Checked the {len(dataset)} training pairs: no problems")
    return np.sum(gather_object([scan.class_pixels]), axis=0).tolist()


class EpochSeededSampler(Sampler):
    """Yields ``(index, sample_seed)`` pairs: a permutation fixed by (seed, epoch), and a seed per sample.

    The sample seed drives that sample's augmentation and any random choice made for it (its noise,
    timestep, selected class ...). Nothing depends on a global RNG that a resume, another worker count
    or another process count would change. Set the epoch with :meth:`start_epoch` (deliberately not
    ``set_epoch``: accelerate calls that with its own iteration counter, which restarts on resume).
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(
                self.num_samples, generator=torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch))
            ).tolist()
        else:
            order = range(self.num_samples)
        for index in order:
            yield index, derive_seed(self.seed, "sample", self.epoch, index)


class SeededDataset(Dataset):
    """Wraps a dataset so ``dataset[(index, seed)]`` runs ``process(sample, generator)`` under that seed.

    The global torch RNG is forked and seeded for the call, so torchvision's random transforms are
    reproducible; ``generator`` (a ``torch.Generator`` on the same seed) is for the trainer's own choices.
    """

    def __init__(self, dataset, process):
        self.dataset = dataset
        self.process = process

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, derive_seed("unseeded", key))
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator, which the transforms draw from: torch.manual_seed also seeds every
            # accelerator backend and costs milliseconds per sample once a trainer has imported them all.
            torch.default_generator.manual_seed(seed)
            example = self.process(self.dataset[index], torch.Generator().manual_seed(seed))
        example["seed"] = seed
        return example


@torch.no_grad()
def encode_latent_distributions(items, vae, accelerator: Accelerator, weight_dtype, batch_size: int = 16) -> list:
    """For ``--cache_latents``: the VAE latent distribution of every image and of its mirror, encoded once.

    ``items`` yields pixel tensors (3, H, W) in [-1, 1]. Returns, per item, ``[(mean, std), (mean, std) of the
    mirror]`` on the CPU in the weight dtype; each step then samples its latent from them with the batch's own
    generator, exactly as encoding that step would.
    """
    distributions, batch = [], []

    def flush():
        pixels = torch.stack(batch).to(accelerator.device, dtype=weight_dtype)
        plain, mirrored = (vae.encode(p).latent_dist for p in (pixels, pixels.flip(-1)))
        for views in zip(plain.mean, plain.std, mirrored.mean, mirrored.std):
            mean, std, mirror_mean, mirror_std = (view.cpu() for view in views)
            distributions.append([(mean, std), (mirror_mean, mirror_std)])
        batch.clear()

    for pixels in items:
        batch.append(pixels)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return distributions


def make_train_dataloader(
    dataset: Dataset, args: argparse.Namespace, collate_fn
) -> tuple[DataLoader, EpochSeededSampler]:
    sampler = EpochSeededSampler(len(dataset), seed=args.seed)
    dataloader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.train_batch_size,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        drop_last=False,
        # Page-locked batches copy to a GPU asynchronously (see `dataloader_configuration`); pointless without one.
        pin_memory=torch.cuda.is_available(),
    )
    return dataloader, sampler


def batch_generator(seeds: torch.Tensor | list[int], device) -> torch.Generator:
    """One generator for a batch's noise and timesteps, fixed by the seeds of the samples in it."""
    seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
    return torch.Generator(device=device).manual_seed(derive_seed("batch", *seeds))


def training_batches(
    dataloader: DataLoader,
    sampler: EpochSeededSampler,
    accelerator: Accelerator,
    *,
    first_epoch: int,
    num_epochs: int,
    skip_batches: int,
    global_step: int,
    max_train_steps: int,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(epoch, batch)`` from ``first_epoch`` on, skipping the batches a resumed run already saw, and
    stop exactly at ``max_train_steps``.

    The stop lives here, before a batch is handed out, so no trainer can take a step past the end: not in the
    middle of an epoch, not across epochs, and not when resumed from the checkpoint of the last step (a
    requeued job with ``--resume_from_checkpoint latest``), where it yields nothing. Optimizer steps are counted
    from ``accelerator.sync_gradients``, which the loop body's ``accelerator.accumulate`` sets for each batch.
    """
    from accelerate import skip_first_batches

    step = global_step
    if step >= max_train_steps:
        logger.info(f"Step {step} reached --max_train_steps {max_train_steps} already: nothing to train.")
        return
    for epoch in range(first_epoch, num_epochs):
        sampler.start_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches > 0:
            batches = skip_first_batches(dataloader, skip_batches)
        for batch in batches:
            yield epoch, batch
            if accelerator.sync_gradients:
                step += 1
                if step >= max_train_steps:
                    return


def image_latents(batch: dict, vae, generator: torch.Generator, weight_dtype) -> torch.Tensor:
    """The clean latents of a batch, scaled as the UNet sees them: drawn from its cached latent distributions
    (``--cache_latents``: ``latent_mean``/``latent_std``) or encoded now by the frozen VAE, with the batch's
    generator either way, so a cached run draws what an encoding one would."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
    else:
        with torch.no_grad():
            pixels = batch["pixel_values"].to(weight_dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=generator).float()
    shift_factor = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift_factor) * vae.config.scaling_factor


def draw_noise(
    noise_scheduler, clean: torch.Tensor, generator: torch.Generator, logit_normal: tuple[float, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward diffusion's draws for a batch of clean samples: Gaussian noise of their shape, then one
    training timestep per sample (in this order, from the batch's generator; `draw_timesteps`)."""
    noise = torch.randn(clean.shape, generator=generator, device=clean.device)
    return noise, draw_timesteps(noise_scheduler, len(clean), generator, logit_normal)


def draw_timesteps(
    noise_scheduler, batch_size: int, generator: torch.Generator, logit_normal: tuple[float, float] | None = None
) -> torch.Tensor:
    """One training timestep per sample: uniform over the scheduler's training steps, or with ``logit_normal``
    = (mean, std) ``T * sigmoid(N(mean, std))`` (SD3's density, diffusers' `compute_density_for_timestep_sampling`):
    a positive mean trains more at high noise."""
    total = noise_scheduler.config.num_train_timesteps
    if logit_normal is None:
        return torch.randint(0, total, (batch_size,), generator=generator, device=generator.device)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    mean, std = logit_normal
    share = compute_density_for_timestep_sampling(
        "logit_normal", batch_size, logit_mean=mean, logit_std=std, device=generator.device, generator=generator
    )
    return (share * total).long().clamp(max=total - 1)


def prediction_target(noise_scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the model learns to predict under the noise scheduler's ``prediction_type``: the noise (epsilon), or
    the velocity ``v = alpha_t * noise - sigma_t * clean`` (v_prediction)."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    return noise


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR weighting (Hang et al. 2023): ``min(SNR, gamma) / SNR`` on an
    epsilon target; a v target already carries a factor ``SNR + 1``, so there it is ``min(SNR, gamma) / (SNR + 1)``.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clamped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clamped / (snr + 1)
    return clamped / snr


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Partial saves live under hidden names and never match."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.fullmatch(path.name))
    ]
    return [path for _, path in sorted(found)]


def recover_checkpoints(output_dir: Path) -> None:
    """Undo what a kill during `save_checkpoint` left, at the start of a run: afterwards every ``checkpoint-N`` that
    was complete before the kill is there, and nothing else of the save.

    A kill leaves hidden folders only: ``.checkpoint-N.partial`` (the new save, written or not), and
    ``.checkpoint-N.replaced`` (the old ``checkpoint-N``, moved aside for the new one) or ``.checkpoint-N.removed``
    (one that ``--checkpoints_total_limit`` was deleting). An old copy whose new one never arrived is put back; every
    other hidden checkpoint folder is deleted.
    """
    for replaced in output_dir.glob(".checkpoint-*.replaced"):
        final = output_dir / replaced.name[1 : -len(".replaced")]
        if not final.exists():
            logger.warning(f"Restoring {final}: a save of the same step was interrupted while replacing it.")
            replaced.rename(final)
    for path in output_dir.glob(".checkpoint-*"):
        logger.warning(f"Removing {path}: left by a checkpoint save that was interrupted.")
        shutil.rmtree(path, ignore_errors=True)


def register_checkpoint_hooks(accelerator: Accelerator, models: dict, ema_models: dict | None = None) -> None:
    """Save trained models in diffusers format inside each checkpoint (``checkpoint-N/unet/`` ...).

    ``models`` maps a folder name to the (unwrapped) model given to ``accelerator.prepare``;
    ``ema_models`` maps a folder name to an ``EMAModel`` (saved as ``<name>/``). A checkpoint folder
    is then directly usable by the generators, and resuming reloads exactly these weights.
    """
    ema_models = ema_models or {}
    if accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:
        # diffusers writes _class_name and _diffusers_version into a model's live config on its first save (in
        # to_json_string). A compiled forward that reads the config is guarded on its size, so the first checkpoint
        # would force a full recompile; writing them now, before the first forward, spares it.
        for model in models.values():
            if hasattr(model, "to_json_string"):
                model.to_json_string()

    def folder_of(model) -> str:
        unwrapped = unwrap_model(accelerator, model)
        for name, candidate in models.items():
            if candidate is unwrapped:
                return name
        raise ValueError(f"{type(unwrapped).__name__} was prepared but not registered for checkpointing")

    def save_hook(prepared_models, weights, output_dir):
        if accelerator.is_main_process:
            for name, ema in ema_models.items():
                ema.save_pretrained(os.path.join(output_dir, name))
            for model in prepared_models:
                unwrap_model(accelerator, model).save_pretrained(os.path.join(output_dir, folder_of(model)))
        # The models are saved above; stop accelerate from saving them a second time.
        weights.clear()

    def load_hook(prepared_models, input_dir):
        for name, ema in ema_models.items():
            loaded = type(ema).from_pretrained(os.path.join(input_dir, name), model_cls=ema.model_cls)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        while prepared_models:
            model = unwrap_model(accelerator, prepared_models.pop())
            loaded = type(model).from_pretrained(input_dir, subfolder=folder_of(model))
            if hasattr(model, "register_to_config"):  # diffusers models; transformers ones keep their config
                model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, global_step: int) -> Path:
    """Write ``checkpoint-<step>`` atomically, then drop the oldest beyond ``--checkpoints_total_limit``.

    Everything is written under a hidden temporary name and renamed once complete (`move_into_place`), so a crash
    (or a kill) during the save never leaves a half checkpoint that ``--resume_from_checkpoint latest`` picks, nor
    loses a complete one: the next start puts back what a kill left half done (`recover_checkpoints`). The oldest
    checkpoints are only removed after the new one is in place, each renamed to a hidden name before it is deleted.
    """
    output_dir = Path(args.output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    partial = output_dir / f".checkpoint-{global_step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        move_into_place(partial, final)
        logger.info(f"Saved state to {final}")
        if args.checkpoints_total_limit is not None:
            for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                logger.info(f"Removing {old} (--checkpoints_total_limit {args.checkpoints_total_limit})")
                hidden = old.with_name(f".{old.name}.removed")  # never half a checkpoint under its own name
                old.rename(hidden)
                shutil.rmtree(hidden)
    accelerator.wait_for_everyone()
    return final


def move_into_place(partial: Path, final: Path) -> None:
    """Rename the complete checkpoint ``partial`` to ``final``. A ``final`` already there (the same step saved again,
    after resuming from an earlier checkpoint) is first renamed ``.<final>.replaced`` (a folder cannot be renamed
    onto another), and deleted only once the new one is in place: a kill between the renames leaves both copies,
    and the next start puts the old one back (`recover_checkpoints`)."""
    replaced = final.with_name(f".{final.name}.replaced")
    if final.exists():
        final.rename(replaced)
    partial.rename(final)
    shutil.rmtree(replaced, ignore_errors=True)


def resume_from_checkpoint(
    accelerator: Accelerator, args: argparse.Namespace, updates_per_epoch: int
) -> tuple[int, int, int]:
    """Load the requested checkpoint; returns (global_step, first_epoch, batches to skip in that epoch)."""
    if not args.resume_from_checkpoint:
        return 0, 0, 0
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            logger.info(f"No checkpoint in {args.output_dir} yet: starting a new training run.")
            return 0, 0, 0
        path = checkpoints[-1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir() and (Path(args.output_dir) / path).is_dir():
            path = Path(args.output_dir) / path
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if not path.is_dir() or not match:
            raise SystemExit(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint folder named checkpoint-N "
                f"there. Available in {args.output_dir}: {[p.name for p in list_checkpoints(args.output_dir)]} "
                "(or pass `latest`)."
            )
    global_step = int(CHECKPOINT_PATTERN.fullmatch(path.name).group(1))
    logger.info(f"Resuming from {path} (step {global_step})")
    try:
        accelerator.load_state(str(path))
    except RuntimeError as error:  # torch's load_state_dict: weights of another model than this run built
        if "Error(s) in loading state_dict" not in str(error):
            raise
        first_mismatch = (str(error).splitlines()[1:] or [str(error)])[0].strip().rstrip(".")
        raise SystemExit(
            f"--resume_from_checkpoint: {path} holds a model of another shape than this run builds "
            f"({first_mismatch}). Fix: resume with the model options and data it was trained with (--model_config, "
            f"--layout_type, the same classes...: {args.output_dir}/training_config.json has them), or start in a "
            "new --output_dir."
        ) from None
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    return global_step, first_epoch, skip_batches


# --------------------------------------------------------------------------------------------
# Loss guard, run files, validation images
# --------------------------------------------------------------------------------------------


def stop_on_nonfinite_loss(accelerator: Accelerator, loss: torch.Tensor, global_step: int, output_dir) -> None:
    """Stop every process, before the update, when any process sees a NaN/inf loss.

    The weights are not stepped with it, nothing is saved after it, so the last checkpoint stays good. Every process
    gets every process's loss (one gather a step), so all of them stop at the same step, with the same message naming
    the processes that saw it: none is left waiting for the others in the next step's gradient all-reduce.
    """
    losses = accelerator.gather(loss.detach().float().mean().reshape(1)).tolist()  # NaN/inf anywhere stays in the mean
    bad = [index for index, value in enumerate(losses) if not math.isfinite(value)]
    if not bad:
        return
    where = f" on process {', '.join(map(str, bad))} (of {len(losses)})" if len(losses) > 1 else ""
    checkpoints = list_checkpoints(output_dir)
    last_good = checkpoints[-1] if checkpoints else None
    raise SystemExit(
        f"The loss became {losses[bad[0]]} at step {global_step + 1}{where}; training stopped before applying it. "
        + (f"The last good checkpoint is {last_good}. " if last_good else "No checkpoint was written yet. ")
        + "Lower --learning_rate, use --mixed_precision bf16 or no instead of fp16, check the data, "
        "then restart with --resume_from_checkpoint latest."
    )


# The path arguments that later runs read back from training_config.json: the training data (evaluate.py's
# fair-protocol check, the synthetic generator's layout quality) and the base models (a ControlNet's generator).
RECORDED_PATHS = ("data_root", "train_data_dir", "pretrained_model_name_or_path", "controlnet_model_name_or_path")


def write_run_files(
    output_dir: str | Path,
    args: argparse.Namespace,
    class_names: list[str] | None,
    palette,
    *,
    train_samples: list[str],
    train_class_pixels: list[int] | None,
    **extra,
) -> None:
    """``training_config.json`` (every argument but the secrets, the local paths of `RECORDED_PATHS` made absolute;
    the names of the pairs trained on and each class's pixels in them, from `check_training_data`, or None without
    label maps; plus what generation needs) and, when the classes are known, ``class_names.json``."""
    import diffusers

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(args)
    for key in RECORDED_PATHS:  # absolute: later runs read them back from wherever they are started
        if config.get(key) is not None:
            config[key] = recorded_path(config[key])
    # Which real pairs the model saw: what evaluate.py --downstream must give its segmenters for a fair comparison.
    config["train_samples"] = list(train_samples)
    config["train_class_pixels"] = train_class_pixels  # a class without a pixel is one the model never saw
    config.update(extra)
    config.update(
        class_names=None if class_names is None else list(class_names), diffusers_version=diffusers.__version__
    )
    if class_names is not None:
        config["num_classes"] = len(class_names)
    write_json_atomic(output_dir / "training_config.json", config)
    if class_names is not None:
        write_json_atomic(output_dir / "class_names.json", {"class_names": list(class_names), "palette": palette})


class TrainingLoop:
    """Everything a training step does after the trainer's own forward pass, loss and optimizer step, in one place.

    A trainer reads (diffusers-style, its forward pass and loss in between)::

        loop = training.TrainingLoop(accelerator, args, unet, ema_models, lr_scheduler, hub_repo, global_step)
        for batch in loop.batches(train_dataloader, sampler, first_epoch, skip_batches):
            with accelerator.accumulate(unet):
                loss = ...
                loop.check_loss(loss)
                accelerator.backward(loss) ... optimizer.step() ...
            if loop.end_of_batch(loss, logs={"loss": loss.item()}):
                log_validation(...)
        loop.finish(save)

    The guarantees the README promises live here: the stop exactly at ``--max_train_steps`` (`training_batches`),
    the stop before the update on a non-finite loss (`stop_on_nonfinite_loss`), and atomic checkpoints every
    ``--checkpointing_steps`` (`save_checkpoint`) from which ``--resume_from_checkpoint`` continues exactly.
    """

    def __init__(self, accelerator: Accelerator, args, model, ema_models: dict, lr_scheduler, hub_repo, global_step):
        """``model``: the prepared trained model the EMA follows; ``global_step``: where `resume_from_checkpoint`
        left off; ``hub_repo``: from `create_hub_repo`, called before the models load so a bad token fails early."""
        self.accelerator, self.args, self.model = accelerator, args, model
        self.ema_models, self.lr_scheduler, self.hub_repo = ema_models, lr_scheduler, hub_repo
        self.global_step = global_step
        total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info(
            f"***** Training: {args.max_train_steps} steps, {args.num_train_epochs} epochs, batch {total_batch_size} "
            f"(per device {args.train_batch_size}, accumulation {args.gradient_accumulation_steps})"
        )
        self.meter = ThroughputMeter(accelerator, total_batch_size)
        self.progress_bar = tqdm(
            range(args.max_train_steps),
            initial=global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )

    def batches(self, dataloader: DataLoader, sampler: EpochSeededSampler, first_epoch: int, skip_batches: int):
        """The training batches from where the run (re)starts; none past ``--max_train_steps``."""
        for _epoch, batch in training_batches(
            dataloader,
            sampler,
            self.accelerator,
            first_epoch=first_epoch,
            num_epochs=self.args.num_train_epochs,
            skip_batches=skip_batches,
            global_step=self.global_step,
            max_train_steps=self.args.max_train_steps,
        ):
            yield batch

    def check_loss(self, loss: torch.Tensor) -> None:
        """Stop every process before the update when the loss is not finite (see `stop_on_nonfinite_loss`)."""
        stop_on_nonfinite_loss(self.accelerator, loss, self.global_step, self.args.output_dir)

    def end_of_batch(self, loss: torch.Tensor, logs: dict) -> bool:
        """After each batch: on an optimizer step, the EMA update, the step count, the throughput meter and the
        checkpoint; then the logs (with the learning rate). True when validation is due, on the main process."""
        accelerator, args = self.accelerator, self.args
        validate = False
        if accelerator.sync_gradients:
            for ema in self.ema_models.values():
                ema.step(self.model.parameters())
            self.global_step += 1
            self.meter.step(loss)
            self.progress_bar.update(1)
            if self.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, self.global_step)
            validate = (
                accelerator.is_main_process
                and bool(args.validation_steps)
                and self.global_step % args.validation_steps == 0
            )
        logs = {**logs, "lr": self.lr_scheduler.get_last_lr()[0]}
        self.progress_bar.set_postfix(**logs)
        accelerator.log(logs, step=self.global_step)
        return validate

    def ema_weights(self):
        """The EMA weights in the trained model for the duration (validation); a no-op without EMA."""
        return ema_weights(next(iter(self.ema_models.values()), None), unwrap_model(self.accelerator, self.model))

    def finish(self, save, **stats) -> None:
        """The end of training: ``train_stats.json`` (throughput and memory, plus ``stats``), the EMA weights into
        the trained model, ``save(model)`` (the trainer writes its pipeline or model), the upload for
        ``--push_to_hub``; all on the main process, after every process is done."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            stats = {**self.meter.summary(), **stats}
            logger.info(f"Throughput and memory: {stats}")
            write_json_atomic(Path(self.args.output_dir) / "train_stats.json", stats)
            model = unwrap_model(accelerator, self.model)
            for ema in self.ema_models.values():
                ema.copy_to(model.parameters())
            save(model)
            logger.info(f"Saved the trained model to {self.args.output_dir}")
            upload_to_hub(self.args, self.hub_repo)
        accelerator.end_training()


class ThroughputMeter:
    """Training samples per second (all processes) and peak memory, for the log and the benchmarks.

    Timing starts after the first optimizer step, which pays for warm-up (allocations, autotuning).
    """

    def __init__(self, accelerator: Accelerator, samples_per_step: int):
        self.accelerator = accelerator
        self.samples_per_step = samples_per_step
        self.steps = 0
        self.start = None
        self.loss_sum = 0.0  # a tensor once timed steps run: summed on the device, read once at the end

    def step(self, loss: torch.Tensor) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.steps += 1
            self.loss_sum = self.loss_sum + loss.detach().float()

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.start if self.start is not None else 0.0
        if torch.cuda.is_available():
            peak_bytes = torch.cuda.max_memory_allocated()
        else:  # peak resident memory of this process; Linux reports kilobytes
            import resource  # Unix only

            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "train_samples_per_second": round(self.steps * self.samples_per_step / elapsed, 2) if elapsed else None,
            # this process's mean loss over the timed steps: benchmarks compare trainers at equal loss with it
            "mean_loss": round(float(self.loss_sum) / self.steps, 4) if self.steps else None,
            "peak_memory_mb": round(peak_bytes / 2**20, 1),
            "peak_memory_kind": "cuda_allocated" if torch.cuda.is_available() else "cpu_max_rss",
        }


@contextmanager
def ema_weights(ema, model):
    """Temporarily put the EMA weights into ``model`` (for validation); a no-op without EMA."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def log_validation_images(
    accelerator: Accelerator, grid, global_step: int, tag: str, output_dir, what: str = ""
) -> Path:
    """Save a validation grid as PNG under output_dir/validation/, send it to the trackers and log where it is
    (``what``: what its rows show)."""
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}-step{global_step:06d}.png"
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), global_step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(grid)}, step=global_step)
    logger.info(f"Validation grid{what and f' ({what})'}: {path}")
    return path
