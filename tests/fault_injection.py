"""Run one of the real trainers with a fault injected, to test the guarantees of the shared plumbing on it.

    accelerate launch tests/fault_injection.py --nan_loss_at_step 4 train_spade_sdm.py ARGS...
    accelerate launch tests/fault_injection.py --kill_during_save_at 4 train_spade_sdm.py ARGS...
    accelerate launch tests/fault_injection.py --fake_hub RECORD.json train_spade_sdm.py --push_to_hub ARGS...

The trainer runs unchanged, as its ``__main__``; only functions of ``segdiff.training`` that every trainer
calls are wrapped (and, for one fault, ``Path.rename``):

* ``--nan_loss_at_step N``: from optimizer step N on, the loss the trainer computed is multiplied by NaN before
  it reaches ``stop_on_nonfinite_loss`` (the trainer's own guard, which must stop the run before the update);
  with ``--nan_loss_on_process I``, only process I's loss (the others must stop with it);
* ``--kill_during_save_at N``: the process SIGKILLs itself while ``checkpoint-N`` is being written, after the
  models are on disk and before the optimizer state is, as a preempted node would;
* ``--kill_replacing_checkpoint N``: the process SIGKILLs itself when a save of step N has moved the existing
  ``checkpoint-N`` aside and not yet moved the new one in (a run resumed from an earlier checkpoint saves step N
  again);
* ``--weights_of_every_process DIR``: at the end of training each process writes the trained model's weights as
  it holds them to ``DIR/process-I.safetensors`` (the saved model is the main process's only);
* ``--fake_hub RECORD.json``: ``huggingface_hub.create_repo``, ``create_commit`` and ``ModelCard.load`` answer as
  the Hub would for a new repository (which has no model card yet), and what would have been uploaded (each file's
  path in the repo and its bytes) is written to RECORD.json.
"""

import argparse
import json
import os
import runpy
import signal
import sys
from pathlib import Path

from segdiff import training


def nan_loss_from(step: int, process: int | None) -> None:
    guard = training.stop_on_nonfinite_loss

    def poisoned(accelerator, loss, global_step, output_dir):
        if global_step + 1 >= step and process in (None, accelerator.process_index):
            loss = loss * float("nan")
        return guard(accelerator, loss, global_step, output_dir)

    training.stop_on_nonfinite_loss = poisoned


def kill_while_saving(step: int) -> None:
    register = training.register_checkpoint_hooks

    def register_and_arm(accelerator, *args, **kwargs):
        register(accelerator, *args, **kwargs)

        def die(models, weights, output_dir):  # registered after the hook that writes the models, so runs after it
            if Path(output_dir).name == f".checkpoint-{step}.partial":
                os.kill(os.getpid(), signal.SIGKILL)

        accelerator.register_save_state_pre_hook(die)

    training.register_checkpoint_hooks = register_and_arm


def kill_while_replacing(step: int) -> None:
    rename = Path.rename

    def rename_and_die(self, target):
        moved = rename(self, target)
        if self.name == f"checkpoint-{step}" and Path(target).name == f".checkpoint-{step}.replaced":
            os.kill(os.getpid(), signal.SIGKILL)
        return moved

    Path.rename = rename_and_die


def save_weights_of_every_process(folder: Path) -> None:
    from safetensors.torch import save_file

    finish = training.TrainingLoop.finish

    def save_then_finish(loop, *args, **kwargs):
        model = training.unwrap_model(loop.accelerator, loop.model)
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, folder / f"process-{loop.accelerator.process_index}.safetensors")
        return finish(loop, *args, **kwargs)

    training.TrainingLoop.finish = save_then_finish


def fake_hub(record: Path) -> None:
    from types import SimpleNamespace

    import huggingface_hub
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = False  # the tests run offline; nothing here goes out

    def create_repo(repo_id, token=None, **kwargs):
        return SimpleNamespace(repo_id=f"user/{repo_id}")

    def create_commit(repo_id, operations, token=None, **kwargs):
        uploaded = {}
        for operation in operations:
            content = operation.path_or_fileobj
            content = Path(content).read_bytes() if isinstance(content, str | Path) else content
            uploaded[operation.path_in_repo] = content.decode("latin-1")
        record.write_text(json.dumps({"repo_id": repo_id, "token": token, "files": uploaded}))

    def load_model_card(cls, repo_id_or_path, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id_or_path} has no README.md")

    huggingface_hub.create_repo = create_repo
    huggingface_hub.create_commit = create_commit
    huggingface_hub.ModelCard.load = classmethod(load_model_card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--nan_loss_at_step", type=int, default=None)
    parser.add_argument("--nan_loss_on_process", type=int, default=None)
    parser.add_argument("--kill_during_save_at", type=int, default=None)
    parser.add_argument("--kill_replacing_checkpoint", type=int, default=None)
    parser.add_argument("--weights_of_every_process", type=Path, default=None)
    parser.add_argument("--fake_hub", type=Path, default=None)
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="The trainer's own arguments.")
    options = parser.parse_args()
    if options.nan_loss_at_step is not None:
        nan_loss_from(options.nan_loss_at_step, options.nan_loss_on_process)
    if options.kill_during_save_at is not None:
        kill_while_saving(options.kill_during_save_at)
    if options.kill_replacing_checkpoint is not None:
        kill_while_replacing(options.kill_replacing_checkpoint)
    if options.weights_of_every_process is not None:
        save_weights_of_every_process(options.weights_of_every_process)
    if options.fake_hub is not None:
        fake_hub(options.fake_hub)
    sys.argv = [options.script, *options.script_args]
    runpy.run_path(options.script, run_name="__main__")


if __name__ == "__main__":
    main()
