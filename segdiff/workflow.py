"""What the one-command workflows (scripts/sidewalk_sdm.py, scripts/loveda_synthetic.py) share: how a stage starts
(python or accelerate launch), when it is skipped, and the record of the command it ran.

A stage is one of the repository's scripts run as a subprocess, as a user would run it. Its command is kept in
WORK_DIR/stages/<stage>.json once it has finished, so that a later run can tell when a flag changed.

Cheap to import (no torch): the workflow scripts only start the scripts that need it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from segdiff.arguments import positive_int
from segdiff.files import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A workflow's parser: its docstring's first paragraph as the description, the rest as --help's epilog."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog="\n\n".join(doc.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def fill_defaults(args, presets: dict) -> None:
    """Give every flag left at None its preset value (the full-scale or the --quick one): a given flag wins."""
    for name, value in presets.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def add_launch_args(parser) -> None:
    """--num_processes and --accelerate_config: how the trainers and the generators are started."""
    parser.add_argument(
        "--num_processes",
        type=positive_int,
        default=None,
        help="Processes (GPUs) for training and generation: more than 1 runs them with `accelerate launch "
        "--multi_gpu`. Default: 1, or --accelerate_config's.",
    )
    parser.add_argument(
        "--accelerate_config",
        default=None,
        help="An accelerate config file for training and generation (run with `accelerate launch --config_file`), "
        "e.g. configs/accelerate/8xa100_ddp.yaml.",
    )


def launcher(args) -> list[str]:
    """How the trainers and the generators start: plain python for one process, else accelerate launch.

    ``args`` has ``num_processes``, ``accelerate_config`` and ``mixed_precision``."""
    if args.accelerate_config is None and (args.num_processes or 1) == 1:
        return [sys.executable]
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.accelerate_config is not None:
        command += ["--config_file", args.accelerate_config]
    if args.num_processes is not None:  # given: it wins over the config's
        command += ["--num_processes", str(args.num_processes)]
    if args.accelerate_config is None:  # what a config would say, so that accelerate asks nothing
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", args.mixed_precision]
        command += ["--dynamo_backend", "no"]
    return command


def trainer_flags(args, output_dir: Path) -> list[str]:
    """What every trainer of a workflow is given: precision, EMA, seed, resumable checkpoints (the last three
    kept; --resume_from_checkpoint latest continues a stopped run), and validation but with --quick.

    ``args`` has ``mixed_precision``, ``seed``, ``checkpointing_steps``, ``gradient_checkpointing`` and ``quick``."""
    command = ["--mixed_precision", args.mixed_precision, "--use_ema", "--seed", str(args.seed)]
    command += ["--checkpointing_steps", str(args.checkpointing_steps), "--checkpoints_total_limit", "3"]
    command += ["--resume_from_checkpoint", "latest", "--output_dir", str(output_dir)]
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    if args.quick:
        command += ["--report_to", "none", "--validation_steps", "0"]
    else:
        command += ["--dataloader_num_workers", "4", "--validation_steps", str(args.checkpointing_steps)]
    return command


def recorded_command(work_dir: Path, stage: str) -> list[str] | None:
    path = work_dir / "stages" / f"{stage}.json"
    return json.loads(path.read_text())["command"] if path.is_file() else None


def run_stage(work_dir: Path, stage: str, start: list[str], command: list[str], done: bool, redo_when_changed=False):
    """Run ``start + command`` unless the stage is done. ``command`` is a script of the repository and its arguments,
    or ``-m`` and a module of segdiff with its arguments.

    The command of each finished stage is kept in stages/<stage>.json, so a changed flag is noticed: a stage that
    is cheap to redo and asks for it (``redo_when_changed``) is redone, the others (hours of training) are kept and
    the difference is pointed out.
    """
    before = recorded_command(work_dir, stage)
    changed = before is not None and before != command
    if done and not (changed and redo_when_changed):
        print(f"[{stage}] done: skipped")
        if changed:
            print(
                f"[{stage}] note: it was run with another command ({shlex.join(before)}); "
                "to redo it with this one, remove its output folder.",
            )
        return
    print(f"[{stage}] {shlex.join(start + command)}", flush=True)
    target = command[:2] if command[0] == "-m" else [str(ROOT / command[0])]
    arguments = command[len(target) :]
    # A module (-m segdiff.x) is found from any working directory; the scripts find segdiff beside themselves.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # The scripts' own progress and errors go straight to this terminal (and its log).
    result = subprocess.run(start + target + arguments, env=env)
    if result.returncode != 0:
        raise SystemExit(
            f"{Path(sys.argv[0]).name}: error: the {stage} stage failed (exit code {result.returncode}); its output "
            "is above. Fix its cause and run the same command again: the finished stages are skipped and this one "
            "resumes."
        )
    (work_dir / "stages").mkdir(exist_ok=True)
    write_json_atomic(work_dir / "stages" / f"{stage}.json", {"command": command})


def is_newer(path: Path, than: Path) -> bool:
    """``path`` exists and was written no earlier than ``than``: a report still current with its source."""
    return path.is_file() and path.stat().st_mtime_ns >= than.stat().st_mtime_ns


def write_report(folder: Path, metrics_path: Path, build_report, report_markdown) -> None:
    """folder/report.md, then report.json (the report stage's done marker, so written last), unless report.json is
    newer than metrics.json; then print it. ``build_report(metrics)`` makes the report's dict from metrics.json's,
    ``report_markdown(report)`` its text."""
    report_json = folder / "report.json"
    if is_newer(report_json, metrics_path):
        print("[report] done: skipped")
    else:
        report = build_report(json.loads(metrics_path.read_text()))
        write_text_atomic(folder / "report.md", report_markdown(report))
        write_json_atomic(report_json, report)
    print("\n" + (folder / "report.md").read_text())
    print(f"Report: {folder / 'report.md'} and {report_json}")


def safetensors_complete(path: Path) -> bool:
    """A .safetensors file that is there in full: its length is its header's (8-byte size, JSON) plus the end of
    its last tensor. A weights file is written in place, so a kill while saving leaves a shorter one."""
    try:
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_size))
    except (OSError, ValueError):
        return False
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return path.stat().st_size == 8 + header_size + max(ends, default=0)
