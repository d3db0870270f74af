"""Synthetic datasets: ratio requests, --balance, the ratio report, and generate_synthetic_dataset.py end to end."""

import shutil

import numpy as np
import pytest
from conftest import ROOT, SCRIPT_ENV, run_script, script_error, write_untrained_models

from segdiff.data import DatasetError, read_label_map
from segdiff.synthetic import (
    BALANCE_RATIO_RANGE,
    balance_weights,
    balanced_request,
    parse_class_weights,
    parse_ratios,
    ratio_report,
)

NAMES = ["background", "building", "road", "water"]
NAMES_TOY = ["background", "square", "disk", "triangle"]


def test_parse_ratios_takes_sparse_requests_by_class_name():
    assert parse_ratios("water:0.4, road:0.1", NAMES) == {3: 0.4, 2: 0.1}
    assert parse_ratios("building:0.4", NAMES) == {1: 0.4}
    assert parse_ratios("background:0.5,building:0.5", NAMES) == {0: 0.5, 1: 0.5}  # exactly 1 is fine


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lake:0.4,road:0.1", 'entry "lake:0.4": no class "lake"'),
        ("water:-0.1", 'entry "water:-0.1": a share is a fraction of pixels, 0..1'),
        ("water:1.5", 'entry "water:1.5": a share is a fraction of pixels'),
        ("water:0.7,road:0.4", "water:0.7 + road:0.4 = 1.1"),
        ("water=0.4", 'entry "water=0.4" is not CLASS:SHARE'),
        ("water:lots", 'entry "water:lots": "lots" is not a number'),
        ("water:0.1,water:0.2", 'entry "water:0.2": water is requested twice'),
        (" , ", "requests no class"),
    ],
)
def test_bad_ratios_are_refused_naming_the_entry(text, message):
    with pytest.raises(DatasetError) as refused:
        parse_ratios(text, NAMES)
    assert message in str(refused.value)


def test_balance_asks_for_the_classes_below_uniform_in_proportion_to_their_shortfall():
    # Uniform is 0.25: background and building are above it, road 0.15 short, water 0.05 short.
    weights = balance_weights([0.5, 0.3, 0.1, 0.2])
    assert weights.tolist() == pytest.approx([0.0, 0.0, 0.75, 0.25])
    assert balance_weights([0.25] * 4).tolist() == [0.25] * 4

    prior = {"pixel_share": [0.5, 0.3, 0.1, 0.2], "mean_share_when_present": [0.6, 0.3, 0.08, 0.5]}
    draws = [balanced_request(prior, np.random.default_rng(seed)) for seed in range(400)]
    asked = [next(iter(d)) for d in draws]
    assert set(asked) == {2, 3} and 0.68 < asked.count(2) / len(asked) < 0.82
    road = [d[2] for d in draws if 2 in d]
    assert min(road) >= 0.08 and max(road) <= 0.16  # its usual size when present, up to twice it
    assert [balanced_request(prior, np.random.default_rng(7))] == [balanced_request(prior, np.random.default_rng(7))]


def test_balance_asks_for_a_small_object_class_at_the_floor_that_matching_can_draw_and_caps_a_big_one():
    # A traffic sign: 0.2% of a street scene where present. Asked at that share, ratio matching draws none (the
    # floor's comment), so it is asked at the floor; a big class is capped, leaving room for the others.
    prior = {"pixel_share": [0.6, 0.399, 0.001], "mean_share_when_present": [0.6, 0.45, 0.002]}
    sign = [balanced_request(prior, np.random.default_rng(seed)).get(2) for seed in range(100)]
    assert {share for share in sign if share is not None} == {BALANCE_RATIO_RANGE[0]}
    big = {"pixel_share": [0.9, 0.1], "mean_share_when_present": [0.9, 0.5]}
    assert max(balanced_request(big, np.random.default_rng(seed))[1] for seed in range(50)) == BALANCE_RATIO_RANGE[1]


def test_balance_never_asks_for_a_class_the_training_maps_do_not_show():
    # Uniform over the three classes shown is 1/3: building 0.13 short, road 0.23 short; water has no pixel.
    weights = balance_weights([0.7, 0.2, 0.1, 0.0])
    assert weights.tolist() == pytest.approx([0.0, 0.4 / 1.1, 0.7 / 1.1, 0.0])
    assert balance_weights([0.5, 0.5, 0.0, 0.0]).tolist() == [0.5, 0.5, 0.0, 0.0]  # the classes shown, alike
    prior = {"pixel_share": [0.7, 0.2, 0.1, 0.0], "mean_share_when_present": [0.7, 0.25, 0.1, 0.0]}
    assert {next(iter(balanced_request(prior, np.random.default_rng(seed)))) for seed in range(100)} == {1, 2}
    assert (
        balanced_request({"pixel_share": [0.0] * 4, "mean_share_when_present": [0.0] * 4}, np.random.default_rng(0))
        == {}
    )


def test_ratio_report_is_the_mean_absolute_error_over_requested_classes():
    records = [
        {"requested_ratios": {"water": 0.4}, "achieved_ratios": {"background": 0.5, "water": 0.3, "road": 0.2}},
        {"requested_ratios": {"water": 0.4, "road": 0.1}, "achieved_ratios": {"water": 0.5, "road": 0.1}},
        {"requested_ratios": {}, "achieved_ratios": {"water": 0.9}},
    ]
    report = ratio_report(records, ["background", "road", "water"])
    assert report["num_samples"] == 3 and report["num_requests"] == 3
    assert report["mae"] == pytest.approx(0.0667, abs=1e-4)
    assert report["per_class"] == {"road": {"mae": 0.0, "requests": 1}, "water": {"mae": 0.1, "requests": 2}}
    assert report["not_drawn"] == {}
    assert ratio_report(records[2:], ["water"])["mae"] is None

    # Asked for and not one pixel drawn: counted per class (a request for 0, absence, is met, not counted).
    records = [
        {"requested_ratios": {"sign": 0.002}, "achieved_ratios": {"sign": 0.0, "road": 1.0}},
        {"requested_ratios": {"sign": 0.002}, "achieved_ratios": {"sign": 0.001, "road": 0.999}},
        {"requested_ratios": {"sign": 0.0, "road": 0.5}, "achieved_ratios": {"sign": 0.0, "road": 1.0}},
    ]
    assert ratio_report(records, ["road", "sign"])["not_drawn"] == {"sign": 1}


# ---------------------------------------------------------------------------------------------------------
# generate_synthetic_dataset.py, as a user runs it, on an untrained tiny layout model and SDM renderer (the
# layout model's training and ratio control are tested in tests/test_layout.py; here: the dataset it writes)


@pytest.fixture(scope="module")
def models(toy_data, tmp_path_factory):
    return write_untrained_models(tmp_path_factory.mktemp("synthetic-models"), toy_data)


def generate(models, save_dir, *extra, launcher=()):
    fast = ["--num_inference_steps", "2", "--render_steps", "2", "--batch_size", "2"]
    return run_script(
        *launcher, "generate_synthetic_dataset.py", "--layout_model", models / "layout", "--save_dir", save_dir,
        *fast, *extra,
    )  # fmt: skip


def files(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*.png"))}


def test_writes_a_generic_dataset_with_its_requests_and_what_they_got(models, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "synthetic"
    result = generate(
        models, out, "--renderer", models / "sdm", "--ratios", "disk:0.3", "--num_samples", "5", "--seed", "7"
    )
    assert "should be kept in float32" not in result.stderr  # diffusers' warning at a cast to the dtype loaded
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"synthetic_00000{i}.png" for i in range(5)]
    check = subprocess.run(
        [sys.executable, "-m", "segdiff.data", "check", "--data_root", out, "--dataset", "generic"],
        cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0 and "pairs: 5" in check.stdout and "no problems found" in check.stdout

    import torch

    from segdiff.data import load_segmentation_dataset
    from segdiff.models.layout_unet import class_ratios

    dataset = load_segmentation_dataset(out, "generic")
    assert dataset.class_names == NAMES_TOY and len(dataset) == 5 and dataset[0]["image"].size == (32, 32)
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [7, 8, 9, 10, 11] and {r["renderer"] for r in records} == {"sdm"}
    for record in records:
        assert record["requested_ratios"] == {"disk": 0.3}
        shares = class_ratios(torch.from_numpy(read_label_map(out / record["mask_file_name"]))[None], 4)[0]
        assert record["achieved_ratios"] == {n: round(float(v), 4) for n, v in zip(NAMES_TOY, shares)}
    report = json.loads((out / "ratio_report.json").read_text())
    expected = np.mean([abs(r["achieved_ratios"]["disk"] - 0.3) for r in records])
    assert report["num_requests"] == 5 and report["mae"] == pytest.approx(expected, abs=1e-4)


def test_two_processes_write_what_one_writes_and_a_rerun_adds_only_what_is_missing(models, tmp_path):
    import sys

    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--renderer", models / "sdm", "--balance", "--num_samples", "5")
    generate(models, one, *args)
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541")
    generate(models, two, *args, launcher=torchrun)
    assert files(one) == files(two) and files(one)
    assert (one / "metadata.jsonl").read_bytes() == (two / "metadata.jsonl").read_bytes()
    assert sys.executable  # the launcher above ran under this interpreter

    # --balance asked for the classes below a uniform share only (square, disk, triangle), one per sample.
    import json

    requests = [json.loads(line)["requested_ratios"] for line in (one / "metadata.jsonl").read_text().splitlines()]
    assert all(len(r) == 1 and set(r) <= {"square", "disk", "triangle"} for r in requests)

    # Lose sample 3's files, re-run: only it is drawn again, identically.
    assert not (one / ".records").exists()  # merged into metadata.jsonl
    before = {path: path.stat().st_mtime_ns for path in (one / "images").iterdir()}
    for folder in ("images", "masks"):
        (one / folder / "synthetic_000003.png").unlink()
    result = generate(models, one, *args)
    assert "4 of 5 already done" in result.stdout
    assert files(one) == files(two)
    after = {path: path.stat().st_mtime_ns for path in (one / "images").iterdir()}
    assert [p.name for p in after if after[p] != before.get(p)] == ["synthetic_000003.png"]

    # Growing the dataset keeps what is there: sample 5 is added, the metadata lists all six in order.
    args = ("--renderer", models / "sdm", "--balance", "--num_samples", "6")
    assert "5 of 6 already done" in generate(models, one, *args).stdout
    assert [
        json_of_line["index"] for json_of_line in map(json.loads, (one / "metadata.jsonl").read_text().splitlines())
    ] == list(range(6))


def test_a_class_asked_for_and_not_drawn_is_counted_and_named(models, tmp_path):
    # Half a pixel of a 32 px map: ratio matching spreads it over the map and no pixel becomes a triangle.
    out = tmp_path / "speck"
    result = generate(models, out, "--layouts_only", "--ratios", "triangle:0.0005", "--num_samples", "3")
    masks = [read_label_map(path) for path in sorted((out / "masks").iterdir())]
    missing = sum(not (mask == NAMES_TOY.index("triangle")).any() for mask in masks)
    assert missing > 0
    assert json_of(out / "ratio_report.json")["not_drawn"] == {"triangle": missing}
    assert f"triangle: asked for in 3 samples, not drawn in {missing} of them" in result.stdout


def test_layouts_only_and_the_refusals(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "layouts"
    generate(models, out, "--layouts_only", "--num_samples", "2")
    assert not (out / "images").exists() and len(list((out / "masks").iterdir())) == 2
    # The data's own distribution: nothing requested, nothing to score.
    assert json_of(out / "ratio_report.json")["mae"] is None

    def refusal(*extra):
        return script_error(monkeypatch, "generate_synthetic_dataset.py", "--layout_model", models / "layout",
                            "--save_dir", out, "--num_samples", "2", "--layouts_only", *extra)  # fmt: skip

    assert 'entry "lake:0.2": no class "lake"' in refusal("--ratios", "lake:0.2")
    assert "disk:0.8 + square:0.3 = 1.1" in refusal("--ratios", "disk:0.8,square:0.3")
    assert "--num_inference_steps: 2 there, 5 now" in refusal("--num_inference_steps", "5")
    assert "trained without domains" in refusal("--domain", "Urban", "--num_inference_steps", "2")

    from generate_synthetic_dataset import parse_args

    command = ["--layout_model", str(models / "layout"), "--save_dir", str(out), "--num_samples", "2", "--layouts_only"]
    for extra, message in (
        (["--match_strength", "1.5"], "--match_strength must be in [0, 1]"),
        (["--no_match_ratios", "--match_strength", "0.5"], "drop it with --no_match_ratios"),
        (["--quality_reference_maps", "-1"], "argument --quality_reference_maps: must be 0 or more, got -1"),
    ):
        with pytest.raises(SystemExit):
            parse_args(command + extra)
        assert message in capsys.readouterr().err
    assert "holds a 'spade_sdm' model. Fix: pass the output folder of train_layout_diffusion.py" in script_error(
        monkeypatch, "generate_synthetic_dataset.py", "--layout_model", models / "sdm", "--save_dir", tmp_path / "x",
        "--num_samples", "1", "--layouts_only",
    )  # fmt: skip


def test_layout_candidates_keep_each_requests_closest_layout(models, tmp_path):
    """--layout_candidates 4 writes, per sample, the closest of 4 layouts, of which the first is the one
    --layout_candidates 1 writes (DDIM): no sample further from its request, at least one closer, and the run's
    record says how it was made."""
    import json

    import torch

    from segdiff.models.layout_unet import class_ratios

    def disk_errors(out):
        records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
        maps = torch.from_numpy(np.stack([read_label_map(out / record["mask_file_name"]) for record in records]))
        return (class_ratios(maps, 4)[:, NAMES_TOY.index("disk")] - 0.3).abs()

    # DDIM, as the layout trainer saves (this untrained model holds DDPM, whose step noise the candidates share).
    run = ["--layouts_only", "--ratios", "disk:0.3", "--no_match_ratios", "--num_samples", "6", "--scheduler", "ddim"]
    generate(models, tmp_path / "one", *run)
    generate(models, tmp_path / "best", *run, "--layout_candidates", "4")
    one, best = disk_errors(tmp_path / "one"), disk_errors(tmp_path / "best")
    assert (best <= one + 1e-6).all() and (best < one - 1e-6).any(), (one, best)
    assert json_of(tmp_path / "best" / "generation_args.json")["layout_candidates"] == 4
    assert (
        json_of(tmp_path / "best" / "ratio_report.json")["mae"] < json_of(tmp_path / "one" / "ratio_report.json")["mae"]
    )


def test_the_ratio_report_holds_the_layout_quality_against_the_training_maps(models, toy_data, tmp_path):
    import json
    import shutil

    from segdiff.labels import resize_labels
    from segdiff.layout_quality import layout_quality

    out = tmp_path / "layouts"
    generate(models, out, "--layouts_only", "--ratios", "disk:0.3", "--match_strength", "0.5", "--num_samples", "3")
    assert json_of(out / "generation_args.json")["match_strength"] == 0.5
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [record["match_strength"] for record in records] == [0.5, 0.5, 0.5]

    # The section is layout_quality of the written masks against every toy map, brought to the layout size.
    quality = json_of(out / "ratio_report.json")["layout_quality"]
    generated = np.stack([read_label_map(out / record["mask_file_name"]) for record in records])
    real = np.stack([resize_labels(read_label_map(path), 16, 16) for path in sorted((toy_data / "masks").iterdir())])
    expected = layout_quality(generated, real, NAMES_TOY, 255, max_pairwise_maps=512)
    assert quality == json.loads(json.dumps({**expected, "reference": {
        "data_root": str(toy_data), "dataset": "generic", "split": None, "maps_trained_on": 24}}))  # fmt: skip
    assert quality["generated_maps"] == 3 and quality["reference_maps"] == 24 and quality["size"] == [16, 16]
    # --quality_reference_maps caps the reference (evenly spaced over the split).
    capped = tmp_path / "capped"
    generate(models, capped, "--layouts_only", "--num_samples", "2", "--quality_reference_maps", "5")
    assert json_of(capped / "ratio_report.json")["layout_quality"]["reference_maps"] == 5

    # Training data that is no longer where the run recorded it: a note, and the samples are there.
    moved = tmp_path / "moved-layout"
    shutil.copytree(models / "layout", moved)
    config = json_of(moved / "training_config.json")
    (moved / "training_config.json").write_text(json.dumps({**config, "data_root": str(tmp_path / "gone")}))
    result = run_script(
        "generate_synthetic_dataset.py", "--layout_model", moved, "--save_dir", tmp_path / "unscored",
        "--layouts_only", "--num_samples", "2", "--num_inference_steps", "2",
    )  # fmt: skip
    skipped = json_of(tmp_path / "unscored" / "ratio_report.json")["layout_quality"]
    assert skipped == {
        "skipped": f"the layout model's training maps could not be read: --data_root {tmp_path / 'gone'} does not "
        "exist or is not a folder. Fix: check the path."
    }
    assert "Wrote 2 samples" in result.stdout


def json_of(path):
    import json

    return json.loads(path.read_text())


def test_domains_mix_in_one_run_and_balance_draws_from_each_domains_prior(models, tmp_path):
    """--domain Urban,Rural: samples take the domains in turn, and --balance asks for what each domain lacks."""
    import json

    import torch

    from segdiff.models.layout_unet import LayoutUNetModel
    from segdiff.pipelines.layout import LayoutDiffusionPipeline, layout_scheduler

    folder = tmp_path / "domain-layout"
    shutil.copytree(models / "layout", folder)
    config = {
        k: v for k, v in json.loads((ROOT / "configs/models/layout_tiny.json").read_text()).items() if k[0] != "_"
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = LayoutUNetModel.from_config({**config, "num_domains": 2})
    names = json.loads((folder / "class_names.json").read_text())["class_names"]
    LayoutDiffusionPipeline(unet, layout_scheduler(), class_names=names, domains=["Urban", "Rural"]).save_pretrained(
        folder
    )
    # Only one class below a uniform share in each domain: --balance asks for it alone (triangle in Urban, disk in
    # Rural); over all maps it would be another (square).
    prior = json.loads((folder / "class_prior.json").read_text())
    prior["pixel_share"] = [0.5, 0.05, 0.25, 0.25]
    prior["per_domain"] = {
        "Urban": {"pixel_share": [0.4, 0.3, 0.29, 0.01], "mean_share_when_present": [0.5, 0.3, 0.3, 0.05]},
        "Rural": {"pixel_share": [0.4, 0.3, 0.01, 0.29], "mean_share_when_present": [0.5, 0.3, 0.05, 0.3]},
    }
    (folder / "class_prior.json").write_text(json.dumps(prior))

    save_dir = tmp_path / "mixed"
    run_script(
        "generate_synthetic_dataset.py", "--layout_model", folder, "--save_dir", save_dir, "--layouts_only",
        "--balance", "--domain", "Urban,Rural", "--num_samples", "4", "--num_inference_steps", "2",
        "--quality_reference_maps", "0",
    )  # fmt: skip
    records = [json.loads(line) for line in (save_dir / "metadata.jsonl").read_text().splitlines()]
    assert [r["domain"] for r in records] == ["Urban", "Rural", "Urban", "Rural"]
    assert [list(r["requested_ratios"]) for r in records] == [["triangle"], ["disk"], ["triangle"], ["disk"]]
    message = run_script(
        "generate_synthetic_dataset.py", "--layout_model", folder, "--save_dir", tmp_path / "x", "--layouts_only",
        "--domain", "Urban,Suburb", "--num_samples", "1", check=False,
    ).stderr  # fmt: skip
    assert "Suburb is not a domain of the layout model; its domains are Urban, Rural" in message
    assert not (tmp_path / "x" / "masks").exists()


def test_requests_for_a_class_the_layout_model_never_saw_are_left_out_or_warned_about(models, tmp_path):
    """--balance leaves out (and names) a class with no pixel in the training maps; --ratios asking for one warns."""
    import json

    folder = tmp_path / "layout"
    shutil.copytree(models / "layout", folder)
    prior = json_of(folder / "class_prior.json")
    prior["pixel_share"], prior["mean_share_when_present"] = [0.8, 0.15, 0.05, 0.0], [0.8, 0.2, 0.1, 0.0]
    (folder / "class_prior.json").write_text(json.dumps(prior))
    fast = ["--layouts_only", "--num_samples", "6", "--num_inference_steps", "2", "--quality_reference_maps", "0"]

    balanced = run_script(
        "generate_synthetic_dataset.py", "--layout_model", folder, "--save_dir", tmp_path / "b", "--balance", *fast
    )
    assert "--balance leaves out triangle: the layout model's training maps" in balanced.stderr
    records = [json.loads(line) for line in (tmp_path / "b" / "metadata.jsonl").read_text().splitlines()]
    assert {name for r in records for name in r["requested_ratios"]} == {"square", "disk"}  # never the triangle

    asked = run_script(
        "generate_synthetic_dataset.py",
        "--layout_model",
        folder,
        "--save_dir",
        tmp_path / "r",
        "--ratios",
        "triangle:0.1,disk:0.1",
        *fast,
    )
    assert "warning: --ratios asks for triangle, but the layout model's training maps" in asked.stderr
    assert len(json_of(tmp_path / "r" / "ratio_report.json")["per_class"]) == 2  # still generated, as asked
    plain = run_script(
        "generate_synthetic_dataset.py",
        "--layout_model",
        folder,
        "--save_dir",
        tmp_path / "d",
        "--ratios",
        "disk:0.1",
        *fast,
    )
    assert "warning" not in plain.stderr and "leaves out" not in plain.stderr


def test_the_default_size_is_what_the_renderer_makes_of_a_layout(models, tmp_path):
    """Layouts and an SDM trained at 16 x 32 (HEIGHT, WIDTH) give 16 x 32 pairs, not a square that squashes them."""
    import json

    from PIL import Image

    for name in ("layout", "sdm"):
        shutil.copytree(models / name, tmp_path / name)
        config_file = tmp_path / name / "unet" / "config.json"
        config_file.write_text(json.dumps({**json_of(config_file), "sample_size": [16, 32]}))
    run_script(
        "generate_synthetic_dataset.py", "--layout_model", tmp_path / "layout", "--renderer", tmp_path / "sdm",
        "--save_dir", tmp_path / "out", "--ratios", "disk:0.2", "--num_samples", "1", "--num_inference_steps", "2",
        "--render_steps", "2", "--quality_reference_maps", "0",
    )  # fmt: skip
    assert Image.open(tmp_path / "out/images/synthetic_000000.png").size == (32, 16)  # (width, height)
    assert Image.open(tmp_path / "out/masks/synthetic_000000.png").size == (32, 16)
    assert json_of(tmp_path / "out/generation_args.json")["resolution"] == [16, 32]


def test_balance_class_weights_leave_out_or_weigh_down_classes():
    names = ["background", "square", "disk", "triangle"]
    prior = {"pixel_share": [0.7, 0.15, 0.14, 0.01], "mean_share_when_present": [0.7, 0.2, 0.2, 0.03]}
    np.testing.assert_array_equal(parse_class_weights("triangle:0, disk:2", names), [1, 1, 2, 0])
    rng = np.random.default_rng(0)
    asked = [next(iter(balanced_request(prior, rng, [1, 1, 1, 0]))) for _ in range(200)]
    assert set(asked) == {1, 2}  # the triangle, the rarest, is never asked for once weighted 0
    assert balanced_request(prior, rng, [1, 0, 0, 0]) == {}  # nothing left to ask for: the data's distribution
    for bad in ("road:1", "triangle", "triangle:x", "triangle:-1", "triangle:inf"):
        with pytest.raises(DatasetError, match="--balance_class_weights entry"):
            parse_class_weights(bad, names)


def test_layout_quality_compares_with_the_maps_the_layout_model_trained_on(models, toy_data, tmp_path):
    """Copying means copying a map the model saw: with --max_train_samples, only those pairs are the reference."""
    import json

    from generate_synthetic_dataset import training_maps
    from segdiff.data import limit_train_samples, load_segmentation_dataset, save_label_png
    from segdiff.geometry import ImageSize
    from segdiff.labels import IGNORE_INDEX
    from segdiff.runs import open_run

    folder = tmp_path / "layout"
    shutil.copytree(models / "layout", folder)
    config = json.loads((folder / "training_config.json").read_text())
    (folder / "training_config.json").write_text(json.dumps({**config, "max_train_samples": 5}))
    maps, count = training_maps(open_run(folder), ImageSize(32, 32), cap=512)
    seen = limit_train_samples(load_segmentation_dataset(toy_data, "generic"), 5)
    assert count == 5 and len(seen) == 5
    np.testing.assert_array_equal(maps, np.stack([read_label_map(mask) for _, mask in seen.pairs]))

    # A model trained with --label_offset 1 (masks storing 0 for no-data, classes from 1): read back the same way.
    shifted = tmp_path / "shifted"
    shutil.copytree(toy_data, shifted)
    for mask in (shifted / "masks").iterdir():
        stored = read_label_map(mask) + 1
        stored[:2] = 0
        save_label_png(stored.astype(np.uint8), mask)
    (folder / "training_config.json").write_text(
        json.dumps({**config, "max_train_samples": 5, "data_root": str(shifted), "label_offset": 1})
    )
    maps, count = training_maps(open_run(folder), ImageSize(32, 32), cap=512)
    expected = np.stack([read_label_map(mask) for _, mask in seen.pairs])
    expected[:, :2] = IGNORE_INDEX
    assert count == 5
    np.testing.assert_array_equal(maps, expected)


def test_a_d3pm_layout_model_generates_and_refuses_another_scheduler(models, tmp_path, monkeypatch):
    """generate_synthetic_dataset.py with a --layout_type d3pm model (random weights: the path, not the quality):
    the requests are matched as with an analog model, and --scheduler, which only an analog model has, is refused."""
    import json

    import torch

    from segdiff.models.layout_unet import LayoutUNetModel
    from segdiff.pipelines.layout import LayoutDiffusionPipeline
    from segdiff.schedulers import MaskedLayoutScheduler

    folder = tmp_path / "d3pm-layout"
    shutil.copytree(models / "layout", folder)
    names = json.loads((folder / "class_names.json").read_text())["class_names"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = LayoutUNetModel.from_config_file(ROOT / "configs/models/layout_tiny.json", layout_type="d3pm")
    shutil.rmtree(folder / "scheduler")
    LayoutDiffusionPipeline(unet, MaskedLayoutScheduler(), class_names=names).save_pretrained(folder)

    save_dir = tmp_path / "d3pm"
    run_script(
        "generate_synthetic_dataset.py", "--layout_model", folder, "--save_dir", save_dir, "--layouts_only",
        "--ratios", "square:0.3", "--num_samples", "3", "--num_inference_steps", "8", "--quality_reference_maps", "0",
    )  # fmt: skip
    records = [json.loads(line) for line in (save_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 3
    # Matching steers the masked pixels to the request; what is left is the draws' own spread.
    assert abs(np.mean([r["achieved_ratios"]["square"] for r in records]) - 0.3) < 0.05

    message = script_error(
        monkeypatch, "generate_synthetic_dataset.py", "--layout_model", folder, "--save_dir", tmp_path / "no",
        "--layouts_only", "--num_samples", "1", "--scheduler", "ddim",
    )  # fmt: skip
    assert "is a d3pm layout model" in message and "Fix: drop --scheduler" in message
