"""The training guarantees the README promises, tested on the four real trainers, as a user launches them.

Every trainer is launched through ``accelerate launch`` on 6 toy images at batch 4 (two batches an epoch, so
steps 1, 3, 5 end mid-epoch), with EMA and random geometry (crops and flips for layouts), a checkpoint every
step. One uninterrupted 5-step
run is the reference; a second run is killed while saving, resumed, resumed again at its last step, and
finally poisoned with a NaN loss. Faults come from tests/fault_injection.py, which wraps two functions of
segdiff.training and runs the trainer script unchanged.
"""

import os
import time

import pytest
import torch
from conftest import run_script, script_error
from safetensors.torch import load_file

from segdiff.training import list_checkpoints

COMMON = [
    "--dataset", "generic", "--resolution", "32", "--train_batch_size", "4", "--learning_rate", "1e-3",
    "--report_to", "none", "--validation_steps", "0", "--checkpointing_steps", "1", "--use_ema",
]  # fmt: skip

# script, its own arguments ("--base": the tiny SD folder), the file of the final trained weights, the EMA folder
# inside checkpoints. Random geometry where the trainer has it (layouts are only cropped and flipped).
TRAINERS = {
    "joint": (
        "train_seg_mask_diffusion.py",
        ["--base", "--random_affine"],
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema",
    ),
    "controlnet": (
        "train_controlnet_seg.py",
        ["--base", "--random_affine"],
        "diffusion_pytorch_model.safetensors",
        "controlnet_ema",
    ),
    "sdm": (
        "train_spade_sdm.py",
        ["--model_config", "configs/models/sdm_tiny.json", "--random_affine"],
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema",
    ),
    "layout": (
        "train_layout_diffusion.py",
        ["--model_config", "configs/models/layout_tiny.json"],
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema",
    ),
}


@pytest.fixture(scope="module")
def six_images(tmp_path_factory):
    from segdiff.toy import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("six") / "toy", num_images=6, size=32, seed=1)


def launcher(name, data_root, base, output_dir):
    script, model_args, weights_file, ema_folder = TRAINERS[name]
    model_args = [
        arg
        for name in model_args
        for arg in (["--pretrained_model_name_or_path", base] if name == "--base" else [name])
    ]

    def launch(*extra, fault=(), check=True):
        command = ["accelerate", "launch"]
        if fault:
            command += ["tests/fault_injection.py", *fault]
        command += [script, "--data_root", data_root, "--output_dir", output_dir, *COMMON, *model_args, *extra]
        return run_script(*command, check=check)

    return launch, output_dir / weights_file


def checkpoint_steps(output_dir) -> list[int]:
    return [int(path.name.split("-")[1]) for path in list_checkpoints(output_dir)]


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its size and modification time: what a run wrote or left alone."""
    return {
        path: (stat.st_size, stat.st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file() and not path.is_relative_to(folder / "logs")
        for stat in [path.stat()]
    }


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.parametrize("name", TRAINERS)
def test_stop_at_max_kill_during_save_resume_and_nan_stop(name, six_images, tiny_sd_folder, tmp_path):
    # The reference: 5 uninterrupted steps stop exactly there (no checkpoint-6), across epoch boundaries.
    launch, reference_weights = launcher(name, six_images, tiny_sd_folder, tmp_path / "reference")
    launch("--max_train_steps", "5")
    assert checkpoint_steps(tmp_path / "reference") == [1, 2, 3, 4, 5]
    reference = load_file(reference_weights)

    # Killed (SIGKILL) while writing checkpoint-4: the half-written save stays hidden, and `latest` skips it.
    out = tmp_path / "run"
    launch, weights = launcher(name, six_images, tiny_sd_folder, out)
    killed = launch("--max_train_steps", "5", fault=["--kill_during_save_at", "4"], check=False)
    assert killed.returncode != 0
    assert checkpoint_steps(out) == [1, 2, 3] and (out / ".checkpoint-4.partial").is_dir()
    assert not weights.exists()

    # Resumed mid-epoch (step 3 ends on the first batch of the second epoch) from the last complete checkpoint: stops exactly
    # at 5 with the reference's weights, bit for bit, EMA included.
    resumed = launch("--max_train_steps", "5", "--resume_from_checkpoint", "latest")
    assert "checkpoint-3 (step 3)" in resumed.stderr
    assert checkpoint_steps(out) == [1, 2, 3, 4, 5] and not (out / ".checkpoint-4.partial").exists()
    assert_same_tensors(reference, load_file(weights))
    _, _, _, ema_folder = TRAINERS[name]
    ema_file = f"checkpoint-5/{ema_folder}/diffusion_pytorch_model.safetensors"
    assert_same_tensors(load_file(tmp_path / "reference" / ema_file), load_file(out / ema_file))

    # A requeued job resumed from the last step's checkpoint takes no step: no checkpoint-6, same weights.
    again = launch("--max_train_steps", "5", "--resume_from_checkpoint", "latest")
    assert "reached --max_train_steps 5 already" in again.stderr
    assert checkpoint_steps(out) == [1, 2, 3, 4, 5]
    assert_same_tensors(reference, load_file(weights))

    # A NaN loss at step 7 stops the run before the update: checkpoint-6 is the last good one, and nothing is
    # written after it (no checkpoint-7, no final model over the finished one).
    before = snapshot(out)
    poisoned = launch("--max_train_steps", "8", "--resume_from_checkpoint", "latest", fault=["--nan_loss_at_step", "7"],
                      check=False)  # fmt: skip
    assert poisoned.returncode != 0
    assert "The loss became nan at step 7" in poisoned.stderr and "checkpoint-6" in poisoned.stderr
    assert checkpoint_steps(out) == [1, 2, 3, 4, 5, 6]
    # Written by this run: checkpoint-6, and the run files every start rewrites (with the new --max_train_steps).
    written = {path for path, stat in snapshot(out).items() if before.get(path) != stat}
    run_files = {out / "training_config.json", out / "class_names.json", out / "class_prior.json"}  # prior: layouts
    assert {path for path in written if not path.is_relative_to(out / "checkpoint-6")} <= run_files, sorted(written)
    assert any(path.is_relative_to(out / "checkpoint-6") for path in written)
    assert_same_tensors(reference, load_file(weights))


@pytest.mark.parametrize("name", TRAINERS)
def test_bad_masks_no_batch_would_draw_stop_the_run_before_a_model_loads(name, tiny_sd_folder, tmp_path, monkeypatch):
    """A one-step run at batch 1 draws one pair; a mask with id 7 of 4 classes and a colour mask are among the others.
    The run stops at once with both named, the check of `python -m segdiff.data check`, before any model is built
    (building one fails the test here), and writes nothing. Run in this process (`script_error`): a SystemExit with
    a message is exit status 1."""
    from diffusers import ModelMixin
    from PIL import Image
    from transformers import PreTrainedModel

    from segdiff.data import read_label_map, save_label_png
    from segdiff.toy import make_toy_dataset
    from segdiff.training import EpochSeededSampler

    data = make_toy_dataset(tmp_path / "toy", num_images=6, size=32, seed=1)
    masks = sorted((data / "masks").iterdir())  # the dataset's order: pairs sorted by stem
    drawn, _ = next(iter(EpochSeededSampler(len(masks), seed=0)))  # the first sample of --seed 0's first epoch
    out_of_range, colour = [mask for index, mask in enumerate(masks) if index != drawn][:2]
    label = read_label_map(out_of_range)
    label[0, 0] = 7
    save_label_png(label, out_of_range)
    Image.new("RGB", (32, 32), (200, 0, 0)).save(colour)

    def no_model(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was built before the training data was checked")

    monkeypatch.setattr(ModelMixin, "__init__", no_model)
    monkeypatch.setattr(PreTrainedModel, "__init__", no_model)
    script, model_args, _, _ = TRAINERS[name]
    model_args = [arg if arg != "--base" else "--pretrained_model_name_or_path" for arg in model_args]
    if "--pretrained_model_name_or_path" in model_args:
        model_args.insert(model_args.index("--pretrained_model_name_or_path") + 1, tiny_sd_folder)
    out = tmp_path / "out"
    start = time.perf_counter()
    message = script_error(
        monkeypatch, script, "--data_root", data, "--output_dir", out, *COMMON, *model_args,
        "--train_batch_size", "1", "--max_train_steps", "1",
    )  # fmt: skip
    assert time.perf_counter() - start < 60
    assert "2 problem(s) in the training data" in message and "no model was loaded" in message
    assert f"{out_of_range} holds class ids 7" in message and f"{colour} is a colour (RGB) mask" in message
    assert "python -m segdiff.data check" in message
    assert not [path for path in out.rglob("*") if path.is_file()]


def test_fault_injection_runs_the_trainer_unchanged_without_faults():
    """The wrapper adds nothing of its own: with no fault it only runs the script (its --help here)."""
    result = run_script("tests/fault_injection.py", "train_spade_sdm.py", "--help")
    assert "--drop_rate" in result.stdout and os.path.basename("train_spade_sdm.py") in result.stdout
