#!/usr/bin/env python
"""Speed and memory of the ControlNet pipeline; prints a table and appends it to RESULTS.md.

    python benchmarks/bench_controlnet.py               # tiny and medium SD-shaped bases
    python benchmarks/bench_controlnet.py --presets tiny --train_steps 20

Training rows run train_controlnet_seg.py as a user would (accelerate launch) with the caches
(--cache_latents and the default text-embedding cache) and without either (--text_embedding_cache_size 0), and read the throughput, peak memory and text-encoder calls it records in
train_stats.json (timed from its second optimizer step); each row is its own process, so peak memory
is that configuration's own. Generation rows time StableDiffusionControlNetPipeline calls (the trained
ControlNet over the base) in this process, after one warm-up call, per scheduler.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, append_results, launch_training, toy_data_and_base  # noqa: E402
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline  # noqa: E402

from segdiff.data import load_segmentation_dataset  # noqa: E402
from segdiff.labels import colorize_label  # noqa: E402
from segdiff.prompts import label_map_prompt  # noqa: E402
from segdiff.schedulers import make_scheduler  # noqa: E402

# Image size and batch per preset: the tiny base is the demo's (VAE factor 2), medium has SD 1.x's topology
# (VAE factor 8, so the ControlNet gets SD's own conditioning embedding).
PRESETS = {"tiny": {"size": 32, "batch": 32}, "medium": {"size": 128, "batch": 8}}
# The generator's schedulers: UniPC (its default), DPM-Solver++ and DDIM.
SCHEDULERS = ("unipc", "dpmsolver", "ddim")
GUIDANCE_SCALE = 7.5  # the generator's default: every step runs the UNet and ControlNet on a doubled batch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=sorted(PRESETS))
    parser.add_argument("--train_steps", type=int, default=30, help="Optimizer steps per training row.")
    parser.add_argument("--num_images", type=int, default=8, help="Images per generation row (after warm-up).")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--note", default="", help="A remark printed under the table (e.g. about the machine load).")
    parser.add_argument("--work_dir", default=None, help="Keep the data and models here (default: a temp dir).")
    return parser.parse_args()


def train_row(preset: str, base: Path, data: Path, out: Path, cache: bool, steps: int) -> dict:
    config = PRESETS[preset]
    stats = launch_training(
        "train_controlnet_seg.py",
        "--pretrained_model_name_or_path", base, "--data_root", data, "--dataset", "generic", "--output_dir", out,
        "--resolution", config["size"], "--train_batch_size", config["batch"], "--max_train_steps", steps,
        "--learning_rate", "1e-4", "--center_crop",
        # "cache off" is the uncached trainer: the VAE and the text encoder run on every sample of every step
        *(["--cache_latents"] if cache else ["--text_embedding_cache_size", 0]),
    )  # fmt: skip
    return {
        "setup": preset,
        "measurement": f"train, batch {config['batch']}, {config['size']} px, cache {'on' if cache else 'off'}",
        "result": f"{stats['train_samples_per_second']} samples/s; text encoder ran on "
        f"{stats['text_encoder_calls']} prompts in {steps} steps",
        "peak_memory_mb": stats["peak_memory_mb"],
    }


def generation_rows(preset: str, base: Path, controlnet_dir: Path, data: Path, args) -> list[dict]:
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        base,
        controlnet=ControlNetModel.from_pretrained(controlnet_dir),
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    dataset = load_segmentation_dataset(data, "generic")
    label = dataset[0]["label"]
    control = colorize_label(label, dataset.palette, dataset.ignore_index)
    prompt = label_map_prompt(label, dataset.class_names)
    size = PRESETS[preset]["size"]
    rows = []
    for name in SCHEDULERS:
        pipeline.scheduler = make_scheduler(name, pipeline.scheduler.config)
        kwargs = dict(
            height=size, width=size, num_inference_steps=args.num_inference_steps, guidance_scale=GUIDANCE_SCALE
        )
        pipeline(prompt, control, generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up
        start = time.perf_counter()
        pipeline(
            prompt,
            control,
            num_images_per_prompt=args.num_images,
            generator=torch.Generator().manual_seed(1),
            **kwargs,
        )
        seconds = (time.perf_counter() - start) / args.num_images
        rows.append(
            {
                "setup": preset,
                "measurement": f"generate, {name}, {args.num_inference_steps} steps, guidance {GUIDANCE_SCALE}, "
                f"batch {args.num_images}",
                "result": f"{seconds:.3f} s/image",
            }
        )
    return rows


def main(args):
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_controlnet_"))
    rows = []
    for preset in args.presets:
        data, base = toy_data_and_base(work, preset, PRESETS[preset]["size"])
        for cache in (False, True):
            out = work / f"train-{preset}-{'cache' if cache else 'nocache'}"
            rows.append(train_row(preset, base, data, out, cache, args.train_steps))
            print(rows[-1], flush=True)
        rows += generation_rows(preset, base, out, data, args)
        print(*rows[-len(SCHEDULERS) :], sep="\n", flush=True)

    append_results("bench_controlnet.py", rows, args.results, note=args.note)


if __name__ == "__main__":
    main(parse_args())
