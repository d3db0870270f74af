"""The metrics of evaluate.py that run a network or read image files: FID and KID (torch-fidelity's protocol),
LPIPS diversity, semantic consistency (a segmenter's reading of the images against their masks) and colour style.

segdiff.metrics holds the arithmetic underneath (confusion matrix, IoU, pairwise distance, histogram correlation),
cheap to import and free of networks and files; this module finds and loads the networks, reads the images and
feeds them, and returns each metric as the entries evaluate.py writes to metrics.json.

Weights are offline files only, never downloaded: Inception and AlexNet are read with torch.load(weights_only=True)
(tensors, no code from the file); only --feature_extractor_torchscript, which the user vouches for, runs code from
its file. The heavy libraries (torch-fidelity, lpips, transformers) are imported by the function that needs them.
A problem with the inputs raises DatasetError naming the file or option and the fix.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from segdiff.data import IMAGE_EXTENSIONS, DatasetError, check_label_ids, files_by_stem, read_image, read_label_map
from segdiff.labels import resize_labels
from segdiff.metrics import color_histogram_similarity, confusion_matrix, mean_pairwise_distance, segmentation_summary

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# pytorch-fid's copy of the same TensorFlow Inception weights, under the same parameter names.
INCEPTION_FILES = (INCEPTION_FILE, "pt_inception-2015-12-05-6726825d.pth")
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
# AlexNet shrinks 32 px to 1x1 before its last layers: LPIPS needs images at least this big.
LPIPS_MIN_SIZE = 64
# torch-fidelity's KID defaults (torch_fidelity.defaults.DEFAULTS: kid_subsets, kid_subset_size, rng_seed), written
# out so that --help needs no torch-fidelity import; a test checks they still agree.
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020

STANDARD_PROTOCOL = (
    "torch-fidelity: uint8 images at their own size into its Inception-v3 (resized to 299 inside, TF1-compatible "
    "bilinear), 2048 pool3 features; FID and KID as torch_fidelity.calculate_metrics(input1=generated, input2=real)"
)


# ------------------------------------------------------------------------------------------------
# Weights files: given, or in the torch hub cache; never downloaded
# ------------------------------------------------------------------------------------------------


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights(file_names: tuple[str, ...]) -> Path | None:
    """The first of these files present in the torch hub cache (where torch-fidelity and torchvision keep them)."""
    return next((hub_checkpoints() / name for name in file_names if (hub_checkpoints() / name).is_file()), None)


def find_weights(given: str | None, option: str, file_names: tuple[str, ...], url: str, needed_by: str) -> Path:
    """The weights file: the option's path, else a known file name in the torch hub cache; else stop now."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise DatasetError(f"{option} {path} does not exist. Fix: check the path (download: {url}).")
        return path
    cached = cached_weights(file_names)
    if cached is not None:
        return cached
    raise DatasetError(
        f"{needed_by} need the weights file {file_names[0]}, and none was given ({option}) or found in the torch hub "
        f"cache {hub_checkpoints()}. evaluate.py never downloads (offline machines would hang). Fix: download "
        f"{url} and pass {option} /path/to/{file_names[0]}, or put it at {hub_checkpoints() / file_names[0]}; "
        "or leave those metrics out of --metrics."
    )


# ------------------------------------------------------------------------------------------------
# FID and KID, by torch-fidelity's protocol
# ------------------------------------------------------------------------------------------------


class FeatureExtractor(torch.nn.Module):
    """uint8 ``(B, 3, H, W)`` images -> float ``(B, D)`` features, whatever network computes them."""

    def __init__(self, network: torch.nn.Module, takes_float: bool, description: str, standard: bool):
        super().__init__()
        self.network, self.takes_float = network, takes_float
        # standard: torch-fidelity's Inception, whose FID/KID compare with published ones.
        self.description, self.standard = description, standard

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.network(images.float() / 255.0 if self.takes_float else images)
        if isinstance(features, tuple):  # torch-fidelity's extractors return one tensor per requested layer
            features = features[0]
        return features.reshape(len(images), -1).float()


def is_torchscript_archive(path: Path) -> bool:
    """A torch.jit.save file: a zip archive with a code/ folder (the module's code, which loading it runs)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def check_inception_file(path: Path) -> None:
    """Refuse a TorchScript archive given as weights at once, before any long work (its code is never run)."""
    if is_torchscript_archive(path):
        raise DatasetError(
            f"--inception_weights {path} is a TorchScript archive, not a state dict. Loading one runs code from the "
            f"file, so --inception_weights never does. Fix: pass torch-fidelity's {INCEPTION_FILE} ({INCEPTION_URL}); "
            "or, only if you trust the file and want it as a custom (non-standard) feature extractor, pass it as "
            f"--feature_extractor_torchscript {path}."
        )


def load_inception(path: Path, device) -> FeatureExtractor:
    """torch-fidelity's Inception-v3 with the weights of ``path``, read with torch.load(weights_only=True) only."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    check_inception_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled object, not plain tensors; or not a torch file at all
        raise DatasetError(
            f"--inception_weights {path} does not load as plain weights with torch.load(weights_only=True) "
            f"({type(err).__name__}: {str(err)[:300]}). evaluate.py reads weights no other way: unpickling anything "
            f"more can run code from the file. Fix: pass torch-fidelity's {INCEPTION_FILE} ({INCEPTION_URL})."
        ) from None
    # torch-fidelity's constructor torch.loads what it is given with weights_only=False: give it a buffer written
    # here from the tensors just read safely, so that nothing but tensor data from the file reaches that unpickler.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    except Exception as err:  # another network's state dict
        raise DatasetError(
            f"--inception_weights {path} is not the Inception-v3 state dict of torch-fidelity "
            f"({type(err).__name__}: {str(err)[:300]}). Fix: pass {INCEPTION_FILE} from {INCEPTION_URL}."
        ) from None
    description = f"torch-fidelity Inception-v3 pool3 (2048 features), weights {path}"
    return FeatureExtractor(inception.to(device), False, description, standard=True)


def load_torchscript_extractor(path: Path, probe_size: tuple[int, int], device) -> FeatureExtractor:
    """--feature_extractor_torchscript: a module the user vouches for (torch.jit.load runs code from the file).

    ``probe_size`` (width, height): the size of the dummy batch that finds out what the module takes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in recent torch, but still the portable format
        try:
            scripted = torch.jit.load(str(path), map_location=device)
        except Exception as err:
            raise DatasetError(
                f"--feature_extractor_torchscript {path} is not a TorchScript module ({type(err).__name__}: "
                f"{str(err)[:300]}). Fix: save one with torch.jit.save, or pass Inception weights with "
                "--inception_weights instead."
            ) from None
    return _probe_scripted(scripted.eval(), path, probe_size, device)


def _probe_scripted(module, path: Path, size: tuple[int, int], device) -> FeatureExtractor:
    """Find out on a dummy batch whether the module takes uint8 or float images, and that it gives (B, D)."""
    width, height = size
    dummy = torch.zeros((2, 3, height, width), dtype=torch.uint8, device=device)
    errors = []
    for takes_float in (False, True):
        try:
            with torch.no_grad():
                features = module(dummy.float() / 255.0 if takes_float else dummy)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {str(err)[:200]}")
            continue
        if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[0] != 2:
            errors.append(f"returned {type(features).__name__} {getattr(features, 'shape', '')}, not (B, D)")
            continue
        num_features = int(features[0].numel())
        kind = "float 0..1" if takes_float else "uint8"
        description = f"TorchScript {path} ({num_features} features, {kind})"
        return FeatureExtractor(module, takes_float, description, standard=False)
    raise DatasetError(
        f"--feature_extractor_torchscript {path} maps neither uint8 nor float (B, 3, {height}, {width}) images to "
        f"(B, D) features: {' | '.join(errors)}. Fix: save a module that does, or set --feature_image_size."
    )


def uint8_tensor(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 tensor of the image, first resized to ``size x size`` (PIL bicubic) if given."""
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def batches_by_size(files: list[Path], batch_size: int, resized: bool) -> list[list[int]]:
    """Indices of ``files`` in batches of one image size each (a batch is one stacked tensor).

    torch-fidelity stacks the images of a batch, so it needs them all one size; in eval mode an image's features do
    not depend on its batch-mates, so batching by size gives each image the features torch-fidelity gives it alone.
    """
    by_size: dict[tuple[int, int] | None, list[int]] = {}
    for index, path in enumerate(files):
        if resized:  # all the same size once resized: no need to open them here
            by_size.setdefault(None, []).append(index)
            continue
        try:
            with Image.open(path) as image:
                size = image.size
        except OSError as err:
            raise DatasetError(f"cannot read image {path} ({err}). Fix: re-export it, or remove it.") from None
        by_size.setdefault(size, []).append(index)
    return [
        indices[start : start + batch_size]
        for indices in by_size.values()
        for start in range(0, len(indices), batch_size)
    ]


def extract_features(
    files: list[Path], extractor: FeatureExtractor, device, *, batch_size: int, image_size: int | None, desc: str
) -> torch.Tensor:
    """The extractor's ``(N, D)`` features of ``files``, in their order (KID's subsets are drawn by index).

    ``image_size``: resize every image to that side first (non-standard); None feeds them at their own size.
    """
    features: torch.Tensor | None = None
    for indices in tqdm(
        batches_by_size(files, batch_size, image_size is not None), desc=desc, unit="batch", leave=False
    ):
        images = torch.stack([uint8_tensor(read_image(files[index]), image_size) for index in indices])
        batch = extractor(images.to(device)).cpu()
        if features is None:
            features = torch.empty((len(files), batch.shape[1]), dtype=batch.dtype)
        features[indices] = batch
    return features


def protocol(extractor: FeatureExtractor, image_size: int | None) -> str:
    """What the FID/KID numbers mean: torch-fidelity's protocol, or how they depart from it."""
    resized = f"images first resized to {image_size} px (PIL bicubic)" if image_size else ""
    if not extractor.standard:
        return (
            f"non-standard: custom feature extractor ({extractor.description})"
            + (f", {resized}" if resized else "")
            + "; not comparable with published FID/KID"
        )
    return f"non-standard: {resized}, then {STANDARD_PROTOCOL}" if resized else STANDARD_PROTOCOL


def resolve_kid_subset_size(requested: int | None, num_real: int, num_generated: int) -> int:
    """--kid_subset_size, else torch-fidelity's 1000, shrunk to the smaller set (it would refuse: recorded)."""
    fewest = min(num_real, num_generated)
    if requested is None:
        return min(KID_SUBSET_SIZE, fewest)
    if requested > fewest:
        raise DatasetError(
            f"--kid_subset_size {requested} is more than the {num_real} real / {num_generated} generated "
            f"images: KID subsets are drawn without replacement. Fix: pass at most {fewest}, or omit it."
        )
    return requested


def fid_and_kid(
    real: torch.Tensor,
    generated: torch.Tensor,
    wanted: list[str],
    *,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int | None = None,
    kid_seed: int = KID_SEED,
) -> dict:
    """FID and KID as torch_fidelity.calculate_metrics(input1=generated, input2=real) computes them from these
    features: its own functions, so that the numbers are the same, subset draws included."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if min(len(real), len(generated)) < 2:
        raise DatasetError(
            f"FID/KID need at least 2 real and 2 generated images, got {len(real)} and {len(generated)}. "
            "Fix: generate more images, or leave fid,kid out with --metrics."
        )
    results = {}
    if "fid" in wanted:
        statistics = [fid_features_to_statistics(features) for features in (generated, real)]
        results["fid"] = fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID]
    if "kid" in wanted:
        subset_size = resolve_kid_subset_size(kid_subset_size, len(real), len(generated))
        kid = kid_features_to_metric(
            generated, real, kid_subsets=kid_subsets, kid_subset_size=subset_size, rng_seed=kid_seed, verbose=False
        )
        results.update(
            kid_mean=kid[KEY_METRIC_KID_MEAN],
            kid_std=kid[KEY_METRIC_KID_STD],
            kid_subsets=kid_subsets,
            kid_subset_size=subset_size,
            kid_seed=kid_seed,
        )
    return results


def fid_kid_scores(
    real_files: list[Path],
    generated_files: list[Path],
    extractor: FeatureExtractor,
    wanted: list[str],
    device,
    *,
    batch_size: int = 32,
    image_size: int | None = None,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int | None = None,
    kid_seed: int = KID_SEED,
) -> dict:
    """The ``wanted`` of fid, kid of the generated images against the real ones, with the protocol they follow."""
    real = extract_features(
        real_files, extractor, device, batch_size=batch_size, image_size=image_size, desc="features: real"
    )
    generated = extract_features(
        generated_files, extractor, device, batch_size=batch_size, image_size=image_size, desc="features: generated"
    )
    return {
        "fid_kid_protocol": protocol(extractor, image_size),
        "fid_kid_standard": extractor.standard and image_size is None,
        "feature_extractor": extractor.description,
        "feature_image_size": image_size,
        **fid_and_kid(
            real, generated, wanted, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, kid_seed=kid_seed
        ),
    }


# ------------------------------------------------------------------------------------------------
# LPIPS diversity
# ------------------------------------------------------------------------------------------------


def load_lpips(weights: Path, device) -> torch.nn.Module:
    """lpips' AlexNet LPIPS with its shipped linear layers, the backbone taken from a torchvision state dict."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated", from inside lpips
        # pnet_rand=True builds the backbone with random weights instead of downloading them.
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DatasetError(
            f"--lpips_weights {weights} is not a torch state dict ({err}). Fix: pass {ALEXNET_FILE}."
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    # lpips splits torchvision's alexnet.features into slices that keep the layer numbers: features.3 -> sliceK.3
    backbone = {}
    for slice_name, layers in model.net.named_children():
        for layer_name, parameter in layers.state_dict().items():
            key = f"features.{layer_name}"
            if key not in state or state[key].shape != parameter.shape:
                raise DatasetError(
                    f"--lpips_weights {weights} is not a torchvision AlexNet state dict: {key} is missing or has "
                    f"the wrong shape. Fix: pass {ALEXNET_FILE} from {ALEXNET_URL}."
                )
            backbone[f"{slice_name}.{layer_name}"] = state[key]
    model.net.load_state_dict(backbone)
    return model.eval().to(device)


def lpips_group_tensor(paths: list[Path]) -> torch.Tensor:
    """The images of one mask as a ``(N, 3, H, W)`` batch in [-1, 1], all at the first one's size (at least 64)."""
    images = [read_image(path) for path in paths]
    width, height = images[0].size
    scale = max(1.0, LPIPS_MIN_SIZE / min(width, height))
    size = (round(width * scale), round(height * scale))
    return torch.stack([uint8_tensor(image.resize(size, Image.BICUBIC)) for image in images]).float() / 127.5 - 1


@torch.no_grad()
def lpips_diversity(groups: list[list[Path]], model: torch.nn.Module, batch_size: int, device) -> list[float]:
    """Mean pairwise LPIPS within each group of two or more images (one value per group)."""

    def distance(first, second):
        return model(first.to(device), second.to(device))

    return [
        mean_pairwise_distance(lpips_group_tensor(paths), distance, batch_size)
        for paths in tqdm(groups, desc="LPIPS diversity", unit="mask", leave=False)
        if len(paths) >= 2
    ]


def lpips_scores(groups: list[list[Path]], weights: Path, device, batch_size: int = 32) -> dict:
    """LPIPS diversity of the groups (the images of each mask): its mean and spread over the groups."""
    per_mask = lpips_diversity(groups, load_lpips(weights, device), batch_size, device)
    return {
        "lpips_diversity": float(np.mean(per_mask)),
        "lpips_diversity_std": float(np.std(per_mask)),
        "lpips_num_masks": len(per_mask),
        "lpips_backbone": str(weights),
    }


# ------------------------------------------------------------------------------------------------
# Semantic consistency
# ------------------------------------------------------------------------------------------------


@dataclass
class Classes:
    names: list[str]
    palette: list[tuple[int, int, int]]
    palette_is_real: bool  # False when made up by default_palette: the palette segmenter cannot use it
    source: str  # where the names come from (a file, or --num_classes), for messages


class PaletteLabeller:
    """segdiff.toy.PaletteSegmenter on a list of PIL images."""

    def __init__(self, palette):
        from segdiff.toy import PaletteSegmenter

        self.segmenter = PaletteSegmenter(palette)
        self.num_labels = len(palette)
        self.description = "palette (nearest class colour)"

    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        return [self.segmenter(image) for image in images]


class TransformersLabeller:
    """A transformers semantic-segmentation model (SegFormer) on a list of PIL images, logits upsampled to each."""

    def __init__(self, folder: Path, device):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, SegformerImageProcessor

        try:
            self.model = AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True)
        except Exception as err:
            raise DatasetError(
                f"--segmenter {folder} does not load as a transformers semantic-segmentation model ({err}). Fix: "
                "pass a folder written by SegformerForSemanticSegmentation.save_pretrained (config.json + weights)."
            ) from None
        self.model.eval().to(device)
        if (folder / "preprocessor_config.json").is_file():
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        else:
            self.processor = SegformerImageProcessor()  # 512x512, ImageNet mean/std: SegFormer's usual input
        self.device = device
        self.num_labels = int(self.model.config.num_labels)
        self.description = f"{type(self.model).__name__} from {folder}"

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        inputs = self.processor(images=images, return_tensors="pt")
        logits = self.model(pixel_values=inputs["pixel_values"].to(self.device)).logits
        labels = []
        for logit, image in zip(logits, images):
            resized = torch.nn.functional.interpolate(
                logit[None].float(), size=(image.height, image.width), mode="bilinear", align_corners=False
            )
            labels.append(resized.argmax(dim=1)[0].cpu().numpy())
        return labels


def build_segmenter(segmenter: str, classes: Classes, device) -> PaletteLabeller | TransformersLabeller:
    """--segmenter: 'palette' (nearest class colour), or a transformers semantic-segmentation model folder."""
    if segmenter == "palette":
        if not classes.palette_is_real:
            raise DatasetError(
                f"--segmenter palette reads classes by colour, but the class list ({classes.source}) has no palette. "
                'Fix: pass --class_names_json with {"class_names": [...], "palette": [[r, g, b], ...]}.'
            )
        return PaletteLabeller(classes.palette)
    folder = Path(segmenter).expanduser()
    if not (folder / "config.json").is_file():
        raise DatasetError(
            f"--segmenter {segmenter!r} is neither 'palette' nor a model folder with a config.json. "
            "Fix: pass palette, or the folder of a SegformerForSemanticSegmentation.save_pretrained model."
        )
    return TransformersLabeller(folder, device)


def class_lookup(class_map: str | Path | None, num_labels: int, num_classes: int) -> np.ndarray:
    """Segmenter id -> our class id, with ``num_classes`` meaning "none of ours" (always counted as wrong).

    ``class_map``: the --segmenter_class_map JSON file, needed when the segmenter's classes are not ours.
    """
    if class_map is None:
        if num_labels != num_classes:
            raise DatasetError(
                f"the segmenter predicts {num_labels} classes and the masks have {num_classes}. Fix: pass "
                '--segmenter_class_map JSON mapping each segmenter id to ours, e.g. {"0": 0, "7": 2, "12": null}.'
            )
        return np.arange(num_classes)
    path = Path(class_map)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(
            f"cannot read --segmenter_class_map {path} ({err}). Fix: check the path and the JSON."
        ) from None
    if not isinstance(mapping, dict):
        raise DatasetError(f'--segmenter_class_map {path} must be a JSON object {{"segmenter id": our id or null}}.')
    lookup = np.full(num_labels, num_classes)
    for key, value in mapping.items():
        if not str(key).isdigit() or int(key) >= num_labels:
            raise DatasetError(f"--segmenter_class_map {path}: key {key!r} is not a segmenter id 0..{num_labels - 1}.")
        if value is None or (isinstance(value, str) and value.lower() == "ignore"):
            continue
        if not isinstance(value, int) or not 0 <= value < num_classes:
            raise DatasetError(
                f"--segmenter_class_map {path}: {key} -> {value!r} is not one of our class ids 0..{num_classes - 1} "
                "(or null for none of ours)."
            )
        lookup[int(key)] = value
    return lookup


def semantic_consistency(
    pairs: list[tuple[Path, Path]],
    segmenter,
    lookup: np.ndarray,
    classes: Classes,
    *,
    ignore_index: int,
    batch_size: int = 32,
    class_ids: list[int | None] | None = None,
) -> dict:
    """The segmenter's reading of each generated image (prediction) against the mask it came from (target).

    ``pairs``: (generated image, mask) files. ``class_ids``: for class-vs-rest masks (the joint layout), the class
    each one marks (None: a full label map); the prediction is then reduced to the same "this class" vs "the rest".
    Returns the segmenter, mIoU, pixel accuracy, per-class IoU and target pixels per class, of one confusion matrix.
    """
    num_classes = len(classes.names)
    other = num_classes  # an extra column: predictions that are none of our classes
    confusion = torch.zeros((num_classes + 1, num_classes + 1), dtype=torch.long)
    class_ids = class_ids or [None] * len(pairs)
    for start in tqdm(range(0, len(pairs), batch_size), desc="segmenting", unit="batch", leave=False):
        batch = pairs[start : start + batch_size]
        predictions = segmenter([read_image(image) for image, _ in batch])
        for (_, mask), prediction, class_id in zip(batch, predictions, class_ids[start : start + batch_size]):
            target = read_label_map(mask)
            check_label_ids(target, num_classes, ignore_index, mask)
            prediction = lookup[prediction]
            if prediction.shape != target.shape:  # an image generated at another size than its mask
                prediction = resize_labels(prediction, *target.shape)
            if class_id is not None:  # joint layout: the mask only says "this class" vs "the rest"
                rest = 0 if class_id != 0 else other
                prediction = np.where(prediction == class_id, class_id, rest)
            confusion += confusion_matrix(prediction, target, num_classes + 1, ignore_index)
    return {
        "segmenter": segmenter.description,
        **segmentation_summary(confusion, classes.names),
        "target_pixels_per_class": dict(zip(classes.names, confusion.sum(dim=1)[:num_classes].tolist())),
    }


# ------------------------------------------------------------------------------------------------
# Style
# ------------------------------------------------------------------------------------------------


def match_references(reference: Path, samples: list[tuple[Path, str]]) -> list[Path]:
    """The reference image of each (generated image, stem of its input mask): ``reference`` itself when it is one
    image (or a folder of one); else the image of the folder named like the generated image, else like its mask."""
    if reference.is_file():
        return [reference] * len(samples)
    if not reference.is_dir():
        raise DatasetError(f"--reference_dir {reference} does not exist. Fix: pass an image or a folder of images.")
    folder = reference / "images" if (reference / "images").is_dir() else reference
    by_stem = files_by_stem(folder)
    if not by_stem:
        raise DatasetError(f"--reference_dir {reference} holds no images ({' '.join(IMAGE_EXTENSIONS)}).")
    if len(by_stem) == 1:
        return [next(iter(by_stem.values()))] * len(samples)
    references = []
    for image, source in samples:
        stem = next((stem for stem in (image.stem, source) if stem in by_stem), None)
        if stem is None:
            raise DatasetError(
                f"--reference_dir {folder} has no image named {image.stem} or {source} for {image}. "
                "Fix: name references after the generated images or their masks, or pass a single reference image."
            )
        references.append(by_stem[stem])
    return references


def style_similarity(images: list[Path], references: list[Path], bins: int) -> list[float]:
    """Colour-histogram correlation of each generated image with its reference image (1 = same colours)."""
    return [
        color_histogram_similarity(read_image(image), read_image(reference), bins)
        for image, reference in tqdm(list(zip(images, references)), desc="style", unit="image", leave=False)
    ]


def style_scores(images: list[Path], references: list[Path], bins: int) -> dict:
    """The style similarity's mean and spread over the images."""
    similarities = style_similarity(images, references, bins)
    return {
        "style_histogram_correlation": float(np.mean(similarities)),
        "style_histogram_correlation_std": float(np.std(similarities)),
        "style_bins": bins,
    }
