"""A tiny Stable-Diffusion-format base model, built offline from configs and a fixed seed.

The folder it writes loads with ``diffusers.StableDiffusionPipeline.from_pretrained(folder)`` like any SD
checkpoint, so every script can be run end to end on a CPU in seconds without the model hub:

    python -m segdiff.tiny --output_dir tiny-sd
    python -m segdiff.tiny --output_dir tiny-sd --fit_vae_data data/toy/train --fit_vae_steps 200

Layout: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
(safety checker and feature extractor are null).

Sizes are chosen to be small *and* unlike SD's, so that code assuming SD's numbers fails here instead of
later: the VAE downsamples by 2 (not 8), the text encoder's hidden size is 32 (not 768), and the
vocabulary has about a thousand tokens (not 49408).

With random weights the VAE decodes latents to noise; that is enough to exercise code paths. For demos
whose outputs should mean something, ``--fit_vae_data`` first fits the VAE to reconstruct a folder of
images (L1), which takes about a minute on two CPU cores for 32 px toy images.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from segdiff.arguments import non_negative_int, positive_float, positive_int
from segdiff.data import IMAGE_EXTENSIONS
from segdiff.geometry import vae_scale_factor
from segdiff.labels import LOVEDA_CLASSES, SIDEWALK_CLASSES
from segdiff.toy import MAX_TOY_CLASSES, toy_classes

# Stable Diffusion's latent scale, measured on its own VAE. Kept for an unfitted VAE (whose latents mean
# nothing anyway); a fitted VAE gets its own, see `latent_scaling_factor`.
SD_SCALING_FACTOR = 0.18215

# ---------------------------------------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level BPE with a small vocabulary learned here, offline.

_PROMPT_WORDS = """
a an the of and with in on at from for is this that photo photograph picture image images mask masks
segmentation semantic label labels map remote sensing satellite aerial view top down above high
resolution quality detailed realistic synthetic generated scene city urban rural street sidewalk
landscape toy shape shapes colour color colored style texture class area region
"""

# 29 classes of the landscape dataset (reference 004); the other datasets' names come from segdiff.data.
_LANDSCAPE_CLASSES = """
mountain sky water sea rock tree earth hill river sand land building grass plant person boat waterfall
wall pier path lake bridge field road railing fence ship house other
"""


def vocabulary_words() -> list[str]:
    """The words that become single tokens: prompt words and the parts of every known class name."""
    class_names = LOVEDA_CLASSES + SIDEWALK_CLASSES + toy_classes(MAX_TOY_CLASSES)[0] + _LANDSCAPE_CLASSES.split()
    words = set(_PROMPT_WORDS.split())
    for name in class_names:
        words.update(name.replace("-", " ").replace("_", " ").lower().split())
    return sorted(words)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: one printable character per byte value.

    Bytes that are already printable, non-space characters stand for themselves; the rest (control
    characters, space, a few Latin-1 ones) are moved to code points from 256 on, in byte order. The
    `tokenizers` ByteLevel pre-tokenizer uses exactly this table, so the vocabulary must too.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    moved = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + moved)
            moved += 1
    return dict(sorted(table.items()))


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE training until every word is one symbol; ties broken by the pair itself (deterministic).

    Words are spelled in the byte-level alphabet, with CLIP's ``</w>`` marking the last symbol of a word.
    """
    byte_symbol = bytes_to_unicode()
    spelled = set()
    for word in words:
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        spelled.add((*symbols[:-1], symbols[-1] + "</w>"))

    merges = []
    while True:
        pair_counts = Counter(pair for symbols in spelled for pair in zip(symbols, symbols[1:]))
        if not pair_counts:
            return merges
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        spelled = {_merge_pair(symbols, best) for symbols in spelled}


def write_clip_vocabulary(directory: str | Path, words: list[str] | None = None) -> None:
    """Write ``vocab.json`` and ``merges.txt`` in CLIP's format.

    Vocabulary order follows CLIP's: the 256 byte symbols, the same with ``</w>``, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>``. Any text still tokenizes, unknown words into byte symbols.
    """
    directory = Path(directory)
    merges = learn_bpe_merges(words if words is not None else vocabulary_words())
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}

    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")


def build_tiny_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer over a small learned vocabulary (``model_max_length`` 77, like SD's)."""
    with tempfile.TemporaryDirectory() as directory:
        write_clip_vocabulary(directory, words)
        # Loading from vocab.json + merges.txt works with both the slow (transformers 4) and the
        # tokenizers-backed (transformers 5) CLIPTokenizer.
        return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


# ---------------------------------------------------------------------------------------------------------
# Models. Each builder takes its random weights from torch's global RNG; `build_tiny_sd` seeds it.


def tiny_vae(sample_size: int = 32, preset: str = "tiny") -> AutoencoderKL:
    """``tiny``: two blocks, factor 2. ``medium``: SD's four-block topology (factor 8), narrower."""
    channels = (32, 64) if preset == "tiny" else (64, 128, 128, 128)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,  # downsampling factor 2 ** (blocks - 1)
        layers_per_block=1 if preset == "tiny" else 2,
        latent_channels=4,
        norm_num_groups=32,  # divides every width
        sample_size=sample_size,
        scaling_factor=SD_SCALING_FACTOR,
    )
    _start_nearly_deterministic(vae)
    return vae


def _start_nearly_deterministic(vae: AutoencoderKL, log_variance: float = -8.0) -> None:
    """Make the encoder's posterior start narrow (std ~0.02) instead of std ~1.

    Fitted with a KL weight as small as ours, a VAE ends up nearly deterministic anyway; starting from a
    posterior std of 1, larger than the latent means themselves, a short fit spends part of its budget
    shrinking the sampling noise, and after 200 steps sampled latents are still noticeably noisy (std 0.3
    around means of std 0.9), which is what trainers that encode with ``latent_dist.sample()`` would see.
    Measured on toy data, 200 steps: ~97.5% of pixels read back instead of ~96.5%, and sampling costs nothing.
    """
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        # quant_conv outputs [mean, log variance] channels; zero weights make the log variance a constant.
        vae.quant_conv.weight[latent_channels:] = 0
        vae.quant_conv.bias[latent_channels:] = log_variance


def tiny_unet(latent_size: int, cross_attention_dim: int, preset: str = "tiny") -> UNet2DConditionModel:
    """``tiny``: two levels, about 1 M parameters. ``medium``: SD 1.x's four-level topology, narrower."""
    if preset == "medium":
        return UNet2DConditionModel(
            sample_size=latent_size,
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Cross-attention only at the low resolution (and in the mid block), where it is cheap.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        # diffusers reads this UNet's `attention_head_dim` as the number of heads: 8 heads of 64 / 8 = 8 dims.
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer, preset: str = "tiny") -> CLIPTextModel:
    hidden = 32 if preset == "tiny" else 256
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37 if preset == "tiny" else 4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2 if preset == "tiny" else 4,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        # The pooled output is read at the first eos token, so these must be the tokenizer's ids.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def sd_scheduler() -> DDPMScheduler:
    """DDPM with Stable Diffusion's training noise schedule."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    # Not a DDPM argument, but SD's configs carry it and DDIMScheduler.from_config(...) reads it.
    scheduler.register_to_config(set_alpha_to_one=False)
    return scheduler


# ---------------------------------------------------------------------------------------------------------
# Fitting the VAE, so decoded latents show real colours.


class ImageFolderDataset(Dataset):
    """The images of a folder (or of its ``images/`` subfolder, as in the generic layout), in [-1, 1]."""

    def __init__(self, folder: str | Path, resolution: int = 32, random_flip: bool = True):
        folder = Path(folder)
        if (folder / "images").is_dir():
            folder = folder / "images"
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.paths:
            raise FileNotFoundError(f"no images in {folder}")
        flips = [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()] if random_flip else []
        self.transform = transforms.Compose(
            [
                transforms.Resize(resolution),
                transforms.CenterCrop(resolution),
                *flips,
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def _as_dataset(image_dir_or_dataset, resolution: int, random_flip: bool) -> Dataset:
    if isinstance(image_dir_or_dataset, str | Path):
        return ImageFolderDataset(image_dir_or_dataset, resolution, random_flip)
    return image_dir_or_dataset


def _forever(loader: DataLoader):
    # Not itertools.cycle, which would replay the first pass's batches instead of reshuffling.
    while True:
        yield from loader


def _first_images(dataset: Dataset, count: int) -> torch.Tensor:
    return torch.stack([dataset[i] for i in range(min(count, len(dataset)))])


@torch.no_grad()
def reconstruction_l1(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """Mean absolute error of encode -> decode (latent mean, no sampling) on images in [-1, 1]."""
    vae.eval()
    errors = []
    for batch in images.split(batch_size):
        batch = batch.to(vae.device, vae.dtype)
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mode()).sample
        errors.append((reconstruction - batch).abs().mean(dim=(1, 2, 3)))
    return float(torch.cat(errors).mean())


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64, seed: int = 0) -> float:
    """1 / std of the latents of ``images``, the way SD's 0.18215 was measured on SD's own VAE.

    The diffusion model's noise schedule assumes data of unit variance; scaling latents by this factor gives
    them that, whatever scale the VAE happened to learn.
    """
    vae.eval()
    generator = torch.Generator(vae.device).manual_seed(seed)
    latents = [
        vae.encode(batch.to(vae.device, vae.dtype)).latent_dist.sample(generator) for batch in images.split(batch_size)
    ]
    return float(1.0 / torch.cat(latents).float().std())


def fit_vae(
    vae: AutoencoderKL,
    image_dir_or_dataset,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-3,
    resolution: int = 32,
    seed: int = 0,
    kl_weight: float = 1e-6,
) -> list[float]:
    """Train ``vae`` in place to reconstruct images (L1 + a tiny KL term); returns the L1 of every step.

    ``image_dir_or_dataset`` is a folder of images (or a generic dataset folder with ``images/``), or a
    dataset of ``3xHxW`` tensors in [-1, 1]. Seeds torch's global RNG with ``seed``. The KL weight only
    keeps the latent distribution from collapsing to points; reconstruction is what matters here.

    On 256 toy images of 32 px, 200 steps at batch 32 take about 55 s on two CPU cores and decode ~97% of
    pixels to the right class (by `segdiff.toy.PaletteSegmenter`); 400 steps, ~99%.
    """
    torch.manual_seed(seed)
    dataset = _as_dataset(image_dir_or_dataset, resolution, random_flip=True)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) >= batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    # A short warmup: Adam's first steps at the full rate knock a freshly initialised VAE off course (at
    # lr 2e-3 without warmup, 200 steps read back only 84% of toy pixels). No decay afterwards: with so few
    # steps, a cosine decay cost more in progress than it gained in sharpness (90% instead of 96%).
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=min(20, steps // 10))

    vae.train()
    losses = []
    batches = _forever(loader)
    progress = tqdm(range(steps), desc="fitting VAE")
    for _ in progress:
        pixels = next(batches).to(vae.device, vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = (reconstruction - pixels).abs().mean()
        loss = l1 + kl_weight * posterior.kl().mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        losses.append(l1.item())
        progress.set_postfix(l1=f"{l1.item():.4f}")
    vae.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------
# The whole folder.


def build_tiny_sd(
    output_dir: str | Path,
    *,
    sample_size: int = 32,
    seed: int = 0,
    fit_vae_data: str | Path | None = None,
    fit_vae_steps: int = 200,
    fit_vae_batch_size: int = 32,
    fit_vae_lr: float = 1e-3,
    overwrite: bool = False,
    preset: str = "tiny",
) -> dict:
    """Write a tiny SD-format folder to ``output_dir`` and return a summary of what was written.

    ``preset="medium"`` gives Stable Diffusion 1.x's topology (VAE factor 8, four UNet levels with
    cross-attention on three) at a fraction of its width, for benchmarks of SD-shaped costs on a CPU.

    Weights are random from ``seed``. With ``fit_vae_data`` the VAE is first fitted to those images and its
    ``scaling_factor`` set to 1 / std of their latents; otherwise it keeps SD's 0.18215. The folder is built
    under a temporary name and renamed at the end, so an interrupted build never leaves a half folder.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    summary = {"output_dir": str(output_dir), "sample_size": sample_size, "seed": seed}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        text_encoder = tiny_text_encoder(tokenizer, preset)
        vae = tiny_vae(sample_size, preset)
        unet = tiny_unet(
            sample_size // vae_scale_factor(vae.config),
            cross_attention_dim=text_encoder.config.hidden_size,
            preset=preset,
        )

        if fit_vae_data is not None:
            summary.update(
                _fit_and_rescale(vae, fit_vae_data, sample_size, fit_vae_steps, fit_vae_batch_size, fit_vae_lr, seed)
            )

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = output_dir.with_name(f".{output_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    # Recent transformers save only tokenizer.json; the CLIP files keep the folder loadable by older ones too.
    write_clip_vocabulary(staging / "tokenizer")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)

    summary.update(
        vae_scale_factor=vae_scale_factor(vae.config),
        latent_size=unet.config.sample_size,
        scaling_factor=vae.config.scaling_factor,
        vocab_size=len(tokenizer),
        parameters={
            name: sum(p.numel() for p in model.parameters())
            for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
        },
    )
    return summary


def _fit_and_rescale(vae, data, resolution, steps, batch_size, lr, seed) -> dict:
    evaluation_images = _first_images(ImageFolderDataset(data, resolution, random_flip=False), 256)
    l1_before = reconstruction_l1(vae, evaluation_images)
    started = time.perf_counter()
    fit_vae(vae, data, steps=steps, batch_size=batch_size, lr=lr, resolution=resolution, seed=seed)
    seconds = time.perf_counter() - started

    scaling_factor = latent_scaling_factor(vae, evaluation_images, seed=seed)
    if not math.isfinite(scaling_factor):
        raise RuntimeError("fitting the VAE diverged: latents are not finite")
    # Written into the config, so it is saved in vae/config.json and every loader scales latents alike.
    vae.register_to_config(scaling_factor=scaling_factor)
    return {
        "fit_vae_data": str(data),
        "fit_vae_steps": steps,
        "fit_vae_seconds": round(seconds, 1),
        "vae_l1_before": l1_before,
        "vae_l1_after": reconstruction_l1(vae, evaluation_images),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write a tiny, offline Stable-Diffusion-format folder.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--sample_size", type=positive_int, default=32, help="Image side in pixels (latents are half).")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="Seed of the random weights (and of fitting).")
    parser.add_argument(
        "--fit_vae_data",
        default=None,
        help="A folder of images (or a dataset folder with images/) to fit the VAE to; unfitted if omitted.",
    )
    parser.add_argument("--fit_vae_steps", type=positive_int, default=200)
    parser.add_argument("--fit_vae_batch_size", type=positive_int, default=32)
    parser.add_argument("--fit_vae_lr", type=positive_float, default=1e-3)
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT_DIR if it exists.")
    parser.add_argument(
        "--preset",
        choices=["tiny", "medium"],
        default="tiny",
        help="tiny (default): VAE factor 2, ~1 M-parameter UNet. medium: SD 1.x's topology (VAE factor 8, "
        "four UNet levels), narrower; for benchmarks.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    summary = build_tiny_sd(
        args.output_dir,
        sample_size=args.sample_size,
        seed=args.seed,
        fit_vae_data=args.fit_vae_data,
        fit_vae_steps=args.fit_vae_steps,
        fit_vae_batch_size=args.fit_vae_batch_size,
        fit_vae_lr=args.fit_vae_lr,
        overwrite=args.overwrite,
        preset=args.preset,
    )
    print(f"wrote a tiny Stable Diffusion folder to {args.output_dir}")
    print(
        f"  {args.sample_size}x{args.sample_size} images, {summary['latent_size']}x{summary['latent_size']} "
        f"latents (VAE factor {summary['vae_scale_factor']}), vocabulary {summary['vocab_size']} tokens"
    )
    print("  parameters: " + ", ".join(f"{name} {count:,}" for name, count in summary["parameters"].items()))
    if args.fit_vae_data:
        print(
            f"  VAE fitted on {args.fit_vae_data} for {args.fit_vae_steps} steps in {summary['fit_vae_seconds']} s: "
            f"L1 {summary['vae_l1_before']:.4f} -> {summary['vae_l1_after']:.4f}, "
            f"scaling_factor {summary['scaling_factor']:.4f}"
        )
    else:
        print(f"  VAE not fitted: scaling_factor {summary['scaling_factor']} (SD's)")


if __name__ == "__main__":
    main()
