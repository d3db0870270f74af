"""The mask -> image generators' output layout: keyed by mask stem, resumable, refusing mixed arguments.

Both generators run in this process on untrained tiny models (random weights from a fixed seed): what is
checked is where every image goes, which seed draws it and what a re-run keeps, not what the images show.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, script_error
from diffusers import ControlNetModel, UNet2DConditionModel
from generator_checks import spy_on_schedulers
from PIL import Image

import evaluate
import generate_controlnet_seg
import generate_joint_image_mask_diffusion
import generate_spade_sdm
from segdiff.data import DatasetError, read_label_map, save_label_png, write_class_names
from segdiff.generation import ARGS_FILE, RECORDS_FOLDER, MaskFile, MaskSampleWriter, check_save_dir, read_captions
from segdiff.geometry import conditioning_channels_for
from segdiff.labels import resize_labels
from segdiff.models.spade_unet import SpadeUNetModel
from segdiff.pipelines.sdm import SemanticDiffusionPipeline, sdm_scheduler
from segdiff.processes import OneProcess
from segdiff.seeds import derive_seed
from segdiff.toy import TOY_CLASSES, TOY_PALETTE


def untrained_sdm(folder: Path, **config_overrides) -> Path:
    """An untrained pixel-space SDM pipeline folder (configs/models/sdm_tiny.json) with the toy classes."""
    config = json.loads((ROOT / "configs/models/sdm_tiny.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = SpadeUNetModel.from_config(
            {k: v for k, v in config.items() if not k.startswith("_")}, **config_overrides
        )
    SemanticDiffusionPipeline(unet, sdm_scheduler(), class_names=TOY_CLASSES).save_pretrained(folder)
    write_class_names(folder / "class_names.json", TOY_CLASSES, TOY_PALETTE)
    return folder


@pytest.fixture(scope="module")
def sdm_model(tmp_path_factory):
    return untrained_sdm(tmp_path_factory.mktemp("sdm") / "model")


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
    "sdm": (generate_spade_sdm, "sdm_model", "--model", "--num_images_per_mask"),
    "controlnet": (generate_controlnet_seg, "controlnet_model", "--model", "--num_images_per_mask"),
}


@pytest.fixture(params=sorted(GENERATORS))
def generator(request):
    """generate(masks, save_dir, *extra): the generator's main() in this process, as its command line runs it;
    ``masks`` is a folder (--masks_dir) or one file (--mask). ``generate.name``: which generator."""
    module, model_fixture, model_flag, count_flag = GENERATORS[request.param]
    model = request.getfixturevalue(model_fixture)

    def generate(masks, save_dir, *extra):
        source = "--mask" if Path(masks).is_file() else "--masks_dir"
        argv = [model_flag, model, source, masks, "--save_dir", save_dir, count_flag, "2",
                "--num_inference_steps", "2", "--batch_size", "2", "--seed", "7", *extra]  # fmt: skip
        module.main(module.parse_args([str(a) for a in argv]))

    generate.name = request.param
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
    assert "2 of 3 already done" in capsys.readouterr().out
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
    recorded = {"model": "/models/a", "num_inference_steps": 2, "resolution": (32, 32)}
    check_save_dir(tmp_path / "new", recorded)  # nothing there yet

    other = tmp_path / "other"  # another tool's output: images, but no record of their arguments
    (other / "images").mkdir(parents=True)
    (other / "images" / "a.png").write_bytes(b"png")
    with pytest.raises(DatasetError, match=f"holds generated files but no {ARGS_FILE}.*--overwrite"):
        check_save_dir(other, recorded)
    check_save_dir(other, recorded, overwrite=True)

    stopped = tmp_path / "stopped"  # a run that recorded its arguments and stopped before its first sample
    (stopped / "images").mkdir(parents=True)
    (stopped / ARGS_FILE).write_text(json.dumps({**recorded, "num_inference_steps": 0}))
    check_save_dir(stopped, recorded)  # no sample behind the record: it binds nothing

    same = tmp_path / "same"
    same.mkdir()
    (same / ARGS_FILE).write_text(json.dumps(recorded))
    (same / "metadata.jsonl").write_text("")
    check_save_dir(same, recorded)  # tuples are read back as lists: still the same arguments
    with pytest.raises(DatasetError) as refused:
        check_save_dir(same, {**recorded, "resolution": [64, 64], "scheduler": "ddim"})
    assert "--resolution: [32, 32] there, [64, 64] now; --scheduler: (not recorded) there, " in str(refused.value)


# ------------------------------------------------------------------------------------------------
# One command line; single masks, exact sizes, captions, eta, batching
# ------------------------------------------------------------------------------------------------


def usage_error(module, argv, capsys) -> str:
    """parse_args refusing ``argv`` (argparse's exit status 2): its message."""
    with pytest.raises(SystemExit) as stopped:
        module.parse_args([str(a) for a in argv])
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_the_generators_share_one_vocabulary(capsys):
    mask_conditioned = ["--masks_dir", "m", "--save_dir", "out"]
    cases = [  # module, the spellings of the reference documents' commands, the arguments it needs besides
        (generate_spade_sdm, [], mask_conditioned),
        (generate_controlnet_seg, [], mask_conditioned),
        (generate_joint_image_mask_diffusion, ["--checkpoint", "--image_size"], ["--save_dir", "out"]),
    ]
    for module, reference_spellings, needed in cases:
        sizes = {
            (): None,
            ("--resolution", "48"): (48, 48),
            ("--resolution", "16,32"): (16, 32),
            ("--height", "16", "--width", "32"): (16, 32),
        }
        if reference_spellings:  # the joint generator runs the command of the reference document 000 as printed
            assert module.parse_args(["--checkpoint", "run", *needed]).model == "run"
            sizes["--image_size", "48"] = (48, 48)
        for retired in {"--checkpoint", "--controlnet", "--image_size", "--num_samples_per_mask"} - {
            *reference_spellings
        }:
            assert "unrecognized arguments" in usage_error(module, ["--model", "m", *needed, retired, "1"], capsys)
        for argv, size in sizes.items():
            assert module.parse_args(["--model", "m", *needed, *argv]).resolution == size, (module.__name__, argv)
        ddim = module.parse_args(["--model", "m", *needed, "--scheduler", "ddim", "--eta", "1"])
        assert ddim.eta == 1.0
        refusals = {
            ("--height", "16"): "--height and --width go together",
            ("--resolution", "16", "--height", "16", "--width", "8"): "give the size once",
            ("--resolution", "16,a"): "'16,a' is not a size: give N, or HEIGHT,WIDTH",
            ("--scheduler", "dpmsolver", "--eta", "1"): "--eta is for schedulers with DDIM's eta (ddim); --scheduler "
            "dpmsolver has none. Fix: pass --scheduler ddim",
            ("--scheduler", "ddim", "--eta", "2"): "--eta must be in [0, 1]",
        }
        for argv, message in refusals.items():
            assert message in usage_error(module, ["--model", "m", *needed, *argv], capsys), (module.__name__, argv)

    for module in (generate_spade_sdm, generate_controlnet_seg):
        assert (
            module.parse_args(["--model", "m", *mask_conditioned, "--num_images_per_mask", "3"]).num_images_per_mask
            == 3
        )
        assert module.parse_args(["--model", "m", "--mask", "a.png", "--save_dir", "o"]).mask == "a.png"
        both = ["--model", "m", "--mask", "a.png", *mask_conditioned]
        assert "argument --masks_dir: not allowed with argument --mask" in usage_error(module, both, capsys)
        neither = ["--model", "m", "--save_dir", "o"]
        assert "one of the arguments --masks_dir --mask is required" in usage_error(module, neither, capsys)
    both = ["--model", "m", *mask_conditioned, "--prompt", "p", "--captions", "c.jsonl"]
    assert "--captions: not allowed with argument --prompt" in usage_error(generate_controlnet_seg, both, capsys)
    sdm = ["--model", "m", *mask_conditioned]
    assert generate_spade_sdm.parse_args(sdm).num_images_per_mask == 5
    assert generate_spade_sdm.parse_args([*sdm, "--submission_dir", "s"]).num_images_per_mask == 1
    both = [*sdm, "--style_images", "r.png", "--style_map", "m.json"]
    assert "--style_map: not allowed with argument --style_images" in usage_error(generate_spade_sdm, both, capsys)


def files_of(save_dir: Path) -> dict[str, bytes]:
    """Every file a generator wrote, but generation_config.json (its command line as typed), by relative path."""
    return {
        str(p.relative_to(save_dir)): p.read_bytes()
        for p in sorted(save_dir.rglob("*"))
        if p.is_file() and p.name != "generation_config.json"
    }


def test_a_single_mask_at_an_exact_size_is_written_as_a_folder_of_that_mask(generator, toy_data, tmp_path):
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["m"])
    generator(masks_dir / "m.png", tmp_path / "one", "--resolution", "16,32")  # height 16, width 32
    one = tmp_path / "one"
    expected_label = resize_labels(read_label_map(masks_dir / "m.png"), 16, 32)
    for j in (0, 1):
        assert Image.open(one / f"images/m_{j:02d}.png").size == (32, 16)
        np.testing.assert_array_equal(read_label_map(one / f"masks/m_{j:02d}.png"), expected_label)
    recorded = json.loads((one / ARGS_FILE).read_text())
    assert recorded["resolution"] == [16, 32]

    # the same size as --height/--width, from a folder holding that one mask: the very same files
    generator(masks_dir, tmp_path / "folder", "--height", "16", "--width", "32")
    assert files_of(one) == files_of(tmp_path / "folder")
    assert not (one / RECORDS_FOLDER).exists()  # merged into metadata.jsonl


def test_eta_reaches_every_ddim_step_and_is_recorded(generator, toy_data, tmp_path, monkeypatch):
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["m"])
    seen = spy_on_schedulers(monkeypatch)
    generator(masks_dir, tmp_path / "eta1", "--scheduler", "ddim", "--eta", "1")
    assert seen["eta"] == [1.0, 1.0]  # both steps of the one batch (2 images of one mask)
    assert json.loads((tmp_path / "eta1" / ARGS_FILE).read_text())["eta"] == 1.0
    assert [r["eta"] for r in metadata(tmp_path / "eta1")] == [1.0, 1.0]

    seen["eta"].clear()
    generator(masks_dir, tmp_path / "eta0", "--scheduler", "ddim")
    assert seen["eta"] == [0.0, 0.0]  # DDIM's default, passed explicitly (as diffusers' pipelines do)
    assert json.loads((tmp_path / "eta0" / ARGS_FILE).read_text())["eta"] is None  # not given: DDIM's default
    # the fresh noise changed the image (2 steps: only a little, the last step's noise level being tiny)
    assert (tmp_path / "eta1/images/m_00.png").read_bytes() != (tmp_path / "eta0/images/m_00.png").read_bytes()


def test_guidance_is_one_batched_forward_over_several_masks(generator, toy_data, tmp_path, monkeypatch):
    """Two masks of one image each, --batch_size 2, guidance on: each step is one UNet forward of 2 x 2 rows."""
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["b", "d"])
    unet_class = SpadeUNetModel if generator.name == "sdm" else UNet2DConditionModel
    batch_sizes = []
    forward = unet_class.forward

    def counting_forward(self, sample, *args, **kwargs):
        batch_sizes.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(unet_class, "forward", counting_forward)
    generator(masks_dir, tmp_path / "out", "--num_images_per_mask", "1", "--guidance_scale", "2")
    assert batch_sizes == [4, 4]  # 2 steps; (b, d) x (conditional, unconditional)
    assert len(metadata(tmp_path / "out")) == 2


def test_captions_prompt_their_masks_and_the_others_keep_the_class_prompt(controlnet_model, toy_data, tmp_path):
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["b", "d"])
    captions = tmp_path / "captions.jsonl"
    lines = [{"file_name": "masks/b.png", "text": "a red square on grey"}, {"stem": "d", "caption": ""}]
    captions.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def generate(save_dir, *extra):
        argv = ["--model", controlnet_model, "--masks_dir", masks_dir, "--save_dir", save_dir,
                "--num_images_per_mask", "1", "--num_inference_steps", "2", "--batch_size", "1", *extra]  # fmt: skip
        generate_controlnet_seg.main(generate_controlnet_seg.parse_args([str(a) for a in argv]))

    generate(tmp_path / "captioned", "--captions", captions)
    generate(tmp_path / "class_prompts")
    captioned, class_prompts = metadata(tmp_path / "captioned"), metadata(tmp_path / "class_prompts")
    assert captioned[0]["prompt"] == "a red square on grey" != class_prompts[0]["prompt"]
    assert captioned[1]["prompt"] == class_prompts[1]["prompt"]  # an empty caption: the class prompt
    assert json.loads((tmp_path / "captioned" / ARGS_FILE).read_text())["captions"] == str(captions.resolve())
    # the prompt reached the model: b's image changed, d's did not
    image = {run: (tmp_path / run / "images/b_00.png").read_bytes() for run in ("captioned", "class_prompts")}
    assert image["captioned"] != image["class_prompts"]
    d_images = [(tmp_path / run / "images/d_00.png").read_bytes() for run in ("captioned", "class_prompts")]
    assert d_images[0] == d_images[1]


def test_bad_captions_files_name_the_file_and_line(controlnet_model, toy_data, tmp_path, monkeypatch):
    def problem(name, text):
        (tmp_path / name).write_text(text)
        with pytest.raises(DatasetError) as refused:
            read_captions(tmp_path / name, ["b", "d"])
        return str(refused.value)

    assert read_captions(_write(tmp_path / "ok.csv", "stem,text\nb,hello\nd,\n"), ["b", "d"]) == {"b": "hello"}
    assert f"--captions {tmp_path / 'a.jsonl'} line 2 is not JSON" in problem(
        "a.jsonl", '{"stem": "b", "text": "x"}\n{oops\n'
    )
    assert "line 1 is not an object" in problem("b.jsonl", '["b", "x"]\n')
    assert "line 1 names no mask or has no text" in problem("c.jsonl", '{"text": "x"}\n')
    twice = '{"stem": "b", "text": "x"}\n\n{"stem": "b", "text": "y"}\n'
    assert "line 3: a second caption for 'b' (the first is on line 1)" in problem("d.jsonl", twice)
    assert "line 1: the header must name the columns stem" in problem("e.csv", "name,text\nb,x\n")
    assert "expected a .jsonl or .csv file, got .txt" in problem("f.txt", "b x\n")
    # in the script: a caption for a stem that is not among the masks, before any model runs
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["b", "d"])
    _write(tmp_path / "typo.csv", "stem,text\nb,x\nbb,y\n")
    message = script_error(
        monkeypatch, "generate_controlnet_seg.py", "--model", controlnet_model, "--masks_dir", masks_dir,
        "--save_dir", tmp_path / "out", "--captions", tmp_path / "typo.csv",
    )  # fmt: skip
    assert message == (
        f"error: --captions {tmp_path / 'typo.csv'} line 3: no mask has the stem 'bb'. Fix: correct the name, or "
        "drop the line (captions pair with the masks by file stem)."
    )
    assert not (tmp_path / "out").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------


def test_processes_split_the_missing_masks_and_the_main_one_merges_their_records(tmp_path):
    """MaskSampleWriter as two processes use it (the joint generator splits its samples with the same helpers)."""
    masks = [MaskFile(tmp_path / f"{stem}.png") for stem in "abcde"]
    label = np.zeros((4, 4), dtype=np.int64)

    def writer(index):
        state = OneProcess(process_index=index, num_processes=2, is_main_process=index == 0)
        return MaskSampleWriter(tmp_path / "out", TOY_CLASSES, TOY_PALETTE, 255, 1, {"seed": 0}, state=state)

    main, other = writer(0), writer(1)
    shares = main.todo(masks), other.todo(masks)
    assert [[mask.stem for mask in share] for share in shares] == [["a", "c", "e"], ["b", "d"]]
    for process, share in ((other, shares[1]), (main, shares[0])):  # the other process is done first
        for mask in share:
            image = Image.new("RGB", (4, 4), (ord(mask.stem), 0, 0))
            process.write(mask, label, [image], [{"seed": derive_seed(0, mask.stem, 0)}])
    assert other.finish() is None and not (tmp_path / "out/metadata.jsonl").exists()  # only the main one merges
    assert main.finish() == 5
    records = metadata(tmp_path / "out")
    assert [(r["mask_stem"], r["seed"]) for r in records] == [(stem, derive_seed(0, stem, 0)) for stem in "abcde"]
    assert Image.open(tmp_path / "out/images/b_00.png").getpixel((0, 0)) == (ord("b"), 0, 0)
    assert not (tmp_path / "out" / RECORDS_FOLDER).exists()
    # a re-run: only the new mask is missing, and it falls to process 0
    more = [*masks, MaskFile(tmp_path / "f.png")]
    assert [mask.stem for mask in writer(0).todo(more)] == ["f"] and writer(1).todo(more) == []


def test_two_processes_write_what_one_process_writes_and_resume(sdm_model, toy_data, tmp_path):
    masks_dir = toy_masks(toy_data, tmp_path / "masks", ["a", "b", "c"])
    done_first = toy_masks(toy_data, tmp_path / "first", ["a"])  # a --save_dir where mask a is already done
    # DDIM with eta 1: every step draws fresh noise too, from each image's own generator
    common = ["--num_images_per_mask", "1", "--num_inference_steps", "2", "--batch_size", "1", "--seed", "5",
              "--scheduler", "ddim", "--eta", "1"]  # fmt: skip

    def one_process(masks, save_dir):
        argv = ["--model", sdm_model, "--masks_dir", masks, "--save_dir", save_dir, *common]
        generate_spade_sdm.main(generate_spade_sdm.parse_args([str(a) for a in argv]))

    one_process(masks_dir, tmp_path / "one")
    one_process(done_first, tmp_path / "two")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "generate_spade_sdm.py", "--model", sdm_model, "--masks_dir", masks_dir, "--save_dir", tmp_path / "two",
               *common]  # fmt: skip
    result = subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # one main process (two would each have generated everything and said so)
    assert result.stdout.count("1 of 3 already done") == 1 and result.stdout.count("Wrote 3 images") == 1
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")  # every PNG, metadata.jsonl, the arguments


# ------------------------------------------------------------------------------------------------
# Competition submissions (generate_spade_sdm.py --style_map --submission_dir)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdm_style_model(tmp_path_factory):
    return untrained_sdm(tmp_path_factory.mktemp("sdm_style") / "model", style_channels=8, style_resolution=16)


def test_submission_is_one_jpg_per_label_at_its_size_with_its_own_reference(sdm_style_model, toy_data, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    toy = read_label_map(sorted((toy_data / "masks").iterdir())[0])
    save_label_png(resize_labels(toy, 24, 40), labels / "wide.png")  # 40 x 24: not the 32 x 32 of the model
    save_label_png(toy, labels / "square.png")
    (tmp_path / "refs").mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "refs/red.png")
    Image.new("RGB", (20, 20), (30, 30, 200)).save(tmp_path / "blue.jpg")
    (tmp_path / "maps").mkdir()
    style_map = tmp_path / "maps/style_map.json"  # relative to its folder, or absolute
    style_map.write_text(json.dumps({"wide": "../refs/red.png", "square": str(tmp_path / "blue.jpg"), "x": "y.png"}))

    argv = ["--model", sdm_style_model, "--masks_dir", labels, "--save_dir", tmp_path / "out", "--style_map",
            style_map, "--submission_dir", tmp_path / "submission", "--num_inference_steps", "2"]  # fmt: skip
    generate_spade_sdm.main(generate_spade_sdm.parse_args([str(a) for a in argv]))
    submission = tmp_path / "submission"
    assert sorted(p.name for p in submission.iterdir()) == ["square.jpg", "wide.jpg"]

    def block_means(image):  # what JPEG keeps of the untrained model's pixel noise: each 8 x 8 block's colour
        return np.asarray(image.resize((image.width // 8, image.height // 8), Image.Resampling.BOX), dtype=float)

    for stem, size in (("wide", (40, 24)), ("square", (32, 32))):
        jpg = Image.open(submission / f"{stem}.jpg")
        assert jpg.format == "JPEG" and jpg.size == size
        generated = Image.open(tmp_path / f"out/generated_images/sample_{stem}/generated_00.png").resize(size)
        assert np.abs(block_means(jpg) - block_means(generated)).mean() < 5  # the other label's image: about 18
    records = metadata(tmp_path / "out")  # one image per label by default
    assert [(r["mask_stem"], Path(r["style_image"]).resolve()) for r in records] == [
        ("square", tmp_path / "blue.jpg"),
        ("wide", (tmp_path / "refs/red.png").resolve()),
    ]
    assert json.loads((tmp_path / "out" / ARGS_FILE).read_text())["style_map"] == str(style_map.resolve())

    # The landscape task's shape: generated at a rectangle (here 16 x 32, as 384 x 512), submitted at each label's size.
    argv = ["--model", sdm_style_model, "--masks_dir", labels, "--save_dir", tmp_path / "wide_out", "--style_map",
            style_map, "--submission_dir", tmp_path / "wide_submission", "--num_inference_steps", "2",
            "--resolution", "16,32"]  # fmt: skip
    generate_spade_sdm.main(generate_spade_sdm.parse_args([str(a) for a in argv]))
    for stem, size in (("wide", (40, 24)), ("square", (32, 32))):
        assert Image.open(tmp_path / f"wide_out/generated_images/sample_{stem}/generated_00.png").size == (32, 16)
        assert Image.open(tmp_path / f"wide_submission/{stem}.jpg").size == size


def test_submission_errors_name_the_label_the_file_and_the_flag(
    sdm_style_model, sdm_model, toy_data, tmp_path, monkeypatch
):
    labels = toy_masks(toy_data, tmp_path / "labels", ["a", "b"])
    Image.new("RGB", (8, 8)).save(tmp_path / "ref.png")

    def error(model, mapping):
        (tmp_path / "map.json").write_text(json.dumps(mapping))
        return script_error(
            monkeypatch, "generate_spade_sdm.py", "--model", model, "--masks_dir", labels, "--save_dir",
            tmp_path / "out", "--style_map", tmp_path / "map.json", "--submission_dir", tmp_path / "sub",
        )  # fmt: skip

    assert f"--style_map {tmp_path / 'map.json'} names no reference for 1 label(s): b. Fix: add an entry" in error(
        sdm_style_model, {"a": "ref.png"}
    )
    message = error(sdm_style_model, {"a": "ref.png", "b": "gone.png"})
    assert f"names 1 reference image(s) that do not exist (b: {tmp_path / 'gone.png'})" in message
    message = error(sdm_model, {"a": "ref.png", "b": "ref.png"})
    assert "--style_map was given, but the model in" in message and "has no style encoder" in message
    assert not (tmp_path / "sub").exists() and not (tmp_path / "out").exists()
