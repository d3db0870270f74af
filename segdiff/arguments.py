"""Command-line argument types shared by the scripts: each refuses a bad value at parse time, naming the flag.

argparse reports a type's ``ArgumentTypeError`` as a usage error on the flag that was given it
("argument --resolution: '0' is not a size ..."), before any file is read or model loaded.
"""

from __future__ import annotations

import argparse

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


def positive_int(text: str) -> int:
    """An integer of at least 1: a zero batch size, step count or sample count is a mistake, not a request."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_switch(group, name: str, *, default: bool, help: str) -> None:
    """``--name`` / ``--no_name`` (underscores, as every other flag here; argparse's own gives ``--no-name``)."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default, help=help)
    group.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"Turn --{name} off.")
