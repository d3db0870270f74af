"""Per-sample seeds: what makes every image, augmentation and training batch independent of batch sizes,
process counts, worker counts and resumes.

A leaf module (torch only).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends only on ``parts``: stable across processes, workers and resumes."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def cpu_generators(seeds) -> list[torch.Generator]:
    """One generator per sample, on the CPU: the same seed gives the same noise on any device."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]
