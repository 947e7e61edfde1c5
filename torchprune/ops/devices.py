"""The devices this build's C++ ops run on: CPU always, CUDA when the extension was built with
the CUDA kernels (setup.py decides at build time), so a CPU build refuses CUDA tensors up front
with a message instead of failing inside the dispatcher."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["kernel_devices"]


def kernel_devices(op: str) -> Tuple[str, ...]:
    """The device types ``torch.ops.torchprune.<op>`` has a kernel for, e.g. ("cpu", "cuda")."""
    devices = ["cpu"]
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"torchprune::{op}", "CUDA"):
        devices.append("cuda")
    return tuple(devices)

