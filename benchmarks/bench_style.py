#!/usr/bin/env python
"""Style reference on the two-theme toy data: does a reference of theme B give theme-B colours? Appends to RESULTS.md.

    python benchmarks/bench_style.py                  # about 12 minutes on 2 cores
    python benchmarks/bench_style.py --train_steps 20 --results /tmp/r.md   # smoke run

The toy scenes come in two colour themes (`python -m segdiff.toy --themes plain inverted`: the palette, or its
inverse). train_spade_sdm.py --style_reference learns from a mix of both (pixel space, tiny config, 32 px, batch
32), launched as a user would. Then every held-out mask is generated twice, with a reference of each theme (the
same scene painted in that theme: only the colours differ; DDPM, 50 steps), and each image is scored by
- the colour-histogram similarity (evaluate.py's style metric) to the references of each theme;
- mIoU of the palette segmenter of the reference's theme against the input mask (layout kept).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, append_results, launch_training  # noqa: E402

from segdiff.data import load_segmentation_dataset  # noqa: E402
from segdiff.metrics import color_histogram_similarity, confusion_matrix, iou_per_class  # noqa: E402
from segdiff.pipelines.sdm import SemanticDiffusionPipeline  # noqa: E402
from segdiff.schedulers import make_scheduler  # noqa: E402
from segdiff.toy import PaletteSegmenter, make_toy_dataset, theme_palette  # noqa: E402

THEMES = ("plain", "inverted")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_steps", type=int, default=400, help="Optimizer steps (batch 32).")
    parser.add_argument("--style_scale", type=float, default=1.5)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--work_dir", default=None, help="Keep the data and model here (default: a temp dir).")
    return parser.parse_args()


def in_theme(image: Image.Image, theme: str) -> Image.Image:
    pixels = np.asarray(image.convert("RGB"))
    return Image.fromarray(255 - pixels if theme == "inverted" else pixels)


def main(args):
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_style_"))
    train, val = work / "train", work / "val"
    if not (val / "class_names.json").exists():
        make_toy_dataset(train, num_images=512, size=32, seed=0, split="train", themes=THEMES)
        make_toy_dataset(val, num_images=32, size=32, seed=0, split="val")

    model = work / "model"
    start = time.perf_counter()
    stats = launch_training(
        "train_spade_sdm.py", "--data_root", train, "--dataset", "generic", "--output_dir", model,
        "--model_config", ROOT / "configs/models/sdm_tiny.json", "--resolution", 32, "--train_batch_size", 32,
        "--max_train_steps", args.train_steps, "--learning_rate", "5e-4", "--lr_scheduler", "constant_with_warmup",
        "--lr_warmup_steps", 50, "--use_ema", "--ema_decay", "0.995", "--style_reference", "--style_resolution", 32,
    )  # fmt: skip
    minutes = (time.perf_counter() - start) / 60

    pipeline = SemanticDiffusionPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = make_scheduler("ddpm", pipeline.scheduler.config)  # generate_spade_sdm.py's default
    dataset = load_segmentation_dataset(val, "generic")
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    references = {theme: [in_theme(dataset[i]["image"], theme) for i in range(len(dataset))] for theme in THEMES}

    rows = [
        {
            "setup": "tiny, pixel, spade + style",
            "measurement": f"train, batch 32, 32 px, {args.train_steps} steps ({minutes:.1f} min)",
            "result": f"{stats['train_samples_per_second']} samples/s",
            "peak_memory_mb": stats["peak_memory_mb"],
        }
    ]
    for theme in THEMES:
        images = pipeline(
            labels,
            style_images=references[theme],
            style_scale=args.style_scale,
            guidance_scale=1.0,
            num_inference_steps=args.num_inference_steps,
            output_type="pil",
            generator=torch.Generator().manual_seed(0),
        ).images
        similarity = {
            other: np.mean([color_histogram_similarity(im, ref) for im, ref in zip(images, references[other])])
            for other in THEMES
        }
        segmenter = PaletteSegmenter(theme_palette(dataset.palette, theme))
        predicted = np.stack([segmenter(image) for image in images])
        confusion = confusion_matrix(predicted, np.stack(labels), dataset.num_classes, dataset.ignore_index)
        rows.append(
            {
                "setup": "tiny, pixel, spade + style",
                "measurement": f"references of theme {theme} (style scale {args.style_scale}): histogram "
                "similarity to plain / inverted references; mIoU in that theme's palette",
                "result": f"{similarity['plain']:.3f} / {similarity['inverted']:.3f}; "
                f"mIoU {float(iou_per_class(confusion).nanmean()):.3f}",
            }
        )
        print(rows[-1], flush=True)
    append_results("bench_style.py", rows, args.results)


if __name__ == "__main__":
    main(parse_args())
