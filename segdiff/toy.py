"""The embedded default dataset: coloured shapes on a background, generated procedurally.

Each class has one colour. Pixels get mild texture (a per-shape tint, a soft brightness gradient and
per-pixel noise) so images are not flat, but every pixel stays much closer to its own class colour than
to any other. So the label map can be read back from an image *exactly* by nearest palette colour, and
``PaletteSegmenter`` is a perfect segmenter for real toy images: any mIoU below 1.0 measured on
generated images is the generator's fault.

Usage:

    python -m segdiff.toy --output_dir data/toy --num_images 256 --val_images 64

writes ``data/toy/train`` and ``data/toy/val``, two datasets in the *generic* layout
(``images/*.png``, ``masks/*.png`` label PNGs, ``class_names.json``).

Long-tailed data, for testing whether synthetic data lifts a rare class:

    python -m segdiff.toy --output_dir data/toy_lt --num_images 256 --val_images 64 \
        --rare_class triangle --rare_rate 0.04

puts triangles in exactly 4% of the training images (rounded), small (radius x 0.5), on top of the usual
shapes of the other classes; the val split has them in 4% of its images too, but in at least 8
(--rare_val_min_images) so their IoU can be scored. Each split records its class shares in ``class_stats.json``.

A toy that a segmenter must learn, where the flat one only needs a palette lookup:

    python -m segdiff.toy --output_dir data/toy_tex --num_images 512 --val_images 128 --style textured \
        --rare_class triangle --rare_rate 0.04

has 5 classes whose colour does not identify them (`make_textured_sample`): striped and checkered objects share
one orange and random shapes (told apart by texture only), squares and triangles share one flat teal (by shape
only), on a background of random colour, under per-image lighting and noise. Its class_names.json says
``"style": "textured"``: the palette only colours label maps, and `PaletteSegmenter` refuses it.

Calibration (segdiff.downstream's segmenter as bench_synthetic.py's downstream step: 1000 steps, batch 16, 32 px;
the first 64 of the 512 training images of the command above, 2 of them showing a triangle; scored on 256 val images,
a quarter with a triangle; seeds 0, 1, 2, mean IoU):

    64 real pairs, plus                   mIoU   background  striped  checkered  square  triangle (rare)
    nothing                               0.732  0.986       0.906    0.926      0.844   0.000
    256 of them again (oversampling)      0.734  0.987       0.893    0.921      0.856   0.016
    256 new real pairs, each a triangle   0.899  0.994       0.949    0.957      0.928   0.668

The last row is the ceiling for 256 synthetic pairs: what as many real ones showing the rare class give. At 300
segmenter steps no arm can be told apart (the segmenter is undertrained: real only gives mIoU 0.656 at 64 pairs,
0.698 at 512, triangle 0 at both). The flat toy saturates: mIoU 0.748 at 64 and at 512 pairs at 300 steps, every
common class >= 0.99, the triangle 0.
"""

from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segdiff.arguments import finite_float, non_negative_int, positive_float, positive_int
from segdiff.data import load_class_names, read_json, save_label_png, write_class_names

# Class colours sit on the corners of the RGB cube at levels 40 and 215, so two colours differ by 175 in at
# least one channel. A pixel is painted at most TINT + SHADING + NOISE = 28 away from its colour per channel,
# far less than half of 175: nearest-colour read-back can never pick the wrong class.
_LOW, _HIGH = 40, 215
_TINT, _SHADING, _NOISE = 8, 8, 12

_ALL_CLASSES = ["background", "square", "disk", "triangle", "diamond", "ring", "cross", "bar"]
_ALL_COLOURS = [
    (_LOW, _LOW, _LOW),  # background: dark grey
    (_HIGH, _LOW, _LOW),  # square: red
    (_LOW, _HIGH, _LOW),  # disk: green
    (_LOW, _LOW, _HIGH),  # triangle: blue
    (_HIGH, _HIGH, _LOW),  # diamond: yellow
    (_HIGH, _LOW, _HIGH),  # ring: magenta
    (_LOW, _HIGH, _HIGH),  # cross: cyan
    (_HIGH, _HIGH, _HIGH),  # bar: light grey
]
MAX_TOY_CLASSES = len(_ALL_CLASSES)

TOY_CLASSES = _ALL_CLASSES[:4]
TOY_PALETTE = _ALL_COLOURS[:4]


# Colour themes, for the style-reference task: the same scenes in other colours. "inverted" maps every pixel
# to 255 - value (dark grey background -> light grey, red -> cyan, ...): the layout is the same, the colour
# histogram is the mirror image, and the inverted palette reads its images back exactly.
TOY_THEMES = ("plain", "inverted")


def theme_palette(palette, theme: str = "plain") -> list[tuple[int, int, int]]:
    """The class colours of ``palette`` in a theme: what a `PaletteSegmenter` needs for that theme's images."""
    if theme not in TOY_THEMES:
        raise ValueError(f"unknown toy theme {theme!r}; the themes are {', '.join(TOY_THEMES)}")
    return [tuple(255 - c for c in colour) if theme == "inverted" else tuple(colour) for colour in palette]


def toy_classes(num_classes: int | None = None, style: str = "flat") -> tuple[list[str], list[tuple[int, int, int]]]:
    """Class names and palette of a toy dataset of ``style`` with ``num_classes`` classes (background included;
    None: the style's usual count, 4 flat, 5 textured). The textured style's palette is for viewing only."""
    all_classes, all_colours = _STYLE_CLASSES[check_style(style)]
    num_classes = DEFAULT_NUM_CLASSES[style] if num_classes is None else num_classes
    if not 2 <= num_classes <= len(all_classes):
        raise ValueError(f"the {style} toy dataset has 2..{len(all_classes)} classes, got {num_classes}")
    return all_classes[:num_classes], all_colours[:num_classes]


def check_style(style: str) -> str:
    if style not in TOY_STYLES:
        raise ValueError(f"unknown toy style {style!r}; the styles are {', '.join(TOY_STYLES)}")
    return style


# ---------------------------------------------------------------------------------------------------------
# Shapes. Each takes pixel offsets (dy, dx) from the shape's centre, its radius and the random generator
# (for orientation), and returns the boolean mask of covered pixels.


def _square(dy, dx, radius, rng):
    # A rectangle, really: each half-side is drawn separately.
    half_height, half_width = radius * rng.uniform(0.6, 1.0, size=2)
    return (np.abs(dy) <= half_height) & (np.abs(dx) <= half_width)


def _disk(dy, dx, radius, rng):
    return dy**2 + dx**2 <= radius**2


def _triangle(dy, dx, radius, rng):
    # Isosceles, apex up or down: the half-width grows linearly from 0 at the apex to `radius` at the base.
    if rng.random() < 0.5:
        dy = -dy
    return (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)


def _diamond(dy, dx, radius, rng):
    return np.abs(dy) + np.abs(dx) <= radius


def _ring(dy, dx, radius, rng):
    distance_squared = dy**2 + dx**2
    return (distance_squared <= radius**2) & (distance_squared >= (0.55 * radius) ** 2)


def _cross(dy, dx, radius, rng):
    arm = radius / 3
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))


def _bar(dy, dx, radius, rng):
    if rng.random() < 0.5:
        dy, dx = dx, dy
    return (np.abs(dy) <= radius / 4) & (np.abs(dx) <= radius * 1.3)


_SHAPES = {
    "square": _square,
    "disk": _disk,
    "triangle": _triangle,
    "diamond": _diamond,
    "ring": _ring,
    "cross": _cross,
    "bar": _bar,
}


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres, so a shape's extent does not depend on which corner we measure from.
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return yy, xx


def _usual_shape_classes(rng: np.random.Generator, num_classes: int, max_shapes: int, rare_class: int | None):
    """The class ids of an image's usual shapes (1 to ``max_shapes``), drawn one at a time as they are painted;
    never ``rare_class``, so a long tail's rare class shows only where it is painted on purpose."""
    # One fewer class to choose from when one is rare.
    choices = num_classes - (rare_class is not None)
    for _ in range(rng.integers(1, max_shapes + 1)):
        class_id = int(rng.integers(1, choices))
        if rare_class is not None and class_id >= rare_class:
            class_id += 1  # skip the rare id
        yield class_id


def _place_shape(
    rng: np.random.Generator, shape: str, yy: np.ndarray, xx: np.ndarray, scale: float = 1.0, must_show: bool = False
) -> np.ndarray:
    """The pixels one shape covers: a random radius (times ``scale``) and centre. With ``must_show``, at least
    1.5 px and at least its centre pixel: a rare shape is never lost at small sizes."""
    size = yy.shape[0]
    radius = rng.uniform(0.12, 0.3) * size * scale
    if must_show:
        radius = max(radius, 1.5)
    centre_y, centre_x = rng.uniform(0.15, 0.85, size=2) * size
    covered = _SHAPES[shape](yy - centre_y, xx - centre_x, radius, rng)
    if must_show and not covered.any():
        covered[int(centre_y), int(centre_x)] = True
    return covered


def make_toy_sample(
    rng: np.random.Generator,
    size: int = 32,
    num_classes: int = 4,
    max_shapes: int = 3,
    rare_class: int | None = None,
    rare_scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One flat toy pair: an ``HxWx3`` uint8 image and its ``HxW`` uint8 label map.

    1 to ``max_shapes`` shapes of random classes, sizes and positions are painted in turn, so later shapes
    may cover earlier ones; the label map records what ends up on top.

    Long tail: the usual shapes never take the class id ``rare_class``; with ``rare_scale`` too, one shape of
    that class, its radius scaled by ``rare_scale``, is painted last (on top: it always shows).
    """
    class_names, palette = toy_classes(num_classes)
    palette = np.asarray(palette, dtype=np.int16)
    yy, xx = _pixel_centres(size)
    label = np.zeros((size, size), dtype=np.uint8)
    tint = np.zeros((size, size, 3), dtype=np.int16)
    tint[:] = rng.integers(-_TINT, _TINT + 1, size=3)  # the background's own tint

    def paint(class_id: int, scale: float = 1.0, must_show: bool = False) -> None:
        covered = _place_shape(rng, class_names[class_id], yy, xx, scale, must_show)
        label[covered] = class_id
        tint[covered] = rng.integers(-_TINT, _TINT + 1, size=3)

    for class_id in _usual_shape_classes(rng, num_classes, max_shapes, rare_class):
        paint(class_id)
    if rare_class is not None and rare_scale is not None:
        paint(rare_class, rare_scale, must_show=True)

    # Low-frequency shading: a soft brightness ramp in a random direction, at most _SHADING at the corners.
    direction = rng.normal(size=2)
    direction /= np.abs(direction).sum() + 1e-8
    ramp = (direction[0] * (yy / size - 0.5) + direction[1] * (xx / size - 0.5)) * 2
    shading = np.round(ramp * _SHADING).astype(np.int16)[..., None]

    noise = rng.integers(-_NOISE, _NOISE + 1, size=(size, size, 3), dtype=np.int16)
    image = palette[label] + tint + shading + noise
    return np.clip(image, 0, 255).astype(np.uint8), label


# ---------------------------------------------------------------------------------------------------------
# The textured style: colour does not identify the class. Two pairs of classes share their base colour: one
# pair differs only by texture (stripes vs checker: same period, contrast range and shapes), the other
# only by shape (square vs triangle, same flat fill). Every image has its own lighting (contrast, brightness,
# colour cast) and noise, and a background of varying colour with soft blotches, so a pixel's colour says
# little on its own: a segmenter has to look at texture and shape.

_ORANGE, _TEAL = (190, 115, 60), (60, 135, 165)
_BACKGROUND_COLOUR, _BACKGROUND_SPREAD, _BLOTCHES = (105, 105, 95), 60, 14
_TEXTURE_PERIOD = 4  # pixels
_TEXTURE_AMPLITUDE = (15, 30)  # +-levels around the base colour, drawn per object: some textures are faint
_OBJECT_TINT = 10  # per object and channel: no two objects of a class have exactly the same colour
_CONTRAST, _BRIGHTNESS, _CAST = (0.7, 1.2), (0.75, 1.25), 20
_NOISE_SIGMA = 8


@dataclass(frozen=True)
class TexturedClass:
    """How a class of the textured style is drawn: its base colour, its texture, the shapes it takes and their
    size (a range of factors on the flat toy's radius, drawn per object)."""

    name: str
    colour: tuple[int, int, int]
    texture: str
    shapes: tuple[str, ...]
    scale: tuple[float, float] = (1.0, 1.0)


_ANY_SHAPE = ("square", "disk", "triangle", "diamond")
# Textured objects down to half size, where a few periods of texture are all there is to tell them apart; squares
# keep the flat toy's sizes, so that a small rare triangle is not also a small square's shape.
_TEXTURED_SCALE = (0.5, 1.0)
TEXTURED_CLASSES = [
    TexturedClass("background", _BACKGROUND_COLOUR, "plain", ()),
    TexturedClass("striped", _ORANGE, "stripes", _ANY_SHAPE, _TEXTURED_SCALE),
    TexturedClass("checkered", _ORANGE, "checker", _ANY_SHAPE, _TEXTURED_SCALE),
    TexturedClass("square", _TEAL, "plain", ("square",)),
    TexturedClass("triangle", _TEAL, "plain", ("triangle",)),
]


# Textures: +1/-1 patterns of one period with a random phase, with mean 0 over a period so the two textured
# classes share their mean colour too, not only their base colour.


def _stripes(yy, xx, rng):
    # Horizontal or vertical at random: orientation tells striped from checkered no more than colour does.
    coordinate = np.floor(yy if rng.random() < 0.5 else xx)
    phase = rng.integers(_TEXTURE_PERIOD)
    return np.where((coordinate + phase) % _TEXTURE_PERIOD < _TEXTURE_PERIOD // 2, 1.0, -1.0)


def _checker(yy, xx, rng):
    cell = _TEXTURE_PERIOD // 2
    phase_y, phase_x = rng.integers(_TEXTURE_PERIOD, size=2)
    cells = (np.floor(yy) + phase_y) // cell + (np.floor(xx) + phase_x) // cell
    return np.where(cells % 2 == 0, 1.0, -1.0)


def _plain(yy, xx, rng):
    return np.zeros_like(yy)


_TEXTURES = {"stripes": _stripes, "checker": _checker, "plain": _plain}


def _textured_background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A colour that varies from image to image, with soft blotches: two random low-frequency waves."""
    size = yy.shape[0]
    colour = np.asarray(_BACKGROUND_COLOUR) + rng.uniform(-_BACKGROUND_SPREAD, _BACKGROUND_SPREAD, size=3)
    blotches = np.zeros_like(yy)
    for _ in range(2):
        frequency_y, frequency_x = rng.uniform(-1.5, 1.5, size=2) * 2 * np.pi / size
        blotches += np.cos(frequency_y * yy + frequency_x * xx + rng.uniform(0, 2 * np.pi)) / 2
    return colour + _BLOTCHES * blotches[..., None]


def _relight(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """One image's lighting: contrast around mid-grey, then brightness and a colour cast."""
    contrast, brightness = rng.uniform(*_CONTRAST), rng.uniform(*_BRIGHTNESS)
    cast = rng.uniform(-_CAST, _CAST, size=3)
    return ((image - 128) * contrast + 128) * brightness + cast


def make_textured_sample(
    rng: np.random.Generator,
    size: int = 32,
    num_classes: int = 5,
    max_shapes: int = 3,
    rare_class: int | None = None,
    rare_scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One textured toy pair: an ``HxWx3`` uint8 image and its ``HxW`` uint8 label map.

    The shapes are drawn as in `make_toy_sample` (long tail included), each in its class's colour and texture
    (`TEXTURED_CLASSES`), with a random shape of its class's shapes; then the image's lighting and noise.
    """
    toy_classes(num_classes, "textured")  # checks the count
    yy, xx = _pixel_centres(size)
    label = np.zeros((size, size), dtype=np.uint8)
    image = _textured_background(rng, yy, xx)

    def paint(class_id: int, scale: float, must_show: bool = False) -> None:
        drawn = TEXTURED_CLASSES[class_id]
        shape = drawn.shapes[int(rng.integers(len(drawn.shapes)))]
        covered = _place_shape(rng, shape, yy, xx, scale, must_show)
        texture = _TEXTURES[drawn.texture](yy, xx, rng)[covered] * rng.uniform(*_TEXTURE_AMPLITUDE)
        tint = rng.uniform(-_OBJECT_TINT, _OBJECT_TINT, size=3)
        label[covered] = class_id
        image[covered] = np.asarray(drawn.colour) + tint + texture[:, None]

    for class_id in _usual_shape_classes(rng, num_classes, max_shapes, rare_class):
        paint(class_id, rng.uniform(*TEXTURED_CLASSES[class_id].scale))
    if rare_class is not None and rare_scale is not None:
        paint(rare_class, rare_scale, must_show=True)

    image = _relight(rng, image) + rng.normal(0, _NOISE_SIGMA, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


TOY_STYLES = ("flat", "textured")
_STYLE_CLASSES = {
    "flat": (_ALL_CLASSES, _ALL_COLOURS),
    # The flat style's colours, for viewing label maps only: the images do not use them.
    "textured": ([drawn.name for drawn in TEXTURED_CLASSES], _ALL_COLOURS[: len(TEXTURED_CLASSES)]),
}
DEFAULT_NUM_CLASSES = {"flat": 4, "textured": len(TEXTURED_CLASSES)}
_SAMPLERS = {"flat": make_toy_sample, "textured": make_textured_sample}


@dataclass(frozen=True)
class LongTail:
    """One rare shape class: in ``rate`` of the images (exactly ``round(rate * N)`` of N, but at least
    ``min_images``), drawn ``scale`` times the usual size; the other shape classes fill every other shape."""

    class_name: str
    rate: float = 0.04
    scale: float = 0.5
    min_images: int = 0

    def check(self, num_classes: int | None = None, style: str = "flat") -> int:
        """The rare class id; a ValueError naming the problem for settings that cannot make a long tail."""
        names, _ = toy_classes(num_classes, style)
        num_classes = len(names)
        if self.class_name not in names[1:]:
            raise ValueError(
                f"rare class {self.class_name!r} is not a shape class of the {num_classes}-class {style} toy dataset "
                f"({', '.join(names[1:])}); background cannot be rare"
            )
        if num_classes < 3:
            raise ValueError("a long tail needs at least 2 shape classes (num_classes >= 3): one rare, one usual")
        if not 0 <= self.rate <= 1 or not 0 < self.scale <= 1 or self.min_images < 0:
            raise ValueError(f"rare rate must be in [0, 1], scale in (0, 1] and min_images >= 0; got {self}")
        return names.index(self.class_name)

    def images_with_rare(self, num_images: int, seed: int, split: str) -> set[int]:
        """Which images of a split get the rare shape: a fixed count, placed at random (its own stream of the
        seed, so the choice does not shift any image's shapes)."""
        count = min(num_images, max(round(self.rate * num_images), self.min_images))
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), zlib.crc32(b"rare")])
        return {int(i) for i in rng.permutation(num_images)[:count]}


class ClassStats:
    """Per class: the share of images it appears in, its share of all pixels, and its mean share of an image's
    pixels where it appears (how big it is when present)."""

    def __init__(self, class_names):
        self.class_names = list(class_names)
        self.images = 0
        self.pixels = 0
        self.images_with = np.zeros(len(self.class_names), dtype=np.int64)
        self.class_pixels = np.zeros(len(self.class_names), dtype=np.int64)
        self.share_sum = np.zeros(len(self.class_names), dtype=np.float64)

    def add(self, label: np.ndarray) -> None:
        counts = np.bincount(np.asarray(label).ravel(), minlength=len(self.class_names))[: len(self.class_names)]
        self.images += 1
        self.pixels += label.size
        self.images_with += counts > 0
        self.class_pixels += counts
        self.share_sum += counts / label.size

    def as_dict(self) -> dict:
        def share(numerator, denominator):
            return round(float(numerator) / denominator, 6) if denominator else 0.0

        return {
            "num_images": self.images,
            "classes": {
                name: {
                    "image_share": share(self.images_with[c], self.images),
                    "pixel_share": share(self.class_pixels[c], self.pixels),
                    "pixel_share_when_present": share(self.share_sum[c], self.images_with[c]),
                }
                for c, name in enumerate(self.class_names)
            },
        }


def make_toy_dataset(
    output_dir: str | Path,
    num_images: int = 256,
    size: int = 32,
    num_classes: int | None = None,
    seed: int = 0,
    split: str = "train",
    themes: tuple[str, ...] = ("plain",),
    long_tail: LongTail | None = None,
    style: str = "flat",
) -> Path:
    """Write a toy dataset in the generic layout and return its folder.

    ``output_dir/images/{split}_00000.png``, ``output_dir/masks/{split}_00000.png`` (label PNGs with the
    palette attached) and ``output_dir/class_names.json``. The same ``seed`` and ``split`` always give the
    same files; different splits of one seed never repeat each other. With several ``themes`` each image gets
    one at random and ``themes.json`` records it (``{stem: theme}``); class_names.json keeps the plain palette.
    With ``long_tail``, one class is rare and small (see `LongTail`) and ``class_stats.json`` records the
    share of images and pixels of every class (`ClassStats`).

    ``style``: "flat" (each class its own colour; ``num_classes`` None means 4) or "textured" (classes share
    colours, see `make_textured_sample`; None means all 5). A textured dataset says so in class_names.json
    (``"style": "textured"``: its palette is for viewing only, `PaletteSegmenter` refuses it) and in
    class_stats.json, which it always writes.
    """
    unknown = sorted(set(themes) - set(TOY_THEMES))
    if unknown:
        raise ValueError(f"unknown toy themes {unknown}; the themes are {', '.join(TOY_THEMES)}")
    class_names, palette = toy_classes(num_classes, style)
    num_classes = len(class_names)
    make_sample = _SAMPLERS[style]
    rare_class = long_tail.check(num_classes, style) if long_tail else None
    rare_images = long_tail.images_with_rare(num_images, seed, split) if long_tail else set()
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    (output_dir / "masks").mkdir(parents=True, exist_ok=True)
    stats = ClassStats(class_names)

    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    image_themes = {}
    for index in range(num_images):
        rare_scale = long_tail.scale if index in rare_images else None
        image, label = make_sample(
            rng, size=size, num_classes=num_classes, rare_class=rare_class, rare_scale=rare_scale
        )
        stats.add(label)
        theme = themes[int(rng.integers(len(themes)))] if len(themes) > 1 else themes[0]
        if theme == "inverted":
            image = 255 - image
        name = f"{split}_{index:05d}.png"
        Image.fromarray(image, mode="RGB").save(output_dir / "images" / name)
        save_label_png(label, output_dir / "masks" / name, palette=palette)
        image_themes[Path(name).stem] = theme

    # The flat style's files stay exactly what they always were: no style recorded, class_stats.json only for a
    # long tail. Whatever reads a style takes its absence for "flat".
    style_record = {} if style == "flat" else {"style": style}
    write_class_names(output_dir / "class_names.json", class_names, palette, **style_record)
    if themes != ("plain",):
        (output_dir / "themes.json").write_text(json.dumps(image_themes, indent=1) + "\n")
    if long_tail or style_record:
        record = dict(style_record)
        if long_tail:
            record.update(rare_class=long_tail.class_name, rare_rate=long_tail.rate, rare_scale=long_tail.scale)
        (output_dir / "class_stats.json").write_text(json.dumps({**record, **stats.as_dict()}, indent=1) + "\n")
    return output_dir


def toy_style(class_names_json: str | Path) -> str:
    """The toy style a class_names.json records: "flat" unless it says otherwise (every dataset that is not a
    textured toy, the flat toy included, records none)."""
    content = read_json(Path(class_names_json), "class names file")
    return content.get("style", "flat") if isinstance(content, dict) else "flat"


class PaletteSegmenter:
    """Segments an image by giving each pixel the class whose palette colour is nearest (Euclidean, RGB).

    Exact on flat toy images (a textured one it refuses: see `from_class_names_json`). Accepts:

    - a float ``torch.Tensor`` shaped ``3xHxW`` or ``Bx3xHxW`` (channels first), with values in
      ``value_range``: ``(-1, 1)`` (the default, what the models work in) or ``(0, 1)`` (what pipelines
      return with ``output_type="pt"``); a uint8 tensor is read as 0..255;
    - a ``numpy`` array shaped ``HxWx3`` or ``BxHxWx3`` (channels last): uint8 is 0..255, floats are read in
      ``value_range`` (pipelines' ``output_type="np"`` gives floats in ``(0, 1)``);
    - a ``PIL.Image``.

    Returns label maps of the input's batch shape: a LongTensor for tensors, an int64 array otherwise.
    """

    def __init__(self, palette, value_range: tuple[float, float] = (-1.0, 1.0)):
        self.palette = torch.tensor(np.asarray(palette), dtype=torch.float32).reshape(-1, 3)
        self.value_range = value_range

    @classmethod
    def from_class_names_json(cls, path: str | Path, **kwargs) -> PaletteSegmenter:
        """The segmenter of a class_names.json's palette; a ValueError for a textured toy dataset's, whose images
        the palette cannot read (its classes share colours)."""
        style = toy_style(path)
        if style != "flat":
            raise ValueError(
                f"{path} is the class list of a {style} toy dataset: its classes share colours and differ by "
                "texture or shape, under per-image lighting, so the nearest palette colour cannot read its images "
                "(its palette is for viewing label maps only). Score them with a trained segmenter instead "
                "(evaluate.py --downstream, or --segmenter with a model folder)."
            )
        _, palette = load_class_names(path)
        if palette is None:
            raise ValueError(f"{path} has no palette to segment by")
        return cls(palette, **kwargs)

    def __call__(self, images, value_range: tuple[float, float] | None = None):
        value_range = value_range or self.value_range
        if isinstance(images, Image.Image):
            images = np.asarray(images.convert("RGB"))

        if isinstance(images, torch.Tensor):
            pixels = self._to_0_255(images.movedim(-3, -1), value_range)
            return self._nearest_colour(pixels)
        pixels = self._to_0_255(torch.from_numpy(np.array(images)), value_range)  # a copy: may be read-only
        return self._nearest_colour(pixels).numpy()

    @staticmethod
    def _to_0_255(pixels: torch.Tensor, value_range) -> torch.Tensor:
        if pixels.shape[-1] != 3:
            raise ValueError(f"expected RGB images, got a channel dimension of {pixels.shape[-1]}")
        if pixels.dtype == torch.uint8:
            return pixels.float()
        low, high = value_range
        return (pixels.float() - low) * (255.0 / (high - low))

    def _nearest_colour(self, pixels: torch.Tensor) -> torch.Tensor:
        # One class at a time keeps memory at one distance map, even for many classes and large images.
        palette = self.palette.to(pixels.device)
        best_distance = torch.full(pixels.shape[:-1], float("inf"), device=pixels.device)
        labels = torch.zeros(pixels.shape[:-1], dtype=torch.long, device=pixels.device)
        for class_id, colour in enumerate(palette):
            distance = ((pixels - colour) ** 2).sum(dim=-1)
            closer = distance < best_distance
            labels[closer] = class_id
            best_distance = torch.minimum(best_distance, distance)
        return labels


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write the procedural toy dataset (generic layout).")
    parser.add_argument("--output_dir", required=True, help="Where to write the dataset.")
    parser.add_argument("--num_images", type=positive_int, default=256, help="Training images to write.")
    parser.add_argument(
        "--val_images",
        type=non_negative_int,
        default=0,
        help="With a value > 0, write OUTPUT_DIR/train and OUTPUT_DIR/val with this many validation images; "
        "with 0, OUTPUT_DIR itself is the (single) dataset.",
    )
    parser.add_argument("--size", type=positive_int, default=32, help="Image side in pixels.")
    parser.add_argument(
        "--style",
        default="flat",
        choices=TOY_STYLES,
        help="flat: each class its own colour (the palette segmenter reads images back exactly); textured: "
        "classes share colours and differ by texture or shape, under per-image lighting (a segmenter must "
        "learn them). (default: %(default)s)",
    )
    parser.add_argument(
        "--num_classes",
        type=positive_int,
        default=None,
        help=f"Classes including background: 2..{MAX_TOY_CLASSES} flat (default 4), "
        f"2..{DEFAULT_NUM_CLASSES['textured']} textured (default all).",
    )
    parser.add_argument(
        "--themes",
        nargs="+",
        default=["plain"],
        choices=TOY_THEMES,
        help="Colour themes; with several, each image gets one at random (recorded in themes.json). "
        "plain inverted gives the two-theme data of the style-reference tests.",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    group = parser.add_argument_group(
        "long tail",
        "Make one shape class rare and small, the others as usual; each split then records its per-class image "
        "and pixel shares in class_stats.json.",
    )
    group.add_argument(
        "--rare_class",
        default=None,
        help="The rare class (a shape class of --num_classes of --style, not background). Default: none, no long tail.",
    )
    group.add_argument(
        "--rare_rate",
        type=finite_float,
        default=0.04,
        help="Share of the images that show the rare class: exactly round(rate x images). (default: %(default)s)",
    )
    group.add_argument(
        "--rare_scale",
        type=positive_float,
        default=0.5,
        help="Size of a rare shape: its radius is the usual random radius times this. (default: %(default)s)",
    )
    group.add_argument(
        "--rare_val_min_images",
        type=non_negative_int,
        default=8,
        help="The val split shows the rare class at --rare_rate too, but in at least this many images, so its "
        "IoU can be scored (64 val images at 4%% would hold 3 small shapes). (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        toy_classes(args.num_classes, args.style)
    except ValueError as error:
        parser.error(f"--num_classes: {error}")
    if args.rare_class is not None:
        try:
            long_tail(args, "train").check(args.num_classes, args.style)
        except ValueError as error:
            parser.error(f"--rare_class/--rare_rate/--rare_scale: {error}")
    return args


def long_tail(args, split: str) -> LongTail | None:
    """The long tail of a split from the command line (the val split's minimum count applies to val only)."""
    if args.rare_class is None:
        return None
    minimum = args.rare_val_min_images if split == "val" else 0
    return LongTail(args.rare_class, rate=args.rare_rate, scale=args.rare_scale, min_images=minimum)


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.val_images > 0:
        splits = [
            ("train", output_dir / "train", args.num_images),
            ("val", output_dir / "val", args.val_images),
        ]
    else:
        splits = [("train", output_dir, args.num_images)]

    for split, folder, num_images in splits:
        make_toy_dataset(
            folder,
            num_images,
            size=args.size,
            num_classes=args.num_classes,
            seed=args.seed,
            split=split,
            themes=tuple(args.themes),
            long_tail=long_tail(args, split),
            style=args.style,
        )
        num_classes = len(toy_classes(args.num_classes, args.style)[0])
        style = "" if args.style == "flat" else f"{args.style} "
        print(
            f"wrote {num_images} {args.size}x{args.size} {style}toy images + masks ({num_classes} classes) to {folder}"
        )
        if args.rare_class is not None:
            rare = json.loads((folder / "class_stats.json").read_text())["classes"][args.rare_class]
            print(
                f"  rare class {args.rare_class}: in {rare['image_share']:.1%} of the images, "
                f"{rare['pixel_share']:.2%} of the pixels ({rare['pixel_share_when_present']:.1%} of an image "
                "where present); all classes in class_stats.json"
            )


if __name__ == "__main__":
    main()
