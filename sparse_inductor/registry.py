"""What a kernel family tells the dispatcher, and the registry where it says it.

A kernel family (one file under lowering/) describes its kernels as a KernelSpec and registers it
here when its module is imported; the dispatcher (dispatch.py) reads the registry. Neither imports
the other: lowering stands below dispatch, and both import this module (docs/architecture.md).

    Layer        what the dispatcher knows of a linear (pattern, shape, dtype, device, row check)
    Fusion       what a family that generates its own epilogue (CUTLASS) will fuse after a layer
    Scaled       how an fp8 linear read from torch._scaled_mm is computed once rewritten
    KernelSpec   one kernel family: what it serves, why it cannot run a layer, its time estimate,
                 and what measuring and the rewrite need from it
    DeviceModel  the roofline the estimates use (device_model, dense_us)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch

__all__ = ["Layer", "Fusion", "Scaled", "KernelSpec", "DeviceModel", "device_model", "dense_us", "register_kernel", "kernels"]


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
    fast_accum: the call's use_fast_accum=True: the model accepts the tensor core's own accumulation
    between fp32 promotions, so the CUTLASS family may run its FP8FastAccum configs (with False it
    never does; the dense timing passes the same flag).
    """

    form: str  # "lib16" | "row"
    out_dtype: torch.dtype
    scale_a_vector: bool = False
    scale_b_vector: bool = False
    fast_accum: bool = False

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
class Fusion:
    """What follows one output piece of a layer's matmul in the graph that a kernel generating its own
    epilogue (lowering/cutlass_24.py) will compute in it, in this order (passes/epilogues.py reads it
    from the graph before the layer is decided, so that the family is timed with the epilogue it
    will run; passes/cutlass_epilogue.py folds it in after the rewrite):

        v = acc * token_scale[m] * weight_scale[n] + bias[n]   (int8 / fp8: the dequantization)
        v = activation(v); v = gate(v, aux); v = v + aux (residual); y = v rounded to out_dtype

    token_scale / weight_scale: "vector" or "tensor" (one number), None without; bias: its dtype
    where the dequantization brings one (a 16-bit linear's own bias is the op's: Layer has it not);
    aux_dtype: the gate's or the residual's other tensor; out_dtype: None for the layer's dtype.
    `fused` names what is fused in the user's words (explain's "fused" column)."""

    activation: Optional[str] = None  # relu | gelu | gelu_tanh | silu
    gate: Optional[str] = None  # silu_acc (silu(v) * aux) | silu_aux (v * silu(aux))
    residual: bool = False
    aux_dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None
    token_scale: Optional[str] = None
    weight_scale: Optional[str] = None
    bias: Optional[torch.dtype] = None

    @property
    def fused(self) -> tuple[str, ...]:
        out = []
        if self.token_scale or self.weight_scale:
            out.append("scales")
        if self.bias is not None:
            out.append("bias")
        if self.out_dtype is not None:
            out.append("cast")
        if self.activation:
            out.append({"gelu_tanh": "gelu (tanh)"}.get(self.activation, self.activation))
        if self.gate:
            out.append("silu gate")
        if self.residual:
            out.append("residual")
        return tuple(out)

    def describe(self) -> str:
        return ",".join(self.fused) or "-"


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
    # fp8 (scaled): how the graph's non-finite row guard over x8 (a sum, linear_rewrite._replace_scaled_mm)
    # costs: "fused" (it joins x8's producer kernel, the quantization: not timed) or "separate" (timed)
    guard: str = "separate"
    # the check will come from the input of the layer before (passes/derived_check.py for 2:4 on
    # cuSPARSELt, fuse_mlp.py for block pairs predict it): the runners time that check (cuSPARSELt:
    # the flagged-rows kernel; the block template: none of its own), not a pass over x
    derived_check: bool = False
    # what a family that generates its epilogue will fuse (Fusion), per piece of the output: ((size,
    # Fusion), ...) left to right, two or more where the graph splits a concatenated layer's output
    # and the pieces take different epilogues (a Llama MLP's w1 | w3); () where nothing is fused
    epilogue: tuple = ()
    # a weight behind a permutation (formats/permute.py): the kernel reads x gathered (x_index) / writes
    # its output columns through a map (out_index, the block kernel); the runners take the index
    # vectors from the constants ("x_index", "out_index"), and a kernel without an in-kernel gather
    # (cuSPARSELt) gathers x before its call
    x_index: bool = False
    out_index: bool = False


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    bytes_per_us: float
    flops_per_us: float  # dense 16-bit matrix rate
    launch_us: float


# Measured ceilings on the H100 80GB HBM3 (torch 2.11): copy 3.0 TB/s, bf16 GEMM 740 TFLOP/s. The model
# uses what a good kernel reaches at small sizes, not the peaks.
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
    es = layer.dtype.itemsize
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
    row_check: the rewrite passes its op the non-finite row check (passes/row_checks.row_check).
    split_outputs: a concatenated layer whose output the graph splits (Inductor's fusion of
    linears sharing an input) becomes one op per piece (passes/split_outputs.py): for template
    kernels, so that what reads several pieces (a gated product) fuses into a template's store.
    fixup_in_graph: with row_check, the fixup may go into the pointwise ops after the op (y * (1 +
    g), options rules.row_fixup_in_graph); False: always the op's row_check argument (a kernel that
    applies it in its own epilogue at no cost).
    prepare(layers): called once per graph, before the first layer is timed, with every layer of
    the graph the family can run (check passed) on the timing device: a family that compiles
    kernels (CUTLASS) builds all their candidates in one parallel build.
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
    fixup_in_graph: bool = True
    prepare: Optional[Callable[[list], None]] = None
    # not yet verified on a GPU: a candidate only where the options name it (`kernel`, or
    # `experimental`), never by default
    experimental: bool = False

    def enabled(self, opts) -> bool:
        return not self.experimental or opts.kernel == self.name or self.name in opts.experimental


_KERNELS: dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    """Called by each kernel family when its module is imported (lowering/__init__.py imports them all)."""
    _KERNELS[f"{spec.pattern}/{spec.name}"] = spec
    return spec


def kernels(pattern: Optional[str] = None) -> list[KernelSpec]:
    return [k for k in _KERNELS.values() if pattern is None or k.pattern == pattern]
