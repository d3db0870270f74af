#!/usr/bin/env python
r"""Train a ControlNet on colour-coded segmentation maps over a frozen Stable Diffusion base.

The control image is the label map drawn in the dataset palette: class c in palette[c] (the colours of
class_names.json), ignore_index (no data, and what the random affine brings in from outside) in black.
The base (VAE, UNet, text encoder) stays frozen; only the ControlNet, initialised from the base UNet,
is trained, in fp32.

    accelerate launch train_controlnet_seg.py \
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
      --data_root /path/to/LoveDA --dataset loveda --output_dir outputs/controlnet

Training data comes from one of three sources:
  --data_root/--dataset   a segmentation dataset (loveda, generic, sidewalk): image + label map; the control
                          image is the label map coloured by the palette, the prompt names the classes present
                          by area ("a photo of building, road, water", see --prompt_template, --prompt_top_k)
  --train_data_dir        a folder with metadata.csv: image, conditioning_image (RGB, palette colours) and text
                          columns (file paths relative to the folder), the reference ControlNet project's layout
  --dataset_name          a Hugging Face dataset (hub name, or a local folder: save_to_disk output or any folder
                          datasets.load_dataset reads) with --image_column/--conditioning_image_column/--caption_column

The output folder is a ControlNetModel: ``ControlNetModel.from_pretrained(output_dir)`` loads it for
StableDiffusionControlNetPipeline, with class_names.json (names and palette) and training_config.json beside
it for generate_controlnet_seg.py.
"""

import argparse
import csv
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel

from segdiff import check_min_diffusers_version, training
from segdiff.arguments import finite_float, non_negative_int, positive_int
from segdiff.data import (
    DatasetError,
    JointTransform,
    add_dataset_args,
    dataset_from_args,
    exit_on_bad_input,
    first_line,
    label_offset_for,
    limit_train_samples,
    load_class_names,
    read_image,
)
from segdiff.generation import colour_mask_to_labels, read_mask
from segdiff.geometry import (
    conditioning_channels_for,
    conditioning_downsampling,
    vae_scale_factor,
)
from segdiff.labels import colorize_label, colour_codes, colours_of_codes, default_palette, resize_labels
from segdiff.prompts import (
    DEFAULT_PROMPT_TOP_K,
    LABEL_MAP_PROMPT_TEMPLATE,
    check_label_map_template,
    label_map_prompt,
    names_domain,
)
from segdiff.visualize import image_grid

# Stops here, naming the upgrade, when the installed diffusers is older than this script needs.
check_min_diffusers_version()

logger = training.logger

# Training masks shown at validation when no --validation_image is given.
NUM_DEFAULT_VALIDATION_MASKS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    training.add_training_args(parser, default_resolution=512)
    # A ControlNet fine-tunes a copy of a pretrained encoder: 1e-5, as diffusers' ControlNet README trains (its
    # script's default is 5e-6).
    parser.set_defaults(learning_rate=1e-5)
    add_dataset_args(parser, default_dataset="loveda")

    group = parser.add_argument_group("controlnet")
    group.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        default=None,
        help="A ControlNet to continue training (a folder written by this script, or a hub id when online). "
        "Default: a new ControlNet initialised from the base UNet.",
    )
    group.add_argument(
        "--tokenizer_name", type=str, default=None, help="Tokenizer name or path, if not the base's tokenizer/."
    )
    group.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers' attention (pip install xformers; CUDA only).",
    )

    group = parser.add_argument_group(
        "image + conditioning image data (instead of --data_root)",
        "metadata.csv or a Hugging Face dataset whose conditioning images are already RGB pictures.",
    )
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder with metadata.csv whose columns --image_column, --conditioning_image_column (RGB control "
        "images in the palette colours, black = no data) and --caption_column hold file paths (relative to the "
        "folder, or absolute) and captions. Pass --class_names_json (names and palette) so the generator can "
        "read masks, and so rows without a caption get a prompt built from the classes.",
    )
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A Hugging Face dataset: a hub name, or a local folder (written by save_to_disk, or any folder "
        "datasets.load_dataset reads). A folder with a metadata.csv of the --train_data_dir layout is read as one.",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name, if several.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where datasets downloads and caches.")
    group.add_argument("--image_column", type=str, default="image", help="Column of the target images.")
    group.add_argument(
        "--conditioning_image_column", type=str, default="conditioning_image", help="Column of the control images."
    )
    group.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="Column of the captions (a string or a list of strings, one picked at random). Optional: without "
        "it, prompts are built from the classes (needs --class_names_json).",
    )

    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--prompt_template",
        type=str,
        default=LABEL_MAP_PROMPT_TEMPLATE,
        help="Prompt of a sample without a caption; {classes} becomes the classes present, largest area first, "
        "comma separated, and {domain} the sample's domain in lower case, for data that has one (LoveDA's scene: "
        '"an {domain} aerial image of {classes}"). Default: "%(default)s".',
    )
    group.add_argument(
        "--prompt_top_k",
        type=non_negative_int,
        default=DEFAULT_PROMPT_TOP_K,
        help="Name at most this many classes in a prompt (0: all present). (default: %(default)s)",
    )
    group.add_argument(
        "--proportion_empty_prompts",
        type=finite_float,
        default=0.0,
        help="Share of samples trained with the empty prompt (for guidance-free or prompt-free use). Default 0.",
    )

    group = parser.add_argument_group("speed")
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every training image (and its mirror) with the VAE once and train from the cache, which "
        "also keeps each crop's control image, label map and caption: a cached step reads no file. "
        "Implies center crops; cannot be combined with --random_affine.",
    )
    group.add_argument(
        "--text_embedding_cache_size",
        type=non_negative_int,
        default=1024,
        help="Text embeddings kept per distinct prompt (least recently used dropped), so repeated prompts are "
        "encoded once. 0 disables. (default: %(default)s)",
    )

    group = parser.add_argument_group("validation (every --validation_steps; grids in output_dir/validation/)")
    group.add_argument(
        "--validation_image",
        type=str,
        default=None,
        nargs="+",
        help="Masks to validate on: label PNGs or colour PNGs in the palette (RGB pictures without "
        "--class_names_json on the metadata.csv/dataset paths). Default: the first training masks.",
    )
    group.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        nargs="+",
        help="Prompts for the validation masks: one for all, or one per mask. Default: the class prompt of each mask.",
    )
    group.add_argument(
        "--num_validation_images",
        type=positive_int,
        default=4,
        help="Images generated per validation mask. (default: 4)",
    )

    args = parser.parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        parser.error("--pretrained_model_name_or_path is required (a Stable Diffusion folder or hub id)")
    sources = [name for name in ("data_root", "train_data_dir", "dataset_name") if getattr(args, name)]
    if len(sources) != 1:
        parser.error(
            "give exactly one data source: --data_root (with --dataset), --train_data_dir (metadata.csv) or "
            f"--dataset_name; got {', '.join('--' + s for s in sources) or 'none'}"
        )
    if not 0 <= args.proportion_empty_prompts <= 1:
        parser.error("--proportion_empty_prompts must be in [0, 1]")
    try:
        check_label_map_template(args.prompt_template)
    except ValueError as error:
        parser.error(f"--prompt_template {args.prompt_template!r}: {error}")
    if names_domain(args.prompt_template) and not (args.data_root and args.dataset == "loveda"):
        parser.error(
            f"--prompt_template {args.prompt_template!r} names {{domain}}, which only --dataset loveda has (each "
            "map's scene, Urban or Rural). Fix: drop {domain} from the template."
        )
    if args.cache_latents and args.random_affine:
        parser.error("--cache_latents encodes each image once, so it cannot be combined with --random_affine")
    if (
        args.validation_image
        and args.validation_prompt
        and 1 not in (len(args.validation_image), len(args.validation_prompt))
        and len(args.validation_image) != len(args.validation_prompt)
    ):
        parser.error("give one --validation_prompt, one --validation_image, or as many prompts as images")
    training.check_training_args(parser, args)
    training.check_base_resolution(args)  # the base's configs: before its weights load
    check_given_controlnet(args)
    return args


# ------------------------------------------------------------------------------------------------
# The ControlNet (its conditioning embedding follows the base's VAE: segdiff.geometry)
# ------------------------------------------------------------------------------------------------


def check_given_controlnet(args) -> None:
    """Refuse a --controlnet_model_name_or_path that holds no ControlNet, or one whose control embedding would not
    land on this base's latent grid: from the configs, before any weights load."""
    path = args.controlnet_model_name_or_path
    if not path:
        return
    fix = "Fix: pass a folder this script wrote (config.json and its weights), or drop the flag to start anew."
    try:
        config = ControlNetModel.load_config(path)
    except (OSError, ValueError) as error:
        raise DatasetError(
            f"--controlnet_model_name_or_path {path} holds no ControlNet ({first_line(error)}). {fix}"
        ) from None
    if config.get("_class_name") != "ControlNetModel":
        raise DatasetError(
            f"--controlnet_model_name_or_path {path} holds a {config.get('_class_name', 'model')}, not a "
            f"ControlNetModel. {fix}"
        )
    factor = vae_scale_factor(training.base_model_config(AutoencoderKL, args, "vae"))
    if conditioning_downsampling(config) != factor:
        raise DatasetError(
            f"--controlnet_model_name_or_path {path} downsamples control images by {conditioning_downsampling(config)}"
            f", but the base's VAE downsamples by {factor}: its features would not land on the latent grid. Train a "
            "new ControlNet for this base (drop the flag)."
        )


def build_controlnet(args, unet: UNet2DConditionModel, scale_factor: int) -> ControlNetModel:
    """The given ControlNet (checked by `check_given_controlnet`), or a new one from the UNet whose control
    embedding matches the VAE's factor."""
    if args.controlnet_model_name_or_path:
        logger.info(f"Loading the ControlNet {args.controlnet_model_name_or_path}")
        try:
            return ControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
        except (OSError, ValueError) as error:
            raise DatasetError(
                f"--controlnet_model_name_or_path {args.controlnet_model_name_or_path}: cannot load its weights "
                f"({first_line(error)}). Fix: re-copy the folder this script wrote, or drop the flag to start anew."
            ) from None
    logger.info("Initialising the ControlNet from the base UNet")
    # Not diffusers' default (16, 32, 96, 256), which downsamples by 8 and would break on a base whose VAE
    # downsamples by another factor (the tiny test base's by 2): the embedding follows the base's VAE.
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(scale_factor))


# ------------------------------------------------------------------------------------------------
# Data sources: every sample is {"image", "label" | "conditioning_image", "caption"?, "name"}
# ------------------------------------------------------------------------------------------------


class ConditionedImages(Dataset):
    """(image, RGB conditioning image, caption) rows: a metadata.csv or a Hugging Face dataset.

    ``rows`` is a sequence of dicts (a list, or a ``datasets.Dataset``); images are PIL images or paths
    relative to ``root``. ``names``: each row's name, its image file's stem, or its row number when the image is
    stored in the dataset itself.
    """

    def __init__(self, rows, names, image_column, conditioning_column, caption_column, root=None, source=""):
        self.rows = rows
        self.names = names
        self.image_column = image_column
        self.conditioning_column = conditioning_column
        self.caption_column = caption_column
        self.root = Path(root) if root is not None else None
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    def sample_names(self) -> list[str]:
        return list(self.names)

    def select(self, indices: list[int]) -> "ConditionedImages":
        """The rows at ``indices``, keeping their names (a stored image's name stays its original row number)."""
        rows = [self.rows[index] for index in indices] if isinstance(self.rows, list) else self.rows.select(indices)
        names = [self.names[index] for index in indices]
        columns = (self.image_column, self.conditioning_column, self.caption_column)
        return ConditionedImages(rows, names, *columns, root=self.root, source=self.source)

    def _image(self, value):
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        path = Path(value)
        if self.root is not None and not path.is_absolute():
            path = self.root / path
        return read_image(path)  # a DatasetError naming the file when it is missing or broken

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        image = self._image(row[self.image_column])
        conditioning = self._image(row[self.conditioning_column])
        if conditioning.size != image.size:  # as diffusers' example, which resizes both to the resolution
            conditioning = conditioning.resize(image.size, Image.Resampling.NEAREST)
        control_value = row[self.conditioning_column]
        # What an error about this control image names: its file, or its row.
        control_source = control_value if isinstance(control_value, str) else f"{self.source} row {index}"
        caption = row.get(self.caption_column) if self.caption_column else None
        return {
            "image": image,
            "conditioning_image": conditioning,
            "caption": caption,
            "name": self.names[index],
            "control_source": control_source,
        }


def read_metadata_csv(folder, args) -> ConditionedImages:
    """The rows of ``folder/metadata.csv``; clear errors for a missing file or column."""
    path = Path(folder) / "metadata.csv"
    if not path.is_file():
        raise DatasetError(
            f"{path} does not exist. Fix: --train_data_dir needs a metadata.csv with the columns "
            f"{args.image_column}, {args.conditioning_image_column} and (optional) {args.caption_column}."
        )
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        rows = list(reader)
    missing = [c for c in (args.image_column, args.conditioning_image_column) if c not in columns]
    if missing:
        raise DatasetError(
            f"{path} has no column {', '.join(missing)} (its columns: {', '.join(columns) or 'none'}). Fix: rename "
            "the columns, or pass --image_column / --conditioning_image_column."
        )
    if not rows:
        raise DatasetError(f"{path} has no rows. Fix: list one (image, conditioning_image, text) per line.")
    # Every file is looked for now (a stat each), so a typo fails here, not hours into training.
    absent = [
        f"line {line} {column}: {row[column]}"
        for line, row in enumerate(rows, start=2)
        for column in (args.image_column, args.conditioning_image_column)
        if not row[column] or not (path.parent / row[column]).is_file()  # an absolute path stays itself
    ]
    if absent:
        raise DatasetError(
            f"{len(absent)} file(s) named in {path} do not exist ({'; '.join(absent[:5])}"
            f"{', ...' if len(absent) > 5 else ''}). Fix: paths are relative to {path.parent} (or absolute)."
        )
    caption_column = args.caption_column if args.caption_column in columns else None
    names = [Path(row[args.image_column]).stem for row in rows]
    return ConditionedImages(
        rows,
        names,
        args.image_column,
        args.conditioning_image_column,
        caption_column,
        root=path.parent,
        source=str(path),
    )


def load_hf_dataset(args) -> ConditionedImages:
    """The train split of --dataset_name: save_to_disk folders with load_from_disk, the rest with load_dataset."""
    import datasets

    name = args.dataset_name
    local = Path(name).expanduser()
    if (local / "metadata.csv").is_file():
        with open(local / "metadata.csv", newline="") as file:
            header = next(csv.reader(file), [])
        if args.image_column in header and args.conditioning_image_column in header:
            return read_metadata_csv(local, args)  # the reference project passes its csv folder this way
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as error:  # datasets raises many kinds; all mean the same to the user
        raise DatasetError(f"cannot load --dataset_name {name}: {error}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(f"--dataset_name {name} has no train split (it has {', '.join(loaded)}).")
        loaded = loaded["train"]
    columns = loaded.column_names
    missing = [c for c in (args.image_column, args.conditioning_image_column) if c not in columns]
    if missing:
        raise DatasetError(
            f"--dataset_name {name} has no column {', '.join(missing)} (its columns: {', '.join(columns)}). "
            "Fix: pass --image_column / --conditioning_image_column."
        )
    caption_column = args.caption_column if args.caption_column in columns else None
    if isinstance(loaded.features[args.image_column], datasets.Image):  # images stored in the dataset: row numbers
        names = [f"{index:06d}" for index in range(len(loaded))]
    else:  # file paths (read without decoding an image)
        names = [Path(value).stem for value in loaded[args.image_column]]
    columns = (args.image_column, args.conditioning_image_column, caption_column)
    return ConditionedImages(loaded, names, *columns, source=name)


def training_source(args):
    """The training samples and their classes: (dataset, class_names | None, palette | None, source name).

    Label-map datasets know their classes. metadata.csv and Hugging Face datasets get them from
    --class_names_json (names and palette), which is what lets rows without captions get class prompts and
    generate_controlnet_seg.py read masks.
    """
    if args.data_root:
        dataset = dataset_from_args(args)
        class_names, palette, source = dataset.class_names, dataset.palette, f"{args.dataset}:{args.data_root}"
    else:
        dataset = read_metadata_csv(args.train_data_dir, args) if args.train_data_dir else load_hf_dataset(args)
        class_names, palette, source = None, None, dataset.source
        if args.class_names_json:
            class_names, palette = load_class_names(args.class_names_json)
            palette = palette or default_palette(len(class_names))
        if dataset.caption_column is None and class_names is None:
            raise DatasetError(
                f"{source} has no caption column {args.caption_column!r} and the classes are unknown, so there is "
                "no prompt to train with. Fix: pass --caption_column, or --class_names_json to build prompts "
                "from the classes in each control image."
            )
    return limit_train_samples(dataset, args.max_train_samples), class_names, palette, source


# ------------------------------------------------------------------------------------------------
# Per-sample processing: shared geometry, control image, prompt
# ------------------------------------------------------------------------------------------------

# Colour codes of pixels that a random affine brings in from outside an RGB control image: drawn black.
OUTSIDE = -1


def codes_to_rgb(codes: torch.Tensor) -> np.ndarray:
    return colours_of_codes(codes.clamp(min=0).numpy())  # OUTSIDE -> 0, black


class PairTransform:
    """The same random geometry (affine, crop, flip) for an image and its control image.

    A label map goes through segdiff.data.JointTransform as it is and is coloured afterwards, so padding
    from the affine is ignore_index, drawn black. An RGB control image goes through JointTransform too, as
    a "label map" of colour codes: resampled nearest (palette colours are never blended into new ones),
    with the same random draws as its image; padding becomes black there as well.

    Returns (pixel_values in [-1, 1], control image as float 3xHxW in [0, 1], label map or None).
    """

    def __init__(self, args, palette, ignore_index: int, *, deterministic: bool = False):
        options = dict(
            center_crop=args.center_crop or args.cache_latents or deterministic,
            random_flip=args.random_flip and not args.cache_latents and not deterministic,
            affine=args.random_affine and not deterministic,
        )
        self.palette = palette
        self.ignore_index = ignore_index
        self.labels = JointTransform(args.resolution, ignore_index=ignore_index, **options)
        self.colours = JointTransform(args.resolution, ignore_index=OUTSIDE, **options)

    def __call__(self, sample: dict):
        if "label" in sample:
            pixels, label = self.labels(sample["image"], sample["label"])
            rgb = np.array(colorize_label(label.numpy(), self.palette, self.ignore_index))
        else:
            pixels, codes = self.colours(sample["image"], colour_codes(sample["conditioning_image"]))
            rgb, label = codes_to_rgb(codes), None
        control = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
        return pixels, control, label


def control_to_rgb(control: torch.Tensor) -> np.ndarray:
    """A control image (float 3xHxW in [0, 1], from 8-bit colours) back to its HxWx3 uint8 colours, exactly."""
    return (control * 255).round().byte().permute(1, 2, 0).numpy()


def control_to_pil(control: torch.Tensor) -> Image.Image:
    return Image.fromarray(control_to_rgb(control))


def sample_prompt(sample, label, control, class_names, palette, args, generator) -> str:
    """The caption (one at random from a list), else the class prompt of the (transformed) mask, else ""."""
    caption = sample.get("caption")
    if isinstance(caption, list | tuple):
        caption = caption[torch.randint(len(caption), (1,), generator=generator).item()] if caption else None
    if isinstance(caption, str) and caption.strip():
        return caption
    if class_names is None:
        return ""
    if label is None:
        label = control_labels(control, palette, args, sample)
    return label_map_prompt(
        label, class_names, args.prompt_template, args.prompt_top_k, args.ignore_index, domain=sample.get("domain")
    )


def control_labels(control: torch.Tensor, palette, args, sample) -> torch.Tensor:
    """The label map of an RGB control image, through the palette (unknown colours are an error naming it)."""
    source = sample.get("control_source", sample["name"])
    return torch.from_numpy(colour_mask_to_labels(control_to_rgb(control), palette, args.ignore_index, source))


def build_training_data(args, dataset, class_names, palette, cached=None):
    """The per-sample processing as a SeededDataset, and its collate function.

    Each sample's augmentation, prompt choice and empty-prompt draw come from its own seed (see
    segdiff.training.EpochSeededSampler), so a resumed run sees exactly what an uninterrupted one would.
    ``cached`` (from `cache_dataset`) replaces the dataset: a cached step reads no file and does no PIL work.
    """
    transform = PairTransform(args, palette, args.ignore_index)

    def process(sample, generator):
        example = {}
        if cached is None:
            pixels, control, label = transform(sample)
            example["pixel_values"] = pixels
        else:  # the centre crop's latents and its mirror's: flip the control image and label map alike
            flip = args.random_flip and torch.rand(1, generator=generator).item() < 0.5
            example["latent_mean"], example["latent_std"] = sample["latents"][int(flip)]
            control, label = sample["control"].float() / 255.0, sample["label"]
            if flip:
                control = control.flip(-1)
                label = label.flip(-1) if label is not None else None
        example["conditioning_pixel_values"] = control
        drop = torch.rand(1, generator=generator).item() < args.proportion_empty_prompts
        example["prompt"] = "" if drop else sample_prompt(sample, label, control, class_names, palette, args, generator)
        return example

    def collate(examples):
        batch = {
            key: torch.stack([e[key] for e in examples]).contiguous()
            for key in examples[0]
            if torch.is_tensor(examples[0][key])
        }
        batch["prompt"] = [e["prompt"] for e in examples]
        batch["seed"] = torch.tensor([e["seed"] for e in examples])
        return batch

    return training.SeededDataset(dataset if cached is None else cached, process), collate


def cache_dataset(dataset, args, class_names, palette, vae, accelerator, weight_dtype) -> list[dict]:
    """Every sample's centre crop, prepared once for --cache_latents.

    Per sample: the VAE latent distributions of the crop and of its mirror (see
    `training.encode_latent_distributions`), the control image (8-bit), the label map (read from the control
    image's colours when it is RGB and the classes are known, so prompts need no colour matching later),
    and the caption. The transform is deterministic here (centre crop, no flip, no affine), so all of it is
    what every step would compute.
    """
    transform = PairTransform(args, palette, args.ignore_index, deterministic=True)
    kept = []

    def pixels():
        for i in tqdm(range(len(dataset)), desc="Caching latents", disable=not accelerator.is_local_main_process):
            sample = dataset[i]
            pixel_values, control, label = transform(sample)
            if label is None and class_names is not None:
                label = control_labels(control, palette, args, sample)
            keys = ("caption", "name", "control_source", "domain")
            kept.append({"control": (control * 255).round().byte(), "label": label, **{k: sample.get(k) for k in keys}})
            yield pixel_values

    latents = training.encode_latent_distributions(pixels(), vae, accelerator, weight_dtype)
    return [{**sample, "latents": views} for sample, views in zip(kept, latents)]


class PromptEmbeddingCache:
    """Text embeddings by prompt string, computed once per distinct prompt (least recently used dropped).

    Class prompts repeat a lot (a few classes, ordered by area), so most steps encode nothing. The text
    encoder is frozen, so an embedding never changes.
    """

    def __init__(self, tokenizer, text_encoder, max_size: int = 1024):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_size = max_size
        self.embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # prompts run through the text encoder, for the log

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self.encoded += len(prompts)
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.max_size <= 0:
            return self.encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.embeddings))
        if missing:
            for prompt, embedding in zip(missing, self.encode(missing)):
                self.embeddings[prompt] = embedding
        for prompt in prompts:
            self.embeddings.move_to_end(prompt)
        batch = torch.stack([self.embeddings[p] for p in prompts])
        while len(self.embeddings) > self.max_size:
            self.embeddings.popitem(last=False)
        return batch


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def validation_conditions(args, dataset, class_names, palette) -> list[tuple[Image.Image, str]]:
    """(control image, prompt) pairs: --validation_image/--validation_prompt, or the first training masks."""
    height, width = args.resolution
    controls, labels = [], []
    if args.validation_image:
        for path in args.validation_image:
            if palette is not None:  # label PNGs (as the training layout stores them: raw LoveDA ids) or colours
                offset = label_offset_for(args.dataset, args.label_offset) if args.data_root else 0
                label = resize_labels(read_mask(Path(path), palette, args.ignore_index, offset), height, width)
                controls.append(colorize_label(label, palette, args.ignore_index))
                labels.append(label)
            else:
                controls.append(read_image(path).resize((width, height), Image.Resampling.NEAREST))
                labels.append(None)
        captions = domains = [None] * len(controls)
    else:
        transform = PairTransform(args, palette, args.ignore_index, deterministic=True)
        captions, domains = [], []
        for i in range(min(NUM_DEFAULT_VALIDATION_MASKS, len(dataset))):
            sample = dataset[i]
            _, control, label = transform(sample)
            controls.append(control_to_pil(control))
            labels.append(label)
            captions.append(sample.get("caption"))
            domains.append(sample.get("domain"))
    prompts = args.validation_prompt or []
    if len(prompts) == 1:
        prompts = prompts * len(controls)
    elif len(prompts) > 1 and len(controls) == 1:
        controls, labels = controls * len(prompts), labels * len(prompts)
        captions, domains = captions * len(prompts), domains * len(prompts)
    if not prompts:
        generator = torch.Generator().manual_seed(args.seed)
        for control, label, caption, domain in zip(controls, labels, captions, domains):
            control_tensor = torch.from_numpy(np.array(control)).permute(2, 0, 1).float() / 255.0
            sample = {"caption": caption, "name": "validation", "domain": domain}
            prompts.append(sample_prompt(sample, label, control_tensor, class_names, palette, args, generator))
    return list(zip(controls, prompts[: len(controls)]))


def log_validation(parts, args, accelerator, conditions, weight_dtype, global_step):
    """Each validation mask with --num_validation_images samples beside it, in a PNG grid and the trackers."""
    if weight_dtype != torch.float32:
        # The frozen parts run in half precision and the trained ControlNet in fp32 (its prepared forward even
        # returns fp32). A plain half-precision copy keeps the pipeline in one dtype; autocast, diffusers' way,
        # misses ops on some devices (group_norm on CPUs).
        trained = parts["controlnet"]
        copy = ControlNetModel.from_config(trained.config).to(trained.device, dtype=weight_dtype)
        copy.load_state_dict(trained.state_dict())
        parts = {**parts, "controlnet": copy}
    pipeline = StableDiffusionControlNetPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    tiles = []
    for control, prompt in conditions:
        images = pipeline(
            prompt,
            control,
            height=control.height,
            width=control.width,
            num_inference_steps=20,
            num_images_per_prompt=args.num_validation_images,
            generator=generator,
        ).images
        tiles += [control, *images]
        logger.info(f"Validation prompt: {prompt!r}")
    grid = image_grid(tiles, cols=1 + args.num_validation_images)
    training.log_validation_images(accelerator, grid, global_step, "validation", args.output_dir)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def write_run_files(args, class_names, palette, **extra) -> None:
    """training_config.json, and class_names.json (names + palette) when the classes are known."""
    training.write_run_files(args.output_dir, args, class_names, palette, **extra)
    if class_names is None:
        logger.warning(
            "The classes are unknown (no --class_names_json): no class_names.json is written, so "
            "generate_controlnet_seg.py will need --class_names_json to read masks."
        )


def main(args):
    accelerator = training.make_accelerator(args)
    hub_repo = training.create_hub_repo(accelerator, args)  # --push_to_hub: fail now, not after training
    weight_dtype = training.weight_dtype_for(accelerator)
    with accelerator.main_process_first():  # one process downloads/prepares a hub dataset
        dataset, class_names, palette, source = training_source(args)
    class_pixels = None  # a --train_data_dir or Hub dataset holds images of label maps, not class ids
    if args.data_root:  # label maps: bad ones stop the run here, before a model loads
        class_pixels = training.check_training_data(accelerator, dataset)
    classes = f"{len(class_names)} classes: {class_names}" if class_names else "classes unknown"
    logger.info(f"{len(dataset)} training samples from {source}, {classes}")

    # Models: the frozen base (VAE, UNet, text encoder) in the weight dtype, the trained ControlNet in fp32.
    base = args.pretrained_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(
        args.tokenizer_name or base, subfolder=None if args.tokenizer_name else "tokenizer", revision=args.revision
    )
    text_encoder = CLIPTextModel.from_pretrained(
        base, subfolder="text_encoder", revision=args.revision, variant=args.variant
    )
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", revision=args.revision, variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", revision=args.revision, variant=args.variant)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=args.revision)
    scale_factor = vae_scale_factor(vae.config)
    controlnet = build_controlnet(args, unet, scale_factor)
    logger.info(
        f"ControlNet conditioning embedding {controlnet.config.conditioning_embedding_out_channels}: downsamples "
        f"by {conditioning_downsampling(controlnet.config)}, as the base's VAE ({scale_factor})"
    )

    for frozen in (vae, unet, text_encoder):
        frozen.requires_grad_(False)
        frozen.to(accelerator.device)
        # Cast only when needed (diffusers warns about every cast): mixed precision, or a base whose --variant
        # weights load in half precision under a float32 run.
        if frozen.dtype != weight_dtype:
            frozen.to(dtype=weight_dtype)
    if controlnet.dtype != torch.float32:  # trained weights stay fp32; mixed precision autocasts the maths
        controlnet.to(dtype=torch.float32)
    controlnet.train()
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise SystemExit("--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers`.")
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        # The gradient reaches the ControlNet through the frozen UNet, whose activations are the larger share.
        unet.enable_gradient_checkpointing()

    training.use_channels_last(args, controlnet, unet, vae)
    ema_models = {}
    if args.use_ema:
        ema_models["controlnet_ema"] = training.make_ema(controlnet, args)
    training.register_checkpoint_hooks(accelerator, {"controlnet": controlnet}, ema_models)

    cached = None
    if args.cache_latents:
        cached = cache_dataset(dataset, args, class_names, palette, vae, accelerator, weight_dtype)
    validation = validation_conditions(args, dataset, class_names, palette) if args.validation_steps else []
    train_dataset, collate = build_training_data(args, dataset, class_names, palette, cached)
    train_dataloader, sampler = training.make_train_dataloader(train_dataset, args, collate)
    optimizer = training.make_optimizer(args, controlnet.parameters(), accelerator)
    updates_per_epoch = training.plan_steps(args, train_dataloader, accelerator)
    lr_scheduler = training.make_lr_scheduler(args, optimizer, accelerator)
    # One prepare call, as in diffusers' examples: DeepSpeed builds its engine from all of them together.
    controlnet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        controlnet, optimizer, train_dataloader, lr_scheduler
    )
    for ema in ema_models.values():
        ema.to(accelerator.device)
    prompt_embeddings = PromptEmbeddingCache(tokenizer, text_encoder, args.text_embedding_cache_size)

    # Data and models are known good: only now is --output_dir made, so a refused run leaves no folder behind.
    training.make_output_dir(accelerator, args)
    global_step, first_epoch, skip_batches = training.resume_from_checkpoint(accelerator, args, updates_per_epoch)
    if accelerator.is_main_process:
        write_run_files(
            args,
            class_names,
            palette,
            train_samples=dataset.sample_names(),
            train_class_pixels=class_pixels,
            pipeline="controlnet_seg",
            data_source=source,
            vae_scale_factor=scale_factor,
            conditioning_embedding_out_channels=list(
                training.unwrap_model(accelerator, controlnet).config.conditioning_embedding_out_channels
            ),
            control_image="label map in the palette colours of class_names.json; ignore_index and padding black",
        )
    training.init_trackers(accelerator, args, "train_controlnet_seg")

    loop = training.TrainingLoop(accelerator, args, controlnet, ema_models, lr_scheduler, hub_repo, global_step)
    for batch in loop.batches(train_dataloader, sampler, first_epoch, skip_batches):
        if loop.meter.start is None:
            logger.info(f"Prompts of the first batch: {batch['prompt'][:4]}")
        with accelerator.accumulate(controlnet):
            generator = training.batch_generator(batch["seed"], accelerator.device)

            # Clean latents (from the cache, or encoded now by the frozen VAE), forward diffusion, and the target of
            # the base's prediction type.
            latents = training.image_latents(batch, vae, generator, weight_dtype)
            noise, timesteps = training.draw_noise(noise_scheduler, latents, generator)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = training.prediction_target(noise_scheduler, latents, noise, timesteps)

            text = prompt_embeddings(batch["prompt"])
            down_residuals, mid_residual = controlnet(
                noisy,
                timesteps,
                encoder_hidden_states=text,
                controlnet_cond=batch["conditioning_pixel_values"],
                return_dict=False,
            )
            # The frozen UNet runs in the weight dtype (it is not prepared, so no autocast): cast its inputs.
            prediction = unet(
                noisy.to(weight_dtype),
                timesteps,
                encoder_hidden_states=text,
                down_block_additional_residuals=[r.to(weight_dtype) for r in down_residuals],
                mid_block_additional_residual=mid_residual.to(weight_dtype),
            ).sample
            loss = F.mse_loss(prediction.float(), target.float())
            loop.check_loss(loss)

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(controlnet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)

        if loop.end_of_batch(loss, {"loss": loss.item()}):
            with loop.ema_weights():
                parts = dict(
                    vae=vae,
                    text_encoder=text_encoder,
                    tokenizer=tokenizer,
                    unet=unet,
                    controlnet=training.unwrap_model(accelerator, controlnet),
                    scheduler=UniPCMultistepScheduler.from_config(noise_scheduler.config),
                )
                log_validation(parts, args, accelerator, validation, weight_dtype, loop.global_step)

    # The ControlNet at the top of output_dir, next to its run files.
    loop.finish(
        lambda controlnet: controlnet.save_pretrained(args.output_dir), text_encoder_calls=prompt_embeddings.encoded
    )


if __name__ == "__main__":
    with exit_on_bad_input():  # bad data or masks: the message names the file and the fix
        main(parse_args())
