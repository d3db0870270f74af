"""Shared plumbing for the segmentation-mask-conditioned diffusion scripts.

The top-level scripts (``train_*.py``, ``generate_*.py``, ``evaluate.py``) read like diffusers
examples; what they all need lives here once: dataset layouts and joint transforms (``data``),
the procedural toy dataset (``toy``), the offline tiny Stable Diffusion folder (``tiny``) and the
accelerate training plumbing (``training``).
"""
