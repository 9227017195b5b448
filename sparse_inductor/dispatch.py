"""Which kernel runs a sparse layer: a registry of kernel families and a cost model.

Every kernel family registers a KernelSpec: the pattern it serves, the devices it runs on, a guard
that returns why it cannot run a layer (or None), an estimate of its time, and (for measuring)
how to build its weights and run it eagerly. `choose` keeps a layer dense unless the best runnable
kernel beats dense by `min_speedup`, or `force` is set.

Two ways to know "beats": measured (the default on CUDA, options dispatch="auto"/"measure"): the
rewrite pass hands `choose` a timer (measure.py) that times dense and every candidate on the device
at the layer's M, with the layer's real compressed weight, and caches the times on disk; or
modelled (dispatch="model", and wherever measuring is impossible): a roofline (bytes over bandwidth,
flops over peak, plus a launch cost) per device. Devices with neither (the CPU) keep every layer
dense unless forced.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import torch

from .options import SparseOptions

__all__ = ["Layer", "Scaled", "KernelSpec", "Choice", "register_kernel", "kernels", "choose", "device_model",
           "dense_us"]


@dataclasses.dataclass(frozen=True)
class Scaled:
    """How an fp8 linear read from `torch._scaled_mm(x8, W8^T, scale_a, scale_b, bias, out_dtype=...)`
    is computed once rewritten (docs/formats.md, "fp8"):

    form "lib16" (out_dtype bf16, options fp8_product="bf16", the default): the library writes the
    UNSCALED product rounded to bf16 (bf16 has fp32's exponent range: no overflow whatever the
    scales), then scale_a, scale_b, bias and the cast to bf16 in one Inductor pointwise kernel. Two
    roundings: the product's (at most 2^-8 of |product|, bf16's unit roundoff) and the output's
    (2^-8 of |output|): within one bf16 ulp of the exact result where "row" is within half of one.
    Costs a bf16 write and read of y (half the bytes of "row");
    form "row" (fp16 / fp32 outputs, or options fp8_product="fp32"): the library's fp32 accumulator as
    an fp32 output, then scale_a, scale_b, bias and the cast to out_dtype in one Inductor pointwise
    kernel (one rounding, as torch._scaled_mm; costs an fp32 write and read of y).
    scale_a_vector / scale_b_vector: scale_a is [M, 1] / scale_b is [1, N] (row-wise) rather than one
    number (the dense timing calls torch._scaled_mm with the same scale shapes).
    """

    form: str  # "lib16" | "row"
    out_dtype: torch.dtype
    scale_a_vector: bool = False
    scale_b_vector: bool = False

    @property
    def lib_out_dtype(self) -> torch.dtype:
        """What the library writes, the unscaled product for the epilogue to finish: bf16 ("lib16")
        or fp32 ("row")."""
        return torch.bfloat16 if self.form == "lib16" else torch.float32

    def describe(self) -> str:
        """The form in words (the decision's reason says which one a layer was timed and rewritten in)."""
        what = "unscaled product in bf16" if self.form == "lib16" else "fp32 accumulator"
        return (f"fp8 form {self.form} (cuSPARSELt's {what}, then scales, bias, row guard and cast to "
                f"{str(self.out_dtype).replace('torch.', '')} in one Inductor kernel)")


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
    weight_dtype: Optional[torch.dtype] = None  # the stored weight's dtype where it differs (int8 weight-only)
    scaled: Optional[Scaled] = None  # fp8 x fp8 read from torch._scaled_mm (dtype is then float8_e4m3fn)
    # int8 x int8 (torch._int_mm): what the library writes, int32 (exact) or bf16 (options int8_product)
    product: Optional[torch.dtype] = None
    # the non-finite row check of kernels that skip zeros (KernelSpec.row_check): "none", "fused"
    # (its reduction over x can fuse with x's producer: not timed) or "separate" (timed)
    row_check: str = "none"
    # the check will come from the input of the layer before (passes/derived_check.py for 2:4 on
    # cuSPARSELt, fuse_mlp.py for block pairs predict it): the runners time that check (cuSPARSELt:
    # the flagged-rows kernel; the block template: none of its own), not a pass over x
    derived_check: bool = False


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
    """One kernel family.

    compress(w, layer) -> the constants its op reads, when not the pattern's own format
    (None: formats/, via passes/linear_rewrite._compress); fmt names that own format (a string, or
    a function of the layer where the format depends on it).
    runner(tensors, bias, layer, params) -> fn(x) -> y: an eager call of the kernel, for timing.
    variants(layer, tensors) -> the parameter sets to time (e.g. cuSPARSELt algorithm ids); the
    fastest one's parameters go into the graph with the kernel.
    node_args(x, constants, bias, n, k, params) -> (op, args): the graph node the rewrite makes
    (None: the pattern's op, sparse_inductor::linear_24 / linear_block, with `kernel` = name).
    host_heavy: its host time per call is counted when timing outside CUDA graphs.
    row_check: the rewrite passes its op the non-finite row check (linear_rewrite._row_check).
    split_outputs: a concatenated layer whose output the graph splits (Inductor's fusion of
    linears sharing an input) becomes one op per piece (passes/split_outputs.py): for template
    kernels, so that what reads several pieces (a gated product) fuses into a template's store.
    """

    name: str
    pattern: str
    devices: tuple[str, ...]
    check: Callable[[Layer], Optional[str]]
    estimate_us: Callable[[Layer, Optional[DeviceModel]], Optional[float]]
    reference: bool = False  # a correctness reference, never chosen over a real kernel
    compress: Optional[Callable[..., dict]] = None
    fmt: Optional[Union[str, Callable[[Layer], Optional[str]]]] = None
    runner: Optional[Callable[..., Callable]] = None
    variants: Optional[Callable[..., list]] = None
    node_args: Optional[Callable[..., tuple]] = None
    host_heavy: bool = False  # its launch costs host time that matters outside CUDA graphs (measure.py)
    row_check: bool = False  # it skips the zeros without restoring dense's non-finite rows: pass it g
    split_outputs: bool = False  # split a concatenated layer back at its output's split


@dataclasses.dataclass(frozen=True)
class Choice:
    kernel: str  # "dense" or a KernelSpec name
    reason: str
    dense_us: Optional[float] = None
    sparse_us: Optional[float] = None
    params: dict = dataclasses.field(default_factory=dict)  # the kernel's parameters (e.g. alg_id)
    candidates: dict = dataclasses.field(default_factory=dict)  # measured: {"dense": us, kernel: us}
    measured: bool = False


# A timer: (kernel name or "dense", M) -> (median us, params) or None when it could not be timed.
Timer = Callable[[str, int], Optional[tuple]]


_KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    _KERNELS[f"{spec.pattern}/{spec.name}"] = spec
    return spec


def kernels(pattern: Optional[str] = None) -> list[KernelSpec]:
    return [k for k in _KERNELS.values() if pattern is None or k.pattern == pattern]


def choose(layer: Layer, opts: SparseOptions, timer: Optional[Timer] = None) -> Choice:
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
    if timer is not None and opts.dispatch != "model" and layer.m is not None:
        measured = _choose_measured(layer, opts, [k for k in runnable if not k.reference and k.runner], timer)
        if measured is not None:
            return measured
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


def m_buckets(layer: Layer) -> list[int]:
    """The Ms a layer is timed at: its own for a static M; for a dynamic one the hint and a spread
    of batch sizes around it (the op runs one kernel for every M, so it must not lose at any)."""
    if layer.m_static:
        return [layer.m]
    spread = [1, 16, 128, 1024, 8192]
    return [layer.m] + [m for m in spread if m != layer.m and m <= max(8 * layer.m, 16)]


# A kernel chosen for a dynamic M may lose to dense at another bucket by at most this much.
BUCKET_TOLERANCE = 1.02


def _choose_measured(layer: Layer, opts: SparseOptions, cands: list[KernelSpec], timer: Timer) -> Optional[Choice]:
    ms = m_buckets(layer)
    dense = [timer("dense", m) for m in ms]
    if any(d is None for d in dense):
        return None  # cannot measure dense here: the caller falls back to the model
    dense_t = [d[0] for d in dense]
    table: dict = {"dense": dense_t[0]}
    best = None
    for k in cands:
        ts = [timer(k.name, m) for m in ms]
        if any(t is None for t in ts):
            table[k.name] = None
            continue
        table[k.name] = ts[0][0]
        worst = max(t[0] / d for t, d in zip(ts, dense_t))  # slowest ratio vs dense over the buckets
        if best is None or ts[0][0] < best[1]:
            best = (k, ts[0][0], ts[0][1], worst)
    where = f"M={layer.m}" + ("" if layer.m_static else f" (dynamic; buckets {ms})")
    if best is None:
        failures = getattr(timer, "failures", None) or {}  # (measure.LayerTimer says why)
        why = "; ".join(f"{k.name}: {failures[k.name]}" for k in cands if failures.get(k.name))
        return Choice("dense", f"no sparse kernel could be timed at {where}" + (f" ({why})" if why else ""),
                      dense_t[0], None, {}, table, True)
    k, t, params, worst = best
    speedup = dense_t[0] / t
    if opts.force:
        return Choice(k.name, f"forced (options force=True); measured {speedup:.2f}x vs dense at {where}",
                      dense_t[0], t, params, table, True)
    if t * opts.min_speedup <= dense_t[0] and worst <= BUCKET_TOLERANCE:
        return Choice(k.name, f"measured {speedup:.2f}x faster than dense at {where} ({t:.1f} vs {dense_t[0]:.1f} us)",
                      dense_t[0], t, params, table, True)
    if worst > BUCKET_TOLERANCE and speedup >= opts.min_speedup:
        why = f"{k.name} wins at M={layer.m} but is {worst:.2f}x dense's time at another batch size ({ms})"
    else:
        why = (f"sparse not measured faster by {opts.min_speedup:.2f}x at {where} "
               f"({k.name} {t:.1f} us vs dense {dense_t[0]:.1f} us)")
    return Choice("dense", why, dense_t[0], t, {}, table, True)


# ---- the reference kernels (ops.py): decompress + F.linear, correct everywhere, never fast

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
