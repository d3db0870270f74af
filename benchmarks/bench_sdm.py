#!/usr/bin/env python
"""Speed and quality of the SPADE Semantic Diffusion Model on the toy data; prints a table, appends to RESULTS.md.

    python benchmarks/bench_sdm.py                         # speed rows, then the quality runs (about 35 minutes on 2 cores)
    python benchmarks/bench_sdm.py --skip_quality --train_steps 10
    python benchmarks/bench_sdm.py --skip_speed --variants 'pixel, spade' --work_dir /tmp/bsdm --keep_trained

Speed rows: train_spade_sdm.py launched as a user would (samples/s and peak memory from its train_stats.json,
timed from the second step) for pixel/SPADE, pixel/concat and latent/SPADE with the tiny config, and
SemanticDiffusionPipeline seconds per image for each scheduler. Quality rows: each of those three trained for
--quality_steps at batch 32 on 512 toy images, then one image per held-out toy mask (each of QUALITY_SAMPLERS) read
back by the exact palette segmenter: mIoU against the input masks (the issue's bars: >= 0.9 in pixel space within
10 CPU-minutes of training; DPM-Solver++ at 20-25 steps within 0.02 of DDPM at 50). The schedulers are those of
`make_scheduler(..., stochastic=True)`, plus the deterministic DPM-Solver++ that "dpmsolver" was before (`make_scheduler`), for comparison.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, append_results, launch_training  # noqa: E402

from segdiff.data import load_segmentation_dataset  # noqa: E402
from segdiff.metrics import confusion_matrix, iou_per_class  # noqa: E402
from segdiff.pipelines.sdm import SemanticDiffusionPipeline  # noqa: E402
from segdiff.schedulers import make_scheduler  # noqa: E402
from segdiff.tiny import build_tiny_sd  # noqa: E402
from segdiff.toy import PaletteSegmenter, make_toy_dataset  # noqa: E402

VARIANTS = {
    "pixel, spade": ["--space", "pixel", "--conditioning", "spade"],
    "pixel, concat": ["--space", "pixel", "--conditioning", "concat"],
    "latent, spade": ["--space", "latent", "--conditioning", "spade"],
}
SCHEDULERS = ("ddim", "ddpm", "dpmsolver")
# (label, scheduler name, steps) of the quality rows; "ODE" is the deterministic DPM-Solver++ of make_scheduler.
QUALITY_SAMPLERS = (
    ("ddpm 50", "ddpm", 50),
    ("ddim 50", "ddim", 50),
    ("dpmsolver 20", "dpmsolver", 20),
    ("dpmsolver 25", "dpmsolver", 25),
    ("dpmsolver ODE 20", "dpmsolver-ode", 20),
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--train_steps", type=int, default=30, help="Optimizer steps per speed row.")
    parser.add_argument(
        "--quality_steps",
        type=int,
        default=400,
        help="Optimizer steps per quality run (batch 32; about 9 minutes on 2 cores in pixel space).",
    )
    parser.add_argument("--skip_speed", action="store_true", help="Only the quality runs.")
    parser.add_argument("--skip_quality", action="store_true", help="Only the speed rows.")
    parser.add_argument(
        "--keep_trained",
        action="store_true",
        help="Reuse a quality model already trained in --work_dir for the same --quality_steps (to try schedulers "
        "without retraining); the row then gives no training time.",
    )
    parser.add_argument("--num_images", type=int, default=8, help="Images per generation row (after warm-up).")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--work_dir", default=None, help="Keep the data and models here (default: a temp dir).")
    return parser.parse_args()


def train(variant: str, data: Path, base: Path, out: Path, steps: int, extra=()) -> dict:
    return launch_training(
        "train_spade_sdm.py",
        "--data_root", data, "--dataset", "generic", "--output_dir", out, "--model_config",
        ROOT / "configs/models/sdm_tiny.json", "--resolution", 32, "--train_batch_size", 32,
        "--max_train_steps", steps, "--pretrained_model_name_or_path", base, *VARIANTS[variant], *extra,
    )  # fmt: skip


def generation_rows(variant: str, model: Path, label: np.ndarray, num_images: int, steps: int) -> list[dict]:
    pipeline = SemanticDiffusionPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    for name in SCHEDULERS:
        pipeline.scheduler = make_scheduler(name, pipeline.scheduler.config, stochastic=True)
        kwargs = dict(num_inference_steps=steps, output_type="np", guidance_scale=1.5)
        pipeline(label, generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up
        start = time.perf_counter()
        pipeline(label, num_images_per_mask=num_images, generator=torch.Generator().manual_seed(1), **kwargs)
        seconds = (time.perf_counter() - start) / num_images
        rows.append(
            {
                "setup": f"tiny, {variant}",
                "measurement": f"generate, {name}, {steps} steps, guidance 1.5, batch {num_images}",
                "result": f"{seconds:.3f} s/image",
            }
        )
    return rows


def palette_mious(model: Path, val: Path) -> dict[str, float]:
    """Per entry of QUALITY_SAMPLERS: mIoU between the held-out masks and the palette segmenter's reading of one
    generated image per mask."""
    pipeline = SemanticDiffusionPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    dataset = load_segmentation_dataset(val, "generic")
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    segmenter = PaletteSegmenter(dataset.palette, value_range=(0.0, 1.0))
    training_schedule = pipeline.scheduler.config
    mious = {}
    for label, name, steps in QUALITY_SAMPLERS:
        if name == "dpmsolver-ode":
            pipeline.scheduler = make_scheduler("dpmsolver", training_schedule)
        else:
            pipeline.scheduler = make_scheduler(name, training_schedule, stochastic=True)
        images = pipeline(
            labels,
            guidance_scale=1.0,
            num_inference_steps=steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images
        confusion = confusion_matrix(segmenter(images), np.stack(labels), dataset.num_classes, dataset.ignore_index)
        mious[label] = float(iou_per_class(confusion).nanmean())
    return mious


def trained_for(model: Path, steps: int) -> bool:
    """Whether ``model`` holds a finished run of ``steps`` optimizer steps."""
    config = model / "training_config.json"
    finished = (model / "model_index.json").exists() and config.exists()
    return finished and json.loads(config.read_text())["max_train_steps"] == steps


def main(args):
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_sdm_"))
    data = work / "toy"
    if not (data / "val" / "class_names.json").exists():
        make_toy_dataset(data / "train", num_images=512, size=32, seed=0, split="train")
        make_toy_dataset(data / "val", num_images=64, size=32, seed=0, split="val")
    # The latent variants need a VAE that reconstructs the toy colours: fit the tiny one (about 2 minutes).
    # Pixel space never uses the base's VAE, so a pixel-only run skips the fitting.
    fit_vae = any(variant.startswith("latent") for variant in args.variants)
    base = work / ("base-fitted" if fit_vae else "base")
    if not (base / "model_index.json").exists():
        build_tiny_sd(base, sample_size=32, fit_vae_data=data / "train" if fit_vae else None, fit_vae_steps=400)
    label = load_segmentation_dataset(data / "val", "generic")[0]["label"]

    rows = []
    for variant in [] if args.skip_speed else args.variants:
        out = work / f"speed-{variant.replace(', ', '-')}"
        stats = train(variant, data / "train", base, out, args.train_steps)
        rows.append(
            {
                "setup": f"tiny, {variant}",
                "measurement": "train, batch 32, 32 px",
                "result": f"{stats['train_samples_per_second']} samples/s",
                "peak_memory_mb": stats["peak_memory_mb"],
            }
        )
        rows += generation_rows(variant, out, label, args.num_images, args.num_inference_steps)
        print(*rows[-4:], sep="\n", flush=True)

    if not args.skip_quality:
        for variant in args.variants:
            out = work / f"quality-{variant.replace(', ', '-')}"
            start = time.perf_counter()
            trained = "reused model" if args.keep_trained and trained_for(out, args.quality_steps) else None
            if trained is None:
                train(variant, data / "train", base, out, args.quality_steps,
                      ["--learning_rate", "5e-4", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "50",
                       "--use_ema", "--ema_decay", "0.995"])  # fmt: skip
                trained = f"{(time.perf_counter() - start) / 60:.1f} min"
            mious = palette_mious(out, data / "val")
            rows.append(
                {
                    "setup": f"tiny, {variant}",
                    "measurement": f"quality: {args.quality_steps} steps x 32 ({trained}), toy val mIoU, "
                    f"{' / '.join(mious)} steps",
                    "result": " / ".join(f"{miou:.3f}" for miou in mious.values()),
                }
            )
            print(rows[-1], flush=True)
    append_results("bench_sdm.py", rows, args.results)


if __name__ == "__main__":
    main(parse_args())
