"""Segmentation metrics: confusion matrix, per-class IoU, mean IoU and pixel accuracy.

Everything goes through one confusion matrix, so per-class IoU, mIoU and accuracy always agree with
each other. Rows are ground-truth classes, columns are predicted classes.
"""

from __future__ import annotations

import numpy as np
import torch

from segdiff.data import IGNORE_INDEX


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
        read_back = np.asarray(segmenter(image)) == record["class_id"]
        iou = binary_iou(mask, read_back)
        per_sample.append(iou)
        per_class.setdefault(record["class_name"], []).append(iou)
    return {
        "mean_iou": float(np.mean(per_sample)) if per_sample else float("nan"),
        "per_class": {name: float(np.mean(values)) for name, values in per_class.items()},
        "per_sample": per_sample,
    }
