"""Pictures people look at: mask overlays and labelled grids."""

from __future__ import annotations

import numpy as np
from PIL import Image


def overlay_mask(image: Image.Image, mask: np.ndarray, colour, alpha: float = 0.5) -> Image.Image:
    """The image with the pixels of a binary mask tinted in ``colour``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    tinted = pixels.copy()
    tinted[mask] = (1 - alpha) * pixels[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return Image.fromarray(tinted.round().astype(np.uint8))


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """diffusers' make_image_grid, with the last row padded by black tiles instead of an error."""
    from diffusers.utils import make_image_grid

    rows = -(-len(images) // cols)
    blank = Image.new("RGB", images[0].size)
    return make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
