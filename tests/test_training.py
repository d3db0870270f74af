"""The shared training plumbing (segdiff/training.py), exercised through a real trainer as a user runs it.

The cheapest real trainer, train_spade_sdm.py with the tiny pixel-space model, is launched in a subprocess
(accelerate launch, or torchrun for two CPU processes) on a tiny toy dataset. tests/test_guarantees.py runs
the stop, kill and NaN guarantees on all three trainers.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, run_script
from safetensors.torch import load_file

from segdiff.seeds import derive_seed
from segdiff.toy import make_toy_dataset
from segdiff.training import EpochSeededSampler, list_checkpoints, min_snr_weights

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


def test_resume_with_a_wrong_path_names_the_available_checkpoints(toy_root, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    result = run_script("accelerate", "launch", *SDM, *trainer_args(toy_root, out, "--max_train_steps", "4",
                        "--resume_from_checkpoint", "checkpoint-3"), check=False)  # fmt: skip
    assert result.returncode != 0
    assert "no checkpoint folder" in result.stderr and "['checkpoint-2']" in result.stderr


def test_two_process_cpu_run_trains_one_model_across_processes(toy_root, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        *SDM, *trainer_args(toy_root, out, "--max_train_steps", "3", "--checkpointing_steps", "1"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # One gloo process group of two (plain torchrun on CPUs would otherwise train two independent copies).
    assert "DistributedType.MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    assert checkpoint_names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # The processes share each epoch's 3 batches (2 each, the last one padded): 2 updates an epoch, so 3 steps
    # take 2 epochs (one process alone would do them in one).
    assert json.loads((out / "training_config.json").read_text())["num_train_epochs"] == 2
    at_step_1 = load_file(out / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(at_step_1[name], value) for name, value in sdm_weights(out).items())


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
        "--report_to", "tensorboard", "--push_to_hub", "--hub_token", token,
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
