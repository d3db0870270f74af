#!/usr/bin/env python
"""The LoveDA synthetic-data study in one command: layout model -> ControlNet -> synthetic pairs -> downstream
evaluation against oversampling -> report.

    python scripts/loveda_synthetic.py --work_dir runs/loveda --data_root /data/LoveDA \\
        --pretrained_model_name_or_path /models/stable-diffusion-v1-5 --num_processes 8
    python scripts/loveda_synthetic.py --quick --work_dir /tmp/loveda-quick --data_root /data/LoveDA

Does synthetic data help a LoveDA segmenter more than oversampling the real pairs it already has? Every model of
the study sees the same N real training pairs (--max_train_samples, chosen by a hash of their names, so every
script given the same data and N takes the same ones): the layout model, the ControlNet, and the segmenters of
every arm. Each stage runs one of the repository's scripts as a subprocess, as a user would (``python SCRIPT`` or,
with --num_processes > 1, ``accelerate launch``):

  layout      train_layout_diffusion.py --dataset loveda --condition_on_domain: label maps at 128 px
              (configs/models/layout_128.json, the 1024 px tiles majority-pooled), conditioned on each map's class
              ratios and its Urban/Rural scene; 20k steps, batch 32 per GPU, lr 1e-4, EMA
  controlnet  train_controlnet_seg.py over --pretrained_model_name_or_path (Stable Diffusion 1.5) at 512 px, the
              prompt naming the scene: "an {domain} aerial image of {classes}"; 10k steps, batch 4 per GPU, lr 1e-5,
              random affine, 10% empty prompts
  synthetic   generate_synthetic_dataset.py --balance --domain Urban,Rural: --num_synthetic (1024) layouts that ask
              for the rare classes most, half urban and half rural, rendered by the ControlNet (30 UniPC steps)
  evaluate    evaluate.py --downstream: a segmenter (a SegFormer by default; --downstream_pretrained to start from
              one) trained on each arm (real only, + oversampling, + synthetic, + synthetic + oversampling) for every
              --downstream_seeds (5), 4000 steps at 512 px, scored on LoveDA's Val split; no FID etc. (--metrics "")
  report      WORK_DIR/report.md and report.json, from evaluate.py's metrics.json: the per-class IoU of every arm
              (rare classes first: fewest training pixels), mean +- std over seeds, synthetic - oversampling per
              class with its positive seeds, the classes made worse, the render fidelity per class (next to what its
              reader reads on the real Val pairs), and which real pairs each model saw (evaluate.py's check of the
              layout model's and ControlNet's records)

Under --work_dir:

  layout/                     the layout pipeline, checkpoints      done when layout/model_index.json exists (saved last)
  controlnet/                 the ControlNet, checkpoints           done when its weights file is complete
  synthetic/                  the synthetic dataset                 done when ratio_report.json exists (written last)
                                                                    and metadata.jsonl lists --num_synthetic samples
  evaluation/                 evaluate.py's output                  done when metrics.json exists, from the same command
  report.md, report.json      the report                            done when newer than metrics.json
  stages/<stage>.json         the command each finished stage ran
  tiny-sd/                    --quick only: the tiny base model (python -m segdiff.tiny)

Re-running the same command skips the finished stages and resumes the others: the trainers continue from their
last checkpoint (--resume_from_checkpoint latest) and the generator adds only the samples it lacks (a larger
--num_synthetic grows the dataset). A finished training stage is not redone when its flags change (the driver says
so and how to redo it: remove its folder); the evaluation is redone when its command changes.

Several GPUs (--num_processes 8, or --accelerate_config): the trainers keep their batch per GPU and their steps, so
each model sees 8 times the samples in about the time one GPU takes; pass --layout_steps 2500 --controlnet_steps
1250 to see the same samples in about an eighth of it. The generator splits the samples over the GPUs. evaluate.py
runs in one process.

Cost on A100s, an ESTIMATE, not a measurement (no GPU was used to write this). FLOPs per sample were counted on
PyTorch's meta device (torch.utils.flop_counter) for the default settings: layout model (74 M parameters, 128 px)
0.64 TFLOP per training sample, 0.21 per sampling step; ControlNet on SD 1.5 at 512 px 2.27 TFLOP per training
sample plus 1.12 for the VAE encoder (run at every step: --random_affine cannot use cached latents), 1.09 per
rendering step (UNet + ControlNet; twice with classifier-free guidance) and 2.51 for the VAE decoder. Time =
FLOPs / (A100 bf16 peak 312 TFLOP/s x utilisation), at the 40% that benchmarks/estimate_memory.py assumes for the
README's A100 figures, and at 15%, nearer what diffusion training often reaches. The segmenter is too small to
fill a GPU: its runs are estimated at about 15 steps/s (kernel-launch bound), an assumption.

  stage        work (defaults)                               1 A100 (40% - 15%)    8 A100 (same samples: steps/8)
  layout       20k steps x 32 maps x 0.64 TFLOP              0.9 - 2.4 h           7 - 18 min
  controlnet   10k steps x 4 images x 3.4 TFLOP              0.3 - 0.8 h           2 - 6 min
  synthetic    1024 x (50 x 0.21 + 60 x 1.09 + 2.5) TFLOP     0.2 - 0.5 h           1 - 4 min
  evaluate     4 arms x 5 seeds x 4000 steps at ~15 steps/s  about 1.5 h           about 1.5 h (one process)
  total                                                      about 3 - 5 h         about 1.7 - 2 h

--quick runs the same stages on a CPU in about half a minute: a tiny base (python -m segdiff.tiny) unless
--pretrained_model_name_or_path is given, the tiny layout preset (configs/models/layout_tiny.json), 32 px, a few
steps of each model, 8 real pairs, 8 synthetic ones, 2 seeds of a few segmenter steps. Its numbers say nothing
about quality; it checks the plumbing.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # segdiff, for the few helpers used here (the scripts themselves run as subprocesses)

from segdiff.arguments import non_negative_int, positive_float, positive_int  # noqa: E402
from segdiff.workflow import (  # noqa: E402
    add_launch_args,
    argument_parser,
    fill_defaults,
    launcher,
    run_stage,
    safetensors_complete,
    trainer_flags,
    write_report,
)

# The ControlNet's prompt names each map's scene, so the renderer draws the domain each layout asks for.
PROMPT_TEMPLATE = "an {domain} aerial image of {classes}"
DOMAINS = "Urban,Rural"
# evaluate.py's arms (segdiff.downstream.ARMS, not imported: it pulls in torch) and their report columns.
ARMS = {
    "real_only": "real only",
    "real_plus_oversampling": "+ oversampling",
    "real_plus_synthetic": "+ synthetic",
    "real_plus_synthetic_plus_oversampling": "+ synthetic + oversampling",
}

# The study's settings, and the --quick ones (tiny CPU run). A flag given on the command line wins over both.
FULL = {
    "max_train_samples": 512,
    "num_synthetic": 1024,
    "layout_config": str(ROOT / "configs" / "models" / "layout_128.json"),
    "layout_resolution": 128,
    "layout_steps": 20000,
    "layout_batch_size": 32,
    "controlnet_resolution": 512,
    "controlnet_steps": 10000,
    "controlnet_batch_size": 4,
    "checkpointing_steps": 1000,
    "mixed_precision": "bf16",
    "layout_inference_steps": 50,
    "render_steps": 30,
    "downstream_steps": 4000,
    "downstream_resolution": 512,
    "downstream_seeds": [0, 1, 2, 3, 4],
}
QUICK = {
    "max_train_samples": 8,
    "num_synthetic": 8,
    "layout_config": str(ROOT / "configs" / "models" / "layout_tiny.json"),
    "layout_resolution": 32,
    "layout_steps": 4,
    "layout_batch_size": 4,
    "controlnet_resolution": 32,
    "controlnet_steps": 4,
    "controlnet_batch_size": 2,
    "checkpointing_steps": 2,
    "mixed_precision": "no",
    "layout_inference_steps": 4,
    "render_steps": 4,
    "downstream_steps": 4,
    "downstream_resolution": 32,
    "downstream_seeds": [0, 1],
}


def parse_args(argv=None):
    parser = argument_parser(__doc__)

    def default(name):
        return f"Default: {FULL[name]} (--quick: {QUICK[name]})."

    parser.add_argument("--work_dir", required=True, help="Where every stage writes (see above).")
    parser.add_argument("--quick", action="store_true", help="A tiny CPU run of every stage (see above).")
    add_launch_args(parser)
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="Seeds the training and the synthetic samples."
    )
    parser.add_argument(
        "--data_root", required=True, help="The LoveDA root: Train/ and Val/, each with Urban/ and Rural/."
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="The Stable Diffusion 1.x folder (or hub id) the ControlNet trains over. Required, but with --quick "
        "(which builds a tiny one).",
    )
    parser.add_argument(
        "--max_train_samples",
        type=positive_int,
        default=None,
        help="The N real training pairs every model sees (the same N pairs for all). " + default("max_train_samples"),
    )
    parser.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help=default("mixed_precision")
    )
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="Trade compute for memory in both trainers."
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=positive_int,
        default=None,
        help="Resumable checkpoints. " + default("checkpointing_steps"),
    )

    layout = parser.add_argument_group("layout")
    layout.add_argument("--layout_config", default=None, help="LayoutUNetModel preset. " + default("layout_config"))
    layout.add_argument("--layout_resolution", type=positive_int, default=None, help=default("layout_resolution"))
    layout.add_argument(
        "--layout_steps", type=positive_int, default=None, help="Training steps. " + default("layout_steps")
    )
    layout.add_argument(
        "--layout_batch_size", type=positive_int, default=None, help="Per GPU. " + default("layout_batch_size")
    )
    layout.add_argument("--layout_learning_rate", type=positive_float, default=1e-4, help="Default: 1e-4")

    controlnet = parser.add_argument_group("controlnet")
    controlnet.add_argument(
        "--controlnet_resolution", type=positive_int, default=None, help=default("controlnet_resolution")
    )
    controlnet.add_argument(
        "--controlnet_steps", type=positive_int, default=None, help="Training steps. " + default("controlnet_steps")
    )
    controlnet.add_argument(
        "--controlnet_batch_size", type=positive_int, default=None, help="Per GPU. " + default("controlnet_batch_size")
    )
    controlnet.add_argument("--controlnet_learning_rate", type=positive_float, default=1e-5, help="Default: 1e-5")

    synthetic = parser.add_argument_group("synthetic")
    synthetic.add_argument(
        "--num_synthetic", type=positive_int, default=None, help="Synthetic pairs. " + default("num_synthetic")
    )
    synthetic.add_argument(
        "--layout_inference_steps", type=positive_int, default=None, help=default("layout_inference_steps")
    )
    synthetic.add_argument("--render_steps", type=positive_int, default=None, help=default("render_steps"))

    evaluation = parser.add_argument_group("evaluate (see python evaluate.py --help, its --downstream_* flags)")
    evaluation.add_argument(
        "--downstream_seeds",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="Seeds of every arm. " + default("downstream_seeds"),
    )
    evaluation.add_argument(
        "--downstream_model",
        choices=("segformer", "unet"),
        default="segformer",
        help="The segmenter of every arm. Default: segformer",
    )
    evaluation.add_argument(
        "--downstream_pretrained", default=None, help="A local SegFormer folder to start the segmenters from."
    )
    evaluation.add_argument(
        "--downstream_steps", type=positive_int, default=None, help="Steps of each run. " + default("downstream_steps")
    )
    evaluation.add_argument(
        "--downstream_resolution", type=positive_int, default=None, help=default("downstream_resolution")
    )
    evaluation.add_argument(
        "--metrics",
        default="",
        help='evaluate.py\'s --metrics, e.g. "fid,kid" (their weights must be found). Default: none.',
    )

    args = parser.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else FULL)
    if not Path(args.data_root).is_dir():
        parser.error(f"--data_root {args.data_root} does not exist. Fix: point it at the LoveDA root (Train/, Val/).")
    if args.pretrained_model_name_or_path is None and not args.quick:
        parser.error(
            "the ControlNet needs --pretrained_model_name_or_path: a Stable Diffusion 1.x folder (e.g. "
            "/models/stable-diffusion-v1-5). Fix: pass one (--quick builds a tiny one)."
        )
    if not Path(args.layout_config).is_file():
        parser.error(f"--layout_config {args.layout_config} does not exist. Fix: pass a file of configs/models/.")
    return args


# ------------------------------------------------------------------------------------------------
# The stages' commands
# ------------------------------------------------------------------------------------------------


def base_command(args, base: Path) -> list[str]:
    """--quick's base model: the tiny Stable Diffusion folder, at the ControlNet's size."""
    return ["-m", "segdiff.tiny", "--output_dir", str(base), "--sample_size", str(args.controlnet_resolution)]


def training_command(args, script: str, output_dir: Path, steps: int, batch_size: int, resolution: int) -> list[str]:
    """What both trainers share: LoveDA's N real pairs, precision, EMA, resumable checkpoints."""
    command = [script, "--data_root", args.data_root, "--dataset", "loveda"]
    command += ["--max_train_samples", str(args.max_train_samples), "--resolution", str(resolution)]
    command += ["--max_train_steps", str(steps), "--train_batch_size", str(batch_size)]
    return command + trainer_flags(args, output_dir)


def layout_command(args, output_dir: Path) -> list[str]:
    command = training_command(
        args, "train_layout_diffusion.py", output_dir, args.layout_steps, args.layout_batch_size, args.layout_resolution
    )
    command += ["--model_config", args.layout_config, "--condition_on_domain"]
    return command + ["--learning_rate", str(args.layout_learning_rate)]


def controlnet_command(args, base: str, output_dir: Path) -> list[str]:
    command = training_command(
        args,
        "train_controlnet_seg.py",
        output_dir,
        args.controlnet_steps,
        args.controlnet_batch_size,
        args.controlnet_resolution,
    )
    command += ["--pretrained_model_name_or_path", base, "--prompt_template", PROMPT_TEMPLATE]
    command += ["--learning_rate", str(args.controlnet_learning_rate), "--random_affine"]
    return command + ["--proportion_empty_prompts", "0.1", "--set_grads_to_none"]


def synthetic_command(args, layout: Path, controlnet: Path, save_dir: Path) -> list[str]:
    command = ["generate_synthetic_dataset.py", "--layout_model", str(layout), "--renderer", str(controlnet)]
    command += ["--balance", "--domain", DOMAINS, "--num_samples", str(args.num_synthetic)]
    command += ["--num_inference_steps", str(args.layout_inference_steps), "--render_steps", str(args.render_steps)]
    return command + ["--save_dir", str(save_dir), "--seed", str(args.seed)]


def evaluate_command(args, synthetic: Path, results_dir: Path) -> list[str]:
    """The arms on the same N real pairs the generators saw, scored on LoveDA's Val split."""
    command = ["evaluate.py", "--generated_dir", str(synthetic), "--real_dir", args.data_root]
    command += ["--real_dataset", "loveda", "--metrics", args.metrics, "--results_dir", str(results_dir)]
    command += ["--downstream", "--max_train_samples", str(args.max_train_samples)]
    command += ["--downstream_seeds", *map(str, args.downstream_seeds), "--downstream_model", args.downstream_model]
    command += ["--downstream_steps", str(args.downstream_steps)]
    command += ["--downstream_resolution", str(args.downstream_resolution)]
    if args.downstream_pretrained is not None:
        command += ["--downstream_pretrained", args.downstream_pretrained]
    return command


def synthetic_done(save_dir: Path, num_samples: int) -> bool:
    """ratio_report.json is written after metadata.jsonl, which lists the samples of the run that wrote it."""
    metadata = save_dir / "metadata.jsonl"
    if not (save_dir / "ratio_report.json").is_file() or not metadata.is_file():
        return False
    return len(metadata.read_text().splitlines()) == num_samples


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def rarest_first(pixels: dict) -> list[str]:
    """Fewest real training pixels first, as evaluate.py's evaluation_report.txt orders its table (equal counts
    keep the class order)."""
    return sorted(pixels, key=pixels.get)


# The models evaluate.py checks, by generate_synthetic_dataset.py's flag (metrics.json's downstream.generators keys).
MODEL_NAMES = {"layout_model": "layout model", "renderer": "ControlNet"}


def real_pairs_seen(args, down: dict) -> dict:
    """Which real pairs each model saw, as evaluate.py checked them from the models' own records (metrics.json's
    downstream.generators: the layout model's and the ControlNet's training_config.json train_samples against the
    pairs it trained every arm on)."""
    return {
        "max_train_samples": args.max_train_samples,
        "segmenters": down["num_real_train"],
        "generators": down["generators"],
    }


def compared(entry: dict, key: str) -> str:
    return str(entry[key]) if key in entry else "not compared (another folder)"


def class_rows(down: dict) -> list[dict]:
    """Per class, rarest first: every arm's IoU over seeds, synthetic - oversampling, render fidelity."""
    pixels = down["train_pixels_per_class"]
    versus = down["synthetic_vs_oversampling"]["per_class_iou"]
    return [
        {
            "class": name,
            "train_pixels": pixels[name],
            "iou": {arm: down["arms"][arm]["per_class_iou"][name] for arm in ARMS},
            "synthetic_minus_oversampling": versus[name],
            "render_iou": down["render_fidelity"]["per_class_iou"][name],
            "reader_real_val_iou": down["render_fidelity"]["reader_real_val_iou"][name],
            "made_worse": name in down["classes_made_worse"],
        }
        for name in rarest_first(pixels)
    ]


def build_report(args, metrics: dict, metrics_path: Path) -> dict:
    down = metrics["downstream"]
    return {
        "study": "LoveDA: layout model + ControlNet synthetic pairs against oversampling the same real pairs",
        "real_pairs": real_pairs_seen(args, down),
        "num_synthetic": down["num_synthetic"],
        "num_real_val": down["num_real_val"],
        "seeds": down["seeds"],
        "segmenter": {key: down[key] for key in ("model", "pretrained", "steps", "resolution", "batch_size")},
        "arms": {arm: {key: down["arms"][arm][key] for key in ("num_pairs", "miou")} for arm in ARMS},
        "synthetic_minus_oversampling_miou": down["synthetic_vs_oversampling"]["miou"],
        "classes": class_rows(down),
        "classes_made_worse": down["classes_made_worse"],
        "worse_threshold": down["worse_threshold"],
        "evaluation": str(metrics_path),
    }


def over_seeds(spread: dict, signed=False) -> str:
    if spread["mean"] is None:
        return "-"
    mean = f"{spread['mean']:+.3f}" if signed else f"{spread['mean']:.3f}"
    return mean if spread["std"] is None else f"{mean} ± {spread['std']:.3f}"


def report_markdown(report: dict) -> str:
    seeds, total = len(report["seeds"]), max(sum(row["train_pixels"] for row in report["classes"]), 1)
    segmenter = report["segmenter"]
    lines = [
        "# LoveDA: synthetic pairs against oversampling",
        "",
        f"A {segmenter['model']} ({segmenter['pretrained'] or 'random init'}) trained {segmenter['steps']} steps at "
        f"{segmenter['resolution']} px on each arm, seeds {report['seeds']}, scored on {report['num_real_val']} "
        "real Val pairs. IoU: mean ± std over seeds.",
        "",
        "| arm | pairs | mIoU |",
        "| --- | --- | --- |",
        *(
            f"| {label} | {report['arms'][arm]['num_pairs']} | {over_seeds(report['arms'][arm]['miou'])} |"
            for arm, label in ARMS.items()
        ),
        "",
        f"Synthetic - oversampling, mIoU: {over_seeds(report['synthetic_minus_oversampling_miou'], signed=True)} "
        f"(positive in {report['synthetic_minus_oversampling_miou']['positive_seeds']} of {seeds} seeds).",
        "",
        "Per class, rarest first (fewest real training pixels); render IoU: the real-only segmenter of the first "
        "seed reading the synthetic images against their own masks, next to the same segmenter on the real Val "
        "pairs (on real). Render IoU well below on real: a class the renderer cannot draw yet; both low: the "
        "segmenter cannot read the class at all, so its render IoU says nothing of the renderer.",
        "",
        "| class | train pixels | "
        + " | ".join(ARMS.values())
        + " | synthetic - oversampling | > 0 | render IoU | on real |",
        "| --- | --- | " + " | ".join("---" for _ in ARMS) + " | --- | --- | --- | --- |",
    ]
    for row in report["classes"]:
        versus, render, reader = row["synthetic_minus_oversampling"], row["render_iou"], row["reader_real_val_iou"]
        cells = [
            f"{row['class']}{' (worse)' if row['made_worse'] else ''}",
            f"{row['train_pixels']} ({100 * row['train_pixels'] / total:.1f}%)",
            *(over_seeds(row["iou"][arm]) for arm in ARMS),
            over_seeds(versus, signed=True),
            f"{versus['positive_seeds']}/{seeds}",
            "-" if render is None else f"{render:.3f}",
            "-" if reader is None else f"{reader:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    worse = report["classes_made_worse"]
    lines += [
        "",
        f"Classes the synthetic data makes worse (synthetic - oversampling below -{report['worse_threshold']}): "
        + (", ".join(worse) if worse else "none")
        + ".",
        "",
        f"Real pairs seen (--max_train_samples {report['real_pairs']['max_train_samples']}; the segmenters of every "
        f"arm: {report['real_pairs']['segmenters']}), from each model's training_config.json:",
        "",
        "| model | real pairs | not among the segmenters' | validation pairs |",
        "| --- | --- | --- | --- |",
        *(
            f"| {MODEL_NAMES.get(flag, flag)} (--{flag}) | {seen['train_samples']} | "
            f"{compared(seen, 'not_among_segmenters')} | {compared(seen, 'validation_pairs_seen')} |"
            for flag, seen in report["real_pairs"]["generators"].items()
        ),
        "",
        f"All numbers: {report['evaluation']} (and evaluation_report.txt beside it).",
    ]
    return "\n".join(lines) + "\n"


def main(args):
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    layout, controlnet = work_dir / "layout", work_dir / "controlnet"
    synthetic, results_dir = work_dir / "synthetic", work_dir / "evaluation"
    python, launch = [sys.executable], launcher(args)

    base = args.pretrained_model_name_or_path
    if base is None:  # --quick without a base: a tiny one, built once
        tiny = work_dir / "tiny-sd"
        run_stage(work_dir, "base", python, base_command(args, tiny), (tiny / "model_index.json").is_file())
        base = str(tiny)
    run_stage(work_dir, "layout", launch, layout_command(args, layout), (layout / "model_index.json").is_file())
    run_stage(
        work_dir,
        "controlnet",
        launch,
        controlnet_command(args, base, controlnet),
        safetensors_complete(controlnet / "diffusion_pytorch_model.safetensors"),
    )
    run_stage(
        work_dir,
        "synthetic",
        launch,
        synthetic_command(args, layout, controlnet, synthetic),
        synthetic_done(synthetic, args.num_synthetic),
    )
    run_stage(
        work_dir,
        "evaluate",
        python,
        evaluate_command(args, synthetic, results_dir),
        (results_dir / "metrics.json").is_file(),
        redo_when_changed=True,
    )
    metrics_path = results_dir / "metrics.json"
    write_report(work_dir, metrics_path, lambda metrics: build_report(args, metrics, metrics_path), report_markdown)


if __name__ == "__main__":
    main(parse_args())
