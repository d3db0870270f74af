"""How real generated layouts look: diversity, copying of training maps, and the shapes of their regions.

Ratio matching (segdiff/pipelines/layout.py) makes a layout hold the requested shares; these numbers say what that
costs in realism, for a set of generated label maps against real ones (the layout model's training maps) of the
same size:

* **diversity**: the mean pairwise IoU within a set of maps, for the generated set and for the real one (lower =
  more diverse). The IoU of two maps is their mean IoU over the classes present in either, counted over the pixels
  labelled in both (`pairwise_mean_iou`), the same per-map score as segdiff.metrics.mean_iou.
* **copying**: each generated map's best IoU with any real map; the share of maps above `COPY_THRESHOLD`, the
  mean and the maximum.
* **realism**: per class, three distributions over the maps (`shape_statistics`): connected components per map
  (over the maps where the class is present: whether it is present at all is the request's business), each
  component's size as a share of the map, and each component's boundary length (`boundary_lengths`). Each
  generated distribution is compared with the real one by the 1-D Wasserstein distance divided by the real
  values' mean (`distribution_distance`: 0 = the same distribution; 0.5 = apart by half a typical value), and
  the class's summary is the mean of its three distances.

Components are 4-connected (scipy.ndimage.label's default in 2-D): two pixels touching at a corner only are two
components, as a pixel's four neighbours are also what its boundary is counted against.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

# A generated map this close to a real one (IoU) is counted as a copy of it.
COPY_THRESHOLD = 0.9
# Maps compared at once in the pairwise IoU: bounds the memory of its (rows x pixels) one-hot blocks.
PAIRWISE_ROWS = 64
SHAPE_STATISTICS = ("components_per_map", "component_size", "boundary_length")


# ------------------------------------------------------------------------------------------------
# Diversity and copying: IoU between maps
# ------------------------------------------------------------------------------------------------


def pairwise_mean_iou(first: np.ndarray, second: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """(N, H, W) and (M, H, W) label maps -> (N, M): each pair's mean IoU over the classes present in either map,
    counted over the pixels labelled in both (NaN for a pair with no such class).

    Per class, intersections and areas of all pairs at once are products of one-hot matrices (exact in float32
    below 2**24 pixels a map), so comparing hundreds of maps with hundreds takes seconds."""
    labelled_second = (second != ignore_index).reshape(len(second), -1).astype(np.float32)
    one_hot_second = [(second == c).reshape(len(second), -1).astype(np.float32) for c in range(num_classes)]
    rows = []
    for start in range(0, len(first), PAIRWISE_ROWS):
        block = first[start : start + PAIRWISE_ROWS].reshape(-1, first[0].size)
        labelled_block = (block != ignore_index).astype(np.float32)
        iou_sum = np.zeros((len(block), len(second)))
        present = np.zeros((len(block), len(second)))
        for c in range(num_classes):
            ours = (block == c).astype(np.float32)
            intersection = ours @ one_hot_second[c].T
            # Each map's area of class c, over the pixels the other map labels too.
            union = ours @ labelled_second.T + labelled_block @ one_hot_second[c].T - intersection
            iou_sum += np.divide(intersection, union, out=np.zeros_like(union), where=union > 0)
            present += union > 0
        rows.append(np.divide(iou_sum, present, out=np.full_like(iou_sum, np.nan), where=present > 0))
    return np.concatenate(rows) if rows else np.zeros((0, len(second)))


def mean_pairwise_iou(maps: np.ndarray, num_classes: int, ignore_index: int) -> float | None:
    """The mean IoU over all pairs of distinct maps of a set (None with fewer than two maps)."""
    if len(maps) < 2:
        return None
    scores = pairwise_mean_iou(maps, maps, num_classes, ignore_index)
    return float(np.nanmean(scores[np.triu_indices(len(maps), k=1)]))


def best_match_iou(generated: np.ndarray, real: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """(N,): each generated map's highest IoU with any real map."""
    return np.nanmax(pairwise_mean_iou(generated, real, num_classes, ignore_index), axis=1)


def copying(best_iou: np.ndarray) -> dict:
    return {
        f"share_above_{COPY_THRESHOLD}": round(float((best_iou > COPY_THRESHOLD).mean()), 4),
        "mean_best_iou": round(float(best_iou.mean()), 4),
        "max_best_iou": round(float(best_iou.max()), 4),
    }


# ------------------------------------------------------------------------------------------------
# Realism: the components of each class
# ------------------------------------------------------------------------------------------------


def boundary_lengths(label_map: np.ndarray, components: np.ndarray, count: int, ignore_index: int) -> np.ndarray:
    """(count,): the pixel edges between each component (ids 1..count in ``components``) and a pixel of another
    class. Edges to no-data and the map's border are not counted: neither is a boundary the map draws."""
    lengths = np.zeros(count + 1, dtype=np.int64)
    for axis in (0, 1):
        for ours, theirs in ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))):
            index_ours = (slice(None), ours) if axis else (ours, slice(None))
            index_theirs = (slice(None), theirs) if axis else (theirs, slice(None))
            component, neighbour = components[index_ours], label_map[index_theirs]
            edge = (component > 0) & (neighbour != label_map[index_ours]) & (neighbour != ignore_index)
            lengths += np.bincount(component[edge], minlength=count + 1)
    return lengths[1:]


def shape_statistics(maps: np.ndarray, num_classes: int, ignore_index: int) -> list[dict[str, list[float]]]:
    """Per class: components per map (maps where the class is present), each component's size (a share of the
    map's pixels) and boundary length (in map sides: edges / sqrt(height * width), so that maps of one size are
    compared in the units of any other)."""
    statistics = [{name: [] for name in SHAPE_STATISTICS} for _ in range(num_classes)]
    for label_map in maps:
        side = np.sqrt(label_map.size)
        for c in range(num_classes):
            components, count = ndimage.label(label_map == c)
            if count == 0:
                continue
            sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
            statistics[c]["components_per_map"].append(float(count))
            statistics[c]["component_size"].extend((sizes / label_map.size).tolist())
            statistics[c]["boundary_length"].extend(
                (boundary_lengths(label_map, components, count, ignore_index) / side).tolist()
            )
    return statistics


def distribution_distance(generated, real) -> float | None:
    """The 1-D Wasserstein distance between two samples of a positive quantity, over the real sample's mean: a
    difference in units of a typical real value. None when either sample is empty (nothing to compare)."""
    if len(generated) == 0 or len(real) == 0:
        return None
    return float(wasserstein_distance(generated, real) / np.mean(real))


def realism(generated: np.ndarray, real: np.ndarray, class_names: list[str], ignore_index: int) -> dict:
    """Per class: each shape statistic's generated and real mean and their `distribution_distance`, and the mean
    of the distances as the class's summary (None where the class is missing from either set)."""
    ours = shape_statistics(generated, len(class_names), ignore_index)
    theirs = shape_statistics(real, len(class_names), ignore_index)
    per_class = {}
    for c, name in enumerate(class_names):
        entry = {}
        for statistic in SHAPE_STATISTICS:
            values, reference = ours[c][statistic], theirs[c][statistic]
            entry[statistic] = {
                "generated_mean": rounded(np.mean(values) if values else None),
                "real_mean": rounded(np.mean(reference) if reference else None),
                "distance": rounded(distribution_distance(values, reference)),
            }
        distances = [entry[s]["distance"] for s in SHAPE_STATISTICS]
        entry["summary"] = None if None in distances else rounded(np.mean(distances))
        per_class[name] = entry
    return per_class


def rounded(value) -> float | None:
    return None if value is None else round(float(value), 4)


# ------------------------------------------------------------------------------------------------
# The report section
# ------------------------------------------------------------------------------------------------


def evenly_spaced(count: int, cap: int) -> list[int]:
    """At most ``cap`` indices of ``count`` items, spread evenly over them (all when there are no more): a
    subsample that needs no seed and covers the whole set."""
    if count <= cap:
        return list(range(count))
    return np.linspace(0, count - 1, cap).round().astype(int).tolist()


def layout_quality(
    generated: np.ndarray, real: np.ndarray, class_names: list[str], ignore_index: int, max_pairwise_maps: int
) -> dict:
    """The ``layout_quality`` section of ratio_report.json: diversity, copying and realism of the generated maps
    (N, H, W) against the real ones (M, H, W). Diversity compares at most ``max_pairwise_maps`` maps of each set
    (evenly spaced: its cost grows with the square of the count); copying and realism use every map."""
    num_classes = len(class_names)
    some_generated = generated[evenly_spaced(len(generated), max_pairwise_maps)]
    some_real = real[evenly_spaced(len(real), max_pairwise_maps)]
    return {
        "size": list(generated.shape[1:]),
        "generated_maps": len(generated),
        "reference_maps": len(real),
        "diversity": {
            "generated_mean_pairwise_iou": rounded(mean_pairwise_iou(some_generated, num_classes, ignore_index)),
            "real_mean_pairwise_iou": rounded(mean_pairwise_iou(some_real, num_classes, ignore_index)),
            "maps_compared": [len(some_generated), len(some_real)],
        },
        "copying": copying(best_match_iou(generated, real, num_classes, ignore_index)),
        "realism": realism(generated, real, class_names, ignore_index),
        "note": (
            "IoU of two maps: mean over the classes present in either, over the pixels labelled in both; "
            "diversity: mean pairwise IoU within a set (lower = more diverse); copying: each generated map's best "
            f"IoU with a reference map (share above {COPY_THRESHOLD}, mean, max); realism per class: 4-connected "
            "components per map (where present), component size (share of the map), component boundary length "
            "(edges / sqrt(map pixels)); distance = 1-D Wasserstein distance / the real mean; summary = mean of "
            "the three distances"
        ),
    }
