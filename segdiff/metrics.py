"""Segmentation metrics: confusion matrix, per-class IoU, mean IoU and pixel accuracy.

Everything goes through one confusion matrix, so per-class IoU, mIoU and accuracy always agree with
each other. Rows are ground-truth classes, columns are predicted classes.
"""

from __future__ import annotations

import numpy as np
import torch

from segdiff.labels import IGNORE_INDEX


def _as_long_tensor(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.long)
    return torch.as_tensor(np.asarray(values), dtype=torch.long)


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Count ``[target class, predicted class]`` pairs over all pixels, as a ``[C, C]`` LongTensor.

    ``pred`` and ``target`` are label maps of the same shape (any batch shape; numpy or torch).
    Pixels whose target is ``ignore_index`` are skipped. Any other id outside ``0..C-1`` is an error:
    silently dropping it would inflate the scores.
    """
    pred, target = _as_long_tensor(pred), _as_long_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")

    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    for name, ids in (("target", target), ("pred", pred)):
        if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"{name} has class ids outside 0..{num_classes - 1}: {ids.unique().tolist()}")

    # Each (target, pred) pair gets its own bin; bincount counts them all in one pass.
    pair_index = target * num_classes + pred
    counts = torch.bincount(pair_index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """Intersection over union per class; NaN for a class absent from both prediction and target."""
    confusion = confusion.double()
    true_positives = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positives
    return torch.where(union > 0, true_positives / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(pred, target, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean of the per-class IoUs over the classes that occur (in prediction or target)."""
    ious = iou_per_class(confusion_matrix(pred, target, num_classes, ignore_index))
    return float(ious.nanmean())


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Fraction of counted pixels whose predicted class is the target class (NaN when none counted)."""
    total = confusion.sum()
    if total == 0:
        return float("nan")
    return float(confusion.diagonal().sum().double() / total)


def binary_iou(a, b) -> float:
    """IoU of two boolean masks; 1.0 when both are empty (they agree that the class is absent)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def sample_agreement(image, mask, class_id: int, segmenter) -> float:
    """One joint sample's agreement: the IoU of its binary ``mask`` and the pixels the segmenter reads as
    ``class_id`` in its ``image``."""
    return binary_iou(np.asarray(mask), np.asarray(segmenter(image)) == class_id)


def mask_agreement(dataset_dir, segmenter) -> dict:
    """Image/mask agreement of a joint generator's output folder.

    For each sample of ``metadata.jsonl``: the IoU between the generated mask and the pixels the
    segmenter reads as that sample's class in the generated image. Returns the mean, the mean per
    class and the per-sample values.
    """
    import json
    from pathlib import Path

    from PIL import Image

    dataset_dir = Path(dataset_dir)
    records = [json.loads(line) for line in (dataset_dir / "metadata.jsonl").read_text().splitlines()]
    per_sample, per_class = [], {}
    for record in records:
        image = Image.open(dataset_dir / record["file_name"]).convert("RGB")
        mask = np.asarray(Image.open(dataset_dir / record["mask_file_name"])) == record["class_id"]
        iou = sample_agreement(image, mask, record["class_id"], segmenter)
        per_sample.append(iou)
        per_class.setdefault(record["class_name"], []).append(iou)
    return {
        "mean_iou": float(np.mean(per_sample)) if per_sample else float("nan"),
        "per_class": {name: float(np.mean(values)) for name, values in per_class.items()},
        "per_sample": per_sample,
    }


# ---------------------------------------------------------------------------------------------------------
# Used by evaluate.py: a summary of a confusion matrix, pairwise diversity, colour-histogram style.


def segmentation_summary(confusion: torch.Tensor, class_names: list[str]) -> dict:
    """mIoU, pixel accuracy and per-class IoU (``None`` for absent classes) of a confusion matrix.

    The matrix may have extra trailing columns beyond ``len(class_names)`` (predictions that are none of
    our classes, e.g. a segmenter's foreign classes): they count as wrong for the target class, and get
    no IoU of their own.
    """
    ious = iou_per_class(confusion)[: len(class_names)]
    return {
        "miou": float(ious.nanmean()),
        "pixel_accuracy": pixel_accuracy(confusion),
        "per_class_iou": {name: (None if iou.isnan() else float(iou)) for name, iou in zip(class_names, ious)},
    }


def mean_pairwise_distance(items: torch.Tensor, distance, batch_size: int = 32) -> float:
    """Mean of ``distance(a, b)`` over all unordered pairs of the ``N >= 2`` items (dimension 0).

    ``distance`` takes two batches of items and returns one value per pair (any shape that flattens to
    the batch size), e.g. an ``lpips.LPIPS`` module. Pairs are fed ``batch_size`` at a time.
    """
    if len(items) < 2:
        raise ValueError(f"pairwise distances need at least 2 items, got {len(items)}")
    first, second = torch.triu_indices(len(items), len(items), offset=1)
    total = 0.0
    for start in range(0, len(first), batch_size):
        a, b = first[start : start + batch_size], second[start : start + batch_size]
        total += float(distance(items[a], items[b]).double().sum())
    return total / len(first)


def color_histograms(image, bins: int = 64) -> np.ndarray:
    """Per-channel histograms of an RGB image (PIL, or ``HxWx3`` uint8), shaped ``(3, bins)``, over 0..255."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {pixels.shape}")
    # Integer binning (value * bins // 256), so each bin covers the same number of byte values.
    binned = pixels.reshape(-1, 3).astype(np.int64) * bins // 256
    return np.stack([np.bincount(binned[:, channel], minlength=bins) for channel in range(3)]).astype(np.float64)


def histogram_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson correlation of two histograms: OpenCV's ``compareHist(..., HISTCMP_CORREL)``.

    1.0 for histograms of the same shape (whatever their scale, so image sizes need not match), lower
    for different ones, down to -1. Like OpenCV, two constant histograms (zero variance) give 1.0.
    """
    first, second = np.asarray(first, dtype=np.float64).ravel(), np.asarray(second, dtype=np.float64).ravel()
    if first.shape != second.shape:
        raise ValueError(f"histograms differ in size: {first.size} vs {second.size} bins")
    first, second = first - first.mean(), second - second.mean()
    denominator = np.sqrt((first**2).sum() * (second**2).sum())
    if denominator <= np.finfo(np.float64).eps:
        return 1.0
    return float((first * second).sum() / denominator)


def color_histogram_similarity(first, second, bins: int = 64) -> float:
    """Mean over R, G, B of the histogram correlation of two images: 1.0 for the same colour distribution."""
    first, second = color_histograms(first, bins), color_histograms(second, bins)
    return float(np.mean([histogram_correlation(a, b) for a, b in zip(first, second)]))
