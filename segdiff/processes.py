"""The processes of a run: one plain process, or those of ``accelerate launch`` / torchrun, and each one's share.

Trainers go through accelerate's ``Accelerator``; generators through `generation_state`, which leaves accelerate's
process-wide state alone in a plain run (tests run generators in-process). Both need `launched_on_cpus_only`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def launched_on_cpus_only() -> bool:
    """True for a multi-process launch (torchrun, mpirun) on a machine without GPUs.

    accelerate only sets up its gloo process group on CPUs when told so (``accelerate launch --cpu``);
    under plain ``torchrun`` it would silently train one independent copy per process.
    """
    from accelerate.utils import is_npu_available, is_xpu_available

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = torch.cuda.is_available() or is_xpu_available() or is_npu_available()
    return world_size > 1 and not has_device


def generation_state():
    """The processes of this run: those of ``accelerate launch`` / torchrun (accelerate's PartialState), or for a
    plain run a `OneProcess`, which leaves accelerate's process-wide state alone (tests run generators in-process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return OneProcess()
    from accelerate import PartialState

    return PartialState(cpu=launched_on_cpus_only())  # torchrun on CPUs: one gloo group, not n copies


@dataclass
class OneProcess:
    """A run of one process, as PartialState describes one: what `generation_state` gives for a plain run."""

    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True
    is_local_main_process: bool = True

    @property
    def device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def wait_for_everyone(self) -> None:
        pass


def process_share(items: list, state) -> list:
    """This process's share of ``items``: every num_processes-th one, from its own index."""
    return items[state.process_index :: state.num_processes]
