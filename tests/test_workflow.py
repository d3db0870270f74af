"""scripts/sidewalk_sdm.py --quick: the whole sidewalk reference workflow (001) on CPU, end to end, then again.

The source is a tiny local copy of segments/sidewalk-semantic stored like the hub repo (data/train-*.parquet +
id2label.json), as tests/test_prepare_sidewalk.py builds it: 8 rows, of which --val_fraction 0.25 puts 2 in the
val split. FID/KID and LPIPS get stand-in weights made here (a random TorchScript extractor and random AlexNet
features, as in tests/test_evaluate.py), so nothing is downloaded; their values mean nothing, the plumbing is tested.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SCRIPT_ENV, write_stand_in_weights
from PIL import Image

from segdiff.labels import SIDEWALK_CLASSES, SIDEWALK_PALETTE

NUM_ROWS, HEIGHT, WIDTH = 8, 20, 30
STAGES = ("prepare", "train", "finetune", "generate-val", "evaluate-val", "report")


@pytest.fixture(scope="module")
def driver():
    """The driver's module, for its pieces (it imports nothing but the standard library at the top)."""
    spec = importlib.util.spec_from_file_location("sidewalk_sdm", ROOT / "scripts" / "sidewalk_sdm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sidewalk_copy(tmp_path_factory):
    """A hub-repo-like parquet copy: label maps of 5x5 blocks of ids 0..34, images painted in their class colours."""
    import datasets

    rng = np.random.default_rng(0)
    palette = np.array(SIDEWALK_PALETTE, dtype=np.uint8)
    labels = [
        np.kron(rng.integers(0, len(SIDEWALK_CLASSES), (HEIGHT // 5, WIDTH // 5)), np.ones((5, 5))).astype(np.uint8)
        for _ in range(NUM_ROWS)
    ]
    features = datasets.Features({"pixel_values": datasets.Image(), "label": datasets.Image()})
    dataset = datasets.Dataset.from_dict(
        {
            "pixel_values": [Image.fromarray(palette[label]) for label in labels],
            "label": list(map(Image.fromarray, labels)),
        },
        features=features,
    )
    hub = tmp_path_factory.mktemp("sidewalk_source") / "sidewalk-semantic"
    (hub / "data").mkdir(parents=True)
    dataset.to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    (hub / "id2label.json").write_text(json.dumps(dict(enumerate(SIDEWALK_CLASSES))))
    return hub


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory):
    return write_stand_in_weights(tmp_path_factory.mktemp("weights"))


def run_driver(*args, torch_home):
    """The driver as a user runs it; TORCH_HOME holds no weights, so only the stand-ins passed in are found."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sidewalk_sdm.py"), *map(str, args)],
        cwd=ROOT,
        env={**SCRIPT_ENV, "HF_DATASETS_OFFLINE": "1", "TORCH_HOME": str(torch_home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def modification_times(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


def test_quick_workflow_runs_every_stage_then_skips_them_all(sidewalk_copy, stand_in_weights, tmp_path):
    work = tmp_path / "work"
    command = (
        "--quick", "--work_dir", work, "--data_dir", sidewalk_copy, "--val_fraction", 0.25,
        "--feature_extractor_torchscript", stand_in_weights.extractor,
        "--lpips_weights", stand_in_weights.alexnet,
    )  # fmt: skip
    first = run_driver(*command, torch_home=tmp_path / "torch")
    assert [stage for stage in STAGES if f"[{stage}] done: skipped" in first] == []

    # Generation and FID used the val split: its 2 masks, 2 images each, against its 2 real images.
    val = json.loads((work / "data" / "dataset_info.json").read_text())["splits"]["val"]
    assert len(val) == 2
    assert sorted(path.stem for path in (work / "val" / "masks").iterdir()) == sorted(val)
    records = [json.loads(line) for line in (work / "val" / "generated" / "metadata.jsonl").read_text().splitlines()]
    assert sorted((r["mask_stem"], r["image_index"]) for r in records) == [(s, j) for s in sorted(val) for j in (0, 1)]
    metrics = json.loads((work / "val" / "evaluation" / "metrics.json").read_text())
    assert (metrics["num_real_images"], metrics["num_generated_images"], metrics["num_masks"]) == (2, 4, 2)

    # The fine-tune is the reference's: from the trained model, label maps dropped 20% of the time, lr 2e-5.
    finetune = json.loads((work / "sdm-cfg" / "training_config.json").read_text())
    assert (finetune["init_from"], finetune["drop_rate"], finetune["learning_rate"]) == (str(work / "sdm"), 0.2, 2e-5)
    assert finetune["max_train_steps"] == 2 and (work / "sdm-cfg" / "checkpoint-2").is_dir()

    # The report: each number from metrics.json next to its target, passed exactly when it meets it.
    report = json.loads((work / "val" / "report.json").read_text())
    rows = {row["metric"]: row for row in report["targets"]}
    assert {key: rows[key]["target"] for key in rows} == {"fid": "< 30", "lpips_diversity": "> 0.3", "miou": "> 0.6"}
    assert [rows[key]["value"] for key in rows] == [metrics["fid"], metrics["lpips_diversity"], metrics["miou"]]
    meets = [metrics["fid"] < 30, metrics["lpips_diversity"] > 0.3, metrics["miou"] > 0.6]
    assert [rows[key]["passed"] for key in rows] == meets
    assert report["kid"] == {"mean": metrics["kid_mean"], "std": metrics["kid_std"]}
    small_sample, non_standard, palette = report["warnings"]
    assert small_sample.startswith("FID from 4 generated and 2 real images: fewer than 2048")
    extractor = stand_in_weights.extractor
    assert non_standard.startswith(f"FID/KID come from a non-standard feature extractor (TorchScript {extractor} (32")
    assert palette.startswith("mIoU from the palette segmenter")
    markdown = (work / "val" / "report.md").read_text()
    assert f"| FID | {metrics['fid']:.4f} | < 30 | {'PASS' if rows['fid']['passed'] else 'FAIL'} |" in markdown
    assert f"| KID | {metrics['kid_mean']:.5f} +- {metrics['kid_std']:.5f} |" in markdown
    assert small_sample in first and small_sample in markdown

    # Again: every stage is skipped and nothing under --work_dir is written.
    before = modification_times(work)
    second = run_driver(*command, torch_home=tmp_path / "torch")
    assert [stage for stage in STAGES if f"[{stage}] done: skipped" in second] == list(STAGES)
    assert modification_times(work) == before


def test_a_finished_stage_is_redone_only_when_it_asks_for_it_and_its_command_changed(driver, tmp_path, capsys):
    """run_stage with a stand-in launcher (python -c ...: the script path and flags become its ignored argv)."""
    marker = tmp_path / "ran"
    start = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    driver.run_stage(tmp_path, "evaluate-val", start, ["evaluate.py", "--lpips_weights", "a.pth"], done=False)
    assert marker.read_text() == "x"
    recorded = json.loads((tmp_path / "stages" / "evaluate-val.json").read_text())
    assert recorded == {"command": ["evaluate.py", "--lpips_weights", "a.pth"]}

    driver.run_stage(tmp_path, "evaluate-val", start, ["evaluate.py", "--lpips_weights", "a.pth"], True, True)
    driver.run_stage(tmp_path, "train", start, ["evaluate.py"], done=True)  # no record: done as found
    driver.run_stage(tmp_path, "evaluate-val", start, ["evaluate.py"], done=True)  # changed, but not to be redone
    assert marker.read_text() == "x"
    assert "[evaluate-val] note: it was run with another command (evaluate.py --lpips_weights a.pth)" in (
        capsys.readouterr().out
    )
    driver.run_stage(tmp_path, "evaluate-val", start, ["evaluate.py"], done=True, redo_when_changed=True)
    assert marker.read_text() == "xx"
    assert json.loads((tmp_path / "stages" / "evaluate-val.json").read_text()) == {"command": ["evaluate.py"]}

    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(SystemExit, match="the train stage failed \\(exit code 3\\)"):
        driver.run_stage(tmp_path, "train", failing, ["train_spade_sdm.py"], done=False)


def test_report_says_why_a_metric_is_missing(driver):
    """What evaluate.py writes for a metric without weights (test_evaluate.py checks that it does)."""
    args = driver.parse_args(["--quick", "--work_dir", "unused"])
    reason = "needs the AlexNet weights alexnet-owt-7be5be79.pth"
    metrics = {
        "num_masks": 3, "num_generated_images": 2100, "num_real_images": 3000, "fid": 31.0, "fid_kid_standard": True,
        "miou": 0.61, "skipped": {"lpips": reason, "kid": "not asked for"},
    }  # fmt: skip
    report = driver.build_report(args, metrics, Path("metrics.json"))
    assert [(row["value"], row["passed"], row["skipped"]) for row in report["targets"]] == [
        (31.0, False, None), (None, None, reason), (0.61, True, None),
    ]  # fmt: skip
    assert report["kid"] is None and report["warnings"] == []  # enough images for FID, standard extractor
    markdown = driver.report_markdown(report)
    assert (
        "| FID | 31.0000 | < 30 | FAIL |" in markdown
        and "| mIoU (semantic consistency) | 0.6100 | > 0.6 | PASS |" in markdown
    )
    assert f"| LPIPS diversity | - | > 0.3 | not computed: {reason} |" in markdown and "| KID |" not in markdown


def test_bad_flags_stop_at_once_naming_the_flag_and_the_fix(driver, capsys):
    with pytest.raises(SystemExit):
        driver.parse_args(["--work_dir", "unused"])  # the default latent preset, without a VAE
    assert "--space latent (the default 1024 latent preset) needs --pretrained_model_name_or_path" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        driver.parse_args(["--quick", "--work_dir", "unused", "--model_config", "configs/models/sdm_huge.json"])
    assert "--model_config configs/models/sdm_huge.json does not exist. Fix:" in capsys.readouterr().err


def test_one_process_runs_python_and_more_run_accelerate_launch(driver):
    def start(*flags):
        return driver.launcher(driver.parse_args(["--quick", "--work_dir", "unused", *flags]))[1:]

    assert start() == []
    launch = ["-m", "accelerate.commands.launch"]
    assert start("--num_processes", "8") == launch + [
        "--num_processes", "8", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    # A config's own process count stands unless --num_processes is given.
    assert start("--accelerate_config", "c.yaml") == launch + ["--config_file", "c.yaml"]
    assert start("--accelerate_config", "c.yaml", "--num_processes", "2") == launch + [
        "--config_file", "c.yaml", "--num_processes", "2",
    ]  # fmt: skip
