"""Command-line argument types shared by the scripts: each refuses a bad value at parse time, naming the flag.

argparse reports a type's ``ArgumentTypeError`` as a usage error on the flag that was given it
("argument --resolution: '0' is not a size ..."), before any file is read or model loaded. Every number a
script takes goes through one of these: a count or step number that must be positive, a seed or an
optional count that may be 0, and floats that must be finite (``nan`` and ``inf`` parse as floats, and
would pass a range check such as ``value > 0`` or poison every result silently).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from segdiff.geometry import ImageSize


def image_size(text: str) -> ImageSize:
    """The argparse type of every ``--resolution``: ``N`` (N x N) or ``HEIGHT,WIDTH`` (e.g. 384,512), positive."""
    try:
        sides = [int(part) for part in text.split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides, default=0) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give N, or HEIGHT,WIDTH such as 384,512")
    return ImageSize.of(sides[0] if len(sides) == 1 else sides)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _required(value, holds: bool, what: str):
    """``value`` when ``holds``, else the usage error saying what it must be."""
    if not holds:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1: a zero batch size, step count or sample count is a mistake, not a request."""
    value = _integer(text)
    return _required(value, value >= 1, "at least 1")


def non_negative_int(text: str) -> int:
    """An integer of at least 0: a seed, an id, or a count where 0 means none (warmup steps, workers...)."""
    value = _integer(text)
    return _required(value, value >= 0, "0 or more")


def finite_float(text: str) -> float:
    """A real number, not nan or inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return _required(value, math.isfinite(value), "a finite number")


def positive_float(text: str) -> float:
    """A finite number above 0: a learning rate, a norm, a threshold."""
    value = finite_float(text)
    return _required(value, value > 0, "above 0")


def non_negative_float(text: str) -> float:
    """A finite number of at least 0: a guidance scale, a loss weight, a decay."""
    value = finite_float(text)
    return _required(value, value >= 0, "0 or more")


def fraction(text: str) -> float:
    """A finite number in [0, 1]: a probability, a share, a decay factor."""
    value = finite_float(text)
    return _required(value, 0 <= value <= 1, "in [0, 1]")


def weight_list(text: str) -> list[float]:
    """Comma-separated weights, e.g. ``1,4,1``: each a finite number of at least 0, not all 0."""
    try:
        weights = [non_negative_float(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of weights such as 1,4,1 ({error})") from None
    if not any(weights):
        raise argparse.ArgumentTypeError(f"{text!r}: at least one weight must be above 0")
    return weights


def output_folder(text: str) -> str:
    """A folder to write into, made later if missing: refused now when it is a file, lies under a file, or the
    nearest folder that exists on its path cannot be written (probed with a temporary file, removed at once: a
    permission check alone says yes to root everywhere, /proc included)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder. Fix: choose a folder")
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text} lies under the file {existing}, where no folder can be made")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"{text} cannot be written: no file can be made in {existing} ({error.strerror}). Fix: choose a folder "
            "you can write to"
        ) from None
    return text


def add_switch(group, name: str, *, default: bool, help: str) -> None:
    """``--name`` / ``--no_name`` (underscores, as every other flag here; argparse's own gives ``--no-name``)."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default, help=help)
    group.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"Turn --{name} off.")
