"""The shared training plumbing (segdiff/training.py), exercised through a real trainer as a user runs it.

The cheapest real trainer, train_spade_sdm.py with the tiny pixel-space model, is launched in a subprocess
(accelerate launch, or torchrun for two CPU processes) on a tiny toy dataset; two of the two-process tests take the
layout trainer (the cheapest there) and the joint one (which loads a transformers model). tests/test_guarantees.py
runs the stop, kill, NaN and data-check guarantees on all four trainers.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, run_script
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from segdiff.data import read_label_map, save_label_png
from segdiff.seeds import derive_seed
from segdiff.toy import make_toy_dataset
from segdiff.training import EpochSeededSampler, draw_timesteps, list_checkpoints, min_snr_weights

ENV = SCRIPT_ENV
SDM = ["train_spade_sdm.py", "--model_config", "configs/models/sdm_tiny.json"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    # 6 images at batch 2: 3 batches per epoch, so with accumulation 2 an epoch is one full and one short update.
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, num_images=6, size=32, seed=0)
    return root


def trainer_args(toy_root, output_dir, *extra):
    return [
        "--data_root", str(toy_root), "--dataset", "generic", "--output_dir", str(output_dir),
        "--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "2", "--report_to", "none", "--validation_steps", "0", "--random_affine", *extra,
    ]  # fmt: skip


def sdm_weights(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


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


def test_exact_resume_with_gradient_accumulation_and_dataloader_workers(toy_root, tmp_path):
    # Accumulation 2 over 3-batch epochs: step 1 is batches 1-2, step 2 the epoch's short last batch. Resuming from
    # checkpoint-1 skips two batches inside the epoch; the two workers load the rest.
    out = tmp_path / "run"
    options = ["--gradient_accumulation_steps", "2", "--dataloader_num_workers", "2", "--use_ema"]
    run_script("accelerate", "launch", *SDM, *trainer_args(toy_root, out, "--max_train_steps", "3",
                                                           "--checkpointing_steps", "1", *options))  # fmt: skip
    assert checkpoint_names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    straight = sdm_weights(out)
    straight_ema = load_file(out / "checkpoint-3" / "unet_ema" / "diffusion_pytorch_model.safetensors")

    run_script("accelerate", "launch", *SDM, *trainer_args(toy_root, out, "--max_train_steps", "3",
               "--checkpointing_steps", "1", *options, "--resume_from_checkpoint", "checkpoint-1"))  # fmt: skip
    assert_same_weights(straight, sdm_weights(out))
    assert_same_weights(
        straight_ema, load_file(out / "checkpoint-3" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    )
    # and the steps did move the weights: checkpoint-1 is not the end
    assert not torch.equal(
        *(
            w["conv_in.weight"]
            for w in (straight, load_file(out / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors"))
        )
    )


def test_a_kill_while_a_checkpoint_is_replaced_loses_neither_copy(toy_root, tmp_path):
    """A run resumed from checkpoint-1 saves step 2 again: killed after the old checkpoint-2 was moved aside and
    before the new one was moved in, the next start puts the old one back and resumes from it. With --deterministic,
    which a CPU run accepts and records."""
    out = tmp_path / "run"
    options = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--deterministic"]
    first = run_script("accelerate", "launch", *SDM, *trainer_args(toy_root, out, *options))
    assert "Deterministic algorithms only (CUBLAS_WORKSPACE_CONFIG=:4096:8)" in first.stderr
    assert json.loads((out / "training_config.json").read_text())["deterministic"] is True
    saved = load_file(out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")

    killed = run_script("accelerate", "launch", "tests/fault_injection.py", "--kill_replacing_checkpoint", "2", *SDM,
                        *trainer_args(toy_root, out, *options, "--resume_from_checkpoint", "checkpoint-1"),
                        check=False)  # fmt: skip
    assert killed.returncode != 0
    assert checkpoint_names(out) == ["checkpoint-1"]
    assert (out / ".checkpoint-2.replaced").is_dir() and (out / ".checkpoint-2.partial").is_dir()

    again = run_script("accelerate", "launch", *SDM, *trainer_args(toy_root, out, *options,
                       "--resume_from_checkpoint", "latest"))  # fmt: skip
    assert "Restoring" in again.stderr and "checkpoint-2 (step 2)" in again.stderr
    assert checkpoint_names(out) == ["checkpoint-1", "checkpoint-2"]
    assert not list(out.glob(".checkpoint-*"))
    assert_same_weights(saved, load_file(out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize(
    "schedule, warning",
    [
        (["--lr_scheduler", "constant", "--lr_warmup_steps", "50"], "--lr_warmup_steps 50 has no effect: "
         "--lr_scheduler constant does not warm up. Fix: --lr_scheduler constant_with_warmup"),
        (["--lr_warmup_steps", "4"], "--lr_warmup_steps 4 is not below --max_train_steps 2: the learning rate rises "
         "for the whole run and ends at 50% of --learning_rate"),
        (["--lr_warmup_steps", "1"], None),
        (["--lr_scheduler", "constant", "--lr_warmup_steps", "500"], None),  # the default, as diffusers pairs them
    ],
)  # fmt: skip
def test_a_warmup_that_does_not_do_what_it_reads_as_is_warned_about(toy_root, tmp_path, schedule, warning):
    """diffusers' constant schedule ignores --lr_warmup_steps (a benchmark here once passed 50 to it for nothing),
    and a warmup as long as the run never reaches the learning rate: both are said (trainer_args: cosine)."""
    options = trainer_args(toy_root, tmp_path / "run", "--max_train_steps", "2", *schedule)
    result = run_script("accelerate", "launch", *SDM, *options)
    if warning is None:
        assert "--lr_warmup_steps" not in result.stderr
    else:
        assert warning in result.stderr


def test_resume_with_a_wrong_path_names_the_available_checkpoints(toy_root, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    result = run_script("accelerate", "launch", *SDM, *trainer_args(toy_root, out, "--max_train_steps", "4",
                        "--resume_from_checkpoint", "checkpoint-3"), check=False)  # fmt: skip
    assert result.returncode != 0
    assert "no checkpoint folder" in result.stderr and "['checkpoint-2']" in result.stderr


def two_processes(*command, log_dir, port):
    """``python -m torch.distributed.run --nproc_per_node 2 <command>`` on the CPUs: its return code and what each
    process wrote to stderr (torchrun keeps them apart in ``log_dir``)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
              "--log-dir", str(log_dir), "--redirects", "3"]  # fmt: skip
    # A hang (one process stopping while the other waits in a collective) would end in the timeout.
    result = subprocess.run([*launch, *map(str, command)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    logs = [next(log_dir.rglob(f"attempt_0/{rank}/stderr.log")).read_text() for rank in (0, 1)]
    return result.returncode, logs


def test_two_processes_train_the_model_of_one_process_on_the_same_batches(toy_root, tmp_path):
    """2 processes at batch 1 against 1 process at batch 1 with gradient accumulation 2: the same two samples make
    each optimizer step, and the weights come out equal, bit for bit, on both processes and to the one-process run.
    The layout trainer (the cheapest), whose label-map bar only the main process shows.

    Not against 1 process at batch 2: a batch draws its noise and timesteps from one generator seeded by the seeds
    of its samples (`training.batch_generator`), so one batch of two samples draws other noise than two batches of
    one; the weights would differ by a training signal, not by rounding. With the same batches the gradients are
    the same sums: DDP averages g0/2 + g1/2 over the processes, accumulation adds g0/2 and g1/2 (halving is exact).
    """
    layout = [
        "train_layout_diffusion.py", "--model_config", "configs/models/layout_tiny.json", "--data_root", toy_root,
        "--dataset", "generic", "--resolution", "32", "--train_batch_size", "1", "--learning_rate", "1e-3",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--max_train_steps", "3", "--checkpointing_steps", "1",
        "--report_to", "none", "--validation_steps", "0",
    ]  # fmt: skip
    out = tmp_path / "ddp"
    returncode, logs = two_processes(
        "tests/fault_injection.py", "--weights_of_every_process", tmp_path / "weights", *layout, "--output_dir", out,
        log_dir=tmp_path / "logs", port=29517,
    )  # fmt: skip
    assert returncode == 0, logs[0][-4000:] + logs[1][-4000:]
    # One gloo process group of two (plain torchrun on CPUs would otherwise train two independent copies).
    assert all("DistributedType.MULTI_CPU" in log and "Num processes: 2" in log for log in logs)
    assert checkpoint_names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    ranks = [load_file(tmp_path / "weights" / f"process-{rank}.safetensors") for rank in (0, 1)]
    assert_same_weights(*ranks)
    assert_same_weights(ranks[0], sdm_weights(out))
    assert "Reading label maps" in logs[0] and "Reading label maps" not in logs[1]

    one = tmp_path / "one"
    run_script("accelerate", "launch", *layout, "--output_dir", one, "--gradient_accumulation_steps", "2")
    assert_same_weights(sdm_weights(one), sdm_weights(out))
    at_step_1 = load_file(out / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(at_step_1[name], value) for name, value in sdm_weights(out).items())


def test_a_nan_on_one_process_stops_every_process(toy_root, tiny_sd_folder, tmp_path):
    """Only process 1's loss turns NaN (tests/fault_injection.py): process 0 stops at the same step, before the
    update, with the message naming process 1; no hang. The joint trainer, which loads a transformers model: its
    loading bar shows on the main process only."""
    out = tmp_path / "joint"
    returncode, logs = two_processes(
        "tests/fault_injection.py", "--nan_loss_at_step", "1", "--nan_loss_on_process", "1",
        "train_seg_mask_diffusion.py", "--pretrained_model_name_or_path", tiny_sd_folder,
        *trainer_args(toy_root, out, "--train_batch_size", "1", "--max_train_steps", "2"),
        log_dir=tmp_path / "logs", port=29518,
    )  # fmt: skip
    assert returncode != 0
    assert "The loss became nan at step 1 on process 1 (of 2)" in logs[0], logs[0][-4000:]
    assert "No checkpoint was written yet" in logs[0]
    assert not list_checkpoints(out) and not (out / "unet").exists()
    # transformers' bar (CLIPTextModel), the trainer's data check and step bars: on the main process only
    for line in ("Loading weights", "Checking the data", "Steps:"):
        assert line in logs[0] and line not in logs[1], line


def test_bad_masks_stop_every_process_before_a_model_loads(toy_root, tmp_path):
    """Each process checks its half of the pairs; both learn of every problem, and stop."""
    data = tmp_path / "data"
    shutil.copytree(toy_root, data)
    masks = sorted((data / "masks").iterdir())
    label = read_label_map(masks[0])
    label[0, 0] = 7
    save_label_png(label, masks[0])  # in process 0's half
    Image.new("RGB", (32, 32), (200, 0, 0)).save(masks[-1])  # a colour mask, in process 1's half
    out = tmp_path / "out"
    returncode, logs = two_processes(*SDM, *trainer_args(data, out, "--max_train_steps", "1"),
                                     log_dir=tmp_path / "logs", port=29519)  # fmt: skip
    assert returncode != 0
    for log in logs:
        assert "2 problem(s) in the training data" in log and "no model was loaded" in log
        assert f"{masks[0]} holds class ids 7" in log and f"{masks[-1]} is a colour (RGB) mask" in log
        assert "SpadeUNetModel" not in log
    assert not [path for path in out.rglob("*") if path.is_file()]


def test_logit_normal_timesteps_follow_sd3_density_from_the_batch_generator():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    uniform = draw_timesteps(scheduler, 20000, torch.Generator().manual_seed(0))
    skewed = draw_timesteps(scheduler, 20000, torch.Generator().manual_seed(0), logit_normal=(0.9, 1.5))
    assert skewed.dtype == torch.long and skewed.min() >= 0 and skewed.max() <= 999
    # T * sigmoid(N(0.9, 1.5)): the median at T * sigmoid(0.9) = 711, a quarter below T * sigmoid(0.9 - 1.5 * 0.674).
    assert abs(skewed.float().median().item() - 711) < 15 and abs(uniform.float().median().item() - 500) < 15
    assert abs((skewed < 1000 * torch.sigmoid(torch.tensor(0.9 - 1.5 * 0.674))).float().mean().item() - 0.25) < 0.01
    again = draw_timesteps(scheduler, 20000, torch.Generator().manual_seed(0), logit_normal=(0.9, 1.5))
    assert torch.equal(skewed, again)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_snr_or_snr_plus_one(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 200, 999])
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    weights = min_snr_weights(scheduler, timesteps, snr_gamma=5.0)
    assert torch.allclose(weights, expected, rtol=1e-5)
    # High-SNR (early) steps are down-weighted, low-SNR ones keep weight 1 (epsilon) or SNR/(SNR+1) (v).
    assert weights[0] < 0.01 and (weights[3] == 1.0 if prediction_type == "epsilon" else weights[3] < 1e-4)


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
    result = run_script(
        "accelerate", "launch", "tests/fault_injection.py", "--fake_hub", record, *SDM,
        *trainer_args(toy_root, out, "--max_train_steps", "2", "--checkpointing_steps", "1"),
        "--report_to", "tensorboard", "--push_to_hub", "--hub_token", token, "--validation_steps", "2",
        "--num_validation_images", "1",
    )  # fmt: skip
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

    # The model card: how to load it, what it learnt from, its classes, the command, the validation grid, the tags.
    card = ModelCard(uploaded["files"]["README.md"])
    assert card.data.library_name == "diffusers" and card.data.base_model is None  # pixel space: no base
    assert card.data.tags == ["diffusers", "semantic-image-synthesis", "sdm"]
    assert "DiffusionPipeline.from_pretrained('user/run', trust_remote_code=True)" in card.text
    assert f"- Data: `<local>/{toy_root.name}` (`--dataset generic`), 6 training pairs" in card.text
    assert "| 0 | background | `#282828` |" in card.text and "| 3 | triangle |" in card.text
    command = next(line for line in card.text.splitlines() if line.startswith("accelerate launch"))
    assert command.startswith("accelerate launch train_spade_sdm.py --model_config configs/models/sdm_tiny.json")
    assert "--max_train_steps 2" in command and "--push_to_hub" in command and "--hub_token" not in command
    assert "![validation at the last step](validation/validation-step000002.png)" in card.text
    assert "validation/validation-step000002.png" in uploaded["files"]
    assert (out / "README.md").read_text() == uploaded["files"]["README.md"]


def test_the_model_cards_command_leaves_out_secrets_and_local_directories():
    from segdiff.training import command_line

    arguments = ["--hub_token=hf_abc", "--data_root", "/home/me/data/toy", "--hub_token", "hf_def", "--seed", "1"]
    assert command_line(arguments) == ["--data_root", "<local>/toy", "--seed", "1"]


def test_a_base_with_only_fp16_variant_weights_trains_saves_and_generates(toy_root, tiny_sd_folder, tmp_path):
    """--variant reaches every load of the base, including the final pipeline and a checkpoint's generation."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from segdiff.pipelines.joint import JointImageMaskPipeline

    base = tmp_path / "fp16-only"
    shutil.copytree(tiny_sd_folder, base)
    for folder, model_class in (
        ("unet", UNet2DConditionModel),
        ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel),
    ):
        model = model_class.from_pretrained(base / folder)
        for weights in (base / folder).glob("*.safetensors"):
            weights.unlink()
        model.half().save_pretrained(base / folder, variant="fp16")
    assert sorted(p.name for p in (base / "vae").glob("*.safetensors")) == ["diffusion_pytorch_model.fp16.safetensors"]

    out = tmp_path / "joint"
    run_script(
        "accelerate", "launch", "train_seg_mask_diffusion.py", "--pretrained_model_name_or_path", base,
        "--variant", "fp16", *trainer_args(toy_root, out, "--max_train_steps", "1", "--checkpointing_steps", "1"),
    )  # fmt: skip
    pipeline = JointImageMaskPipeline.from_pretrained(out)
    assert pipeline.unet.config.in_channels == 5 and pipeline.vae.dtype == torch.float32
    run_script(
        "generate_joint_image_mask_diffusion.py", "--checkpoint", out / "checkpoint-1", "--save_dir", tmp_path / "gen",
        "--num_samples", "1", "--num_inference_steps", "2",
    )  # fmt: skip
    assert len(list((tmp_path / "gen" / "images").iterdir())) == 1

    # The ControlNet generator loads the base with the variant its training run recorded.
    controlnet = tmp_path / "controlnet"
    run_script(
        "accelerate", "launch", "train_controlnet_seg.py", "--pretrained_model_name_or_path", base,
        "--variant", "fp16", *trainer_args(toy_root, controlnet, "--max_train_steps", "1"),
    )  # fmt: skip
    run_script(
        "generate_controlnet_seg.py", "--model", controlnet, "--masks_dir", toy_root / "masks",
        "--save_dir", tmp_path / "rendered", "--num_images_per_mask", "1", "--num_inference_steps", "2",
    )  # fmt: skip
    assert len(list((tmp_path / "rendered" / "images").iterdir())) == 6
