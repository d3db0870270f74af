"""Layout quality (segdiff/layout_quality.py): the metrics on hand-made maps whose answers are known."""

import numpy as np
import pytest

from segdiff.layout_quality import (
    best_match_iou,
    boundary_lengths,
    copying,
    distribution_distance,
    evenly_spaced,
    layout_quality,
    mean_pairwise_iou,
    pairwise_mean_iou,
    shape_statistics,
)

IGNORE = 255


def square_map(left: int) -> np.ndarray:
    """8 x 8 background with a 4 x 4 square of class 1 at rows 2..5, columns left..left+3."""
    label = np.zeros((8, 8), dtype=np.int64)
    label[2:6, left : left + 4] = 1
    return label


def test_identical_maps_are_copies_and_a_shifted_square_scores_its_overlap():
    first, shifted = square_map(1), square_map(2)
    assert pairwise_mean_iou(first[None], first[None], 2, IGNORE).tolist() == [[1.0]]
    # Square: 12 pixels in common of 20 covered; background: 44 in common of 52. The mean of the two.
    expected = (12 / 20 + 44 / 52) / 2
    assert pairwise_mean_iou(first[None], shifted[None], 2, IGNORE)[0, 0] == pytest.approx(expected, abs=1e-6)

    best = best_match_iou(np.stack([first, shifted]), np.stack([first, np.zeros((8, 8), dtype=np.int64)]), 2, IGNORE)
    assert best.tolist() == pytest.approx([1.0, expected])
    assert copying(best) == {"share_above_0.9": 0.5, "mean_best_iou": round((1 + expected) / 2, 4), "max_best_iou": 1.0}


def test_iou_counts_only_pixels_labelled_in_both_and_only_classes_present_in_either():
    first = square_map(1)
    no_data_over_square = first.copy()
    no_data_over_square[2:6, 1:5] = IGNORE  # the square is no-data: what is left is background in both
    assert pairwise_mean_iou(first[None], no_data_over_square[None], 3, IGNORE).tolist() == [[1.0]]
    # Class 2 is in neither map: it does not count (the mean is over background and square).
    assert pairwise_mean_iou(first[None], square_map(2)[None], 3, IGNORE)[0, 0] == pytest.approx(
        (12 / 20 + 44 / 52) / 2, abs=1e-6
    )


def test_mean_pairwise_iou_is_the_mean_over_distinct_pairs():
    maps = np.stack([square_map(1), square_map(1), square_map(2)])
    shifted = (12 / 20 + 44 / 52) / 2
    assert mean_pairwise_iou(maps, 2, IGNORE) == pytest.approx((1.0 + shifted + shifted) / 3, abs=1e-6)
    assert mean_pairwise_iou(maps[:1], 2, IGNORE) is None


def test_components_sizes_and_boundaries_of_a_drawn_map():
    label = np.zeros((8, 8), dtype=np.int64)
    label[2:4, 2:4] = 1  # a 2 x 2 block inside the map: 8 edges of boundary
    label[0, 0] = 1  # one pixel in the corner: 2 edges (the map's border is no boundary)
    label[6, 6] = label[7, 7] = 1  # touching at a corner only: two components of one pixel
    label[7, 0] = IGNORE  # no-data next to nothing of class 1
    label[4, 2] = 2  # one pixel of class 2 under the block: a boundary of both
    label[4, 3] = IGNORE  # no-data under the block and beside class 2: a boundary of neither
    statistics = shape_statistics(label[None], 3, IGNORE)
    ones = statistics[1]
    assert ones["components_per_map"] == [4.0]
    assert sorted(ones["component_size"]) == [1 / 64, 1 / 64, 1 / 64, 4 / 64]
    # Component order is scipy's scan order: corner pixel, block, (6, 6), (7, 7). Lengths in map sides (8 edges).
    assert ones["boundary_length"] == [2 / 8, 7 / 8, 4 / 8, 2 / 8]
    assert statistics[2] == {"components_per_map": [1.0], "component_size": [1 / 64], "boundary_length": [3 / 8]}
    # Background: one component around everything (the no-data pixels are not background).
    assert statistics[0]["components_per_map"] == [1.0]
    assert statistics[0]["component_size"] == [(64 - 4 - 3 - 1 - 2) / 64]


def test_boundary_lengths_count_each_edge_to_another_class_once():
    label = square_map(1)
    components = (label == 1).astype(np.int64)
    assert boundary_lengths(label, components, 1, IGNORE).tolist() == [16]  # the 4 x 4 square's perimeter


def test_distribution_distance_is_zero_for_the_same_distribution_and_in_units_of_the_real_mean():
    assert distribution_distance([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == 0.0
    assert distribution_distance([1.0, 1.0], [2.0, 2.0]) == pytest.approx(0.5)  # 1 apart, real mean 2
    assert distribution_distance([], [2.0]) is None and distribution_distance([2.0], []) is None


def test_evenly_spaced_takes_all_or_a_spread_subsample():
    assert evenly_spaced(3, 5) == [0, 1, 2]
    assert evenly_spaced(10, 4) == [0, 3, 6, 9]


def test_the_report_section_of_a_set_against_itself():
    maps = np.stack([square_map(1), square_map(2), square_map(4)])
    section = layout_quality(maps, maps, ["background", "square"], IGNORE, max_pairwise_maps=8)
    assert section["size"] == [8, 8] and section["generated_maps"] == section["reference_maps"] == 3
    diversity = section["diversity"]
    assert diversity["generated_mean_pairwise_iou"] == diversity["real_mean_pairwise_iou"]
    assert section["copying"] == {"share_above_0.9": 1.0, "mean_best_iou": 1.0, "max_best_iou": 1.0}
    square = section["realism"]["square"]
    assert square["summary"] == 0.0
    assert square["component_size"] == {"generated_mean": 0.25, "real_mean": 0.25, "distance": 0.0}
    # Against maps whose squares are twice as many and half as large: components per map 1 vs 2 -> 0.5.
    halves = np.zeros((3, 8, 8), dtype=np.int64)
    halves[:, 2:6, 1:3] = halves[:, 2:6, 4:6] = 1
    other = layout_quality(maps, halves, ["background", "square"], IGNORE, max_pairwise_maps=8)["realism"]["square"]
    assert other["components_per_map"]["distance"] == 0.5 and other["component_size"]["distance"] == 1.0
    assert other["summary"] > 0
