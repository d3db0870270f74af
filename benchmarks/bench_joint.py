#!/usr/bin/env python
"""Speed and memory of the joint image + mask pipeline; prints a table and appends it to RESULTS.md.

    python benchmarks/bench_joint.py               # tiny and medium SD-shaped bases
    python benchmarks/bench_joint.py --presets tiny --train_steps 20

Training rows run train_seg_mask_diffusion.py as a user would (accelerate launch) and read the
throughput and peak memory it records in train_stats.json (timed from its second optimizer step);
each row is its own process, so peak memory is that configuration's own. Generation rows time
JointImageMaskPipeline calls in this process, after one warm-up call, per scheduler.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, append_results, launch_training  # noqa: E402

from segdiff.generation import CORE_SCHEDULERS, make_scheduler  # noqa: E402
from segdiff.pipelines.joint import JointImageMaskPipeline  # noqa: E402
from segdiff.tiny import build_tiny_sd  # noqa: E402
from segdiff.toy import make_toy_dataset  # noqa: E402

# Image size and batch per preset: the tiny base is the demo's, medium has SD 1.x's topology (VAE factor 8).
PRESETS = {"tiny": {"size": 32, "batch": 32}, "medium": {"size": 128, "batch": 8}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=sorted(PRESETS))
    parser.add_argument("--train_steps", type=int, default=30, help="Optimizer steps per training row.")
    parser.add_argument("--num_images", type=int, default=8, help="Images per generation row (after warm-up).")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--work_dir", default=None, help="Keep the data and models here (default: a temp dir).")
    return parser.parse_args()


def train_row(preset: str, base: Path, data: Path, out: Path, cache: bool, steps: int) -> dict:
    config = PRESETS[preset]
    stats = launch_training(
        "train_seg_mask_diffusion.py",
        "--pretrained_model_name_or_path", base, "--data_root", data, "--dataset", "generic", "--output_dir", out,
        "--image_size", config["size"], "--train_batch_size", config["batch"], "--max_train_steps", steps,
        "--center_crop", *(["--cache_latents"] if cache else []),
    )  # fmt: skip
    return {
        "setup": preset,
        "measurement": f"train, batch {config['batch']}, {config['size']} px, cache {'on' if cache else 'off'}",
        "result": f"{stats['train_samples_per_second']} samples/s",
        "peak_memory_mb": stats["peak_memory_mb"],
    }


def generation_rows(preset: str, model: Path, num_images: int, num_inference_steps: int) -> list[dict]:
    pipeline = JointImageMaskPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    for name in CORE_SCHEDULERS:
        pipeline.scheduler = make_scheduler(name, pipeline.scheduler.config)
        kwargs = dict(num_inference_steps=num_inference_steps, output_type="np")
        pipeline(0, generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up
        start = time.perf_counter()
        pipeline(0, num_images_per_prompt=num_images, generator=torch.Generator().manual_seed(1), **kwargs)
        seconds = (time.perf_counter() - start) / num_images
        rows.append(
            {
                "setup": preset,
                "measurement": f"generate, {name}, {num_inference_steps} steps, batch {num_images}",
                "result": f"{seconds:.3f} s/image",
            }
        )
    return rows


def main(args):
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_joint_"))
    rows = []
    for preset in args.presets:
        size = PRESETS[preset]["size"]
        data = work / f"toy-{size}"
        if not (data / "class_names.json").exists():
            make_toy_dataset(data, num_images=128, size=size, seed=0)
        base = work / f"base-{preset}"
        if not (base / "model_index.json").exists():
            build_tiny_sd(base, sample_size=size, preset=preset)
        for cache in (False, True):
            out = work / f"train-{preset}-{'cache' if cache else 'nocache'}"
            rows.append(train_row(preset, base, data, out, cache, args.train_steps))
            print(rows[-1], flush=True)
        rows += generation_rows(preset, out, args.num_images, args.num_inference_steps)
        print(*rows[-len(CORE_SCHEDULERS) :], sep="\n", flush=True)

    append_results("bench_joint.py", rows, args.results)


if __name__ == "__main__":
    main(parse_args())
