#!/usr/bin/env python
"""The sidewalk SDM reference workflow (001) in one command: prepare -> train -> guidance fine-tune -> generate ->
evaluate -> report.

    python scripts/sidewalk_sdm.py --work_dir runs/sidewalk --data_dir /data/sidewalk-semantic --num_processes 8 \\
        --pretrained_model_name_or_path /models/stable-diffusion-v1-5 \\
        --inception_weights weights/weights-inception-2015-12-05-6726825d.pth \\
        --lpips_weights weights/alexnet-owt-7be5be79.pth --segmenter models/segformer-sidewalk
    python scripts/sidewalk_sdm.py --quick --work_dir /tmp/sidewalk-quick --data_dir /data/sidewalk-semantic

Each stage runs one of the repository's scripts as a subprocess, as a user would (``python SCRIPT`` or, with
--num_processes > 1, ``accelerate launch``), with the reference's settings:

  prepare    prepare_sidewalk.py at --resolution (1024), with a seeded train/val split (--val_fraction)
  train      train_spade_sdm.py: 50k steps, lr 1e-4, cosine schedule with 1000 warmup steps, gradient clipping 1.0,
             batch 2 per GPU (16 on 8 GPUs), EMA; on the 1024 latent preset (configs/models/sdm_1024_latent.json:
             SDM in the 128 px latents of Stable Diffusion's VAE, the route the README's SDM section estimates)
  finetune   the same script --init_from the trained model, --drop_rate 0.2, lr 2e-5, 10k steps: classifier-free
             guidance, as SDM and the reference fine-tune
  generate   generate_spade_sdm.py: 5 images for every mask of the --split (val: masks never trained on), guidance 1.5
  evaluate   evaluate.py: FID and KID against the real images of the same split, LPIPS diversity, mIoU
  report     WORK_DIR/<split>/report.md and report.json: the numbers next to the reference's targets (FID < 30,
             LPIPS > 0.3, semantic consistency > 0.6), each passed or failed

Under --work_dir:

  data/                       prepare_sidewalk.py's output        done when data/dataset_info.json exists (written last)
  sdm/                        the trained pipeline, checkpoints   done when sdm/model_index.json exists (saved last)
  sdm-cfg/                    the fine-tuned pipeline             done when sdm-cfg/model_index.json exists
  <split>/masks/              links to the split's label maps (the generator's --masks_dir)
  <split>/generated/          the generator's output              done when its metadata.jsonl has every mask's images
  <split>/evaluation/         evaluate.py's output                done when metrics.json exists, from the same command
  <split>/report.md, .json    the report                          done when newer than metrics.json
  stages/<stage>.json         the command each finished stage ran

Re-running the same command skips the finished stages and resumes the others: the trainers continue from their
last checkpoint (--resume_from_checkpoint latest), the generator generates only the masks it lacks, and
prepare_sidewalk.py skips the items it wrote. A finished stage is not redone when its flags change (the driver
says so and how to redo it: remove its folder), except the evaluation, which is cheap and is redone when its
command changes (e.g. weights given later).

--quick runs the same stages on a CPU in about a minute: the tiny preset (configs/models/sdm_tiny.json) in pixel space,
16 px, a few steps, the first --max_samples 16 rows, and the palette segmenter. Its numbers say nothing about
quality; it checks the plumbing.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # segdiff, for the few helpers used here (the scripts themselves run as subprocesses)

from segdiff.arguments import fraction, non_negative_float, non_negative_int, positive_float, positive_int  # noqa: E402
from segdiff.workflow import (  # noqa: E402
    add_launch_args,
    argument_parser,
    fill_defaults,
    launcher,
    run_stage,
    trainer_flags,
    write_report,
)

# The reference's targets (001, "Evaluation Metrics"): evaluate.py's metric (its --metrics name, under which
# metrics.json's "skipped" gives the reason it was not computed), its metrics.json key, name, direction, threshold.
TARGETS = (
    ("fid", "fid", "FID", "<", 30.0),
    ("lpips", "lpips_diversity", "LPIPS diversity", ">", 0.3),
    ("miou", "miou", "mIoU (semantic consistency)", ">", 0.6),
)
# FID compares the means and covariances of 2048-dimensional Inception features: with fewer images than that the
# sample covariance is singular and FID is biased upward, the more so the fewer images (Chong & Forsyth, "Effectively
# Unbiased FID and Inception Score and where to find them", CVPR 2020). KID has no such bias.
FID_MIN_IMAGES = 2048

# The reference's settings, and the --quick ones (tiny CPU run). A flag given on the command line wins over both.
FULL = {
    "model_config": str(ROOT / "configs" / "models" / "sdm_1024_latent.json"),
    "space": "latent",
    "resolution": 1024,
    "max_samples": None,
    "train_steps": 50000,
    "finetune_steps": 10000,
    "train_batch_size": 2,
    "lr_warmup_steps": 1000,
    "mixed_precision": "bf16",
    "checkpointing_steps": 5000,
    "num_images_per_mask": 5,
    "num_inference_steps": 50,
    "segmenter": None,
}
QUICK = {
    "model_config": str(ROOT / "configs" / "models" / "sdm_tiny.json"),
    "space": "pixel",
    "resolution": 16,
    "max_samples": 16,
    "train_steps": 4,
    "finetune_steps": 2,
    "train_batch_size": 2,
    "lr_warmup_steps": 0,
    "mixed_precision": "no",
    "checkpointing_steps": 2,
    "num_images_per_mask": 2,
    "num_inference_steps": 2,
    "segmenter": "palette",
}


def parse_args(argv=None):
    parser = argument_parser(__doc__)

    def default(name):
        return f"Default: {FULL[name]} (--quick: {QUICK[name]})."

    parser.add_argument("--work_dir", required=True, help="Where every stage writes (see above).")
    parser.add_argument("--quick", action="store_true", help="A tiny CPU run of every stage (see above).")
    add_launch_args(parser)  # the reference: --num_processes 8
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="Seeds the split, the training and the samples."
    )

    data = parser.add_argument_group("prepare")
    data.add_argument(
        "--data_dir",
        default=None,
        help="A local copy of segments/sidewalk-semantic (its parquet files, or a save_to_disk folder), passed to "
        "prepare_sidewalk.py. Default: download it from the hub.",
    )
    data.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="Side of the images, prepared and trained. " + default("resolution"),
    )
    data.add_argument(
        "--val_fraction", type=fraction, default=0.1, help="Share of the rows in the val split. Default: 0.1"
    )
    data.add_argument(
        "--max_samples",
        type=positive_int,
        default=None,
        help="Prepare only the first N rows. Default: all (--quick: 16).",
    )

    train = parser.add_argument_group("train and fine-tune")
    train.add_argument(
        "--model_config",
        default=None,
        help="SpadeUNetModel preset for train_spade_sdm.py. Default: configs/models/sdm_1024_latent.json (--quick: "
        "configs/models/sdm_tiny.json). Pixel presets (sdm_256.json, sdm_512.json) need --space pixel.",
    )
    train.add_argument(
        "--space", choices=("pixel", "latent"), default=None, help="Diffusion space. " + default("space")
    )
    train.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="With --space latent: a Stable Diffusion 1.x/2.x folder (or hub id) whose VAE encodes the images "
        "(1024 px -> 128 px latents).",
    )
    train.add_argument(
        "--train_steps", type=positive_int, default=None, help="Training steps. " + default("train_steps")
    )
    train.add_argument(
        "--finetune_steps",
        type=positive_int,
        default=None,
        help="Guidance fine-tune steps. " + default("finetune_steps"),
    )
    train.add_argument(
        "--train_batch_size", type=positive_int, default=None, help="Per process. " + default("train_batch_size")
    )
    train.add_argument(
        "--learning_rate", type=positive_float, default=1e-4, help="Training learning rate. Default: 1e-4"
    )
    train.add_argument(
        "--lr_warmup_steps", type=non_negative_int, default=None, help="Cosine warmup. " + default("lr_warmup_steps")
    )
    train.add_argument(
        "--finetune_learning_rate", type=positive_float, default=2e-5, help="Fine-tune learning rate. Default: 2e-5"
    )
    train.add_argument("--drop_rate", type=fraction, default=0.2, help="Fine-tune label-map dropout. Default: 0.2")
    train.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help=default("mixed_precision")
    )
    train.add_argument(
        "--gradient_checkpointing",
        "--use_checkpoint",
        action="store_true",
        help="Trade compute for memory in training (the reference's --use_checkpoint).",
    )
    train.add_argument(
        "--checkpointing_steps",
        type=positive_int,
        default=None,
        help="Resumable checkpoints every N steps. " + default("checkpointing_steps"),
    )

    sample = parser.add_argument_group("generate")
    sample.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="Whose masks are generated from and whose images FID compares with. val (default): masks the model "
        "never trained on. train: the training masks (the reference's choice; FID then rewards memorising).",
    )
    sample.add_argument(
        "--num_images_per_mask",
        "--num_samples_per_image",
        type=positive_int,
        default=None,
        help="Images per mask (the reference's --num_samples_per_image). " + default("num_images_per_mask"),
    )
    sample.add_argument("--num_inference_steps", type=positive_int, default=None, help=default("num_inference_steps"))
    sample.add_argument(
        "--guidance_scale", type=non_negative_float, default=1.5, help="Classifier-free guidance. Default: 1.5"
    )
    sample.add_argument(
        "--scheduler", choices=("ddpm", "ddim", "dpmsolver"), default="ddpm", help="Scheduler. Default: ddpm"
    )

    evaluation = parser.add_argument_group("evaluate (see python evaluate.py --help)")
    evaluation.add_argument("--inception_weights", default=None, help="FID/KID Inception weights file.")
    evaluation.add_argument(
        "--feature_extractor_torchscript", default=None, help="A custom FID/KID extractor (non-standard FID)."
    )
    evaluation.add_argument("--lpips_weights", default=None, help="LPIPS AlexNet weights file.")
    evaluation.add_argument(
        "--segmenter",
        default=None,
        help="For mIoU: a SegFormer folder, or palette. Default: none, mIoU skipped (--quick: palette).",
    )
    evaluation.add_argument("--segmenter_class_map", default=None, help="JSON: segmenter class id -> ours.")

    args = parser.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    if not Path(args.model_config).is_file():
        parser.error(f"--model_config {args.model_config} does not exist. Fix: pass a file of configs/models/.")
    if args.space == "latent" and args.pretrained_model_name_or_path is None:
        parser.error(
            "--space latent (the default 1024 latent preset) needs --pretrained_model_name_or_path: a Stable Diffusion "
            "folder whose VAE encodes the images. Fix: pass one, or --space pixel with a pixel preset "
            "(--model_config configs/models/sdm_512.json)."
        )
    if args.data_dir is not None and not Path(args.data_dir).exists():
        parser.error(f"--data_dir {args.data_dir} does not exist. Fix: point it at a copy of sidewalk-semantic.")
    return args


# ------------------------------------------------------------------------------------------------
# The stages' commands
# ------------------------------------------------------------------------------------------------


def prepare_command(args, data_dir: Path) -> list[str]:
    command = ["prepare_sidewalk.py", "--output_dir", str(data_dir), "--resolution", str(args.resolution)]
    command += ["--val_fraction", str(args.val_fraction), "--seed", str(args.seed)]
    command += ["--num_workers", "0" if args.quick else "8"]
    if args.data_dir is not None:
        command += ["--data_dir", args.data_dir]
    if args.max_samples is not None:
        command += ["--max_samples", str(args.max_samples)]
    return command


def training_command(args, data_dir: Path, output_dir: Path) -> list[str]:
    """What both training runs share: the data, the precision, the checkpoints (resumed when there)."""
    command = ["train_spade_sdm.py", "--data_root", str(data_dir), "--dataset", "sidewalk"]
    command += ["--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size)]
    return command + trainer_flags(args, output_dir)


def train_command(args, data_dir: Path, output_dir: Path) -> list[str]:
    command = training_command(args, data_dir, output_dir)
    command += ["--model_config", args.model_config, "--space", args.space, "--max_train_steps", str(args.train_steps)]
    command += ["--learning_rate", str(args.learning_rate), "--lr_scheduler", "cosine"]
    command += ["--lr_warmup_steps", str(args.lr_warmup_steps), "--max_grad_norm", "1.0"]
    if args.pretrained_model_name_or_path is not None:
        command += ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path]
    return command


def finetune_command(args, data_dir: Path, trained: Path, output_dir: Path) -> list[str]:
    """SDM's guidance fine-tune: the label map dropped (null map) --drop_rate of the time, a low constant rate."""
    command = training_command(args, data_dir, output_dir)
    command += ["--init_from", str(trained), "--drop_rate", str(args.drop_rate)]
    command += ["--max_train_steps", str(args.finetune_steps), "--learning_rate", str(args.finetune_learning_rate)]
    command += ["--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_grad_norm", "1.0"]
    if args.space == "latent":
        command += ["--space", "latent", "--pretrained_model_name_or_path", args.pretrained_model_name_or_path]
    return command


def generate_command(args, model: Path, masks_dir: Path, save_dir: Path) -> list[str]:
    command = ["generate_spade_sdm.py", "--model", str(model), "--masks_dir", str(masks_dir)]
    command += ["--save_dir", str(save_dir), "--num_images_per_mask", str(args.num_images_per_mask)]
    command += ["--guidance_scale", str(args.guidance_scale), "--scheduler", args.scheduler]
    command += ["--num_inference_steps", str(args.num_inference_steps), "--seed", str(args.seed)]
    if args.mixed_precision == "fp16":
        command.append("--fp16")
    return command


def evaluate_command(args, data_dir: Path, generated: Path, results_dir: Path) -> list[str]:
    """FID/KID against the real images of the same split; each metric without its weights is skipped by evaluate.py,
    with the reason in metrics.json."""
    command = ["evaluate.py", "--generated_dir", str(generated), "--real_dir", str(data_dir)]
    command += ["--real_dataset", "sidewalk", "--real_split", args.split, "--results_dir", str(results_dir)]
    for flag in ("inception_weights", "feature_extractor_torchscript", "lpips_weights", "segmenter"):
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    if args.segmenter_class_map is not None:
        command += ["--segmenter_class_map", args.segmenter_class_map]
    return command


# ------------------------------------------------------------------------------------------------
# Masks of the split, and when generation is done
# ------------------------------------------------------------------------------------------------


def link_split_masks(data_dir: Path, split: str, masks_dir: Path) -> None:
    """masks_dir := links to the label maps of ``split`` (dataset_info.json's "splits"), built whole or not at all."""
    if masks_dir.is_dir():
        return
    from segdiff.data import exit_on_bad_input, load_segmentation_dataset
    from segdiff.generation import link_or_copy

    with exit_on_bad_input():
        pairs = load_segmentation_dataset(data_dir, "sidewalk", split=split).pairs
    tmp = masks_dir.with_name(f".{masks_dir.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for _, label in pairs:
        link_or_copy(label, tmp / label.name)
    tmp.rename(masks_dir)
    print(f"[masks] {len(pairs)} {split} label maps linked in {masks_dir}")


def generation_done(save_dir: Path, masks_dir: Path, per_mask: int) -> bool:
    """metadata.jsonl (written once every mask is finished) lists images 0..per_mask-1 of every mask."""
    metadata = save_dir / "metadata.jsonl"
    if not metadata.is_file():
        return False
    written = {(r["mask_stem"], r["image_index"]) for r in map(json.loads, metadata.read_text().splitlines())}
    wanted = {(mask.stem, j) for mask in masks_dir.iterdir() for j in range(per_mask)}
    return wanted <= written


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def target_rows(metrics: dict) -> list[dict]:
    rows = []
    for metric, key, name, direction, threshold in TARGETS:
        value = metrics.get(key)
        passed = None if value is None else (value < threshold if direction == "<" else value > threshold)
        reason = None if value is not None else metrics.get("skipped", {}).get(metric, "not computed")
        rows.append(
            {
                "metric": key,
                "name": name,
                "value": value,
                "target": f"{direction} {threshold:g}",
                "passed": passed,
                "skipped": reason,
            }
        )
    return rows


def report_warnings(metrics: dict) -> list[str]:
    warnings = []
    if "fid" in metrics:
        generated, real = metrics["num_generated_images"], metrics["num_real_images"]
        if min(generated, real) < FID_MIN_IMAGES:
            warnings.append(
                f"FID from {generated} generated and {real} real images: fewer than {FID_MIN_IMAGES}, the dimension "
                "of the Inception features whose covariances FID compares, so the covariances are singular and FID "
                "is biased upward, the more so the fewer images (Chong & Forsyth, CVPR 2020: "
                "https://arxiv.org/abs/1911.07023). It is not comparable with FIDs of larger sets; read KID "
                "(unbiased) beside it."
            )
        if not metrics.get("fid_kid_standard", True):
            warnings.append(
                f"FID/KID come from a non-standard feature extractor ({metrics['feature_extractor']}): not "
                "comparable with the reference's target, which is torch-fidelity's Inception-v3 protocol."
            )
    if metrics.get("segmenter", "").startswith("palette"):
        warnings.append(
            "mIoU from the palette segmenter (nearest class colour): a plumbing check, not semantic consistency. "
            "The reference measures it with a segmentation model: pass --segmenter a SegFormer folder."
        )
    return warnings


def build_report(args, metrics: dict, metrics_path: Path) -> dict:
    report = {
        "reference": "001: semantic diffusion model on segments/sidewalk-semantic at 1024 px",
        "split": args.split,
        "num_masks": metrics["num_masks"],
        "num_generated_images": metrics["num_generated_images"],
        "num_real_images": metrics.get("num_real_images"),
        "targets": target_rows(metrics),
        "kid": None if "kid_mean" not in metrics else {"mean": metrics["kid_mean"], "std": metrics["kid_std"]},
        "warnings": report_warnings(metrics),
        "evaluation": str(metrics_path),
    }
    return report


def report_markdown(report: dict) -> str:
    def number(value):
        return "-" if value is None else f"{value:.4f}"

    lines = [
        "# Sidewalk SDM against the reference's targets (001)",
        "",
        f"{report['num_generated_images']} images generated from the {report['num_masks']} masks of the "
        f"{report['split']} split; FID/KID against {report['num_real_images'] or 'no'} real images of that split.",
        "",
        "| metric | ours | reference target | result |",
        "| --- | --- | --- | --- |",
    ]
    for row in report["targets"]:
        result = {True: "PASS", False: "FAIL", None: f"not computed: {row['skipped']}"}[row["passed"]]
        lines.append(f"| {row['name']} | {number(row['value'])} | {row['target']} | {result} |")
    if report["kid"] is not None:
        kid = report["kid"]
        lines.append(f"| KID | {kid['mean']:.5f} +- {kid['std']:.5f} | (none; unbiased, read beside FID) | - |")
    if report["warnings"]:
        lines += ["", "Warnings:", *(f"- {warning}" for warning in report["warnings"])]
    lines += ["", f"All numbers: {report['evaluation']} (and evaluation_report.txt beside it)."]
    return "\n".join(lines) + "\n"


def main(args):
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir, trained, finetuned = work_dir / "data", work_dir / "sdm", work_dir / "sdm-cfg"
    split_dir = work_dir / args.split
    masks_dir, generated, results_dir = split_dir / "masks", split_dir / "generated", split_dir / "evaluation"
    python, launch = [sys.executable], launcher(args)

    run_stage(work_dir, "prepare", python, prepare_command(args, data_dir), (data_dir / "dataset_info.json").is_file())
    run_stage(
        work_dir, "train", launch, train_command(args, data_dir, trained), (trained / "model_index.json").is_file()
    )
    run_stage(
        work_dir,
        "finetune",
        launch,
        finetune_command(args, data_dir, trained, finetuned),
        (finetuned / "model_index.json").is_file(),
    )
    link_split_masks(data_dir, args.split, masks_dir)
    run_stage(
        work_dir,
        f"generate-{args.split}",
        launch,
        generate_command(args, finetuned, masks_dir, generated),
        generation_done(generated, masks_dir, args.num_images_per_mask),
    )
    run_stage(
        work_dir,
        f"evaluate-{args.split}",
        python,
        evaluate_command(args, data_dir, generated, results_dir),
        (results_dir / "metrics.json").is_file(),
        redo_when_changed=True,
    )
    metrics_path = results_dir / "metrics.json"
    write_report(split_dir, metrics_path, lambda metrics: build_report(args, metrics, metrics_path), report_markdown)


if __name__ == "__main__":
    main(parse_args())
