"""The smallest trainer built on segdiff.training, for the plumbing tests.

A pixel-space diffusers UNet2DModel denoises toy images with the one-hot label map concatenated to
its input. It uses the shared plumbing exactly as the real trainers do (seeded sampler, checkpoint
hooks, atomic checkpoints, resume, EMA, NaN guard), so the tests can check that plumbing through
`accelerate launch` / `torchrun` without a Stable Diffusion base.

Test-only knobs: --fail_at_step N makes the loss NaN at step N; --crash_during_save_at N kills the
process (SIGKILL) in the middle of writing checkpoint-N, after its models are written.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segdiff import training  # noqa: E402
from segdiff.data import JointTransform, add_dataset_args, dataset_from_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    training.add_training_args(parser, default_resolution=32)
    add_dataset_args(parser)
    parser.add_argument("--fail_at_step", type=int, default=None)
    parser.add_argument("--crash_during_save_at", type=int, default=None)
    return parser.parse_args(argv)


def main(args):
    accelerator = training.make_accelerator(args)
    dataset = dataset_from_args(args)
    num_classes = dataset.num_classes
    transform = JointTransform(
        args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        affine=args.random_affine,  # the tests pass it: resume must replay random geometry exactly too
        ignore_index=dataset.ignore_index,
    )

    def process(sample, generator):
        pixel_values, label = transform(sample["image"], sample["label"])
        return {"pixel_values": pixel_values, "label": label}

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "label": torch.stack([e["label"] for e in examples]),
            "seed": torch.tensor([e["seed"] for e in examples]),
        }

    train_dataloader, sampler = training.make_train_dataloader(training.SeededDataset(dataset, process), args, collate)

    model = UNet2DModel(
        sample_size=args.resolution,
        in_channels=3 + num_classes,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    ema_models = {}
    if args.use_ema:
        ema_models["unet_ema"] = EMAModel(
            model.parameters(), decay=args.ema_decay, model_cls=UNet2DModel, model_config=model.config
        )
    training.register_checkpoint_hooks(accelerator, {"unet": model}, ema_models)
    if args.crash_during_save_at is not None:
        die_while_saving(accelerator, args.crash_during_save_at)

    optimizer = training.make_optimizer(args, model.parameters(), accelerator)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    updates_per_epoch = training.plan_steps(args, len(train_dataloader))
    lr_scheduler = accelerator.prepare(training.make_lr_scheduler(args, optimizer, accelerator))
    for ema in ema_models.values():
        ema.to(accelerator.device)

    global_step, first_epoch, skip_batches = training.resume_from_checkpoint(accelerator, args, updates_per_epoch)
    if accelerator.is_main_process:
        training.write_run_files(args.output_dir, args, dataset.class_names, dataset.palette)

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    # Stops exactly at --max_train_steps, also when resumed from the last step's checkpoint.
    batches = training.training_batches(
        train_dataloader,
        sampler,
        accelerator,
        first_epoch=first_epoch,
        num_epochs=args.num_train_epochs,
        skip_batches=skip_batches,
        global_step=global_step,
        max_train_steps=args.max_train_steps,
    )
    for _epoch, batch in batches:
        with accelerator.accumulate(model):
            generator = training.batch_generator(batch["seed"], accelerator.device)
            clean = batch["pixel_values"]
            noise = torch.randn(clean.shape, generator=generator, device=clean.device)
            timesteps = torch.randint(
                0,
                noise_scheduler.config.num_train_timesteps,
                (clean.shape[0],),
                generator=generator,
                device=clean.device,
            )
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            condition = F.one_hot(batch["label"].clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
            prediction = model(torch.cat([noisy, condition], dim=1), timesteps).sample
            loss = F.mse_loss(prediction, noise)
            if args.fail_at_step is not None and global_step + 1 >= args.fail_at_step:
                loss = loss * float("nan")
            training.stop_on_nonfinite_loss(accelerator, loss, global_step, args.output_dir)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)

        if accelerator.sync_gradients:
            for ema in ema_models.values():
                ema.step(model.parameters())
            global_step += 1
            progress_bar.update(1)
            if global_step % args.checkpointing_steps == 0:
                training.save_checkpoint(accelerator, args, global_step)
            progress_bar.set_postfix(loss=loss.item())

    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        final.save_pretrained(Path(args.output_dir) / "unet")
    # Every rank writes its own copy so the multi-process test can compare them.
    torch.save(final.state_dict(), Path(args.output_dir) / f"weights_rank{accelerator.process_index}.pt")
    accelerator.end_training()


def die_while_saving(accelerator, step):
    """Kill this process halfway through saving checkpoint-<step>: the models are on disk, the rest is not."""

    def hook(models, weights, output_dir):
        if Path(output_dir).name == f".checkpoint-{step}.partial":
            os.kill(os.getpid(), signal.SIGKILL)

    accelerator.register_save_state_pre_hook(hook)  # runs after the hook that writes the models


if __name__ == "__main__":
    main(parse_args())
