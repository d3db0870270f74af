"""What synthetic data is for: does it make a segmentation network better than what a practitioner tries first?

``evaluate.py --downstream`` trains the same segmenter (a small UNet, or a SegFormer) once per *arm* and per seed,
from the same initial weights, for the same number of steps with the same batch size and learning rate:

* ``real_only``: the real training pairs;
* ``real_plus_oversampling``: plus as many extra copies of real pairs as there are synthetic pairs, chosen by
  repeat-factor sampling (LVIS, Gupta et al. 2019): rare classes' images are repeated most;
* ``real_plus_synthetic``: plus the generated pairs;
* ``real_plus_synthetic_plus_oversampling``: real and generated pairs pooled, plus as many extra copies of pooled
  pairs, by repeat-factor sampling over the pool.

Every arm is scored on the same real validation pairs. The synthetic data earns its keep only where
``real_plus_synthetic`` beats ``real_plus_oversampling``: both add the same number of pairs to the same real ones.
The real-only segmenter of the first seed also reads the synthetic images against their own masks: which classes
the renderer does not yet draw so that a segmenter trained on real images recognises them.

Everything is held in memory at one ``resolution`` (height x width; images bilinear, masks nearest, each
stretched where its aspect ratio is another), so a run is a few hundred small steps: about 20 s per arm and seed on
a 2-core CPU for the toy data (512 real + 256 synthetic 32 px pairs, 300 steps; OMP_NUM_THREADS=1 on a shared,
busy CPU, where two OpenMP threads per process make these tiny convolutions many times slower).
The UNet is deliberately small (about 0.1 M parameters): the point is comparing training sets on
equal terms, not reaching a state-of-the-art score.

The joint generator's masks are class-vs-rest (``synthetic_class_ids``): only each mask's own class is labelled,
its "rest" becomes ``ignore_index`` (see ``class_vs_rest_labels``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from segdiff.data import DatasetError, check_label_ids, decode_label_ids, read_image, read_label_map
from segdiff.geometry import ImageSize
from segdiff.labels import IGNORE_INDEX, resize_labels
from segdiff.metrics import confusion_matrix, segmentation_summary

ARMS = ("real_only", "real_plus_oversampling", "real_plus_synthetic", "real_plus_synthetic_plus_oversampling")
MODELS = ("unet", "segformer")
# A class the synthetic data makes worse: its IoU with synthetic data falls below oversampling's by more than this.
WORSE_THRESHOLD = 0.05

# ------------------------------------------------------------------------------------------------
# The segmenters: (B, 3, H, W) images in [-1, 1] -> (B, num_classes, H, W) logits
# ------------------------------------------------------------------------------------------------


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


class SegformerSegmenter(nn.Module):
    """transformers' ``SegformerForSemanticSegmentation`` with the UNet's contract: images in [-1, 1] in, logits at
    the image size out (SegFormer's own are at a quarter of it: upsampled bilinearly, for the loss and the
    prediction alike)."""

    def __init__(self, segformer: nn.Module):
        super().__init__()
        from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.segformer = segformer
        # SegFormer's usual input, which a pretrained encoder expects: ImageNet mean and std.
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixel_values = ((images + 1) / 2 - self.mean) / self.std
        logits = self.segformer(pixel_values=pixel_values).logits
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def tiny_segformer(num_classes: int) -> nn.Module:
    """A randomly initialised SegFormer small enough for a CPU at 32 px: hidden sizes 16 to 128, one block per
    stage (0.46 M parameters)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_labels=num_classes,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 2, 4],
        decoder_hidden_size=64,
    )
    return SegformerForSemanticSegmentation(config)


def pretrained_segformer(folder: str | Path, num_classes: int) -> nn.Module:
    """A local SegFormer folder (``save_pretrained``), its head replaced by a fresh one for ``num_classes``."""
    from transformers import SegformerForSemanticSegmentation

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise DatasetError(
            f"--downstream_pretrained {folder} is not a model folder (no config.json). Fix: pass a folder written by "
            "SegformerForSemanticSegmentation.save_pretrained (or a SegFormer encoder's)."
        )
    return SegformerForSemanticSegmentation.from_pretrained(
        folder, num_labels=num_classes, ignore_mismatched_sizes=True, local_files_only=True
    )


def build_segmentation_net(model: str, num_classes: int, pretrained: str | Path | None = None) -> nn.Module:
    """``model`` (one of ``MODELS``) for ``num_classes``; ``pretrained``: a SegFormer folder to start from."""
    if model == "unet":
        if pretrained is not None:
            raise DatasetError(
                "--downstream_pretrained is a SegFormer folder: use it with --downstream_model segformer."
            )
        return TinySegmentationUNet(num_classes)
    if model == "segformer":
        segformer = tiny_segformer(num_classes) if pretrained is None else pretrained_segformer(pretrained, num_classes)
        return SegformerSegmenter(segformer)
    raise ValueError(f"unknown downstream model {model!r}: choose among {', '.join(MODELS)}")


# ------------------------------------------------------------------------------------------------
# The pairs, in memory
# ------------------------------------------------------------------------------------------------


def class_vs_rest_labels(label: np.ndarray, class_id: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A class-vs-rest mask as training labels: ``class_id`` where the mask marks it, ``ignore_index`` elsewhere.

    The joint generator writes "the rest" as class 0 (or as ignore_index), but it holds whatever other classes the
    image shows: trained on as class 0, it would teach the segmenter that all of them are background. Ignored, it
    costs no loss, and each synthetic pair teaches only the class it was generated for.
    """
    return np.where(label == class_id, class_id, ignore_index)


def load_pairs(
    pairs: list[tuple[Path, Path]],
    resolution: ImageSize | int,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    desc: str = "loading",
    class_ids: list[int] | None = None,
    label_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read (image, mask) files into ``uint8 (N, 3, H, W)`` images and ``int16 (N, H, W)`` label maps, at
    ``resolution`` (N: N x N).

    ``label_offset``: how the mask files encode classes (`segdiff.data.LABEL_OFFSETS`: LoveDA's files hold 0 for
    no-data and class + 1), decoded as the dataset's own items are.

    With ``class_ids`` (one per pair), the masks are class-vs-rest: each keeps only its class, the rest becomes
    ``ignore_index`` (``class_vs_rest_labels``). Raises ``DatasetError`` naming the mask file when it holds an id
    that is neither a class nor ``ignore_index``: training on it would crash deep inside the loss, or silently
    learn garbage.
    """
    if class_ids is not None and len(class_ids) != len(pairs):
        raise ValueError(f"class_ids has {len(class_ids)} entries for {len(pairs)} pairs")
    height, width = ImageSize.of(resolution)
    images = torch.empty((len(pairs), 3, height, width), dtype=torch.uint8)
    labels = torch.empty((len(pairs), height, width), dtype=torch.int16)  # fits 255 and any class id
    for index, (image_path, mask_path) in enumerate(tqdm(pairs, desc=desc, unit="pair", leave=False)):
        image = read_image(image_path).resize((width, height), Image.BILINEAR)
        label = decode_label_ids(read_label_map(mask_path), label_offset, ignore_index)
        check_label_ids(label, num_classes, ignore_index, mask_path, label_offset)
        if class_ids is not None:
            label = class_vs_rest_labels(label, class_ids[index], ignore_index)
        label = resize_labels(label, height, width)
        images[index] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        labels[index] = torch.from_numpy(label.astype(np.int16))
    return images, labels


def class_pixels(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Each class's pixel count in the label maps (``ignore_index`` and other ids not counted)."""
    ids = labels[(labels >= 0) & (labels < num_classes)].long()
    return torch.bincount(ids, minlength=num_classes).tolist()


def classes_present(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``bool (N, num_classes)``: which classes each label map shows (``ignore_index`` is none)."""
    present = torch.zeros((len(labels), num_classes), dtype=torch.bool)
    for class_id in range(num_classes):
        present[:, class_id] = (labels == class_id).flatten(1).any(dim=1)
    return present


# ------------------------------------------------------------------------------------------------
# Repeat-factor sampling (LVIS): the oversampling a practitioner tries first
# ------------------------------------------------------------------------------------------------


def class_repeat_factors(present: torch.Tensor, threshold: float) -> torch.Tensor:
    """LVIS's repeat factor of each class: r(c) = max(1, sqrt(t / f(c))), where f(c) is the share of the images that
    show class c and t the threshold (infinite for a class no image shows). ``present``: `classes_present`'s."""
    return (threshold / present.double().mean(dim=0)).sqrt().clamp(min=1.0)


def repeat_factors(present: torch.Tensor, threshold: float) -> torch.Tensor:
    """LVIS's repeat factor of each image: the largest of its classes' (1 for an image that shows no class)."""
    factors = class_repeat_factors(present, threshold).expand_as(present)
    return torch.where(present, factors, torch.ones_like(factors)).max(dim=1).values


def rarest_class_share(present: torch.Tensor) -> torch.Tensor:
    """``float64 (N,)``: per image, the image share f(c) of its rarest class; infinite for an image that shows no
    class (it is never repeated). An image's repeat factor is max(1, sqrt(t / this))."""
    shares = present.double().mean(dim=0).expand_as(present)
    return torch.where(present, shares, torch.full_like(shares, math.inf)).min(dim=1).values


def threshold_for_extra_pairs(present: torch.Tensor, num_extra: int) -> float:
    """The threshold t at which the repeat factors add exactly ``num_extra`` expected copies: sum(r - 1) = num_extra.

    Above t = g (g: an image's rarest-class share) the image adds sqrt(t / g) - 1 copies, so with the images of the
    m smallest g repeated, sqrt(t) = (num_extra + m) / sum(g^-1/2) over them: the m for which that t lies between
    the m-th and the (m+1)-th smallest g is the solution (the sum grows with t, so there is one).
    """
    if num_extra <= 0:
        raise ValueError(f"num_extra must be positive, got {num_extra}")
    shares = rarest_class_share(present)
    shares = shares[shares.isfinite()].sort().values
    if len(shares) == 0:
        raise DatasetError("no training label map holds a class: there is nothing to oversample.")
    inverse_roots = shares.rsqrt().cumsum(dim=0)
    for count in range(1, len(shares) + 1):
        threshold = float(((num_extra + count) / inverse_roots[count - 1]) ** 2)
        if count == len(shares) or threshold <= shares[count]:
            return threshold
    raise AssertionError("unreachable: the last count always returns")


def extra_copies(present: torch.Tensor, num_extra: int, threshold: float, seed: int) -> torch.Tensor:
    """The indices of ``num_extra`` extra copies of the images, by repeat-factor sampling.

    Each image's expected extra copies are proportional to r - 1, its repeat factor at ``threshold`` minus the
    copy it has (at `threshold_for_extra_pairs`' threshold, exactly r - 1: LVIS's own numbers). They become whole
    copies by systematic sampling with a seeded offset: each image gets its expected count rounded down or up, on
    average exactly the expected count, and the total is exactly ``num_extra``: the same number of pairs as the
    synthetic data adds, for a fair comparison.
    """
    weights = repeat_factors(present, threshold) - 1
    if weights.sum() <= 0:
        lowest = float(rarest_class_share(present).min())
        raise DatasetError(
            f"--downstream_oversampling_threshold {threshold} is at or below every class's image share (the rarest "
            f"is in {lowest:.3f} of the images): no image would be repeated. Fix: raise it, or leave it out to have "
            "it chosen."
        )
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), weights.cumsum(dim=0)])
    cumulative = cumulative * (num_extra / cumulative[-1])
    cumulative[-1] = num_extra  # exactly: a rounding error below it would lose the last copy
    offset = 1 - torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # in (0, 1]
    counts = torch.floor(cumulative - offset).diff().long()  # the grid points offset + k in each image's interval
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


# ------------------------------------------------------------------------------------------------
# Training and scoring one segmenter
# ------------------------------------------------------------------------------------------------


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
    model: str = "unet",
    pretrained: str | Path | None = None,
    desc: str = "training",
) -> nn.Module:
    """Train a fresh segmenter (`build_segmentation_net`) for exactly ``steps`` steps on random batches (with flips).

    The same ``seed`` gives the same initial weights and the same batch order whatever the data size, so
    two calls differ only in what they are trained on.
    """
    torch.manual_seed(seed)
    network = build_segmentation_net(model, num_classes, pretrained).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    network.train()
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
        logits = network(_to_model_input(batch_images, device))
        loss = F.cross_entropy(logits, batch_labels, ignore_index=ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return network


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


# ------------------------------------------------------------------------------------------------
# The arms, over seeds
# ------------------------------------------------------------------------------------------------


def oversampled(pairs: tuple, class_names: list[str], num_extra: int, threshold: float | None, seed: int):
    """``pairs`` (images, labels) plus ``num_extra`` extra copies by repeat-factor sampling, and the threshold used
    (None: `threshold_for_extra_pairs`') with each class's repeat factor at it. ``seed`` seeds the rounding."""
    present = classes_present(pairs[1], len(class_names))
    if threshold is None:
        threshold = threshold_for_extra_pairs(present, num_extra)
    copies = extra_copies(present, num_extra, threshold, seed)
    factors = class_repeat_factors(present, threshold).tolist()
    numbers = {"threshold": threshold, "class_repeat_factors": dict(zip(class_names, factors))}
    return tuple(torch.cat([part, part[copies]]) for part in pairs), numbers


def arm_training_sets(real: tuple, synthetic: tuple, class_names: list[str], threshold: float | None, seed: int):
    """Each arm's (images, labels), and for the oversampled arms the threshold and class repeat factors used.

    ``real`` and ``synthetic`` are (images, labels) pairs of tensors. Each oversampled arm adds as many extra
    copies of its pool's pairs as there are synthetic pairs.
    """
    num_extra = len(synthetic[0])
    pooled = tuple(torch.cat([real_part, synthetic_part]) for real_part, synthetic_part in zip(real, synthetic))
    real_oversampled, real_numbers = oversampled(real, class_names, num_extra, threshold, seed)
    pooled_oversampled, pooled_numbers = oversampled(pooled, class_names, num_extra, threshold, seed)
    sets = {
        "real_only": real,
        "real_plus_oversampling": real_oversampled,
        "real_plus_synthetic": pooled,
        "real_plus_synthetic_plus_oversampling": pooled_oversampled,
    }
    return sets, {"real_plus_oversampling": real_numbers, "real_plus_synthetic_plus_oversampling": pooled_numbers}


def spread(values: list) -> dict:
    """Mean and sample standard deviation over seeds of the values that exist (an IoU is None for a class neither
    in the labels nor predicted), with the values themselves."""
    known = [value for value in values if value is not None]
    return {
        "mean": float(np.mean(known)) if known else None,
        "std": float(np.std(known, ddof=1)) if len(known) > 1 else None,
        "per_seed": values,
    }


def change(after: list, before: list) -> dict:
    """``spread`` of the per-seed differences after - before, with the number of seeds where it is positive."""
    differences = [None if a is None or b is None else a - b for a, b in zip(after, before)]
    return {**spread(differences), "positive_seeds": sum(1 for value in differences if value is not None and value > 0)}


def per_seed(scores: list[dict], key: str) -> list:
    """One score (miou, pixel_accuracy) of every seed's summary."""
    return [score[key] for score in scores]


def per_seed_iou(scores: list[dict], class_name: str) -> list:
    """One class's IoU in every seed's summary."""
    return [score["per_class_iou"][class_name] for score in scores]


def arm_summary(runs: list[dict], num_pairs: int, class_names: list[str]) -> dict:
    """An arm's pairs, and the ``spread`` over seeds of its mIoU, pixel accuracy and per-class IoU."""
    return {
        "num_pairs": num_pairs,
        "miou": spread(per_seed(runs, "miou")),
        "pixel_accuracy": spread(per_seed(runs, "pixel_accuracy")),
        "per_class_iou": {name: spread(per_seed_iou(runs, name)) for name in class_names},
    }


def comparison(after: list[dict], before: list[dict], class_names: list[str]) -> dict:
    """The change of mIoU and of each class's IoU from the ``before`` arm's runs to the ``after`` arm's, per seed."""
    return {
        "miou": change(per_seed(after, "miou"), per_seed(before, "miou")),
        "per_class_iou": {name: change(per_seed_iou(after, name), per_seed_iou(before, name)) for name in class_names},
    }


def run_downstream(
    real_train: list[tuple[Path, Path]],
    synthetic: list[tuple[Path, Path]],
    real_val: list[tuple[Path, Path]],
    class_names: list[str],
    *,
    steps: int = 300,
    resolution: ImageSize | int = 32,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seeds: list[int] = (0,),
    model: str = "unet",
    pretrained: str | Path | None = None,
    oversampling_threshold: float | None = None,
    worse_threshold: float = WORSE_THRESHOLD,
    ignore_index: int = IGNORE_INDEX,
    device: str | torch.device = "cpu",
    synthetic_class_ids: list[int] | None = None,
    real_label_offset: int = 0,
    val_label_offset: int = 0,
) -> dict:
    """Train every arm (``ARMS``) once per seed, score each on the real validation pairs, and compare.

    ``synthetic_class_ids``: for class-vs-rest synthetic masks (the joint generator's), the class each one
    marks; their other pixels are ignored in training. ``real_label_offset``, ``val_label_offset``: how the real
    mask files encode classes (LoveDA's: 1, see `load_pairs`); the synthetic ones hold class ids.

    Returns, ready for metrics.json: per arm the mean, spread and per-seed values of mIoU, pixel accuracy and
    per-class IoU; each arm's change from real only and the synthetic arm's change from the oversampled one (per
    seed, with the seeds where it is positive); the classes the synthetic data makes worse; the render fidelity per
    class; each class's training pixels; the settings.
    """
    resolution = ImageSize.of(resolution)  # N: N x N
    if resolution.height % 4 or resolution.width % 4:
        raise ValueError(f"--downstream_resolution must be multiples of 4, got {resolution}")
    if not synthetic:
        raise DatasetError("--downstream has no synthetic pairs to add: there is nothing to compare.")
    seeds = list(seeds)
    num_classes = len(class_names)
    started = time.perf_counter()
    load = {"resolution": resolution, "num_classes": num_classes, "ignore_index": ignore_index}
    real = load_pairs(real_train, desc="real train", label_offset=real_label_offset, **load)
    generated = load_pairs(synthetic, desc="synthetic", class_ids=synthetic_class_ids, **load)
    val_images, val_labels = load_pairs(real_val, desc="real val", label_offset=val_label_offset, **load)
    settings = {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "model": model}
    settings.update(pretrained=pretrained, ignore_index=ignore_index, device=device)

    scores = {arm: [] for arm in ARMS}
    render_fidelity = None
    for seed in seeds:
        training_sets, oversampling = arm_training_sets(real, generated, class_names, oversampling_threshold, seed)
        for arm, (images, labels) in training_sets.items():
            network = train_segmentation_net(
                images, labels, num_classes, seed=seed, desc=f"downstream seed {seed}: {arm}", **settings
            )
            scoring = {"ignore_index": ignore_index, "device": device}
            confusion = evaluate_segmentation_net(network, val_images, val_labels, num_classes, **scoring)
            scores[arm].append(segmentation_summary(confusion, class_names))
            if render_fidelity is None and arm == "real_only":
                # Which classes the renderer draws so that a segmenter of real images recognises them. Next to it,
                # how well that same reader reads each class on the real val images: a rare class it cannot read
                # there either (before any synthetic data, the usual case) gets a low render IoU whatever the
                # renderer draws, so only a render IoU well below the reader's own tells of the renderer.
                confusion = evaluate_segmentation_net(network, *generated, num_classes, **scoring)
                render_fidelity = {
                    **segmentation_summary(confusion, class_names),
                    "seed": seed,
                    "reader_real_val_iou": scores[arm][-1]["per_class_iou"],
                }

    synthetic_vs_oversampling = comparison(scores["real_plus_synthetic"], scores["real_plus_oversampling"], class_names)
    worse = [
        name
        for name, difference in synthetic_vs_oversampling["per_class_iou"].items()
        if difference["mean"] is not None and difference["mean"] < -worse_threshold
    ]
    return {
        "arms": {arm: arm_summary(scores[arm], len(training_sets[arm][0]), class_names) for arm in ARMS},
        "change_vs_real_only": {
            arm: comparison(scores[arm], scores["real_only"], class_names) for arm in ARMS if arm != "real_only"
        },
        "synthetic_vs_oversampling": synthetic_vs_oversampling,
        "classes_made_worse": worse,
        "worse_threshold": worse_threshold,
        "render_fidelity": render_fidelity,
        "train_pixels_per_class": dict(zip(class_names, class_pixels(real[1], num_classes))),
        "oversampling": oversampling,
        "num_real_train": len(real_train),
        "num_synthetic": len(synthetic),
        "synthetic_labels": "full label maps"
        if synthetic_class_ids is None
        else "class-vs-rest masks (joint layout): each mask's class labelled, the rest ignored",
        "num_real_val": len(real_val),
        "seeds": seeds,
        "model": model,
        "pretrained": None if pretrained is None else str(pretrained),
        "steps": steps,
        "resolution": resolution.config_value(),  # N for a square, else [height, width]
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seconds": round(time.perf_counter() - started, 1),
    }
