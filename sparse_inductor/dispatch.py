"""Which kernel runs a sparse layer: a registry of kernel families and a cost model.

Every kernel family registers a KernelSpec: the pattern it serves, the devices it runs on, a guard
that returns why it cannot run a layer (or None), and an estimate of its time. `choose` keeps a
layer dense unless the best runnable kernel is expected to beat dense by `min_speedup`, or
`force` is set. The model is a roofline (bytes over bandwidth, flops over peak, plus a launch
cost) per device; devices it does not know (the CPU among them) have no estimate, so nothing is
rewritten there unless forced.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from .options import SparseOptions

__all__ = ["Layer", "KernelSpec", "Choice", "register_kernel", "kernels", "choose", "device_model", "dense_us"]


@dataclasses.dataclass(frozen=True)
class Layer:
    """What the dispatcher knows of a linear: y[M, N] = x[M, K] @ W[N, K]^T."""

    pattern: str
    m: Optional[int]
    n: int
    k: int
    dtype: torch.dtype
    device: str  # "cpu", "cuda"
    block: Optional[int] = None
    block_density: Optional[float] = None
    device_name: str = ""
    m_static: bool = True  # False: M is dynamic and `m` only Inductor's hint for it


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    bytes_per_us: float
    flops_per_us: float  # dense 16-bit matrix rate
    launch_us: float


# Measured ceilings (../shared/BASELINES.md, H100 80GB HBM3, torch 2.11): copy 3.0 TB/s, bf16 GEMM
# 740 TFLOP/s. The model uses what a good kernel reaches at small sizes, not the peaks.
_CUDA_MODELS = {
    "H100": DeviceModel(bytes_per_us=2.6e6, flops_per_us=6.0e8, launch_us=4.0),
    "H200": DeviceModel(bytes_per_us=3.8e6, flops_per_us=6.0e8, launch_us=4.0),
}


def device_model(layer: Layer) -> Optional[DeviceModel]:
    if layer.device != "cuda":
        return None
    for key, model in _CUDA_MODELS.items():
        if key in layer.device_name:
            return model
    return None


def dense_us(layer: Layer, model: Optional[DeviceModel] = None) -> Optional[float]:
    model = model or device_model(layer)
    if model is None or layer.m is None:
        return None
    es = torch.finfo(layer.dtype).bits // 8
    byts = es * (layer.n * layer.k + layer.m * layer.k + layer.m * layer.n)
    flops = 2 * layer.m * layer.n * layer.k * (2 if layer.dtype == torch.float32 else 1)
    return max(byts / model.bytes_per_us, flops / model.flops_per_us) + model.launch_us


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    pattern: str
    devices: tuple[str, ...]
    check: Callable[[Layer], Optional[str]]
    estimate_us: Callable[[Layer, Optional[DeviceModel]], Optional[float]]
    reference: bool = False  # a correctness reference, never chosen over a real kernel


@dataclasses.dataclass(frozen=True)
class Choice:
    kernel: str  # "dense" or a KernelSpec name
    reason: str
    dense_us: Optional[float] = None
    sparse_us: Optional[float] = None


_KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    _KERNELS[f"{spec.pattern}/{spec.name}"] = spec
    return spec


def kernels(pattern: Optional[str] = None) -> list[KernelSpec]:
    return [k for k in _KERNELS.values() if pattern is None or k.pattern == pattern]


def choose(layer: Layer, opts: SparseOptions) -> Choice:
    cands = [k for k in kernels(layer.pattern) if layer.device in k.devices]
    if opts.kernel is not None:
        cands = [k for k in cands if k.name == opts.kernel]
    if not cands:
        pinned = f" named {opts.kernel!r}" if opts.kernel else ""
        return Choice("dense", f"no {layer.pattern} kernel{pinned} for device {layer.device}")
    runnable, why_not = [], []
    for k in cands:
        reason = k.check(layer)
        (why_not.append(f"{k.name}: {reason}") if reason else runnable.append(k))
    if not runnable:
        return Choice("dense", "no kernel can run this layer (" + "; ".join(why_not) + ")")
    model = device_model(layer)
    d_us = dense_us(layer, model)

    def rank(k: KernelSpec):
        est = k.estimate_us(layer, model)
        return (k.reference, math.inf if est is None else est)

    best = min(runnable, key=rank)
    est = best.estimate_us(layer, model)
    if opts.force:
        return Choice(best.name, "forced (options force=True)", d_us, est)
    if d_us is None or est is None:
        what = "M unknown" if layer.m is None else f"no cost model for {layer.device_name or layer.device}"
        return Choice("dense", f"{what}: stays dense unless forced", d_us, est)
    if est * opts.min_speedup <= d_us:
        return Choice(best.name, f"expected {d_us / est:.2f}x faster than dense ({est:.1f} vs {d_us:.1f} us)", d_us, est)
    return Choice("dense", f"sparse not expected to win ({best.name} {est:.1f} us vs dense {d_us:.1f} us)", d_us, est)


# ---- the reference kernels (ops.py): decompress + F.linear, correct everywhere, never fast

def _no_limits(layer: Layer) -> Optional[str]:
    return None


def _reference_us(layer: Layer, model: Optional[DeviceModel]) -> Optional[float]:
    d = dense_us(layer, model)
    # decompression writes the dense weight before the same matmul
    return None if d is None else 2 * d


register_kernel(KernelSpec("reference", "2:4", ("cpu", "cuda"), _no_limits, _reference_us, reference=True))
register_kernel(KernelSpec("reference", "block", ("cpu", "cuda"), _no_limits, _reference_us, reference=True))
