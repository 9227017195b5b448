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
    sparse_inductor::linear_cutlass(x, values, meta, bias, n, k, config, out_dtype=None, activation=None,
                                    gate=None, residual=False, aux=None, weight_scale=None, token_scale=None,
                                    row_check=None) -> y [M, N]
        CUTLASS's sm90 2:4 GEMM with its epilogue (lowering/cutlass_24.py; on CUDA the generated
        library, elsewhere the reference below), computed in fp32 and rounded once to out_dtype
        (None: x's dtype; 8-bit x needs bf16 / fp16 / fp32):
            v = (x @ W^T) * token_scale[m] * weight_scale[n] + bias[n]
            v = activation(v)                 "relu" | "gelu" | "gelu_tanh" | "silu" (activations.py)
            v = silu(v) * aux | v * silu(aux) gate "silu_acc" | "silu_aux" (a Llama MLP's w1 | w3)
            v = v + aux                       residual=True
        values / meta: formats/cutlass_sm90.compress(W, tile K) for the config's tile K; config:
        cutlass_24.config_tag (the tile first, e.g. "128x16x128_1x1_warpspecialized"); x int8 or
        float8_e4m3fn with W of its dtype (torch._int_mm / torch._scaled_mm rewritten); a scale is
        a 0-dim tensor (one number) or a vector (fp32 [M] / [N]); aux [M, N] (gate or residual).
        The tensor cores multiply only the stored values (two of each four, a half-empty group's
        zero among them): an input NaN/Inf meeting only pruned zeros leaves those outputs finite,
        so the reference computes that too. row_check g [M] fp32 (0 or NaN): the rows where g is
        NaN become NaN, as dense makes them (it rides in the token scale: v * (1 + g)).
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
from .formats import cutlass_sm90, decompress_24, decompress_block
from .runtime import cusparselt

__all__ = ["linear_24", "linear_block", "linear_cslt", "linear_cutlass", "cutlass_reference", "mlp_block",
           "row_check", "OpArgs", "unpermute"]


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


_CUTLASS_OUT = (torch.bfloat16, torch.float16, torch.float32)
_CUTLASS_GATES = (None, "silu_acc", "silu_aux")
_CUTLASS_ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")


def _cutlass_tile_k(config: str) -> int:
    """The metadata layout's tile K of a config tag (its first field is the CTA tile MxNxK)."""
    try:
        return cutlass_sm90.layout_tile_k(int(config.split("_")[0].split("x")[2]))
    except (ValueError, IndexError):
        raise ValueError(f"linear_cutlass: config {config!r} does not start with a tile MxNxK") from None


def _tensor_core_product(x: Tensor, values: Tensor, meta: Tensor, n: int, k: int, tile_k: int) -> Tensor:
    """fp32 [M, N]: x @ W^T over the stored slots only, as the sparse tensor cores compute it: a NaN
    or Inf of x meets the stored values (a half-empty group's zero among them: 0 * Inf is NaN) and
    never the pruned zeros. The finite part is one matmul; the non-finite entries of x, where there
    are any, are counted against the stored slots by sign (0/1 matmuls: exact) and added."""
    w = cutlass_sm90.decompress(values, meta, n, k, tile_k)
    exact = torch.float64 if x.dtype == torch.int8 else torch.float32  # (an int8 sum, rounded once to fp32)
    xf, wf = x.to(exact), w.to(exact)
    finite = torch.isfinite(xf)
    acc = torch.where(finite, xf, 0.0) @ wf.t()
    if not x.dtype.is_floating_point or (x.device.type == "cpu" and bool(finite.all())):
        return acc.to(torch.float32)
    vals, idx = cutlass_sm90.selected_positions(values, meta, n, k, tile_k)
    stored = torch.zeros(n, k, dtype=torch.bool, device=x.device)
    stored[torch.arange(n, device=x.device).view(-1, 1).expand_as(idx), idx] = True
    pos, neg = (stored & (wf > 0)).float(), (stored & (wf < 0)).float()
    nan_w = (stored & ~(wf > 0) & ~(wf < 0)).float()  # a stored zero (or NaN): Inf * it is NaN
    x_nan, x_pos, x_neg = torch.isnan(xf).float(), torch.isposinf(xf).float(), torch.isneginf(xf).float()
    nan = (x_nan @ stored.float().t() + (x_pos + x_neg) @ nan_w.t()) > 0
    up = (x_pos @ pos.t() + x_neg @ neg.t()) > 0
    down = (x_pos @ neg.t() + x_neg @ pos.t()) > 0
    inf = torch.where(nan | (up & down), float("nan"), torch.where(up, float("inf"), torch.where(down, float("-inf"), 0.0)))
    return torch.where(nan | up | down, acc + inf, acc).to(torch.float32)


def cutlass_reference(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor], n: int, k: int, config: str,
                      out_dtype: Optional[torch.dtype] = None, activation: Optional[str] = None,
                      gate: Optional[str] = None, residual: bool = False, aux: Optional[Tensor] = None,
                      weight_scale: Optional[Tensor] = None, token_scale: Optional[Tensor] = None,
                      row_check: Optional[Tensor] = None) -> Tensor:
    """linear_cutlass computed with torch ops on any device, in the op's dtypes: the tensor cores'
    product in fp32, the epilogue in fp32 in the kernel's order, one rounding."""
    v = _tensor_core_product(x, values, meta, n, k, _cutlass_tile_k(config))
    if token_scale is not None:
        v = v * token_scale.to(torch.float32).reshape(-1, 1)
    if row_check is not None:
        v = v * (row_check.to(torch.float32).reshape(-1, 1) + 1)
    if weight_scale is not None:
        v = v * weight_scale.to(torch.float32).reshape(1, -1)
    if bias is not None:
        v = v + bias.to(torch.float32)
    if activation is not None:
        v = ACTIVATIONS[activation].fn(v)
    silu = ACTIVATIONS["silu"].fn
    if gate == "silu_acc":
        v = silu(v) * aux.to(torch.float32)
    elif gate == "silu_aux":
        v = v * silu(aux.to(torch.float32))
    if residual:
        v = v + aux.to(torch.float32)
    return v.to(out_dtype or x.dtype)


@torch.library.custom_op("sparse_inductor::linear_cutlass", mutates_args=())
def linear_cutlass(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor], n: int, k: int, config: str,
                   out_dtype: Optional[torch.dtype] = None, activation: Optional[str] = None,
                   gate: Optional[str] = None, residual: bool = False, aux: Optional[Tensor] = None,
                   weight_scale: Optional[Tensor] = None, token_scale: Optional[Tensor] = None,
                   row_check: Optional[Tensor] = None) -> Tensor:
    # (lowering/cutlass_24.py registers the CUDA implementation: the generated library)
    return cutlass_reference(x, values, meta, bias, n, k, config, out_dtype, activation, gate, residual, aux,
                             weight_scale, token_scale, row_check)


@linear_cutlass.register_fake
def _(x, values, meta, bias, n, k, config, out_dtype=None, activation=None, gate=None, residual=False, aux=None,
      weight_scale=None, token_scale=None, row_check=None):
    torch._check(x.dim() == 2, lambda: f"linear_cutlass expects a 2-D input, got {x.dim()}-D")
    torch._check(x.shape[1] == k and values.shape[0] == n, lambda: "linear_cutlass: K or N mismatch with the weight")
    out = out_dtype or x.dtype
    torch._check(out in _CUTLASS_OUT, lambda: f"linear_cutlass: output dtype {out} (bf16, fp16 or fp32; "
                                              "8-bit x needs out_dtype)")
    torch._check(activation in _CUTLASS_ACTIVATIONS, lambda: f"linear_cutlass: activation {activation!r}")
    torch._check(gate in _CUTLASS_GATES and not (gate and residual),
                 lambda: f"linear_cutlass: gate {gate!r} (silu_acc, silu_aux), not with residual")
    torch._check((aux is not None) == bool(gate or residual), lambda: "linear_cutlass: aux goes with a gate or residual")
    _cutlass_tile_k(config)
    return x.new_empty(x.shape[0], n, dtype=out)


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


def arg_names(op: Any) -> tuple[str, ...]:
    """The names of op's arguments, in its schema's order."""
    return _schema(op)[0]
