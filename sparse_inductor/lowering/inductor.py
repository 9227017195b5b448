"""The one place that registers Inductor lowerings for the project's ops.

Each op carries the kernel the pass chose (its `kernel` argument). A lowering that has a template
for that kernel on that device emits it, with the bias as an Inductor pointwise add that the
scheduler fuses into the template's store; anything else (the "reference" kernel, a CPU tensor,
or a template that fails to generate) becomes an extern call of the op's reference implementation,
so a failure costs speed for that layer, never the compile.
"""
from __future__ import annotations

import logging

import torch

from ..ops import OpArgs, arg_names  # (ops.py defines torch.ops.sparse_inductor)
from ..report import count, record
from . import block_mlp, row_check, triton_24, triton_block

log = logging.getLogger("sparse_inductor")
_registered = False


def _lower_24(a: OpArgs):
    """linear_24(x, values, meta, bias, kernel, x_index) on the 2:4 template (without the bias)."""
    return triton_24.lower(a.x, a.values, a.meta, n=int(a.values.get_size()[1]), x_index=a.x_index)


def _lower_block(a: OpArgs):
    """linear_block(x, blocks, row_ptr, col_idx, row_order, bias, n, k, kernel, guard, row_check, live,
    skip_check, x_index, out_index) on the block template (without the bias)."""
    return triton_block.lower(a.x, a.blocks, a.row_ptr, a.col_idx, a.row_order, n=int(a.n), guard=a.guard,
                              row_check=a.row_check, live=a.live, skip_check=a.skip_check, x_index=a.x_index,
                              out_index=a.out_index)


# (op, kernel) -> its template's lowering
_TEMPLATES = {
    (torch.ops.sparse_inductor.linear_24.default, "triton"): _lower_24,
    (torch.ops.sparse_inductor.linear_block.default, "triton"): _lower_block,
}


def _on_cuda(x) -> bool:
    return x.get_device() is not None and x.get_device().type == "cuda"


def register() -> None:
    """Register the lowerings once per process (idempotent)."""
    global _registered
    if _registered:
        return
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.lowering import fallback_handler, lowerings, register_lowering

    def make(op):
        fallback = fallback_handler(op, add_to_fallback_set=False)

        def lowering(*args, **kwargs):
            a = OpArgs(op, args, kwargs)
            template = _TEMPLATES.get((op, a.kernel))
            if template is not None and _on_cuda(a.x):
                try:
                    out = template(a)
                    return out if a.bias is None else lowerings[torch.ops.aten.add.Tensor](out, a.bias)
                except Exception as e:  # this layer falls back to the reference kernel
                    log.exception("sparse_inductor: %s lowering failed", a.kernel)
                    count("lowering_fallback")
                    record(f"sparse_inductor: {a.kernel} kernel failed to lower ({type(e).__name__}: {e}); "
                           "that layer runs the reference kernel")
            return fallback(*args, **kwargs)

        register_lowering(op, type_promotion_kind=None)(lowering)

    make(torch.ops.sparse_inductor.linear_24.default)
    make(torch.ops.sparse_inductor.linear_block.default)
    register_lowering(torch.ops.sparse_inductor.row_check.default, type_promotion_kind=None)(_row_check_lowering)
    _register_mlp(fallback_handler, lowerings, register_lowering)
    _register_cutlass(fallback_handler, lowerings, register_lowering)
    _registered = True


def _register_mlp(fallback_handler, lowerings, register_lowering) -> None:
    """sparse_inductor::mlp_block(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2,
    row_order2, bias2, h, n, act, kernel, safe=0.0, flag=None): the fused template on CUDA with
    kernel "triton" (lowering/block_mlp.py), bias2 as a pointwise add fused into its store; else,
    or where the template fails, the op's reference implementation."""
    op = torch.ops.sparse_inductor.mlp_block.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    def lowering(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2, bias2, h, n, act,
                 kernel, safe=0.0, flag=None):
        if kernel == "triton" and _on_cuda(x):
            try:
                out = block_mlp.lower(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2,
                                      flag, h=int(h), n=int(n), act=act, safe=float(safe))
                return out if bias2 is None else lowerings[torch.ops.aten.add.Tensor](out, bias2)
            except Exception as e:  # the pair falls back to the reference kernel
                log.exception("sparse_inductor: block MLP lowering failed")
                count("lowering_fallback")
                record(f"sparse_inductor: block MLP kernel failed to lower ({type(e).__name__}: {e}); "
                       "those two layers run the reference kernel")
        return fallback(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2, bias2, h, n,
                        act, kernel, safe, flag)

    register_lowering(op, type_promotion_kind=None)(lowering)


def _register_cutlass(fallback_handler, lowerings, register_lowering) -> None:
    """sparse_inductor::linear_cutlass(x, values, meta, bias, n, k, config, ...): an extern call of the
    op, whose CUDA implementation (lowering/cutlass_24.py) launches the generated library on the
    current stream, so that CUDA graphs capture it; the kernel is opaque to Inductor. On CUDA the
    row check g joins the token scale here: (1 + g) [* token_scale], an Inductor pointwise op that
    fuses into the kernel computing g (x's norm, or the row_check kernel), so the call reads one
    vector and applies it in its epilogue. Elsewhere the op's reference implementation runs."""
    op = torch.ops.sparse_inductor.linear_cutlass.default
    fallback = fallback_handler(op, add_to_fallback_set=False)
    names = arg_names(op)
    add, mul = lowerings[torch.ops.aten.add.Tensor], lowerings[torch.ops.aten.mul.Tensor]

    def lowering(*args, **kwargs):
        a = OpArgs(op, args, kwargs)
        values = {name: getattr(a, name) for name in names}
        if _on_cuda(a.x) and a.row_check is not None:
            factor = add(a.row_check, 1.0)
            values["token_scale"] = factor if a.token_scale is None else mul(factor, a.token_scale)
            values["row_check"] = None
        return fallback(*(values[name] for name in names))

    register_lowering(op, type_promotion_kind=None)(lowering)


def _row_check_lowering(x, maybe=None):
    """sparse_inductor::row_check: its template on CUDA (lowering/row_check.py); elsewhere, or where
    the template fails, Inductor's own mul + sum (which may fuse with x's producer)."""
    if _on_cuda(x):
        try:
            return row_check.lower(x, maybe)
        except Exception as e:
            log.exception("sparse_inductor: row-check template failed to lower")
            count("lowering_fallback")
            record(f"sparse_inductor: row-check kernel failed to lower ({type(e).__name__}: {e}); "
                   "Inductor's reduction computes it")
    return row_check.inductor_ops(x, maybe)
