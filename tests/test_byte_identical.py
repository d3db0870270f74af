"""The generators' outputs, pinned byte for byte to those of a baseline commit.

What is pinned: every file that the four generators (generate_joint_image_mask_diffusion.py,
generate_controlnet_seg.py, generate_spade_sdm.py and generate_synthetic_dataset.py) write into --save_dir:
images, label PNGs, visualizations, grids, metadata.jsonl, class_names.json, ratio_report.json.

Against what: the same generator of commit BASELINE (c00fe06, the last version before the restructuring of issue
23), exported with ``git archive`` into a temporary folder and run from there, on the same trained model folders,
the same masks and the same small fixed-seed arguments. The models are trained once per module, for a step or two,
by the trainers of the current tree: the trainers are free to change, the generators are what is pinned.

Two files are not compared: generation_args.json and generation_config.json. They are records of the run's
arguments, whose keys the restructuring renames on purpose (and generation_config.json holds --save_dir, which
differs between the two runs anyway); what those arguments produce is compared, in every other file.

Every file the baseline wrote must be written by the current tree too, byte-identical (SHA-256). Files that only
the current tree writes are allowed: new outputs may be added. So are new keys in a JSON file the baseline wrote,
where ADDED_KEYS names them (issue 24: ratio_report.json's layout_quality and not_drawn, metadata.jsonl's match_strength):
such a file is compared byte for byte with those keys taken out (and re-written as the generator writes it), and
the keys must be there.

The trained folders go to the baseline's generators in the format its trainers wrote: since issue 26 a pipeline
folder carries its code for diffusers' remote code, and model_index.json names it ([file, class]), which the
baseline's classes do not read; `in_the_baseline_format` gives them a copy that names segdiff's classes instead.

When a later change alters the outputs on purpose (a new seed formula, another default), move BASELINE to the
commit just before that change, rather than loosening the comparison.
"""

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import SCRIPT_ENV, run_script

# The current working tree: the repository this file lives in.
ROOT = Path(__file__).resolve().parents[1]
BASELINE = "c00fe06"
# Records of the arguments, whose keys are being renamed on purpose (see the module docstring).
NOT_COMPARED = {"generation_args.json", "generation_config.json"}
# Keys a generator now adds to the JSON files the baseline wrote (see the module docstring), by script and file.
ADDED_KEYS = {
    "generate_synthetic_dataset.py": {
        "ratio_report.json": ("layout_quality", "not_drawn"),
        "metadata.jsonl": ("match_strength",),
    }
}


# ---------------------------------------------------------------------------------------------------------
# The baseline tree and running a generator from a tree


# Session scope, though only this module uses it: pytest sets up wider-scoped fixtures first, so a missing baseline
# skips before the session's toy data and tiny base are built for nothing.
@pytest.fixture(scope="session")
def baseline_tree(tmp_path_factory) -> Path:
    """The files of commit BASELINE, as ``git archive BASELINE | tar -x`` writes them."""
    if shutil.which("git") is None:
        pytest.skip(f"git is not installed: cannot export the baseline commit {BASELINE} to compare with")
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{BASELINE}^{{commit}}"], capture_output=True, text=True
    )
    if found.returncode != 0:
        pytest.skip(
            f"commit {BASELINE} is not in the repository at {ROOT} (a tarball or a shallow clone?): "
            "no baseline to compare with"
        )
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE], capture_output=True, check=True)
    tree = tmp_path_factory.mktemp("baseline")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def generate(tree: Path, script: str, save_dir: Path, *args) -> Path:
    """``python <tree>/<script> --save_dir <save_dir> <args>``, run from ``tree`` and importing segdiff from it only
    (cwd and PYTHONPATH), offline, one thread: the run of a user who checked out that tree."""
    env = {**SCRIPT_ENV, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    if tree != ROOT:  # the baseline is an earlier version, held to its own time's warnings, not this one's
        env.pop("PYTHONWARNINGS")
    result = subprocess.run(
        [sys.executable, str(tree / script), "--save_dir", str(save_dir), *map(str, args)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, f"{tree / script} failed ({result.returncode}):\n{result.stderr[-5000:]}"
    return save_dir


def without_keys(path: Path, keys: tuple[str, ...]) -> bytes:
    """A JSON file (or JSON Lines, one object a line) with ``keys`` taken out of its objects, written back as
    segdiff.files writes it; each key must have been there."""
    from segdiff.files import jsonable

    def taken_out(record: dict) -> dict:
        missing = [key for key in keys if key not in record]
        assert not missing, f"{path.name} lacks the keys {missing} that ADDED_KEYS says this version adds"
        return {key: value for key, value in record.items() if key not in keys}

    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return "".join(json.dumps(jsonable(taken_out(json.loads(line)))) + "\n" for line in lines).encode()
    return (json.dumps(jsonable(taken_out(json.loads(path.read_text()))), indent=2) + "\n").encode()


def digests(folder: Path, added_keys: dict[str, tuple[str, ...]] | None = None) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the argument records, by path relative to it; a file named in
    ``added_keys`` is hashed with those keys taken out."""
    added_keys = added_keys or {}
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(
            without_keys(path, added_keys[path.name]) if path.name in added_keys else path.read_bytes()
        ).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in NOT_COMPARED
    }


def in_the_baseline_format(argument, copies: Path):
    """A pipeline folder among a generator's arguments as the baseline's trainers wrote it: a copy whose
    model_index.json names segdiff's classes, not the code files saved beside them; any other argument as it is."""
    if not (Path(argument) / "model_index.json").is_file():
        return argument
    copy = copies / Path(argument).parent.name / Path(argument).name  # trained models are <kind>N/model
    shutil.copytree(argument, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = index["_class_name"][1]
    for name, entry in index.items():
        if isinstance(entry, list) and entry in (["spade_unet", "SpadeUNetModel"], ["layout_unet", "LayoutUNetModel"]):
            index[name] = [f"segdiff.models.{entry[0]}", entry[1]]
    (copy / "model_index.json").write_text(json.dumps(index, indent=2))
    return copy


def assert_same_outputs(baseline_tree: Path, tmp_path: Path, script: str, *args) -> None:
    """Run ``script`` of the baseline and of the current tree with the same ``args`` (the models in the format of
    each), each into its own --save_dir: every file the baseline wrote (but the argument records) must be in the new
    output, identical."""
    baseline_args = [in_the_baseline_format(argument, tmp_path / "baseline-models") for argument in args]
    old = digests(generate(baseline_tree, script, tmp_path / "baseline", *baseline_args))
    new = digests(generate(ROOT, script, tmp_path / "current", *args), ADDED_KEYS.get(script))
    # Guards against a test that compares nothing: the baseline wrote files, images among them.
    assert old, f"the baseline's {script} wrote nothing to compare"
    assert any(name.startswith("images/") and name.endswith(".png") for name in old), sorted(old)
    missing = sorted(name for name in old if name not in new)
    assert not missing, f"{script}: {len(missing)} file(s) that {BASELINE} writes are missing now: {missing}"
    differing = sorted(name for name in old if old[name] != new[name])
    assert not differing, (
        f"{script}: {len(differing)} of {len(old)} file(s) differ from those of {BASELINE}: {differing}. "
        "If the change is on purpose, move BASELINE to the commit before it (see the module docstring)."
    )


# ---------------------------------------------------------------------------------------------------------
# Inputs: masks, and tiny models trained for a step or two by the current tree's trainers


@pytest.fixture(scope="module")
def masks_dir(toy_data, tmp_path_factory) -> Path:
    """Two label PNGs and one colour PNG (the palette's colours), so both ways of reading a mask are pinned."""
    from segdiff.data import load_class_names, read_label_map
    from segdiff.labels import colorize_label

    folder = tmp_path_factory.mktemp("masks")
    first, second, third = sorted((toy_data / "masks").iterdir())[:3]
    shutil.copy(first, folder / first.name)
    shutil.copy(second, folder / second.name)
    _, palette = load_class_names(toy_data / "class_names.json")
    colorize_label(read_label_map(third), palette).save(folder / f"colour_{third.name}")
    return folder


def train(script: str, output_dir: Path, *args) -> Path:
    """Two steps (no warmup, so the weights do move) at a tiny size, no logging or validation."""
    run_script(
        script, "--output_dir", output_dir, "--max_train_steps", "2", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--report_to", "none", "--validation_steps", "0", *args,
    )  # fmt: skip
    return output_dir


def toy(toy_data):
    return ["--data_root", toy_data, "--dataset", "generic"]


@pytest.fixture(scope="module")
def joint_model(toy_data, tiny_sd_folder, tmp_path_factory) -> Path:
    return train(
        "train_seg_mask_diffusion.py", tmp_path_factory.mktemp("joint") / "model", *toy(toy_data),
        "--pretrained_model_name_or_path", tiny_sd_folder, "--resolution", "32", "--train_batch_size", "4",
    )  # fmt: skip


@pytest.fixture(scope="module")
def controlnet_model(toy_data, tiny_sd_folder, tmp_path_factory) -> Path:
    return train(
        "train_controlnet_seg.py", tmp_path_factory.mktemp("controlnet") / "model", *toy(toy_data),
        "--pretrained_model_name_or_path", tiny_sd_folder, "--resolution", "32", "--train_batch_size", "4",
    )  # fmt: skip


@pytest.fixture(scope="module")
def sdm_model(toy_data, tmp_path_factory) -> Path:
    # --drop_rate: the null label map is trained too, as a model sampled with guidance is.
    return train(
        "train_spade_sdm.py", tmp_path_factory.mktemp("sdm") / "model", *toy(toy_data),
        "--model_config", "configs/models/sdm_tiny.json", "--resolution", "32", "--train_batch_size", "4",
        "--drop_rate", "0.2",
    )  # fmt: skip


@pytest.fixture(scope="module")
def layout_model(toy_data, tmp_path_factory) -> Path:
    return train(
        "train_layout_diffusion.py", tmp_path_factory.mktemp("layout") / "model", *toy(toy_data),
        "--model_config", "configs/models/layout_tiny.json", "--resolution", "16", "--train_batch_size", "8",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The four generators, small and fixed-seed. Guidance > 1 in the joint and ControlNet runs and in the synthetic
# run's SDM rendering (the renderer's default, 1.5), guidance 1 in the SDM run: the guided and the unguided
# sampling paths are both pinned. Each case has its own seed, not 0: how --seed reaches the samples is pinned too.


def test_joint_generator_writes_what_the_baseline_wrote(baseline_tree, joint_model, tmp_path):
    # 4 samples in batches of 3: a full batch and a part one; one sample of each of the 4 classes.
    assert_same_outputs(
        baseline_tree, tmp_path, "generate_joint_image_mask_diffusion.py", "--model", joint_model,
        "--num_samples", "4", "--batch_size", "3", "--resolution", "32", "--scheduler", "ddim",
        "--num_inference_steps", "3", "--guidance_scale", "2", "--seed", "3",
    )  # fmt: skip


def test_controlnet_generator_writes_what_the_baseline_wrote(baseline_tree, controlnet_model, masks_dir, tmp_path):
    assert_same_outputs(
        baseline_tree, tmp_path, "generate_controlnet_seg.py", "--model", controlnet_model, "--masks_dir", masks_dir,
        "--num_images_per_mask", "2", "--batch_size", "4", "--resolution", "32", "--scheduler", "unipc",
        "--num_inference_steps", "2", "--guidance_scale", "3", "--seed", "5",
    )  # fmt: skip


def test_sdm_generator_writes_what_the_baseline_wrote(baseline_tree, sdm_model, masks_dir, tmp_path):
    assert_same_outputs(
        baseline_tree, tmp_path, "generate_spade_sdm.py", "--model", sdm_model, "--masks_dir", masks_dir,
        "--num_images_per_mask", "2", "--batch_size", "4", "--resolution", "32", "--scheduler", "ddpm",
        "--num_inference_steps", "3", "--guidance_scale", "1", "--seed", "7",
    )  # fmt: skip


def test_synthetic_generator_writes_what_the_baseline_wrote(baseline_tree, layout_model, sdm_model, tmp_path):
    assert_same_outputs(
        baseline_tree, tmp_path, "generate_synthetic_dataset.py", "--layout_model", layout_model,
        "--renderer", sdm_model, "--ratios", "disk:0.3", "--num_samples", "3", "--num_inference_steps", "2",
        "--render_steps", "2", "--seed", "11",
    )  # fmt: skip
