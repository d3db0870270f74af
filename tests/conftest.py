"""Shared fixtures: a toy dataset and a tiny Stable Diffusion folder, built once per test process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests run two at a time (pytest -n 2) on two cores: one thread each, in-process and in the scripts they start.
# More threads than cores make torch's thread pools spin against each other, many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses run the scripts as a user would, offline, one thread each (tests run 2 at a time).
SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def pytest_configure(config):
    """The scripts the tests start treat warnings as the suite does: pyproject.toml's filterwarnings, as -W options."""
    SCRIPT_ENV["PYTHONWARNINGS"] = ",".join(config.getini("filterwarnings"))


def run_script(*command, check=True, timeout=600):
    """Run ``python <command>`` (or ``accelerate launch`` when the command starts with it) in the repo root. A
    script (``script.py ...``) or a one-process accelerate launch runs in a process forked from one that imported
    torch and diffusers already (tests/forked_scripts.py); anything else (``-m torch.distributed.run ...``) in a
    new interpreter."""
    from forked_scripts import run_forked

    if command[0] == "accelerate":
        command = (
            "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *command[2:],
        )  # fmt: skip
    command = [str(part) for part in command]
    if command[0].endswith(".py") or command[0] == "-m" and command[1] == "accelerate.commands.launch":
        result = run_forked(command, SCRIPT_ENV, timeout=timeout)
    else:
        result = subprocess.run(
            [sys.executable, *command], cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, timeout=timeout
        )
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stderr[-5000:]}")
    return result


def script_error(monkeypatch, script, *args) -> str:
    """Run ``python <script> <args>`` in this process (its ``__main__`` block, as a user's run), expecting it to
    stop with an error message: returns that message. Saves a torch import per call over `run_script`."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert isinstance(stopped.value.code, str), f"{script} exited with {stopped.value.code!r}, not a message"
    return stopped.value.code


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A generic-layout toy dataset of 24 images, 32 px, 4 classes."""
    from segdiff.toy import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("data") / "toy", num_images=24, size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny SD-format base folder (random weights; VAE factor 2)."""
    from segdiff.tiny import build_tiny_sd

    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_sd(folder, sample_size=32, seed=0)
    return folder


def write_untrained_models(root: Path, toy_data: Path) -> Path:
    """An untrained tiny layout model with its class_prior.json and a training_config.json naming the toy data as
    its training maps (``root/layout``), and an untrained tiny pixel SDM renderer (``root/sdm``), as their trainers
    write them."""
    import json

    import torch

    from segdiff.data import write_class_names
    from segdiff.models.layout_unet import LayoutUNetModel
    from segdiff.models.spade_unet import SpadeUNetModel
    from segdiff.pipelines.layout import LayoutDiffusionPipeline, layout_scheduler
    from segdiff.pipelines.sdm import SemanticDiffusionPipeline, sdm_scheduler
    from segdiff.toy import toy_classes

    names, palette = toy_classes(4)

    def config(name):
        return {k: v for k, v in json.loads((ROOT / "configs/models" / name).read_text()).items() if k[0] != "_"}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layout = LayoutUNetModel.from_config(config("layout_tiny.json"))
        sdm = SpadeUNetModel.from_config(config("sdm_tiny.json"))
    LayoutDiffusionPipeline(unet=layout, scheduler=layout_scheduler(), class_names=names).save_pretrained(
        root / "layout"
    )
    write_class_names(root / "layout" / "class_names.json", names, palette)
    prior = {"pixel_share": [0.7, 0.15, 0.14, 0.01], "mean_share_when_present": [0.7, 0.2, 0.2, 0.03]}
    (root / "layout" / "class_prior.json").write_text(json.dumps({"class_names": names, **prior}))
    training_config = {"pipeline": "layout_diffusion", "data_root": str(toy_data), "dataset": "generic"}
    (root / "layout" / "training_config.json").write_text(json.dumps(training_config))
    SemanticDiffusionPipeline(sdm, sdm_scheduler(), class_names=names).save_pretrained(root / "sdm")
    write_class_names(root / "sdm" / "class_names.json", names, palette)
    (root / "sdm" / "training_config.json").write_text(json.dumps({"pipeline": "spade_sdm", "resolution": 32}))
    return root


def weights(folder, subfolder="unet") -> dict:
    """The tensors of a diffusers model saved in ``folder/subfolder`` (a trained output or a checkpoint)."""
    from safetensors.torch import load_file

    return load_file(Path(folder) / subfolder / "diffusion_pytorch_model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_stand_in_weights(folder: Path):
    """Offline stand-ins for the weights evaluate.py reads, in ``folder``: ``extractor`` (a TorchScript random-conv
    feature extractor in place of Inception) and ``alexnet`` (a random torchvision AlexNet's conv layers: all LPIPS
    uses); ``empty_hub``: a torch hub folder holding neither."""
    from types import SimpleNamespace

    import torch
    import torchvision

    class RandomFeatures(torch.nn.Module):
        """A stand-in for Inception: uint8 images -> 32 features (random conv, pooled)."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
            self.pool = torch.nn.AdaptiveAvgPool2d(2)

        def forward(self, images):
            return self.pool(torch.relu(self.conv(images.float() / 127.5 - 1))).flatten(1)

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    extractor = torch.jit.trace(RandomFeatures().eval(), torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    torch.jit.save(extractor, folder / "extractor.pt")
    # Only the convolutional part: all LPIPS uses (the full state dict would be 240 MB).
    alexnet = torchvision.models.alexnet().state_dict()
    torch.save({key: value for key, value in alexnet.items() if key.startswith("features.")}, folder / "alexnet.pth")
    return SimpleNamespace(extractor=folder / "extractor.pt", alexnet=folder / "alexnet.pth", empty_hub=folder / "hub")
