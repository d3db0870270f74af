"""Seeded samples of segdiff's three pipelines, to compare two loads of one folder.

Imports nothing of segdiff: tests/test_hub.py also runs it where segdiff cannot be imported."""

import numpy as np
import torch


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def joint(pipeline) -> np.ndarray:
    out = pipeline(1, num_inference_steps=2, generator=seeded(), output_type="np")
    return np.concatenate([out.images.ravel(), out.masks.ravel()])


def sdm(pipeline) -> np.ndarray:
    label_map = torch.zeros(16, 16, dtype=torch.long)
    label_map[:, 8:] = 1
    return pipeline(label_map, num_inference_steps=2, generator=seeded(), output_type="np").images


def layout(pipeline) -> np.ndarray:
    ratios, known = pipeline.requests([{pipeline.class_names[1]: 0.5}])
    return pipeline(ratios, known, num_inference_steps=2, generator=seeded(), height=16, width=16).label_maps


SAMPLES = {"joint": joint, "sdm": sdm, "layout": layout, "layout_d3pm": layout}
