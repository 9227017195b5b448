"""Two block-sparse linears with an activation between them, as one Triton kernel:

    y = act(x @ W1^T + b1) @ W2^T                 (b2, a residual add, a cast: Inductor's epilogue)

The hidden activations h = act(x @ W1^T + b1) [M, H] never reach memory. Unfused, fc1 writes h
(ViT-B/16 at batch 64: 77 MB) and fc2 reads it back, and dense's non-finite rows need a row check
that reads it once more (docs/performance.md). Here a program owns one output tile y[m tile, block
row rb of W2] and walks the nonzero blocks (rb, j) of W2's block row: for each, it computes the
hidden tile h[m tile, j*B : +B] from W1's block row j (block_range_acc over its nonzero blocks,
plus b1, rounded to x's dtype as fc1's output is, then the activation in fp32, rounded again) and
multiplies it by the block. A hidden tile is computed by every program whose W2 block row holds a
block in column j: on average nnzb2 / Hb times (ViT-B at 90%: 1.2x fc1's work), and never for a
column no block of W2 reads.

Shapes (formats/block.py builds both weights once, at compile time):

    x                         [M, K]        fp16 / bf16 / fp32, any strides
    blocks1, row_ptr1, col_idx1              W1 [H, K] in the packed block layout (block rows j of H)
    bias1                     [H] or None
    blocks2, row_ptr2, col_idx2, row_order2  W2 [N, H] (block rows rb of N, block columns j of H)
    flag                      [M] fp32 or None: max_k |x[m, k]| + sum_k 0 * x[m, k] (row_flag)
    y                         [M, N]        x's dtype

Non-finite values, exactly as the unfused layers compute them. Skipping W1's and W2's zero blocks
drops only products 0 * v with v finite, so it changes nothing as long as x's row and h's row are
finite. h's row is finite when x's row is and |h| cannot overflow: |x @ W1^T + b1| <= max|x[m]| *
L1 + max|b1| (L1 the largest absolute row sum of W1), and |act(t)| <= |t| for the activations
here. `safe_bound` turns that into a threshold on flag[m] (with margin for the fp32 sums), and a
program with a row at or above it (a NaN, an Inf, or a huge finite x: rare) takes the exact path:
every block of W1's rows and every block column of W2 (zero blocks as zeros), so 0 * NaN and 0 *
Inf happen where dense has them, the same NaN/Inf pattern as dense. Without a flag
(options nonfinite="fast") every program takes the fast path.

The template (`lower`) gives Inductor the output tile, so b2, a residual add and a cast fuse into
the store, as for the block template; `block_mlp` is the eager launcher (timing, CPU interpreter
tests).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._compat import INTERPRETING, inductor_size_hint
from ..activations import ACTIVATIONS
from .template import HEAD_X_MNK, get_template, template_source
from .triton_block import _default_allow_tf32, block_range_acc, m_bucket

__all__ = ["ACTS", "MlpConfig", "block_mlp", "pick_config", "row_flag", "safe_bound", "safe_bound_from", "lower"]

# the activations this kernel computes, by their ACT code (constexpr ints: the template renders them
# as literals; mlp_act below computes each as activations.ACTIVATIONS' fn)
ACTS = {name: a.code for name, a in ACTIVATIONS.items() if a.code is not None}


@triton.jit
def mlp_act(h, ACT: tl.constexpr):
    """The activation on an fp32 tile, as Inductor decomposes it (GELU: the erf form)."""
    if ACT == 1:
        h = tl.where(h < 0.0, 0.0, h)  # relu(NaN) = NaN, relu(-Inf) = 0
    elif ACT == 2:
        h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 3:
        h = h * tl.sigmoid(h)
    return h


@triton.jit
def mlp_dot(a, w, acc, ALLOW_TF32: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ w in fp32: tf32 or full fp32 for fp32 tiles (ALLOW_TF32), both upcast first under
    the interpreter's bf16 (DOT_FP32)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    elif ALLOW_TF32:
        return tl.dot(a, w, acc, input_precision="tf32")
    return tl.dot(a, w, acc, input_precision="ieee")


@triton.jit
def mlp_hidden_tile(x_ptr, blocks1_ptr, row_ptr1_ptr, col_idx1_ptr, bias1_ptr, j, pid_m, M, K, H,
                    stride_xm, stride_xk,
                    BLOCK_M: tl.constexpr, B: tl.constexpr, HAS_BIAS1: tl.constexpr, ACT: tl.constexpr,
                    ALLOW_TF32: tl.constexpr, DOT_FP32: tl.constexpr):
    """h[pid_m tile, j*B : +B] = act(x @ W1^T + b1) over the nonzero blocks of W1's block row j,
    in x's dtype (fc1's output rounded as the unfused op writes it, the activation in fp32)."""
    start = tl.load(row_ptr1_ptr + j)
    end = tl.load(row_ptr1_ptr + j + 1)
    acc = block_range_acc(x_ptr, blocks1_ptr, col_idx1_ptr, start, end, 0, pid_m, M, K, stride_xm, stride_xk,
                          BLOCK_M, B, B, ALLOW_TF32, DOT_FP32)
    if HAS_BIAS1:
        offs_h = j * B + tl.arange(0, B)
        acc += tl.load(bias1_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)[None, :]
    h = mlp_act(acc.to(x_ptr.dtype.element_ty).to(tl.float32), ACT)
    return h.to(x_ptr.dtype.element_ty)


@triton.jit
def mlp_hidden_tile_dense(x_ptr, blocks1_ptr, row_ptr1_ptr, col_idx1_ptr, bias1_ptr, j, pid_m, M, K, H,
                          stride_xm, stride_xk,
                          BLOCK_M: tl.constexpr, B: tl.constexpr, HAS_BIAS1: tl.constexpr, ACT: tl.constexpr,
                          ALLOW_TF32: tl.constexpr, DOT_FP32: tl.constexpr):
    """mlp_hidden_tile with every block column of W1's row j multiplied, the skipped ones as zeros
    (the exact path: 0 * NaN and 0 * Inf where dense computes them)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    ptr = tl.load(row_ptr1_ptr + j)
    end = tl.load(row_ptr1_ptr + j + 1)
    nxt = tl.load(col_idx1_ptr + ptr, mask=ptr < end, other=-1)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for c in range(0, tl.cdiv(K, B)):
        offs_k = c * B + offs_b
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        hit = c == nxt
        w = tl.load(blocks1_ptr + ptr.to(tl.int64) * (B * B) + (offs_b[:, None] + offs_b[None, :] * B),
                    mask=(offs_b[:, None] < B) & hit, other=0.0).to(a.dtype)
        acc = mlp_dot(a, w, acc, ALLOW_TF32, DOT_FP32)
        ptr += hit.to(tl.int32)
        nxt = tl.load(col_idx1_ptr + ptr, mask=ptr < end, other=-1)
    if HAS_BIAS1:
        offs_h = j * B + offs_b
        acc += tl.load(bias1_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)[None, :]
    h = mlp_act(acc.to(x_ptr.dtype.element_ty).to(tl.float32), ACT)
    return h.to(x_ptr.dtype.element_ty)


@triton.jit
def block_mlp_acc(x_ptr, blocks1_ptr, row_ptr1_ptr, col_idx1_ptr, bias1_ptr,
                  blocks2_ptr, row_ptr2_ptr, col_idx2_ptr, flag_ptr,
                  rb, pid_m, M, K, H, stride_xm, stride_xk,
                  SAFE: tl.constexpr, BLOCK_M: tl.constexpr, B: tl.constexpr, HAS_BIAS1: tl.constexpr,
                  ACT: tl.constexpr, HAS_FLAG: tl.constexpr, ALLOW_TF32: tl.constexpr, DOT_FP32: tl.constexpr):
    """fp32 acc[BLOCK_M, B] = act(x @ W1^T + b1)[pid_m tile, :] @ W2[rb*B : +B, :]^T (see the module
    docstring); flag (HAS_FLAG): rows at or above SAFE send the program down the exact path."""
    offs_b = tl.arange(0, B)
    start = tl.load(row_ptr2_ptr + rb)
    end = tl.load(row_ptr2_ptr + rb + 1)
    # blocks2[i]^T as a [h, n] tile (h contiguous): the transpose by indexing, as in block_range_acc
    w_tile = offs_b[:, None] + offs_b[None, :] * B
    exact = False
    if HAS_FLAG:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        f = tl.load(flag_ptr + offs_m, mask=offs_m < M, other=0.0)
        exact = tl.max(tl.where(f < SAFE, 0, 1), axis=0) > 0  # NaN < SAFE is False: exact
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    if exact:
        ptr = start
        nxt = tl.load(col_idx2_ptr + ptr, mask=ptr < end, other=-1)
        for j in range(0, tl.cdiv(H, B)):
            h = mlp_hidden_tile_dense(x_ptr, blocks1_ptr, row_ptr1_ptr, col_idx1_ptr, bias1_ptr, j, pid_m, M, K, H,
                                      stride_xm, stride_xk, BLOCK_M, B, HAS_BIAS1, ACT, ALLOW_TF32, DOT_FP32)
            hit = j == nxt
            w = tl.load(blocks2_ptr + ptr.to(tl.int64) * (B * B) + w_tile, mask=(offs_b[:, None] < B) & hit,
                        other=0.0).to(h.dtype)
            acc = mlp_dot(h, w, acc, ALLOW_TF32, DOT_FP32)
            ptr += hit.to(tl.int32)
            nxt = tl.load(col_idx2_ptr + ptr, mask=ptr < end, other=-1)
    else:
        w_ptrs = blocks2_ptr + start.to(tl.int64) * (B * B) + w_tile
        for i in range(start, end):
            j = tl.load(col_idx2_ptr + i)
            h = mlp_hidden_tile(x_ptr, blocks1_ptr, row_ptr1_ptr, col_idx1_ptr, bias1_ptr, j, pid_m, M, K, H,
                                stride_xm, stride_xk, BLOCK_M, B, HAS_BIAS1, ACT, ALLOW_TF32, DOT_FP32)
            w = tl.load(w_ptrs).to(h.dtype)
            acc = mlp_dot(h, w, acc, ALLOW_TF32, DOT_FP32)
            w_ptrs += B * B
    return acc


DEVICE_FUNCTIONS = (block_range_acc, mlp_act, mlp_dot, mlp_hidden_tile, mlp_hidden_tile_dense, block_mlp_acc)


@triton.jit
def _block_mlp_kernel(x_ptr, blocks1_ptr, row_ptr1_ptr, col_idx1_ptr, bias1_ptr,
                      blocks2_ptr, row_ptr2_ptr, col_idx2_ptr, row_order2_ptr, flag_ptr, y_ptr,
                      M, N, K, H, stride_xm, stride_xk, stride_ym, stride_yn,
                      SAFE: tl.constexpr, BLOCK_M: tl.constexpr, B: tl.constexpr, HAS_BIAS1: tl.constexpr,
                      ACT: tl.constexpr, HAS_FLAG: tl.constexpr, ALLOW_TF32: tl.constexpr, DOT_FP32: tl.constexpr):
    rb = tl.load(row_order2_ptr + tl.program_id(0))
    pid_m = tl.program_id(1)
    acc = block_mlp_acc(x_ptr, blocks1_ptr, row_ptr1_ptr, col_idx1_ptr, bias1_ptr, blocks2_ptr, row_ptr2_ptr,
                        col_idx2_ptr, flag_ptr, rb, pid_m, M, K, H, stride_xm, stride_xk,
                        SAFE, BLOCK_M, B, HAS_BIAS1, ACT, HAS_FLAG, ALLOW_TF32, DOT_FP32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = rb * B + tl.arange(0, B)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


class MlpConfig(NamedTuple):
    block_m: int
    num_warps: int
    num_stages: int


# A guess, not swept: the block template's short-rows choice for fc1
# (BLOCK_M 64, 4 warps, 1 stage: each hidden tile is one or two steps of W1, and the activation is
# much of the work); BLOCK_M 16 / 32 at decode sizes.
CONFIGS: dict[int, MlpConfig] = {16: MlpConfig(16, 4, 1), 32: MlpConfig(32, 4, 1), 64: MlpConfig(64, 4, 1),
                                 128: MlpConfig(64, 4, 1), 256: MlpConfig(64, 4, 1)}


def pick_config(b: int, m: int) -> MlpConfig:
    return CONFIGS[m_bucket(m)]


# The largest |fc1 output| the fast path lets through, by dtype: under the dtype's largest finite
# value with room for rounding (fp16 65504, bf16 / fp32 ~3.39e38).
_LIMIT = {torch.float16: 6.0e4, torch.bfloat16: 3.0e38, torch.float32: 3.0e38}


def safe_bound(blocks1: torch.Tensor, row_ptr1: torch.Tensor, bias1: Optional[torch.Tensor], dtype: torch.dtype) -> float:
    """The threshold on row_flag(x)[m] = max_k |x[m, k]| under which fc1's output row cannot overflow
    (so h's row is finite): max|x| * L1 * (1 + 1e-3) + max|b1| <= the dtype's limit, with L1 the
    largest absolute row sum of W1 (in fp64; the 1e-3 covers fp32 rounding of sums of up to ~10^4
    terms, 2^-24 each). A Python float, at most the limit (an all-zero W1 must still send Inf rows
    down the exact path)."""
    if blocks1.numel() == 0:
        l1 = 0.0
    else:
        counts = (row_ptr1[1:] - row_ptr1[:-1]).to(torch.int64).cpu()
        rows = blocks1.detach().double().abs().sum(-1).cpu()  # [nnzb, B]: per row of each block
        per_row = torch.zeros(counts.numel(), blocks1.shape[-1], dtype=torch.float64)
        per_row.index_add_(0, torch.repeat_interleave(torch.arange(counts.numel()), counts), rows)
        l1 = float(per_row.max())
    bmax = float(bias1.detach().double().abs().max()) if bias1 is not None and bias1.numel() else 0.0
    return safe_bound_from(l1, bmax, dtype)


def safe_bound_from(l1: float, bmax: float, dtype: torch.dtype) -> float:
    """safe_bound from W1's largest absolute row sum l1 and the largest |b1| (any weight format:
    passes/row_checks.row_bound)."""
    limit = _LIMIT[dtype]
    if not math.isfinite(l1) or not math.isfinite(bmax) or bmax >= limit:
        return 0.0  # every row takes the exact path
    if l1 == 0.0:
        return limit
    return min(limit, (limit - bmax) / (l1 * (1 + 1e-3)))


def row_flag(x: torch.Tensor) -> torch.Tensor:
    """flag [M] fp32: max_k |x[m, k]| + sum_k 0 * x[m, k], NaN or Inf for a row holding a NaN or Inf
    (the sum makes a NaN count whatever max does with it); what block_mlp's exact path reads."""
    xf = x.to(torch.float32)
    if not x.shape[1]:
        return xf.new_zeros(x.shape[0])
    return xf.abs().amax(-1) + (xf * 0.0).sum(-1)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"block_mlp: {msg}")


def block_mlp(x: torch.Tensor, w1: tuple, bias1: Optional[torch.Tensor], w2: tuple, h: int, n: int,
              act: str = "none", *, exact: bool = True, safe: Optional[float] = None,
              flag: Optional[torch.Tensor] = None, config: Optional[MlpConfig] = None, allow_tf32: Optional[bool] = None) -> torch.Tensor:
    """y = F.linear(act(F.linear(x, W1, bias1)), W2) in one kernel, W1 [h, K] and W2 [n, h] in the
    packed block layout: w1 = (blocks, row_ptr, col_idx) and w2 = (blocks, row_ptr, col_idx,
    row_order) (formats/block.py), the same block size; fc1's output is rounded to x's dtype before
    the activation, as the unfused layers compute it. exact=True (dense's non-finite semantics):
    row_flag(x) against safe (default safe_bound(...)) picks the exact path for the tiles that need
    it (flag: row_flag(x) computed already); exact=False: the fast path everywhere."""
    blocks1, row_ptr1, col_idx1 = w1
    blocks2, row_ptr2, col_idx2, row_order2 = w2
    _check(x.dim() == 2, f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check(x.dtype in _LIMIT, f"x dtype must be one of {tuple(_LIMIT)}, got {x.dtype}")
    _check(act in ACTS, f"act must be one of {tuple(ACTS)}, got {act!r}")
    b = blocks1.shape[-1]
    _check(blocks2.shape[-1] == b, f"W1 and W2 have different block sizes ({b}, {blocks2.shape[-1]})")
    _check(blocks1.dtype == x.dtype and blocks2.dtype == x.dtype, "blocks must be in x's dtype")
    _check(row_ptr1.numel() == math.ceil(h / b) + 1, f"W1 has {row_ptr1.numel() - 1} block rows, h={h}")
    _check(row_order2.numel() == math.ceil(n / b), f"W2 has {row_order2.numel()} block rows, n={n}")
    _check(bias1 is None or bias1.shape == (h,), f"bias1 must be [{h}]")
    _check(x.device.type == "cuda" or INTERPRETING,
           f"x is on {x.device}: CPU tensors need TRITON_INTERPRET=1 set before this module is imported")
    m, k = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = config or pick_config(b, m)
    if not exact:
        flag, safe = None, 0.0  # (no exact path: the threshold is not read)
    elif flag is None:
        flag = row_flag(x)
    if safe is None:  # (reads the weights on the host: pass it when capturing a CUDA graph)
        safe = safe_bound(blocks1, row_ptr1, bias1, x.dtype)
    if allow_tf32 is None:
        allow_tf32 = _default_allow_tf32()
    grid = (row_order2.numel(), triton.cdiv(m, cfg.block_m))
    _block_mlp_kernel[grid](
        x, blocks1, row_ptr1, col_idx1, bias1 if bias1 is not None else y,
        blocks2, row_ptr2, col_idx2, row_order2, flag if flag is not None else y, y,
        m, n, k, h, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        SAFE=float(safe), BLOCK_M=cfg.block_m, B=b, HAS_BIAS1=bias1 is not None, ACT=ACTS[act],
        HAS_FLAG=flag is not None, ALLOW_TF32=bool(allow_tf32) and x.dtype == torch.float32,
        DOT_FP32=x.dtype == torch.bfloat16 and INTERPRETING,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


# ----------------------------------------------------------------------------------------------
# Inductor template
# ----------------------------------------------------------------------------------------------

_TEMPLATE_BODY = HEAD_X_MNK + r'''    rb = tl.load(ROW_ORDER2 + tl.program_id(0))
    pid_m = tl.program_id(1)
    acc = block_mlp_acc(X, BLOCKS1, ROW_PTR1, COL_IDX1, @BIAS1@, BLOCKS2, ROW_PTR2, COL_IDX2, @FLAG@,
                        rb, pid_m, M, K, H, stride_xm, stride_xk,
                        SAFE, BLOCK_M, B, HAS_BIAS1, ACT, HAS_FLAG, ALLOW_TF32, False)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = rb * B + tl.arange(0, B)
    idx_m = offs_m[:, None]
    idx_n = offs_n[None, :]
    mask = (idx_m < M) & (idx_n < N)
    {{store_output(("idx_m", "idx_n"), "acc", "mask", val_shape=("BLOCK_M", "B"))}}
'''

TEMPLATE_NAME = "sparse_inductor_block_mlp"


def _template_body(has_bias1: bool, has_flag: bool) -> str:
    inputs = ['"X"', '"BLOCKS1"', '"ROW_PTR1"', '"COL_IDX1"'] + (['"BIAS1"'] if has_bias1 else []) + \
        ['"BLOCKS2"', '"ROW_PTR2"', '"COL_IDX2"', '"ROW_ORDER2"'] + (['"FLAG"'] if has_flag else [])
    return (_TEMPLATE_BODY.replace("@INPUTS@", ", ".join(inputs))
            .replace("@BIAS1@", "BIAS1" if has_bias1 else "X").replace("@FLAG@", "FLAG" if has_flag else "X"))


def _grid():
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.select_algorithm import SymbolicGridFn

    @SymbolicGridFn
    def grid(m, n, meta, *, cdiv):
        return (cdiv(n, meta["B"]), cdiv(m, meta["BLOCK_M"]), 1)

    return grid


def template(has_bias1: bool, has_flag: bool):
    name = f"{TEMPLATE_NAME}{'_b' if has_bias1 else ''}{'_f' if has_flag else ''}"
    return get_template(name, lambda: template_source(DEVICE_FUNCTIONS, _template_body(has_bias1, has_flag)), _grid())


def lower(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2, flag, *,
          h: int, n: int, act: str, safe: float):
    """Inductor lowering of sparse_inductor::mlp_block (without b2) to the template, one choice."""
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.ir import FixedLayout
    from torch._inductor.select_algorithm import autotune_select_algorithm, realize_inputs

    nodes = [x, blocks1, row_ptr1, col_idx1] + ([bias1] if bias1 is not None else []) + \
        [blocks2, row_ptr2, col_idx2, row_order2] + ([flag] if flag is not None else [])
    inputs = list(realize_inputs(*nodes))
    x = inputs[0]
    m = x.get_size()[0]
    b = int(blocks1.get_size()[-1])
    cfg = pick_config(b, inductor_size_hint(m, 64))
    layout = FixedLayout(x.get_device(), x.get_dtype(), [m, n])
    choices: list = []
    err = template(bias1 is not None, flag is not None).maybe_append_choice(
        choices, input_nodes=inputs, layout=layout, num_stages=cfg.num_stages, num_warps=cfg.num_warps,
        SAFE=float(safe), BLOCK_M=cfg.block_m, B=b, H=h, HAS_BIAS1=bias1 is not None, ACT=ACTS[act],
        HAS_FLAG=flag is not None, ALLOW_TF32=_default_allow_tf32() and x.get_dtype() == torch.float32)
    if err is not None or not choices:
        raise RuntimeError(f"block MLP template rejected the layers: {err}")
    return autotune_select_algorithm("sparse_inductor_block_mlp", choices, inputs, layout)
