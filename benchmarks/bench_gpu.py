#!/usr/bin/env python
"""Speed and memory of the GPU training settings, per trainer; prints a table and appends it to RESULTS.md.

    python benchmarks/bench_gpu.py                     # a medium SD-shaped base built here, every trainer and row
    python benchmarks/bench_gpu.py --pretrained_model_name_or_path /models/stable-diffusion-v1-5 \\
        --resolution 512 --train_batch_size 8 --trainers controlnet joint
    python benchmarks/bench_gpu.py --dry_run           # print the trainer commands, run nothing

Training rows run each trainer as a user would (accelerate launch, see common.launch_training) on toy data, one
process per row, and read the samples/s (timed from its second optimizer step, so torch.compile's compilation
and cuDNN's autotuning are not counted) and the peak CUDA memory it records in train_stats.json. The rows: fp32,
fp32 + TF32, bf16, bf16 plus one setting each (channels_last, torch.compile, 8-bit Adam, gradient checkpointing,
cached latents), and all_fast: bf16 with every setting that is meant to speed training up (all but gradient
checkpointing, which trades speed for memory). Each result gives its ratio to the same trainer's fp32 row.

Attention rows time, in this process, forward + backward of the base's UNet under bf16 autocast with each of
diffusers' attention processors: classic (AttnProcessor: softmax(QK^T)V spelled out), PyTorch's SDPA
(AttnProcessor2_0, diffusers' default, so what the trainers use) and xformers' when it is installed. Their ratios
are to the classic row.

A row that cannot run here is in the table as skipped, with the reason (TF32, 8-bit Adam and xformers need CUDA;
8-bit Adam needs bitsandbytes; train_spade_sdm.py has no latents to cache); all_fast then leaves those settings
out and says so. A row whose trainer fails is in the table as failed, with the error, and the other rows still
run. Without CUDA the script stops, unless --allow_cpu (to test the script: its figures then say nothing about a
GPU) or --dry_run.
"""

import argparse
import importlib.util
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, TrainingFailed, append_results, launch_training, training_command  # noqa: E402

TRAINERS = {
    "joint": "train_seg_mask_diffusion.py",
    "controlnet": "train_controlnet_seg.py",
    "sdm": "train_spade_sdm.py",
}
# Trainers with --cache_latents. The SDM trainer has none: in pixel space (its default) there is nothing to encode.
CACHES_LATENTS = {"joint", "controlnet"}

BF16 = ("--mixed_precision", "bf16")
# The settings all_fast combines: each is meant to make a step faster. Gradient checkpointing is not among them.
FAST_FLAGS = ("--allow_tf32", "--channels_last", "--torch_compile", "--use_8bit_adam", "--cache_latents")
ROWS = {
    "fp32": ("--mixed_precision", "no"),
    "fp32+tf32": ("--mixed_precision", "no", "--allow_tf32"),
    "bf16": BF16,
    "bf16+channels_last": (*BF16, "--channels_last"),
    "bf16+torch_compile": (*BF16, "--torch_compile"),
    "bf16+8bit_adam": (*BF16, "--use_8bit_adam"),
    "bf16+gradient_checkpointing": (*BF16, "--gradient_checkpointing"),
    "bf16+cache_latents": (*BF16, "--cache_latents"),
    "all_fast": (*BF16, *FAST_FLAGS),
}
ATTENTION = "attention"
# What the table calls each setting (the row names use the same words).
SHORT_NAMES = {
    "--allow_tf32": "tf32",
    "--channels_last": "channels_last",
    "--torch_compile": "torch_compile",
    "--use_8bit_adam": "8bit_adam",
    "--cache_latents": "cache_latents",
    "--gradient_checkpointing": "gradient_checkpointing",
}
# Default image size per base preset: the tiny base is the demo's; medium has SD 1.x's topology (VAE factor 8).
PRESET_RESOLUTION = {"tiny": 32, "medium": 128}
TEXT_TOKENS = 77  # CLIP's prompt length in Stable Diffusion: the cross-attention's key/value length


@dataclass(frozen=True)
class Machine:
    """What the rows need that a machine may lack."""

    cuda: bool
    bf16: bool
    bitsandbytes: bool
    xformers: bool

    @classmethod
    def here(cls) -> "Machine":
        cuda = torch.cuda.is_available()
        return cls(
            cuda=cuda,
            # On a CPU, bf16 autocast works (slowly); on a GPU it needs Ampere or newer.
            bf16=torch.cuda.is_bf16_supported() if cuda else True,
            bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
            xformers=importlib.util.find_spec("xformers") is not None,
        )


# The machine --dry_run plans for: the GPU box this benchmark is written for.
GPU_BOX = Machine(cuda=True, bf16=True, bitsandbytes=True, xformers=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="A Stable-Diffusion-format base (e.g. a stable-diffusion-v1-5 folder). Default: one built here with "
        "segdiff.tiny.build_tiny_sd(preset=--preset), random weights (speed does not depend on them).",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESET_RESOLUTION),
        default="medium",
        help="Size of the base built when no --pretrained_model_name_or_path is given: medium has SD 1.x's "
        "topology at a fraction of its width; tiny is the demo's (tests). Default: %(default)s",
    )
    parser.add_argument("--trainers", nargs="+", choices=list(TRAINERS), default=list(TRAINERS))
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[*ROWS, ATTENTION],
        default=[*ROWS, ATTENTION],
        help="Which rows to run (default: all). The ratios need the fp32 row (attention: the classic one).",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training image side. Default: 512 with --pretrained_model_name_or_path, else the preset's "
        f"({', '.join(f'{name} {size}' for name, size in PRESET_RESOLUTION.items())}).",
    )
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=20,
        help="Optimizer steps per training row; the first is warm-up (compilation, autotuning) and is not timed.",
    )
    parser.add_argument(
        "--num_images",
        type=int,
        default=64,
        help="Toy training images (rounded up to a multiple of the batch, so every batch has the same shape and "
        "torch.compile never recompiles for a short last batch).",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Passed to the trainers. Default: 4 with CUDA (so decoding PNGs does not hold a fast GPU back, and "
        "with --dry_run), 0 without.",
    )
    parser.add_argument(
        "--sdm_model_config",
        default=None,
        help="--model_config of train_spade_sdm.py. Default: configs/models/sdm_tiny.json for the tiny preset, "
        "else sdm_256.json (SDM's published size).",
    )
    parser.add_argument(
        "--sdm_space",
        choices=["pixel", "latent"],
        default="pixel",
        help="--space of train_spade_sdm.py (latent uses the base's VAE). Default: %(default)s",
    )
    parser.add_argument("--torch_compile_mode", default=None, help="Passed with --torch_compile, when given.")
    parser.add_argument("--torch_compile_backend", default=None, help="Passed with --torch_compile, when given.")
    parser.add_argument(
        "--attention_iterations",
        type=int,
        default=10,
        help="Timed forward + backward passes per attention row (after 2 warm-up passes).",
    )
    parser.add_argument(
        "--allow_cpu",
        action="store_true",
        help="Run without CUDA (to test this script): the rows that need CUDA are skipped, the others run on "
        "the CPU, and their figures say nothing about a GPU.",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="Print the trainer command of every row (as run on a CUDA machine with bitsandbytes) and stop.",
    )
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--note", default="", help="A remark printed under the table (e.g. about the machine).")
    parser.add_argument(
        "--work_dir",
        default=str(Path(tempfile.gettempdir()) / "bench_gpu"),
        help="Data, base and training outputs go here; data and a built base are reused. Default: %(default)s",
    )
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 512 if args.pretrained_model_name_or_path else PRESET_RESOLUTION[args.preset]
    if args.sdm_model_config is None:
        name = "sdm_tiny.json" if args.preset == "tiny" and not args.pretrained_model_name_or_path else "sdm_256.json"
        args.sdm_model_config = str(ROOT / "configs" / "models" / name)
    if not Path(args.sdm_model_config).is_file():
        parser.error(f"--sdm_model_config {args.sdm_model_config} is not a file (see configs/models/)")
    if args.max_train_steps < 2:
        parser.error("--max_train_steps must be at least 2: the trainers time from their second step")
    for name in ("resolution", "train_batch_size", "num_images", "attention_iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


# ------------------------------------------------------------------------------------------------
# Which flags a row passes, and why a row cannot run
# ------------------------------------------------------------------------------------------------


def why_not(flag: str, trainer: str, machine: Machine) -> str | None:
    """Why ``flag`` (or the bf16 of ``--mixed_precision bf16``) cannot run for ``trainer`` on ``machine``."""
    if flag == "--cache_latents" and trainer not in CACHES_LATENTS:
        return f"{TRAINERS[trainer]} has no --cache_latents"
    if flag == "--allow_tf32" and not machine.cuda:
        return "TF32 is a CUDA matmul mode (Ampere or newer)"
    if flag == "--use_8bit_adam" and not machine.cuda:
        return "8-bit Adam (bitsandbytes) needs CUDA"
    if flag == "--use_8bit_adam" and not machine.bitsandbytes:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if flag == "bf16" and not machine.bf16:
        return "this GPU has no bf16 (it needs Ampere or newer)"
    return None


def row_flags(row: str, trainer: str, machine: Machine) -> tuple[tuple[str, ...] | None, str]:
    """The trainer flags of ``row`` for ``trainer`` on ``machine``, and a remark.

    (None, reasons) when the row cannot run there. all_fast instead leaves out the fast settings that cannot, and
    the remark names them; without bf16 it cannot run at all.
    """
    flags = ROWS[row]
    missing = {flag: reason for flag in flags if (reason := why_not(flag, trainer, machine))}
    if not missing:
        return flags, ""
    if row != "all_fast" or not set(missing) <= set(FAST_FLAGS):
        return None, "; ".join(missing.values())
    kept = tuple(flag for flag in flags if flag not in missing)
    return kept, "without " + "; ".join(f"{SHORT_NAMES[flag]}: {reason}" for flag, reason in missing.items())


def setting_name(flags: tuple[str, ...]) -> str:
    """bf16+tf32+... for the flags of a row."""
    precision = flags[flags.index("--mixed_precision") + 1]
    return "+".join([{"no": "fp32"}.get(precision, precision), *(SHORT_NAMES[f] for f in flags if f in SHORT_NAMES)])


def trainer_args(trainer: str, flags: tuple[str, ...], base, data: Path, out: Path, args) -> list:
    """The arguments of one training row: the same data, size, batch and steps for every row of a trainer."""
    command = [
        "--data_root", data, "--dataset", "generic", "--output_dir", out, "--resolution", args.resolution,
        "--train_batch_size", args.train_batch_size, "--max_train_steps", args.max_train_steps,
        # Every row center-crops, as --cache_latents does, so that rows differ only by their setting.
        "--center_crop", "--dataloader_num_workers", args.dataloader_num_workers, "--seed", 0,
    ]  # fmt: skip
    if trainer == "sdm":
        command += ["--model_config", args.sdm_model_config, "--space", args.sdm_space]
        if args.sdm_space == "latent":
            command += ["--pretrained_model_name_or_path", base]
    else:
        command += ["--pretrained_model_name_or_path", base]
    command += flags
    if "--torch_compile" in flags:
        for name in ("torch_compile_mode", "torch_compile_backend"):
            if getattr(args, name) is not None:
                command += [f"--{name}", getattr(args, name)]
    return command


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


def cell(text: str) -> str:
    """Text that stays inside one cell of a markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def error_line(failure: TrainingFailed) -> str:
    """The last line of a failed trainer's stderr: where Python and argparse put the error."""
    lines = [line for line in str(failure.code).splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "no error output"


def ratio_text(value: float, baseline: float | None, baseline_name: str) -> str:
    return f"{value / baseline:.2f}x {baseline_name}" if baseline else f"no {baseline_name} row to compare"


def training_rows(trainer: str, base, data: Path, args, machine: Machine, setup: str) -> list[dict]:
    """One row per training setting of --rows for ``trainer``; the fp32 row first, as the others' baseline."""
    rows, baseline = [], None
    for row in [row for row in ROWS if row in args.rows]:
        flags, remark = row_flags(row, trainer, machine)
        measurement = (
            f"train {setting_name(flags) if flags else row}, batch {args.train_batch_size}, {args.resolution} px"
        )
        if flags and remark:  # all_fast without some setting
            measurement += f" ({remark})"
        result, peak = "", ""
        if flags is None:
            result = f"skipped: {remark}"
        else:
            out = Path(args.work_dir) / f"train-{trainer}-{row}"
            try:
                stats = launch_training(TRAINERS[trainer], *trainer_args(trainer, flags, base, data, out, args))
            except TrainingFailed as failure:
                result = f"failed: {error_line(failure)}"
            else:
                speed = stats["train_samples_per_second"]
                baseline = speed if row == "fp32" else baseline
                result = f"{speed} samples/s, {ratio_text(speed, baseline, 'fp32')}"
                peak = stats["peak_memory_mb"]
        rows.append({"setup": setup, "measurement": cell(measurement), "result": cell(result), "peak_memory_mb": peak})
        print(rows[-1], flush=True)
    return rows


def attention_processors(machine: Machine) -> dict:
    """Name -> attention processor class, or the reason it cannot run here."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    if not machine.cuda:
        xformers = "skipped: xformers needs CUDA"
    elif not machine.xformers:
        xformers = "skipped: xformers is not installed (pip install xformers)"
    else:
        xformers = XFormersAttnProcessor
    return {
        "classic (AttnProcessor)": AttnProcessor,
        "SDPA (AttnProcessor2_0)": AttnProcessor2_0,
        "xformers (XFormersAttnProcessor)": xformers,
    }


def time_unet_steps(unet, inputs: dict, iterations: int, device: torch.device) -> tuple[float, float | str]:
    """Seconds per forward + backward under bf16 autocast (after 2 warm-up passes), and the peak CUDA memory."""

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prediction = unet(**inputs).sample
        prediction.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: kernel selection, cuDNN autotuning, the allocator's pools
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iterations
    # On a CPU this process's max RSS only grows from row to row: no per-row figure to give.
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else ""
    return seconds, peak


def attention_rows(base, args, machine: Machine, setup: str) -> list[dict]:
    """Forward + backward of the base's UNet with each attention processor, in this process."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from segdiff.geometry import vae_scale_factor

    device = torch.device("cuda" if machine.cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # as the bf16 training rows: TF32 is a row of its own
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").to(device).train()
    factor = vae_scale_factor(AutoencoderKL.load_config(base, subfolder="vae"))
    latent_size = args.resolution // factor
    batch = args.train_batch_size
    cross_attention_dim = unet.config.cross_attention_dim
    generator = torch.Generator(device).manual_seed(0)
    inputs = {
        "sample": torch.randn(batch, unet.config.in_channels, latent_size, latent_size, generator=generator, device=device),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator, device=device),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, cross_attention_dim, generator=generator, device=device),
    }  # fmt: skip
    rows, baseline = [], None
    for name, processor in attention_processors(machine).items():
        measurement = (
            f"UNet forward + backward, bf16 autocast, batch {batch}, {args.resolution} px "
            f"({latent_size} px latents), attention: {name}"
        )
        if isinstance(processor, str):
            rows.append({"setup": setup, "measurement": measurement, "result": processor})
            print(rows[-1], flush=True)
            continue
        unet.set_attn_processor(processor())
        seconds, peak = time_unet_steps(unet, inputs, args.attention_iterations, device)
        speed = batch / seconds
        baseline = speed if processor.__name__ == "AttnProcessor" else baseline
        result = f"{speed:.2f} samples/s, {ratio_text(speed, baseline, 'classic')}"
        rows.append({"setup": setup, "measurement": measurement, "result": result, "peak_memory_mb": peak})
        print(rows[-1], flush=True)
    del unet, inputs
    if machine.cuda:
        torch.cuda.empty_cache()  # the training rows run in their own processes, on the same GPU
    return rows


# ------------------------------------------------------------------------------------------------
# Data, base, and the run
# ------------------------------------------------------------------------------------------------


def toy_image_count(args) -> int:
    """--num_images rounded up to a whole number of batches."""
    return -(-args.num_images // args.train_batch_size) * args.train_batch_size


def toy_data_dir(args) -> Path:
    """Where the toy dataset of every row lives."""
    return Path(args.work_dir) / f"toy-{args.resolution}px-{toy_image_count(args)}"


def base_dir(args) -> str | Path:
    """--pretrained_model_name_or_path, or where the base built here lives."""
    return args.pretrained_model_name_or_path or Path(args.work_dir) / f"base-{args.preset}-{args.resolution}px"


def toy_data(args) -> Path:
    """The toy dataset of every row, made on first use."""
    from segdiff.toy import make_toy_dataset

    data = toy_data_dir(args)
    if not (data / "class_names.json").exists():
        make_toy_dataset(data, num_images=toy_image_count(args), size=args.resolution, seed=0)
    return data


def base_model(args) -> str | Path:
    """The base of every row, built on first use when none is given."""
    base = base_dir(args)
    if not args.pretrained_model_name_or_path and not (base / "model_index.json").exists():
        from segdiff.tiny import build_tiny_sd

        build_tiny_sd(base, sample_size=args.resolution, preset=args.preset, overwrite=True)
    return base


def base_name(args) -> str:
    if args.pretrained_model_name_or_path:
        return Path(args.pretrained_model_name_or_path.rstrip("/")).name
    return f"{args.preset} base"


def dry_run(args, machine: Machine) -> None:
    """Print every row's trainer command as a CUDA machine with bitsandbytes would run it (paths as a real run's),
    and what this machine would do differently."""
    work, data, base = Path(args.work_dir), toy_data_dir(args), base_dir(args)
    for trainer in args.trainers:
        for row in [row for row in ROWS if row in args.rows]:
            flags, remark = row_flags(row, trainer, GPU_BOX)
            print(f"# {trainer}, {row}" + (f" ({remark})" if remark else ""))
            if flags is None:
                print(f"# skipped: {remark}")
                continue
            here_flags, here_remark = row_flags(row, trainer, machine)
            if here_flags is None:
                print(f"# on this machine: skipped: {here_remark}")
            elif here_flags != flags:
                dropped = [flag for flag in flags if flag not in here_flags]
                reasons = "; ".join(f"{SHORT_NAMES[flag]}: {why_not(flag, trainer, machine)}" for flag in dropped)
                print(f"# on this machine: without {reasons}")
            out = work / f"train-{trainer}-{row}"
            print(shlex.join(training_command(TRAINERS[trainer], *trainer_args(trainer, flags, base, data, out, args))))
    if ATTENTION in args.rows:
        names = ", ".join(attention_processors(GPU_BOX))
        print(f"# attention: in this process, {base}'s UNet forward + backward under bf16 autocast with {names}")


def main(args):
    machine = Machine.here()
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 4 if machine.cuda or args.dry_run else 0
    if args.dry_run:
        dry_run(args, machine)
        return
    if not machine.cuda and not args.allow_cpu:
        raise SystemExit(
            "bench_gpu.py measures GPU training settings, and torch finds no CUDA device here. Run it on a GPU "
            "machine; --dry_run prints the commands it would run; --allow_cpu runs what a CPU can (to test the "
            "script: its figures say nothing about a GPU)."
        )
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    data, base = toy_data(args), base_model(args)
    rows = []
    for trainer in args.trainers:
        rows += training_rows(trainer, base, data, args, machine, f"{base_name(args)}, {trainer}")
    if ATTENTION in args.rows:
        rows += attention_rows(base, args, machine, f"{base_name(args)}, UNet")

    note = (
        f"{args.max_train_steps} steps per training row, timed from the second. Training rows: samples/s and its "
        "ratio to the same trainer's fp32 row; attention rows: to the classic attention processor. PyTorch lets "
        "cuDNN convolutions use TF32 by default (Ampere or newer), so the fp32 rows' convolutions already do; "
        "--allow_tf32 adds it for matmuls."
    )
    if not machine.cuda:
        note += " Run with --allow_cpu, without CUDA: these figures test the script and say nothing about a GPU."
    if args.note:
        note += f" {args.note}"
    append_results("bench_gpu.py", rows, args.results, note=note)


if __name__ == "__main__":
    main(parse_args())
