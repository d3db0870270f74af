"""Joint image + mask diffusion: the trainer and generator run as a user runs them, on the tiny base."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_script, script_error
from diffusers import UNet2DConditionModel
from generator_checks import SCHEDULER_CLASSES, expected_miou, run_generator, spy_on_schedulers
from PIL import Image
from safetensors.torch import load_file

import evaluate
from generate_joint_image_mask_diffusion import load_pipeline
from segdiff.data import load_segmentation_dataset, read_label_map
from segdiff.pipelines.joint import JointImageMaskPipeline, joint_noise_scheduler
from segdiff.runs import open_run
from segdiff.schedulers import make_scheduler
from train_seg_mask_diffusion import class_mask_latents, joint_loss, parse_args, pick_class, widen_unet_for_mask


def train_args(toy_data, tiny_sd_folder, output_dir, *extra):
    return [
        "train_seg_mask_diffusion.py", "--pretrained_model_name_or_path", tiny_sd_folder,
        "--data_root", toy_data, "--dataset", "generic", "--output_dir", output_dir, "--resolution", "32",
        "--train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none", "--validation_steps", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(toy_data, tiny_sd_folder, tmp_path_factory):
    """4 steps with EMA, a trained text encoder and a checkpoint every 2, through accelerate launch."""
    output_dir = tmp_path_factory.mktemp("joint") / "model"
    run_script(
        "accelerate", "launch",
        *train_args(toy_data, tiny_sd_folder, output_dir, "--max_train_steps", "4", "--checkpointing_steps", "2",
                    "--use_ema", "--train_text_encoder", "--validation_steps", "4", "--num_validation_images", "2",
                    "--report_to", "tensorboard"),
    )  # fmt: skip
    return output_dir


def test_training_writes_the_pipeline_folder(trained, toy_data):
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (trained / name).is_dir(), name
    for name in (
        "model_index.json",
        "class_names.json",
        "training_config.json",
        "validation/validation-step000004.png",
    ):
        assert (trained / name).is_file(), name
    assert json.loads((trained / "class_names.json").read_text())["class_names"] == [
        "background",
        "square",
        "disk",
        "triangle",
    ]
    config = json.loads((trained / "training_config.json").read_text())
    assert config["max_train_steps"] == 4 and config["resolution"] == [32, 32]
    labels = np.concatenate([read_label_map(path).ravel() for path in sorted((toy_data / "masks").iterdir())])
    assert config["train_class_pixels"] == np.bincount(labels[labels < 4], minlength=4).tolist()  # at full size
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # the default tracker: tensorboard event files under output_dir/logs, with the loss and the validation grid
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = trained / "logs" / "train_seg_mask_diffusion"  # --tracker_project_name's default
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert len(events.Scalars("loss")) == 4 and {"image_loss", "mask_loss", "lr"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["validation"]

    unet = UNet2DConditionModel.from_pretrained(trained / "unet")
    assert unet.config.in_channels == unet.config.out_channels == 5
    # EMA weights are what the final pipeline holds, not the trained weights they average
    ema = load_file(trained / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    final = load_file(trained / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load_file(trained / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")
    assert ema.keys() == final.keys() == raw.keys()
    assert all(torch.equal(ema[k], final[k]) for k in final)
    assert not all(torch.equal(raw[k], final[k]) for k in final)


def test_pipeline_round_trips_and_generates_images_and_masks(trained, tmp_path):
    pipeline = JointImageMaskPipeline.from_pretrained(trained)
    assert pipeline.class_names == ["background", "square", "disk", "triangle"]
    kwargs = dict(num_images_per_prompt=2, num_inference_steps=3, output_type="np")
    first = pipeline("disk", generator=torch.Generator().manual_seed(0), **kwargs)
    assert first.images.shape == (2, 32, 32, 3) and first.masks.shape == (2, 32, 32) and first.masks.dtype == bool
    assert first.class_ids == [2, 2] and first.prompts[0] == "a remote sensing image and mask of disk"

    pipeline.save_pretrained(tmp_path / "copy")
    again = JointImageMaskPipeline.from_pretrained(tmp_path / "copy")
    second = again(2, generator=torch.Generator().manual_seed(0), **kwargs)
    np.testing.assert_allclose(first.images, second.images, atol=1e-6)
    np.testing.assert_array_equal(first.masks, second.masks)

    with pytest.raises(ValueError, match="class id 7 is out of range"):
        pipeline(7, num_inference_steps=1)
    with pytest.raises(ValueError, match="unknown class name 'cat'"):
        pipeline("cat", num_inference_steps=1)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipeline(0, height=30, width=30, num_inference_steps=1)


def test_resume_from_checkpoint_ends_with_the_same_weights(trained, toy_data, tiny_sd_folder, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained / "checkpoint-2", resumed / "checkpoint-2")
    run_script(
        "accelerate", "launch",
        *train_args(toy_data, tiny_sd_folder, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2",
                    "--use_ema", "--train_text_encoder", "--resume_from_checkpoint", "latest"),
    )  # fmt: skip
    for file in (
        "unet/diffusion_pytorch_model.safetensors",
        "checkpoint-4/unet_ema/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        straight, again = load_file(trained / file), load_file(resumed / file)
        assert all(torch.equal(straight[k], again[k]) for k in straight), file


def test_cached_latents_and_the_bases_own_epsilon_parametrisation(toy_data, tiny_sd_folder, tmp_path):
    result = run_script(
        *train_args(toy_data, tiny_sd_folder, tmp_path / "out", "--max_train_steps", "2", "--cache_latents",
                    "--prediction_type", "epsilon", "--no_zero_terminal_snr", "--snr_gamma", "5",
                    "--prompt_dropout", "0.5", "--mask_loss_weight", "2"),
    )  # fmt: skip
    assert "Caching latents" in result.stderr
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and not scheduler["rescale_betas_zero_snr"]


def test_default_schedule_is_v_prediction_with_zero_terminal_snr(trained):
    scheduler = json.loads((trained / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] and scheduler["timestep_spacing"] == "trailing"


def test_trainer_refuses_contradicting_flags(toy_data, tiny_sd_folder, tmp_path, capsys):
    for extra, message in (
        (["--prediction_type", "epsilon"], "--zero_terminal_snr needs --prediction_type v_prediction"),
        (["--cache_latents", "--random_affine"], "cannot be combined with --random_affine"),
        (["--prompt_dropout", "1"], "--prompt_dropout must be in [0, 1)"),
    ):
        with pytest.raises(SystemExit):
            parse_args([str(a) for a in train_args(toy_data, tiny_sd_folder, tmp_path)[1:]] + extra)
        assert message in capsys.readouterr().err


def test_widened_unet_behaves_like_the_base_at_step_zero(tiny_sd_folder):
    base = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    widened = widen_unet_for_mask(UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet"))
    assert widened.config.in_channels == widened.config.out_channels == 5
    latents = torch.randn(2, 4, 16, 16)
    mask = torch.randn(2, 1, 16, 16)
    text = torch.randn(2, 77, base.config.cross_attention_dim)
    with torch.no_grad():
        expected = base(latents, 10, encoder_hidden_states=text).sample
        joint = widened(torch.cat([latents, mask], 1), 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(joint[:, :4], expected)
    assert torch.count_nonzero(joint[:, 4]) == 0


def test_cached_latents_are_the_vaes_and_cached_samples_read_no_image(toy_data, tiny_sd_folder, tmp_path):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from segdiff.data import JointTransform
    from segdiff.training import SeededDataset
    from train_seg_mask_diffusion import build_training_data

    args = parse_args([str(a) for a in train_args(toy_data, tiny_sd_folder, tmp_path)[1:]] + ["--cache_latents"])
    dataset = load_segmentation_dataset(toy_data, "generic")
    vae = AutoencoderKL.from_pretrained(tiny_sd_folder, subfolder="vae")
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_local_main_process=False)
    cached, _ = build_training_data(args, dataset, accelerator, vae, torch.float32)

    transform = JointTransform(32, center_crop=True, random_flip=False, ignore_index=dataset.ignore_index)
    pixels, label = transform(dataset[3]["image"], dataset[3]["label"])
    expected = vae.encode(torch.stack([pixels, pixels.flip(-1)])).latent_dist
    examples = [cached[(3, seed)] for seed in range(8)]  # both mirrors occur among these seeds
    assert {bool(torch.equal(e["label"], label.flip(-1))) for e in examples} == {False, True}
    for example in examples:
        flipped = int(not torch.equal(example["label"], label))
        torch.testing.assert_close(example["latent_mean"], expected.mean[flipped], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(example["latent_std"], expected.std[flipped], atol=1e-5, rtol=1e-5)
        assert "pixel_values" not in example
    # the cached dataset no longer touches the image files
    assert isinstance(cached, SeededDataset) and not hasattr(cached.dataset, "pairs")


def test_mask_channel_is_plus_minus_one_and_ignore_has_no_weight():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, :4, :4] = 2  # top-left quarter: the class
    label[0, 4:, 4:] = 255  # bottom-right quarter: no data
    mask, weight = class_mask_latents(label, torch.tensor([2]), (4, 4), ignore_index=255)
    assert set(mask.unique().tolist()) == {-1.0, 1.0}
    assert mask[0, 0, :2, :2].eq(1).all() and mask[0, 0, 2:, :2].eq(-1).all()
    assert weight[0, 0, 2:, 2:].eq(0).all() and weight[0, 0, :2, :].eq(1).all()


def test_class_choice_is_a_present_class_and_never_ignore():
    label = torch.full((8, 8), 255)
    label[:2] = 3
    generator = torch.Generator().manual_seed(0)
    assert {pick_class(label, 4, 255, True, generator) for _ in range(20)} == {3}
    uniform = {pick_class(label, 4, 255, False, generator) for _ in range(200)}
    assert uniform == {0, 1, 2, 3}
    # an ignore_index among the class ids (here 0 marks no-data) is never drawn either
    assert {pick_class(label, 4, 0, False, generator) for _ in range(200)} == {1, 2, 3}
    assert pick_class(torch.zeros(8, 8, dtype=torch.long), 4, 0, True, generator) in {1, 2, 3}


def test_joint_loss_weighs_the_mask_and_skips_cells_without_truth():
    target = torch.zeros(2, 5, 2, 2)
    prediction = torch.zeros(2, 5, 2, 2)
    prediction[:, :4] = 1.0  # image error 1 everywhere
    prediction[:, 4] = 2.0  # mask error 4 everywhere ...
    weight = torch.ones(2, 1, 2, 2)
    weight[1, :, 0] = 0  # ... but half of sample 1's cells have no truth
    prediction[1, 4, 0] = 100.0  # and their (huge) error must not count
    loss, image_loss, mask_loss = joint_loss(prediction, target, weight, mask_loss_weight=0.5)
    assert image_loss.item() == 1.0 and mask_loss.item() == 4.0 and loss.item() == 1.0 + 0.5 * 4.0
    # Min-SNR weights scale each sample's loss (both are 3.0 here), then the batch is averaged
    weighted, _, _ = joint_loss(prediction, target, weight, 0.5, snr_weights=torch.tensor([0.25, 1.0]))
    assert weighted.item() == (0.25 * 3.0 + 1.0 * 3.0) / 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_the_targets_snr(prediction_type, tiny_sd_folder):
    """Hang et al. 2023: min(SNR, gamma) / SNR for an epsilon target, min(SNR, gamma) / (SNR + 1) for v."""
    from segdiff.training import min_snr_weights

    v = prediction_type == "v_prediction"  # the trainer's default, with zero terminal SNR
    scheduler = joint_noise_scheduler(tiny_sd_folder, prediction_type, zero_terminal_snr=v)
    timesteps = torch.tensor([0, 50, 200, 400, 600, 800, 999])
    alphas = scheduler.alphas_cumprod.double()[timesteps]
    snr = alphas / (1 - alphas)  # alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    assert snr.max() > gamma > snr.min()  # both sides of the clamp are exercised
    expected = snr.clamp(max=gamma) / (snr + 1 if v else snr)

    weights = min_snr_weights(scheduler, timesteps, gamma)
    assert weights.shape == (7,)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    high_noise = snr < gamma
    if v:  # below gamma the weight is SNR / (SNR + 1): 0 at the zero-SNR last step, where epsilon is undefined
        assert weights[6].item() == 0.0
        torch.testing.assert_close(weights[high_noise].double(), (snr / (snr + 1))[high_noise], rtol=1e-5, atol=1e-6)
    else:  # below gamma no down-weighting at all
        assert torch.equal(weights[high_noise], torch.ones(int(high_noise.sum())))
    torch.testing.assert_close(
        weights[~high_noise].double(), (gamma / (snr + 1 if v else snr))[~high_noise], rtol=1e-5, atol=1e-6
    )


def test_frozen_prompts_are_encoded_once_and_dropped_samples_get_the_empty_prompt(toy_data, tiny_sd_folder, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel

    from train_seg_mask_diffusion import PromptEmbeddings, build_training_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_sd_folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_folder, subfolder="text_encoder")
    calls = []
    text_encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    pipeline = JointImageMaskPipeline.__new__(JointImageMaskPipeline)  # tokenize needs only the tokenizer
    pipeline.tokenizer = tokenizer
    prompts = ["a disk", "a square", ""]
    embeddings = PromptEmbeddings(prompts, pipeline, text_encoder, trainable=False, dtype=torch.float32)
    for _ in range(5):
        out = embeddings(torch.tensor([0, 2, 2, 1]))
    assert calls == [3]  # the three prompts, once, at start
    torch.testing.assert_close(out[1], embeddings.cached[embeddings.empty_prompt])
    trained = PromptEmbeddings(prompts, pipeline, text_encoder, trainable=True, dtype=torch.float32)
    trained(torch.tensor([0, 2, 2, 1]))
    assert calls[-1] == 3  # a trained encoder embeds the batch's distinct prompts, every step

    args = parse_args(
        [str(a) for a in train_args(toy_data, tiny_sd_folder, tmp_path)[1:]] + ["--prompt_dropout", "0.3"]
    )
    samples, _ = build_training_data(args, load_segmentation_dataset(toy_data, "generic"), None, None, torch.float32)
    dropped = [samples[(i % len(samples), i)]["drop_prompt"] for i in range(400)]
    assert 0.2 < sum(dropped) / len(dropped) < 0.4


def test_bf16_training_keeps_the_frozen_parts_and_saves_float32(toy_data, tiny_sd_folder, tmp_path):
    out = tmp_path / "bf16"
    run_script(
        "accelerate", "launch",
        *train_args(toy_data, tiny_sd_folder, out, "--max_train_steps", "2", "--mixed_precision", "bf16",
                    "--use_ema", "--validation_steps", "2", "--num_validation_images", "1"),
    )  # fmt: skip
    assert (out / "validation" / "validation-step000002.png").is_file()
    for folder, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        saved = load_file(out / folder / f"{file}.safetensors")
        assert {tensor.dtype for tensor in saved.values()} == {torch.float32}, folder
    base_vae = load_file(tiny_sd_folder / "vae" / "diffusion_pytorch_model.safetensors")
    saved_vae = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(base_vae[k], saved_vae[k]) for k in base_vae)  # frozen, and saved in full precision
    base_text = load_file(tiny_sd_folder / "text_encoder" / "model.safetensors")
    saved_text = load_file(out / "text_encoder" / "model.safetensors")
    assert all(torch.equal(base_text[k], saved_text[k]) for k in base_text)


def generate(trained, save_dir, *extra, check=True):
    return run_script(
        "generate_joint_image_mask_diffusion.py", "--checkpoint", trained, "--save_dir", save_dir,
        "--num_inference_steps", "2", *extra, check=check,
    )  # fmt: skip


def test_generator_writes_a_generic_dataset(trained, tmp_path):
    save_dir = tmp_path / "synth"
    generate(trained, save_dir, "--num_samples", "5", "--batch_size", "2", "--scheduler", "dpmsolver")
    records = [json.loads(line) for line in (save_dir / "metadata.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["class_id"] for r in records] == [0, 1, 2, 3, 0]  # every class in turn
    assert records[1]["prompt"] == "a remote sensing image and mask of square" and records[1]["seed"] == 1
    assert records[1]["scheduler"] == "dpmsolver" and records[1]["num_inference_steps"] == 2
    for name in ("grid.png", "class_names.json", "images/000004.png", "masks/000004.png", "overlays/000004.png"):
        assert (save_dir / name).is_file(), name

    # masks: the class on the mask, background (0) elsewhere; class-0 samples get ignore outside
    mask_file = save_dir / "masks/000001.png"
    assert Image.open(mask_file).mode == "P"
    assert set(np.unique(read_label_map(mask_file))) <= {0, 1}
    assert set(np.unique(read_label_map(save_dir / "masks/000000.png"))) <= {0, 255}

    dataset = load_segmentation_dataset(save_dir, "generic")
    assert len(dataset) == 5 and dataset.class_names == ["background", "square", "disk", "triangle"]
    assert dataset[3]["image"].size == (32, 32)

    # evaluate.py reads the generator's own layout: each image scored against its generated mask
    results = evaluate.main(["--generated_dir", str(save_dir), "--segmenter", "palette", "--metrics", "miou",
                             "--results_dir", str(tmp_path / "eval")])  # fmt: skip
    assert results["layout"] == "joint" and results["num_generated_images"] == 5
    # the score of exactly these files, recomputed with numpy (class-vs-rest per sample)
    miou, per_class = expected_miou(save_dir, joint=True)
    assert results["miou"] == pytest.approx(miou, abs=1e-6)
    assert results["per_class_iou"] == pytest.approx(per_class, abs=1e-6)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["miou"] == pytest.approx(miou, abs=1e-6)

    # a re-run keeps what is there and only adds the missing samples
    before = (save_dir / "images/000002.png").read_bytes()
    result = generate(trained, save_dir, "--num_samples", "6", "--batch_size", "2", "--scheduler", "dpmsolver")
    assert "5 of 6 already done" in result.stdout and "generating the 1 missing" in result.stdout
    assert (save_dir / "images/000002.png").read_bytes() == before
    assert len((save_dir / "metadata.jsonl").read_text().splitlines()) == 6


def test_generator_samples_do_not_depend_on_batch_size(trained, tmp_path):
    generate(trained, tmp_path / "a", "--num_samples", "3", "--batch_size", "1", "--class_id", "2")
    generate(trained, tmp_path / "b", "--num_samples", "3", "--batch_size", "3", "--class_id", "2")
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / f"a/images/00000{i}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / f"b/images/00000{i}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1  # batched convolutions may differ in the last bit


def test_make_scheduler_keeps_the_joint_schedule(trained):
    training = JointImageMaskPipeline.from_pretrained(trained).scheduler  # v, zero terminal SNR, trailing
    assert training.alphas_cumprod[-1] == 0
    for name in ("ddim", "ddpm", "dpmsolver", "unipc"):
        scheduler = make_scheduler(name, training.config)
        assert type(scheduler) is SCHEDULER_CLASSES[name], name
        for key in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "beta_schedule", "beta_end"):
            assert scheduler.config[key] == training.config[key], (name, key)
        assert not scheduler.config.thresholding  # latents: nothing to clip
        # the same noise levels (the multistep solvers nudge the zero-SNR end off 0 to keep log-SNR finite)
        torch.testing.assert_close(scheduler.alphas_cumprod[:-1], training.alphas_cumprod[:-1], rtol=0, atol=0)
    assert make_scheduler("dpmsolver", training.config).config.algorithm_type == "dpmsolver++"


def test_generator_samples_with_the_scheduler_it_names(trained, tmp_path, monkeypatch):
    seen = spy_on_schedulers(monkeypatch)
    for name in ("ddim", "ddpm", "dpmsolver"):
        seen["steps"].clear()
        run_generator(
            monkeypatch, "generate_joint_image_mask_diffusion.py", "--checkpoint", trained, "--save_dir",
            tmp_path / name, "--num_samples", "2", "--batch_size", "2", "--num_inference_steps", "3",
            "--scheduler", name,
        )  # fmt: skip
        built_name, built = seen["built"][-1]
        assert built_name == name and type(built) is SCHEDULER_CLASSES[name]
        assert built.config.prediction_type == "v_prediction" and built.config.timestep_spacing == "trailing"
        # one batch of 3 steps, all with the named scheduler and none with another
        assert seen["steps"] == {SCHEDULER_CLASSES[name].__name__: 3}, name
    assert len(seen["built"]) == 3


def test_generator_eta_exact_size_and_guidance_in_one_batched_forward(trained, tmp_path, monkeypatch):
    seen = spy_on_schedulers(monkeypatch)
    batch_sizes = []
    forward = UNet2DConditionModel.forward

    def counting_forward(self, sample, *args, **kwargs):
        batch_sizes.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting_forward)
    run_generator(
        monkeypatch, "generate_joint_image_mask_diffusion.py", "--model", trained, "--save_dir", tmp_path / "out",
        "--num_samples", "2", "--batch_size", "2", "--num_inference_steps", "2", "--scheduler", "ddim",
        "--eta", "0.5", "--guidance_scale", "2", "--resolution", "16,32",
    )  # fmt: skip
    assert seen["eta"] == [0.5, 0.5]  # --eta reached the DDIM steps through the pipeline call
    assert batch_sizes == [4, 4]  # 2 steps; 2 samples x (conditional, unconditional)
    records = [json.loads(line) for line in (tmp_path / "out/metadata.jsonl").read_text().splitlines()]
    assert [r["eta"] for r in records] == [0.5, 0.5]
    for record in records:
        assert Image.open(tmp_path / "out" / record["file_name"]).size == (32, 16)
        assert read_label_map(tmp_path / "out" / record["mask_file_name"]).shape == (16, 32)


def test_generator_class_weights_draw_only_weighted_classes(trained, tmp_path):
    generate(trained, tmp_path / "w", "--num_samples", "6", "--batch_size", "6", "--class_weights", "0,0,1,3")
    records = [json.loads(line) for line in (tmp_path / "w/metadata.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["class_id"] for r in records} <= {2, 3}


def test_generator_leaves_out_or_warns_about_a_class_the_training_pairs_never_showed(trained, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((folder / "training_config.json").read_text())
    config["train_class_pixels"][2] = 0  # as if no training pair had shown a disk
    (folder / "training_config.json").write_text(json.dumps(config))

    result = generate(folder, tmp_path / "turns", "--num_samples", "4", "--batch_size", "4")
    records = [json.loads(line) for line in (tmp_path / "turns/metadata.jsonl").read_text().splitlines()]
    assert [r["class_id"] for r in records] == [0, 1, 3, 0]  # every class in turn but the disk
    assert "Leaving out disk: no pixel of it in the model's training pairs" in result.stderr
    asked = generate(folder, tmp_path / "asked", "--num_samples", "1", "--class_id", "2")
    assert "warning: disk had no pixel in the model's training pairs" in asked.stderr
    plain = generate(trained, tmp_path / "plain", "--num_samples", "1", "--class_id", "2")
    assert "warning" not in plain.stderr and "Leaving out" not in plain.stderr


def test_generator_bad_inputs_give_clear_errors(trained, tmp_path, monkeypatch):
    result = generate(trained, tmp_path / "x", "--class_id", "9", check=False)
    assert result.returncode != 0 and "--class_id 9 is out of range: the model has classes 0..3" in result.stderr
    assert "Traceback" not in result.stderr

    def error(checkpoint, *extra):  # the same script, in this process
        common = ["--checkpoint", checkpoint, "--save_dir", tmp_path / "x", "--num_inference_steps", "2"]
        return script_error(monkeypatch, "generate_joint_image_mask_diffusion.py", *common, *extra)

    message = error(trained, "--image_size", "30")  # the old spelling of --resolution
    assert "--resolution 30" in message and "multiples of 4" in message

    no_names = tmp_path / "no-names"
    shutil.copytree(trained, no_names, ignore=shutil.ignore_patterns("checkpoint-*", "class_names.json"))
    message = error(no_names)
    assert "has no class_names.json" in message and "--dataset" in message

    assert "--class_weights needs 4 non-negative weights" in error(trained, "--class_weights", "1,2")


def test_generator_takes_a_checkpoint_folder_and_uses_its_ema(trained, tmp_path):
    generate(trained / "checkpoint-2", tmp_path / "ckpt", "--num_samples", "1")
    written = np.asarray(Image.open(tmp_path / "ckpt" / "images" / "000000.png"), dtype=int)

    # The same sample (class 0, seed 0, DDIM, 2 steps) from checkpoint-2's EMA UNet and trained text encoder ...
    pipeline = JointImageMaskPipeline.from_pretrained(trained)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.text_encoder = pipeline.text_encoder.from_pretrained(trained / "checkpoint-2", subfolder="text_encoder")

    def sample(unet_folder):
        pipeline.unet = UNet2DConditionModel.from_pretrained(trained / "checkpoint-2", subfolder=unet_folder)
        output = pipeline([0], height=32, width=32, num_inference_steps=2, generator=[torch.Generator().manual_seed(0)])
        return np.asarray(output.images[0], dtype=int)

    assert np.abs(sample("unet_ema") - written).max() <= 1
    # ... and not from its non-EMA UNet
    assert np.abs(sample("unet") - written).max() > 1


def test_checkpoint_of_an_unfinished_run_loads_its_own_unet_ema_and_text_encoder(trained, tmp_path):
    # A run stopped after its first checkpoint: no pipeline folder yet, only the run files and checkpoint-2.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained / "checkpoint-2", unfinished / "checkpoint-2")
    for name in ("training_config.json", "class_names.json"):
        shutil.copy(trained / name, unfinished / name)
    run = open_run(unfinished / "checkpoint-2")
    pipeline = load_pipeline(run, ["background", "square", "disk", "triangle"], torch.float32)

    checkpoint = unfinished / "checkpoint-2"
    for model, file in (
        (pipeline.unet, checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors"),
        (pipeline.text_encoder, checkpoint / "text_encoder" / "model.safetensors"),  # trained: not the final one
    ):
        saved, loaded = load_file(file), model.state_dict()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), file
    final_text_encoder = load_file(trained / "text_encoder" / "model.safetensors")
    assert not all(
        torch.equal(final_text_encoder[k], pipeline.text_encoder.state_dict()[k]) for k in final_text_encoder
    )
    # the run's schedule and prompt, as the finished pipeline has them
    final = json.loads((trained / "scheduler" / "scheduler_config.json").read_text())
    assert type(pipeline.scheduler).__name__ == final["_class_name"] == "DDIMScheduler"
    for key in ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing"):
        assert pipeline.scheduler.config[key] == final[key], key
    assert pipeline.config.prompt_template == "a remote sensing image and mask of {class_name}"

    result = generate(
        checkpoint, tmp_path / "out", "--num_samples", "2", "--scheduler", "ddpm", "--guidance_scale", "3"
    )
    records = [json.loads(line) for line in (tmp_path / "out/metadata.jsonl").read_text().splitlines()]
    assert [r["scheduler"] for r in records] == ["ddpm", "ddpm"] and records[0]["guidance_scale"] == 3.0
    assert "Wrote 2 (image, mask) pairs" in result.stdout
