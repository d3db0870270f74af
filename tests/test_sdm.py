"""SPADE Semantic Diffusion Model: the trainer and generator run as a user runs them, on tiny models."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import run_script, same_weights, script_error, weights
from generator_checks import SCHEDULER_CLASSES, expected_miou, run_generator, spy_on_schedulers
from PIL import Image

import evaluate
from segdiff.data import load_segmentation_dataset, read_label_map, save_label_png
from segdiff.labels import IGNORE_INDEX
from segdiff.pipelines.sdm import SemanticDiffusionPipeline, sdm_scheduler
from segdiff.rendering import load_renderer
from segdiff.schedulers import make_scheduler
from segdiff.seeds import derive_seed
from segdiff.training import exponential_lr_schedule, noise_prediction_loss
from train_spade_sdm import (
    build_training_data,
    discretized_gaussian_log_likelihood,
    noise_schedule,
    parse_args,
    variational_bound,
)

CLASS_NAMES = ["background", "square", "disk", "triangle"]


def train_args(toy_data, output_dir, *extra):
    return [
        "train_spade_sdm.py", "--data_root", toy_data, "--dataset", "generic", "--output_dir", output_dir,
        "--model_config", "configs/models/sdm_tiny.json", "--resolution", "32", "--train_batch_size", "4",
        "--learning_rate", "1e-3", "--report_to", "none", "--validation_steps", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    """Pixel space, SPADE, learned variance and EMA: 4 steps through accelerate launch, a checkpoint every 2."""
    output_dir = tmp_path_factory.mktemp("sdm") / "model"
    run_script(
        "accelerate", "launch",
        *train_args(toy_data, output_dir, "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema",
                    "--learn_sigma", "--validation_steps", "4", "--num_validation_images", "2"),
    )  # fmt: skip
    return output_dir


def test_pixel_spade_training_writes_a_pipeline_folder(trained):
    for name in (
        "model_index.json",
        "class_names.json",
        "training_config.json",
        "validation/validation-step000004.png",
    ):
        assert (trained / name).is_file(), name
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (trained / "vae").exists()
    config = json.loads((trained / "training_config.json").read_text())
    assert config["space"] == "pixel" and config["unet_config"]["num_classes"] == 4
    # The final weights are the EMA ones, not the trained weights they average.
    assert same_weights(weights(trained), weights(trained / "checkpoint-4", "unet_ema"))
    assert weights(trained).keys() == weights(trained / "checkpoint-4").keys()
    assert not same_weights(weights(trained), weights(trained / "checkpoint-4"))

    pipeline = SemanticDiffusionPipeline.from_pretrained(trained)
    assert pipeline.class_names == CLASS_NAMES and pipeline.vae is None
    assert pipeline.unet.config.learn_sigma and pipeline.unet.config.conditioning == "spade"
    assert pipeline.scheduler.config.variance_type == "learned_range" and pipeline.scheduler.config.clip_sample


def test_pipeline_round_trip_gives_the_same_images(trained, toy_data, tmp_path):
    label = read_label_map(toy_data / "masks" / sorted(p.name for p in (toy_data / "masks").iterdir())[0])
    pipeline = SemanticDiffusionPipeline.from_pretrained(trained)
    kwargs = dict(num_images_per_mask=2, num_inference_steps=3, output_type="np", guidance_scale=1.5)
    first = pipeline(label, generator=torch.Generator().manual_seed(0), **kwargs)
    assert first.images.shape == (2, 32, 32, 3) and first.mask_indices == [0, 0]
    pipeline.save_pretrained(tmp_path / "copy")
    second = SemanticDiffusionPipeline.from_pretrained(tmp_path / "copy")(
        label, generator=torch.Generator().manual_seed(0), **kwargs
    )
    np.testing.assert_allclose(first.images, second.images, atol=1e-6)


def test_resume_from_checkpoint_ends_with_the_same_weights(trained, toy_data, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained / "checkpoint-2", resumed / "checkpoint-2")
    run_script(
        "accelerate", "launch",
        *train_args(toy_data, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema",
                    "--learn_sigma", "--resume_from_checkpoint", "latest"),
    )  # fmt: skip
    assert same_weights(weights(trained), weights(resumed))
    assert same_weights(weights(trained / "checkpoint-4"), weights(resumed / "checkpoint-4"))


def test_latent_space_with_concat_conditioning(toy_data, tiny_sd_folder, tmp_path):
    # latent diffusion's semantic-synthesis recipe: concat, L1 loss, its betas (its "linear" is scaled_linear)
    output_dir = tmp_path / "latent"
    run_script(
        "accelerate", "launch",
        *train_args(toy_data, output_dir, "--max_train_steps", "2", "--space", "latent", "--conditioning", "concat",
                    "--pretrained_model_name_or_path", tiny_sd_folder, "--edge_map", "--unknown_class", "channel",
                    "--drop_rate", "0.5", "--loss_type", "l1", "--beta_schedule", "scaled_linear",
                    "--beta_start", "0.0015", "--beta_end", "0.0205"),
    )  # fmt: skip
    pipeline = SemanticDiffusionPipeline.from_pretrained(output_dir)
    # The saved schedule is LDM's: betas linear in sqrt(beta), and every scheduler the generator builds keeps it.
    saved = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["beta_schedule"], saved["beta_start"], saved["beta_end"]) == ("scaled_linear", 0.0015, 0.0205)
    ldm_alphas_cumprod = torch.cumprod(1 - torch.linspace(0.0015**0.5, 0.0205**0.5, 1000) ** 2, dim=0)
    for name in ("ddpm", "ddim"):
        scheduler = make_scheduler(name, pipeline.scheduler.config)
        torch.testing.assert_close(scheduler.alphas_cumprod, ldm_alphas_cumprod, rtol=0, atol=1e-6)
    # A fine-tune from it keeps that schedule unless told otherwise; an explicit flag wins.
    fine_tune = [str(a) for a in train_args(toy_data, "unused", "--init_from", output_dir)[1:]]
    inherited = noise_schedule(parse_args(fine_tune), learn_sigma=False, pixel_space=False).config
    assert (inherited.beta_schedule, inherited.beta_start, inherited.beta_end) == ("scaled_linear", 0.0015, 0.0205)
    changed = noise_schedule(parse_args([*fine_tune, "--beta_end", "0.03"]), learn_sigma=False, pixel_space=False)
    assert (changed.config.beta_start, changed.config.beta_end) == (0.0015, 0.03)
    config = pipeline.unet.config
    assert pipeline.vae is not None and config.in_channels == pipeline.vae.config.latent_channels == 4
    assert config.conditioning == "concat" and config.use_edge_map and config.unknown_class == "channel"
    assert config.sample_size == 16  # 32 px through the tiny base's VAE, which downsamples by 2
    assert not pipeline.scheduler.config.clip_sample  # latents have no [-1, 1] range
    label = np.zeros((32, 32), dtype=np.int64)
    label[8:20, 8:20] = 2
    label[0, :] = 255
    images = pipeline(label, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (1, 32, 32, 3) and np.isfinite(images.images).all()


@pytest.mark.parametrize(
    "space, conditioning, precision, height, width",
    [("latent", "spade", "bf16", 32, 32), ("pixel", "concat", "no", 16, 24)],
    ids=str,
)
def test_the_other_space_and_conditioning_pairs_train(
    space, conditioning, precision, height, width, toy_data, tiny_sd_folder, tmp_path
):
    # With the pixel/SPADE fixture and the latent/concat run above, every pair goes through the trainer; bf16
    # runs the frozen VAE and the validation in bf16 and still saves float32 weights. The pixel run trains on
    # rectangles (--resolution HEIGHT,WIDTH, the landscape task's 384,512 in small).
    output_dir = tmp_path / "run"
    result = run_script(
        "accelerate", "launch",
        *train_args(toy_data, output_dir, "--max_train_steps", "2", "--space", space, "--conditioning", conditioning,
                    "--pretrained_model_name_or_path", tiny_sd_folder, "--mixed_precision", precision,
                    "--validation_steps", "2", "--num_validation_images", "1", "--resolution", f"{height},{width}"),
    )  # fmt: skip
    assert f"Mixed precision type: {precision}" in result.stderr
    # one row: mask | real image | generated image, each tile at the training size
    assert Image.open(output_dir / "validation" / "validation-step000002.png").size == (3 * width, height)
    pipeline = SemanticDiffusionPipeline.from_pretrained(output_dir)
    assert pipeline.unet.config.conditioning == conditioning and (pipeline.vae is not None) == (space == "latent")
    assert {tensor.dtype for tensor in weights(output_dir).values()} == {torch.float32}
    # the pipeline's default size is the training rectangle
    assert pipeline.default_size == (height, width)
    label = np.zeros((32, 32), dtype=np.int64)
    images = pipeline(label, num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (1, height, width, 3)


def test_guidance_fine_tune_starts_from_the_trained_weights(trained, toy_data, tmp_path):
    # At learning rate 0 the fine-tune must end exactly where --init_from started it.
    output_dir = tmp_path / "finetune"
    run_script(
        *train_args(toy_data, output_dir, "--max_train_steps", "2", "--init_from", trained, "--drop_rate", "0.2",
                    "--learning_rate", "0", "--adam_weight_decay", "0", "--lr_warmup_steps", "0"),
    )  # fmt: skip
    assert same_weights(weights(trained), weights(output_dir))
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["drop_rate"] == 0.2 and config["init_from"] == str(trained)

    # a checkpoint folder works too (its EMA weights), and a contradicting option is refused
    result = run_script(
        *train_args(toy_data, tmp_path / "bad", "--max_train_steps", "1", "--init_from", trained / "checkpoint-2",
                    "--conditioning", "concat"),
        check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "conditioning=concat (the model has spade)" in result.stderr


def test_guidance_is_on_by_default_only_for_a_model_that_learned_the_null_map(trained, toy_data, tmp_path):
    # The fine-tune at learning rate 0 has the weights of `trained` and --drop_rate 0.2 in its record: what differs
    # between the two runs is only whether the null map was trained.
    fine_tuned = tmp_path / "finetune"
    run_script(
        *train_args(toy_data, fine_tuned, "--max_train_steps", "1", "--init_from", trained, "--drop_rate", "0.2",
                    "--learning_rate", "0", "--adam_weight_decay", "0", "--lr_warmup_steps", "0"),
    )  # fmt: skip
    masks_dir = write_masks(tmp_path / "masks", toy_data, count=1)
    outputs = {}
    for name, model, extra in [
        ("drop 0", trained, []),
        ("drop 0.2", fine_tuned, []),
        ("drop 0, guided", trained, ["--guidance_scale", "1.5"]),
    ]:
        result = generate(model, masks_dir, tmp_path / name, "--scheduler", "ddim", *extra)
        record = json.loads((tmp_path / name / "metadata.jsonl").read_text().splitlines()[0])
        image = np.asarray(Image.open(tmp_path / name / record["file_name"]))
        outputs[name] = (record["guidance_scale"], image, "never learned the null map" in result.stderr)
    assert outputs["drop 0"][0] == 1.0 and outputs["drop 0.2"][0] == 1.5
    assert not np.array_equal(outputs["drop 0"][1], outputs["drop 0.2"][1])
    # asked for explicitly, guidance is used, with a warning that names the fix
    np.testing.assert_array_equal(outputs["drop 0, guided"][1], outputs["drop 0.2"][1])
    assert [warned for _, _, warned in outputs.values()] == [False, False, True]

    # the synthetic-data renderer follows the same rule
    assert load_renderer(trained).guidance_scale(None) == 1.0
    assert load_renderer(fine_tuned).guidance_scale(None) == 1.5
    with pytest.warns(UserWarning, match="never learned the null map"):
        assert load_renderer(trained).guidance_scale(2.0) == 2.0


def test_label_maps_are_dropped_at_the_drop_rate(toy_data):
    args = parse_args([str(a) for a in train_args(toy_data, "unused")[1:]] + ["--drop_rate", "0.3"])
    assert args.validation_guidance_scale == 1.5  # guidance by default once the model learns the null map
    dataset = load_segmentation_dataset(toy_data, "generic")
    train_dataset, collate = build_training_data(args, dataset)
    drops = [train_dataset[(i % len(dataset), seed)]["drop_label"] for i, seed in enumerate(range(400))]
    assert 0.22 < np.mean(drops) < 0.38
    batch = collate([train_dataset[(0, 1)], train_dataset[(1, 2)]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 32, 32)
    # the same (index, seed) gives the same sample: the resume guarantee
    torch.testing.assert_close(train_dataset[(3, 7)]["pixel_values"], train_dataset[(3, 7)]["pixel_values"])


def test_rectangular_resolution_gives_height_by_width_pairs(toy_data, capsys):
    args = parse_args([str(a) for a in train_args(toy_data, "unused")[1:]] + ["--resolution", "16,24"])
    assert args.resolution == (16, 24)
    dataset = load_segmentation_dataset(toy_data, "generic")
    train_dataset, collate = build_training_data(args, dataset)
    batch = collate([train_dataset[(0, 1)], train_dataset[(5, 2)]])
    assert batch["pixel_values"].shape == (2, 3, 16, 24) and batch["label"].shape == (2, 16, 24)
    square = parse_args([str(a) for a in train_args(toy_data, "unused")[1:]] + ["--resolution", "24,24"])
    assert square.resolution == (24, 24)
    with pytest.raises(SystemExit):
        parse_args([str(a) for a in train_args(toy_data, "unused")[1:]] + ["--resolution", "16x24"])
    assert "'16x24' is not a size: give N, or HEIGHT,WIDTH such as 384,512" in capsys.readouterr().err


def test_noise_losses_are_the_mean_squared_and_mean_absolute_errors():
    prediction = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])  # (2, 1, 2, 2)
    target = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 5.0]]]])
    # per sample: |errors| (1, 2, 0.5, 0) and (2, 2, 2, 2)
    assert noise_prediction_loss(prediction, target, "l1").tolist() == [3.5 / 4, 2.0]
    assert noise_prediction_loss(prediction, target, "l2").tolist() == [5.25 / 4, 4.0]
    assert noise_prediction_loss(prediction.half(), target.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="loss_type must be one of"):
        noise_prediction_loss(prediction, target, "huber")


@pytest.mark.parametrize("processes", [1, 2])
def test_exponential_lr_schedule_warms_up_then_decays_every_update(processes):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = exponential_lr_schedule(optimizer, warmup_steps=2, gamma=0.5, steps_per_update=processes)
    rates = []
    for _update in range(6):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        for _ in range(processes):  # accelerate's prepared scheduler steps once per process
            schedule.step()
    assert rates == [0.0, 5e-4, 1e-3, 5e-4, 2.5e-4, 1.25e-4]
    with pytest.raises(SystemExit, match=r"--lr_exponential_gamma must be in \(0, 1\]"):
        exponential_lr_schedule(optimizer, warmup_steps=0, gamma=1.5)


def test_variational_bound_is_zero_for_the_true_posterior():
    scheduler = sdm_scheduler(learn_sigma=True)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 3, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.tensor([1, 500, 999])
    noisy = scheduler.add_noise(clean, noise, timesteps)
    # v = -1 puts the model's variance on the (clipped) posterior's; the true noise gives the posterior mean.
    exact = variational_bound(scheduler, clean, noisy, timesteps, noise, -torch.ones_like(clean), pixel_space=True)
    torch.testing.assert_close(exact, torch.zeros(3), atol=1e-4, rtol=0)
    wrong_mean = variational_bound(scheduler, clean, noisy, timesteps, noise + 0.5, -torch.ones_like(clean), True)
    assert (wrong_mean > 1e-3).all()
    # beta_t and the posterior variance only differ much at small t
    wrong_variance = variational_bound(scheduler, clean, noisy, timesteps, noise, torch.ones_like(clean), True)
    assert wrong_variance[0] > 0.1


def test_discretized_likelihood_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256)
    for mean, log_variance in ((0.3, math.log(0.01)), (-0.9, math.log(0.5)), (0.0, math.log(1e-4))):
        log_p = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_variance))
        assert abs(log_p.exp().sum().item() - 1) < 1e-3


def write_masks(folder, toy_data, count=2):
    folder.mkdir()
    for path in sorted((toy_data / "masks").iterdir())[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def generate(trained, masks_dir, save_dir, *extra, check=True):
    return run_script(
        "generate_spade_sdm.py", "--model", trained, "--masks_dir", masks_dir, "--save_dir", save_dir,
        "--num_inference_steps", "2", *extra, check=check,
    )  # fmt: skip


def test_generator_writes_samples_grids_and_a_generic_dataset(trained, toy_data, tmp_path):
    masks_dir = write_masks(tmp_path / "masks", toy_data)
    save_dir = tmp_path / "out"
    generate(trained, masks_dir, save_dir, "--num_images_per_mask", "3", "--batch_size", "4", "--scheduler", "ddpm")
    stems = sorted(p.stem for p in masks_dir.iterdir())
    for stem in stems:
        for j in range(3):
            assert (save_dir / f"generated_images/sample_{stem}/generated_{j:02d}.png").is_file()
        assert Image.open(save_dir / f"visualizations/sample_{stem}.png").size == (4 * 32, 32)
    assert (save_dir / "grid.png").is_file() and (save_dir / "class_names.json").is_file()

    records = [json.loads(line) for line in (save_dir / "metadata.jsonl").read_text().splitlines()]
    assert [(r["mask_stem"], r["image_index"]) for r in records] == [(s, j) for s in stems for j in range(3)]
    assert [r["seed"] for r in records] == [derive_seed(0, s, j) for s in stems for j in range(3)]
    assert records[4]["file_name"] == f"images/{stems[1]}_01.png" and records[4]["scheduler"] == "ddpm"
    # trained with --drop_rate 0: it never learned the null map, so it samples without guidance by default
    assert records[4]["mask_source"] == f"{stems[1]}.png" and records[4]["guidance_scale"] == 1.0

    # the flat copy is a generic dataset whose masks are the input masks
    dataset = load_segmentation_dataset(save_dir, "generic")
    assert len(dataset) == 6 and dataset.class_names == CLASS_NAMES
    np.testing.assert_array_equal(
        read_label_map(save_dir / f"masks/{stems[0]}_02.png"), read_label_map(masks_dir / f"{stems[0]}.png")
    )

    # evaluate.py reads the generator's own layout: 2 masks of 3 samples, each scored against its mask
    results = evaluate.main(["--generated_dir", str(save_dir), "--segmenter", "palette", "--metrics", "miou",
                             "--results_dir", str(tmp_path / "eval")])  # fmt: skip
    assert results["layout"] == "mask-conditioned" and (results["num_generated_images"], results["num_masks"]) == (6, 2)
    # the score of exactly these files, recomputed with numpy: each image read by palette against its own mask
    miou, per_class = expected_miou(save_dir, joint=False)
    assert results["miou"] == pytest.approx(miou, abs=1e-6)
    assert results["per_class_iou"] == pytest.approx(per_class, abs=1e-6)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["miou"] == pytest.approx(miou, abs=1e-6)

    # a re-run keeps the finished masks and only generates new ones
    before = (save_dir / "images" / f"{stems[0]}_00.png").read_bytes()
    extra = sorted((toy_data / "masks").iterdir())[2]
    shutil.copy(extra, masks_dir / extra.name)
    result = generate(trained, masks_dir, save_dir, "--num_images_per_mask", "3", "--scheduler", "ddpm")
    assert "2 of 3 already done" in result.stdout and "generating the 1 missing ones" in result.stdout
    assert (save_dir / "images" / f"{stems[0]}_00.png").read_bytes() == before
    assert len((save_dir / "metadata.jsonl").read_text().splitlines()) == 9


@pytest.mark.parametrize("pixel_space", [True, False], ids=["pixel", "latent"])
def test_make_scheduler_keeps_the_sdm_schedule_and_its_clipping(pixel_space):
    training = sdm_scheduler(learn_sigma=True, pixel_space=pixel_space)
    for name in ("ddim", "ddpm", "dpmsolver", "unipc"):
        scheduler = make_scheduler(name, training.config)
        assert type(scheduler) is SCHEDULER_CLASSES[name], name
        for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps"):
            assert scheduler.config[key] == training.config[key], (name, key)
        torch.testing.assert_close(scheduler.alphas_cumprod, training.alphas_cumprod, rtol=0, atol=0)
        if name in ("ddim", "ddpm"):  # they clip x0 themselves
            assert scheduler.config.clip_sample == pixel_space and not scheduler.config.thresholding
        else:  # the multistep solvers clip through thresholding at the clip range, only in pixel space
            assert scheduler.config.thresholding == pixel_space
            assert not pixel_space or scheduler.config.sample_max_value == training.config.clip_sample_range == 1.0
    assert make_scheduler("ddpm", training.config).config.variance_type == "learned_range"
    assert make_scheduler("dpmsolver", training.config).config.algorithm_type == "dpmsolver++"


def test_generator_samples_with_the_scheduler_it_names(trained, toy_data, tmp_path, monkeypatch):
    masks_dir = write_masks(tmp_path / "masks", toy_data, count=1)
    seen = spy_on_schedulers(monkeypatch)
    for name in ("ddim", "ddpm", "dpmsolver"):
        seen["steps"].clear()
        run_generator(
            monkeypatch, "generate_spade_sdm.py", "--model", trained, "--masks_dir", masks_dir, "--save_dir",
            tmp_path / name, "--num_images_per_mask", "1", "--num_inference_steps", "3", "--scheduler", name,
        )  # fmt: skip
        built_name, built = seen["built"][-1]
        assert built_name == name and type(built) is SCHEDULER_CLASSES[name]
        # the pixel model's clipping, whichever way the scheduler applies it
        assert built.config.clip_sample if name != "dpmsolver" else built.config.thresholding
        if name == "dpmsolver":  # SDM's DPM-Solver++ is the stochastic one (segdiff.pipelines.sdm.sdm_sampler)
            assert built.config.algorithm_type == "sde-dpmsolver++"
        # 3 steps, all with the named scheduler and none with another
        assert seen["steps"] == {SCHEDULER_CLASSES[name].__name__: 3}, name
    assert len(seen["built"]) == 3


def test_generator_images_do_not_depend_on_batch_size(trained, toy_data, tmp_path):
    masks_dir = write_masks(tmp_path / "masks", toy_data)
    generate(trained, masks_dir, tmp_path / "a", "--num_images_per_mask", "2", "--batch_size", "1")
    generate(trained, masks_dir, tmp_path / "b", "--num_images_per_mask", "2", "--batch_size", "4")
    for path in (tmp_path / "a" / "images").iterdir():
        a = np.asarray(Image.open(path), dtype=int)
        b = np.asarray(Image.open(tmp_path / "b" / "images" / path.name), dtype=int)
        assert np.abs(a - b).max() <= 1  # batched convolutions may differ in the last bit


def test_generator_reads_colour_masks_and_checkpoint_folders(trained, toy_data, tmp_path):
    palette = json.loads((toy_data / "class_names.json").read_text())["palette"]
    label = np.zeros((32, 32), dtype=np.int64)
    label[4:12, 4:12] = 1
    colours = np.asarray(palette, dtype=np.uint8)[label]
    masks_dir = tmp_path / "colour"
    masks_dir.mkdir()
    Image.fromarray(colours).save(masks_dir / "drawn.png")
    generate(trained / "checkpoint-2", masks_dir, tmp_path / "out", "--num_images_per_mask", "1")
    np.testing.assert_array_equal(read_label_map(tmp_path / "out/masks/drawn_00.png"), label)


def test_generator_reads_masks_whose_classes_count_from_one_with_label_offset(trained, tmp_path):
    """Masks stored as raw LoveDA's are (0 = no-data, class c as c + 1): --label_offset 1 reads them as the model's
    classes with the no-data rows ignored, and the masks written beside the images hold class ids; read as class
    ids, the top class's id is refused, naming the option."""
    label = np.zeros((32, 32), dtype=np.int64)
    label[4:12, 4:12], label[20:28, 8:16] = 1, 3
    stored = label + 1
    stored[:2] = 0
    masks_dir = tmp_path / "raw"
    masks_dir.mkdir()
    save_label_png(stored.astype(np.uint8), masks_dir / "raw.png")
    refused = generate(trained, masks_dir, tmp_path / "x", check=False)
    assert refused.returncode != 0 and "raw.png holds ids the model was not trained for: [4]" in refused.stderr
    assert "pass --label_offset 1" in refused.stderr
    generate(trained, masks_dir, tmp_path / "out", "--num_images_per_mask", "1", "--label_offset", "1")
    expected = np.where(stored == 0, IGNORE_INDEX, label)
    np.testing.assert_array_equal(read_label_map(tmp_path / "out/masks/raw_00.png"), expected)
    # Another offset reads other classes from the same files: not a re-run of these samples.
    other = generate(
        trained, masks_dir, tmp_path / "out", "--num_images_per_mask", "1", "--label_offset", "2", check=False
    )
    assert other.returncode != 0 and "--label_offset: 1 there, 2 now" in other.stderr


def test_generator_bad_masks_give_clear_errors(trained, tmp_path, monkeypatch):
    unknown_ids = tmp_path / "ids"
    unknown_ids.mkdir()
    label = np.zeros((32, 32), dtype=np.uint8)
    label[:4] = 9
    save_label_png(label, unknown_ids / "nine.png")
    result = generate(trained, unknown_ids, tmp_path / "x", check=False)
    assert result.returncode != 0 and "nine.png holds ids the model was not trained for: [9]" in result.stderr
    assert "Traceback" not in result.stderr

    def error(masks_dir, *extra):  # the same script, in this process
        common = ["--model", trained, "--masks_dir", masks_dir, "--save_dir", tmp_path / "x"]
        return script_error(monkeypatch, "generate_spade_sdm.py", *common, "--num_inference_steps", "2", *extra)

    unknown_colour = tmp_path / "colour"
    unknown_colour.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(unknown_colour / "odd.png")
    assert "odd.png has 1 colour(s) that are not in the palette, e.g. (1, 2, 3)" in error(unknown_colour)
    assert "does not exist" in error(tmp_path / "missing")
    message = error(unknown_ids, "--resolution", "31")
    assert "--resolution 31" in message and "multiples of 2" in message


def test_trainer_refuses_bad_options(toy_data, tmp_path, capsys):
    for extra, message in (
        (["--drop_rate", "1"], "--drop_rate must be in [0, 1)"),
        (["--space", "latent"], "--space latent needs --pretrained_model_name_or_path"),
    ):
        with pytest.raises(SystemExit):
            parse_args([str(a) for a in train_args(toy_data, tmp_path)[1:]] + extra)
        assert message in capsys.readouterr().err
    result = run_script(
        *train_args(toy_data, tmp_path / "odd", "--resolution", "31", "--max_train_steps", "1"), check=False
    )
    assert result.returncode != 0 and "multiples of 2" in result.stderr


def test_a_read_only_label_map_is_taken_without_a_warning():
    """np.asarray of a PIL image is read-only, and torch warns on such a buffer: every generator run printed it.
    (torch warns once per process, so this fails when run alone without the copy.)"""
    import warnings

    from segdiff.pipelines.sdm import as_label_maps

    label = np.asarray(Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) % 3))
    assert not label.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (tensor,) = as_label_maps(label)
    assert tensor.tolist() == label.tolist()
