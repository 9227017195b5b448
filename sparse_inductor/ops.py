"""The project's sparse linear ops (torch.library custom ops), with fakes and reference kernels.

Both compute y = x @ W^T + bias for a 2-D x [M, K], exactly as F.linear on the dense weight would:
the reference implementations decompress W and call F.linear, on CPU and CUDA alike. Fast kernels
plug in behind the same ops through Inductor lowerings (sparse_inductor/lowering/), chosen by the
`kernel` argument that the rewrite pass writes into the graph.

    sparse_inductor::linear_24(x, values, meta, bias, kernel, x_index=None) -> y [M, N]
        values [2, N, K/4] (x's dtype, or int8 for a weight-only quantized W: y = x @ W_int^T, the
        scales stay in the graph after the op), meta [ceil(N/2), K/4] uint8 (formats/sparse24.py)
    sparse_inductor::linear_block(x, blocks, row_ptr, col_idx, row_order, bias, n, k, kernel, guard=True) -> y [M, N]
        blocks [nnzb, b, b], row_ptr [Nb+1], col_idx [nnzb], row_order [Nb] int32 (formats/block.py);
        guard=False (options nonfinite="fast") lets a fast kernel skip its non-finite row check: an
        input NaN/Inf that meets only skipped (all-zero) blocks may then leave those outputs finite
    sparse_inductor::linear_cslt(x, wc, bias, n, k, alg_id, split_k, out_dtype=None, alpha=None,
                                 row_check=None, activation=None) -> y [M, N]
        wc = torch._cslt_compress(W), cuSPARSELt's own layout (CUDA only; runtime/cusparselt.py);
        x and W int8 with out_dtype=torch.int32 is torch._int_mm(x, W^T) (dynamic int8 activations);
        alpha: an fp32 [N] vector scaling the fp32/int32 accumulator before the bias
        (y = alpha * (x @ W^T) + bias, one rounding; not taken by cuSPARSELt 0.8 for fp8);
        x and W fp8 e4m3 (torch._scaled_mm rewritten): out_dtype bf16/fp32, the unscaled product
        (the graph applies the scales after it: docs/formats.md, "fp8");
        row_check: g [M] fp32, g[m] = sum_k 0 * x[m, k] (NaN for an input row holding a NaN/Inf): those
        rows of y become NaN, as dense makes them (the library skips the zeros a NaN would meet); the
        rewrite passes it only where no pointwise op follows (else y * (1 + g) in the graph);
        activation: "relu" / "gelu", the library's epilogue activation after the bias, where it
        computes the graph's (passes/lib_activation.py)
    sparse_inductor::row_check(x, maybe=None) -> g [M] fp32
        g[m] = sum_k 0 * x[m, k]: 0 for a finite row, NaN for a row holding a NaN/Inf; the check
        above (and linear_block's row_check=) as a kernel of its own, which Inductor fuses nothing
        into (lowering/row_check.py says when the rewrite uses it). With maybe [M] fp32 (0 or NaN):
        g[m] as above where maybe[m] is NaN, 0 elsewhere, and only those rows of x are read
        (passes/derived_check.py: fc2's check behind a cheaper one over fc1's input)
    linear_block(..., guard=True, row_check=g): the block kernel takes g from the graph instead of
        computing it in its lowering (which fuses with x's producer)
    linear_block(..., live=L, skip_check=s): the block rows row_order[L:] of y are unspecified (the
        template leaves them unwritten) except in the M tiles where s [M] fp32 (0 or NaN) holds a
        NaN (s None: everywhere); passes/fuse_mlp.py sets it for hidden units nothing reads
    linear_24(..., x_index=xi), linear_block(..., x_index=xi, out_index=oi): a weight behind a
        permutation (formats/permute.py): the compressed weight Wp is W[oi][:, xi] (xi [K], oi [N]
        int32 permutations; None: the identity), and the op computes y = x @ W^T + bias as for W:
        its kernels read x[:, xi[k']] for Wp's column k' and write Wp's row n' to y[:, oi[n']]
        (bias in y's own order). The reference implementations un-permute Wp into W, so they do
        dense's arithmetic on W's values
    sparse_inductor::mlp_block(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2,
                               row_order2, bias2, h, n, act, kernel, safe=0.0, flag=None) -> y [M, n]
        linear_block(act(linear_block(x, W1, bias1)), W2, bias2) for W1 [h, K] and W2 [n, h] in the
        block layout, act one of "none", "relu", "gelu" (erf), "silu", fc1's output rounded to x's
        dtype as the two layers compute it (passes/fuse_mlp.py makes it; lowering/block_mlp.py is
        its kernel); flag [M] fp32 (block_mlp.row_flag(x)) with safe (block_mlp.safe_bound) picks
        the kernel's exact path for the rows that need it; flag None: the fast path everywhere

OpArgs reads a call's arguments by their schema's names (this module's ops and aten's alike):
`OpArgs(op, args, kwargs).bias`; passes/graph.args_of(node) reads a graph node's.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import ACTIVATIONS
from .formats import decompress_24, decompress_block
from .runtime import cusparselt

__all__ = ["linear_24", "linear_block", "linear_cslt", "mlp_block", "row_check", "OpArgs", "unpermute"]


def unpermute(wp: Tensor, x_index: Optional[Tensor], out_index: Optional[Tensor]) -> Tensor:
    """W with W[out_index][:, x_index] = wp (None: the identity)."""
    if out_index is not None:
        w = torch.empty_like(wp)
        w[out_index.to(device=wp.device, dtype=torch.long)] = wp
        wp = w
    if x_index is not None:
        w = torch.empty_like(wp)
        w[:, x_index.to(device=wp.device, dtype=torch.long)] = wp
        wp = w
    return wp


@torch.library.custom_op("sparse_inductor::linear_24", mutates_args=())
def linear_24(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor], kernel: str,
              x_index: Optional[Tensor] = None) -> Tensor:
    w = decompress_24(values, meta).to(x.dtype)  # int8 values (weight-only quantized): their integers
    return F.linear(x, unpermute(w, x_index, None), bias)


@linear_24.register_fake
def _(x, values, meta, bias, kernel, x_index=None):
    torch._check(x.dim() == 2, lambda: f"linear_24 expects a 2-D input, got {x.dim()}-D")
    torch._check(x.shape[1] == values.shape[2] * 4, lambda: "linear_24: K mismatch between x and values")
    return x.new_empty(x.shape[0], values.shape[1])


@torch.library.custom_op("sparse_inductor::linear_block", mutates_args=())
def linear_block(
    x: Tensor, blocks: Tensor, row_ptr: Tensor, col_idx: Tensor, row_order: Tensor,
    bias: Optional[Tensor], n: int, k: int, kernel: str, guard: bool = True, row_check: Optional[Tensor] = None,
    live: int = -1, skip_check: Optional[Tensor] = None, x_index: Optional[Tensor] = None,
    out_index: Optional[Tensor] = None,
) -> Tensor:
    # (live / skip_check allow the template to leave tiles unwritten; computing them is always right)
    w = decompress_block(blocks, row_ptr, col_idx, n, k).to(x.dtype)  # int8 blocks: their integers
    return F.linear(x, unpermute(w, x_index, out_index), bias)


@linear_block.register_fake
def _(x, blocks, row_ptr, col_idx, row_order, bias, n, k, kernel, guard=True, row_check=None, live=-1,
      skip_check=None, x_index=None, out_index=None):
    torch._check(x.dim() == 2, lambda: f"linear_block expects a 2-D input, got {x.dim()}-D")
    torch._check(x.shape[1] == k, lambda: "linear_block: K mismatch between x and the weight")
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("sparse_inductor::linear_cslt", mutates_args=())
def linear_cslt(x: Tensor, wc: Tensor, bias: Optional[Tensor], n: int, k: int, alg_id: int, split_k: int,
                out_dtype: Optional[torch.dtype] = None, alpha: Optional[Tensor] = None,
                row_check: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    kw = {} if activation is None else {"activation": activation}
    y = cusparselt.linear(x, wc, bias, n, k, alg_id, split_k, out_dtype, alpha, **kw)
    return y if row_check is None else cusparselt.nan_rows_(y, row_check)


@linear_cslt.register_fake
def _(x, wc, bias, n, k, alg_id, split_k, out_dtype=None, alpha=None, row_check=None, activation=None):
    torch._check(x.dim() == 2, lambda: f"linear_cslt expects a 2-D input, got {x.dim()}-D")
    torch._check(x.shape[1] == k, lambda: "linear_cslt: K mismatch between x and the weight")
    torch._check(alpha is None or (alpha.dim() == 1 and alpha.shape[0] == n),
                 lambda: "linear_cslt: alpha must be a vector of N scales")
    return x.new_empty(x.shape[0], n, dtype=out_dtype or x.dtype)


@torch.library.custom_op("sparse_inductor::row_check", mutates_args=())
def row_check(x: Tensor, maybe: Optional[Tensor] = None) -> Tensor:
    g = (x * 0).to(torch.float32).sum(-1)
    return g if maybe is None else torch.where(maybe.isnan(), g, 0.0)


@row_check.register_fake
def _(x, maybe=None):
    torch._check(x.dim() == 2, lambda: f"row_check expects a 2-D input, got {x.dim()}-D")
    torch._check(maybe is None or (maybe.dim() == 1 and maybe.dtype == torch.float32),
                 lambda: "row_check: maybe must be a 1-D float32 tensor")
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("sparse_inductor::mlp_block", mutates_args=())
def mlp_block(
    x: Tensor, blocks1: Tensor, row_ptr1: Tensor, col_idx1: Tensor, bias1: Optional[Tensor],
    blocks2: Tensor, row_ptr2: Tensor, col_idx2: Tensor, row_order2: Tensor, bias2: Optional[Tensor],
    h: int, n: int, act: str, kernel: str, safe: float = 0.0, flag: Optional[Tensor] = None,
) -> Tensor:
    w1 = decompress_block(blocks1, row_ptr1, col_idx1, h, x.shape[1]).to(x.dtype)
    w2 = decompress_block(blocks2, row_ptr2, col_idx2, n, h).to(x.dtype)
    return F.linear(ACTIVATIONS[act].eager(F.linear(x, w1, bias1)), w2, bias2)


@mlp_block.register_fake
def _(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2, bias2, h, n, act, kernel,
      safe=0.0, flag=None):
    torch._check(x.dim() == 2, lambda: f"mlp_block expects a 2-D input, got {x.dim()}-D")
    torch._check(act in ACTIVATIONS and ACTIVATIONS[act].code is not None,
                 lambda: f"mlp_block: unknown activation {act!r}")
    return x.new_empty(x.shape[0], n)


class OpArgs:
    """The arguments of one call of an op (an OpOverload) by the names of its schema: those given,
    positional or keyword, and the others at their defaults. Read-only: `a = OpArgs(op, args,
    kwargs); a.bias, a.kernel`."""

    __slots__ = ("_op", "_values")

    def __init__(self, op: Any, args: tuple, kwargs: dict):
        names, defaults = _schema(op)
        values = dict(defaults)
        values.update(zip(names, args))
        values.update(kwargs)
        object.__setattr__(self, "_op", op)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self._op} has no argument {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("OpArgs is read-only (passes/graph.set_args changes a node's)")


@functools.lru_cache(maxsize=None)
def _schema(op: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(argument names in order, defaults of those that have one) of an op's schema."""
    args = op._schema.arguments
    return tuple(a.name for a in args), {a.name: a.default_value for a in args if a.has_default_value()}


def arg_index(op: Any, name: str) -> int:
    """The position of argument `name` in op's schema."""
    return _schema(op)[0].index(name)
