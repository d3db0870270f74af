"""The text prompt of a label map: the classes it shows, largest area first ("a photo of building, road, water").

The ControlNet trainer builds the prompt of every uncaptioned sample this way, and everything that renders
masks with a trained ControlNet (generate_controlnet_seg.py, segdiff.rendering) must build it the same way,
with the run's ``prompt_template`` and ``prompt_top_k`` (recorded in its training_config.json): a prompt
worded differently from training's is a condition the model never saw.
"""

from __future__ import annotations

import numpy as np

from segdiff.data import IGNORE_INDEX

DEFAULT_PROMPT_TEMPLATE = "a photo of {classes}"
# Classes named in a prompt: the largest few say most about the scene, and short prompts stay far from CLIP's
# 77-token limit with long class lists (Sidewalk's 35).
DEFAULT_PROMPT_TOP_K = 3


def classes_by_area(label, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """The class ids present in a label map, largest area first (ties: lower id first). ignore is never one."""
    label = np.asarray(label).ravel()
    label = label[(label >= 0) & (label < num_classes) & (label != ignore_index)]
    counts = np.bincount(label, minlength=num_classes)
    return [int(c) for c in sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))]


def class_prompt(
    label,
    class_names,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    top_k: int = DEFAULT_PROMPT_TOP_K,
    ignore_index: int = IGNORE_INDEX,
) -> str:
    """The prompt of a mask: ``template`` with {classes} = the top_k classes by area ("building, road, water").

    ``top_k`` 0 names every class present. Underscores and dashes in class names read as spaces
    ("flat-road" -> "flat road"). A mask with no class at all (only no-data) fills in nothing.
    """
    present = classes_by_area(label, len(class_names), ignore_index)
    if top_k:
        present = present[:top_k]
    names = [class_names[c].replace("_", " ").replace("-", " ") for c in present]
    return template.format(classes=", ".join(names)).strip()
