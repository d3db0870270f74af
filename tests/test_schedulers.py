"""The SDM pipeline's schedulers by name (`make_scheduler(..., stochastic=True)`): stochastic DPM-Solver++ on the training schedule, x0 clipped
in pixel space, epsilon alone for a learned-variance model, noise drawn from each image's own generator; what each
scheduler's step gets (eta, generator: `prepare_extra_step_kwargs`)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from test_spade_model import _one_thread, make_pipeline, random_labels  # noqa: F401 (_one_thread: autouse)

import segdiff.pipelines.sdm as sdm_module
from segdiff.pipelines.sdm import sdm_scheduler
from segdiff.schedulers import make_scheduler, prepare_extra_step_kwargs


def test_sdm_sampler_makes_dpmsolver_stochastic_on_the_training_schedule():
    for pixel_space in (True, False):
        training = sdm_scheduler(learn_sigma=True, pixel_space=pixel_space)
        dpm = make_scheduler("dpmsolver", training.config, stochastic=True)
        assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "sde-dpmsolver++"
        assert torch.equal(dpm.betas, training.betas) and dpm.config.prediction_type == "epsilon"
        # x0 clipped to [-1, 1] (thresholding at 1) in pixel space only; the rest as make_scheduler builds it
        assert dpm.config.thresholding == pixel_space and dpm.config.sample_max_value == 1.0
        deterministic = make_scheduler("dpmsolver", training.config)
        assert deterministic.config.algorithm_type == "dpmsolver++"
        assert {k: v for k, v in dpm.config.items() if k != "algorithm_type"} == {
            k: v for k, v in deterministic.config.items() if k != "algorithm_type"
        }
        # every other scheduler is make_scheduler's
        ddim = make_scheduler("ddim", training.config, stochastic=True)
        assert isinstance(ddim, DDIMScheduler) and ddim.config == make_scheduler("ddim", training.config).config


def spy_on_x0(scheduler) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x0 from the raw epsilon, x0 the solver goes on with) at every DPM-Solver step."""
    seen, convert = [], scheduler.convert_model_output

    def spy(model_output, *args, sample=None, **kwargs):
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index])
        used = convert(model_output, *args, sample=sample, **kwargs)
        seen.append(((sample - sigma_t * model_output) / alpha_t, used))
        return used

    scheduler.convert_model_output = spy
    return seen


def test_dpmsolver_by_name_clips_x0_draws_noise_per_image_and_steps_with_epsilon_alone(monkeypatch):
    pipeline = make_pipeline(scheduler=sdm_scheduler(learn_sigma=True, pixel_space=True), learn_sigma=True)
    labels = random_labels(2, 32)

    def generate(maps, seeds, scheduler="dpmsolver"):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return pipeline(maps, generator=generators, num_inference_steps=3, scheduler=scheduler, output_type="np").images

    # The scheduler that scheduler="dpmsolver" builds: x0 of each step is the raw one clipped to [-1, 1] (the random
    # model's raw x0 lies far outside at the first step), from the 3 epsilon channels of the 6 the model outputs.
    seen = []  # one list of (raw x0, x0 used) per scheduler built

    def recording_sampler(name, config, **options):
        scheduler = make_scheduler(name, config, **options)
        assert scheduler.config.algorithm_type == "sde-dpmsolver++"
        seen.append(spy_on_x0(scheduler))
        return scheduler

    monkeypatch.setattr(sdm_module, "make_scheduler", recording_sampler)
    images = generate(labels, [0, 1])
    monkeypatch.undo()
    (steps,) = seen
    assert len(steps) == 3 and steps[0][0].shape[1] == 3 and steps[0][0].abs().max() > 1
    for raw, used in steps:
        assert torch.equal(used, raw.clamp(-1, 1))

    # Each image's noise, at the start and at every step, comes from its own generator: image 1 of the batch is
    # the image of its map and seed alone, and another seed changes it. The steps do draw noise: the deterministic
    # DPM-Solver++ gives other images from the same starting noise.
    np.testing.assert_allclose(generate(labels[1:], [1])[0], images[1], atol=1e-4)  # batch of 2 vs 1: float noise
    assert not np.allclose(generate(labels, [0, 2])[1], images[1], atol=1e-3)
    pipeline.scheduler = make_scheduler("dpmsolver", pipeline.scheduler.config)
    assert not np.allclose(generate(labels, [0, 1], scheduler=None), images, atol=1e-3)


def test_eta_goes_to_the_steps_that_take_one_and_is_refused_by_the_others():
    # As diffusers' pipelines pass them: eta to DDIM alone, the generator to the steps that draw noise with it
    config = sdm_scheduler().config
    generator = torch.Generator()
    expected = {
        ("ddim", 0.5): {"eta": 0.5, "generator": generator},
        ("ddim", 0.0): {"eta": 0.0, "generator": generator},
        ("ddpm", 0.0): {"generator": generator},
        ("dpmsolver", 0.0): {"generator": generator},
        ("unipc", 0.0): {},
    }
    for (name, eta), kwargs in expected.items():
        assert prepare_extra_step_kwargs(make_scheduler(name, config), generator, eta) == kwargs, name
    with pytest.raises(ValueError, match="eta=0.5 is DDIM's .* DPMSolverMultistepScheduler has none"):
        prepare_extra_step_kwargs(make_scheduler("dpmsolver", config), generator, 0.5)

    # The SDM pipeline's call: eta 0 is the default's deterministic DDIM; eta 1 adds fresh noise at every step
    pipeline = make_pipeline()  # DDIM
    labels = random_labels(1, 32)

    def generate(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipeline(labels, generator=generator, num_inference_steps=3, output_type="np", **kwargs).images

    default = generate()
    np.testing.assert_array_equal(generate(eta=0.0), default)
    assert not np.allclose(generate(eta=1.0), default, atol=1e-3)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler has none: sample with DDIM"):
        generate(eta=0.5, scheduler="dpmsolver")
