"""The reference kernels: the ops' own implementations (ops.py: decompress + F.linear), correct on
every device, never fast. The dispatcher takes them only when pinned (options kernel="reference")
or forced where nothing else runs (the CPU)."""
from __future__ import annotations

from typing import Optional

import torch

from ..registry import DeviceModel, KernelSpec, Layer, dense_us, register_kernel


def _no_limits(layer: Layer) -> Optional[str]:
    if layer.dtype == torch.int8:
        return "int8 x int8 runs on cuSPARSELt only"
    if layer.dtype == torch.float8_e4m3fn:
        return "fp8 x fp8 (torch._scaled_mm) runs on cuSPARSELt only"
    return None


def _reference_us(layer: Layer, model: Optional[DeviceModel]) -> Optional[float]:
    d = dense_us(layer, model)
    # decompression writes the dense weight before the same matmul
    return None if d is None else 2 * d


# the reference kernels split like the templates they stand in for (so the CPU tests see the pass)
register_kernel(KernelSpec("reference", "2:4", ("cpu", "cuda"), _no_limits, _reference_us, reference=True,
                           split_outputs=True))
register_kernel(KernelSpec("reference", "block", ("cpu", "cuda"), _no_limits, _reference_us, reference=True,
                           split_outputs=True))
