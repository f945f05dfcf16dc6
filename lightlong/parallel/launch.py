"""Joining the process group of a `torchrun` launch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_torchrun(device: torch.device) -> torch.device:
    """Joins the process group that torchrun's environment describes (NCCL for a CUDA
    device, gloo otherwise); returns this process's device: cuda:LOCAL_RANK for "cuda"
    without an index, else `device`. ValueError when not launched by torchrun."""
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "not launched by torchrun (WORLD_SIZE is unset): run it as torchrun "
            "--nproc-per-node N -m lightlong ..."
        )
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device
