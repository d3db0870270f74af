"""Trained folders as the Hugging Face ecosystem uses them: loaded by diffusers' own DiffusionPipeline, with and
without segdiff installed."""

import ast
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import dynamic_modules_utils
from pipeline_samples import SAMPLES

from segdiff.models.layout_unet import LayoutUNetModel
from segdiff.models.spade_unet import SpadeUNetModel
from segdiff.pipelines.joint import JointImageMaskPipeline, pipeline_over_base
from segdiff.pipelines.layout import LayoutDiffusionPipeline, layout_scheduler
from segdiff.pipelines.sdm import SemanticDiffusionPipeline, sdm_scheduler
from segdiff.schedulers import MaskedLayoutScheduler
from train_seg_mask_diffusion import widen_unet_for_mask

CLASS_NAMES = ["background", "square", "disk", "triangle"]
PIPELINES = {
    "joint": JointImageMaskPipeline,
    "sdm": SemanticDiffusionPipeline,
    "layout": LayoutDiffusionPipeline,
    "layout_d3pm": LayoutDiffusionPipeline,
}


@pytest.fixture(scope="module")
def saved(tiny_sd_folder, tmp_path_factory):
    """The three pipelines (the layout one with both layout types) on tiny random models, saved with save_pretrained; {kind: (folder, samples)}."""
    torch.manual_seed(0)
    pipelines = {
        "joint": pipeline_over_base(
            tiny_sd_folder,
            widen_unet_for_mask(UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")),
            text_encoder=None,
            prediction_type="v_prediction",
            zero_terminal_snr=True,
            class_names=CLASS_NAMES,
            prompt_template="a {class_name}",
        ),
        "sdm": SemanticDiffusionPipeline(
            unet=SpadeUNetModel.from_config_file(ROOT / "configs/models/sdm_tiny.json"),
            scheduler=sdm_scheduler(),
            class_names=CLASS_NAMES,
        ),
        "layout": LayoutDiffusionPipeline(
            unet=LayoutUNetModel.from_config_file(ROOT / "configs/models/layout_tiny.json"),
            scheduler=layout_scheduler(),
            class_names=CLASS_NAMES,
        ),
        # The discrete layout model: its scheduler is segdiff's own, so its code travels with the folder too.
        "layout_d3pm": LayoutDiffusionPipeline(
            unet=LayoutUNetModel.from_config_file(ROOT / "configs/models/layout_tiny.json", layout_type="d3pm"),
            scheduler=MaskedLayoutScheduler(),
            class_names=CLASS_NAMES,
        ),
    }
    folders = tmp_path_factory.mktemp("saved")
    for kind, pipeline in pipelines.items():
        pipeline.save_pretrained(folders / kind)
    return {kind: (folders / kind, SAMPLES[kind](pipeline)) for kind, pipeline in pipelines.items()}


def assert_same_samples(actual: np.ndarray, expected: np.ndarray) -> None:
    """Label maps exactly; images to 1e-5. Weights read back from a safetensors file sit at other memory addresses
    than the ones saved, and on some CPUs that alone sends a convolution down another vectorised path: the same
    weights, copied to fresh memory, give the saved pipeline's images to the bit, read in place they differ by
    about 1e-6."""
    if np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def imported_packages(path) -> set[str]:
    """The top-level packages a Python file imports."""
    nodes = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import | ast.ImportFrom)]
    return {(node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0] for node in nodes}


def test_saved_folders_carry_their_code_as_diffusers_remote_code_reads_it(saved):
    for kind, (folder, _) in saved.items():
        index = json.loads((folder / "model_index.json").read_text())
        code = PIPELINES[kind].__module__.rsplit(".", 1)[-1]
        assert index["_class_name"] == [code, PIPELINES[kind].__name__]
        assert (folder / f"{code}.py").is_file()
        # Each code file stands alone: diffusers copies it without the files beside it.
        assert "segdiff" not in imported_packages(folder / f"{code}.py")
    assert json.loads((saved["sdm"][0] / "model_index.json").read_text())["unet"] == ["spade_unet", "SpadeUNetModel"]
    assert "segdiff" not in imported_packages(saved["sdm"][0] / "unet" / "spade_unet.py")
    assert json.loads((saved["layout"][0] / "model_index.json").read_text())["unet"] == [
        "layout_unet",
        "LayoutUNetModel",
    ]
    d3pm = saved["layout_d3pm"][0]
    assert json.loads((d3pm / "model_index.json").read_text())["scheduler"] == ["schedulers", "MaskedLayoutScheduler"]
    assert "segdiff" not in imported_packages(d3pm / "scheduler" / "schedulers.py")
    assert json.loads((saved["joint"][0] / "model_index.json").read_text())["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]


@pytest.mark.parametrize("kind", PIPELINES)
def test_segdiff_and_diffusers_load_a_saved_folder_to_the_same_samples(saved, kind, tmp_path, monkeypatch):
    folder, samples = saved[kind]
    # segdiff's class reads the folder with segdiff's code: no remote code runs.
    pipeline = PIPELINES[kind].from_pretrained(folder)
    assert type(pipeline) is PIPELINES[kind]
    assert_same_samples(SAMPLES[kind](pipeline), samples)

    # diffusers' entry point runs the code saved in the folder, when asked to.
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)
    pipeline = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipeline).__name__ == PIPELINES[kind].__name__ and type(pipeline) is not PIPELINES[kind]
    assert_same_samples(SAMPLES[kind](pipeline), samples)


def test_diffusers_loads_saved_folders_where_segdiff_is_not_installed(saved, tmp_path):
    """A process whose sys.path has no segdiff (not the checkout, not installed) loads each folder with
    DiffusionPipeline.from_pretrained(trust_remote_code=True) and gets the samples segdiff's pipeline gave."""
    program = f"""
import sys

class WithoutSegdiff:
    # The suite's venv has segdiff installed (editable): this process acts as one where it is not.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "segdiff":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, WithoutSegdiff())
import numpy as np
from diffusers import DiffusionPipeline
from pipeline_samples import SAMPLES

try:
    import segdiff
    raise SystemExit("segdiff imported")
except ModuleNotFoundError:
    pass
folders = {{kind: folder for kind, folder in {[(kind, str(folder)) for kind, (folder, _) in saved.items()]!r}}}
np.savez("samples.npz", **{{
    kind: SAMPLES[kind](DiffusionPipeline.from_pretrained(folder, trust_remote_code=True))
    for kind, folder in folders.items()
}})
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT / "tests"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = np.load(tmp_path / "samples.npz")
    for kind, (_, samples) in saved.items():
        assert_same_samples(loaded[kind], samples)


def cache_repo(cache, repo_id: str, revisions: dict) -> dict:
    """Folders put in a Hugging Face cache as snapshot_download leaves a downloaded repository: one snapshot per
    commit (``models--owner--name/snapshots/<commit>/``) and ``refs/<branch or tag>`` naming its commit. Returns
    {revision: snapshot folder}."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    snapshots = {}
    for number, (revision, folder) in enumerate(revisions.items(), start=1):
        commit = f"{number:040x}"
        snapshots[revision] = storage / "snapshots" / commit
        shutil.copytree(folder, snapshots[revision])
        (storage / "refs" / revision).write_text(commit)
    return snapshots


def test_a_hub_repository_id_opens_from_the_cache_offline_and_a_local_folder_wins(saved, tmp_path, monkeypatch):
    import huggingface_hub

    from segdiff.runs import RunError, TrainedRun, open_run

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # the cache is all there is
    cache = tmp_path / "cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    snapshots = cache_repo(cache, "someone/toy", {"main": saved["layout"][0], "v1": saved["sdm"][0]})

    run = open_run("someone/toy")
    assert run.folder == snapshots["main"] and run.kind == "layout_diffusion"
    pipeline = run.load_pipeline(LayoutDiffusionPipeline, LayoutUNetModel)
    np.testing.assert_array_equal(SAMPLES["layout"](pipeline), saved["layout"][1])
    assert open_run("someone/toy", revision="v1").kind == "spade_sdm"
    with pytest.raises(RunError, match=r"--model someone/toy is not a folder here, .* at revision v2 is not in the"):
        open_run("someone/toy", revision="v2")
    with pytest.raises(RunError, match="--renderer someone/other is not a folder here.*HF_HUB_OFFLINE unset"):
        open_run("someone/other", flag="--renderer")
    with pytest.raises(RunError, match="--model outputs/no/such does not exist"):
        open_run("outputs/no/such")

    # A local folder of the repository's name is the one opened; it has no revisions.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved["sdm"][0], tmp_path / "someone" / "toy")
    assert open_run("someone/toy").kind == "spade_sdm"
    with pytest.raises(RunError, match="is a local folder, which has no revisions"):
        open_run("someone/toy", revision="v1")

    # The Hub copy of training_config.json names a local base by its folder name only.
    run = TrainedRun(tmp_path, tmp_path, False, {"pretrained_model_name_or_path": "<local>/tiny-sd"}, "--renderer")
    with pytest.raises(RunError, match="local base <local>/tiny-sd.*Fix: pass --pretrained_model_name_or_path"):
        run.base()
    assert run.base("models/tiny-sd") == "models/tiny-sd"


def test_a_generator_takes_a_hub_repository_id_and_revision(saved, toy_data, tmp_path):
    sdm = tmp_path / "sdm"
    shutil.copytree(saved["sdm"][0], sdm)
    shutil.copy(toy_data / "class_names.json", sdm)
    cache = tmp_path / "cache"
    cache_repo(cache, "someone/toy-sdm", {"main": saved["layout"][0], "v1": sdm})
    mask = sorted((toy_data / "masks").iterdir())[0]
    env = {**SCRIPT_ENV, "HF_HUB_CACHE": str(cache)}
    subprocess.run(
        [sys.executable, "generate_spade_sdm.py", "--model", "someone/toy-sdm", "--revision", "v1", "--mask", mask,
         "--save_dir", tmp_path / "out", "--num_images_per_mask", "1", "--num_inference_steps", "2"],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    assert len(list((tmp_path / "out" / "images").iterdir())) == 1
    assert json.loads((tmp_path / "out" / "generation_args.json").read_text())["model"] == "someone/toy-sdm@v1"
