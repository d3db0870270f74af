#!/usr/bin/env python
"""Speed and memory of the joint image + mask pipeline, or (--quality) its schedulers' agreement; prints a table and
appends it to RESULTS.md.

    python benchmarks/bench_joint.py               # tiny and medium SD-shaped bases
    python benchmarks/bench_joint.py --presets tiny --train_steps 20
    python benchmarks/bench_joint.py --quality --work_dir /tmp/bjq   # about 10 minutes on 2 quiet cores

Training rows run train_seg_mask_diffusion.py as a user would (accelerate launch) and read the
throughput and peak memory it records in train_stats.json (timed from its second optimizer step);
each row is its own process, so peak memory is that configuration's own. Generation rows time
JointImageMaskPipeline calls in this process, after one warm-up call, per scheduler.

The quality row (--quality, instead of the speed rows) is the demo's model and score: ``python demo.py`` trains it
(its stages are skipped when their outputs exist, so a kept --work_dir reuses them), then the demo's 64 samples
(every class in turn, sample i from seed i, batches of 16) are drawn again with each of QUALITY_SAMPLERS and scored
as the demo scores them: the mean image/mask agreement (IoU of the generated mask and the palette segmenter's
reading of the image as that class). The issue's bar: DPM-Solver++ at 20 steps within 0.02 of DDIM at 50.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, append_results, launch_training, toy_data_and_base  # noqa: E402

from segdiff.metrics import sample_agreement  # noqa: E402
from segdiff.pipelines.joint import JointImageMaskPipeline  # noqa: E402
from segdiff.schedulers import CORE_SCHEDULERS, make_scheduler  # noqa: E402
from segdiff.toy import PaletteSegmenter  # noqa: E402

# Image size and batch per preset: the tiny base is the demo's, medium has SD 1.x's topology (VAE factor 8).
PRESETS = {"tiny": {"size": 32, "batch": 32}, "medium": {"size": 128, "batch": 8}}
# (label, scheduler name, steps) of the quality row: the demo's DDIM 50, DPM-Solver++ 20, and DDPM 50 for reference.
QUALITY_SAMPLERS = (("ddim 50", "ddim", 50), ("dpmsolver 20", "dpmsolver", 20), ("ddpm 50", "ddpm", 50))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium"], choices=sorted(PRESETS))
    parser.add_argument("--train_steps", type=int, default=30, help="Optimizer steps per training row.")
    parser.add_argument("--num_images", type=int, default=8, help="Images per generation row (after warm-up).")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument(
        "--quality",
        action="store_true",
        help="Instead of the speed rows: the demo's model (python demo.py) and its agreement per scheduler.",
    )
    parser.add_argument("--quality_samples", type=int, default=64, help="Samples per scheduler (the demo's 64).")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--work_dir", default=None, help="Keep the data and models here (default: a temp dir).")
    return parser.parse_args()


def train_row(preset: str, base: Path, data: Path, out: Path, cache: bool, steps: int) -> dict:
    config = PRESETS[preset]
    stats = launch_training(
        "train_seg_mask_diffusion.py",
        "--pretrained_model_name_or_path", base, "--data_root", data, "--dataset", "generic", "--output_dir", out,
        "--resolution", config["size"], "--train_batch_size", config["batch"], "--max_train_steps", steps,
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


def demo_model(work: Path) -> tuple[Path, dict]:
    """The demo's trained joint model and its demo_summary.json: ``python demo.py --output_dir work/demo``, run as
    a user runs it (every core, or OMP_NUM_THREADS when set)."""
    out = work / "demo"
    subprocess.run([sys.executable, str(ROOT / "demo.py"), "--output_dir", str(out)], cwd=ROOT, check=True)
    return out / "joint-model", json.loads((out / "demo_summary.json").read_text())


def mean_agreements(model: Path, num_samples: int, batch_size: int = 16) -> dict[str, float]:
    """Per entry of QUALITY_SAMPLERS: the mean agreement of the samples the demo's generator draws (class i % 4,
    seed i, in batches of ``batch_size``), scored as segdiff.metrics.mask_agreement scores its output folder
    (`sample_agreement`)."""
    pipeline = JointImageMaskPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    segmenter = PaletteSegmenter.from_class_names_json(model / "class_names.json")
    classes = [i % len(pipeline.class_names) for i in range(num_samples)]
    training_schedule = pipeline.scheduler.config
    agreements = {}
    for label, name, steps in QUALITY_SAMPLERS:
        pipeline.scheduler = make_scheduler(name, training_schedule)
        ious = []
        for start in range(0, num_samples, batch_size):
            indices = range(start, min(start + batch_size, num_samples))
            generators = [torch.Generator().manual_seed(i) for i in indices]
            output = pipeline([classes[i] for i in indices], num_inference_steps=steps, generator=generators)
            for i, image, mask in zip(indices, output.images, output.masks):
                ious.append(sample_agreement(image, mask, classes[i], segmenter))
        agreements[label] = float(np.mean(ious))
        print(f"{label}: agreement {agreements[label]:.4f}", flush=True)
    return agreements


def quality_row(work: Path, num_samples: int) -> dict:
    start = time.perf_counter()
    model, summary = demo_model(work)
    # Stages found done count 0 s in the demo's summary: the model came from an earlier run in --work_dir.
    trained = f"trained in {summary['seconds']['train'] / 60:.1f} min" if summary["seconds"]["train"] else "reused"
    print(f"demo: {time.perf_counter() - start:.0f} s, agreement {summary['image_mask_agreement_iou']:.4f}")
    agreements = mean_agreements(model, num_samples)
    return {
        "setup": "demo (tiny, 32 px)",
        "measurement": f"quality: demo.py's model ({trained}), mean image/mask agreement of "
        f"{num_samples} samples, {' / '.join(agreements)} steps (demo's own DDIM 50: "
        f"{summary['image_mask_agreement_iou']:.3f})",
        "result": " / ".join(f"{value:.3f}" for value in agreements.values()),
    }


def main(args):
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_joint_"))
    if args.quality:
        append_results("bench_joint.py", [quality_row(work, args.quality_samples)], args.results)
        return
    rows = []
    for preset in args.presets:
        data, base = toy_data_and_base(work, preset, PRESETS[preset]["size"])
        for cache in (False, True):
            out = work / f"train-{preset}-{'cache' if cache else 'nocache'}"
            rows.append(train_row(preset, base, data, out, cache, args.train_steps))
            print(rows[-1], flush=True)
        rows += generation_rows(preset, out, args.num_images, args.num_inference_steps)
        print(*rows[-len(CORE_SCHEDULERS) :], sep="\n", flush=True)

    append_results("bench_joint.py", rows, args.results)


if __name__ == "__main__":
    main(parse_args())
