#!/usr/bin/env python
"""The embedded default, end to end on a CPU: toy data -> tiny base -> joint model -> samples -> score.

    make demo            # or: python demo.py --output_dir demo_output

Every stage is a command a user could type (printed before it runs) and is skipped when its output
is already there, so an interrupted demo picks up where it stopped. At the end it prints the
image/mask agreement: for each generated pair, the IoU between the generated mask and what the
exact palette segmenter reads as that class in the generated image.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from segdiff.arguments import output_folder, positive_int

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=output_folder, default="demo_output", help="Where everything goes.")
    parser.add_argument("--num_images", type=positive_int, default=512, help="Toy training images.")
    parser.add_argument(
        "--vae_steps", type=positive_int, default=250, help="Steps fitting the tiny VAE to the toy images."
    )
    parser.add_argument("--train_steps", type=positive_int, default=1200, help="Joint model training steps (batch 32).")
    parser.add_argument("--num_samples", type=positive_int, default=64, help="Generated (image, mask) pairs.")
    parser.add_argument("--num_inference_steps", type=positive_int, default=50)
    parser.add_argument("--quick", action="store_true", help="A minute-long smoke run (numbers mean nothing).")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.vae_steps, args.train_steps, args.num_samples = 64, 10, 10, 8
        args.num_inference_steps = 5
    return args


def run(stage: str, command: str, done: Path) -> float:
    """Run one stage (``python <command>``) unless its output exists; returns the seconds it took."""
    if done.exists():
        print(f"[{stage}] already done ({done})")
        return 0.0
    print(f"\n[{stage}] $ python {command}", flush=True)
    start = time.time()
    if subprocess.run([sys.executable, *shlex.split(command)], cwd=ROOT).returncode != 0:
        # The stage printed its own error; a traceback of this script would only bury it.
        raise SystemExit(
            f"error: the {stage} stage failed (its message is above). Fix it and run demo.py again: the stages "
            "already done are skipped."
        )
    return time.time() - start


def main(args):
    out = Path(args.output_dir).resolve()
    data, base, model, samples = out / "data", out / "tiny-sd", out / "joint-model", out / "samples"
    q = {
        name: shlex.quote(str(path)) for name, path in dict(data=data, base=base, model=model, samples=samples).items()
    }
    seconds = {}
    seconds["data"] = run(
        "data",
        f"-m segdiff.toy --output_dir {q['data']} --num_images {args.num_images} --val_images 64 --size 32",
        data / "val" / "class_names.json",
    )
    seconds["base"] = run(
        "base",
        f"-m segdiff.tiny --output_dir {q['base']} --fit_vae_data {q['data']}/train --fit_vae_steps {args.vae_steps}",
        base / "model_index.json",
    )
    # The tiny base's text encoder is random, so it is trained too; a real SD base can keep it frozen.
    # accelerate launch gives a CPU process one thread unless told otherwise: every core, or OMP_NUM_THREADS
    # when set (the test suite runs two tests at a time on two cores).
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
    seconds["train"] = run(
        "train",
        "-m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "
        f"--num_cpu_threads_per_process {threads} "
        f"train_seg_mask_diffusion.py --pretrained_model_name_or_path {q['base']} --data_root {q['data']}/train "
        f"--dataset generic --output_dir {q['model']} --resolution 32 --train_batch_size 32 "
        f"--max_train_steps {args.train_steps} --learning_rate 1e-3 --lr_scheduler cosine --lr_warmup_steps 100 "
        "--cache_latents --train_text_encoder --use_ema --ema_decay 0.999 "
        f"--checkpointing_steps 500 --checkpoints_total_limit 1 --validation_steps {args.train_steps}",
        model / "model_index.json",
    )
    seconds["generate"] = run(
        "generate",
        f"generate_joint_image_mask_diffusion.py --checkpoint {q['model']} --save_dir {q['samples']} "
        f"--num_samples {args.num_samples} --num_inference_steps {args.num_inference_steps} --batch_size 16",
        samples / "grid.png",
    )
    report(out, samples, data, seconds)


def report(out: Path, samples: Path, data: Path, seconds: dict) -> None:
    from segdiff.metrics import mask_agreement
    from segdiff.toy import PaletteSegmenter

    segmenter = PaletteSegmenter.from_class_names_json(data / "train" / "class_names.json")
    agreement = mask_agreement(samples, segmenter)
    summary = {
        "image_mask_agreement_iou": agreement["mean_iou"],
        "per_class": agreement["per_class"],
        "num_samples": len(agreement["per_sample"]),
        "seconds": {stage: round(s, 1) for stage, s in seconds.items()},
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nImage/mask agreement (IoU of the generated mask and the palette segmenter's reading of the image):")
    for name, value in agreement["per_class"].items():
        print(f"  {name:<12} {value:.3f}")
    print(f"  {'mean':<12} {agreement['mean_iou']:.3f}   over {summary['num_samples']} samples")
    print("Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    print(f"Grid: {samples / 'grid.png'}   summary: {out / 'demo_summary.json'}")


if __name__ == "__main__":
    main(parse_args())
