"""2:4 linears on the GPU's sparse tensor cores through cuSPARSELt, with the plan made once.

Why not just `torch._cslt_sparse_mm`: on the H100 (torch 2.11, cuSPARSELt 0.8) every call of it
spends ~650 us of host time, whatever M (docs/benchmarks.md), because it builds the descriptors,
the algorithm selection and the plan, and allocates a workspace, on every call. This module talks
to the same library through ctypes and keeps one plan per (weight shape, M, dtype, bias, algorithm):
a call is then one `cusparseLtMatmul` launch plus the output allocation. Where the library cannot
be loaded, `linear` falls back to `torch._cslt_sparse_mm` (correct, with its host cost).

The matmul, in cuSPARSELt's terms: D[N, M] (column-major, i.e. y[M, N] row-major)
= A[N, K] (the structured weight, row-major, compressed by `torch._cslt_compress`) @ B, where
B is x[M, K] row-major read with op TRANSPOSE; the bias (length N) is fused by the library.
The descriptors mirror the ones torch uses for `_cslt_sparse_mm(W_c, x.t(), bias,
transpose_result=True)`, so the compressed buffer `torch._cslt_compress(W)` fits them.

cuSPARSELt requires every dense dimension to be a multiple of 8 (16-bit types): an M that is not
is padded (x copied into a zero-padded buffer, y sliced), N and K must be multiples of 16, checked
by the dispatcher.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("sparse_inductor")

__all__ = ["available", "version", "compress", "linear", "max_alg_id", "why_not_runnable"]

# enums of cusparse.h / cusparseLt.h / library_types.h (cuSPARSELt 0.6 - 0.8)
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_SPARSITY_50 = 0
_COMPUTE_32I, _COMPUTE_32F = 0, 2
_ALPHA_VECTOR_SCALING, _BIAS_POINTER = 5, 8  # cusparseLtMatmulDescAttribute_t
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID, _SPLIT_K = 0, 1, 3  # cusparseLtMatmulAlgAttribute_t
_CUDA_TYPE = {torch.float16: 2, torch.bfloat16: 14}
_OUT_TYPE = {torch.float16: 2, torch.bfloat16: 14, torch.int32: 10, torch.int8: 3}
_INT8 = 3  # CUDA_R_8I
_OPAQUE = 512  # bytes of each opaque cuSPARSELt struct (alignas 16)
_PAD_M = 8


class _Opaque:
    """A 16-byte aligned, zeroed block for one of cuSPARSELt's opaque structs."""

    def __init__(self):
        self._buf = (ctypes.c_uint8 * (_OPAQUE + 16))()
        addr = ctypes.addressof(self._buf)
        self.ptr = ctypes.c_void_p(addr + (-addr) % 16)


class _Lib:
    def __init__(self):
        self.dll = ctypes.CDLL(_library_path(), mode=ctypes.RTLD_GLOBAL)
        self.dll.cusparseLtGetErrorString.restype = ctypes.c_char_p
        self.handles: dict[int, _Opaque] = {}
        self.lock = threading.Lock()

    def check(self, status: int, what: str) -> None:
        if status != 0:
            msg = self.dll.cusparseLtGetErrorString(status)
            raise RuntimeError(f"cuSPARSELt {what} failed: status {status} ({(msg or b'?').decode()})")

    def handle(self, device: int) -> _Opaque:
        with self.lock:
            h = self.handles.get(device)
            if h is None:
                h = _Opaque()
                with torch.cuda.device(device):
                    self.check(self.dll.cusparseLtInit(h.ptr), "cusparseLtInit")
                self.handles[device] = h
            return h


def _library_path() -> str:
    """The libcusparseLt that torch loaded (so both use one copy), else the soname."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcusparseLt.so" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return "libcusparseLt.so.0"


_LIB: Optional[_Lib] = None
_LIB_ERROR: Optional[str] = None


def _lib() -> Optional[_Lib]:
    global _LIB, _LIB_ERROR
    if _LIB is None and _LIB_ERROR is None:
        if os.environ.get("SPARSE_INDUCTOR_CSLT_CTYPES", "1") in ("0", ""):
            _LIB_ERROR = "disabled by SPARSE_INDUCTOR_CSLT_CTYPES=0"
        else:
            try:
                _LIB = _Lib()
            except OSError as e:
                _LIB_ERROR = f"cannot load libcusparseLt: {e}"
                log.info("sparse_inductor: %s; cuSPARSELt calls go through torch._cslt_sparse_mm", _LIB_ERROR)
    return _LIB


def available() -> bool:
    """cuSPARSELt usable from this torch build on this machine (a CUDA GPU present)."""
    return bool(getattr(torch._C, "_has_cusparselt", False)) and torch.cuda.is_available()


def version() -> Optional[int]:
    try:
        return torch.backends.cusparselt.version()
    except Exception:
        return None


def why_not_runnable(n: int, k: int, dtype: torch.dtype) -> Optional[str]:
    if not available():
        return "cuSPARSELt is not available (no CUDA device or torch built without it)"
    if dtype not in _CUDA_TYPE and dtype != torch.int8:
        return f"dtype {dtype} not supported by the cuSPARSELt path (fp16/bf16, or int8 x int8)"
    align = 32 if dtype == torch.int8 else 16
    if n % align or k % align:
        return f"N and K must be multiples of {align} for cuSPARSELt in {dtype} (got N={n}, K={k})"
    return None


def compress(w: Tensor) -> Tensor:
    """The compressed weight cuSPARSELt reads (made once, at compile time), from W [N, K] on CUDA."""
    return torch._cslt_compress(w.contiguous())


class _Plan:
    """Descriptors, algorithm selection, plan and workspace of one matmul configuration."""

    def __init__(self, lib: _Lib, device: int, m: int, n: int, k: int, dtype: torch.dtype,
                 bias_ptr: int, alg_id: int, split_k: int, out_dtype: Optional[torch.dtype] = None,
                 vector_alpha: bool = False):
        self.lib, dll = lib, lib.dll
        self.handle = lib.handle(device)
        h = self.handle.ptr
        # 16-bit: in = out, fp32 compute. int8 x int8 (as torch._cslt_sparse_mm): int32 compute,
        # the output int8 or out_dtype (fp16 / bf16 / int32)
        ty = _INT8 if dtype == torch.int8 else _CUDA_TYPE[dtype]
        out_ty = _OUT_TYPE[out_dtype or dtype]
        compute = _COMPUTE_32I if dtype == torch.int8 else _COMPUTE_32F
        self.vector_alpha = vector_alpha
        self.a, self.b, self.d = _Opaque(), _Opaque(), _Opaque()
        self.mm, self.sel, self.plan = _Opaque(), _Opaque(), _Opaque()
        i64 = ctypes.c_int64
        lib.check(dll.cusparseLtStructuredDescriptorInit(h, self.a.ptr, i64(n), i64(k), i64(k), ctypes.c_uint32(16),
                                                          ty, _ORDER_ROW, _SPARSITY_50), "structured descriptor")
        lib.check(dll.cusparseLtDenseDescriptorInit(h, self.b.ptr, i64(m), i64(k), i64(k), ctypes.c_uint32(16),
                                                     ty, _ORDER_ROW), "dense descriptor (x)")
        lib.check(dll.cusparseLtDenseDescriptorInit(h, self.d.ptr, i64(n), i64(m), i64(n), ctypes.c_uint32(16),
                                                     out_ty, _ORDER_COL), "dense descriptor (y)")
        lib.check(dll.cusparseLtMatmulDescriptorInit(h, self.mm.ptr, _OP_N, _OP_T, self.a.ptr, self.b.ptr,
                                                      self.d.ptr, self.d.ptr, compute), "matmul descriptor")
        if vector_alpha:  # alpha is then a device vector of N floats (a per-row scale), passed per call
            one = ctypes.c_int(1)
            lib.check(dll.cusparseLtMatmulDescSetAttribute(h, self.mm.ptr, _ALPHA_VECTOR_SCALING, ctypes.byref(one),
                                                           ctypes.c_size_t(4)), "alpha vector scaling")
        if bias_ptr:
            self._bias = ctypes.c_void_p(bias_ptr)
            lib.check(dll.cusparseLtMatmulDescSetAttribute(h, self.mm.ptr, _BIAS_POINTER, ctypes.byref(self._bias),
                                                           ctypes.c_size_t(8)), "bias pointer")
        lib.check(dll.cusparseLtMatmulAlgSelectionInit(h, self.sel.ptr, self.mm.ptr, _ALG_DEFAULT), "alg selection")
        mx = ctypes.c_int(0)
        lib.check(dll.cusparseLtMatmulAlgGetAttribute(h, self.sel.ptr, _ALG_CONFIG_MAX_ID, ctypes.byref(mx),
                                                      ctypes.c_size_t(4)), "max alg id")
        self.max_alg_id = mx.value - 1  # the attribute counts the configurations (ids 0..count-1)
        if alg_id:
            if not 0 <= alg_id <= self.max_alg_id:
                raise ValueError(f"cuSPARSELt alg_id {alg_id} out of range 0..{self.max_alg_id}")
            v = ctypes.c_int(alg_id)
            lib.check(dll.cusparseLtMatmulAlgSetAttribute(h, self.sel.ptr, _ALG_CONFIG_ID, ctypes.byref(v),
                                                          ctypes.c_size_t(4)), "alg id")
        if split_k != 1:
            v = ctypes.c_int(split_k)
            lib.check(dll.cusparseLtMatmulAlgSetAttribute(h, self.sel.ptr, _SPLIT_K, ctypes.byref(v),
                                                          ctypes.c_size_t(4)), "split_k")
        lib.check(dll.cusparseLtMatmulPlanInit(h, self.plan.ptr, self.mm.ptr, self.sel.ptr), "plan")
        self._live = True
        ws = ctypes.c_size_t(0)
        lib.check(dll.cusparseLtMatmulGetWorkspace(h, self.plan.ptr, ctypes.byref(ws)), "workspace size")
        self.workspace_bytes = int(ws.value)
        self.workspace = _persistent_empty(self.workspace_bytes, device) if self.workspace_bytes else None
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._prepare_call()

    def _prepare_call(self) -> None:
        """Everything of cusparseLtMatmul's arguments that stays fixed, converted once: a call then
        sets the stream and passes three data pointers."""
        fn = self.lib.dll.cusparseLtMatmul
        fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_void_p, ctypes.c_int32]
        fn.restype = ctypes.c_int
        self._mm = fn
        self._stream = ctypes.c_void_p(0)
        self._fixed = (self.handle.ptr.value, self.plan.ptr.value, ctypes.addressof(self.alpha),
                       ctypes.addressof(self.beta), ctypes.addressof(self._stream),
                       self.workspace.data_ptr() if self.workspace is not None else None)

    def __call__(self, wc: Tensor, x: Tensor, y: Tensor, stream: int, alpha_ptr: int = 0) -> None:
        h, plan, alpha, beta, streams, ws = self._fixed
        if self.vector_alpha:
            alpha = alpha_ptr
        self._stream.value = stream
        yp = y.data_ptr()
        status = self._mm(h, plan, alpha, wc.data_ptr(), x.data_ptr(), beta, yp, yp, ws, streams, 1)
        if status:
            self.lib.check(status, "matmul")

    def __del__(self):
        if getattr(self, "_live", False):
            try:
                dll = self.lib.dll
                dll.cusparseLtMatmulPlanDestroy(self.plan.ptr)
                dll.cusparseLtMatmulAlgSelectionDestroy(self.sel.ptr)
                for d in (self.a, self.b, self.d):
                    dll.cusparseLtMatDescriptorDestroy(d.ptr)
            except Exception:
                pass


def _persistent_empty(nbytes: int, device: int) -> Tensor:
    """A buffer that lives as long as its plan, allocated outside any CUDA-graph memory pool.

    Under mode="reduce-overhead", Inductor's CUDA-graph trees send every allocation of the
    current thread into the graph's private pool, also during their eager warm-up run, and refuse a
    pool that holds live tensors other than outputs. A plan made in that run would keep its
    workspace there; allocating it from another thread keeps it out.
    """
    out: list = []

    def alloc():
        with torch.cuda.device(device):
            out.append(torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}"))

    t = threading.Thread(target=alloc, name="sparse_inductor-cslt-workspace")
    t.start()
    t.join()
    if not out:
        raise RuntimeError(f"could not allocate a {nbytes}-byte cuSPARSELt workspace")
    if not torch.cuda.is_current_stream_capturing():  # (a sync inside a capture would end it)
        torch.cuda.synchronize(device)  # the allocation happened on that thread's stream
    return out[0]


_PLANS: dict[tuple, _Plan] = {}
_PLANS_LOCK = threading.Lock()


def _plan(key: tuple) -> Optional[_Plan]:
    """The plan for key = (device index, M, N, K, x dtype, bias pointer, alg_id, split_k, out_dtype,
    vector alpha), made on first use; None where the library cannot be loaded."""
    p = _PLANS.get(key)
    if p is None:
        lib = _lib()
        if lib is None:
            return None
        with _PLANS_LOCK:
            p = _PLANS.get(key)
            if p is None:
                device, m, n, k, dtype, bias_ptr, alg_id, split_k, out_dtype, vec = key
                p = _PLANS[key] = _Plan(lib, device or 0, m, n, k, dtype, bias_ptr, alg_id, split_k, out_dtype, vec)
    return p


def max_alg_id(wc: Tensor, x: Tensor, n: int, k: int, out_dtype: Optional[torch.dtype] = None) -> int:
    """The largest algorithm id cuSPARSELt offers for this matmul (0 where it cannot tell)."""
    m = _padded(x.shape[0], 16 if x.dtype == torch.int8 else _PAD_M)
    p = _plan((x.device.index, m, n, k, x.dtype, 0, 0, 1, out_dtype, False))
    return p.max_alg_id if p is not None else 0


def _padded(m: int, multiple: int = _PAD_M) -> int:
    return max(multiple, -(-m // multiple) * multiple)


def linear(x: Tensor, wc: Tensor, bias: Optional[Tensor], n: int, k: int, alg_id: int = 0, split_k: int = 1,
           out_dtype: Optional[torch.dtype] = None, alpha: Optional[Tensor] = None) -> Tensor:
    """y = alpha * (x @ W^T) + bias, W given as `compress(W)`; y [M, N] contiguous.

    x [M, K] fp16/bf16, or int8 with W int8 (then out_dtype fp16/bf16/int32 or int8 by default);
    alpha: None, or a float32 [N] per-row scale of W (e.g. int8 dequantization scales).
    The hot path (a plan already made): a dict lookup, the output allocation and one foreign call.
    Like the sparse tensor cores, it never multiplies the pruned zeros: a NaN/Inf in x meets only
    the kept weights (the compiled graph adds the row check, see passes/linear_rewrite._guard_rows).
    """
    if x.device.type != "cuda":
        raise RuntimeError("cuSPARSELt runs on CUDA only")
    m = x.shape[0]
    mp = _padded(m, 16 if x.dtype == torch.int8 else _PAD_M)
    if not x.is_contiguous():
        x = x.contiguous()
    if mp != m:
        x = F.pad(x, (0, 0, 0, mp - m))
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if alpha is not None:
        alpha = alpha.to(torch.float32).contiguous()
    dev = x.device
    vec = alpha is not None
    plan = _plan((dev.index, mp, n, k, x.dtype, bias.data_ptr() if bias is not None else 0, alg_id, split_k,
                  out_dtype, vec))
    if plan is None:
        y = torch._cslt_sparse_mm(wc, x.t(), bias, alpha, out_dtype, transpose_result=True, alg_id=alg_id,
                                  split_k=split_k)
    else:
        y = torch.empty((mp, n), dtype=out_dtype or x.dtype, device=dev)
        plan(wc, x, y, _raw_stream(dev.index), alpha.data_ptr() if vec else 0)
    return y[:m] if mp != m else y


def _raw_stream(index: Optional[int]) -> int:
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if index is None else index)


# ---- the dispatcher's view of this family

def _check(layer) -> Optional[str]:
    if layer.weight_dtype not in (None, layer.dtype):
        return "weight-only quantized weights run on the Triton kernels (cuSPARSELt needs x and W in one dtype)"
    return why_not_runnable(layer.n, layer.k, layer.dtype)


# Calibration from the H100 (torch 2.11, cuSPARSELt 0.8, bf16, docs/benchmarks.md): with the best
# algorithm, 1.13-1.48x of cuBLAS at M >= 4096; ~1x at M=64 and 0.5x at M=16.
def _estimate_us(layer, model) -> Optional[float]:
    from ..dispatch import dense_us

    d = dense_us(layer, model)
    if d is None:
        return None
    return d / 1.3 if layer.m >= 2048 else d / 0.6


def _compress_spec(w, layer) -> dict:
    return {"wc": compress(w)}


def _runner(t, bias, layer, params):
    """The call plus what the compiled graph adds around it, for timing: the non-finite row check
    (one reduction over x; its add rides in the epilogue kernel that follows; none for int8 x)."""
    wc, n, k = t["wc"], layer.n, layer.k
    alg, sk = params.get("alg_id", 0), params.get("split_k", 1)
    out = _out_dtype(layer)

    def run(x):
        if out is None:
            torch.sum(x, dim=-1, dtype=torch.float32)
        return linear(x, wc, bias, n, k, alg, sk, out)

    return run


def _out_dtype(layer) -> Optional[torch.dtype]:
    """int8 x int8 keeps torch._int_mm's int32 result (exact; the scales stay graph ops after it)."""
    return torch.int32 if layer.dtype == torch.int8 else None


def _variants(layer, t) -> list:
    x = torch.empty(layer.m or 8, layer.k, dtype=layer.dtype, device=t["wc"].device)
    top = max_alg_id(t["wc"], x, layer.n, layer.k, _out_dtype(layer)) if _lib() is not None else 0
    if not top:
        top = torch.backends.cusparselt.get_max_alg_id() or 20
    return [{"alg_id": a, "split_k": 1} for a in range(top + 1)]


def _node_args(x, constants, bias, n, k, params) -> tuple:
    op = torch.ops.sparse_inductor.linear_cslt.default
    args = (x, constants[0], bias, n, k, int(params.get("alg_id", 0)), int(params.get("split_k", 1)))
    if x.meta["val"].dtype == torch.int8:
        args += (torch.int32,)
    return op, args


def _register_kernel():
    from ..dispatch import KernelSpec, register_kernel

    register_kernel(KernelSpec("cusparselt", "2:4", ("cuda",), _check, _estimate_us, compress=_compress_spec,
                               fmt="cslt", runner=_runner, variants=_variants, node_args=_node_args,
                               host_heavy=True, row_guard=True))


_register_kernel()
