"""A user's mistakes, refused at once: every script, run as a user runs it, with a table of bad inputs.

Each case must end its script with a nonzero status and a message that names the flag or the file, print no Python
traceback, and write nothing: not its output folder, and no file among the inputs. Each case is its own process,
forked from one that has imported torch and diffusers already (tests/forked_scripts.py): that import was most of a
case's cost.

Bad inputs other test files already refuse are not repeated here (e.g. test_sdm.py and test_layout.py: a trainer's
--resolution that the model cannot halve; test_generation.py: the generators' size and --eta flags; test_evaluate.py:
evaluate.py's missing inputs; test_synthetic.py: bad --ratios).
"""

import argparse
import json
import runpy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, SCRIPT_ENV, write_untrained_models
from forked_scripts import run_forked
from PIL import Image


@pytest.fixture(scope="module")
def inputs(toy_data, tiny_sd_folder, tmp_path_factory):
    """Good and broken inputs: the toy data and tiny base, untrained layout and SDM folders, folders that look
    trained but are broken, model configs of another model, generated folders evaluate.py must refuse."""
    root = tmp_path_factory.mktemp("inputs")
    write_untrained_models(root, toy_data)
    broken_json = root / "layout-broken-json"
    shutil.copytree(root / "layout", broken_json)
    (broken_json / "model_index.json").write_text("{broken")
    no_weights = root / "layout-no-weights"
    shutil.copytree(root / "layout", no_weights)
    for weights in (no_weights / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    sdm_no_weights = root / "sdm-no-weights"  # its configs say what sizes it draws; its weights are missing
    shutil.copytree(root / "sdm", sdm_no_weights)
    for weights in (sdm_no_weights / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    controlnet = root / "controlnet-no-weights"  # its config says ControlNet, but the weights are missing
    controlnet.mkdir()
    controlnet_config = {"_class_name": "ControlNetModel", "conditioning_embedding_out_channels": [16, 32]}
    (controlnet / "config.json").write_text(json.dumps(controlnet_config))  # on the tiny base's latent grid
    shutil.copy(toy_data / "class_names.json", controlnet)
    run_files = {"pipeline": "controlnet_seg", "pretrained_model_name_or_path": str(tiny_sd_folder), "resolution": 32}
    (controlnet / "training_config.json").write_text(json.dumps(run_files))

    banana = root / "banana.json"
    banana.write_text(json.dumps({"_class_name": "Banana", "foo": 1}))
    unknown_key = root / "sdm_tiny_plus.json"
    unknown_key.write_text(json.dumps({**json.loads((ROOT / "configs/models/sdm_tiny.json").read_text()), "foo": 1}))
    out_of_range = root / "data-id-out-of-range"  # the toy data with id 7 (of 4 classes) in one mask
    shutil.copytree(toy_data, out_of_range)
    mask_path = out_of_range / "masks" / "train_00001.png"
    mask = np.array(Image.open(mask_path))
    mask[0, 0] = 7
    Image.fromarray(mask).save(mask_path)
    a_file = root / "a_file.txt"
    a_file.write_text("not a folder")

    # Generic folders of generated pairs: images 32 high and 20 wide with their 32 x 32 masks; one image whose
    # mask has another stem.
    toy_pairs = sorted((toy_data / "images").iterdir())[:3]
    stretched, unpaired = root / "generated-32x20", root / "generated-unpaired"
    for folder in (stretched, unpaired):
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        shutil.copy(toy_data / "class_names.json", folder)
        for path in toy_pairs:
            shutil.copy(toy_data / "masks" / path.name, folder / "masks")
    for path in toy_pairs:
        Image.open(path).resize((20, 32)).save(stretched / "images" / path.name)
        shutil.copy(path, unpaired / "images")
    (unpaired / "masks" / toy_pairs[2].name).rename(unpaired / "masks" / "other_stem.png")
    return SimpleNamespace(
        root=root, toy=toy_data, base=tiny_sd_folder, layout=root / "layout", sdm=root / "sdm",
        broken_json=broken_json, no_weights=no_weights, sdm_no_weights=sdm_no_weights, controlnet_no_weights=controlnet, banana=banana,
        unknown_key=unknown_key, a_file=a_file, out_of_range=out_of_range, stretched=stretched, unpaired=unpaired,
    )  # fmt: skip


def training(d, out):
    return ["--data_root", d.toy, "--dataset", "generic", "--resolution", "32", "--max_train_steps", "1",
            "--report_to", "none", "--validation_steps", "0", "--output_dir", out]  # fmt: skip


def synthetic(d, out):
    return ["--layout_model", d.layout, "--num_samples", "2", "--num_inference_steps", "2", "--save_dir", out]


# script: its common arguments (given the inputs and the output folder), and its cases: name -> (the bad input,
# what the message must name). A later flag wins over the common one.
CASES = {
    "train_seg_mask_diffusion.py": (
        lambda d, out: [*training(d, out), "--pretrained_model_name_or_path", d.base],
        {
            "batch_size_0": (["--train_batch_size", "0"], ["--train_batch_size"]),
            "max_train_steps_0": (["--max_train_steps", "0"], ["--max_train_steps"]),
            "resolution_30": (["--resolution", "30"], ["--resolution 30", "multiples of 4"]),
            "junk_base": (lambda d: ["--pretrained_model_name_or_path", d.toy], ["--pretrained_model_name_or_path"]),
            "data_root_missing": (lambda d: ["--data_root", d.root / "no-such-data"], ["no-such-data"]),
        },
    ),
    "train_controlnet_seg.py": (
        lambda d, out: [*training(d, out), "--pretrained_model_name_or_path", d.base],
        {
            "resolution_0": (["--resolution", "0"], ["--resolution"]),
            "resolution_30": (["--resolution", "30"], ["--resolution 30", "multiples of 4"]),
            "accumulation_0": (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps"]),
            "controlnet_junk_folder": (
                lambda d: ["--controlnet_model_name_or_path", d.toy],
                ["--controlnet_model_name_or_path", "holds no ControlNet"],
            ),
            "controlnet_of_another_model": (
                lambda d: ["--controlnet_model_name_or_path", d.sdm / "unet"],
                ["--controlnet_model_name_or_path", "SpadeUNetModel"],
            ),
            "controlnet_without_weights": (
                lambda d: ["--controlnet_model_name_or_path", d.controlnet_no_weights],
                ["--controlnet_model_name_or_path", "controlnet-no-weights"],
            ),
        },
    ),
    "train_spade_sdm.py": (
        lambda d, out: [*training(d, out), "--model_config", "configs/models/sdm_tiny.json"],
        {
            "model_config_of_another_model": (lambda d: ["--model_config", d.banana], ["banana.json", "Banana"]),
            "model_config_unknown_key": (lambda d: ["--model_config", d.unknown_key], ["sdm_tiny_plus.json", "foo"]),
            "checkpointing_steps_0": (["--checkpointing_steps", "0"], ["--checkpointing_steps"]),
            "mask_id_out_of_range": (lambda d: ["--data_root", d.out_of_range], ["train_00001.png", "7"]),
        },
    ),
    "train_layout_diffusion.py": (
        lambda d, out: [*training(d, out), "--model_config", "configs/models/layout_tiny.json"],
        {
            "resolution_negative": (["--resolution", "-8"], ["--resolution"]),
            "model_config_of_the_sdm": (["--model_config", "configs/models/sdm_tiny.json"], ["SpadeUNetModel"]),
            "output_dir_a_file": (lambda d: ["--output_dir", d.a_file], ["--output_dir", "a_file.txt"]),
            "data_root_missing": (lambda d: ["--data_root", d.root / "no-such-data"], ["no-such-data"]),
        },
    ),
    "generate_spade_sdm.py": (
        lambda d, out: ["--model", d.sdm, "--masks_dir", d.toy / "masks", "--save_dir", out],
        {
            "steps_0": (["--num_inference_steps", "0"], ["--num_inference_steps"]),
            "guidance_nan": (["--guidance_scale", "nan"], ["--guidance_scale"]),
            "save_dir_a_file": (lambda d: ["--save_dir", d.a_file], ["--save_dir", "a_file.txt"]),
            # refused from the configs: the weights, which are missing, are never reached
            "resolution_before_weights": (
                lambda d: ["--model", d.sdm_no_weights, "--resolution", "31"],
                ["--resolution 31", "multiples of 2"],
            ),
        },
    ),
    "generate_joint_image_mask_diffusion.py": (
        lambda d, out: ["--model", d.sdm, "--save_dir", out],  # each refused before the model is opened
        {
            "steps_0": (["--num_inference_steps", "0"], ["--num_inference_steps"]),
            "class_weights_text": (["--class_weights", "1,abc"], ["--class_weights", "abc"]),
        },
    ),
    "generate_controlnet_seg.py": (
        lambda d, out: ["--masks_dir", d.toy / "masks", "--save_dir", out, "--num_inference_steps", "2"],
        {
            "model_without_weights": (
                lambda d: ["--model", d.controlnet_no_weights],
                ["--model", "controlnet-no-weights"],
            ),
            "resolution_before_weights": (
                lambda d: ["--model", d.controlnet_no_weights, "--resolution", "16,30"],
                ["--resolution 16,30", "multiples of 4"],
            ),
        },
    ),
    "generate_synthetic_dataset.py": (
        synthetic,
        {
            "render_steps_0": (lambda d: ["--renderer", d.sdm, "--render_steps", "0"], ["--render_steps"]),
            "render_scheduler": (
                lambda d: ["--renderer", d.sdm, "--render_scheduler", "bogus"],
                ["--render_scheduler"],
            ),
            "resolution_negative": (lambda d: ["--renderer", d.sdm, "--resolution", "-5"], ["--resolution"]),
            "resolution_0": (["--layouts_only", "--resolution", "0"], ["--resolution"]),
            "resolution_the_renderer_cannot_draw": (
                lambda d: ["--renderer", d.sdm, "--resolution", "31"],
                ["--resolution 31", "multiples of 2"],
            ),
            "layout_model_broken_json": (
                lambda d: ["--layouts_only", "--layout_model", d.broken_json],
                ["--layout_model", "layout-broken-json"],
            ),
            "layout_model_without_weights": (
                lambda d: ["--layouts_only", "--layout_model", d.no_weights],
                ["--layout_model", "layout-no-weights"],
            ),
            "renderer_without_weights": (
                lambda d: ["--renderer", d.controlnet_no_weights],
                ["--renderer", "controlnet-no-weights"],
            ),
        },
    ),
    "demo.py": (
        lambda d, out: ["--quick", "--output_dir", out],
        {
            "output_dir_unwritable": (["--output_dir", "/proc/demo_output"], ["--output_dir", "/proc"]),
        },
    ),
    "evaluate.py": (
        lambda d, out: ["--segmenter", "palette", "--metrics", "miou", "--results_dir", out],
        {
            "another_aspect_ratio": (lambda d: ["--generated_dir", d.stretched], ["train_00000.png", "aspect ratio"]),
            "results_dir_inside_generated_dir": (
                lambda d: ["--generated_dir", d.toy, "--results_dir", d.toy / "evaluation"],
                ["--results_dir"],
            ),
            "unpaired_mask": (lambda d: ["--generated_dir", d.unpaired], ["train_00002.png", "other_stem.png"]),
        },
    ),
    "prepare_sidewalk.py": (
        lambda d, out: ["--data_dir", d.toy, "--output_dir", out],
        {"resolution_0": (["--resolution", "0"], ["--resolution"])},
    ),
}


def snapshot(*folders: Path) -> dict:
    """Every file under ``folders`` with its size and modification time: what a run must leave as it was."""
    return {
        path: (path.stat().st_size, path.stat().st_mtime_ns)
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("script", sorted(CASES))
def test_bad_inputs_are_refused_naming_them_with_no_traceback_and_nothing_written(script, inputs, tmp_path):
    common, cases = CASES[script]
    before = snapshot(inputs.root, inputs.toy, inputs.base)

    outs = {name: tmp_path / name for name in cases}
    runs = [
        [script, *common(inputs, outs[name]), *(bad(inputs) if callable(bad) else bad)]
        for name, (bad, _) in cases.items()
    ]
    failures = []
    for (name, (_, named)), result in zip(cases.items(), [run_forked(argv, SCRIPT_ENV) for argv in runs], strict=True):
        output = result.stdout + result.stderr
        problems = [
            *(["exit status 0"] if result.returncode == 0 else []),
            *(["a traceback"] if "Traceback" in output else []),
            *(f"no mention of {text!r}" for text in named if text not in result.stderr),
            *([f"{outs[name]} was written"] if outs[name].exists() else []),
        ]
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n{result.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert snapshot(inputs.root, inputs.toy, inputs.base) == before, "a refused run wrote among the inputs"


# ---------------------------------------------------------------------------------------------------------
# Every number a script takes goes through a checked type (segdiff.arguments): none is a bare int or float,
# which would take 0, a negative count, nan or inf, to fail later with a traceback or run with nonsense.

SCRIPTS = sorted(ROOT.glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


class Parsed(Exception):
    """Raised in place of parsing: the parser a script built, caught before it reads anything."""


def parser_of(script: Path, monkeypatch) -> argparse.ArgumentParser:
    def capture(parser, args=None, namespace=None):
        raise Parsed(parser)

    namespace = runpy.run_path(str(script), run_name="inspected")  # its functions, without running __main__
    with monkeypatch.context() as patched, pytest.raises(Parsed) as parsed:
        patched.setattr(argparse.ArgumentParser, "parse_args", capture)
        namespace["parse_args"]([])
    return parsed.value.args[0]


def test_every_number_a_script_takes_has_a_checked_type(monkeypatch):
    unchecked = {}
    for script in SCRIPTS:
        parser = parser_of(script, monkeypatch)
        flags = [action.option_strings[0] for action in parser._actions if action.type in (int, float)]
        if flags:
            unchecked[script.name] = flags
    assert len(SCRIPTS) >= 13 and unchecked == {}
