"""Pictures people look at: mask overlays and labelled grids."""

from __future__ import annotations

import numpy as np
from PIL import Image


def overlay_mask(image: Image.Image, mask: np.ndarray, colour, alpha: float = 0.5) -> Image.Image:
    """The image with a binary mask tinted in ``colour`` and outlined in white.

    The outline keeps the mask visible where the image already has the class colour (on toy data,
    exactly where a good mask lies).
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    tinted = pixels.copy()
    tinted[mask] = (1 - alpha) * pixels[mask] + alpha * np.asarray(colour, dtype=np.float32)
    tinted[mask_outline(mask)] = 255
    return Image.fromarray(tinted.round().astype(np.uint8))


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """diffusers' make_image_grid, with the last row padded by black tiles instead of an error."""
    from diffusers.utils import make_image_grid

    rows = -(-len(images) // cols)
    blank = Image.new("RGB", images[0].size)
    return make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
