"""What every benchmark script shares: the machine line, launching a trainer, and the RESULTS.md table."""

import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device}; {platform.processor() or platform.machine()}; torch {torch.__version__}"


class TrainingFailed(SystemExit):
    """A trainer run that exited with an error; its ``code`` is the message, which ends with the trainer's stderr.
    Uncaught, it stops the benchmark with that message like any SystemExit; a benchmark that records failed rows
    catches it."""


def training_command(script: str, *args) -> list[str]:
    """The command `launch_training` runs: accelerate launch, one process, every core (or OMP_NUM_THREADS), no
    checkpoints, no validation, no trackers (so only training is timed)."""
    # Every core, unless the caller set OMP_NUM_THREADS: the tests run two at a time on two cores, one thread
    # each, and a trainer with more threads than its share of cores runs many times slower.
    return launch_command(
        script, *args, "--checkpointing_steps", 100000, "--validation_steps", 0, "--report_to", "none"
    )


def launch_command(script: str, *args) -> list[str]:
    """``accelerate launch`` of one process with every core (or OMP_NUM_THREADS), as the benchmarks run scripts."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", threads,
        str(ROOT / script), *map(str, args),
    ]  # fmt: skip


def launch_training(script: str, *args) -> dict:
    """Run a trainer as a user would (accelerate launch, one process, every core) and return its train_stats.json.

    The trainers time themselves from their second optimizer step (see segdiff.training.ThroughputMeter), so
    start-up and the first step's warm-up are not counted; each run is its own process, so the peak memory is
    that configuration's own. A trainer's ``--mixed_precision`` overrides the launcher's "no".
    """
    # Every run starts from scratch, even in a reused --work_dir (a trainer would write over an old run's files).
    output_dir = Path(args[list(args).index("--output_dir") + 1])
    shutil.rmtree(output_dir, ignore_errors=True)
    result = subprocess.run(training_command(script, *args), cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise TrainingFailed(f"{script} failed:\n{result.stderr[-4000:]}")
    return json.loads((output_dir / "train_stats.json").read_text())


def append_results(script: str, rows: list[dict], results: str | Path = RESULTS, note: str = "") -> str:
    """Print the rows as a markdown table and append it, with the machine, date and command, to RESULTS.md.

    Each row is a dict with "setup", "measurement", "result" and (optionally) "peak_memory_mb".
    """
    table = ["| setup | measurement | result | peak memory (MB) |", "| --- | --- | --- | --- |"]
    table += [f"| {r['setup']} | {r['measurement']} | {r['result']} | {r.get('peak_memory_mb', '')} |" for r in rows]
    text = (
        f"\n## {script}, {datetime.date.today().isoformat()}\n\n"
        f"Machine: {machine()}. Peak memory: CUDA allocated on a GPU, process max RSS on a CPU.\n"
        f"Command: `python {shlex.join([f'benchmarks/{script}', *sys.argv[1:]])}`\n\n" + "\n".join(table) + "\n"
    )
    if note:
        text += f"\n{note}\n"
    print(text)
    with open(results, "a") as file:
        file.write(text)
    return text


def toy_data_and_base(work: Path, preset: str, size: int) -> tuple[Path, Path]:
    """The benchmarks' inputs under ``work``, built once and reused: 128 toy images at ``size`` and a tiny base of
    ``preset`` (random weights: speed does not depend on them)."""
    from segdiff.tiny import build_tiny_sd
    from segdiff.toy import make_toy_dataset

    data, base = work / f"toy-{size}", work / f"base-{preset}"
    if not (data / "class_names.json").exists():
        make_toy_dataset(data, num_images=128, size=size, seed=0)
    if not (base / "model_index.json").exists():
        build_tiny_sd(base, sample_size=size, preset=preset)
    return data, base
