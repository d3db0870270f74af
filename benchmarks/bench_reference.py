#!/usr/bin/env python
"""Our trainers side by side with the plain diffusers-style loops; prints a table and appends it to RESULTS.md.

    python benchmarks/bench_reference.py                   # medium SD-shaped base, 128 px, batch 4, 3 rounds
    python benchmarks/bench_reference.py --rounds 5 --train_steps 30

The reference loops (benchmarks/reference_trainers.py) are what a user of diffusers'
examples/controlnet/train_controlnet.py and of the SyntheticGen joint example runs: the VAE encodes the
batch and the text encoder its captions at every step. Each configuration runs as its own
`accelerate launch` process, on the same base and the same data (the ControlNet rows read one metadata.csv
folder, the joint rows one images/ + masks/ folder), timed from the second optimizer step. The
configurations are interleaved within each round, so a change in machine load hits them alike, and each
row gives the median over the rounds. "vs reference" is the ratio of median samples/s; the mean training
loss over the timed steps shows both sides optimise the same objective.
"""

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, append_results, launch_command, launch_training  # noqa: E402

from segdiff.data import load_segmentation_dataset  # noqa: E402
from segdiff.labels import colorize_label  # noqa: E402
from segdiff.prompts import label_map_prompt  # noqa: E402
from segdiff.tiny import build_tiny_sd  # noqa: E402
from segdiff.toy import make_toy_dataset  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="Default: a medium SD-shaped base.")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--train_steps", type=int, default=20, help="Optimizer steps per run (the first is untimed).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; rows give the median.")
    parser.add_argument("--num_images", type=int, default=64, help="Toy training images.")
    parser.add_argument(
        "--ours",
        nargs="*",
        default=[],
        metavar="FLAGS",
        help='More rows of ours, each a quoted flag string added to both trainers, e.g. "--channels_last".',
    )
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--note", default="", help="A remark printed under the table (e.g. about the machine load).")
    parser.add_argument("--work_dir", default=None, help="Keep the data and base here (default: a temp dir).")
    return parser.parse_args()


def write_controlnet_rows(data: Path, folder: Path) -> None:
    """The toy data as diffusers' ControlNet example reads it: image, colourised mask, class-prompt caption."""
    if (folder / "metadata.csv").is_file():
        return
    dataset = load_segmentation_dataset(data, "generic")
    (folder / "conditioning").mkdir(parents=True, exist_ok=True)
    rows = []
    for (image_path, _), sample in zip(dataset.pairs, dataset):
        control = f"conditioning/{sample['name']}.png"
        colorize_label(sample["label"], dataset.palette, dataset.ignore_index).save(folder / control)
        caption = label_map_prompt(sample["label"], dataset.class_names, ignore_index=dataset.ignore_index)
        rows.append({"image": str(image_path.resolve()), "conditioning_image": control, "text": caption})
    with open(folder / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["image", "conditioning_image", "text"])
        writer.writeheader()
        writer.writerows(rows)


def reference_run(loop: str, base: Path, data: Path, out: Path, args) -> dict:
    """One run of a reference loop, launched as ours are (common.launch_training's command)."""
    shutil.rmtree(out, ignore_errors=True)
    command = launch_command(
        "benchmarks/reference_trainers.py", loop, "--base", base, "--data", data, "--output_dir", out,
        "--resolution", args.resolution, "--train_batch_size", args.train_batch_size,
        "--max_train_steps", args.train_steps,
    )  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"reference_trainers.py {loop} failed:\n{result.stderr[-4000:]}")
    return json.loads((out / "train_stats.json").read_text())


def configurations(base: Path, toy: Path, rows: Path, args) -> list[dict]:
    """(name, pipeline, run) per row; ``run(out)`` trains once and returns its train_stats.json."""
    common = ["--pretrained_model_name_or_path", base, "--train_batch_size", args.train_batch_size,
              "--max_train_steps", args.train_steps, "--resolution", args.resolution, "--center_crop"]  # fmt: skip
    # Ours with the reference's objective: epsilon MSE on the base's own schedule (the joint trainer's
    # defaults are v-prediction on a zero-terminal-SNR schedule, which costs the same per step).
    controlnet = ["train_controlnet_seg.py", *common, "--train_data_dir", rows]
    joint = ["train_seg_mask_diffusion.py", *common, "--data_root", toy, "--dataset", "generic",
             "--prediction_type", "epsilon", "--no_zero_terminal_snr"]  # fmt: skip
    extra_rows = [flags.split() for flags in args.ours]

    def ours(command, flags):
        return lambda out: launch_training(command[0], *command[1:], *flags, "--output_dir", out)

    configs = [{"pipeline": "ControlNet", "name": "reference (diffusers example loop)",
                "run": lambda out: reference_run("controlnet", base, rows, out, args)}]  # fmt: skip
    for flags in ([], ["--cache_latents"], *extra_rows):
        configs.append({"pipeline": "ControlNet", "name": " ".join(["ours", *flags]), "run": ours(controlnet, flags)})
    configs.append({"pipeline": "joint", "name": "reference (SyntheticGen-style loop)",
                    "run": lambda out: reference_run("joint", base, toy, out, args)})  # fmt: skip
    for flags in ([], ["--cache_latents"], *extra_rows):
        configs.append({"pipeline": "joint", "name": " ".join(["ours", *flags]), "run": ours(joint, flags)})
    return configs


def main(args):
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_reference_"))
    toy, rows = work / f"toy-{args.resolution}", work / f"toy-{args.resolution}-metadata-csv"
    if not (toy / "class_names.json").exists():
        make_toy_dataset(toy, num_images=args.num_images, size=args.resolution, seed=0)
    write_controlnet_rows(toy, rows)
    base = args.pretrained_model_name_or_path
    if base is None:
        base = work / f"base-medium-{args.resolution}"
        if not (base / "model_index.json").exists():
            build_tiny_sd(base, sample_size=args.resolution, preset="medium")

    configs = configurations(Path(base), toy, rows, args)
    for round_index in range(args.rounds):
        for index, config in enumerate(configs):
            stats = config["run"](work / f"run-{index}")
            config.setdefault("stats", []).append(stats)
            print(f"round {round_index + 1}: {config['pipeline']}, {config['name']}: {stats}", flush=True)

    table = []
    for config in configs:
        speed = statistics.median(s["train_samples_per_second"] for s in config["stats"])
        reference = next(c for c in configs if c["pipeline"] == config["pipeline"])
        reference_speed = statistics.median(s["train_samples_per_second"] for s in reference["stats"])
        loss = statistics.median(s["mean_loss"] for s in config["stats"])
        memory = [s["peak_memory_mb"] for s in config["stats"] if "peak_memory_mb" in s]
        table.append(
            {
                "setup": f"{config['pipeline']}: {config['name']}",
                "measurement": f"train, batch {args.train_batch_size}, {args.resolution} px, median of {args.rounds}",
                "result": f"{speed} samples/s ({speed / reference_speed:.2f}x reference); mean loss {loss}",
                "peak_memory_mb": max(memory) if memory else "",
            }
        )
    base_name = "medium SD-shaped base (1/5 of SD 1.5's widths)" if args.pretrained_model_name_or_path is None else base
    note = f"Base: {base_name}. " + args.note
    append_results("bench_reference.py", table, args.results, note=note.strip())


if __name__ == "__main__":
    main(parse_args())
