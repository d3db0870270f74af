"""What synthetic data is for: does adding it to the real training set make a segmentation network better?

``evaluate.py --downstream`` trains the same small UNet twice, from the same initial weights, for the same
number of steps with the same batch size and learning rate: once on the real training images only, once on
the real images plus the generated (image, mask) pairs. Both are scored on the same real validation images,
and the difference of their mIoUs is the gain the synthetic data brought.

Everything is held in memory at ``resolution x resolution`` (images bilinear, masks nearest, stretched
when not square), so a run is a few hundred small steps: about 40 s for both runs on a 2-core CPU for the
toy data (512 real + 256 synthetic 32 px pairs, 300 steps; OMP_NUM_THREADS=1 on a shared, busy CPU, where
two OpenMP threads per process make these tiny convolutions many times slower).
The network is deliberately small (about 0.1 M parameters): the point is comparing two training sets on
equal terms, not reaching a state-of-the-art score.

The joint generator's masks are class-vs-rest (``synthetic_class_ids``): only each mask's own class is labelled,
its "rest" becomes ``ignore_index`` (see ``class_vs_rest_labels``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from segdiff.data import check_label_ids, read_image, read_label_map
from segdiff.labels import IGNORE_INDEX, resize_labels
from segdiff.metrics import confusion_matrix, segmentation_summary


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # BatchNorm rather than GroupNorm: about twice as fast on a CPU, and batches of 16 give it enough statistics.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinySegmentationUNet(nn.Module):
    """A two-level UNet: ``(B, 3, H, W)`` images in [-1, 1] -> ``(B, num_classes, H, W)`` logits.

    H and W must be multiples of 4 (two 2x poolings).
    """

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.encoder1 = _conv_block(3, width)
        self.encoder2 = _conv_block(width, 2 * width)
        self.middle = _conv_block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.decoder2 = _conv_block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.decoder1 = _conv_block(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skip1 = self.encoder1(images)
        skip2 = self.encoder2(F.max_pool2d(skip1, 2))
        hidden = self.middle(F.max_pool2d(skip2, 2))
        hidden = self.decoder2(torch.cat([self.up2(hidden), skip2], dim=1))
        hidden = self.decoder1(torch.cat([self.up1(hidden), skip1], dim=1))
        return self.head(hidden)


def class_vs_rest_labels(label: np.ndarray, class_id: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A class-vs-rest mask as training labels: ``class_id`` where the mask marks it, ``ignore_index`` elsewhere.

    The joint generator writes "the rest" as class 0 (or as ignore_index), but it holds whatever other classes the
    image shows: trained on as class 0, it would teach the segmenter that all of them are background. Ignored, it
    costs no loss, and each synthetic pair teaches only the class it was generated for.
    """
    return np.where(label == class_id, class_id, ignore_index)


def load_pairs(
    pairs: list[tuple[Path, Path]],
    resolution: int,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    desc: str = "loading",
    class_ids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read (image, mask) files into ``uint8 (N, 3, R, R)`` images and ``int16 (N, R, R)`` label maps.

    With ``class_ids`` (one per pair), the masks are class-vs-rest: each keeps only its class, the rest becomes
    ``ignore_index`` (``class_vs_rest_labels``). Raises ``DatasetError`` naming the mask file when it holds an id
    that is neither a class nor ``ignore_index``: training on it would crash deep inside the loss, or silently
    learn garbage.
    """
    if class_ids is not None and len(class_ids) != len(pairs):
        raise ValueError(f"class_ids has {len(class_ids)} entries for {len(pairs)} pairs")
    images = torch.empty((len(pairs), 3, resolution, resolution), dtype=torch.uint8)
    labels = torch.empty((len(pairs), resolution, resolution), dtype=torch.int16)  # fits 255 and any class id
    for index, (image_path, mask_path) in enumerate(tqdm(pairs, desc=desc, unit="pair", leave=False)):
        image = read_image(image_path).resize((resolution, resolution), Image.BILINEAR)
        label = read_label_map(mask_path)
        check_label_ids(label, num_classes, ignore_index, mask_path)
        if class_ids is not None:
            label = class_vs_rest_labels(label, class_ids[index], ignore_index)
        label = resize_labels(label, resolution, resolution)
        images[index] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        labels[index] = torch.from_numpy(label.astype(np.int16))
    return images, labels


def _to_model_input(images: torch.Tensor, device) -> torch.Tensor:
    return images.to(device).float() / 127.5 - 1.0


def train_segmentation_net(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    device: str | torch.device = "cpu",
    desc: str = "training",
) -> TinySegmentationUNet:
    """Train a fresh ``TinySegmentationUNet`` for exactly ``steps`` steps on random batches (with flips).

    The same ``seed`` gives the same initial weights and the same batch order whatever the data size, so
    two calls differ only in what they are trained on.
    """
    torch.manual_seed(seed)
    model = TinySegmentationUNet(num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    progress = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for _ in progress:
        indices = torch.randint(len(images), (batch_size,), generator=generator)
        flips = torch.rand(batch_size, generator=generator) < 0.5
        batch_images, batch_labels = images[indices].clone(), labels[indices].long()
        batch_images[flips] = batch_images[flips].flip(-1)
        batch_labels[flips] = batch_labels[flips].flip(-1)
        batch_labels = batch_labels.to(device)
        if not (batch_labels != ignore_index).any():
            continue  # a batch of no-data only: the loss would be NaN; the step still counts
        loss = F.cross_entropy(model(_to_model_input(batch_images, device)), batch_labels, ignore_index=ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model


@torch.no_grad()
def evaluate_segmentation_net(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The ``[C, C]`` confusion matrix of the model's predictions on the images (at their stored size)."""
    model.eval()
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.long)
    for start in range(0, len(images), batch_size):
        logits = model(_to_model_input(images[start : start + batch_size], device))
        predictions = logits.argmax(dim=1).cpu()
        confusion += confusion_matrix(predictions, labels[start : start + batch_size], num_classes, ignore_index)
    return confusion


def run_downstream(
    real_train: list[tuple[Path, Path]],
    synthetic: list[tuple[Path, Path]],
    real_val: list[tuple[Path, Path]],
    class_names: list[str],
    *,
    steps: int = 300,
    resolution: int = 32,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    device: str | torch.device = "cpu",
    synthetic_class_ids: list[int] | None = None,
) -> dict:
    """Train on real only and on real + synthetic, score both on the real validation pairs.

    ``synthetic_class_ids``: for class-vs-rest synthetic masks (the joint generator's), the class each one
    marks; their other pixels are ignored in training. Returns both scores (mIoU, pixel accuracy, per-class IoU),
    the mIoU gain of adding the synthetic pairs, and the settings, ready for metrics.json.
    """
    if resolution % 4:
        raise ValueError(f"--downstream_resolution must be a multiple of 4, got {resolution}")
    num_classes = len(class_names)
    started = time.perf_counter()
    load = {"resolution": resolution, "num_classes": num_classes, "ignore_index": ignore_index}
    train_images, train_labels = load_pairs(real_train, desc="real train", **load)
    synthetic_images, synthetic_labels = load_pairs(synthetic, desc="synthetic", class_ids=synthetic_class_ids, **load)
    val_images, val_labels = load_pairs(real_val, desc="real val", **load)

    # Real + synthetic is one pool sampled uniformly: the usual "add the generated set to the training set".
    training_sets = {
        "real_only": (train_images, train_labels),
        "real_plus_synthetic": (
            torch.cat([train_images, synthetic_images]),
            torch.cat([train_labels, synthetic_labels]),
        ),
    }
    results = {}
    for name, (images, labels) in training_sets.items():
        model = train_segmentation_net(
            images,
            labels,
            num_classes,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            ignore_index=ignore_index,
            device=device,
            desc=f"downstream: {name.replace('_', ' ')}",
        )
        confusion = evaluate_segmentation_net(
            model, val_images, val_labels, num_classes, ignore_index=ignore_index, device=device
        )
        results[name] = segmentation_summary(confusion, class_names)

    return {
        "miou_real_only": results["real_only"]["miou"],
        "miou_real_plus_synthetic": results["real_plus_synthetic"]["miou"],
        "miou_gain": results["real_plus_synthetic"]["miou"] - results["real_only"]["miou"],
        "pixel_accuracy_real_only": results["real_only"]["pixel_accuracy"],
        "pixel_accuracy_real_plus_synthetic": results["real_plus_synthetic"]["pixel_accuracy"],
        "per_class_iou_real_only": results["real_only"]["per_class_iou"],
        "per_class_iou_real_plus_synthetic": results["real_plus_synthetic"]["per_class_iou"],
        "num_real_train": len(real_train),
        "num_synthetic": len(synthetic),
        "synthetic_labels": "full label maps"
        if synthetic_class_ids is None
        else "class-vs-rest masks (joint layout): each mask's class labelled, the rest ignored",
        "num_real_val": len(real_val),
        "steps": steps,
        "resolution": resolution,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
