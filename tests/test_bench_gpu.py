"""benchmarks/bench_gpu.py on a CPU: the table it writes (ratios, skip reasons), its dry run, and its refusal.

The script runs in this process (its ``__main__``, with the user's argv), so that torch can be told there is no
CUDA: the rows then are those of a CPU machine even on a GPU one. The trainers it launches are real subprocesses.
"""

import json
import re
import runpy
import shlex
import sys

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
TRAINER_ROWS = (
    "fp32",
    "fp32+tf32",
    "bf16",
    "bf16+channels_last",
    "bf16+torch_compile",
    "bf16+8bit_adam",
    "bf16+gradient_checkpointing",
    "bf16+cache_latents",
    "all_fast",
)
SPEED = re.compile(r"^(?P<speed>[\d.]+) samples/s, (?P<ratio>[\d.]+)x (?P<baseline>fp32|classic)$")


@pytest.fixture
def run_bench(monkeypatch):
    """Run bench_gpu.py with these arguments as on a machine without CUDA; returns nothing (see its outputs)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as running the script would: `from common import`
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def run(*args):
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, args)])
        runpy.run_path(str(SCRIPT), run_name="__main__")

    return run


def table_rows(results) -> list[list[str]]:
    """The cells of the rows of the one table in ``results``."""
    lines = [line for line in results.read_text().splitlines() if line.startswith("| ")]
    assert lines[0] == "| setup | measurement | result | peak memory (MB) |"
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_cpu_run_writes_ratios_and_skip_reasons(run_bench, tmp_path):
    results = tmp_path / "RESULTS.md"
    rows = ("fp32", "fp32+tf32", "bf16+8bit_adam", "bf16+gradient_checkpointing", "attention")
    run_bench(
        "--allow_cpu", "--preset", "tiny", "--trainers", "controlnet", "--rows", *rows, "--max_train_steps", 3,
        "--train_batch_size", 4, "--num_images", 6, "--attention_iterations", 2, "--results", results,
        "--work_dir", tmp_path / "work",
    )  # fmt: skip
    text = results.read_text()
    assert text.startswith("\n## bench_gpu.py, ") and "Machine: CPU" in text
    assert "Run with --allow_cpu, without CUDA: these figures test the script" in text
    table = table_rows(results)
    assert [row[0] for row in table] == ["tiny base, controlnet"] * 4 + ["tiny base, UNet"] * 3
    measurements = [row[1] for row in table]
    assert measurements[:4] == [
        "train fp32, batch 4, 32 px",
        "train fp32+tf32, batch 4, 32 px",
        "train bf16+8bit_adam, batch 4, 32 px",
        "train bf16+gradient_checkpointing, batch 4, 32 px",
    ]
    fp32, tf32, adam8, checkpointing, classic, sdpa, xformers = (row[2] for row in table)
    assert tf32 == "skipped: TF32 is a CUDA matmul mode (Ampere or newer)"
    assert adam8 == "skipped: 8-bit Adam (bitsandbytes) needs CUDA"
    assert xformers == "skipped: xformers needs CUDA"
    for skipped in (1, 2, 6):
        assert table[skipped][3] == ""

    # The ratios are each row's samples/s over the baseline's, and the baseline's own is 1.
    fp32_speed = float(SPEED.match(fp32)["speed"])
    assert SPEED.match(fp32)["ratio"] == "1.00" and fp32_speed > 0
    match = SPEED.match(checkpointing)
    assert match["baseline"] == "fp32"
    assert float(match["ratio"]) == pytest.approx(float(match["speed"]) / fp32_speed, abs=0.011)
    assert float(table[0][3]) > 0 and float(table[3][3]) > 0  # the trainers' peak memory (max RSS on a CPU)
    classic_speed = float(SPEED.match(classic)["speed"])
    assert SPEED.match(classic)["ratio"] == "1.00" and SPEED.match(classic)["baseline"] == "classic"
    match = SPEED.match(sdpa)
    assert float(match["ratio"]) == pytest.approx(float(match["speed"]) / classic_speed, abs=0.011)
    assert "attention: classic (AttnProcessor)" in measurements[4] and "(16 px latents)" in measurements[4]
    assert "attention: SDPA (AttnProcessor2_0)" in measurements[5]

    # The rows reached the trainer with their settings, on data of whole batches (6 images: rounded up to 8).
    for row, precision, checkpointing in (("fp32", "no", False), ("bf16+gradient_checkpointing", "bf16", True)):
        config = json.loads((tmp_path / "work" / f"train-controlnet-{row}" / "training_config.json").read_text())
        assert (config["mixed_precision"], config["gradient_checkpointing"]) == (precision, checkpointing)
        assert (config["max_train_steps"], config["train_batch_size"], config["resolution"]) == (3, 4, [32, 32])
    assert len(list((tmp_path / "work" / "toy-32px-8" / "images").iterdir())) == 8


def test_failed_row_is_recorded_and_the_rest_still_run(run_bench, monkeypatch, tmp_path):
    """A trainer that fails (here an out-of-memory error, standing in for the subprocess) is a row of the table."""
    import common

    def launch(script, *args):
        if "--gradient_checkpointing" not in args:
            raise common.TrainingFailed(
                f"{script} failed:\nTraceback ...\ntorch.OutOfMemoryError: CUDA out of | memory"
            )
        return {"train_samples_per_second": 3.5, "peak_memory_mb": 812.0}

    monkeypatch.setattr(common, "launch_training", launch)
    results = tmp_path / "RESULTS.md"
    run_bench(
        "--allow_cpu", "--preset", "tiny", "--trainers", "sdm", "--rows", "fp32", "bf16+gradient_checkpointing",
        "bf16+cache_latents", "--results", results, "--work_dir", tmp_path / "work",
    )  # fmt: skip
    assert [row[1:] for row in table_rows(results)] == [
        ["train fp32, batch 8, 32 px", "failed: torch.OutOfMemoryError: CUDA out of \\| memory", ""],
        ["train bf16+gradient_checkpointing, batch 8, 32 px", "3.5 samples/s, no fp32 row to compare", "812.0"],
        ["train bf16+cache_latents, batch 8, 32 px", "skipped: train_spade_sdm.py has no --cache_latents", ""],
    ]


def test_dry_run_prints_every_row_with_its_flags(run_bench, tmp_path, capsys):
    work = tmp_path / "work"
    run_bench("--dry_run", "--preset", "tiny", "--work_dir", work, "--torch_compile_mode", "max-autotune")
    lines = capsys.readouterr().out.splitlines()
    assert not work.exists()  # nothing built, nothing run
    commands, row = {}, None
    for line in lines:  # "# trainer, row (remark)", maybe a "# ..." line about it, then its command
        if header := re.match(r"# (joint|controlnet|sdm), (\S+)", line):
            row = header.groups()
        elif not line.startswith("#"):
            commands[row] = shlex.split(line)
    expected = {(trainer, row) for trainer in ("joint", "controlnet", "sdm") for row in TRAINER_ROWS}
    assert set(commands) == expected - {("sdm", "bf16+cache_latents")}
    assert "# skipped: train_spade_sdm.py has no --cache_latents" in lines
    assert lines[-1].startswith("# attention: in this process") and "SDPA (AttnProcessor2_0)" in lines[-1]

    settings = {
        "fp32": [],
        "fp32+tf32": ["--allow_tf32"],
        "bf16": [],
        "bf16+channels_last": ["--channels_last"],
        "bf16+torch_compile": ["--torch_compile", "--torch_compile_mode", "max-autotune"],
        "bf16+8bit_adam": ["--use_8bit_adam"],
        "bf16+gradient_checkpointing": ["--gradient_checkpointing"],
        "bf16+cache_latents": ["--cache_latents"],
        "all_fast": [
            "--allow_tf32",
            "--channels_last",
            "--torch_compile",
            "--use_8bit_adam",
            "--cache_latents",
            "--torch_compile_mode",
            "max-autotune",
        ],  # fmt: skip
    }
    optional = {flag for flags in settings.values() for flag in flags if flag.startswith("--")}
    scripts = {
        "joint": "train_seg_mask_diffusion.py",
        "controlnet": "train_controlnet_seg.py",
        "sdm": "train_spade_sdm.py",
    }
    for (trainer, row), command in commands.items():
        assert command[1:3] == ["-m", "accelerate.commands.launch"]
        script = next(part for part in command if part.endswith(".py"))
        assert script == str(ROOT / scripts[trainer])
        trainer_args = command[command.index(script) + 1 :]
        precision = trainer_args[trainer_args.index("--mixed_precision") + 1]
        assert precision == ("no" if row.startswith("fp32") else "bf16")
        wanted = [flag for flag in settings[row] if not (trainer == "sdm" and flag == "--cache_latents")]
        assert [part for part in trainer_args if part in optional] == [f for f in wanted if f.startswith("--")]
        pairs = dict(zip(trainer_args, trainer_args[1:]))
        assert pairs.get("--torch_compile_mode") == ("max-autotune" if "--torch_compile" in wanted else None)
        assert pairs["--output_dir"] == str(work / f"train-{trainer}-{row}")
        assert pairs["--data_root"] == str(work / "toy-32px-64")
        assert (pairs["--resolution"], pairs["--train_batch_size"], pairs["--max_train_steps"]) == ("32", "8", "20")
        assert pairs["--dataloader_num_workers"] == "4"  # planned for the GPU box
        if trainer == "sdm":
            assert pairs["--model_config"].endswith("sdm_tiny.json") and pairs["--space"] == "pixel"
            assert "--pretrained_model_name_or_path" not in pairs
        else:
            assert pairs["--pretrained_model_name_or_path"] == str(work / "base-tiny-32px")
    # What this CPU machine would do differently is said under the row's header.
    index = lines.index("# controlnet, all_fast")
    assert lines[index + 1] == (
        "# on this machine: without tf32: TF32 is a CUDA matmul mode (Ampere or newer); "
        "8bit_adam: 8-bit Adam (bitsandbytes) needs CUDA"
    )
    assert lines[lines.index("# joint, fp32+tf32") + 1].startswith("# on this machine: skipped: TF32")


def test_refuses_without_cuda(run_bench, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        run_bench("--preset", "tiny", "--work_dir", tmp_path / "work")
    message = str(stopped.value.code)
    assert "no CUDA device" in message and "--allow_cpu" in message and "--dry_run" in message
    assert not (tmp_path / "work").exists()
