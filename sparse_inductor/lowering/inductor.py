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

from ..report import record

log = logging.getLogger("sparse_inductor")
_registered = False


def _template_lowerings():
    from . import triton_24, triton_block

    return {
        (torch.ops.sparse_inductor.linear_24.default, "triton"): triton_24.lower,
        (torch.ops.sparse_inductor.linear_block.default, "triton"): triton_block.lower,
    }


def register() -> None:
    """Register the lowerings once per process (idempotent)."""
    global _registered
    if _registered:
        return
    from torch._inductor.lowering import fallback_handler, lowerings, register_lowering

    from .. import ops  # noqa: F401  (defines the ops)

    aten = torch.ops.aten
    table = _template_lowerings()

    def make(op, n_weight_args, out_features, n_rest):
        fallback = fallback_handler(op, add_to_fallback_set=False)

        def lowering(x, *args, **kwargs):
            weights, rest = args[:n_weight_args], args[n_weight_args:]
            bias, kernel = rest[0], rest[n_rest - 1]
            options = dict(zip(("guard", "row_check", "live", "skip_check"), rest[n_rest:]), **kwargs)  # linear_block's
            fn = table.get((op, kernel))
            if fn is not None and x.get_device() is not None and x.get_device().type == "cuda":
                try:
                    out = fn(x, *weights, n=out_features(weights, rest), **options)
                    return out if bias is None else lowerings[aten.add.Tensor](out, bias)
                except Exception as e:  # this layer falls back to the reference kernel
                    log.exception("sparse_inductor: %s lowering failed", kernel)
                    record(f"sparse_inductor: {kernel} kernel failed to lower ({type(e).__name__}: {e}); "
                           "that layer runs the reference kernel")
            return fallback(x, *args, **kwargs)

        register_lowering(op, type_promotion_kind=None)(lowering)

    # linear_24(x, values, meta, bias, kernel)
    # linear_block(x, blocks, row_ptr, col_idx, row_order, bias, n, k, kernel, guard=True, row_check=None, live=-1,
    #              skip_check=None)
    make(torch.ops.sparse_inductor.linear_24.default, 2, lambda w, rest: int(w[0].get_size()[1]), 2)
    make(torch.ops.sparse_inductor.linear_block.default, 4, lambda w, rest: int(rest[1]), 4)
    register_lowering(torch.ops.sparse_inductor.row_check.default, type_promotion_kind=None)(_row_check_lowering)
    _register_mlp(fallback_handler, lowerings, register_lowering)
    _registered = True


def _register_mlp(fallback_handler, lowerings, register_lowering) -> None:
    """sparse_inductor::mlp_block(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2,
    row_order2, bias2, h, n, act, kernel, safe=0.0, flag=None): the fused template on CUDA with
    kernel "triton" (lowering/block_mlp.py), bias2 as a pointwise add fused into its store; else,
    or where the template fails, the op's reference implementation."""
    from . import block_mlp

    op = torch.ops.sparse_inductor.mlp_block.default
    fallback = fallback_handler(op, add_to_fallback_set=False)

    def lowering(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2, bias2, h, n, act,
                 kernel, safe=0.0, flag=None):
        if kernel == "triton" and x.get_device() is not None and x.get_device().type == "cuda":
            try:
                out = block_mlp.lower(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2,
                                      flag, h=int(h), n=int(n), act=act, safe=float(safe))
                return out if bias2 is None else lowerings[torch.ops.aten.add.Tensor](out, bias2)
            except Exception as e:  # the pair falls back to the reference kernel
                log.exception("sparse_inductor: block MLP lowering failed")
                record(f"sparse_inductor: block MLP kernel failed to lower ({type(e).__name__}: {e}); "
                       "those two layers run the reference kernel")
        return fallback(x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2, bias2, h, n,
                        act, kernel, safe, flag)

    register_lowering(op, type_promotion_kind=None)(lowering)


def _row_check_lowering(x, maybe=None):
    """sparse_inductor::row_check: its template on CUDA (lowering/row_check.py); elsewhere, or where
    the template fails, Inductor's own mul + sum (which may fuse with x's producer)."""
    from . import row_check

    if x.get_device() is not None and x.get_device().type == "cuda":
        try:
            return row_check.lower(x, maybe)
        except Exception as e:
            log.exception("sparse_inductor: row-check template failed to lower")
            record(f"sparse_inductor: row-check kernel failed to lower ({type(e).__name__}: {e}); "
                   "Inductor's reduction computes it")
    return row_check.inductor_ops(x, maybe)
