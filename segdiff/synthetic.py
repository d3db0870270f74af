"""Class-ratio requests for synthetic datasets: parsing ``--ratios``, ``--balance`` targets, and the report.

A *request* is what a layout is asked for: the share of labelled pixels of some classes (a sparse vector:
the classes not named follow the data). generate_synthetic_dataset.py turns each request into a layout with
the layout model, renders it, and compares what it asked for with what it got (`ratio_report`).
"""

from __future__ import annotations

import numpy as np

from segdiff.data import DatasetError

# --balance asks for a rare class at its usual size when present, times a factor drawn in this range: the layout
# model has seen such maps (a request far outside the training ratios is extrapolation), and every sample that
# asks for a class makes that class present, which is what lifts a rare class. The floor is for small objects:
# ratio matching steers each class's mean probability, and a class asked at a few pixels' share keeps its mass
# spread thinly, so no pixel ends up that class. A 32 px layout model of street scenes asked for a traffic sign
# at 0.004 or 0.008 drew none in 24 of 24 layouts; at 0.02 it drew one in 22 of 24, at 0.002 of the map, near the
# sign's own 0.0015-0.003 (benchmarks/RESULTS.md, "--balance on small objects"). The cap leaves room for the rest.
BALANCE_SIZE_FACTOR = (1.0, 2.0)
BALANCE_RATIO_RANGE = (0.02, 0.6)


def parse_ratios(text: str, class_names: list[str]) -> dict[int, float]:
    """``"water:0.4,road:0.1"`` -> ``{class id: ratio}``; every problem is refused naming the entry."""
    requested: dict[int, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, value = entry.rpartition(":")
        name = name.strip()
        if not sep or not name:
            raise DatasetError(f'--ratios entry "{entry}" is not CLASS:SHARE. Fix: write e.g. "water:0.4,road:0.1".')
        if name not in class_names:
            raise DatasetError(
                f'--ratios entry "{entry}": no class "{name}". The classes of this model: {", ".join(class_names)}.'
            )
        try:
            share = float(value)
        except ValueError:
            raise DatasetError(f'--ratios entry "{entry}": "{value}" is not a number.') from None
        if not 0 <= share <= 1:
            raise DatasetError(f'--ratios entry "{entry}": a share is a fraction of pixels, 0..1, not {share}.')
        class_id = class_names.index(name)
        if class_id in requested:
            raise DatasetError(f'--ratios entry "{entry}": {name} is requested twice.')
        requested[class_id] = share
    if not requested:
        raise DatasetError(f'--ratios "{text}" requests no class. Fix: write e.g. "water:0.4,road:0.1".')
    total = sum(requested.values())
    if total > 1 + 1e-6:
        shown = " + ".join(f"{class_names[c]}:{v:g}" for c, v in requested.items())
        raise DatasetError(f"--ratios {shown} = {total:g}: the shares of one map cannot sum to more than 1.")
    return requested


def balance_weights(pixel_share) -> np.ndarray:
    """How often --balance asks for each class: in proportion to its pixel share's shortfall from uniform (over the
    classes the maps show).

    Classes at or above a uniform share are never asked for (they keep their share from the maps that follow
    the data); the rarest classes are asked for most. A class with no pixel at all in the layout model's training
    maps is never asked for either: the model has never drawn one, so the request would be met, if at all, by a
    region of that label shaped and painted like something else. All at uniform: every class shown alike.
    """
    pixel_share = np.asarray(pixel_share, dtype=np.float64)
    shown = pixel_share > 0
    if not shown.any():
        return np.zeros(len(pixel_share))
    deficit = np.where(shown, np.clip(1.0 / shown.sum() - pixel_share, 0, None), 0.0)
    return deficit / deficit.sum() if deficit.sum() > 0 else shown / shown.sum()


def unseen_classes(prior: dict, class_names: list[str]) -> list[str]:
    """The classes of which the layout model's training maps (``prior``: class_prior.json or one of its domains)
    have no pixel: --balance leaves them out, and a --ratios request for one is extrapolation."""
    return [name for name, share in zip(class_names, prior["pixel_share"]) if share <= 0]


def parse_class_weights(text: str, class_names: list[str]) -> np.ndarray:
    """``--balance_class_weights "road:0,water:0.5"`` -> one factor per class (1 for the classes not named): how
    much more or less --balance asks for each; 0 leaves a class out (one the renderer cannot draw yet)."""
    factors = np.ones(len(class_names))
    for entry in (part.strip() for part in text.split(",")):
        name, sep, value = entry.rpartition(":")
        if not sep or name.strip() not in class_names:
            raise DatasetError(
                f'--balance_class_weights entry "{entry}" is not CLASS:FACTOR with a class of this model '
                f'({", ".join(class_names)}). Fix: write e.g. "road:0,water:0.5".'
            )
        try:
            factor = float(value)
        except ValueError:
            raise DatasetError(f'--balance_class_weights entry "{entry}": "{value}" is not a number.') from None
        if not factor >= 0 or factor == float("inf"):
            raise DatasetError(f'--balance_class_weights entry "{entry}": a factor is finite and >= 0.')
        factors[class_names.index(name.strip())] = factor
    return factors


def balanced_request(prior: dict, rng: np.random.Generator, class_weights=None) -> dict[int, float]:
    """One --balance request: a class drawn by `balance_weights` (times ``class_weights``, one factor per class),
    asked for at its usual size when present (from the prior) times a factor in BALANCE_SIZE_FACTOR, within
    BALANCE_RATIO_RANGE. No request ({}) when the weights leave no class."""
    weights = balance_weights(prior["pixel_share"])
    if class_weights is not None:
        weights = weights * np.asarray(class_weights, dtype=np.float64)
        weights = weights / weights.sum() if weights.sum() > 0 else weights
    if weights.sum() <= 0:
        return {}
    class_id = int(rng.choice(len(weights), p=weights))
    usual = float(prior["mean_share_when_present"][class_id])  # > 0: balance_weights draws only classes shown
    share = float(np.clip(usual * rng.uniform(*BALANCE_SIZE_FACTOR), *BALANCE_RATIO_RANGE))
    return {class_id: round(share, 6)}


def ratio_report(records: list[dict], class_names: list[str]) -> dict:
    """Mean absolute error between requested and achieved shares, per requested class and over all requests, and
    how many samples asked for a class (at a share above 0) and drew not one pixel of it (``not_drawn``; only the
    classes with any): a small class asked at a few pixels' share, which ratio matching cannot draw, shows here.

    ``records`` are metadata.jsonl lines with ``requested_ratios`` and ``achieved_ratios`` (by class name).
    """
    errors: dict[str, list[float]] = {name: [] for name in class_names}
    not_drawn = dict.fromkeys(class_names, 0)
    for record in records:
        for name, requested in record["requested_ratios"].items():
            errors[name].append(abs(record["achieved_ratios"][name] - requested))
            not_drawn[name] += requested > 0 and record["achieved_ratios"][name] == 0
    per_class = {
        name: {"mae": round(float(np.mean(values)), 4), "requests": len(values)}
        for name, values in errors.items()
        if values
    }
    every_error = [value for values in errors.values() for value in values]
    return {
        "num_samples": len(records),
        "num_requests": len(every_error),
        "mae": round(float(np.mean(every_error)), 4) if every_error else None,
        "per_class": per_class,
        "not_drawn": {name: count for name, count in not_drawn.items() if count},
        "note": "mean |achieved - requested| share of labelled pixels, over the requested classes only",
    }
