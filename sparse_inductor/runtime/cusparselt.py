"""2:4 linears on the GPU's sparse tensor cores through cuSPARSELt, with the plan made once.

Why not just `torch._cslt_sparse_mm`: on the H100 (torch 2.11, cuSPARSELt 0.8) every call of it
spends ~650 us of host time, whatever M (docs/performance.md), because it builds the descriptors,
the algorithm selection and the plan, and allocates a workspace, on every call. This module talks
to the same library through ctypes and keeps one plan per (weight shape, M, dtype, bias, algorithm):
a call is then one `cusparseLtMatmul` launch plus the output allocation. Where the library cannot
be loaded, `linear` falls back to `torch._cslt_sparse_mm` (correct, with its host cost).

The matmul, in cuSPARSELt's terms: D[N, M] (column-major, i.e. y[M, N] row-major)
= A[N, K] (the structured weight, row-major, compressed by `torch._cslt_compress`) @ B, where
B is x[M, K] row-major read with op TRANSPOSE; the bias (length N) is fused by the library.
The descriptors mirror the ones torch uses for `_cslt_sparse_mm(W_c, x.t(), bias,
transpose_result=True)`, so the compressed buffer `torch._cslt_compress(W)` fits them.

cuSPARSELt requires every dense dimension to be a multiple of 8 (16-bit types) or 16 (8-bit types:
int8, fp8 e4m3): an M that is not is padded (x copied into a zero-padded buffer, y sliced); N and K
must be multiples of 16 (16-bit) or 32 (8-bit: the structured operand's minimum, as torch's
SparseSemiStructuredTensorCUSPARSELT requires), checked by the dispatcher.

8-bit inputs (as torch._cslt_sparse_mm takes them): int8 x int8 with int32 compute and an int8 /
int32 / fp16 / bf16 output; fp8 e4m3 x e4m3 with fp32 compute and a bf16 / fp16 / fp32 output (the
types torch 2.11 accepts for fp8; an fp8 output would need a separate fp16 C matrix, not done here;
cuSPARSELt's E4M3 kernels need sm90 and cuSPARSELt 0.6.2+). An alpha vector (one fp32 per output
feature) scales the fp32/int32 accumulator before the bias is added and the result rounded once
(int8; cuSPARSELt 0.8 refuses it for E4M3 with status 10, "operation not supported", on the H100).
fp8 layers ask for the unscaled product, in bf16 or fp32, and the compiled graph applies
torch._scaled_mm's scales in an Inductor kernel after the call (registry.Scaled, docs/formats.md
"fp8"). The library's matrix scale modes (A_SCALE_MODE / B_SCALE_MODE) are not used: on the H100
(cuSPARSELt 0.8) a plan with them returned products the scales had not been applied to, and with
both scales fixed at 1.0 it gave wrong outputs (2 of 48x256 off by up to 2.2e3 with a bf16 output,
alg 0).
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..activations import ACTIVATIONS, every_16bit_value, same

log = logging.getLogger("sparse_inductor")

__all__ = ["available", "version", "compress", "linear", "max_alg_id", "why_not_runnable", "faulting_alg",
           "safe_alg_ids"]

# enums of cusparse.h / cusparseLt.h / library_types.h (cuSPARSELt 0.6 - 0.8)
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_SPARSITY_50 = 0
_COMPUTE_32I, _COMPUTE_32F = 0, 2
# cusparseLtMatmulDescAttribute_t, counted from ACTIVATION_RELU = 0 (cuSPARSELt 0.7 / 0.8 header)
_ALPHA_VECTOR_SCALING, _BIAS_POINTER = 5, 8
_ACTIVATION = {"relu": 0, "gelu": 3}  # ACTIVATION_RELU / ACTIVATION_GELU: an int32 1 turns one on
# how a plan scales the product: not at all, or by an alpha vector of N (passed per call)
_NO_SCALING, _ALPHA_VECTOR = "none", "alpha_vector"
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID, _SPLIT_K = 0, 1, 3  # cusparseLtMatmulAlgAttribute_t
_CUDA_TYPE = {torch.float16: 2, torch.bfloat16: 14}
_OUT_TYPE = {torch.float16: 2, torch.bfloat16: 14, torch.int32: 10, torch.int8: 3, torch.float32: 0}
_INT8, _FP8 = 3, 28  # CUDA_R_8I, CUDA_R_8F_E4M3 (library_types.h)
_EIGHT_BIT = {torch.int8: _INT8, torch.float8_e4m3fn: _FP8}
_FP8_OUT = (torch.bfloat16, torch.float16, torch.float32)  # what torch 2.11's _cslt_sparse_mm accepts for fp8
_FP8_MIN_VERSION = 602  # cuSPARSELt 0.6.2 (torch builds fp8 support from it)
_FP8_MIN_CAPABILITY = (9, 0)  # cuSPARSELt's E4M3 kernels: Hopper and newer
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
            raise RuntimeError(f"cuSPARSELt {what} failed: {self.status(status)}")

    def status(self, status: int) -> str:
        msg = self.dll.cusparseLtGetErrorString(status)
        return f"status {status} ({(msg or b'?').decode()})"

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
        elif not torch.cuda.is_available():  # (a CUDA build of torch on a machine without a GPU finds it)
            return None
        else:
            try:
                _LIB = _Lib()
            except OSError as e:
                _LIB_ERROR = f"cannot load libcusparseLt: {e}"
                log.info("sparse_inductor: %s; cuSPARSELt calls go through torch._cslt_sparse_mm", _LIB_ERROR)
    return _LIB


def _lib_on(device: torch.device) -> Optional[_Lib]:
    """The library for tensors on `device`: CUDA only (a CUDA build of torch finds libcusparseLt on a
    machine without a GPU too; tensors elsewhere take linear's reference path)."""
    return _lib() if device.type == "cuda" else None


def available() -> bool:
    """cuSPARSELt usable from this torch build on this machine (a CUDA GPU present)."""
    return bool(getattr(torch._C, "_has_cusparselt", False)) and torch.cuda.is_available()


def version() -> Optional[int]:
    try:
        return torch.backends.cusparselt.version()
    except Exception:
        return None


# Algorithm ids that fault the device: an illegal instruction, after which every CUDA call of the
# process fails. {(library version, compute capability, input dtype): the first such id; every id
# from it up faults}. Measured with each id alone in a fresh process: cuSPARSELt 0.8.0 on the H100
# (sm90), fp16 in and out, M=4096 N=1024 K=256: ids 36-51 of 0-51 fault, 0-35 run; bf16 at the same
# shapes runs every id (docs/platform-notes.md, "cuSPARSELt algorithm ids that fault"). Taken for
# every shape of that dtype: a fault cannot be caught, a lost algorithm costs at most its speed.
FAULTING_ALGS = {(800, (9, 0), torch.float16): 36}


def faulting_alg(alg_id: int, dtype: torch.dtype, device: Optional[int] = None) -> Optional[str]:
    """Why this algorithm id must not run for `dtype` on this device and library (FAULTING_ALGS), or None."""
    if not torch.cuda.is_available():
        return None
    cap = torch.cuda.get_device_capability(device)
    first = FAULTING_ALGS.get((version(), cap, dtype))
    if first is None or alg_id < first:
        return None
    return (f"cuSPARSELt {_version_str()} algorithm ids from {first} up fault sm{cap[0]}{cap[1]} with "
            f"{str(dtype).replace('torch.', '')} inputs (an illegal instruction; docs/platform-notes.md)")


def safe_alg_ids(top: int, dtype: torch.dtype, device: Optional[int] = None) -> range:
    """The algorithm ids 0..top that FAULTING_ALGS does not exclude for dtype on this device."""
    cap = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
    first = FAULTING_ALGS.get((version(), cap, dtype))
    return range(min(top + 1, first) if first is not None else top + 1)


def _version_str() -> str:
    v = version()
    return "(version unknown)" if v is None else f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def why_not_runnable(n: int, k: int, dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why cuSPARSELt cannot run y[M, N] = x[M, K] @ W[N, K]^T in `dtype` (-> out_dtype), or None."""
    if not available():
        return "cuSPARSELt is not available (no CUDA device or torch built without it)"
    if dtype not in _CUDA_TYPE and dtype not in _EIGHT_BIT:
        return f"dtype {dtype} not supported by the cuSPARSELt path (fp16/bf16, int8 x int8, or fp8 e4m3 x e4m3)"
    if dtype == torch.float8_e4m3fn:
        why = _fp8_why_not()
        if why:
            return why
        if out_dtype not in _FP8_OUT:
            return (f"fp8 x fp8 on cuSPARSELt gives bf16, fp16 or fp32 here, not {out_dtype} "
                    "(an fp8 output needs an fp16 C matrix, not supported by this path)")
    align = 32 if dtype in _EIGHT_BIT else 16
    if n % align or k % align:
        return f"N and K must be multiples of {align} for cuSPARSELt in {dtype} (got N={n}, K={k})"
    return None


def _fp8_why_not() -> Optional[str]:
    """Why this GPU / library cannot run cuSPARSELt's E4M3 kernels, or None."""
    v = version()
    if v is not None and v < _FP8_MIN_VERSION:
        return f"fp8 needs cuSPARSELt 0.6.2 or newer (this torch has {v})"
    try:
        cap = torch.cuda.get_device_capability()
    except Exception as e:  # no device to ask
        return f"cannot read the GPU's compute capability ({type(e).__name__}: {e})"
    if tuple(cap) < _FP8_MIN_CAPABILITY:
        return f"fp8 on cuSPARSELt needs compute capability 9.0 or newer (this GPU has {cap[0]}.{cap[1]})"
    return None


def compress(w: Tensor) -> Tensor:
    """The compressed weight cuSPARSELt reads (made once, at compile time), from W [N, K] on CUDA."""
    return torch._cslt_compress(w.contiguous())


class _Plan:
    """Descriptors, algorithm selection, plan and workspace of one matmul configuration."""

    def __init__(self, lib: _Lib, device: int, m: int, n: int, k: int, dtype: torch.dtype,
                 bias_ptr: int, alg_id: int, split_k: int, out_dtype: Optional[torch.dtype] = None,
                 scaling: str = _NO_SCALING, activation: Optional[str] = None):
        self.lib, dll = lib, lib.dll
        self.handle = lib.handle(device)
        h = self.handle.ptr
        # 16-bit: in = out, fp32 compute. int8 x int8 (as torch._cslt_sparse_mm): int32 compute,
        # the output int8 or out_dtype (fp16 / bf16 / int32). fp8 e4m3 x e4m3: fp32 compute, the
        # output out_dtype (bf16 / fp16 / fp32); C is D (torch's C type equals D's for these outputs)
        ty = _EIGHT_BIT.get(dtype) or _CUDA_TYPE[dtype]
        out_ty = _OUT_TYPE[out_dtype or dtype]
        compute = _COMPUTE_32I if dtype == torch.int8 else _COMPUTE_32F
        self.scaling = scaling
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
        if scaling == _ALPHA_VECTOR:  # alpha is then a device vector of N floats (a per-row scale), passed per call
            one = ctypes.c_int(1)
            lib.check(dll.cusparseLtMatmulDescSetAttribute(h, self.mm.ptr, _ALPHA_VECTOR_SCALING, ctypes.byref(one),
                                                           ctypes.c_size_t(4)), "alpha vector scaling")
        if bias_ptr:
            self._bias = ctypes.c_void_p(bias_ptr)
            lib.check(dll.cusparseLtMatmulDescSetAttribute(h, self.mm.ptr, _BIAS_POINTER, ctypes.byref(self._bias),
                                                           ctypes.c_size_t(8)), "bias pointer")
        if activation is not None:  # the library's own epilogue activation (activation_matches says where)
            on = ctypes.c_int(1)
            lib.check(dll.cusparseLtMatmulDescSetAttribute(h, self.mm.ptr, _ACTIVATION[activation], ctypes.byref(on),
                                                           ctypes.c_size_t(4)), f"activation {activation}")
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
        if self.scaling == _ALPHA_VECTOR:
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
    scaling[, activation]), made on first use; None where the library cannot be loaded."""
    p = _PLANS.get(key)
    if p is None:
        lib = _lib()
        if lib is None:
            return None
        with _PLANS_LOCK:
            p = _PLANS.get(key)
            if p is None:
                device, m, n, k, dtype, bias_ptr, alg_id, split_k, out_dtype, scaling = key[:10]
                p = _PLANS[key] = _Plan(lib, device or 0, m, n, k, dtype, bias_ptr, alg_id, split_k, out_dtype,
                                        scaling, key[10] if len(key) > 10 else None)
    return p


def max_alg_id(wc: Tensor, x: Tensor, n: int, k: int, out_dtype: Optional[torch.dtype] = None,
               scaling: str = _NO_SCALING) -> int:
    """The largest algorithm id cuSPARSELt offers for this matmul (0 where it cannot tell)."""
    m = _padded(x.shape[0], _pad_multiple(x.dtype))
    p = _plan((x.device.index, m, n, k, x.dtype, 0, 0, 1, out_dtype, scaling))
    return p.max_alg_id if p is not None else 0


def _padded(m: int, multiple: int = _PAD_M) -> int:
    return max(multiple, -(-m // multiple) * multiple)


def _pad_multiple(dtype: torch.dtype) -> int:
    """M is padded to a multiple of 8 (16-bit types) or 16 (8-bit types)."""
    return 16 if dtype in _EIGHT_BIT else _PAD_M


def linear(x: Tensor, wc: Tensor, bias: Optional[Tensor], n: int, k: int, alg_id: int = 0, split_k: int = 1,
           out_dtype: Optional[torch.dtype] = None, alpha: Optional[Tensor] = None,
           activation: Optional[str] = None) -> Tensor:
    """y = alpha * (x @ W^T) + bias; W given as `compress(W)`; y [M, N] contiguous.

    x [M, K] fp16/bf16, or int8 with W int8 (then out_dtype fp16/bf16/int32 or int8 by default), or
    fp8 e4m3 with W e4m3 (then out_dtype bf16/fp16/fp32 is required; bias in out_dtype);
    alpha: None, or a float32 [N] per-row scale of W (e.g. int8 dequantization scales): the
    fp32/int32 accumulator is multiplied by it before the bias is added, and the sum is rounded
    once to the output dtype (cuSPARSELt 0.8 refuses it for fp8);
    activation: None, or the name of the library's epilogue activation ("relu", "gelu": _ACTIVATION),
    applied after the bias to the fp32 sum before its rounding (16-bit x only; activation_matches
    says which graph activation it computes; where the library refuses it, torch's call and the
    table's function of that name, activations.ACTIVATIONS).
    The hot path (a plan already made): a dict lookup, the output allocation and one foreign call.
    Like the sparse tensor cores, it never multiplies the pruned zeros: a NaN/Inf in x meets only
    the kept weights (the compiled graph passes the op a row check, see nan_rows_).
    """
    if x.device.type != "cuda":
        raise RuntimeError("cuSPARSELt runs on CUDA only")
    why = faulting_alg(alg_id, x.dtype, x.device.index)
    if why is not None:  # refused here: launched, it would end the process's CUDA context
        raise ValueError(why)
    if x.dtype == torch.float8_e4m3fn and (out_dtype not in _FP8_OUT or (bias is not None and bias.dtype != out_dtype)):
        raise ValueError(f"fp8 x fp8 on cuSPARSELt: out_dtype must be one of {_FP8_OUT} and the bias in it "
                         f"(got out_dtype={out_dtype}, bias {None if bias is None else bias.dtype})")
    m = x.shape[0]
    mp = _padded(m, _pad_multiple(x.dtype))
    if not x.is_contiguous():
        x = x.contiguous()
    if mp != m:  # fp8 padded as bytes (0x00 is +0.0 in e4m3): no fp8 fill kernel needed
        x = (F.pad(x.view(torch.uint8), (0, 0, 0, mp - m)).view(x.dtype) if x.dtype == torch.float8_e4m3fn
             else F.pad(x, (0, 0, 0, mp - m)))
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if alpha is not None:
        alpha = alpha.to(torch.float32).contiguous()
    dev = x.device
    if activation is not None and (activation not in _ACTIVATION or x.dtype not in (torch.float16, torch.bfloat16)):
        raise ValueError(f"cuSPARSELt epilogue activation {activation!r} on {x.dtype}: one of {sorted(_ACTIVATION)}, "
                         "16-bit x only")
    scaling = _ALPHA_VECTOR if alpha is not None else _NO_SCALING
    key = (dev.index, mp, n, k, x.dtype, bias.data_ptr() if bias is not None else 0, alg_id, split_k, out_dtype,
           scaling)
    try:
        plan = _plan(key + (activation,) if activation is not None else key)
    except RuntimeError:
        if activation is None:
            raise
        # (the compile made this plan at its M: activation_runs; another M's refusal still runs, unfused)
        log.warning("cuSPARSELt refused the %s epilogue at M=%d: torch's call, then the activation", activation, m)
        plan = None
    if plan is None:
        if activation is not None:  # torch's call has no activation: after it, as the graph computed it
            y = torch._cslt_sparse_mm(wc, x.t(), bias, alpha, out_dtype, transpose_result=True, alg_id=alg_id,
                                      split_k=split_k)
            y = ACTIVATIONS[activation].fn(y.float()).to(y.dtype)
        else:
            y = torch._cslt_sparse_mm(wc, x.t(), bias, alpha, out_dtype, transpose_result=True, alg_id=alg_id,
                                      split_k=split_k)
    else:
        y = torch.empty((mp, n), dtype=out_dtype or x.dtype, device=dev)
        plan(wc, x, y, _raw_stream(dev.index), alpha.data_ptr() if alpha is not None else 0)
    return y[:m] if mp != m else y


# ---- the library's epilogue activations

_MATCHES: dict[tuple, Optional[str]] = {}


def activation_matches(library: str, graph_fn, name: str, dtype: torch.dtype, device) -> Optional[str]:
    """None if the library's epilogue activation `library` computes graph_fn (the graph's activation,
    `name`, an fp32 function) on every finite value of the 16-bit dtype to within one unit in the
    last place, and on NaN, +-Inf and +-max with the same NaN / Inf positions; else why not (words).
    Measured once per (device, dtype, library, name) through the library's plan (_apply) with the
    identity as W (a valid 2:4 weight), so y = act(x) exactly."""
    dev = torch.device(device)
    key = (dev.type, dev.index, dtype, library, name)
    if key in _MATCHES:
        return _MATCHES[key]
    why = None
    try:
        bits = every_16bit_value(dtype)
        finite = bits[bits.isfinite()]
        x = torch.cat([finite, finite.new_zeros((-finite.numel()) % (16 * 256))]).reshape(-1, 256).to(dev)
        wc = compress(torch.eye(256, device=dev, dtype=dtype))
        got = _apply(x, wc, library).reshape(-1)[:finite.numel()].cpu()
        # the specials on a diagonal: off it x is 0, so the kept zeros of W meet no Inf
        specials = torch.tensor([math.nan, math.inf, -math.inf, torch.finfo(dtype).max, -torch.finfo(dtype).max],
                                dtype=dtype)
        d = torch.zeros(16, 256, dtype=dtype)
        d[range(5), range(5)] = specials
        got_s = _apply(d.to(dev), wc, library).diagonal()[:5].cpu()
        if not same(got, graph_fn(finite.float()).to(dtype)):
            why = f"the library's {library} is not the graph's {name} on every finite {dtype}"
        elif not same(got_s, graph_fn(specials.float()).to(dtype)):
            why = f"the library's {library} differs from the graph's {name} at NaN / Inf / max: {got_s.tolist()}"
    except Exception as e:  # the library refused the attribute, or no library: not fused
        why = f"the library's {library} could not be probed ({type(e).__name__}: {str(e)[:120]})"
    _MATCHES[key] = why
    return why


def _apply(x: Tensor, wc: Tensor, activation: str) -> Tensor:
    """act(x @ W^T) for the probe's square W: through the plan itself where the library loads (linear
    would fall back to torch's call and our own function where the plan is refused, and the probe
    would then compare that function with itself), else through linear (torch's call, which the
    op then also takes; or a stand-in library in the tests)."""
    n = x.shape[1]
    if _lib_on(x.device) is None:
        return linear(x, wc, None, n, n, activation=activation)
    plan = _plan((x.device.index, x.shape[0], n, n, x.dtype, 0, 0, 1, None, _NO_SCALING, activation))
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    plan(wc, x.contiguous(), y, _raw_stream(x.device.index))
    return y


def activation_runs(wc: Tensor, bias: Optional[Tensor], n: int, k: int, m: int, dtype: torch.dtype, alg_id: int,
                    split_k: int, activation: str) -> Optional[str]:
    """None if this layer's call (its algorithm id and split-k, chosen without an activation) runs
    with the library's epilogue activation at M = m: the plan is made now (and kept for the calls);
    else why not. A configuration that refuses the activation would otherwise fail at run time."""
    try:
        if _lib_on(wc.device) is None:  # torch's call (or a stand-in library): through linear
            linear(torch.zeros(max(m, 1), k, dtype=dtype, device=wc.device), wc, bias, n, k, alg_id, split_k,
                   activation=activation)
        else:  # the plan itself: linear would fall back to torch's call where the plan is refused
            _plan((wc.device.index, _padded(max(m, 1), _pad_multiple(dtype)), n, k, dtype,
                   bias.data_ptr() if bias is not None else 0, alg_id, split_k, None, _NO_SCALING, activation))
    except Exception as e:
        return f"the library refused it with alg_id {alg_id}, split_k {split_k} ({type(e).__name__}: {str(e)[:120]})"
    return None


# ---- the non-finite row check, applied to the library's output (the compiled graph passes g)

@triton.jit
def _nan_rows_kernel(y_ptr, g_ptr, M, N, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m, :] = NaN for the rows whose g[m] is NaN; nothing is written for the other rows."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.load(g_ptr + rm, mask=rm < M, other=0.0)
    bad = g != g
    if tl.sum(bad.to(tl.int32), axis=0) > 0:  # rare; uniform over the program
        nan = tl.full((BLOCK_M, BLOCK_N), float("nan"), tl.float32).to(y_ptr.dtype.element_ty)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], nan,
                     mask=bad[:, None] & (rn[None, :] < N))


def nan_rows_(y: Tensor, g: Tensor) -> Tensor:
    """In place: every output of a row m with g[m] NaN becomes NaN (g = sum_k 0 * x[m, k], fp32:
    0 for a finite input row, NaN for one holding a NaN or Inf). Dense computes 0 * x for the pruned
    zeros that the sparse tensor cores skip, so such a row is non-finite there; this restores it.
    One tiny kernel that reads g and writes only the rows concerned."""
    g = g.reshape(-1)
    m, n = y.shape
    if m == 0 or n == 0:
        return y
    if y.device.type != "cuda":
        y[torch.isnan(g)] = float("nan")
        return y
    _nan_rows_kernel[(triton.cdiv(m, 64),)](y, g, m, n, y.stride(0), BLOCK_M=64, BLOCK_N=128, num_warps=4)
    return y


def _raw_stream(index: Optional[int]) -> int:
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if index is None else index)
