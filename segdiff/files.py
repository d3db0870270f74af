"""Writing files so that a crash never leaves a half-written one: the one home of the project's atomic writes.

Every file a later run reads (run and generation records, checkpoint metadata, images, label maps,
metadata.jsonl, reports) is first written under a hidden temporary name beside its target,
``.<name>.tmp``, and then renamed onto it. A rename within one folder is atomic (POSIX ``rename``), so
a reader, or a resumed run after a kill, finds either the complete old file, the complete new one or
none: never a truncated one. The readers here skip hidden files, so a leftover ``.tmp`` is ignored (and
removed when its write fails in this process).

Cheap to import (no torch), so every script and module can use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(target) as tmp: <write tmp>``: ``tmp`` replaces ``target`` when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, payload) -> None:
    """Indented JSON; paths, tuples and numpy scalars are written as strings, lists and numbers."""
    write_text_atomic(path, json.dumps(jsonable(payload), indent=2) + "\n")


def write_jsonl_atomic(path: str | Path, records) -> None:
    """One JSON object a line (metadata.jsonl), written whole or not at all."""
    write_text_atomic(path, "".join(json.dumps(jsonable(record)) + "\n" for record in records))


def save_image_atomic(image, path: str | Path, image_format: str = "PNG", **options) -> None:
    """A PIL image in ``image_format`` (the temporary name has no image suffix to guess it from)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=image_format, **options)


def jsonable(value):
    """``value`` with what ``json`` cannot write turned into what it can: Path -> str, tuple -> list, numpy
    scalar -> its Python number."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
