"""The shared training plumbing, exercised through a real trainer run as a user runs it.

tests/plumbing_trainer.py is a minimal pixel-space trainer on segdiff.training; every test here
launches it in a subprocess (accelerate launch or torchrun) on a tiny toy dataset.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segdiff.toy import make_toy_dataset
from segdiff.training import EpochSeededSampler, derive_seed, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "tests" / "plumbing_trainer.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    # 10 images at batch 4: 3 batches per epoch (4, 4, 2), so checkpoints fall inside epochs.
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, num_images=10, size=32, seed=0)
    return root


def trainer_args(toy_root, output_dir, *extra):
    return [
        "--data_root", str(toy_root), "--dataset", "generic", "--output_dir", str(output_dir),
        "--resolution", "32", "--train_batch_size", "4", "--learning_rate", "1e-3",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--report_to", "none", "--random_affine",
        *extra,
    ]  # fmt: skip


def launch(toy_root, output_dir, *extra, check=True):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAINER), *trainer_args(toy_root, output_dir, *extra),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def final_weights(output_dir, rank=0):
    return torch.load(Path(output_dir) / f"weights_rank{rank}.pt")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def checkpoint_names(output_dir):
    return [path.name for path in list_checkpoints(output_dir)]


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    first, again, other_epoch = (
        EpochSeededSampler(10, seed=3),
        EpochSeededSampler(10, seed=3),
        EpochSeededSampler(10, seed=3),
    )
    other_epoch.start_epoch(1)
    assert list(first) == list(again)
    assert sorted(i for i, _ in first) == list(range(10))
    assert [i for i, _ in first] != [i for i, _ in other_epoch]
    assert {s for _, s in first}.isdisjoint({s for _, s in other_epoch})
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b")


def test_stops_exactly_at_max_train_steps_and_rotates_like_diffusers(toy_root, tmp_path):
    # diffusers' own checkpoint test: 6 steps, every 2, limit 2 -> checkpoint-4 and checkpoint-6.
    out = tmp_path / "run"
    launch(toy_root, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
    assert checkpoint_names(out) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-6" / "unet" / "config.json").is_file()
    assert (out / "training_config.json").is_file() and (out / "class_names.json").is_file()

    # Resume from checkpoint-6 to step 8 -> checkpoint-6 and checkpoint-8; nothing past 8.
    launch(toy_root, out, "--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
           "--resume_from_checkpoint", "checkpoint-6")  # fmt: skip
    assert checkpoint_names(out) == ["checkpoint-6", "checkpoint-8"]


def test_no_extra_steps_across_epochs(toy_root, tmp_path):
    # 7 steps over 3-batch epochs: a trainer whose break leaves only the inner loop overshoots here.
    out = tmp_path / "run"
    launch(toy_root, out, "--max_train_steps", "7", "--checkpointing_steps", "1")
    assert checkpoint_names(out) == [f"checkpoint-{i}" for i in range(1, 8)]


def test_resume_mid_epoch_gives_identical_weights(toy_root, tmp_path):
    out = tmp_path / "run"
    # Straight: 8 steps with EMA; checkpoint-4 falls on the 2nd batch of the 2nd epoch.
    launch(toy_root, out, "--max_train_steps", "8", "--checkpointing_steps", "4", "--use_ema")
    straight = final_weights(out)
    straight_ema = (out / "checkpoint-8" / "unet_ema" / "diffusion_pytorch_model.safetensors").read_bytes()

    # Resume the same run from its checkpoint-4 and finish again.
    launch(toy_root, out, "--max_train_steps", "8", "--checkpointing_steps", "4", "--use_ema",
           "--resume_from_checkpoint", str(out / "checkpoint-4"))  # fmt: skip
    assert_same_weights(straight, final_weights(out))
    resumed_ema = (out / "checkpoint-8" / "unet_ema" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert resumed_ema == straight_ema


@pytest.fixture(scope="module")
def six_step_run(toy_root, tmp_path_factory):
    """An uninterrupted run: 6 steps, a checkpoint every 2."""
    reference = tmp_path_factory.mktemp("six_steps") / "run"
    launch(toy_root, reference, "--max_train_steps", "6", "--checkpointing_steps", "2")
    return reference


def test_checkpoint_killed_mid_save_is_not_picked_by_latest(toy_root, six_step_run, tmp_path):
    reference = six_step_run

    out = tmp_path / "run"
    killed = launch(toy_root, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                    "--crash_during_save_at", "4", check=False)  # fmt: skip
    assert killed.returncode != 0
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert (out / ".checkpoint-4.partial" / "unet").is_dir()  # the half-written save is there, hidden

    resumed = launch(toy_root, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                     "--resume_from_checkpoint", "latest")  # fmt: skip
    assert "Resuming from" in resumed.stderr and "checkpoint-2 (step 2)" in resumed.stderr
    assert not (out / ".checkpoint-4.partial").exists()
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert_same_weights(final_weights(reference), final_weights(out))


def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_last_checkpoint(toy_root, tmp_path):
    out = tmp_path / "run"
    result = launch(toy_root, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--fail_at_step", "3",
                    check=False)  # fmt: skip
    assert result.returncode != 0
    assert "The loss became nan at step 3" in result.stderr
    assert "last good checkpoint is" in result.stderr and "checkpoint-2" in result.stderr
    assert checkpoint_names(out) == ["checkpoint-2"]


def test_resume_with_a_wrong_path_names_the_available_checkpoints(toy_root, six_step_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(six_step_run / "checkpoint-2", out / "checkpoint-2")
    result = launch(toy_root, out, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-3", check=False)
    assert result.returncode != 0
    assert "no checkpoint folder" in result.stderr and "checkpoint-2" in result.stderr


def test_two_process_cpu_run_ends_with_identical_weights_on_both_ranks(toy_root, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        str(TRAINER), *trainer_args(toy_root, out, "--max_train_steps", "4", "--checkpointing_steps", "2"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "DistributedType.MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    rank0, rank1 = final_weights(out, 0), final_weights(out, 1)
    assert_same_weights(rank0, rank1)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    # and it did train: the weights moved between the two checkpoints
    at_step_2 = load_file(out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(at_step_2[name], rank0[name]) for name in rank0)


def test_push_to_hub_creates_the_repo_first_and_refuses_offline(monkeypatch, tmp_path):
    import argparse
    from types import SimpleNamespace

    import huggingface_hub
    from accelerate import PartialState

    from segdiff import training

    PartialState()  # what the trainers' Accelerator sets up, and accelerate's logger needs
    parser = argparse.ArgumentParser()
    training.add_training_args(parser)
    args = parser.parse_args(["--output_dir", str(tmp_path / "my-model"), "--push_to_hub", "--report_to", "none"])
    main_process = SimpleNamespace(is_main_process=True)
    calls = []
    monkeypatch.setattr(
        huggingface_hub,
        "create_repo",
        lambda **kw: calls.append(("create", kw)) or SimpleNamespace(repo_id="me/my-model"),
    )

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match="--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set"):
        training.create_hub_repo(main_process, args)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    repo_id = training.create_hub_repo(main_process, args)
    assert repo_id == "me/my-model" and calls == [("create", {"repo_id": "my-model", "exist_ok": True, "token": None})]
    assert training.create_hub_repo(SimpleNamespace(is_main_process=False), args) is None
    args.push_to_hub = False
    assert training.create_hub_repo(main_process, args) is None


def test_the_hub_token_is_never_written_logged_or_uploaded_nor_local_paths_uploaded(toy_root, tmp_path):
    """A real trainer with --push_to_hub --hub_token and the tensorboard tracker; the Hub calls are faked (see
    tests/fault_injection.py) and record what would have been uploaded."""
    token = "hf_FAKEtoken0123456789abcdefghij"
    out, record = tmp_path / "run", tmp_path / "uploaded.json"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "tests/fault_injection.py", "--fake_hub", str(record),
        "train_spade_sdm.py", "--data_root", str(toy_root), "--dataset", "generic", "--output_dir", str(out),
        "--model_config", "configs/models/sdm_tiny.json", "--resolution", "32", "--train_batch_size", "4",
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "0", "--report_to", "tensorboard",
        "--push_to_hub", "--hub_token", token,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert token not in result.stdout + result.stderr

    # Nothing on disk holds the token: run files, checkpoints, the tracker's event files (which do hold the config).
    files = [path for path in out.rglob("*") if path.is_file()]
    event_files = [path for path in files if "tfevents" in path.name]
    assert event_files and any(b"learning_rate" in path.read_bytes() for path in event_files)
    assert [path for path in files if token.encode() in path.read_bytes()] == []
    assert "hub_token" not in json.loads((out / "training_config.json").read_text())

    # The upload: the token authenticates the call only; no checkpoint, log or local absolute path goes up.
    uploaded = json.loads(record.read_text())
    assert uploaded["repo_id"] == "user/run" and uploaded["token"] == token
    assert {"model_index.json", "training_config.json", "unet/config.json"} <= set(uploaded["files"])
    assert not [name for name in uploaded["files"] if name.startswith(("checkpoint-", "logs/", "."))]
    local_paths = (str(tmp_path), str(ROOT))
    assert [
        name for name, text in uploaded["files"].items() if token in text or any(p in text for p in local_paths)
    ] == []
    shared_config = json.loads(uploaded["files"]["training_config.json"])
    assert shared_config["data_root"] == f"<local>/{toy_root.name}" and shared_config["output_dir"] == "<local>/run"
    assert json.loads((out / "training_config.json").read_text())["data_root"] == str(toy_root)  # kept locally
