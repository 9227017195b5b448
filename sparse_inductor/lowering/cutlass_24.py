"""2:4 sparse linears on Hopper's sparse tensor cores through CUTLASS 3 (sm90a), epilogues fused.

    y[M, N] = epilogue(x[M, K] @ W[N, K]^T)

Only operand A of CUTLASS's sparse GEMM may be sparse, so the kernel computes the transpose
("swap AB"): Y^T[N, M] = W[N, K] . X^T[K, M]. In the GEMM's own names:

    GEMM M = N  (output features)  A = W, row-major [N, K], 2:4 along K, compressed (below)
    GEMM N = M  (tokens)           B = x as a K x M column-major matrix: x's own row-major memory
    GEMM K = K                     D = Y^T column-major [N, M]: y's own row-major memory [M, N]

so nothing is transposed in memory, and the small token count M is the GEMM's N tile (16-64 for
decode sizes). A per-output-feature vector (bias, a weight's per-channel scale) is a per-row
vector of Y^T (`Sm90ColBroadcast`); a per-token vector (an activation's per-token scale) a
per-column one (`Sm90RowBroadcast`); an auxiliary tensor of y's shape (a residual, the other half
of a gated product) is read as the GEMM's C operand (`Sm90SrcFetch`, loaded by TMA like D).

This module generates one C++ translation unit per `CutlassKernel` = (operand dtype,
`CutlassConfig`, `Epilogue`): a `CollectiveBuilder<Sm90, OpClassSparseTensorOp, ...>` mainloop,
an sm90 EVT epilogue tree, CUTLASS's own 2:4 compressor kernel for the same `SparseConfig`, and
plain `extern "C"` functions (no torch headers: the library loads into any torch through ctypes).
`runtime/cutlass.py` compiles, caches and loads it; here `build(kernels)` compiles several in
parallel and `library(kernel)` returns the loaded `GemmLibrary`, whose call takes torch tensors:

    lib = library(CutlassKernel("bf16", CutlassConfig((128, 16, 128), kernel_schedule="warpspecialized"),
                                Epilogue("bf16", bias="bf16")))
    values, meta = formats.cutlass_sm90.compress(W, tile_k=128)     # once, at compile time
    y = lib(x, values, meta, N, bias=b)                             # [M, N], on the current stream

`reference` / `error_bound` are the fp64 answer and the tolerance the tests hold it to;
`kernel_spec()` is the dispatcher's description; CONFIG_TABLE the candidate configs per token
bucket (chosen with bench/sweep_cutlass.py on the H100).

The exported functions (SUFFIX = the kernel's name, `CutlassKernel.name`):

    int    si_gemm_SUFFIX(const void* a_values, const void* a_meta, const void* x, void* y,
                          const void* bias, const void* aux, const void* weight_scale,
                          const void* token_scale, int M, int N, int K, int splits,
                          void* workspace, size_t workspace_bytes, cudaStream_t stream);
    int    si_can_implement_SUFFIX(int M, int N, int K, int splits);
    size_t si_workspace_SUFFIX(int M, int N, int K, int splits);
    int    si_compress_SUFFIX(const void* w, void* a_values, void* a_meta, int N, int K,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);
    size_t si_compress_workspace_SUFFIX(int N, int K);
    void   si_compressed_shape_SUFFIX(int N, int K, long long* out4);
    int    si_host_compress_SUFFIX(const void* w, void* a_values, void* a_meta, int N, int K);
    const char* si_error_string_SUFFIX(int code);

They return 0 on success, a cudaError_t (1..999) for a CUDA error, 1000 + cutlass::Status for a
CUTLASS refusal (`can_implement`, initialize), or 2000+ for an argument the function itself
refuses (`STATUS`). Nothing is launched unless every check passed: a refused call leaves the CUDA
context as it was. Pointers the epilogue does not use must be null; `bias` may be null in a kernel
with a bias (it then adds zero), so one library serves a linear with and without one.

The compressed weight (docs/formats.md, "CUTLASS sm90 2:4 layout") depends on the operand dtype
and on min(tile K, 128) only (`CutlassKernel.layout_key`): kernels with the same key share one;
the values are the same for every key, only the metadata differs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _compat, ops
from ..formats.cutlass_sm90 import compress, decompress, layout_tile_k
from ..registry import KernelSpec, register_kernel
from ..runtime import cutlass as rt
from . import row_check

__all__ = ["CutlassConfig", "Epilogue", "CutlassKernel", "DTYPES", "OUT_DTYPES", "STATUS", "generate_source",
           "CONFIG_TABLE", "M_BUCKETS", "bucket", "configs_for", "build", "library", "reference",
           "epilogue_reference", "error_bound", "config_tag", "parse_tag", "kernel_of", "layer_why_not",
           "LAYOUT_TILE_KS", "STREAMK_SPLITS", "kernel_for", "params_of", "kernel_spec"]

# operand dtype -> (CUTLASS element, accumulator, torch dtype)
DTYPES = {
    "bf16": ("cutlass::bfloat16_t", "float", torch.bfloat16),
    "fp16": ("cutlass::half_t", "float", torch.float16),
    "int8": ("int8_t", "int32_t", torch.int8),
    "e4m3": ("cutlass::float_e4m3_t", "float", torch.float8_e4m3fn),
}
# output / bias / aux dtypes (the epilogue computes in fp32)
OUT_DTYPES = {
    "bf16": ("cutlass::bfloat16_t", torch.bfloat16),
    "fp16": ("cutlass::half_t", torch.float16),
    "fp32": ("float", torch.float32),
}
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
GATES = ("silu_acc", "silu_aux")  # silu(v) * aux (this GEMM is W1 of a Llama MLP) / v * silu(aux) (W3)
KERNEL_SCHEDULES = ("warpspecialized", "pingpong", "cooperative")
EPILOGUE_SCHEDULES = ("auto", "tma", "tma_cooperative")
SCHEDULERS = ("persistent", "streamk")

# codes the generated functions return beyond CUDA's and CUTLASS's (kept in step with _PRELUDE)
STATUS = {2000: "workspace too small", 2001: "splits > 1 needs the stream-K scheduler",
          2002: "a pointer the epilogue reads is null", 2003: "a pointer the epilogue does not read is not null",
          2004: "M, N and K must be positive (or W is not 2:4: host_compress)",
          2005: "no CUDA device: cudaGetDevice or its SM count failed"}


@dataclasses.dataclass(frozen=True)
class CutlassConfig:
    """The launch configuration of the swapped GEMM (its M = output features, N = tokens).

    tile:      CTA tile (M, N, K) of the swapped GEMM: M 64 or 128 (cooperative: 128 or 256, two
               consumer warpgroups along M), N a multiple of 8 up to 256 (the token tile: 16-64 at
               decode sizes), K a multiple of 64 (16-bit) / 128 (8-bit) logical elements.
    cluster:   thread block cluster (M, N, 1); the product at most 8. A cluster of 2 along M
               multicasts the x tile, along N the weight tile.
    kernel_schedule: "warpspecialized" (one consumer warpgroup, not persistent), "pingpong" (two
               consumer warpgroups on alternate tiles, persistent) or "cooperative" (two
               warpgroups on one tile, persistent; needed for stream-K).
    epilogue_schedule: "auto" (the one the kernel schedule needs), "tma" or "tma_cooperative".
    stages:    mainloop pipeline stages; None: as many as fit beside the epilogue's shared memory.
    scheduler: "persistent" or "streamk" (cooperative only); with "streamk" a call's `splits`
               chooses split-K (splits > 1), stream-K (0) or data-parallel (1) at run time.
    fast_accum: fp8 only: accumulate in the tensor core's own precision (FP8FastAccum schedules)
               instead of promoting to fp32 every few k-blocks.
    """

    tile: tuple[int, int, int] = (128, 64, 64)
    cluster: tuple[int, int, int] = (1, 1, 1)
    kernel_schedule: str = "pingpong"
    epilogue_schedule: str = "auto"
    stages: Optional[int] = None
    scheduler: str = "persistent"
    fast_accum: bool = False

    def __post_init__(self):
        tm, tn, tk = self.tile
        if self.kernel_schedule not in KERNEL_SCHEDULES:
            raise ValueError(f"kernel_schedule {self.kernel_schedule!r}: one of {KERNEL_SCHEDULES}")
        if self.epilogue_schedule not in EPILOGUE_SCHEDULES:
            raise ValueError(f"epilogue_schedule {self.epilogue_schedule!r}: one of {EPILOGUE_SCHEDULES}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r}: one of {SCHEDULERS}")
        coop = self.kernel_schedule == "cooperative"
        if tm not in ((128, 256) if coop else (64, 128)):
            raise ValueError(f"tile M {tm}: {'128 or 256 (cooperative)' if coop else '64 or 128'}")
        if tn % 8 or not 8 <= tn <= 256:
            raise ValueError(f"tile N {tn}: a multiple of 8 in 8..256")
        if tk % 64 or not 64 <= tk <= 512:
            raise ValueError(f"tile K {tk}: a multiple of 64 in 64..512")
        cm, cn, ck = self.cluster
        if ck != 1 or cm < 1 or cn < 1 or cm * cn > 8 or (cm & (cm - 1)) or (cn & (cn - 1)):
            raise ValueError(f"cluster {self.cluster}: (powers of two M, N, 1) with M * N <= 8")
        epi = self.resolved_epilogue_schedule
        if coop != (epi == "tma_cooperative"):
            raise ValueError(f"epilogue_schedule {self.epilogue_schedule!r} does not go with {self.kernel_schedule}")
        if self.scheduler == "streamk" and not coop:
            raise ValueError("the stream-K scheduler runs with the cooperative kernel schedule only")
        if self.stages is not None and not 1 <= self.stages <= 16:
            raise ValueError(f"stages {self.stages}: 1..16 or None")

    @property
    def resolved_epilogue_schedule(self) -> str:
        if self.epilogue_schedule != "auto":
            return self.epilogue_schedule
        return "tma_cooperative" if self.kernel_schedule == "cooperative" else "tma"

    def short(self) -> str:
        """A readable tag, e.g. 128x64x64_1x1_pingpong."""
        t = "x".join(map(str, self.tile))
        c = "x".join(map(str, self.cluster[:2]))
        extra = (f"_s{self.stages}" if self.stages else "") + ("_streamk" if self.scheduler == "streamk" else "")
        extra += "_fastacc" if self.fast_accum else ""
        return f"{t}_{c}_{self.kernel_schedule}{extra}"


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What follows the matmul, in this order (each optional), computed in fp32 and rounded once:

        v = acc * token_scale[m] * weight_scale[n] + bias[n]
        v = activation(v)                       relu | gelu (erf) | gelu_tanh | silu
        v = silu(v) * aux[m, n]                 gate "silu_acc"  (h = silu(x W1^T) * (x W3^T), this is W1)
          | v * silu(aux[m, n])                 gate "silu_aux"  (the same h, this GEMM is W3)
        v = v + aux[m, n]                       residual
        y = v rounded to out_dtype

    weight_scale / token_scale: "vector" (one fp32 per output feature / token), "tensor" (one fp32
    number, read from the device), or None. aux is one tensor of y's shape and dtype `aux_dtype`
    (the GEMM's C), so a gate and a residual do not go together.
    """

    out_dtype: str = "bf16"
    bias: Optional[str] = None  # the bias dtype ("bf16", "fp16", "fp32"), or None for no bias
    activation: Optional[str] = None
    gate: Optional[str] = None
    residual: bool = False
    weight_scale: Optional[str] = None
    token_scale: Optional[str] = None
    aux_dtype: Optional[str] = None  # default: out_dtype

    def __post_init__(self):
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype {self.out_dtype!r}: one of {tuple(OUT_DTYPES)}")
        if self.bias is not None and self.bias not in OUT_DTYPES:
            raise ValueError(f"bias dtype {self.bias!r}: one of {tuple(OUT_DTYPES)} or None")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: one of {ACTIVATIONS} or None")
        if self.gate is not None and self.gate not in GATES:
            raise ValueError(f"gate {self.gate!r}: one of {GATES} or None")
        if self.gate is not None and self.residual:
            raise ValueError("a gate and a residual both read the one aux tensor: not both")
        for name in ("weight_scale", "token_scale"):
            if getattr(self, name) not in (None, "vector", "tensor"):
                raise ValueError(f"{name} {getattr(self, name)!r}: 'vector', 'tensor' or None")
        if self.aux_dtype is not None and self.aux_dtype not in OUT_DTYPES:
            raise ValueError(f"aux_dtype {self.aux_dtype!r}: one of {tuple(OUT_DTYPES)}")

    @property
    def has_aux(self) -> bool:
        return self.gate is not None or self.residual

    @property
    def resolved_aux_dtype(self) -> Optional[str]:
        return (self.aux_dtype or self.out_dtype) if self.has_aux else None

    def short(self) -> str:
        parts = [self.out_dtype]
        if self.token_scale:
            parts.append(f"ts{self.token_scale[0]}")
        if self.weight_scale:
            parts.append(f"ws{self.weight_scale[0]}")
        if self.bias:
            parts.append(f"bias{self.bias}")
        if self.activation:
            parts.append(self.activation)
        if self.gate:
            parts.append(f"gate_{self.gate}")
        if self.residual:
            parts.append("res")
        if self.has_aux and self.resolved_aux_dtype != self.out_dtype:
            parts.append(f"aux{self.resolved_aux_dtype}")
        return "_".join(parts)


@dataclasses.dataclass(frozen=True)
class CutlassKernel:
    """One generated library: the operand dtype (W and x alike), the launch config, the epilogue."""

    dtype: str = "bf16"
    config: CutlassConfig = CutlassConfig()
    epilogue: Epilogue = Epilogue()

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: one of {tuple(DTYPES)}")
        eight_bit = self.dtype in ("int8", "e4m3")
        if eight_bit and self.config.tile[2] % 128:
            raise ValueError(f"tile K {self.config.tile[2]}: a multiple of 128 for 8-bit operands")
        if self.config.fast_accum and self.dtype != "e4m3":
            raise ValueError("fast_accum is for fp8 (e4m3) operands only")

    @property
    def name(self) -> str:
        """A C identifier unique to what the source depends on: a readable prefix and a digest."""
        digest = hashlib.sha256(repr((self.dtype, self.config, self.epilogue)).encode()).hexdigest()[:12]
        return f"{self.dtype}_{digest}"

    def describe(self) -> str:
        return f"{self.dtype} {self.config.short()} {self.epilogue.short()}"

    @property
    def layout_key(self) -> tuple[str, int]:
        """Kernels with equal keys read the same compressed weight (SparseConfig's MinTileShapeK)."""
        return (self.dtype, min(self.config.tile[2], 128))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][2]

    def source(self) -> str:
        return generate_source(self)

    def signature(self):
        """What runtime/cutlass.GemmLibrary checks a call against."""
        ep = self.epilogue
        return rt.GemmSignature(
            suffix=self.name, dtype=self.torch_dtype, out_dtype=OUT_DTYPES[ep.out_dtype][1],
            bias_dtype=OUT_DTYPES[ep.bias][1] if ep.bias else None,
            aux_dtype=OUT_DTYPES[ep.resolved_aux_dtype][1] if ep.has_aux else None,
            weight_scale=ep.weight_scale, token_scale=ep.token_scale,
            streamk=self.config.scheduler == "streamk", tile_k=self.config.tile[2])


# ----------------------------------------------------------------------------------------------
# The EVT tree
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Node:
    """One EVT node: kind "acc" | "src" | "col" | "row" | "scalar" | "compute"."""

    kind: str
    fn: str = ""  # compute: the functor template; col/row/scalar: the pointer argument's name
    element: str = ""  # col/row/scalar: the element type read
    children: tuple = ()


def _evt_tree(k: CutlassKernel) -> _Node:
    ep = k.epilogue
    v = _Node("acc")

    def compute(fn, *children):
        return _Node("compute", fn, children=children)

    for name, value, vector_kind in (("token_scale", ep.token_scale, "row"), ("weight_scale", ep.weight_scale, "col")):
        if value == "vector":
            v = compute("cutlass::multiplies", v, _Node(vector_kind, name, "float"))
        elif value == "tensor":
            v = compute("cutlass::multiplies", v, _Node("scalar", name, "float"))
    if ep.bias is not None:
        v = compute("cutlass::plus", v, _Node("col", "bias", OUT_DTYPES[ep.bias][0]))
    if ep.activation is not None:
        v = compute(f"si_ep::{_ACT_FUNCTOR[ep.activation]}", v)
    if ep.gate == "silu_acc":
        v = compute("cutlass::multiplies", compute("si_ep::Silu", v), _Node("src"))
    elif ep.gate == "silu_aux":
        v = compute("cutlass::multiplies", v, compute("si_ep::Silu", _Node("src")))
    if ep.residual:
        v = compute("cutlass::plus", v, _Node("src"))
    if v.kind != "compute":  # a bare accumulator still needs a node that rounds it to ElementD
        v = compute("si_ep::Identity", v)
    return v


_ACT_FUNCTOR = {"relu": "Relu", "gelu": "GeluErf", "gelu_tanh": "GeluTanh", "silu": "Silu"}


def _emit_tree(root: _Node) -> tuple[list[str], str, str]:
    """(using-declarations, the root's type name, its Arguments initializer)."""
    lines: list[str] = []
    counter = [0]

    def emit(node: _Node, is_root: bool) -> tuple[str, str]:
        if node.kind == "acc":
            return "Sm90AccFetch", "{}"
        if node.kind == "src":
            return "Sm90SrcFetch<ElementC>", "{}"
        if node.kind == "col":
            t = f"Sm90ColBroadcast<0, TileShape, {node.element}, ElementCompute, Stride<_1, _0, int64_t>>"
            return t, f"{{static_cast<{node.element} const*>({node.fn}), {node.element}(0), {{}}}}"
        if node.kind == "row":
            t = f"Sm90RowBroadcast<0, TileShape, {node.element}, ElementCompute, Stride<_0, _1, int64_t>>"
            return t, f"{{static_cast<{node.element} const*>({node.fn}), {node.element}(0), {{}}}}"
        if node.kind == "scalar":
            t = f"Sm90ScalarBroadcast<{node.element}, Stride<_0, _0, int64_t>>"
            return t, f"{{{{{node.element}(1)}}, {{static_cast<{node.element} const*>({node.fn})}}, {{}}}}"
        kids = [emit(c, False) for c in node.children]
        out = "ElementD" if is_root else "ElementCompute"
        op = f"Sm90Compute<{node.fn}, {out}, ElementCompute, RoundStyle>"
        name = f"Evt{counter[0]}"
        counter[0] += 1
        lines.append(f"using {name} = Sm90EVT<{op},\n    " + ",\n    ".join(t for t, _ in kids) + ">;")
        args = "{" + ", ".join(a for _, a in kids) + ", {}}"
        return name, args

    root_type, root_args = emit(root, True)
    return lines, root_type, root_args


# ----------------------------------------------------------------------------------------------
# The translation unit
# ----------------------------------------------------------------------------------------------

_PRELUDE = r"""
#include <cuda_runtime.h>
#include <cstdint>
#include <cstddef>
#include <cmath>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/functional.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"

#if !defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
#error "CUTLASS's sm90 sparse GEMM needs CUDA 12.2 or newer"
#endif

// Elementwise functors of the epilogue, in fp32. Written here rather than taken from
// cutlass/epilogue/thread/activation.h: ReLU there is a max() that turns NaN into 0, and its
// sigmoid / tanh use approximate instructions; these follow torch's definitions with libm calls.
namespace si_ep {
#define SI_ELEMENTWISE(NAME, EXPR)                                                       \
  template <class T> struct NAME {                                                      \
    CUTLASS_HOST_DEVICE T operator()(T const& v) const { return EXPR; }                 \
  };                                                                                    \
  template <class T, int N> struct NAME<cutlass::Array<T, N>> {                         \
    CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& a) const { \
      cutlass::Array<T, N> r; NAME<T> f;                                                \
      _Pragma("unroll") for (int i = 0; i < N; ++i) r[i] = f(a[i]);                    \
      return r;                                                                         \
    }                                                                                   \
  };
SI_ELEMENTWISE(Identity, v)
SI_ELEMENTWISE(Relu, (v < T(0) ? T(0) : v))  // NaN stays NaN, as torch.relu
SI_ELEMENTWISE(GeluErf, (T(0.5f) * v * (T(1) + erff(v * T(0.70710678118654752f)))))
SI_ELEMENTWISE(GeluTanh, (T(0.5f) * v * (T(1) + tanhf(T(0.79788456080286536f) * (v + T(0.044715f) * v * v * v)))))
SI_ELEMENTWISE(Silu, (v / (T(1) + expf(-v))))
#undef SI_ELEMENTWISE
}  // namespace si_ep

// the library is built with -fvisibility=hidden: only these functions are exported
#define SI_EXPORT __attribute__((visibility("default")))

namespace {

constexpr int kErrWorkspace = 2000, kErrSplits = 2001, kErrNullPtr = 2002, kErrUnusedPtr = 2003,
              kErrShape = 2004, kErrNoDevice = 2005;

int status_code(cutlass::Status s) { return s == cutlass::Status::kSuccess ? 0 : 1000 + int(s); }

const char* error_string(int code) {
  if (code == 0) return "success";
  if (code < 1000) return cudaGetErrorString(static_cast<cudaError_t>(code));
  if (code < 2000) return cutlassGetStatusString(static_cast<cutlass::Status>(code - 1000));
  switch (code) {
    case kErrWorkspace: return "workspace too small";
    case kErrSplits: return "splits > 1 needs the stream-K scheduler";
    case kErrNullPtr: return "a pointer the epilogue reads is null";
    case kErrUnusedPtr: return "a pointer the epilogue does not read is not null";
    case kErrShape: return "M, N and K must be positive (or W is not 2:4: host_compress)";
    case kErrNoDevice: return "no CUDA device: cudaGetDevice or its SM count failed";
    default: return "unknown error";
  }
}

// A host port of SM90StructuredSparseCompressor (sm90_sparse_gemm_compressor.hpp): the same
// per-group rules and the same CuTe layouts (SparseConfig::fill_layoutA / fill_layoutE, recast as
// the device kernel does), one group at a time. It exists so that the layout can be checked on a
// machine without a GPU. Buffers must be zeroed by the caller. Returns 0, or kErrShape for a
// group with more than two nonzeros.
template <class SparseConfig, class ElementA>
int host_compress(const void* w, void* a_values, void* a_meta, int N, int K) {
  using namespace cute;
  using Uint = cute::uint_bit_t<cute::sizeof_bits_v<ElementA>>;
  using UintCompressed = cute::sparse_elem<typename SparseConfig::ElementASparsity{}, Uint>;
  using ElementEMma = typename SparseConfig::ElementEMma;
  auto problem = cute::make_tuple(N, 1, K, 1);
  Tensor gAC = recast<Uint>(make_tensor(make_gmem_ptr(recast_ptr<UintCompressed>(a_values)),
                                        SparseConfig::fill_layoutA(problem)));
  Tensor gE = recast<uint8_t>(make_tensor(make_gmem_ptr(recast_ptr<ElementEMma>(a_meta)),
                                          SparseConfig::fill_layoutE(problem)));
  Uint const* A = static_cast<Uint const*>(w);
  Uint sign_mask = Uint(~Uint(0));
  if constexpr (cutlass::has_negative_zero_v<ElementA>) {
    sign_mask = Uint(~(Uint(1) << (cute::sizeof_bits_v<ElementA> - 1)));
  }
  for (int n = 0; n < N; ++n) {
    for (int kb = 0; kb < K / 8 + (K % 8 ? 1 : 0); ++kb) {
      uint8_t byte = 0;
      Tensor nibbles = recast<cute::uint4_t>(make_tensor(&byte, make_layout(_1{}, _1{})));
      for (int half = 0; half < 2; ++half) {
        int c = 2 * kb + half;
        if (4 * c >= K) break;
        int cnt = 0, idx[2] = {0, 0};
        Uint kept[2] = {0, 0};
        for (int i = 0; i < 4; ++i) {
          Uint v = A[int64_t(n) * K + 4 * c + i];
          if ((v & sign_mask) != 0) {
            if (cnt == 2) return kErrShape;
            idx[cnt] = i; kept[cnt] = v; ++cnt;
          }
        }
        if (cnt == 1 && idx[0] == 3) { kept[1] = kept[0]; kept[0] = 0; idx[0] = 0; idx[1] = 3; }
        else if (cnt == 1) { kept[1] = 0; idx[1] = 3; }
        gAC(n, 2 * c, 0) = kept[0];
        gAC(n, 2 * c + 1, 0) = kept[1];
        nibbles(half) = cute::uint4_t(idx[0] | (idx[1] << 2));
      }
      gE(n, kb, 0) = byte;
    }
  }
  return 0;
}

int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return count;
}

}  // namespace
"""


def generate_source(k: CutlassKernel) -> str:
    """The C++ translation unit of one kernel (deterministic: a function of `k` only)."""
    cfg, ep = k.config, k.epilogue
    elem, acc, _ = DTYPES[k.dtype]
    out_elem = OUT_DTYPES[ep.out_dtype][0]
    aux = ep.resolved_aux_dtype
    elem_c = OUT_DTYPES[aux][0] if aux else "void"
    sched = {"warpspecialized": "KernelTmaWarpSpecialized", "pingpong": "KernelTmaWarpSpecializedPingpong",
             "cooperative": "KernelTmaWarpSpecializedCooperative"}[cfg.kernel_schedule]
    if cfg.fast_accum:
        sched += "FP8FastAccum"
    epi_sched = {"tma": "TmaWarpSpecialized", "tma_cooperative": "TmaWarpSpecializedCooperative"}[
        cfg.resolved_epilogue_schedule]
    tile_sched = {"persistent": "cutlass::gemm::PersistentScheduler",
                  "streamk": "cutlass::gemm::StreamKScheduler"}[cfg.scheduler]
    if cfg.kernel_schedule == "warpspecialized":
        tile_sched = "void"
    stages = (f"cutlass::gemm::collective::StageCount<{cfg.stages}>" if cfg.stages else
              "cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(\n"
              "        sizeof(typename CollectiveEpilogue::SharedStorage))>")
    tree_lines, root_type, root_args = _emit_tree(_evt_tree(k))
    tm, tn, tk = cfg.tile
    cm, cn, _ = cfg.cluster
    sfx = k.name
    # bias may be null where the epilogue has one (Sm90ColBroadcast then adds its default, 0)
    uses = {"bias": ep.bias is not None, "aux": ep.has_aux, "weight_scale": ep.weight_scale is not None,
            "token_scale": ep.token_scale is not None}
    ptr_checks = "\n".join(
        f"  if (!{name}) return kErrNullPtr;" if used else f"  if ({name}) return kErrUnusedPtr;"
        for name, used in uses.items() if not (used and name == "bias"))
    streamk = cfg.scheduler == "streamk"
    if streamk:
        sched_args = ("  typename GemmKernel::TileSchedulerArguments sched{};\n"
                      "  using Decomposition = typename GemmKernel::TileScheduler::DecompositionMode;\n"
                      "  if (splits == 0) { sched.decomposition_mode = Decomposition::StreamK; }\n"
                      "  else if (splits == 1) { sched.decomposition_mode = Decomposition::DataParallel; }\n"
                      "  else { sched.decomposition_mode = Decomposition::SplitK; sched.splits = splits; }\n")
        splits_check = "  if (splits < 0) return kErrSplits;\n"
    else:
        sched_args = "  typename GemmKernel::TileSchedulerArguments sched{};\n"
        splits_check = "  if (splits != 1) return kErrSplits;\n"
    header = (f"// Generated by sparse_inductor.lowering.cutlass_24: {k.describe()}\n"
              f"// Y^T[N, M] = W[N, K] (2:4, A) . x^T (B), D column-major = y[M, N] row-major.\n")
    src = header + _PRELUDE + f"""
namespace si_{sfx} {{
using namespace cute;
using namespace cutlass::epilogue::fusion;

using ElementA = {elem};          // W's kept values (A: row-major [N, K], 2:4 along K)
using ElementB = {elem};          // x (B: K x M column-major = x's row-major [M, K])
using ElementAccumulator = {acc};
using ElementCompute = float;
using ElementC = {elem_c};        // aux (residual / gate), y's layout; void: none
using ElementD = {out_elem};
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutC = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::ColumnMajor;
constexpr int AlignmentA = 128 / cutlass::sizeof_bits<ElementA>::value;
constexpr int AlignmentB = 128 / cutlass::sizeof_bits<ElementB>::value;
constexpr int AlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;
constexpr int AlignmentC = {"128 / cutlass::sizeof_bits<ElementC>::value" if aux else "AlignmentD"};
constexpr auto RoundStyle = cutlass::FloatRoundStyle::round_to_nearest;

using TileShape = Shape<_{tm}, _{tn}, _{tk}>;
using ClusterShape = Shape<_{cm}, _{cn}, _1>;
using KernelSchedule = cutlass::gemm::{sched};
using EpilogueSchedule = cutlass::epilogue::{epi_sched};

// The epilogue: {ep.short()}
{chr(10).join(tree_lines)}
using FusionCallbacks = {root_type};

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute,
    ElementC, LayoutC, AlignmentC, ElementD, LayoutD, AlignmentD,
    EpilogueSchedule, FusionCallbacks>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
    ElementA, LayoutA, AlignmentA, ElementB, LayoutB, AlignmentB, ElementAccumulator,
    TileShape, ClusterShape,
    {stages},
    KernelSchedule>::CollectiveOp;

using ProblemShape = Shape<int, int, int, int>;
using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue,
                                                        {tile_sched}>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

using SparseConfig = typename CollectiveMainloop::SparseConfig;
using ElementE = typename CollectiveMainloop::ElementE;
using StrideA = cutlass::gemm::TagToStrideA_t<LayoutA>;
using CompressorKernel = cutlass::transform::kernel::StructuredSparseCompressor<
    ProblemShape, ElementA, LayoutA, SparseConfig, cutlass::arch::Sm90>;
using Compressor = cutlass::transform::device::TransformUniversalAdapter<CompressorKernel>;
using CompressorUtility = cutlass::transform::kernel::StructuredSparseCompressorUtility<
    ProblemShape, ElementA, LayoutA, SparseConfig>;

typename Gemm::Arguments make_args(const void* a_values, const void* a_meta, const void* x, void* y,
                                   const void* bias, const void* aux, const void* weight_scale,
                                   const void* token_scale, int M, int N, int K, int splits) {{
  // the swapped problem: GEMM M = N (features), GEMM N = M (tokens)
  ProblemShape problem{{N, M, K, 1}};
  auto layout_a = SparseConfig::fill_layoutA(problem);
  auto layout_e = SparseConfig::fill_layoutE(problem);
  auto stride_b = cutlass::make_cute_packed_stride(typename GemmKernel::StrideB{{}}, cute::make_shape(M, K, 1));
  auto stride_c = cutlass::make_cute_packed_stride(typename GemmKernel::StrideC{{}}, cute::make_shape(N, M, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename GemmKernel::StrideD{{}}, cute::make_shape(N, M, 1));
  cutlass::KernelHardwareInfo hw_info;
  cudaGetDevice(&hw_info.device_id);
  hw_info.sm_count = sm_count();
{sched_args}  typename Gemm::Arguments args{{
      cutlass::gemm::GemmUniversalMode::kGemm,
      problem,
      {{static_cast<ElementA const*>(a_values), layout_a, static_cast<ElementB const*>(x), stride_b,
       static_cast<ElementE const*>(a_meta), layout_e}},
      {{{{}}, {"static_cast<ElementC const*>(aux)" if aux else "nullptr"}, stride_c, static_cast<ElementD*>(y), stride_d}},
      hw_info,
      sched}};
  args.epilogue.thread = {root_args};
  return args;
}}

int check(const void* bias, const void* aux, const void* weight_scale, const void* token_scale,
          int M, int N, int K, int splits) {{
  if (M <= 0 || N <= 0 || K <= 0) return kErrShape;
{splits_check}{ptr_checks}
  return 0;
}}
}}  // namespace si_{sfx}

extern "C" {{

SI_EXPORT int si_gemm_{sfx}(const void* a_values, const void* a_meta, const void* x, void* y, const void* bias,
                  const void* aux, const void* weight_scale, const void* token_scale, int M, int N, int K,
                  int splits, void* workspace, size_t workspace_bytes, cudaStream_t stream) {{
  using namespace si_{sfx};
  if (int e = check(bias, aux, weight_scale, token_scale, M, N, K, splits)) return e;
  auto args = make_args(a_values, a_meta, x, y, bias, aux, weight_scale, token_scale, M, N, K, splits);
  Gemm gemm;
  if (int e = status_code(gemm.can_implement(args))) return e;
  if (args.hw_info.sm_count <= 0) return kErrNoDevice;  // (the stream-K scheduler divides by it)
  if (Gemm::get_workspace_size(args) > workspace_bytes) return kErrWorkspace;
  if (int e = status_code(gemm.initialize(args, workspace, stream))) return e;
  if (int e = status_code(gemm.run(stream))) return e;
  return static_cast<int>(cudaGetLastError());
}}

SI_EXPORT int si_can_implement_{sfx}(int M, int N, int K, int splits) {{
  using namespace si_{sfx};
  if (M <= 0 || N <= 0 || K <= 0) return kErrShape;
{splits_check}  // dummy non-null pointers: can_implement looks at shapes, strides and layouts only
  static char dummy[16];
  auto args = make_args(dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy, M, N, K, splits);
  return status_code(Gemm::can_implement(args));
}}

SI_EXPORT size_t si_workspace_{sfx}(int M, int N, int K, int splits) {{
  using namespace si_{sfx};
  if (M <= 0 || N <= 0 || K <= 0 || sm_count() <= 0) return 0;  // si_gemm refuses these
  static char dummy[16];
  auto args = make_args(dummy, dummy, dummy, dummy, dummy, dummy, dummy, dummy, M, N, K, splits);
  return Gemm::get_workspace_size(args);
}}

// the compressed shapes for W [N, K]: values rows, values cols (elements), meta rows, meta cols (bytes)
SI_EXPORT void si_compressed_shape_{sfx}(int N, int K, long long* out4) {{
  using namespace si_{sfx};
  ProblemShape problem{{N, 1, K, 1}};
  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{{}}, cute::make_shape(N, K, 1));
  CompressorUtility util(problem, stride_a);
  out4[0] = util.get_tensorA_m_physical();
  out4[1] = util.get_tensorA_k_physical();
  out4[2] = util.get_metadata_m_physical();
  out4[3] = util.get_metadata_k_physical();
}}

SI_EXPORT size_t si_compress_workspace_{sfx}(int N, int K) {{
  using namespace si_{sfx};
  ProblemShape problem{{N, 1, K, 1}};
  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{{}}, cute::make_shape(N, K, 1));
  cutlass::KernelHardwareInfo hw_info;
  typename Compressor::Arguments args{{problem, {{nullptr, stride_a, nullptr, nullptr}}, hw_info}};
  return Compressor::get_workspace_size(args);
}}

// CUTLASS's own compressor (a device kernel) on W [N, K] row-major, into buffers of
// si_compressed_shape (zeroed by the caller: the kernel leaves padding unwritten)
SI_EXPORT int si_compress_{sfx}(const void* w, void* a_values, void* a_meta, int N, int K, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) {{
  using namespace si_{sfx};
  if (N <= 0 || K <= 0) return kErrShape;
  if (sm_count() <= 0) return kErrNoDevice;
  ProblemShape problem{{N, 1, K, 1}};
  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{{}}, cute::make_shape(N, K, 1));
  cutlass::KernelHardwareInfo hw_info;
  cudaGetDevice(&hw_info.device_id);
  hw_info.sm_count = sm_count();
  typename Compressor::Arguments args{{problem, {{w, stride_a, a_values, a_meta}}, hw_info}};
  Compressor op;
  if (Compressor::get_workspace_size(args) > workspace_bytes) return kErrWorkspace;
  if (int e = status_code(op.can_implement(args))) return e;
  if (int e = status_code(op.initialize(args, workspace, stream))) return e;
  if (int e = status_code(op.run(stream))) return e;
  return static_cast<int>(cudaGetLastError());
}}

// the host port above (no GPU needed), into zeroed buffers of si_compressed_shape
SI_EXPORT int si_host_compress_{sfx}(const void* w, void* a_values, void* a_meta, int N, int K) {{
  using namespace si_{sfx};
  if (N <= 0 || K <= 0 || K % 4) return kErrShape;
  return host_compress<SparseConfig, ElementA>(w, a_values, a_meta, N, K);
}}

SI_EXPORT const char* si_error_string_{sfx}(int code) {{ return error_string(code); }}

}}  // extern "C"
"""
    return src


# ----------------------------------------------------------------------------------------------
# Configurations per token bucket (tuned on the GPU with bench/sweep_cutlass.py)
# ----------------------------------------------------------------------------------------------

M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)  # a layer's M goes to the first bucket >= M; 1024: 1024 and up

# Chosen from bench/sweep_cutlass.py on the H100 (graph replays of y = x @ W^T + b against dense
# F.linear; docs/benchmarks.md#cutlass-sweep): per bucket the configs that were best or within a
# few percent of it on 14336x4096, 4096x14336 and 4096x4096 (M = 16, 64, 256, 2048, 8192), on
# 11008x4096, 5632x2048, 2048x5632, 2048x2048 and 4096x4096 (M = 32), and on the ViT-B/16 and
# ViT-H/14 linears (M = 12608 and 8224). Buckets 128 and 512 were not swept: their entries are
# starting points. The dispatcher times each entry per layer at compile time and keeps the best.
# - M <= 64: a tile K of 256 and 64-row tiles (twice the CTAs of the 128-row ones) won on the long
#   K loops: 128x16x256 35.9 us against 36.2 for 128x16x128 at 14336x4096 M = 16 (dense 53.7),
#   64x16x256 30.2 against 31.1 for 128x32x128 at 11008x4096 M = 32 (dense 46.2).
# - Stream-K lost at M <= 32 and 1024+ (128x256x64 stream-K: 1443.8 against 1069.5 us for the
#   2x1 data-parallel tile at 14336x4096 M = 8192) and won once, at 4096x14336 M = 256 (split-K
#   in 2: 48.8 against 49.5 us for the best data-parallel config).
CONFIG_TABLE: dict[int, tuple[CutlassConfig, ...]] = {
    16: (CutlassConfig((128, 16, 256), (1, 1, 1), "warpspecialized"),
         CutlassConfig((64, 16, 256), (1, 1, 1), "pingpong"),
         CutlassConfig((128, 16, 128), (1, 1, 1), "warpspecialized")),
    32: (CutlassConfig((64, 16, 256), (1, 1, 1), "pingpong"),
         CutlassConfig((128, 32, 128), (1, 1, 1), "warpspecialized"),
         CutlassConfig((64, 32, 128), (1, 1, 1), "pingpong")),
    64: (CutlassConfig((64, 64, 128), (1, 1, 1), "pingpong"),
         CutlassConfig((64, 64, 256), (1, 1, 1), "pingpong"),
         CutlassConfig((128, 32, 128), (1, 1, 1), "pingpong")),
    128: (CutlassConfig((128, 128, 64), (1, 1, 1), "pingpong"),
          CutlassConfig((128, 64, 128), (2, 1, 1), "pingpong"),
          CutlassConfig((128, 128, 128), (1, 1, 1), "cooperative")),
    256: (CutlassConfig((128, 256, 64), (1, 1, 1), "cooperative"),
          CutlassConfig((128, 128, 128), (1, 1, 1), "cooperative"),
          CutlassConfig((128, 64, 128), (1, 1, 1), "pingpong"),
          CutlassConfig((128, 128, 128), (1, 1, 1), "cooperative", scheduler="streamk")),
    512: (CutlassConfig((128, 256, 64), (1, 1, 1), "cooperative"),
          CutlassConfig((128, 128, 128), (2, 1, 1), "cooperative"),
          CutlassConfig((256, 128, 64), (1, 1, 1), "cooperative")),
    1024: (CutlassConfig((128, 256, 64), (2, 1, 1), "cooperative"),
           CutlassConfig((256, 128, 64), (1, 2, 1), "cooperative"),
           CutlassConfig((256, 128, 64), (2, 1, 1), "cooperative"),
           CutlassConfig((128, 128, 128), (1, 1, 1), "cooperative")),
}


def bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def configs_for(m: int, dtype: str = "bf16", fast_accum: bool = False) -> tuple[CutlassConfig, ...]:
    """The table's candidates for a layer with M tokens (8-bit operands: tile K of at least 128).
    e4m3: fast_accum (a torch._scaled_mm with use_fast_accum=True) takes each config in its
    FP8FastAccum schedule only, not also in the promoting one, which is slower and, timed beside
    them, would heat the GPU under its power cap for the configs timed after it. Without it, the
    promoting schedule with the token tile shrunk where its accumulators would spill
    (_promoting_fp8): with the table's 128x256 tiles it ran 1633.2 against 650.8 us (fast) at
    M = 8192, N = 14336, K = 4096 on the H100."""
    cands = CONFIG_TABLE[bucket(m)]
    if dtype in ("int8", "e4m3"):
        cands = tuple(dataclasses.replace(c, tile=(c.tile[0], c.tile[1], max(128, c.tile[2]))) for c in cands)
    if fast_accum and dtype == "e4m3":
        cands = tuple(dataclasses.replace(c, fast_accum=True) for c in cands)
    elif dtype == "e4m3":
        cands = tuple(dict.fromkeys(_promoting_fp8(c) for c in cands))
    return cands


# The promoting fp8 mainloop (GmmaFP8Accumulation) holds each consumer warpgroup's accumulators
# twice, the running fp32 sums and the MMAs' own. At 64 x 256 fp32 per warpgroup (128x256
# cooperative) that is 256 registers a thread: ptxas caps the cooperative kernel at 168 and
# spills (a 256-264 byte stack frame, where the FP8FastAccum build of the same tile has none).
_FP8_PROMOTING_ACC = 64 * 128  # accumulator elements per consumer warpgroup, at most


def _promoting_fp8(c: CutlassConfig) -> CutlassConfig:
    """c with its token tile halved until each consumer warpgroup's accumulator fits the promoting
    fp8 mainloop without spilling (_FP8_PROMOTING_ACC)."""
    tm, tn, tk = c.tile
    per_wg = 2 if c.kernel_schedule == "cooperative" else 1
    while tm * tn // per_wg > _FP8_PROMOTING_ACC and tn > 8:
        tn //= 2
    return dataclasses.replace(c, tile=(tm, tn, tk))


# ----------------------------------------------------------------------------------------------
# Building, loading, and the fp64 reference
# ----------------------------------------------------------------------------------------------

_libraries: dict = {}


def build(kernels, jobs: Optional[int] = None) -> dict:
    """Compile (or find in the disk cache) the libraries of `kernels` in parallel: {kernel: path or
    the exception that stopped its build}."""
    kernels = list(dict.fromkeys(kernels))
    paths = rt.build_many([(k.name, k.source(), k.describe()) for k in kernels], jobs=jobs)
    return dict(zip(kernels, paths))


def library(k: CutlassKernel):
    """The loaded library of `k` (runtime/cutlass.GemmLibrary), built first if it is not cached."""
    lib = _libraries.get(k)
    if lib is None:
        lib = _libraries[k] = rt.GemmLibrary(rt.build(k.name, k.source(), describe=k.describe()), k.signature())
    return lib


def reference(k: CutlassKernel, x: torch.Tensor, w: torch.Tensor, *, bias=None, aux=None, weight_scale=None,
              token_scale=None) -> torch.Tensor:
    """What the kernel computes, in fp64 (before the output's rounding): x [M, K], W [N, K] dense."""
    v = x.to(torch.float64) @ w.to(torch.float64).t()
    return epilogue_reference(k.epilogue, v, bias=bias, aux=aux, weight_scale=weight_scale, token_scale=token_scale)


def epilogue_reference(ep: Epilogue, v: torch.Tensor, *, bias=None, aux=None, weight_scale=None,
                       token_scale=None) -> torch.Tensor:
    """The epilogue `ep` on the product v [M, N] in fp64 (the scales, the bias, the activation, the
    gate, the residual: Epilogue's order), before the output's rounding."""
    v = v.to(torch.float64)
    if token_scale is not None:
        v = v * token_scale.to(torch.float64).reshape(-1, 1)
    if weight_scale is not None:
        v = v * weight_scale.to(torch.float64).reshape(1, -1)
    if bias is not None:
        v = v + bias.to(torch.float64)
    if ep.activation == "relu":
        v = torch.relu(v)
    elif ep.activation == "gelu":
        v = F.gelu(v)
    elif ep.activation == "gelu_tanh":
        v = F.gelu(v, approximate="tanh")
    elif ep.activation == "silu":
        v = F.silu(v)
    if ep.gate == "silu_acc":
        v = F.silu(v) * aux.to(torch.float64)
    elif ep.gate == "silu_aux":
        v = v * F.silu(aux.to(torch.float64))
    if ep.residual:
        v = v + aux.to(torch.float64)
    return v


# Tolerances against `reference`: |y - ref| <= u_out |ref| + (acc + 16 * 2^-24) mag, where mag is
# the epilogue's chain on |x| @ |W|^T (a bound of every partial sum and intermediate) and
#   u_out: the output's unit roundoff (bf16 2^-8, fp16 2^-11, fp32 2^-24);
#   acc:   the accumulation's error relative to mag: K * 2^-24 for fp32 sums of exact products
#          (first order; int8's int32 sum is exact, its conversion to fp32 rounds once). fp8 tensor
#          cores keep about 14 bits of the running sum inside the MMA chain (DeepSeek-V3 technical
#          report, section 3.3.2): each sparse e4m3 wgmma (k = 64) adds with an error of at most
#          2^-13 of the sum so far, so a chain of c MMAs is off by c * 2^-13 of its magnitude, to
#          first order. The chain is the MMAs between two fp32 promotions: CUTLASS's fp8 mainloop
#          promotes every mma_promotion_interval = 4 MMAs (its default), FP8FastAccum never, so c
#          is min(4, K / 64) or K / 64; the promotions themselves add (K / 64 / c) * 2^-24;
#   16 * 2^-24: the epilogue's own fp32 steps and libm calls (erff, tanhf, expf: a few ulp each).
_FP8_MMA_K = 64  # K of one sparse e4m3 wgmma (cute's GMMA_64xNx64_F32E4M3E4M3)
_FP8_PROMOTION_INTERVAL = 4  # MMAs between fp32 promotions (CUTLASS's mma_promotion_interval)
_ACT_SLOPE = 1.13  # max |d/dv| of gelu (1.13), gelu_tanh, silu (1.1), relu (1)


def error_bound(k: CutlassKernel, x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, *, bias=None, aux=None,
                weight_scale=None, token_scale=None) -> torch.Tensor:
    """The largest |y - ref| the kernel may show at each output (fp64; see the comment above)."""
    ep = k.epilogue
    mag = x.to(torch.float64).abs() @ w.to(torch.float64).abs().t()
    if token_scale is not None:
        mag = mag * token_scale.to(torch.float64).reshape(-1, 1)
    if weight_scale is not None:
        mag = mag * weight_scale.to(torch.float64).reshape(1, -1)
    if bias is not None:
        mag = mag + bias.abs().to(torch.float64)
    if ep.activation:
        mag = mag * _ACT_SLOPE
    if ep.gate:
        mag = mag * _ACT_SLOPE * (aux.abs().to(torch.float64) + 1)
    if ep.residual:
        mag = mag + aux.abs().to(torch.float64)
    u_out = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "fp32": 2.0 ** -24}[ep.out_dtype]
    kdim = x.shape[1]
    if k.dtype == "e4m3":
        mmas = -(-kdim // _FP8_MMA_K)
        chain = mmas if k.config.fast_accum else min(_FP8_PROMOTION_INTERVAL, mmas)
        acc = chain * 2.0 ** -13 + (mmas / chain) * 2.0 ** -24
    else:
        acc = kdim * 2.0 ** -24
    return u_out * ref.abs() + (acc + 16 * 2.0 ** -24) * mag


# ----------------------------------------------------------------------------------------------
# The op's configuration tag, and the library an op call runs
# ----------------------------------------------------------------------------------------------

def config_tag(cfg: CutlassConfig, splits: int = 1) -> str:
    """The op's `config` argument (sparse_inductor::linear_cutlass): CutlassConfig.short() and, for a
    stream-K config, the call's splits, e.g. "128x16x128_1x1_warpspecialized",
    "128x16x128_1x1_cooperative_streamk_split2". Its first field is the CTA tile, whose K gives
    the metadata layout (formats/cutlass_sm90.layout_tile_k; ops.py reads only that)."""
    if cfg.epilogue_schedule != "auto":
        raise ValueError(f"config tags name configs with epilogue_schedule 'auto', got {cfg.epilogue_schedule!r}")
    if cfg.scheduler != "streamk" and splits != 1:
        raise ValueError(f"splits={splits}: only a stream-K config takes splits other than 1")
    return cfg.short() + (f"_split{splits}" if cfg.scheduler == "streamk" else "")


def parse_tag(tag: str) -> tuple[CutlassConfig, int]:
    """(config, splits) of a config tag (config_tag's inverse); ValueError naming the tag."""
    try:
        parts = tag.split("_")
        tile = tuple(int(v) for v in parts[0].split("x"))
        cm, cn = (int(v) for v in parts[1].split("x"))
        kw: dict = {"tile": tile, "cluster": (cm, cn, 1), "kernel_schedule": parts[2]}
        splits = 1
        for part in parts[3:]:
            if part == "streamk":
                kw["scheduler"] = "streamk"
            elif part == "fastacc":
                kw["fast_accum"] = True
            elif part.startswith("split"):
                splits = int(part[5:])
            elif part.startswith("s"):
                kw["stages"] = int(part[1:])
            else:
                raise ValueError(part)
        if len(tile) != 3:
            raise ValueError(parts[0])
        cfg = CutlassConfig(**kw)
        if config_tag(cfg, splits) != tag:
            raise ValueError("not in its canonical form")
    except (ValueError, IndexError, TypeError) as e:
        raise ValueError(f"CUTLASS config tag {tag!r} is not one config_tag writes ({e})") from None
    return cfg, splits


_OP = torch.ops.sparse_inductor.linear_cutlass.default  # (ops.py defines it)
_OPERAND_NAMES = {v[2]: k for k, v in DTYPES.items()}
_OUT_NAMES = {v[1]: k for k, v in OUT_DTYPES.items()}


def kernel_of(dtype: torch.dtype, config: str, *, out_dtype: Optional[torch.dtype] = None,
              bias: Optional[torch.dtype] = None, activation: Optional[str] = None, gate: Optional[str] = None,
              residual: bool = False, aux: Optional[torch.dtype] = None, weight_scale: Optional[str] = None,
              token_scale: Optional[str] = None) -> tuple[CutlassKernel, int]:
    """(the library, splits) an op call runs: x's dtype, its config tag, the output dtype (None: x's),
    the dtypes of the bias and aux it reads (None: none), the kinds of its scales ("vector",
    "tensor", None; a row check makes the token scale a vector: the row fixup rides in it).

    The one place where op arguments become a CutlassKernel: the op's CUDA implementation, the pass
    that builds the graph's kernels and the dispatcher's runner all call it, so that what is timed
    and built is what runs. A kernel without a bias reads a null one (adds zero), so one library
    serves a linear with and without: its bias dtype is then the output's."""
    if dtype not in _OPERAND_NAMES:
        raise ValueError(f"CUTLASS 2:4: x of dtype {dtype} (bf16, fp16, int8, float8_e4m3fn)")
    name = _OPERAND_NAMES[dtype]
    out = out_dtype or dtype
    if out not in _OUT_NAMES:
        raise ValueError(f"CUTLASS 2:4: output dtype {out} (bfloat16, float16, float32; 8-bit x needs out_dtype)")
    out_name = _OUT_NAMES[out]
    for what, dt in (("bias", bias), ("aux", aux)):
        if dt is not None and dt not in _OUT_NAMES:
            raise ValueError(f"CUTLASS 2:4: {what} of dtype {dt} (bfloat16, float16, float32)")
    cfg, splits = parse_tag(config)
    aux_name = _OUT_NAMES[aux] if aux is not None else None
    ep = Epilogue(out_name, bias=_OUT_NAMES[bias] if bias is not None else out_name, activation=activation, gate=gate,
                  residual=residual, weight_scale=weight_scale, token_scale=token_scale,
                  aux_dtype=aux_name if aux_name != out_name else None)
    return CutlassKernel(name, cfg, ep), splits


def scale_kind(t: Optional[torch.Tensor]) -> Optional[str]:
    """An op's scale argument as the epilogue reads it: a 0-dim tensor is one number ("tensor"),
    any other a vector ("vector"); None: none."""
    return None if t is None else ("tensor" if t.dim() == 0 else "vector")


def _ready(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t contiguous and 16-byte aligned (TMA), copied where it is not (a slice of a bias, a view)."""
    if t is None:
        return None
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() and t.data_ptr() % 16:
        t = t.clone()
    return t


_warned: set = set()


def _cuda_linear_cutlass(x, values, meta, bias, n, k, config, out_dtype=None, activation=None, gate=None,
                         residual=False, aux=None, weight_scale=None, token_scale=None, row_check=None):
    """sparse_inductor::linear_cutlass on CUDA: the generated library, on the current stream (so it
    runs inside CUDA graphs). The row check g (0 or NaN per row) rides in the token scale, (1 + g)
    times it: a finite row is multiplied by one (exact), a flagged one becomes NaN before the
    epilogue, whose every step keeps a NaN. The compiled graph passes that product already
    (lowering/inductor.py computes it in an Inductor kernel); an eager call computes it here.
    Where the library cannot be loaded (its build failed) or refuses the call (nothing launched),
    the op's reference implementation runs instead, with a warning once per kernel."""
    if row_check is not None:
        factor = row_check.reshape(-1).to(torch.float32) + 1
        token_scale = factor if token_scale is None else factor * token_scale.reshape(-1).to(torch.float32)
    kern, splits = kernel_of(x.dtype, config, out_dtype=out_dtype, bias=None if bias is None else bias.dtype,
                             activation=activation, gate=gate, residual=residual,
                             aux=None if aux is None else aux.dtype, weight_scale=scale_kind(weight_scale),
                             token_scale=scale_kind(token_scale))
    try:
        lib = library(kern)
        return lib(_ready(x), values, meta, n, bias=_ready(bias), aux=_ready(aux), weight_scale=_ready(weight_scale),
                   token_scale=_ready(token_scale), splits=splits)
    except (rt.CutlassBuildError, rt.CutlassCallError, OSError) as e:
        if kern.name not in _warned:
            _warned.add(kern.name)
            logging.getLogger("sparse_inductor").warning(
                "sparse_inductor: CUTLASS kernel %s (%s) cannot run (%s); the reference implementation runs instead",
                kern.name, kern.describe(), str(e).splitlines()[0][:300])
        return ops.cutlass_reference(x, values, meta, bias, n, k, config, out_dtype, activation, gate, residual, aux,
                                     weight_scale, token_scale, None)


ops.linear_cutlass.register_kernel("cuda")(_cuda_linear_cutlass)


# ----------------------------------------------------------------------------------------------
# The dispatcher's description (registry.KernelSpec), registered below: `kernel_spec()`
# ----------------------------------------------------------------------------------------------

# The table's configs read the metadata layout of T = 64 or 128 (tile K 64: the large-M tiles, where
# a K of 128 leaves too few pipeline stages); the values are the same for both, the metadata (1/16
# of a 16-bit weight's bytes) is made for each.
LAYOUT_TILE_KS = (64, 128)
STREAMK_SPLITS = (0, 2, 4)  # a stream-K config's variants: stream-K (0), split-K in 2 and 4
_SPEC_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8", torch.float8_e4m3fn: "e4m3"}


def kernel_for(dtype: torch.dtype, params: dict) -> CutlassKernel:
    """The kernel a variant's params name, for a bf16 / fp16 linear with an optional bias and
    nothing else in its epilogue (no row check: options nonfinite="fast")."""
    name = _SPEC_DTYPES[dtype]
    cfg = CutlassConfig(tile=tuple(params["tile"]), cluster=tuple(params["cluster"]),
                        kernel_schedule=params["kernel_schedule"], stages=params.get("stages"),
                        scheduler=params.get("scheduler", "persistent"))
    return CutlassKernel(name, cfg, Epilogue(out_dtype=name, bias=name))


def params_of(cfg: CutlassConfig, splits: int = 1) -> dict:
    """A config as JSON-able variant params (measure.py caches them with the time)."""
    out = {"tile": list(cfg.tile), "cluster": list(cfg.cluster), "kernel_schedule": cfg.kernel_schedule,
           "stages": cfg.stages, "scheduler": cfg.scheduler, "splits": splits}
    if cfg.fast_accum:
        out["fast_accum"] = True
    return out


def _tag_of(params: dict) -> str:
    cfg = CutlassConfig(tile=tuple(params["tile"]), cluster=tuple(params["cluster"]),
                        kernel_schedule=params["kernel_schedule"], stages=params.get("stages"),
                        scheduler=params.get("scheduler", "persistent"), fast_accum=bool(params.get("fast_accum")))
    return config_tag(cfg, int(params.get("splits", 1)))


def _row_fixup(layer) -> bool:
    """Whether the layer's op carries a row fixup (its token scale a vector then): a 16-bit layer's
    non-finite row check (options nonfinite="exact"), or fp8's row guard (e4m3 holds NaN; the
    rewrite of torch._scaled_mm always adds it)."""
    if layer.dtype == torch.float8_e4m3fn:
        return True
    return layer.dtype in (torch.bfloat16, torch.float16) and layer.row_check != "none"


def _out_of(layer, fusion) -> torch.dtype:
    """What the op writes: the fused cast's dtype; else fp8's out_dtype, int8's product dtype
    (options int8_product), a 16-bit layer's own dtype."""
    if fusion is not None and fusion.out_dtype is not None:
        return fusion.out_dtype
    if layer.scaled is not None:
        return layer.scaled.out_dtype
    if layer.dtype == torch.int8:
        return layer.product or torch.bfloat16
    return layer.dtype


def _scales_of(layer, fusion) -> tuple[Optional[str], Optional[str]]:
    """(weight scale kind, token scale kind) of the op's kernel: the fused dequantization's, fp8's
    from torch._scaled_mm's scales; with a row fixup the token scale is a vector."""
    ws = ts = None
    if layer.scaled is not None:
        ws = "vector" if layer.scaled.scale_b_vector else "tensor"
        ts = "vector" if layer.scaled.scale_a_vector else "tensor"
    if fusion is not None:
        ws, ts = fusion.weight_scale or ws, fusion.token_scale or ts
    if _row_fixup(layer):
        ts = "vector"
    return ws, ts


def _pieces(layer) -> tuple:
    """((start, end, Fusion or None), ...) of the layer's output: one piece unless the graph splits it."""
    if not layer.epilogue:
        return ((0, layer.n, None),)
    out, a = [], 0
    for size, fusion in layer.epilogue:
        out.append((a, a + size, fusion))
        a += size
    return tuple(out)


def _piece_kernel(layer, params: dict, fusion) -> tuple[CutlassKernel, int]:
    """The library one output piece of the layer runs with variant `params` (kernel_of). The bias:
    the dequantization's where it brings one; else the layer's own, which is in the output's dtype
    (the kernel of a 16-bit linear with and without a bias is one library)."""
    ws, ts = _scales_of(layer, fusion)
    f = fusion
    return kernel_of(layer.dtype, _tag_of(params), out_dtype=_out_of(layer, f), bias=f.bias if f else None,
                     activation=f.activation if f else None, gate=f.gate if f else None,
                     residual=bool(f and f.residual), aux=f.aux_dtype if f and (f.gate or f.residual) else None,
                     weight_scale=ws, token_scale=ts)


def layer_why_not(layer) -> Optional[str]:
    """Why the family's kernels cannot compute this layer, whatever the device (shapes and dtypes;
    the CPU tests' stand-in check), or None."""
    if layer.dtype not in _SPEC_DTYPES or layer.weight_dtype not in (None, layer.dtype):
        return ("the CUTLASS family takes bf16 / fp16 linears with weights of the same dtype, int8 x int8 "
                "(torch._int_mm) and fp8 x fp8 (torch._scaled_mm)")
    if layer.dtype == torch.float8_e4m3fn and layer.scaled is None:
        return "an fp8 linear is read from torch._scaled_mm only (its scales and output dtype)"
    if layer.dtype == torch.int8 and layer.product != torch.bfloat16:
        return ("the CUTLASS kernels write floating outputs, not torch._int_mm's int32: every use of the product "
                "must convert it to float, with options int8_product='bf16' (the default)")
    if layer.n % 8:
        return f"N={layer.n}: the CUTLASS kernel's output rows need N % 8 == 0"
    if any((b - a) % 8 for a, b, _ in _pieces(layer)):
        return "the pieces of the concatenated output need widths that are multiples of 8"
    k_mult = 32 // layer.dtype.itemsize
    if layer.k % k_mult:
        return f"K={layer.k}: the CUTLASS kernel's compressed rows need K % {k_mult} == 0"
    if getattr(layer, "x_index", False) or getattr(layer, "out_index", False):
        return "a weight behind a permutation: the CUTLASS kernels have no gather of x or of the output"
    return None


def _spec_check(layer) -> Optional[str]:
    if layer.device != "cuda":
        return "CUTLASS's sm90 kernels run on CUDA only"
    return layer_why_not(layer) or rt.available(torch.device("cuda"))


def _spec_estimate_us(layer, model) -> Optional[float]:
    """Not calibrated: a roofline with the compressed weight's bytes (0.5625x) and half the flops."""
    if model is None or layer.m is None:
        return None
    es = layer.dtype.itemsize
    byts = es * (0.5625 * layer.n * layer.k + layer.m * layer.k + layer.m * layer.n)
    flops = layer.m * layer.n * layer.k
    return max(byts / model.bytes_per_us, flops / model.flops_per_us) + model.launch_us


def _spec_compress(w: torch.Tensor, layer) -> dict:
    """{"values": ..., "meta_64": ..., "meta_128": ...}: the weight in both metadata layouts (the
    graph keeps the one its config reads: passes/cutlass_epilogue.py drops the other)."""
    out = {}
    for t in LAYOUT_TILE_KS:
        out["values"], out[f"meta_{t}"] = compress(w, t)
    return out


def _all_params(layer) -> list:
    fast = layer.scaled is not None and layer.scaled.fast_accum
    return [params_of(c, s) for c in configs_for(layer.m or 1, _SPEC_DTYPES[layer.dtype], fast)
            for s in (STREAMK_SPLITS if c.scheduler == "streamk" else (1,))]


def _variant_kernels(layer, params: dict) -> list:
    return [_piece_kernel(layer, params, f)[0] for _, _, f in _pieces(layer)]


def _spec_prepare(layers) -> None:
    """Every candidate library of every layer (the table's configs for its M bucket, with the
    epilogue each piece will run), in one parallel build: a model's layers compile at once."""
    kernels = list(dict.fromkeys(k for ly in layers for p in _all_params(ly) for k in _variant_kernels(ly, p)))
    if not kernels:
        return
    log = logging.getLogger("sparse_inductor")
    log.info("sparse_inductor: %d CUTLASS kernels for %d layers (built in parallel where not cached)",
             len(kernels), len(layers))
    start = time.perf_counter()
    failed = [k for k, r in build(kernels).items() if isinstance(r, Exception)]
    log.info("sparse_inductor: CUTLASS kernels ready in %.1f s%s", time.perf_counter() - start,
             f" ({len(failed)} did not build)" if failed else "")


def _spec_variants(layer, tensors) -> list:
    """The table's configs for the layer's M bucket (x splits for stream-K), each with the epilogue
    every piece of the layer will run, built in parallel now unless cached (spec.prepare built them);
    a config that does not build is left out, with a log line."""
    params = _all_params(layer)
    want = [_variant_kernels(layer, p) for p in params]
    built = build([k for ks in want for k in ks])
    ok = []
    for p, ks in zip(params, want):
        bad = [k for k in ks if isinstance(built[k], Exception)]
        for k in bad:
            logging.getLogger("sparse_inductor").warning("sparse_inductor: CUTLASS %s did not build: %s",
                                                         k.describe(), built[k])
        if not bad:
            ok.append(p)
    return ok


def _spec_runner(tensors, bias, layer, params):
    """The layer's kernels as the compiled graph runs them, for timing: per output piece the library
    with its fused epilogue (synthetic aux and scales: their values do not change the time), and
    what the graph adds around the call: the row check over x where it is a kernel of its own
    ("separate", and where a derived check is predicted: that is cuSPARSELt's; its 1 + g as a
    second small kernel, where the graph fuses it into the check's), fp8's row guard (a reduction
    over x, where it does not join x's producer: layer.guard "separate"). Where the check rides in
    x's norm ("fused") the token scale is ones.

    The first call (the one measure.LayerTimer checks against fp64) returns the pieces side by side,
    the others the last piece; `run.reference(ref, rows)` maps the fp64 product of x's rows `rows`
    (plus the bias the timer gave: a 16-bit layer's own) to what those rows of the first call are."""
    pieces = _pieces(layer)
    kerns = [_piece_kernel(layer, params, f) for _, _, f in pieces]
    libs = [library(k) for k, _ in kerns]
    t = layout_tile_k(kerns[0][0].config.tile[2])
    values, meta = tensors["values"], tensors[f"meta_{t}"]
    if len(pieces) > 1:  # each piece compressed on its own (a slice of the metadata is not its layout)
        w = decompress(values, meta, layer.n, layer.k, t)
        packed = [compress(w[a:b].contiguous(), t) for a, b, _ in pieces]
    else:
        packed = [(values, meta)]
    device = values.device
    gen = torch.Generator(device=device).manual_seed(1)
    own_check = _row_fixup(layer) and layer.dtype.itemsize == 2 and (layer.row_check == "separate" or layer.derived_check)
    inputs: dict[int, list] = {}  # M -> per piece, the epilogue's synthetic inputs
    first: dict = {}  # M of the first call

    def inputs_at(m: int) -> list:
        """Made on the untimed first call at each M (the timer calls once before it times)."""
        if m in inputs:
            return inputs[m]
        out = []
        for (a, b, f), (kern, _) in zip(pieces, kerns):
            ep, kw = kern.epilogue, {}
            if bias is not None:
                kw["bias"] = bias[a:b].contiguous()
            elif f is not None and f.bias is not None:
                kw["bias"] = torch.randn(b - a, device=device, generator=gen).to(f.bias)
            if ep.has_aux:
                kw["aux"] = torch.randn(m, b - a, device=device, generator=gen).to(OUT_DTYPES[ep.resolved_aux_dtype][1])
            if ep.weight_scale:
                shape = (b - a,) if ep.weight_scale == "vector" else ()
                kw["weight_scale"] = torch.rand(shape, device=device, generator=gen) + 0.5
            if ep.token_scale:
                shape = (m,) if ep.token_scale == "vector" else ()
                kw["token_scale"] = (torch.rand(shape, device=device, generator=gen) + 0.5 if layer.dtype.itemsize == 1
                                     else torch.ones(shape, device=device))  # (16-bit: the row fixup, 1 + 0)
            out.append(kw)
        inputs[m] = out
        return out

    def run(x):
        kws = inputs_at(x.shape[0])
        if layer.dtype == torch.float8_e4m3fn and layer.guard == "separate":  # the row guard's reduction
            torch.sum(x.view(torch.uint8), dim=-1, dtype=torch.int32)  # (fp8 has no eager sum: its bytes)
        elif own_check:
            g = row_check.row_check_eager(x)
            for kw in kws:
                torch.add(g, 1.0, out=kw["token_scale"])
        outs = [lib(x, v, mt, b - a, splits=splits, **kw)
                for lib, (_, splits), (v, mt), (a, b, _), kw in zip(libs, kerns, packed, pieces, kws)]
        if not first:
            first["m"] = x.shape[0]
            return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return outs[-1]

    def reference(ref: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        cols = []
        for (a, b, _), (kern, _), kw in zip(pieces, kerns, inputs[first["m"]]):
            ts = kw.get("token_scale")
            cols.append(epilogue_reference(
                kern.epilogue, ref[:, a:b], bias=kw.get("bias") if layer.dtype.itemsize == 1 else None,
                aux=kw["aux"][rows] if "aux" in kw else None, weight_scale=kw.get("weight_scale"),
                token_scale=None if ts is None else (ts[rows] if ts.dim() else ts)))
        return torch.cat(cols, dim=1)

    run.reference = reference
    return run


def _spec_node_args(x, constants, bias, n, k, params) -> tuple:
    """sparse_inductor::linear_cutlass(x, values, meta, bias, n, k, config[, out_dtype]) for the
    variant `params` (none: the table's first config for x's M, e.g. when forced without timing);
    the meta of the config's layout (constants: values, meta_64, meta_128). int8 x ends with an
    out_dtype for the rewrite to set (the product's dtype: linear_rewrite._replace)."""
    val = x.meta["val"]
    if "tile" not in params:  # untimed: the bucket's first config ({"fast_accum": True}: its fast form)
        m = _compat.size_hint(val.shape[0]) or 16
        params = params_of(configs_for(m, _SPEC_DTYPES.get(val.dtype, "bf16"), bool(params.get("fast_accum")))[0])
    tag = _tag_of(params)
    values, meta64, meta128 = constants
    meta = meta64 if layout_tile_k(parse_tag(tag)[0].tile[2]) == 64 else meta128
    args = (x, values, meta, bias, n, k, tag)
    if val.dtype == torch.int8:
        args += (torch.int32,)
    return _OP, args


def kernel_spec():
    """The family's KernelSpec ("cutlass", pattern "2:4", registry.py); registered when this module
    is imported (lowering/__init__.py)."""
    return KernelSpec("cutlass", "2:4", ("cuda",), _spec_check, _spec_estimate_us, compress=_spec_compress,
                      fmt="cutlass_sm90", runner=_spec_runner, variants=_spec_variants, node_args=_spec_node_args,
                      host_heavy=True, row_check=True, fixup_in_graph=False, prepare=_spec_prepare,
                      experimental=True)


register_kernel(kernel_spec())
