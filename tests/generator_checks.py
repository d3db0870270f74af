"""Checks the generator tests share: the mIoU evaluate.py must report, recomputed without evaluate.py or
segdiff.metrics, and a spy on the schedulers a generator builds and steps with."""

import functools
import inspect
import json
import runpy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from conftest import ROOT
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from PIL import Image

import segdiff.schedulers

IGNORE = 255
SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def expected_miou(save_dir: Path, joint: bool) -> tuple[float, dict]:
    """mIoU and per-class IoU of `evaluate.py --segmenter palette --metrics miou` on a generator's --save_dir.

    Recomputed here with numpy from the files of metadata.jsonl: each image read by nearest palette colour
    (squared RGB distance, the first class on a tie), scored against its own label PNG, ignore pixels skipped,
    one confusion matrix over all samples. ``joint``: the joint generator's layout, where a sample's mask only
    says "this class" or "the rest", so a pixel read as another class counts as the rest (background; for a
    background sample, a column of its own that is always wrong).
    """
    save_dir = Path(save_dir)
    classes = json.loads((save_dir / "class_names.json").read_text())
    names, palette = classes["class_names"], np.asarray(classes["palette"], dtype=np.int64)
    num_classes = len(names)
    records = [json.loads(line) for line in (save_dir / "metadata.jsonl").read_text().splitlines()]
    assert records, f"{save_dir}/metadata.jsonl is empty"
    confusion = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for record in records:
        image = np.asarray(Image.open(save_dir / record["file_name"]).convert("RGB"), dtype=np.int64)
        predicted = ((image[:, :, None, :] - palette[None, None]) ** 2).sum(-1).argmin(-1)
        mask = Image.open(save_dir / record["mask_file_name"])
        assert mask.mode in ("P", "L"), f"{record['mask_file_name']} is not a label PNG ({mask.mode})"
        target = np.asarray(mask, dtype=np.int64)
        if joint:
            class_id = record["class_id"]
            predicted = np.where(predicted == class_id, class_id, 0 if class_id else num_classes)
        keep = target != IGNORE
        np.add.at(confusion, (target[keep], predicted[keep]), 1)
    true_positives = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positives
    per_class = {name: float(true_positives[c] / union[c]) if union[c] else None for c, name in enumerate(names)}
    present = [iou for iou in per_class.values() if iou is not None]
    return float(np.mean(present)), per_class


def spy_on_schedulers(monkeypatch) -> dict:
    """Record what segdiff.schedulers.make_scheduler builds (``built``: (name, scheduler) pairs), how many ``step``
    calls each scheduler class gets (``steps``) and the ``eta`` that each DDIM step was called with (``eta``: the
    argument as passed, by keyword or position; None when not passed, i.e. DDIM's default), for a generator run in
    this process. The spied ``step`` keeps its signature: the pipelines look for ``eta`` and ``generator`` there
    (prepare_extra_step_kwargs) and still find them."""
    seen = {"built": [], "steps": Counter(), "eta": []}
    make_scheduler = segdiff.schedulers.make_scheduler

    def recording_make_scheduler(name, config, **options):
        scheduler = make_scheduler(name, config, **options)
        seen["built"].append((name, scheduler))
        return scheduler

    # Wherever it was imported by name already (the pipelines); the scripts import it when they run.
    for module in [module for name, module in sys.modules.items() if name.startswith("segdiff")]:
        if getattr(module, "make_scheduler", None) is make_scheduler:
            monkeypatch.setattr(module, "make_scheduler", recording_make_scheduler)
    for cls in SCHEDULER_CLASSES.values():

        @functools.wraps(cls.step)
        def step(self, *args, _step=cls.step, **kwargs):
            seen["steps"][type(self).__name__] += 1
            if isinstance(self, DDIMScheduler):
                passed = inspect.signature(_step).bind(self, *args, **kwargs).arguments  # without the defaults
                seen["eta"].append(passed.get("eta"))
            return _step(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", step)
    return seen


def run_generator(monkeypatch, script: str, *args) -> None:
    """``python <script> <args>`` in this process (its ``__main__`` block): the spy sees what it builds."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(ROOT / script), run_name="__main__")
