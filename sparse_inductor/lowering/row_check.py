"""The non-finite row check as a kernel of its own: g[m] = sum_k 0 * x[m, k] in fp32 (0 for a
finite row, NaN for a row holding a NaN or Inf), the op sparse_inductor::row_check.

Why a kernel of its own. The zero-skipping linears (cuSPARSELt, the block-sparse template) need g
to give dense's non-finite rows back (passes/row_checks.row_check). Written as Inductor ops
(mul, sum) the check fuses with x's producer. That is free where the producer is a reduction (a
LayerNorm: one more sum over a row it reads anyway), and costly where it is a pointwise op:
- after one of our Triton templates (the block-sparse fc1 of a ViT), Inductor moves the GELU out
  of the template's epilogue into the check's reduction kernel: on the H200, ViT-B/16 b64 with 90%
  block-sparse MLPs, fc1's template without its GELU plus the GELU + check kernel took 48.7 + 93.5
  us a layer, where the template with the GELU took 88.7 (docs/performance.md);
- after an extern kernel (a cuSPARSELt fc1), the GELU kernel becomes a reduction kernel: +27-35
  us a layer against the GELU alone, where one more read of x is ~20 (H200, ViT-B/16 b64).
Here the check is a TritonTemplate: Inductor fuses nothing into its loads (no prologue fusion:
the kernel reads X through its own pointers), so x's producer keeps its own kernel (or the
template epilogue it was), and the check is one read of x. The rewrite uses this op where x's
producer is not a reduction (passes/row_checks.check_mode "separate"); the dispatcher times it
as one more pass over x.

    row_check(x [M, K]) -> g [M] fp32
    row_check(x [M, K], maybe [M] fp32) -> g: g[m] as above where maybe[m] is NaN, else 0; only those
        rows of x are read (passes/derived_check.py: where a cheaper check elsewhere, maybe, says
        which rows of x may hold a NaN/Inf, this confirms them)

Eager (CPU, the reference, the interpreter tests): `row_check_eager` launches the same device
function; on the CPU, Inductor lowers the op to its own mul + sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._compat import inductor_size_hint, static_int
from .template import get_template, template_source

__all__ = ["DEVICE_FUNCTIONS", "row_check_acc", "row_check_eager", "pick_config", "inductor_ops", "lower"]


@triton.jit
def row_check_rows(x_ptr, offs_m, mask_m, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M]: sum over k of 0 * x[m, k] for the rows offs_m (0 or NaN); rows where mask_m is
    False are not read and give 0."""
    offs_k = tl.arange(0, BLOCK_K)
    rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        v = tl.load(rows + k[None, :] * stride_xk, mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
        acc += v.to(tl.float32) * 0.0
    return tl.sum(acc, axis=1)


@triton.jit
def row_check_acc(x_ptr, pid_m, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M]: sum over k of 0 * x[m, k] for the rows pid_m * BLOCK_M.. (0 or NaN); rows at or
    beyond M give 0."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return row_check_rows(x_ptr, offs_m, offs_m < M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K)


@triton.jit
def row_check_flagged(x_ptr, maybe_ptr, pid_m, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """row_check_acc in the rows whose maybe[m] is NaN, 0 in the others, which are not read: a
    program whose rows are all unflagged (the common case) reads BLOCK_M numbers of maybe only."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mv = tl.load(maybe_ptr + offs_m, mask=offs_m < M, other=0.0)
    bad = (mv != mv) & (offs_m < M)
    g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if tl.sum(bad.to(tl.int32), axis=0) > 0:  # rare; uniform over the program
        g = row_check_rows(x_ptr, offs_m, bad, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K)
    return g


DEVICE_FUNCTIONS = (row_check_rows, row_check_acc, row_check_flagged)


@triton.jit
def _row_check_kernel(x_ptr, maybe_ptr, g_ptr, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr, HAS_MAYBE: tl.constexpr):
    pid_m = tl.program_id(0)
    if HAS_MAYBE:
        g = row_check_flagged(x_ptr, maybe_ptr, pid_m, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K)
    else:
        g = row_check_acc(x_ptr, pid_m, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(g_ptr + offs_m, g, mask=offs_m < M)


# Programs the grid should have at least (two per SM of a 132-SM H100 / H200) before rows share one.
MIN_PROGRAMS = 264


# Rows a program with `maybe` (row_check_flagged): it reads their maybe numbers and, rarely, x
FLAGGED_ROWS = 64


def pick_config(k: int, m: int | None = None, flagged: bool = False) -> dict:
    """BLOCK_M rows a program, BLOCK_K columns a step: a [BLOCK_M, BLOCK_K] tile of at most 4096
    elements (16 a thread at 8 warps). Rows share a program only while the grid keeps MIN_PROGRAMS
    (m: the row count, or None when unknown); a row alone takes up to 4096 columns a step (small M:
    one step per row, not a loop: M = 16, K = 4096 ran 1.4 us slower with 4 rows of 1024 columns a
    program on the H200). A plain stream over x: on the H200 these configs ran within 2-6% of the
    best of a grid of tile shapes (8192x14336: 66.4 us, 3.5 TB/s; docs/performance.md).
    flagged (the op's `maybe`): FLAGGED_ROWS rows a program (fewer where m is smaller), since most
    programs read only maybe; a guess, not timed."""
    if flagged:
        block_m = FLAGGED_ROWS if m is None else min(FLAGGED_ROWS, triton.next_power_of_2(max(m, 1)))
        block_k = max(16, min(triton.next_power_of_2(max(k, 1)), 4096 // block_m))
        return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4, num_stages=2)
    block_k = min(max(triton.next_power_of_2(k), 16), 1024)
    block_m = max(4096 // block_k, 1)
    if m is not None:
        while block_m > 1 and triton.cdiv(m, block_m) < MIN_PROGRAMS:
            block_m //= 2
    if block_m == 1:
        block_k = min(max(triton.next_power_of_2(k), 16), 4096)
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=8 if block_m * block_k >= 2048 else 4, num_stages=2)


def row_check_eager(x: torch.Tensor, config: dict | None = None, maybe: torch.Tensor | None = None) -> torch.Tensor:
    """g [M] fp32 of a 2-D x by the Triton kernel (the interpreter on the CPU); config: pick_config's
    keys, by default pick_config(K, M); maybe: the op's (g only in the rows where it is NaN)."""
    if x.dim() != 2:
        raise ValueError(f"row_check expects a 2-D input, got {x.dim()}-D")
    m, k = x.shape
    if maybe is not None and (maybe.shape != (m,) or maybe.dtype != torch.float32):
        raise ValueError(f"row_check: maybe must be float32 [{m}], got {maybe.dtype} {tuple(maybe.shape)}")
    g = torch.empty(m, device=x.device, dtype=torch.float32)
    if m == 0:
        return g
    cfg = config or pick_config(k, m, flagged=maybe is not None)
    _row_check_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x, g if maybe is None else maybe.contiguous(), g, m, k, x.stride(0), x.stride(1), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"], HAS_MAYBE=maybe is not None, num_warps=cfg["num_warps"])
    return g


_TEMPLATE_BODY = r'''
{{def_kernel("X")}}
    M = {{size("X", 0)}}
    K = {{size("X", 1)}}
    stride_xm = {{stride("X", 0)}}
    stride_xk = {{stride("X", 1)}}
    pid_m = tl.program_id(0)
    g = row_check_acc(X, pid_m, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K)
    idx_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = idx_m < M
    {{store_output(("idx_m",), "g", "mask", val_shape=("BLOCK_M",))}}
'''
# with maybe: the same, the rows read only where maybe is NaN
_FLAGGED_BODY = _TEMPLATE_BODY.replace('def_kernel("X")', 'def_kernel("X", "MAYBE")').replace(
    "row_check_acc(X, pid_m,", "row_check_flagged(X, MAYBE, pid_m,")

TEMPLATE_NAME = "sparse_inductor_row_check"


def _grid():
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.select_algorithm import SymbolicGridFn

    @SymbolicGridFn
    def grid(m, meta, *, cdiv):
        return (cdiv(m, meta["BLOCK_M"]), 1, 1)

    return grid


def template(flagged: bool = False):
    name = TEMPLATE_NAME + ("_flagged" if flagged else "")
    body = _FLAGGED_BODY if flagged else _TEMPLATE_BODY
    return get_template(name, lambda: template_source(DEVICE_FUNCTIONS, body), _grid())


def inductor_ops(x, maybe=None):
    """The check as Inductor ops (mul, sum; with maybe, where(maybe is NaN, that, 0), which reads all
    of x), in a lowering: a reduction that fuses with x's producer (a norm's kernel), on CUDA where
    the rewrite keeps the check there, and on the CPU."""
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.lowering import lowerings

    aten = torch.ops.aten
    g = lowerings[aten.sum.dim_IntList](lowerings[aten.mul.Tensor](x, 0.0), [1], False, dtype=torch.float32)
    if maybe is None:
        return g
    return lowerings[aten.where.self](lowerings[aten.isnan.default](maybe), g, 0.0)


def lower(x, maybe=None):
    """Inductor lowering of sparse_inductor::row_check on CUDA: the template, one choice."""
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.ir import FixedLayout
    from torch._inductor.select_algorithm import autotune_select_algorithm, realize_inputs


    inputs = [realize_inputs(x)] if maybe is None else list(realize_inputs(x, maybe))
    x = inputs[0]
    m, k = x.get_size()
    # a dynamic M (symbolic) is sized for any M, not for the hint it was traced at
    cfg = pick_config(inductor_size_hint(k, 4096), static_int(m), flagged=maybe is not None)
    layout = FixedLayout(x.get_device(), torch.float32, [m])
    choices: list = []
    err = template(maybe is not None).maybe_append_choice(
        choices, input_nodes=tuple(inputs), layout=layout, num_stages=cfg["num_stages"], num_warps=cfg["num_warps"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"])
    if err is not None or not choices:
        raise RuntimeError(f"row-check template rejected the input: {err}")
    return autotune_select_algorithm("sparse_inductor_row_check", choices, inputs, layout)
