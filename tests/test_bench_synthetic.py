"""bench_synthetic.py's own logic, without its 25-minute run: the command line and the rows of its table."""

import sys

import numpy as np
import pytest
from conftest import ROOT
from test_layout_quality import IGNORE, square_map

from segdiff.layout_quality import layout_quality


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as running the script would: `from common import`
    import bench_synthetic

    return bench_synthetic


def test_quick_sizes_are_defaults_that_a_given_flag_overrides(bench, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["bench_synthetic.py", "--quick", "--seeds", "3", "4", "--max_train_samples", "40"]
    )
    args = bench.parse_args()
    assert (args.seeds, args.max_train_samples) == ([3, 4], 40)  # as given
    assert (args.num_images, args.layout_steps, args.downstream_steps) == (128, 30, 30)  # --quick's
    monkeypatch.setattr(sys, "argv", ["bench_synthetic.py", "--seeds", "3"])
    args = bench.parse_args()
    assert (args.seeds, args.max_train_samples, args.num_images, args.layout_steps) == ([3], 64, 512, 600)


def test_a_class_never_drawn_has_no_realism_and_the_row_says_so(bench):
    """A class absent from the generated maps (a barely trained model) or from the training maps has no distance;
    the table says which, instead of the run failing at its end."""
    drawn, real = np.stack([square_map(1), square_map(2)]), np.stack([square_map(1), square_map(3)])
    real[1, 0, 0] = 2  # one pixel of a class the generated maps never show
    section = layout_quality(drawn, real, ["background", "square", "speck", "unseen"], IGNORE, max_pairwise_maps=8)
    assert section["realism"]["speck"]["summary"] is None
    assert section["realism"]["speck"]["components_per_map"] == {
        "generated_mean": None,
        "real_mean": 1.0,
        "distance": None,
    }
    result = bench.layout_quality_row(section, num_synthetic=2)["result"]
    assert "square 0.000, speck not drawn, unseen not drawn" in result

    section = layout_quality(real, drawn, ["background", "square", "speck"], IGNORE, max_pairwise_maps=8)
    assert "speck in no training map" in bench.layout_quality_row(section, num_synthetic=2)["result"]


def test_the_targets_row_checks_the_protocol_from_what_the_models_recorded(bench):
    versus = {"mean": 0.1, "positive_seeds": 5}
    down = {
        "synthetic_vs_oversampling": {"per_class_iou": {bench.RARE: versus}, "miou": versus},
        "classes_made_worse": [],
        "generators": {
            "layout_model": {"train_samples": 64, "not_among_segmenters": 0},
            "renderer": {"train_samples": 64, "not_among_segmenters": 0},
        },
    }
    balance = {"mae": 0.001, "layout_quality": {"copying": {"share_above_0.9": 0.0}}}
    fair = bench.targets_row(down, balance, [], seconds=60, num_seeds=5, rare_class=bench.RARE)["result"]
    assert "PASS fair protocol: the layout_model and renderer saw only the segmenters' real pairs" in fair

    down["generators"]["renderer"] = {"train_samples": 512, "not_among_segmenters": 448, "validation_pairs_seen": 3}
    unfair = bench.targets_row(down, balance, [], seconds=60, num_seeds=5, rare_class=bench.RARE)["result"]
    assert (
        "MISSED fair protocol: the layout_model and renderer saw only the segmenters' real pairs, no validation "
        "pair (451 other)" in unfair
    )


def test_the_best_of_4_is_checked_on_its_own_line_and_the_model_alone_stays_the_target(bench):
    """A row where the best of 4 meets the target and the model alone does not: the model-only line still reads
    MISSED; a rare row drawn as badly as drawing none fails the half-of-none part."""
    rows = [
        {"kind": "one class", "model_alone_mae": 0.047, "best_of_4_mae": 0.021, "drawing_none_mae": 0.088},
        {"kind": "rare", "model_alone_mae": 0.021, "best_of_4_mae": 0.019, "drawing_none_mae": 0.023},
        {"kind": "rare x5", "model_alone_mae": 0.11, "best_of_4_mae": 0.10, "drawing_none_mae": 0.116},
    ]
    checks = bench.model_alone_checks(rows)
    assert checks == {
        "model-only ratio MAE <= 0.03 and <= half of drawing none, one class (0.0470; none 0.0880)": False,
        "best of 4 (no matching) ratio MAE <= 0.03 and <= half of drawing none, one class (0.0210; none 0.0880)": True,
        "model-only ratio MAE <= 0.03 and <= half of drawing none, rare (0.0210; none 0.0230)": False,
        "best of 4 (no matching) ratio MAE <= 0.03 and <= half of drawing none, rare (0.0190; none 0.0230)": False,
    }


def test_the_render_fidelity_row_shows_each_class_beside_what_its_reader_reads_on_real_images(bench):
    """A rare class the real-only reader cannot find in real images either (triangle) is not mistaken for one the
    renderer cannot draw: the row gives both. A class absent from the renders has no entry; one absent from the
    real val images reads n/a."""
    spread = {"mean": 0.1, "positive_seeds": 1, "per_seed": [0.1]}
    down = {
        "render_fidelity": {
            "per_class_iou": {"background": 0.968, "square": None, "striped": 0.5, "triangle": 0.036},
            "reader_real_val_iou": {"background": 0.989, "square": 0.889, "striped": None, "triangle": 0.016},
        },
        "arms": {
            arm: {"miou": {"per_seed": [0.7]}, "per_class_iou": {"triangle": {"per_seed": [0.0]}}}
            for arm in bench.ARMS_SHOWN
        },
        "synthetic_vs_oversampling": {"miou": spread, "per_class_iou": {"triangle": spread}},
        "classes_made_worse": [],
        "num_real_train": 64,
        "num_synthetic": 256,
    }
    row = bench.downstream_rows({"downstream": down}, seeds=[0], rare_class=bench.RARE)[0]
    assert row["result"] == "background 0.968 (0.989), striped 0.500 (n/a), triangle 0.036 (0.016)"


def test_the_rare_rows_ask_for_the_rare_class_chosen_on_the_command_line(bench):
    """--rare_class checkered: the rare rows ask for it, at its share in the val maps that show it (and 5x that)."""
    names = ["background", "striped", "checkered", "square", "triangle"]
    maps = np.zeros((3, 4, 4), dtype=np.int64)
    maps[0, 0, :2] = 2  # checkered: 2 of 16 pixels
    maps[1, :2, :] = 4  # a triangle only
    maps[2, 0, 0] = 2  # checkered: 1 of 16
    requests = bench.held_out_requests(maps, names, count=8, rare_class="checkered")
    assert requests["rare"] == [{2: 2 / 16}, {2: 1 / 16}]
    assert requests["rare x5"] == [{2: 10 / 16}, {2: 5 / 16}]
    assert bench.held_out_requests(maps, names, count=8, rare_class="triangle")["rare"] == [{4: 0.5}]
