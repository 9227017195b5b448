"""The cuSPARSELt kernel family: 2:4 linears on the sparse tensor cores, as the dispatcher sees them.

The library itself (ctypes binding, plans, the row fixup kernel) is runtime/cusparselt.py; this
module describes its kernel to the dispatcher: which layers it can run (fp16 / bf16, int8 x int8,
fp8 e4m3 x e4m3 read from torch._scaled_mm), a time estimate, the compressed weight, an eager
runner for timing (with what the compiled graph adds around the call), the algorithm ids to time,
and the graph node the rewrite makes: sparse_inductor::linear_cslt (ops.py), an extern call in the
compiled graph.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..registry import KernelSpec, dense_us, register_kernel
from ..runtime import cusparselt as cslt
from . import row_check


def _check(layer) -> Optional[str]:
    if layer.weight_dtype not in (None, layer.dtype):
        return "weight-only quantized weights run on the Triton kernels (cuSPARSELt needs x and W in one dtype)"
    if layer.dtype == torch.float8_e4m3fn and layer.scaled is None:
        return "an fp8 linear is read from torch._scaled_mm only (its scales and output dtype)"
    if layer.out_index:
        return "cuSPARSELt maps no output columns (a 2:4 weight's rows are permuted in its constants)"
    return cslt.why_not_runnable(layer.n, layer.k, layer.dtype, _out_dtype(layer) if layer.scaled else None)


# Calibration from the H100 (torch 2.11, cuSPARSELt 0.8, bf16, docs/performance.md): with the best
# algorithm, 1.13-1.48x of cuBLAS at M >= 4096; ~1x at M=64 and 0.5x at M=16.
def _estimate_us(layer, model) -> Optional[float]:
    if layer.dtype == torch.float8_e4m3fn:
        return None  # no calibration against torch._scaled_mm (0.75x of it at M=8192 with alg 0): measured only
    d = dense_us(layer, model)
    if d is None:
        return None
    # a column-permuted weight: x gathered before the call, a read and a write of x
    gather = 2 * layer.m * layer.k * layer.dtype.itemsize / model.bytes_per_us if layer.x_index else 0.0
    return (d / 1.3 if layer.m >= 2048 else d / 0.6) + gather


def _compress_spec(w, layer) -> dict:
    return {"wc": cslt.compress(w)}


def _runner(t, bias, layer, params):
    """The call plus what the compiled graph adds around it, for timing: the non-finite row check
    (layer.row_check: nan_rows_ after the call, and a reduction over x where it is "separate", i.e.
    cannot fuse with x's producer; nothing for "none": int8 x, or options nonfinite="fast"; with
    layer.derived_check, the flagged-rows check with no row flagged: passes/derived_check.py).
    A column-permuted weight (layer.x_index): the library has no gather of its own, so x is gathered
    first (index_select, one more pass over x, as the graph runs it). int8 x int8: the graph's
    dequantization after the call, timed as one pass over the product (int32: a cast to bf16;
    bf16: a multiplication by a scalar), as dense's torch._int_mm is (measure.Timer): the CUTLASS
    family computes it in its epilogue, and at 8192x14336x4096 the pass is what sets the two apart
    (timed with it: cuSPARSELt 863.4 us, CUTLASS 535.3 us, dense 1448.5 us; H100,
    docs/benchmarks.md#cutlass)."""
    wc, n, k = t["wc"], layer.n, layer.k
    xi = t.get("x_index") if layer.x_index else None
    if xi is not None:
        plain = _runner({**t, "x_index": None}, bias, dataclasses.replace(layer, x_index=False), params)
        return lambda x: plain(x.index_select(1, xi))  # (a separate check reads the gathered copy: the same bytes)
    alg, sk = params.get("alg_id", 0), params.get("split_k", 1)
    out = _out_dtype(layer)
    if layer.dtype == torch.float8_e4m3fn:
        return _fp8_runner(wc, bias, layer, alg, sk)
    zeros: dict[int, Tensor] = {}  # "fused": the check is computed elsewhere; a finite g per M

    def zeros_for(x):  # made on the untimed first call at this M (the timer calls once before timing)
        g = zeros.get(x.shape[0])
        if g is None:
            g = zeros[x.shape[0]] = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        return g

    def run(x):
        if out is not None or layer.row_check == "none":
            return cslt.linear(x, wc, bias, n, k, alg, sk, out)
        if layer.derived_check:  # row_check(x, gd) with no row flagged: reads gd, not x
            g = row_check.row_check_eager(x, maybe=zeros_for(x))
        elif layer.row_check == "separate":
            g = torch.sum(x, dim=-1, dtype=torch.float32)
        else:
            g = zeros_for(x)
        return cslt.nan_rows_(cslt.linear(x, wc, bias, n, k, alg, sk, out), g)

    if layer.dtype == torch.int8:
        one = torch.ones((), device=wc.device, dtype=torch.float32)

        def run_int8(x):
            y = run(x)
            return y.to(torch.bfloat16) if y.dtype == torch.int32 else torch.mul(y, one)

        return run_int8
    return run


def _fp8_runner(wc, bias, layer, alg, sk):
    """fp8 (torch._scaled_mm rewritten, passes/linear_rewrite._replace_scaled_mm), kernels per call:
    the row guard's reduction over x where it does not join x's producer (layer.guard "separate": x8
    a graph input, not the output of a quantization in the graph; read here as bytes: same traffic,
    fp8 has no eager sum);
    form "row": the call with an fp32 output and the epilogue kernel,
    timed as a cast of y to out_dtype (the same bytes as Inductor's fused scale/bias/cast kernel:
    read 4, write 2 per output); form "lib16": the call with a bf16 output (the unscaled product)
    and the epilogue kernel, timed as one multiplication of y by a scalar in bf16 (read 2, write 2
    per output, as Inductor's kernel that upcasts, scales, adds the bias and rounds to bf16). The
    bias is the epilogue's, as are the row-wise scales: N + M numbers, not counted."""
    sc, n, k = layer.scaled, layer.n, layer.k
    one = torch.ones((), device=wc.device, dtype=torch.float32)

    separate = layer.guard == "separate"

    def run(x):
        if separate:
            torch.sum(x.view(torch.uint8), dim=-1, dtype=torch.int32)
        y = cslt.linear(x, wc, None, n, k, alg, sk, sc.lib_out_dtype)
        if y.dtype == sc.out_dtype:  # "lib16": one pass in the product's dtype (a 0-dim fp32 factor keeps bf16)
            return torch.mul(y, one)
        return y.to(sc.out_dtype)

    return run


def _out_dtype(layer) -> Optional[torch.dtype]:
    """int8 x int8 writes torch._int_mm's int32 result (exact), or that product rounded to bf16
    (layer.product: options int8_product; the scales stay graph ops after it); fp8 x fp8 writes
    what its form says (registry.Scaled.lib_out_dtype)."""
    if layer.dtype == torch.int8:
        return layer.product or torch.int32
    if layer.scaled is not None:
        return layer.scaled.lib_out_dtype
    return None


def _variants(layer, t) -> list:
    x = torch.empty(layer.m or 8, layer.k, dtype=layer.dtype, device=t["wc"].device)
    top = cslt.max_alg_id(t["wc"], x, layer.n, layer.k, _out_dtype(layer))  # (0 where the library cannot load)
    if not top:
        top = torch.backends.cusparselt.get_max_alg_id() or 20
    return [{"alg_id": a, "split_k": 1} for a in cslt.safe_alg_ids(top, layer.dtype, t["wc"].device.index)]


def _node_args(x, constants, bias, n, k, params) -> tuple:
    op = torch.ops.sparse_inductor.linear_cslt.default
    args = (x, constants[0], bias, n, k, int(params.get("alg_id", 0)), int(params.get("split_k", 1)))
    if x.meta["val"].dtype == torch.int8:
        args += (torch.int32,)
    return op, args


register_kernel(KernelSpec("cusparselt", "2:4", ("cuda",), _check, _estimate_us, compress=_compress_spec,
                           fmt="cslt", runner=_runner, variants=_variants, node_args=_node_args, host_heavy=True,
                           row_check=True))
