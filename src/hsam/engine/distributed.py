"""torchrun-aware process setup: DDP over NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hsam.devices import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_process(device: str = "auto") -> ProcessInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        logger.info("process %d/%d joined (%s on %s)", rank, world, backend, dev)
    return ProcessInfo(rank, world, local_rank, dev)


def barrier(info: ProcessInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: ProcessInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
