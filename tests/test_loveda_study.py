"""scripts/loveda_synthetic.py --quick: the LoveDA synthetic-data study on CPU, end to end, then again.

The data is a small LoveDA tree (<root>/{Train,Val}/{Urban,Rural}/{images_png,masks_png}/*.png, raw ids 0..7 with
0 = no-data) with a long tail: background everywhere, buildings in urban tiles, farmland in rural ones, forest in
some, water in a few tiles, barren land in one. The models are tiny and barely trained: the test checks the plumbing (every stage
ran on the same real pairs, the domains reached the ControlNet's prompts and the synthetic pairs, the report holds
what evaluate.py measured, rare classes first) and that a second run redoes nothing.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SCRIPT_ENV
from PIL import Image

from segdiff.labels import LOVEDA_CLASSES, LOVEDA_PALETTE

SIZE = 48
TILES_PER_SCENE = {"Train": 6, "Val": 2}  # 12 training tiles, of which the study takes 8
STAGES = ("base", "layout", "controlnet", "synthetic", "evaluate", "report")
ARMS = ("real_only", "real_plus_oversampling", "real_plus_synthetic", "real_plus_synthetic_plus_oversampling")


def loveda_tile(index: int, scene: str) -> np.ndarray:
    """Raw LoveDA ids (1 + class, 0 = no-data): a long tail, background > building or farmland > road > forest >
    water > barren."""
    raw = np.full((SIZE, SIZE), 1, dtype=np.uint8)  # background
    if scene == "Urban":
        raw[4:20, 4 + index % 3 : 24 + index % 3] = 2  # building
    else:
        raw[24:44, 8:40] = 7  # agriculture
        raw[2:12, 2:12] = 6 if index % 2 else 1  # forest, in half the rural tiles
    raw[:, 28 + index % 4 : 32 + index % 4] = 3  # road
    if index % 3 == 0:
        raw[40:46, 2:14] = 4  # water, in a third of the tiles
    if index == 1 and scene == "Rural":
        raw[2:5, 40:44] = 5  # barren, in one tile
    raw[-1, :] = 0  # a row of no-data
    return raw


def make_loveda_study_data(root: Path) -> Path:
    """Images painted in the class colours, with noise, beside their raw masks."""
    rng = np.random.default_rng(0)
    colours = np.array([(0, 0, 0), *LOVEDA_PALETTE], dtype=np.int16)  # indexed by raw id
    for split, count in TILES_PER_SCENE.items():
        for scene in ("Urban", "Rural"):
            for index in range(count):
                raw = loveda_tile(index, scene)
                stem = f"{split}{scene}{index}"
                image = np.clip(colours[raw] + rng.integers(-20, 21, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                for folder, picture in (("images_png", Image.fromarray(image)), ("masks_png", Image.fromarray(raw))):
                    (root / split / scene / folder).mkdir(parents=True, exist_ok=True)
                    picture.save(root / split / scene / folder / f"{stem}.png")
    return root


@pytest.fixture(scope="module")
def driver():
    """The driver's module, for its pieces (it imports nothing but the standard library and segdiff's light
    helpers at the top)."""
    spec = importlib.util.spec_from_file_location("loveda_synthetic", ROOT / "scripts" / "loveda_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_driver(*args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "loveda_synthetic.py"), *map(str, args)],
        cwd=ROOT,
        env=SCRIPT_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def modification_times(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


def read_json(path: Path):
    return json.loads(path.read_text())


def test_quick_study_runs_every_stage_then_skips_them_all(tmp_path):
    data, work = make_loveda_study_data(tmp_path / "LoveDA"), tmp_path / "work"
    command = ("--quick", "--work_dir", work, "--data_root", data)
    first = run_driver(*command)
    assert [stage for stage in STAGES if f"[{stage}] done: skipped" in first] == []

    # The same 8 of the 12 real training pairs for every model: layout model, ControlNet, every arm's segmenter.
    metrics = read_json(work / "evaluation" / "metrics.json")
    down = metrics["downstream"]
    seen = sorted(down["train_samples"])
    assert len(seen) == 8
    for model in ("layout", "controlnet"):
        config = read_json(work / model / "training_config.json")
        assert sorted(config["train_samples"]) == seen and config["max_train_samples"] == 8
    assert read_json(work / "layout" / "class_prior.json")["domains"] == ["Urban", "Rural"]
    assert read_json(work / "controlnet" / "training_config.json")["prompt_template"] == (
        "an {domain} aerial image of {classes}"
    )

    # The synthetic pairs: half urban, half rural, each rendered with its scene in the prompt.
    records = [json.loads(line) for line in (work / "synthetic" / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 8 and sorted({r["domain"] for r in records}) == ["Rural", "Urban"]
    assert (work / "synthetic" / "ratio_report.json").is_file()

    # Evaluation: the arms over 2 seeds on the 4 Val tiles, a SegFormer, no generative metrics.
    assert (down["seeds"], down["model"], down["num_real_val"], down["num_synthetic"]) == ([0, 1], "segformer", 4, 8)
    assert "fid" not in metrics and "lpips_diversity" not in metrics

    # The report: built from metrics.json, every arm and class with its seeds, rarest class first.
    report = read_json(work / "report.json")
    assert list(report["arms"]) == list(ARMS)
    pixels = down["train_pixels_per_class"]
    order = [row["class"] for row in report["classes"]]
    assert sorted(order) == sorted(LOVEDA_CLASSES)
    assert [pixels[name] for name in order] == sorted(pixels.values())
    assert order[-1] == "background" and pixels["agriculture"] > 0  # LoveDA's raw ids read as classes (7 -> 6)
    for row in report["classes"]:
        for arm in ARMS:
            assert row["iou"][arm] == down["arms"][arm]["per_class_iou"][row["class"]]
            assert len(row["iou"][arm]["per_seed"]) == 2
        assert row["synthetic_minus_oversampling"] == down["synthetic_vs_oversampling"]["per_class_iou"][row["class"]]
        assert row["render_iou"] == down["render_fidelity"]["per_class_iou"][row["class"]]
        reader = down["arms"]["real_only"]["per_class_iou"][row["class"]]["per_seed"][0]  # the reader: seed 0's
        assert row["reader_real_val_iou"] == reader
    assert report["classes_made_worse"] == down["classes_made_worse"]
    # The layout model and the ControlNet saw the segmenters' 8 real pairs and no validation pair (evaluate.py
    # checked it from their training_config.json).
    real_pairs = report["real_pairs"]
    assert real_pairs["max_train_samples"] == 8 and real_pairs["segmenters"] == 8
    assert sorted(real_pairs["generators"]) == ["layout_model", "renderer"]
    for seen in real_pairs["generators"].values():
        assert (seen["train_samples"], seen["not_among_segmenters"], seen["validation_pairs_seen"]) == (8, 0, 0)
    markdown = (work / "report.md").read_text()
    table = [line.split(" | ")[0].lstrip("| ") for line in markdown.splitlines() if "%) |" in line]
    assert [name.removesuffix(" (worse)") for name in table] == order
    for model in ("layout model (--layout_model)", "ControlNet (--renderer)"):
        assert f"| {model} | 8 | 0 | 0 |" in markdown

    # Again: every stage is skipped and nothing under --work_dir is written.
    before = modification_times(work)
    second = run_driver(*command)
    assert [stage for stage in STAGES if f"[{stage}] done: skipped" in second] == list(STAGES)
    assert modification_times(work) == before


def test_full_settings_and_their_commands(driver, tmp_path):
    """The defaults are the study's GPU settings; every model gets the same N; a SD base is required."""
    args = driver.parse_args(["--work_dir", "w", "--data_root", str(tmp_path), "--pretrained_model_name_or_path", "sd"])
    assert (args.max_train_samples, args.layout_resolution, args.controlnet_resolution) == (512, 128, 512)
    assert Path(args.layout_config).name == "layout_128.json" and args.downstream_seeds == [0, 1, 2, 3, 4]
    layout = driver.layout_command(args, Path("w/layout"))
    controlnet = driver.controlnet_command(args, "sd", Path("w/controlnet"))
    evaluate = driver.evaluate_command(args, Path("w/synthetic"), Path("w/evaluation"))
    for command in (layout, controlnet, evaluate):
        assert command[command.index("--max_train_samples") + 1] == "512"
    assert "--condition_on_domain" in layout
    assert controlnet[controlnet.index("--prompt_template") + 1] == "an {domain} aerial image of {classes}"
    assert evaluate[evaluate.index("--downstream_model") + 1] == "segformer"
    assert evaluate[evaluate.index("--metrics") + 1] == "" and "--downstream_pretrained" not in evaluate
    assert driver.launcher(driver.parse_args(["--work_dir", "w", "--data_root", str(tmp_path), "--quick"])) == [
        sys.executable
    ]


def test_bad_flags_stop_at_once_naming_the_fix(driver, tmp_path, capsys):
    with pytest.raises(SystemExit):
        driver.parse_args(["--work_dir", "w", "--data_root", str(tmp_path)])
    assert "the ControlNet needs --pretrained_model_name_or_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        driver.parse_args(["--work_dir", "w", "--data_root", str(tmp_path / "nowhere"), "--quick"])
    assert "does not exist. Fix: point it at the LoveDA root" in capsys.readouterr().err


def test_a_weights_file_cut_short_is_not_a_finished_controlnet(driver, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"a": np.zeros((4, 4), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}, str(path))
    assert driver.safetensors_complete(path)
    path.write_bytes(path.read_bytes()[:-4])
    assert not driver.safetensors_complete(path)
    assert not driver.safetensors_complete(tmp_path / "missing.safetensors")
