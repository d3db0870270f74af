"""The GPU speed options of every trainer (segdiff/training.py), checked on a CPU.

None of them may change what is learnt: ``--channels_last`` and ``--torch_compile`` runs are compared with a plain
run of the same seed, fused/foreach AdamW and foreach EMA with torch's and diffusers' per-tensor updates. On a CPU
they are not bit-for-bit equal (other kernels, other rounding), so the comparisons carry a tolerance, set from what
was measured and explained where it is used. Compiled runs use the ``aot_eager`` or ``eager`` backend: inductor's
C++ code generation took 248 s to compile the tiny SDM on one CPU thread, where aot_eager goes through the same
Dynamo capture and AOTAutograd (forward and backward graphs) in seconds; only inductor's kernels are left out.
"""

import argparse
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script, script_error, weights
from diffusers import ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextModel

from segdiff import training
from segdiff.models.layout_unet import LayoutUNetModel
from segdiff.toy import make_toy_dataset

SDM = ["train_spade_sdm.py", "--model_config", "configs/models/sdm_tiny.json"]
LEARNING_RATE = 1e-3


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, num_images=6, size=32, seed=0)
    return root


def sdm_args(toy_root, base, output_dir, *extra):
    """3 steps at batch 2 in the latents of the tiny base's VAE (so its frozen VAE is in the comparison too), with EMA
    and a checkpoint every step; the losses go to tensorboard (read by `logged_losses`)."""
    return [
        "--space", "latent", "--pretrained_model_name_or_path", base, "--data_root", toy_root, "--dataset", "generic",
        "--output_dir", output_dir, "--resolution", "32", "--train_batch_size", "2", "--learning_rate",
        str(LEARNING_RATE), "--max_train_steps", "3", "--checkpointing_steps", "1", "--use_ema", "--report_to",
        "tensorboard", "--validation_steps", "0", *extra,
    ]  # fmt: skip


def logged_losses(output_dir) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(output_dir / "logs" / "train_spade_sdm"))  # the scalars; hparams are below
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars("loss")]


def assert_close_weights(actual: dict, expected: dict, *, atol: float):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def largest_change(after: dict, before: dict) -> float:
    return max((after[name] - before[name]).abs().max().item() for name in before)


# A run's weights against a plain run's, after 3 AdamW steps at lr 1e-3. Adam divides each gradient by its own
# running size, so where a gradient is tiny (layers behind a zero-initialised output conv, or the attention key bias,
# whose gradient is exactly zero but for rounding) float rounding in the gradient moves the update by a visible
# share of the learning rate: channels-last measured 1.2e-6 here (3.8e-6 in pixel space). The tolerance is 1% of
# one step's size (lr); every other difference is at the level of float32 rounding.
WEIGHT_ATOL = 0.01 * LEARNING_RATE


@pytest.fixture(scope="module")
def plain_sdm(toy_root, tiny_sd_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "sdm"
    run_script("accelerate", "launch", *SDM, *sdm_args(toy_root, tiny_sd_folder, out))
    return out


def test_speed_flags_are_in_the_help_and_wrong_combinations_are_named(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    training.add_training_args(parser)
    help_text = parser.format_help()
    for flag in (
        "--channels_last",
        "--torch_compile",
        "--torch_compile_mode",
        "--torch_compile_backend",
        "--allow_tf32",
    ):
        assert flag in help_text
    args = parser.parse_args(["--output_dir", str(tmp_path)])
    assert (args.channels_last, args.torch_compile, args.torch_compile_mode, args.torch_compile_backend) == (
        False, False, "default", "inductor",
    )  # fmt: skip
    with pytest.raises(SystemExit):  # argparse: not one of accelerate's dynamo backends
        parser.parse_args(["--output_dir", str(tmp_path), "--torch_compile_backend", "inductr"])

    common = ["--data_root", tmp_path, "--dataset", "generic", "--output_dir", tmp_path / "out", "--report_to", "none"]
    message = script_error(monkeypatch, SDM[0], *common, "--torch_compile_mode", "max-autotune")
    assert "add --torch_compile" in message
    message = script_error(
        monkeypatch, SDM[0], *common, "--torch_compile", "--torch_compile_backend", "eager",
        "--torch_compile_mode", "reduce-overhead",
    )  # fmt: skip
    assert "--torch_compile_mode reduce-overhead is a mode of the inductor backend" in message
    assert "--torch_compile_backend inductor" in message


def test_channels_last_trains_the_same_sdm_up_to_float_rounding(plain_sdm, toy_root, tiny_sd_folder, tmp_path):
    out = tmp_path / "channels_last"
    run_script("accelerate", "launch", *SDM, *sdm_args(toy_root, tiny_sd_folder, out, "--channels_last"))
    # The losses of the 3 steps: equal to float32 rounding.
    torch.testing.assert_close(logged_losses(out), logged_losses(plain_sdm), rtol=1e-5, atol=0)
    # Weights and EMA weights after every step, and the final saved model. One step lands within float32 rounding
    # (measured 2.3e-10); the next steps amplify it as WEIGHT_ATOL explains (measured 1.2e-6 at step 3), while
    # training moved the weights by more than a whole step (lr) in the last two steps.
    for step in (1, 2, 3):
        checkpoint, plain = out / f"checkpoint-{step}", plain_sdm / f"checkpoint-{step}"
        atol = 1e-9 if step == 1 else WEIGHT_ATOL
        assert_close_weights(weights(checkpoint), weights(plain), atol=atol)
        assert_close_weights(weights(checkpoint, "unet_ema"), weights(plain, "unet_ema"), atol=atol)
    assert_close_weights(weights(out), weights(plain_sdm), atol=WEIGHT_ATOL)
    assert largest_change(weights(out), weights(out / "checkpoint-1")) > LEARNING_RATE


def log_recompiles(monkeypatch):
    """Make the trainers started by run_script log each recompilation (one of a full-size UNet costs minutes)."""
    import conftest

    monkeypatch.setitem(conftest.SCRIPT_ENV, "TORCH_LOGS", "recompiles")


def test_compiled_sdm_trains_validates_saves_loads_and_resumes_exactly(
    plain_sdm, toy_root, tiny_sd_folder, tmp_path, monkeypatch
):
    """aot_eager: Dynamo capture and AOTAutograd's forward/backward graphs, without inductor's slow C++ compile."""
    from segdiff.models.spade_unet import SpadeUNetModel
    from segdiff.pipelines.sdm import SemanticDiffusionPipeline

    log_recompiles(monkeypatch)
    out = tmp_path / "compiled"
    compiled = ["--torch_compile", "--torch_compile_backend", "aot_eager"]
    validation = ["--validation_steps", "3", "--num_validation_images", "1"]
    result = run_script("accelerate", "launch", *SDM, *sdm_args(toy_root, tiny_sd_folder, out, *compiled, *validation))
    # Saved from the plain module: its class, and no "_orig_mod." (the compiled wrapper's) in the weight names.
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "SpadeUNetModel"
    assert not [name for name in weights(out) if "_orig_mod" in name]
    assert (out / "validation" / "validation-step000003.png").is_file()
    assert "Optimizer: AdamW (fused implementation)" in result.stderr  # torch >= 2.4 has it on CPUs too
    # Compiled once: not again after a checkpoint save or validation touched the model (see register_checkpoint_hooks).
    assert "Recompiling" not in result.stderr
    # The same training as the plain run: measured bit for bit to step 2, 2.3e-10 apart at step 3 (AOTAutograd's
    # graphs may order float operations differently, and Adam amplifies it as WEIGHT_ATOL explains).
    torch.testing.assert_close(logged_losses(out), logged_losses(plain_sdm), rtol=1e-5, atol=0)
    assert_close_weights(weights(out), weights(plain_sdm), atol=WEIGHT_ATOL)
    assert_close_weights(weights(out / "checkpoint-3", "unet_ema"), weights(plain_sdm / "checkpoint-3", "unet_ema"),
                         atol=WEIGHT_ATOL)  # fmt: skip

    # Saved as the plain model: the pipeline and a checkpoint's model load back with from_pretrained.
    pipeline = SemanticDiffusionPipeline.from_pretrained(out)
    assert type(pipeline.unet) is SpadeUNetModel
    assert_close_weights(dict(pipeline.unet.state_dict()), weights(out), atol=0)
    SpadeUNetModel.from_pretrained(out / "checkpoint-2" / "unet")

    # Resumed (compiled again) from checkpoint-2: the uninterrupted compiled run's weights and EMA, bit for bit.
    straight, straight_ema = weights(out), weights(out / "checkpoint-3", "unet_ema")
    resume = ["--resume_from_checkpoint", "checkpoint-2"]
    resumed = run_script("accelerate", "launch", *SDM, *sdm_args(toy_root, tiny_sd_folder, out, *compiled, *resume))
    assert "checkpoint-2 (step 2)" in resumed.stderr and "Recompiling" not in resumed.stderr
    assert_close_weights(weights(out), straight, atol=0)
    assert_close_weights(weights(out / "checkpoint-3", "unet_ema"), straight_ema, atol=0)


# The other trainers' own paths through a compiled, channels-last model: the checkpoint hooks (model and EMA
# folders), validation (its pipeline gets the plain module) and the final save.
OTHER_TRAINERS = {
    # script and its arguments (BASE: the tiny SD folder), the saved model's folder and class, the EMA folder
    "joint": (
        ["train_seg_mask_diffusion.py", "--pretrained_model_name_or_path", "BASE", "--train_text_encoder"],
        "unet", UNet2DConditionModel, "unet_ema",
    ),
    # bf16: validation then copies the trained ControlNet's state dict into a half-precision one, which failed on
    # the compiled wrapper's "_orig_mod." names before training.unwrap_model.
    "controlnet": (
        ["train_controlnet_seg.py", "--pretrained_model_name_or_path", "BASE", "--mixed_precision", "bf16"],
        "", ControlNetModel, "controlnet_ema",
    ),
    "layout": (
        ["train_layout_diffusion.py", "--model_config", "configs/models/layout_tiny.json"],
        "unet", LayoutUNetModel, "unet_ema",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", OTHER_TRAINERS)
def test_compiled_channels_last_trainers_checkpoint_validate_and_save(
    name, toy_root, tiny_sd_folder, tmp_path, monkeypatch
):
    """The eager backend (Dynamo's capture only): these runs check the plumbing, not the compiler. Step 2 comes
    after a checkpoint and a validation: it must not recompile."""
    command, model_folder, model_class, ema_folder = OTHER_TRAINERS[name]
    command = [str(tiny_sd_folder) if arg == "BASE" else arg for arg in command]
    out = tmp_path / name
    log_recompiles(monkeypatch)
    result = run_script(
        "accelerate", "launch", *command, "--data_root", toy_root, "--dataset", "generic", "--output_dir", out,
        "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--use_ema", "--report_to", "none", "--validation_steps", "1", "--num_validation_images", "1",
        "--channels_last", "--torch_compile", "--torch_compile_backend", "eager",
    )  # fmt: skip
    assert "Recompiling" not in result.stderr
    assert (out / "validation" / "validation-step000001.png").is_file()
    saved = model_class.from_pretrained(out / model_folder)
    model_class.from_pretrained(out / "checkpoint-1" / (model_folder or name))
    if name == "joint":  # --train_text_encoder: the second prepared (and compiled) model has its checkpoint folder
        CLIPTextModel.from_pretrained(out / "checkpoint-1" / "text_encoder")
    # The final model holds the EMA weights: those in the last checkpoint's EMA folder.
    ema = model_class.from_pretrained(out / "checkpoint-2" / ema_folder)
    assert_close_weights(dict(saved.state_dict()), dict(ema.state_dict()), atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Optimizer, EMA, data loading, TF32: the helpers themselves
# ------------------------------------------------------------------------------------------------------------------


def tiny_sdm_with_gradients(seed: int = 0):
    """The tiny SDM and a function that puts the gradients of a fixed batch's loss into it."""
    from segdiff.models.spade_unet import SpadeUNetModel

    torch.manual_seed(seed)
    model = SpadeUNetModel.from_config_file("configs/models/sdm_tiny.json")
    generator = torch.Generator().manual_seed(seed)
    noisy, noise = torch.randn(2, 2, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 4, (2, 32, 32), generator=generator)
    timesteps = torch.tensor([10, 500])

    def backward(model):
        model.zero_grad(set_to_none=True)
        segmentation = model.encode_segmentation(labels, size=(32, 32), ignore_index=255)
        torch.nn.functional.mse_loss(model(noisy, timesteps, segmentation).sample, noise).backward()

    return model, backward


def optimizer_args(**overrides):
    values = dict(
        scale_lr=False, learning_rate=LEARNING_RATE, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
        adam_epsilon=1e-8, use_8bit_adam=False, ema_decay=0.9999,
    )  # fmt: skip
    return SimpleNamespace(**{**values, **overrides})


def test_adamw_is_fused_where_torch_has_it_with_the_per_tensor_results():
    import copy

    from accelerate import PartialState

    PartialState()  # what the trainers' Accelerator sets up, and accelerate's logger needs
    assert training.adamw_implementation("cuda") == {"fused": True}
    assert training.adamw_implementation(torch.device("cuda", 1)) == {"fused": True}
    assert training.adamw_implementation("cpu") == {"fused": True}  # torch >= 2.4 (this suite's torch)
    assert training.adamw_implementation("meta") == {}
    cpu_accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    model, backward = tiny_sdm_with_gradients()
    optimizer = training.make_optimizer(optimizer_args(), model.parameters(), cpu_accelerator)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]

    # The fused kernel (and foreach, for an older CUDA torch) against the per-tensor loop: 3 steps of each, from
    # the same weights on the same batch.
    trained = {}
    for implementation in ({}, {"fused": True}, {"foreach": True}):
        copy_ = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(copy_.parameters(), lr=LEARNING_RATE, weight_decay=1e-2, **implementation)
        for step in (1, 2, 3):
            backward(copy_)
            optimizer.step()
            trained[next(iter(implementation), "plain"), step] = {k: v.clone() for k, v in copy_.state_dict().items()}
    plain = trained["plain", 3]
    assert largest_change(plain, dict(model.state_dict())) > 1e-3  # the steps moved the weights
    # foreach: bit for bit. fused: one step lands within a float32 rounding (measured: 1 tensor of 192 off, by
    # 1.2e-10); from the second step on, the gradients are those of weights that differ by that rounding, and
    # Adam's normalisation turns it into up to 1e-6 after 3 steps (the WEIGHT_ATOL story above).
    for step in (1, 2, 3):
        assert_close_weights(trained["foreach", step], trained["plain", step], atol=0)
    assert_close_weights(trained["fused", 1], trained["plain", 1], atol=1e-9)
    assert_close_weights(trained["fused", 3], plain, atol=WEIGHT_ATOL)


def test_ema_helper_uses_foreach_with_the_per_tensor_values():
    from diffusers.training_utils import EMAModel

    from segdiff.models.spade_unet import SpadeUNetModel

    model, _ = tiny_sdm_with_gradients()
    ema = training.make_ema(model, optimizer_args(ema_decay=0.9))
    assert ema.foreach and ema.model_cls is SpadeUNetModel and ema.model_config == model.config
    per_tensor = EMAModel(model.parameters(), decay=0.9, model_cls=SpadeUNetModel, model_config=model.config)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        ema.step(model.parameters())
        per_tensor.step(model.parameters())
    # foreach computes s - (1 - d) * (s - p) with the factor inside one kernel: 1 ulp apart (measured 1.5e-8).
    for averaged, expected in zip(ema.shadow_params, per_tensor.shadow_params):
        torch.testing.assert_close(averaged, expected, rtol=1e-6, atol=1e-7)
    moved = max((p - s).abs().max().item() for p, s in zip(model.parameters(), ema.shadow_params))
    assert moved > 1e-3  # the average lags the weights: the comparison is not of equal constants

    # Validation's swap in and out (training.ema_weights) goes through the same foreach copies.
    before = [p.detach().clone() for p in model.parameters()]
    with training.ema_weights(ema, model):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_batches_are_pinned_and_copied_non_blocking_only_with_cuda(monkeypatch, tmp_path):
    from accelerate import Accelerator

    args = optimizer_args(seed=0, train_batch_size=2, dataloader_num_workers=0)
    dataset = list(range(4))
    assert not torch.cuda.is_available()  # the CPU machine these tests run on
    dataloader, _ = training.make_train_dataloader(dataset, args, collate_fn=None)
    assert dataloader.pin_memory is False
    assert training.dataloader_configuration().non_blocking is False
    parser = argparse.ArgumentParser()
    training.add_training_args(parser)
    accelerator = training.make_accelerator(
        parser.parse_args(["--output_dir", str(tmp_path), "--report_to", "none", "--allow_tf32"])
    )
    assert isinstance(accelerator, Accelerator) and accelerator.non_blocking is False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dataloader, _ = training.make_train_dataloader(dataset, args, collate_fn=None)
    assert dataloader.pin_memory is True
    assert training.dataloader_configuration().non_blocking is True


def test_allow_tf32_sets_the_matmul_and_cudnn_switches_on_cuda_only(monkeypatch):
    switches = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [switch.allow_tf32 for switch in switches]  # torch's switch objects defeat monkeypatch's restore
    try:
        for switch in switches:
            switch.allow_tf32 = False
        training.allow_tf32(SimpleNamespace(allow_tf32=True))
        assert [switch.allow_tf32 for switch in switches] == [False, False]  # no CUDA here: nothing changes
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        training.allow_tf32(SimpleNamespace(allow_tf32=False))
        assert [switch.allow_tf32 for switch in switches] == [False, False]
        training.allow_tf32(SimpleNamespace(allow_tf32=True))
        assert [switch.allow_tf32 for switch in switches] == [True, True]
    finally:
        for switch, value in zip(switches, saved):
            switch.allow_tf32 = value
