"""Text prompts, the one home of their wording: a class's prompt (the joint model) and a label map's (ControlNet).

* ``class_prompt("building")`` -> "a remote sensing image and mask of building": what train_seg_mask_diffusion.py
  conditions the joint model on, one class per sample, with the run's ``prompt_template`` ({class_name}).
* ``label_map_prompt(label, class_names)`` -> "a photo of building, road, water": the classes a map shows, largest
  area first. The ControlNet trainer builds the prompt of every uncaptioned sample this way, and everything that
  renders masks with a trained ControlNet (generate_controlnet_seg.py, segdiff.rendering) must build it the same
  way, with the run's ``prompt_template`` ({classes}) and ``prompt_top_k`` (recorded in its training_config.json):
  a prompt worded differently from training's is a condition the model never saw.

Both take what they describe first, then the template. Underscores and dashes in class names read as spaces
("flat-road" -> "flat road"). A label map's template may also name its domain, ``{domain}`` (LoveDA's scene:
"an {domain} aerial image of {classes}" -> "an urban aerial image of building, road"); a map without one leaves
the word out.
"""

from __future__ import annotations

import numpy as np

from segdiff.labels import IGNORE_INDEX

CLASS_PROMPT_TEMPLATE = "a remote sensing image and mask of {class_name}"
LABEL_MAP_PROMPT_TEMPLATE = "a photo of {classes}"
# Classes named in a label map's prompt: the largest few say most about the scene, and short prompts stay far from
# CLIP's 77-token limit with long class lists (Sidewalk's 35).
DEFAULT_PROMPT_TOP_K = 3


def readable(class_name: str) -> str:
    """A class name as a prompt says it: "flat-road" and "flat_road" -> "flat road"."""
    return class_name.replace("_", " ").replace("-", " ")


def class_prompt(class_name: str, template: str = CLASS_PROMPT_TEMPLATE) -> str:
    """The prompt of one class: ``template`` with {class_name} filled in."""
    return template.format(class_name=readable(class_name))


def classes_by_area(label, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """The class ids present in a label map, largest area first (ties: lower id first). ignore is never one."""
    label = np.asarray(label).ravel()
    label = label[(label >= 0) & (label < num_classes) & (label != ignore_index)]
    counts = np.bincount(label, minlength=num_classes)
    return [int(c) for c in sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))]


def label_map_prompt(
    label,
    class_names,
    template: str = LABEL_MAP_PROMPT_TEMPLATE,
    top_k: int = DEFAULT_PROMPT_TOP_K,
    ignore_index: int = IGNORE_INDEX,
    domain: str | None = None,
) -> str:
    """The prompt of a label map: ``template`` with {classes} = its top_k classes by area ("building, road, water")
    and {domain} = its domain in lower case ("urban"), if the template names one.

    ``top_k`` 0 names every class present. A map with no class at all (only no-data) fills in nothing.
    """
    present = classes_by_area(label, len(class_names), ignore_index)
    if top_k:
        present = present[:top_k]
    classes = ", ".join(readable(class_names[c]) for c in present)
    prompt = template.format(classes=classes, domain=readable(domain).lower() if domain else "")
    return " ".join(prompt.split())  # an empty slot leaves no double space


def check_label_map_template(template: str) -> None:
    """A ValueError unless ``template`` fills in only {classes} and {domain}."""
    try:
        template.format(classes="x", domain="x")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"only {{classes}} and {{domain}} may be filled in ({error!r})") from None


def names_domain(template: str) -> bool:
    """Whether a label-map template has a {domain} slot."""
    return "{domain}" in template
