"""The shipped accelerate configs (configs/accelerate/*.yaml): each parses as accelerate reads it, and those whose
backend runs on this machine's CPUs launch a one-step training as they are (processes cut to 2 where they ask for
more). multi_node.yaml needs a second machine and deepspeed_zero2.yaml needs DeepSpeed on GPUs: both are parsed
only (the README says so)."""

import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPT_ENV

CONFIGS = ROOT / "configs" / "accelerate"
# config -> (distributed type, processes, machines, mixed precision), as the README describes them
EXPECTED = {
    "single_gpu.yaml": ("NO", 1, 1, "fp16"),
    "8xa100_ddp.yaml": ("MULTI_GPU", 8, 1, "bf16"),
    "multi_node.yaml": ("MULTI_GPU", 16, 2, "bf16"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1, "bf16"),
}
# The configs launched here, with the overrides a 2-core machine needs (on GPUs each launches as it is).
LAUNCHED = {"single_gpu.yaml": [], "8xa100_ddp.yaml": ["--num_processes", "2"]}


def test_every_shipped_config_is_listed_here():
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_config_parses_as_accelerate_reads_it(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    described = (config.distributed_type.value, config.num_processes, config.num_machines, config.mixed_precision)
    assert described == EXPECTED[name]
    if config.distributed_type.value == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("name", sorted(LAUNCHED))
def test_a_config_launches_a_one_step_training(name, toy_data, tmp_path):
    output_dir = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS / name, *LAUNCHED[name],
         "train_spade_sdm.py", "--model_config", "configs/models/sdm_tiny.json", "--data_root", toy_data,
         "--dataset", "generic", "--output_dir", output_dir, "--resolution", "32", "--train_batch_size", "2",
         "--max_train_steps", "1", "--report_to", "none", "--validation_steps", "0"],
        cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    processes = int(LAUNCHED[name][1]) if LAUNCHED[name] else 1
    assert f"batch {2 * processes} (per device 2, accumulation 1)" in result.stderr
    assert (output_dir / "model_index.json").is_file()
