"""Triton kernel for the block-sparse linear: y = x @ W^T + bias with W in the packed block layout.

Shapes and layouts (formats/block.py builds the weight side once, at compile time):

    x          [M, K]          fp16 / bf16 / fp32, any strides
    blocks     [nnzb, B, B]    x's dtype, contiguous; blocks[i][r, c] = W[rb*B + r, col_idx[i]*B + c]
    row_ptr    [Nb + 1]        int32; the blocks of block row rb are row_ptr[rb] .. row_ptr[rb+1]-1
    col_idx    [nnzb]          int32, block column of each block (ascending inside a block row)
    row_order  [Nb]            int32, block rows by descending nonzero count
    bias       [N] or None     x's dtype
    y          [M, N]          x's dtype, contiguous
    Nb = ceil(N / B), Kb = ceil(K / B); ragged edges of W are zero-padded inside the blocks.

Design.
- One program per (output block row, column slice, M tile): program (p, t) computes
  y[t*BLOCK_M : +BLOCK_M, rb*B + s*BN : +BN] for rb = row_order[p // (B/BN)], s = p % (B/BN); BN = B
  (the whole block row) unless the config splits it (small M: more programs in flight). The output tile's width is the block size, so a program owns
  its tile outright: no split-K, no atomics, no zero-init pass, and the epilogue (bias, guard,
  whatever Inductor fuses) runs once per tile on the fp32 accumulator.
- The reduction walks only the nonzero blocks of the row: for each block i, the x tile
  x[m_tile, col_idx[i]*B : +B] (gathered by the block's column) times blocks[i]^T. The transpose
  is done by indexing (the block is loaded as a [k, n] tile with k contiguous), never by a copy.
- row_order puts the block rows with the most blocks at the lowest program ids, which the GPU
  launches first (grid axis 0 varies fastest); short rows fill in the tail (longest-processing-
  time-first scheduling). A guess, not measured: with several M tiles the long rows of
  tile 1 start after the short rows of tile 0; the alternative order (M tile fastest) trades that
  for worse L2 reuse of the x tile across block rows.
- fp32 accumulate always. fp16/bf16 go to tl.dot directly; fp32 uses tl.dot with ALLOW_TF32
  choosing "tf32" or "ieee". Under the Triton interpreter (CPU), bf16 tl.dot gives wrong results,
  so DOT_FP32 upcasts both tiles to fp32 first.

Non-finite inputs. A dense matmul computes 0 * x for the zero blocks too, so a NaN or Inf in
x[m, k] makes y[m, n] NaN for every n whose weight W[n, k] is zero; a kernel that skips empty
blocks would lose that. nonfinite_rows(x) gives g[m] = sum(0 * x[m, :]) (0, or NaN when the row
holds a NaN/Inf), one cheap reduction; when a tile has such a row (rare), nan_where_skipped reads
the block columns that its block row skips and sets y[m, n] to NaN where a non-finite x lies in
one of them. Inside visited blocks
the tensor-core product sees the zeros and non-finite values itself. The result has exactly the
NaN/Inf pattern of dense. Non-finite values in W sit in nonzero blocks (NaN/Inf count as nonzero
in compress_block), which are always computed.

For the Inductor template (written elsewhere): `block_sparse_acc` is self-contained (it refers only
to `tl` and its arguments) so that `device_source()` (inspect.getsource of DEVICE_FUNCTIONS) can be
pasted into the template's source ahead of the kernel. The template's kernel then does what
`_block_linear_kernel` below does, with Inductor generating the store and epilogue:
    rb = tl.load(row_order_ptr + tl.program_id(0) // (B // BN)); sub = tl.program_id(0) % (B // BN)
    pid_m = tl.program_id(1)
    acc = block_sparse_acc(x, blocks, row_ptr, col_idx, rb, sub, pid_m, M, N, K, stride_xm, stride_xk,
                           BLOCK_M, B, BN, ALLOW_TF32, False)    # DOT_FP32 only in the interpreter
    rows offs_m = pid_m * BLOCK_M + arange(BLOCK_M) (mask < M), columns offs_n = rb * B + sub * BN +
    arange(BN) (mask < N); add nan_where_skipped(...) (see above), as below.
The grid is (Nb * B / BN, cdiv(M, BLOCK_M)); B, BN, BLOCK_M, num_warps and num_stages come from pick_config.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._compat import INTERPRETING, inductor_size_hint, static_int
from ..formats.block import BLOCK_SIZES
from ..registry import KernelSpec, register_kernel
from . import row_check as checks
from .template import HEAD_X_MNK, device_functions_source, get_template, template_source

__all__ = [
    "BlockLinearConfig", "CONFIGS", "DEVICE_FUNCTIONS", "M_BUCKETS", "block_linear",
    "block_range_acc", "block_sparse_acc", "device_source", "m_bucket", "pick_config",
]


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Device function (self-contained: embedded into the Inductor template by inspect.getsource)
# ----------------------------------------------------------------------------------------------

@triton.jit
def block_dot(a, w, acc, ALLOW_TF32: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ w in fp32: fp16/bf16 tiles straight to the tensor cores; fp32 as tf32 (ALLOW_TF32)
    or full fp32; DOT_FP32 (bf16 under the interpreter) upcasts both first."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif ALLOW_TF32:
        acc = tl.dot(a, w, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    return acc


@triton.jit
def block_range_acc(
    # pointers
    x_ptr, blocks_ptr, col_idx_ptr,
    # the blocks start .. end-1 (of one block row), the column slice sub*BN .. + BN of it, M tile
    start, end, sub, pid_m,
    # sizes
    M, K,
    # strides of x
    stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr, B: tl.constexpr, BN: tl.constexpr,
    ALLOW_TF32: tl.constexpr,  # fp32 inputs: tf32 tensor cores (True) or full fp32 (False)
    DOT_FP32: tl.constexpr,  # upcast both dot operands to fp32 first (bf16 under the interpreter)
    # a permuted weight (formats/permute.py): x's columns gathered, x[m, xidx[k]] for column k
    xidx_ptr=None, PERM_K: tl.constexpr = False,
):
    """fp32 acc[BLOCK_M, BN] = sum over blocks i in start .. end-1 of
    x[pid_m*BLOCK_M : +BLOCK_M, col_idx[i]*B : +B] @ blocks[i][sub*BN : +BN, :]^T
    (with PERM_K: x's columns xidx[col_idx[i]*B : +B] instead).

    Rows of x at or beyond M and columns at or beyond K load as 0; the padded block entries are 0.
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)
    offs_n = sub * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    # blocks[i]^T as a [k, n] tile: element (k, n) is blocks[i][n, k] at offset n*B + k, so k is
    # the contiguous axis of the loaded tile (the nn.Linear transpose, done by indexing).
    w_ptrs = blocks_ptr + start.to(tl.int64) * (B * B) + (offs_b[:, None] + offs_n[None, :] * B)
    # The block column is loaded one iteration ahead and carried: x's address then depends on a
    # loop-carried value, not on a load of the same iteration, and Triton 3.6's pipeliner gives x
    # and the block num_stages buffers. Loading col_idx[i] inside iteration i makes it an indirect
    # load chain that costs pipeline stages: 4 stages gave 1 buffer (no prefetch) with mma.sync and
    # 2 with wgmma (read from the sm90 TTGIR; the speed itself is not measured yet).
    c_ptr = col_idx_ptr + start
    col = tl.load(c_ptr, mask=start < end, other=0)
    # PERM_K: the gathered columns are loaded one block ahead too, carried like col
    offs_k = col * B + offs_b
    if PERM_K:
        kx = tl.load(xidx_ptr + offs_k, mask=offs_k < K, other=0)
    else:
        kx = offs_k
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    for i in range(start, end):
        a = tl.load(x_rows + kx[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptrs).to(a.dtype)  # int8 blocks (weight-only): their integers in x's dtype
        acc = block_dot(a, w, acc, ALLOW_TF32, DOT_FP32)
        w_ptrs += B * B
        c_ptr += 1
        col = tl.load(c_ptr, mask=i + 1 < end, other=0)
        offs_k = col * B + offs_b
        if PERM_K:
            kx = tl.load(xidx_ptr + offs_k, mask=(offs_k < K) & (i + 1 < end), other=0)
        else:
            kx = offs_k
    return acc


@triton.jit
def block_sparse_acc(
    # pointers
    x_ptr, blocks_ptr, row_ptr_ptr, col_idx_ptr,
    # which output tile: block row (already permuted through row_order), column slice of it
    # (columns rb*B + sub*BN .. + BN), M tile
    rb, sub, pid_m,
    # sizes (N is unused: rows of W beyond N are zero padding inside the blocks)
    M, N, K,
    # strides of x
    stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr, B: tl.constexpr, BN: tl.constexpr,
    ALLOW_TF32: tl.constexpr,  # fp32 inputs: tf32 tensor cores (True) or full fp32 (False)
    DOT_FP32: tl.constexpr,  # upcast both dot operands to fp32 first (bf16 under the interpreter)
    xidx_ptr=None, PERM_K: tl.constexpr = False,  # x's columns gathered (block_range_acc)
):
    """fp32 acc[BLOCK_M, BN] = sum over blocks i of block row rb of
    x[pid_m*BLOCK_M : +BLOCK_M, col_idx[i]*B : +B] @ blocks[i][sub*BN : +BN, :]^T.

    BN <= B (a power of two dividing B): a program computes BN of the block row's B columns, so that
    small M has B / BN times more programs streaming the weight (each reads the same x tiles).

    Rows of x at or beyond M and columns at or beyond K load as 0; the padded block entries are 0.
    Rows of acc beyond M and columns beyond N hold padding; the caller masks them at the store.
    """
    start = tl.load(row_ptr_ptr + rb)
    end = tl.load(row_ptr_ptr + rb + 1)
    return block_range_acc(x_ptr, blocks_ptr, col_idx_ptr, start, end, sub, pid_m, M, K, stride_xm, stride_xk,
                           BLOCK_M, B, BN, ALLOW_TF32, DOT_FP32, xidx_ptr, PERM_K)


@triton.jit
def row_check_tile(g_ptr, pid_m, M, BLOCK_M: tl.constexpr):
    """g [BLOCK_M] of the M tile pid_m (0 past M). Loaded before the reduction, so that its latency
    hides behind the block loop instead of standing before the epilogue."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return tl.load(g_ptr + offs_m, mask=offs_m < M, other=0.0)


@triton.jit
def nan_where_skipped(x_ptr, row_ptr_ptr, col_idx_ptr, g, rb, pid_m, M, K, stride_xm, stride_xk,
                      BLOCK_M: tl.constexpr, B: tl.constexpr, xidx_ptr=None, PERM_K: tl.constexpr = False):
    """[BLOCK_M]: NaN for the rows whose x holds a NaN/Inf inside a block column that block row rb
    skips (dense would compute 0 * x there), else 0. g[m] = sum(0 * x[m, :]) (0 or NaN) says which
    rows hold any (g: the tile's rows of it, row_check_tile); only if one of this tile's does (rare;
    the branch is uniform over the program) are the skipped columns of x read, and only in the rows
    whose g is NaN. PERM_K: x's columns gathered at xidx, as in block_range_acc."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    out = tl.zeros((BLOCK_M,), dtype=tl.float32)
    any_bad = tl.sum(g, axis=0)
    if any_bad != any_bad:
        # only the rows whose check is NaN are read: a row whose check is 0 is finite where it
        # matters, and where the caller skipped tiles of x (skip_tile) its other rows may be unwritten
        mask_m = mask_m & (g != g)
        # x is read 16 columns a step: the branch's tile then needs few registers next to the
        # caller's live accumulator (a whole [BLOCK_M, B] tile raised the kernel from 72 to 92
        # registers, sm_90a, BLOCK_M 64, 4 warps: fewer programs per SM, even with no NaN around)
        CH: tl.constexpr = 16 if B > 16 else B
        offs_c = tl.arange(0, CH)
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        ptr = tl.load(row_ptr_ptr + rb)
        end = tl.load(row_ptr_ptr + rb + 1)
        nxt = tl.load(col_idx_ptr + ptr, mask=ptr < end, other=-1)
        bad = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in range(0, tl.cdiv(K, B)):
            skipped = c != nxt
            for j in range(0, B, CH):
                offs_k = c * B + j + offs_c
                if PERM_K:
                    kx = tl.load(xidx_ptr + offs_k, mask=(offs_k < K) & skipped, other=0)
                else:
                    kx = offs_k
                z = tl.load(x_rows + kx[None, :] * stride_xk,
                            mask=mask_m[:, None] & (offs_k[None, :] < K) & skipped, other=0.0).to(tl.float32) * 0.0
                bad += tl.sum((z != z).to(tl.float32), axis=1)
            ptr += (c == nxt).to(tl.int32)
            nxt = tl.load(col_idx_ptr + ptr, mask=ptr < end, other=-1)
        out = tl.where(bad > 0, float("nan"), 0.0)
    return out


@triton.jit
def skip_tile(s_ptr, p, live, pid_m, M, BLOCK_M: tl.constexpr, CHECKED: tl.constexpr):
    """Whether the program on row_order[p] and M tile pid_m may leave its output tile unwritten:
    p >= live (a block row nothing reads in the rows that are finite where it matters), and, with
    CHECKED, s[m] (0 or NaN, as g) is 0 for every row of the tile. A tile holding a row whose s is
    NaN is computed whole."""
    skip = p >= live
    if CHECKED:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        s = tl.load(s_ptr + offs_m, mask=(offs_m < M) & skip, other=0.0)
        skip = skip & (tl.sum(s, axis=0) == 0.0)
    return skip


@triton.jit
def out_columns(oidx_ptr, offs_n, N, PERM_N: tl.constexpr):
    """The columns of y a tile writes: offs_n, or with PERM_N (a permuted weight, formats/permute.py)
    the permuted weight's rows mapped to y's columns, oidx[offs_n]; N for the padding rows past N,
    which the store's mask (column < N) drops. Bias and epilogue read at the same columns."""
    if PERM_N:
        return tl.load(oidx_ptr + offs_n, mask=offs_n < N, other=N)
    else:
        return offs_n


# Every @triton.jit function the template must embed, in definition order.
DEVICE_FUNCTIONS = (block_dot, block_range_acc, block_sparse_acc, row_check_tile, nan_where_skipped, skip_tile,
                    out_columns)


def device_source() -> str:
    """The source of DEVICE_FUNCTIONS (decorators included), ready to paste into a template."""
    return device_functions_source(DEVICE_FUNCTIONS)


# ----------------------------------------------------------------------------------------------
# Eager kernel and launcher
# ----------------------------------------------------------------------------------------------

@triton.jit
def _block_linear_kernel(
    # pointers
    x_ptr, blocks_ptr, row_ptr_ptr, col_idx_ptr, row_order_ptr, bias_ptr, g_ptr, s_ptr, y_ptr, xidx_ptr, oidx_ptr,
    # sizes; block rows row_order[live:] may be skipped (skip_tile)
    M, N, K, live,
    # strides
    stride_xm, stride_xk, stride_ym, stride_yn,
    # meta-parameters
    BLOCK_M: tl.constexpr, B: tl.constexpr, BN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GUARD: tl.constexpr, SKIP: tl.constexpr, SKIP_CHECKED: tl.constexpr,
    ALLOW_TF32: tl.constexpr, DOT_FP32: tl.constexpr, PERM_K: tl.constexpr = False, PERM_N: tl.constexpr = False,
):
    """y[M, N] = x[M, K] @ W^T (+ bias[N]); with HAS_GUARD, NaN where a non-finite x meets a skipped
    (all-zero) block, as in dense; with SKIP, the tiles skip_tile allows are left unwritten. One
    [BLOCK_M, BN] tile a program.
    A permuted weight (the blocks are of W[rows][:, cols], formats/permute.py): PERM_K reads x at
    xidx = cols, PERM_N writes the weight's row n' to y's column oidx[n'] = rows[n'] (out_columns)."""
    p = tl.program_id(0) // (B // BN)
    pid_m = tl.program_id(1)
    if SKIP:
        if skip_tile(s_ptr, p, live, pid_m, M, BLOCK_M, SKIP_CHECKED):
            return
    rb = tl.load(row_order_ptr + p)
    sub = tl.program_id(0) % (B // BN)
    if HAS_GUARD:
        g = row_check_tile(g_ptr, pid_m, M, BLOCK_M)
    acc = block_sparse_acc(x_ptr, blocks_ptr, row_ptr_ptr, col_idx_ptr, rb, sub, pid_m, M, N, K,
                           stride_xm, stride_xk, BLOCK_M, B, BN, ALLOW_TF32, DOT_FP32, xidx_ptr, PERM_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = out_columns(oidx_ptr, rb * B + sub * BN + tl.arange(0, BN), N, PERM_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_GUARD:
        acc += nan_where_skipped(x_ptr, row_ptr_ptr, col_idx_ptr, g, rb, pid_m, M, K,
                                 stride_xm, stride_xk, BLOCK_M, B, xidx_ptr, PERM_K)[:, None]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


class BlockLinearConfig(NamedTuple):
    block_m: int
    num_warps: int
    num_stages: int
    block_n: Optional[int] = None  # output columns a program computes (<= B); None: the block size B


# M buckets: an M falls in the smallest bucket >= M; 256 stands for every M > 128.
M_BUCKETS = (16, 32, 64, 128, 256)

# The one config table, keyed by (block size, M bucket). The entries are guesses, but where a
# comment gives a measurement (H100, torch 2.11, triton 3.6). What is known, from compiling every
# entry for sm_90a with triton 3.6 on the CPU machine (TTGIR + ptxas -v, no GPU): all compile,
# none spills, the largest (b=128, BLOCK_M 128, bf16) takes 192 KiB of shared memory of the 227.
# - M <= 16 (decode): BLOCK_M 16, the smallest tile tl.dot accepts on the GPU; the kernel is a
#   stream over the weight blocks, so the M tile should not waste work on padding rows.
# - BLOCK_M < 64 compiles to mma.sync; BLOCK_M >= 64 with 4 or 8 warps to async wgmma.
# - stages: each holds an x tile [BLOCK_M, B] plus a block [B, B]. Triton 3.6 allocates
#   num_stages buffers on the wgmma path and num_stages - 1 on the mma.sync path (TTGIR). M <= 16
#   is bandwidth bound with few programs per SM, so it gets the deepest prefetch (5 stages);
#   b=128 with BLOCK_M 128 is 64 KiB a bf16 stage, so 3. _fit_stages trims stages for fp32.
# - b=16: each step is a 16-wide dot, so the loop is latency bound whatever the config; few
#   warps per program keep more programs resident. b=128 with BLOCK_M 128: 8 warps, so the
#   128x128 fp32 accumulator takes 64 registers a thread, not 128 (ptxas: 148 registers).
CONFIGS: dict[tuple[int, int], BlockLinearConfig] = {
    (16, 16): BlockLinearConfig(16, 2, 5),
    (16, 32): BlockLinearConfig(32, 2, 4),
    (16, 64): BlockLinearConfig(64, 4, 4),
    (16, 128): BlockLinearConfig(64, 4, 4),
    (16, 256): BlockLinearConfig(128, 4, 4),
    (32, 16): BlockLinearConfig(16, 2, 5),
    (32, 32): BlockLinearConfig(32, 4, 4),
    (32, 64): BlockLinearConfig(64, 4, 4),
    (32, 128): BlockLinearConfig(128, 4, 4),
    (32, 256): BlockLinearConfig(128, 4, 4),
    (64, 16): BlockLinearConfig(16, 4, 5),
    (64, 32): BlockLinearConfig(32, 4, 4),
    (64, 64): BlockLinearConfig(64, 4, 4),
    (64, 128): BlockLinearConfig(128, 4, 3),
    (64, 256): BlockLinearConfig(128, 4, 3),  # H100 sweep: 299 us vs 341 with 4 stages (M=8192, 90%)
    (128, 16): BlockLinearConfig(16, 4, 5),
    (128, 32): BlockLinearConfig(32, 4, 4),
    (128, 64): BlockLinearConfig(64, 4, 3),
    (128, 128): BlockLinearConfig(128, 8, 3),
    (128, 256): BlockLinearConfig(128, 8, 3),
}

# Layers whose block rows hold few blocks (mean < SHORT_ROWS blocks a row), by (block size, M
# bucket): each program does one or two steps, so prefetch stages only cost shared memory and
# occupancy, and the epilogue (a GELU: erf per output) is much of the work; smaller M tiles give
# more programs a wave. H200, ViT-B's fc1 (3072x768, M = 12608, 90% zero: 1.2 blocks a row) with
# its GELU, compiled (bench/sweep_block.py --compiled --act gelu, docs/performance.md): the
# table's BLOCK_M 128 / 4 warps / 3 stages 91.4 us, 2 stages 88.6, 1 stage 86.6; BLOCK_M 64 / 4
# warps / 2 stages 82.8, 1 stage 79.5 (dense compile 143.2). fc2 (768x3072, 4.8 blocks a row) is
# fastest with the table's (33.1 us; BLOCK_M 64 / 2 stages 35.0).
SHORT_ROWS = 2.0
CONFIGS_SHORT_ROWS: dict[tuple[int, int], BlockLinearConfig] = {
    (64, 256): BlockLinearConfig(64, 4, 1),  # the one case measured; other sizes keep CONFIGS
}

# Shared memory the pipelined loads may use (H100: 227 KiB a block), counted as num_stages whole
# stages (conservative: mma.sync uses one fewer); the rest is left for layout conversions and the
# epilogue. A guess, not measured.
_SMEM_BUDGET = 192 * 1024


def m_bucket(m: int) -> int:
    for bucket in M_BUCKETS[:-1]:
        if m <= bucket:
            return bucket
    return M_BUCKETS[-1]


def _fit_stages(cfg: BlockLinearConfig, b: int, elem_size: int) -> BlockLinearConfig:
    """Fewer stages when x tile + block per stage would overflow _SMEM_BUDGET (fp32 inputs)."""
    per_stage = (cfg.block_m * b + b * (cfg.block_n or b)) * elem_size
    stages = max(1, min(cfg.num_stages, _SMEM_BUDGET // per_stage))
    return cfg._replace(num_stages=stages)


def pick_config(b: int, m: int, dtype: torch.dtype, blocks_per_row: Optional[float] = None) -> BlockLinearConfig:
    """The table's config for block size b and M, with stages trimmed to fit dtype's tiles;
    blocks_per_row (nonzero blocks / block rows): below SHORT_ROWS, CONFIGS_SHORT_ROWS' entry where
    it has one."""
    key = (b, m_bucket(m))
    short = blocks_per_row is not None and blocks_per_row < SHORT_ROWS and key in CONFIGS_SHORT_ROWS
    return _fit_stages(CONFIGS_SHORT_ROWS[key] if short else CONFIGS[key], b, dtype.itemsize)


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """g [M] fp32: sum(0 * x[m, :]), 0 for a finite row, NaN when it holds a NaN/Inf."""
    return (x * 0).to(torch.float32).sum(-1)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"block_linear: {msg}")


def _default_allow_tf32() -> bool:
    # Follow F.linear on fp32: TF32 unless float32 matmul precision is "highest".
    return torch.get_float32_matmul_precision() != "highest"


def block_linear(
    x: torch.Tensor, blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
    row_order: torch.Tensor, bias: Optional[torch.Tensor], n: int, k: int, *,
    guard: bool = True, config: Optional[BlockLinearConfig] = None,
    allow_tf32: Optional[bool] = None, row_check: Optional[torch.Tensor] = None,
    live: Optional[int] = None, skip_check: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
    x_index: Optional[torch.Tensor] = None, out_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = F.linear(x, W, bias) for W [n, k] in the packed block layout (formats/block.py).

    x [M, k] fp16/bf16/fp32 (any strides); blocks [nnzb, b, b] contiguous, x's dtype; row_ptr
    [ceil(n/b)+1], col_idx [nnzb], row_order [ceil(n/b)] int32; bias [n] in x's dtype or None.
    Returns y [M, n] contiguous in x's dtype, accumulated in fp32.

    guard=True reproduces dense non-finite semantics exactly: a NaN or Inf in x[m, k] makes y[m, n]
    NaN wherever W[n, k] is zero, including inside the blocks this kernel skips (see
    nonfinite_rows). It costs a pass over x before the kernel. guard=False skips it: outputs
    whose non-finite inputs only meet skipped blocks then stay finite.

    row_check: with guard, g [M] fp32 to use instead of nonfinite_rows(x): NaN for every row that
    may hold a NaN/Inf (more rows than that only cost the fixup's reads), 0 for the others.
    live / skip_check: the block rows row_order[live:] are read by nobody where they are finite
    (passes/fuse_mlp.py: hidden units the next layer does not use, or folds into its bias); their
    output tiles are computed only in the M tiles where skip_check [M] fp32 (0 or NaN) holds a NaN,
    and are left unwritten elsewhere (with skip_check None: everywhere). None: every row computed.
    out: a contiguous [M, n] tensor of x's dtype to write y into (what is skipped keeps its values).
    config: a BlockLinearConfig to use instead of the table (CONFIGS, by block size and M bucket).
    allow_tf32: fp32 inputs only; None follows torch.get_float32_matmul_precision() like F.linear.
    x_index [k], out_index [n] (int32, x's device; formats/permute.kernel_indices): the blocks are
    those of a permuted weight Wp = W[rows][:, cols]; the kernel reads x[:, x_index] (x_index = cols)
    and writes Wp's output row n' to y[:, out_index[n']] (out_index = rows), so y = F.linear(x, W,
    bias) with bias in W's own order. Either may be None (the identity).
    The format's invariants (col_idx < ceil(k/b), row_ptr monotone, row_order a permutation; x_index
    and out_index permutations) are trusted, not checked: that would need a device sync.
    """
    _check(x.dim() == 2, f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check(x.dtype in _DTYPES, f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    _check(blocks.dim() == 3 and blocks.shape[1] == blocks.shape[2],
           f"blocks must be [nnzb, b, b], got shape {tuple(blocks.shape)}")
    b = blocks.shape[-1]
    _check(b in BLOCK_SIZES, f"block size must be one of {BLOCK_SIZES}, got {b}")
    _check(blocks.dtype in (x.dtype, torch.int8),
           f"blocks dtype {blocks.dtype} differs from x dtype {x.dtype} (int8 blocks: weight-only quantized)")
    _check(blocks.is_contiguous(), "blocks must be contiguous")
    _check(n >= 0 and k >= 0, f"n and k must be >= 0, got n={n}, k={k}")
    _check(x.shape[1] == k, f"x has K={x.shape[1]} but the weight has k={k}")
    nb = math.ceil(n / b)
    for name, t, numel in (("row_ptr", row_ptr, nb + 1), ("col_idx", col_idx, blocks.shape[0]),
                           ("row_order", row_order, nb)):
        _check(t.dtype == torch.int32 and t.dim() == 1 and t.is_contiguous(),
               f"{name} must be a contiguous 1-D int32 tensor, got {t.dtype} shape {tuple(t.shape)}")
        _check(t.numel() == numel, f"{name} must have {numel} entries (n={n}, b={b}), got {t.numel()}")
    if bias is not None:
        _check(bias.shape == (n,), f"bias must be [{n}], got shape {tuple(bias.shape)}")
        _check(bias.dtype == x.dtype, f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    for name, t, numel in (("x_index", x_index, k), ("out_index", out_index, n)):
        _check(t is None or (t.dtype == torch.int32 and t.dim() == 1 and t.is_contiguous() and t.numel() == numel),
               f"{name} must be None or a contiguous 1-D int32 tensor of {numel} entries, got "
               f"{getattr(t, 'dtype', None)} shape {tuple(getattr(t, 'shape', ()))}")
    for name, t in (("blocks", blocks), ("row_ptr", row_ptr), ("col_idx", col_idx),
                    ("row_order", row_order), ("bias", bias), ("x_index", x_index), ("out_index", out_index)):
        _check(t is None or t.device == x.device, f"{name} is on {getattr(t, 'device', None)}, x on {x.device}")
    _check(x.device.type == "cuda" or INTERPRETING,
           f"x is on {x.device}: CPU tensors need TRITON_INTERPRET=1 set before this module is imported")

    m = x.shape[0]
    if out is not None:
        _check(out.shape == (m, n) and out.dtype == x.dtype and out.device == x.device and out.is_contiguous(),
               f"out must be a contiguous [{m}, {n}] {x.dtype} tensor on {x.device}")
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if config is None:
        config = pick_config(b, m, x.dtype, blocks.shape[0] / max(row_order.numel(), 1))
    _check(config.block_m >= 16 and config.block_m & (config.block_m - 1) == 0,
           f"config.block_m must be a power of two >= 16, got {config.block_m}")
    bn = config.block_n or b
    _check(16 <= bn <= b and b % bn == 0 and bn & (bn - 1) == 0,
           f"config.block_n must be a power of two in 16..{b} (the block size), got {bn}")
    skip = live is not None and live < nb
    grid = (nb * (b // bn), triton.cdiv(m, config.block_m))
    _check(grid[1] <= 65535, f"M={m} needs {grid[1]} M tiles, over the grid's 65535 (raise block_m)")
    g = (row_check if row_check is not None else nonfinite_rows(x)) if guard else None
    if skip_check is not None:
        _check(skip_check.shape == (m,) and skip_check.dtype == torch.float32 and skip_check.device == x.device,
               f"skip_check must be [M] fp32 on {x.device}, got {skip_check.dtype} {tuple(skip_check.shape)}")
    if allow_tf32 is None:
        allow_tf32 = _default_allow_tf32()
    _block_linear_kernel[grid](
        x, blocks, row_ptr, col_idx, row_order,
        bias if bias is not None else y, g if g is not None else y,
        skip_check if skip_check is not None else y, y,
        x_index if x_index is not None else row_ptr, out_index if out_index is not None else row_ptr,
        m, n, k, live if skip else nb,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=config.block_m, B=b, BN=bn,
        HAS_BIAS=bias is not None, HAS_GUARD=guard, SKIP=skip, SKIP_CHECKED=skip and skip_check is not None,
        ALLOW_TF32=bool(allow_tf32) and x.dtype == torch.float32,
        DOT_FP32=x.dtype == torch.bfloat16 and INTERPRETING,  # bf16 tl.dot is wrong there
        PERM_K=x_index is not None, PERM_N=out_index is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


# ----------------------------------------------------------------------------------------------
# Inductor template: the device function above plus a body that Inductor renders, so that what
# follows the linear (bias, activation, residual, cast) is fused into the store.
# ----------------------------------------------------------------------------------------------

_TEMPLATE_BODY = HEAD_X_MNK + r'''    p = tl.program_id(0) // (B // BN)
    pid_m = tl.program_id(1)
@SKIP@
    rb = tl.load(ROW_ORDER + p)
    sub = tl.program_id(0) % (B // BN)
@GUARD_LOAD@
    acc = block_sparse_acc(X, BLOCKS, ROW_PTR, COL_IDX, rb, sub, pid_m, M, N, K, stride_xm, stride_xk,
                           BLOCK_M, B, BN, ALLOW_TF32, False@PERM_K@)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = out_columns(OUT_INDEX, rb * B + sub * BN + tl.arange(0, BN), N, @PERM_N@)
@GUARD@
    idx_m = offs_m[:, None]
    idx_n = offs_n[None, :]
    mask = (idx_m < M) & (idx_n < N)
    {{store_output(("idx_m", "idx_n"), "acc", "mask", val_shape=("BLOCK_M", "BN"))}}
'''
_GUARD_LOAD = "    g_rows = row_check_tile(G, pid_m, M, BLOCK_M)"
_GUARD_LINE = ("    acc += nan_where_skipped(X, ROW_PTR, COL_IDX, g_rows, rb, pid_m, M, K, stride_xm, stride_xk, "
               "BLOCK_M, B@PERM_K@)[:, None]")

# skip "": every tile written; "always": the tiles of block rows row_order[LIVE:] never; "checked":
# those only where input S (0 or NaN a row) has a NaN in the tile (skip_tile)
_SKIP_LINES = {
    "": "",
    "always": "    if p >= LIVE:\n        return\n",
    "checked": "    if skip_tile(S, p, LIVE, pid_m, M, BLOCK_M, True):\n        return\n",
}


def _template_body(guard: bool, skip: str = "", perm_k: bool = False, perm_n: bool = False) -> str:
    """The template body with the non-finite row check (input G, see nonfinite_rows) or without it
    (the op's guard=False: options nonfinite="fast"); skip: see _SKIP_LINES (block_linear's live /
    skip_check); perm_k / perm_n: a permuted weight, x read at
    input X_INDEX and the tile's columns written at OUT_INDEX (block_linear's x_index / out_index).
    Inductor's store and epilogue see y's own columns (idx_n), so a fused bias, activation or
    residual reads its inputs at the columns the tile writes."""
    inputs = '"X", "BLOCKS", "ROW_PTR", "COL_IDX", "ROW_ORDER"' + (', "G"' if guard else "") + \
        (', "S"' if skip == "checked" else "") + (', "X_INDEX"' if perm_k else "") + (', "OUT_INDEX"' if perm_n else "")
    body = _TEMPLATE_BODY.replace("@INPUTS@", inputs).replace("@GUARD@\n", _GUARD_LINE + "\n" if guard else "") \
        .replace("@GUARD_LOAD@\n", _GUARD_LOAD + "\n" if guard else "") \
        .replace("@SKIP@\n", _SKIP_LINES[skip])
    body = body.replace("@PERM_K@", ", X_INDEX, True" if perm_k else "")
    if perm_n:
        return body.replace("@PERM_N@", "True")
    return re.sub(r"out_columns\(OUT_INDEX, (.+?), N, @PERM_N@\)", r"(\1)", body)


TEMPLATE_NAME = "sparse_inductor_block"


def _grid():
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.select_algorithm import SymbolicGridFn

    @SymbolicGridFn
    def grid(m, n, meta, *, cdiv):
        return (cdiv(n, meta["B"]) * (meta["B"] // meta["BN"]), cdiv(m, meta["BLOCK_M"]), 1)

    return grid


def template(guard: bool = True, skip: str = "", perm_k: bool = False, perm_n: bool = False):
    name = TEMPLATE_NAME + ("" if guard else "_noguard") + (f"_skip_{skip}" if skip else "") \
        + ("_permk" if perm_k else "") + ("_permn" if perm_n else "")
    return get_template(name, lambda: template_source(DEVICE_FUNCTIONS, _template_body(guard, skip, perm_k, perm_n)),
                        _grid())


def lower(x, blocks, row_ptr, col_idx, row_order, *, n: int, guard: bool = True, row_check=None,
          live: int = -1, skip_check=None, x_index=None, out_index=None):
    """Inductor lowering of sparse_inductor::linear_block (without bias) to the template; one
    choice, so that Inductor fuses what follows into the store.

    The non-finite row check g (see nonfinite_rows): the op's row_check where the graph computes it
    (sparse_inductor::row_check, a kernel of its own: linear_rewrite passes it where x's producer is
    not a reduction), else built from Inductor ops here, so that the reduction over x fuses with
    whatever produces x (a norm). guard=False (the op's, under options nonfinite="fast") leaves it
    out. live / skip_check: as block_linear's (live -1: every block row). x_index / out_index: a
    permuted weight, as block_linear's (int32 constants; None: the identity); the row check is a
    sum over x's row, which a permutation of x's columns does not change."""
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.ir import FixedLayout
    from torch._inductor.select_algorithm import autotune_select_algorithm, realize_inputs


    m = x.get_size()[0]
    b = int(blocks.get_size()[-1])
    g = () if not guard else (row_check if row_check is not None else checks.inductor_ops(x),)
    nnzb, n_rows = static_int(blocks.get_size()[0]), static_int(row_order.get_size()[0])
    skip = "" if live < 0 or n_rows is None or live >= n_rows else "checked" if skip_check is not None else "always"
    s = (skip_check,) if skip == "checked" else ()
    perm = tuple(t for t in (x_index, out_index) if t is not None)
    inputs = tuple(realize_inputs(x, blocks, row_ptr, col_idx, row_order, *g, *s, *perm))
    x = inputs[0]
    m_hint = inductor_size_hint(m, 64)
    per_row = nnzb / max(n_rows, 1) if nnzb is not None and n_rows is not None else None
    cfg = pick_config(b, m_hint, x.get_dtype(), per_row)
    layout = FixedLayout(x.get_device(), x.get_dtype(), [m, n])
    choices: list = []
    extra = {"LIVE": int(live)} if skip else {}
    extra["BN"] = cfg.block_n or b
    err = template(guard, skip, x_index is not None, out_index is not None).maybe_append_choice(
        choices, input_nodes=inputs, layout=layout, num_stages=cfg.num_stages, num_warps=cfg.num_warps,
        BLOCK_M=cfg.block_m, B=b, ALLOW_TF32=_default_allow_tf32() and x.get_dtype() == torch.float32, **extra)
    if err is not None or not choices:
        raise RuntimeError(f"block template rejected the layer: {err}")
    return autotune_select_algorithm("sparse_inductor_block", choices, list(inputs), layout)


# ----------------------------------------------------------------------------------------------
# The dispatcher's view of this family
# ----------------------------------------------------------------------------------------------

def _check_layer(layer) -> Optional[str]:
    if layer.dtype not in _DTYPES:
        return f"dtype {layer.dtype} not supported"
    if layer.weight_dtype not in (None, layer.dtype, torch.int8):
        return f"weight dtype {layer.weight_dtype} not supported"
    if layer.block not in BLOCK_SIZES:
        return f"block size {layer.block} not supported"
    return None


# Fractions of the device model's bandwidth and matrix rate the kernel reaches (guesses for the
# H100; the measured dispatcher does not use them).
_BW, _MMA = 0.6, 0.4


def _estimate_us(layer, model) -> Optional[float]:
    if model is None or layer.m is None or layer.block_density is None:
        return None
    es = layer.dtype.itemsize
    m, n, k, d = layer.m, layer.n, layer.k, layer.block_density
    weight = d * n * k * (1 if layer.weight_dtype == torch.int8 else es)
    io = 2 * m * k * es + m * n * es  # x read by the guard and (at least once) by the kernel, y
    mma = 2 * m * n * k * d * (2 if layer.dtype == torch.float32 else 1) / (model.flops_per_us * _MMA)
    return max((weight + io) / (model.bytes_per_us * _BW), mma) + 2 * model.launch_us


def _runner(t, bias, layer, params):
    """What the template costs, for timing: the kernel, plus one reduction that reads x once where
    the template's non-finite row check does not join x's producer (layer.row_check "separate": the
    row-check kernel; the eager guard, three unfused kernels, would make the family look slower than
    it runs compiled). "fused": the reduction rides in the kernel that makes x (a norm); "none": no check
    (options nonfinite="fast"); layer.derived_check: the check comes from the input of the block fc1
    before it (passes/fuse_mlp.py), reductions in that layer's norm, no pass over x. A permuted weight
    (layer.x_index / out_index), where the orders are applied (params, _variants): "loads" / "store",
    the template's index vectors (x gathered in its loads, its output columns mapped in its store);
    "graph", a gather of x before the call / of the output after it, timed as a pass of its own (in
    the compiled graph Inductor can fuse it into the kernel that makes x, or reads the output)."""
    separate = layer.row_check == "separate" and not layer.derived_check
    xi, oi = t.get("x_index") if layer.x_index else None, t.get("out_index") if layer.out_index else None
    x_first = xi is not None and params.get("x") == "graph"
    y_after = oi is not None and params.get("y") == "graph"
    back = torch.argsort(oi) if y_after else None  # (y = the kernel's output in its rows' order [:, back])
    b_k = bias.index_select(0, oi.long()) if y_after and bias is not None else bias

    def run(x):
        if separate:
            torch.sum(x, dim=-1, dtype=torch.float32)
        if x_first:
            x = x.index_select(1, xi)
        y = block_linear(x, t["blocks"], t["row_ptr"], t["col_idx"], t["row_order"], b_k, layer.n, layer.k,
                         guard=False, x_index=None if x_first else xi, out_index=None if y_after else oi)
        return y.index_select(1, back) if y_after else y

    return run


def _variants(layer, tensors) -> list[dict]:
    """Where a permuted weight's orders are applied (_runner): x in the kernel's loads or gathered
    before the call; the outputs mapped in its store or gathered back after it. The loads and the
    store win at decode sizes, the graph's passes at large M, where a scattered load or store costs
    more than a pass over x or y (docs/benchmarks.md#permuted-scrambled-sparsity)."""
    xs = ("loads", "graph") if layer.x_index else (None,)
    ys = ("store", "graph") if layer.out_index else (None,)
    return [{k: v for k, v in (("x", a), ("y", b)) if v is not None} for a in xs for b in ys]


register_kernel(KernelSpec("triton", "block", ("cuda",), _check_layer, _estimate_us, runner=_runner,
                           variants=_variants, split_outputs=True))
