"""The mask -> image generators' output layout: keyed by mask stem, resumable, refusing mixed arguments.

Both generators run in this process on untrained tiny models (random weights from a fixed seed): what is
checked is where every image goes, which seed draws it and what a re-run keeps, not what the images show.
"""

import json
import shutil

import pytest
import torch
from conftest import ROOT
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image

import evaluate
import generate_controlnet_seg
import generate_spade_sdm
from segdiff.controlnet import conditioning_channels_for
from segdiff.data import DatasetError, write_class_names
from segdiff.generation import ARGS_FILE, check_save_dir
from segdiff.models.spade_unet import SpadeUNetModel
from segdiff.pipelines.sdm import SemanticDiffusionPipeline, sdm_scheduler
from segdiff.toy import TOY_CLASSES, TOY_PALETTE
from segdiff.training import derive_seed


@pytest.fixture(scope="module")
def sdm_model(tmp_path_factory):
    """An untrained pixel-space SDM pipeline folder (configs/models/sdm_tiny.json) with the toy classes."""
    folder = tmp_path_factory.mktemp("sdm") / "model"
    config = json.loads((ROOT / "configs/models/sdm_tiny.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = SpadeUNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    SemanticDiffusionPipeline(unet, sdm_scheduler(), class_names=TOY_CLASSES).save_pretrained(folder)
    write_class_names(folder / "class_names.json", TOY_CLASSES, TOY_PALETTE)
    return folder


@pytest.fixture(scope="module")
def controlnet_model(tiny_sd_folder, tmp_path_factory):
    """An untrained ControlNet over the tiny base, with the run files train_controlnet_seg.py writes beside it."""
    folder = tmp_path_factory.mktemp("controlnet") / "model"
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_folder, subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(2))
    controlnet.save_pretrained(folder)
    write_class_names(folder / "class_names.json", TOY_CLASSES, TOY_PALETTE)
    config = {"pretrained_model_name_or_path": str(tiny_sd_folder), "resolution": 32}
    (folder / "training_config.json").write_text(json.dumps(config))
    return folder


# name: (module, model fixture, model flag, images-per-mask flag). Two images a mask, 2 steps, one mask a batch.
GENERATORS = {
    "sdm": (generate_spade_sdm, "sdm_model", "--checkpoint", "--num_samples_per_mask"),
    "controlnet": (generate_controlnet_seg, "controlnet_model", "--controlnet", "--num_images_per_mask"),
}


@pytest.fixture(params=sorted(GENERATORS))
def generator(request):
    """generate(masks_dir, save_dir, *extra): the generator's main() in this process, as its command line runs it."""
    module, model_fixture, model_flag, count_flag = GENERATORS[request.param]
    model = request.getfixturevalue(model_fixture)

    def generate(masks_dir, save_dir, *extra):
        argv = [model_flag, model, "--masks_dir", masks_dir, "--save_dir", save_dir, count_flag, "2",
                "--num_inference_steps", "2", "--batch_size", "2", "--seed", "7", *extra]  # fmt: skip
        module.main(module.parse_args([str(a) for a in argv]))

    return generate


def toy_masks(toy_data, folder, stems):
    """Toy label maps saved as ``<stem>.png``: the i-th stem gets the i-th toy mask."""
    folder.mkdir(exist_ok=True)
    sources = sorted((toy_data / "masks").iterdir())
    for source, stem in zip(sources, stems):
        shutil.copy(source, folder / f"{stem}.png")
    return folder


def metadata(save_dir):
    return [json.loads(line) for line in (save_dir / "metadata.jsonl").read_text().splitlines()]


def outputs_of(save_dir, stem):
    """The files of one mask: {relative path: (bytes, modification time)}."""
    paths = [*(save_dir / f"generated_images/sample_{stem}").iterdir(), save_dir / f"visualizations/sample_{stem}.png"]
    paths += [save_dir / folder / f"{stem}_{j:02d}.png" for folder in ("images", "masks") for j in (0, 1)]
    return {str(p.relative_to(save_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def test_an_added_mask_that_sorts_first_gets_its_own_outputs_and_moves_none(generator, toy_data, tmp_path, capsys):
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["b", "d"])
    save_dir = tmp_path / "out"
    generator(masks_dir, save_dir)
    first = {stem: outputs_of(save_dir, stem) for stem in ("b", "d")}
    assert sorted(first["b"]) == [
        "generated_images/sample_b/generated_00.png", "generated_images/sample_b/generated_01.png",
        "images/b_00.png", "images/b_01.png", "masks/b_00.png", "masks/b_01.png", "visualizations/sample_b.png",
    ]  # fmt: skip
    first_seeds = {(r["mask_stem"], r["image_index"]): r["seed"] for r in metadata(save_dir)}
    assert first_seeds == {(stem, j): derive_seed(7, stem, j) for stem in ("b", "d") for j in (0, 1)}

    # a: the label map of b under a new stem, which sorts before the others
    shutil.copy(masks_dir / "b.png", masks_dir / "a.png")
    generator(masks_dir, save_dir)
    assert "2 masks already" in capsys.readouterr().out
    for stem in ("b", "d"):
        assert outputs_of(save_dir, stem) == first[stem]  # same bytes, never rewritten
    assert sorted(p.name for p in (save_dir / "generated_images").iterdir()) == ["sample_a", "sample_b", "sample_d"]
    assert sorted(p.name for p in (save_dir / "visualizations").iterdir()) == [
        "sample_a.png",
        "sample_b.png",
        "sample_d.png",
    ]
    records = metadata(save_dir)
    assert [(r["mask_stem"], r["image_index"]) for r in records] == [(s, j) for s in "abd" for j in (0, 1)]
    assert [r["mask_source"] for r in records[::2]] == ["a.png", "b.png", "d.png"]
    assert [r["seed"] for r in records] == [derive_seed(7, s, j) for s in "abd" for j in (0, 1)]
    assert len({r["seed"] for r in records}) == 6
    assert {(r["mask_stem"], r["image_index"]): r["seed"] for r in records if r["mask_stem"] != "a"} == first_seeds
    # a and the old b are one mask with other seeds: different images
    assert (save_dir / "images/a_00.png").read_bytes() != first["b"]["images/b_00.png"][0]
    assert Image.open(save_dir / "grid.png").size[1] == 3 * 32  # one row per mask

    # evaluate.py reads the layout: 3 masks of 2 images, grouped by sample folder, each paired with its mask
    generated = evaluate.read_generated_set(save_dir, None)
    assert generated.layout == "mask-conditioned"
    assert {name: [s.source for s in group] for name, group in generated.groups().items()} == {
        f"generated_images/sample_{s}": [s, s] for s in "abd"
    }


def test_other_arguments_are_refused_and_overwrite_regenerates(generator, toy_data, tmp_path):
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["b", "d"])
    save_dir = tmp_path / "out"
    generator(masks_dir, save_dir)
    first = {stem: outputs_of(save_dir, stem) for stem in ("b", "d")}
    recorded = json.loads((save_dir / ARGS_FILE).read_text())
    assert (recorded["num_inference_steps"], recorded["seed"], recorded["fp16"]) == (2, 7, False)
    before = (save_dir / "metadata.jsonl").read_bytes()

    with pytest.raises(DatasetError) as refused:
        generator(masks_dir, save_dir, "--num_inference_steps", "3", "--guidance_scale", "2")
    message = str(refused.value)
    assert "--num_inference_steps: 2 there, 3 now" in message and "--guidance_scale:" in message
    assert "--seed" not in message and "--overwrite" in message and "new --save_dir" in message
    assert (save_dir / "metadata.jsonl").read_bytes() == before

    # --overwrite: every mask again with the new arguments
    shutil.copy(masks_dir / "b.png", masks_dir / "a.png")
    generator(masks_dir, save_dir, "--num_inference_steps", "3", "--overwrite")
    records = metadata(save_dir)
    assert [(r["mask_stem"], r["num_inference_steps"]) for r in records[::2]] == [("a", 3), ("b", 3), ("d", 3)]
    assert json.loads((save_dir / ARGS_FILE).read_text())["num_inference_steps"] == 3
    assert (save_dir / "images/b_00.png").read_bytes() != first["b"]["images/b_00.png"][0]

    # back to the first arguments, with a now sorting first: b and d come out as in the first run
    generator(masks_dir, save_dir, "--overwrite")
    for stem in ("b", "d"):
        again = outputs_of(save_dir, stem)
        assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in first[stem].items()}
    assert len(metadata(save_dir)) == 6


def test_masks_sharing_a_stem_are_refused_naming_both(generator, toy_data, tmp_path):
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["b", "c", "C"])
    shutil.copy(masks_dir / "b.png", masks_dir / "b.jpg")  # a PNG under another extension: decodable, same stem
    with pytest.raises(DatasetError) as refused:
        generator(masks_dir, tmp_path / "out")
    message = str(refused.value)
    assert "2 file name(s) used by more than one mask" in message
    assert "b.jpg and b.png" in message and "C.png and c.png" in message
    assert not (tmp_path / "out" / "metadata.jsonl").exists()


def test_a_save_dir_without_recorded_arguments_is_refused(tmp_path):
    recorded = {"checkpoint": "/models/a", "num_inference_steps": 2, "image_size": (32, 32)}
    check_save_dir(tmp_path / "new", recorded)  # nothing there yet

    old = tmp_path / "old"  # an earlier version's output: images, but no record of their arguments
    (old / "generated_images/sample_000001").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"holds generated images but no {ARGS_FILE}.*--overwrite"):
        check_save_dir(old, recorded)
    check_save_dir(old, recorded, overwrite=True)

    same = tmp_path / "same"
    same.mkdir()
    (same / ARGS_FILE).write_text(json.dumps(recorded))
    check_save_dir(same, recorded)  # tuples are read back as lists: still the same arguments
    with pytest.raises(DatasetError) as refused:
        check_save_dir(same, {**recorded, "image_size": [64, 64], "scheduler": "ddim"})
    assert "--image_size: [32, 32] there, [64, 64] now; --scheduler: (not recorded) there, " in str(refused.value)
