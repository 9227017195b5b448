"""The non-finite row check as a kernel of its own: g[m] = sum_k 0 * x[m, k] in fp32 (0 for a
finite row, NaN for a row holding a NaN or Inf), the op sparse_inductor::row_check.

Why a kernel of its own. The zero-skipping linears (cuSPARSELt, the block-sparse template) need g
to give dense's non-finite rows back (passes/linear_rewrite._row_check). Written as Inductor ops
(mul, sum) the check fuses with x's producer. That is free where the producer is a reduction (a
LayerNorm: one more sum over a row it reads anyway), and costly where it is a pointwise op:
- after one of our Triton templates (the block-sparse fc1 of a ViT), Inductor moves the GELU out
  of the template's epilogue into the check's reduction kernel: on the H200, ViT-B/16 b64 with 90%
  block-sparse MLPs, fc1's template without its GELU plus the GELU + check kernel took 48.7 + 93.5
  us a layer, where the template with the GELU took 88.7 (docs/benchmarks.md J1);
- after an extern kernel (a cuSPARSELt fc1), the GELU kernel becomes a reduction kernel: +27-35
  us a layer against the GELU alone (run I4), where one more read of x is ~20.
Here the check is a TritonTemplate: Inductor fuses nothing into its loads (no prologue fusion:
the kernel reads X through its own pointers), so x's producer keeps its own kernel (or the
template epilogue it was), and the check is one read of x. The rewrite uses this op where x's
producer is not a reduction (linear_rewrite._row_check_mode "separate"); the dispatcher times it
as one more pass over x.

    row_check(x [M, K]) -> g [M] fp32

Eager (CPU, the reference, the interpreter tests): `row_check_eager` launches the same device
function; on the CPU, Inductor lowers the op to its own mul + sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["DEVICE_FUNCTIONS", "row_check_acc", "row_check_eager", "pick_config", "inductor_ops", "lower"]


@triton.jit
def row_check_acc(x_ptr, pid_m, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M]: sum over k of 0 * x[m, k] for the rows pid_m * BLOCK_M.. (0 or NaN); rows at or
    beyond M give 0."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    mask_m = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        v = tl.load(rows + k[None, :] * stride_xk, mask=mask_m & (k[None, :] < K), other=0.0)
        acc += v.to(tl.float32) * 0.0
    return tl.sum(acc, axis=1)


DEVICE_FUNCTIONS = (row_check_acc,)


@triton.jit
def _row_check_kernel(x_ptr, g_ptr, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    g = row_check_acc(x_ptr, pid_m, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(g_ptr + offs_m, g, mask=offs_m < M)


# Programs the grid should have at least (two per SM of a 132-SM H100 / H200) before rows share one.
MIN_PROGRAMS = 264


def pick_config(k: int, m: int | None = None) -> dict:
    """BLOCK_M rows a program, BLOCK_K columns a step: a [BLOCK_M, BLOCK_K] tile of at most 4096
    elements (16 a thread at 8 warps). Rows share a program only while the grid keeps MIN_PROGRAMS
    (m: the row count, or None when unknown); a row alone takes up to 4096 columns a step (small M:
    one step per row, not a loop: M = 16, K = 4096 ran 1.4 us slower with 4 rows of 1024 columns a
    program, run J). A plain stream over x, otherwise a guess: not swept."""
    block_k = min(max(triton.next_power_of_2(k), 16), 1024)
    block_m = max(4096 // block_k, 1)
    if m is not None:
        while block_m > 1 and triton.cdiv(m, block_m) < MIN_PROGRAMS:
            block_m //= 2
    if block_m == 1:
        block_k = min(max(triton.next_power_of_2(k), 16), 4096)
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=8 if block_m * block_k >= 2048 else 4, num_stages=2)


def row_check_eager(x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """g [M] fp32 of a 2-D x by the Triton kernel (the interpreter on the CPU); config: pick_config's
    keys, by default pick_config(K, M)."""
    if x.dim() != 2:
        raise ValueError(f"row_check expects a 2-D input, got {x.dim()}-D")
    m, k = x.shape
    g = torch.empty(m, device=x.device, dtype=torch.float32)
    if m == 0:
        return g
    cfg = config or pick_config(k, m)
    _row_check_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x, g, m, k, x.stride(0), x.stride(1), BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"])
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

TEMPLATE_NAME = "sparse_inductor_row_check"


def _grid():
    from torch._inductor.select_algorithm import SymbolicGridFn

    @SymbolicGridFn
    def grid(m, meta, *, cdiv):
        return (cdiv(m, meta["BLOCK_M"]), 1, 1)

    return grid


def template():
    from .template import get_template, template_source

    return get_template(TEMPLATE_NAME, lambda: template_source(DEVICE_FUNCTIONS, _TEMPLATE_BODY), _grid())


def inductor_ops(x):
    """The check as Inductor ops (mul, sum), in a lowering: a reduction that fuses with x's producer
    (a norm's kernel), on CUDA where the rewrite keeps the check there, and on the CPU."""
    from torch._inductor.lowering import lowerings

    aten = torch.ops.aten
    return lowerings[aten.sum.dim_IntList](lowerings[aten.mul.Tensor](x, 0.0), [1], False, dtype=torch.float32)


def lower(x):
    """Inductor lowering of sparse_inductor::row_check on CUDA: the template, one choice."""
    from torch._inductor.ir import FixedLayout
    from torch._inductor.select_algorithm import autotune_select_algorithm, realize_inputs

    from .._compat import inductor_size_hint, static_int

    x = realize_inputs(x)  # (one argument: one node back)
    m, k = x.get_size()
    # a dynamic M (symbolic) is sized for any M, not for the hint it was traced at
    cfg = pick_config(inductor_size_hint(k, 4096), static_int(m))
    layout = FixedLayout(x.get_device(), torch.float32, [m])
    choices: list = []
    err = template().maybe_append_choice(choices, input_nodes=(x,), layout=layout, num_stages=cfg["num_stages"],
                                         num_warps=cfg["num_warps"], BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"])
    if err is not None or not choices:
        raise RuntimeError(f"row-check template rejected the input: {err}")
    return autotune_select_algorithm("sparse_inductor_row_check", choices, [x], layout)
