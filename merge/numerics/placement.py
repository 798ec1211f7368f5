"""Which ways a merge's passes take on a device, declared once.

On the CPU: a pass over a tensor is split in spans among the merge's workers, in chunks
small enough to stay in the caches, through the fused loops (kernels.py) where they fit,
and merged tensors go into reused output buffers. On a GPU: one large kernel per pass,
unsplit. The ways only change the speed, never a byte: tests/test_device_bytes.py runs
the GPU's ways on the CPU (by patching :func:`cpu_ways`) and compares the bytes, so CI
checks the GPU path's logic without a GPU.
"""

from __future__ import annotations

import torch


def cpu_ways(device: torch.device) -> bool:
    """Whether passes over tensors on ``device`` take the CPU's ways."""
    return device.type == "cpu"
