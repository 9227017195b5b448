"""fc2's non-finite row check from fc1's input, where fc2 runs on the library (cuSPARSELt).

Runs after linear_rewrite and fuse_mlp, on what they made, in exact mode. Before (a ViT's MLP
with 2:4 linears on cuSPARSELt, post-grad; linear_rewrite's row checks):

    g1 = sum(0 * x, 1)                                  (fc1's check, in x's norm)
    y1 = linear_cslt(x, W1c, b1) * (1 + g1)[:, None]
    h  = <pointwise ops of y1 alone: the activation>   (GELU: mul, erf, add, mul)
    g2 = sum(0 * h, 1)                                  (fc2's check over h)
    y  = linear_cslt(h, W2c, b2) * (1 + g2)[:, None]

g2 turns the GELU's pointwise kernel into a reduction kernel: 27-35 us a layer on the H200 at
ViT-B/16 b64 (docs/benchmarks.md I4), more than cuSPARSELt saves on fc2. After:

    flag = amax(|x|, 1) + sum(0 * x, 1)                 (in x's norm, beside g1)
    gd   = 0 * log(safe - flag)                         (fuse_mlp.derived_check: NaN where h may
                                                         be non-finite, 0 where it cannot be)
    g2   = sparse_inductor.row_check(h, gd)             (reads h only in the rows gd flags)
    y    = linear_cslt(h, W2c, b2) * (1 + g2)[:, None]

gd alone is not enough here, as it is for the block template (fuse_mlp._derive_check): the
library's fixup makes a whole row NaN, and gd also flags rows whose x is merely large (h finite
there, and dense finite); the block template's fixup finds the exact positions in h instead.
row_check(h, gd) gives g2 exactly (0 for a row of h that is finite, NaN otherwise): what dense
computes is unchanged. A finite, moderate input reads a [M] vector instead of h; the GELU stays
pointwise.

Conditions: fc2 a library layer with a check over its input h; h computed from fc1's output alone
by pointwise ops and views, which compute an activation fuse_mlp.identify_activation knows
(|act(t)| <= |t|); fc1 a layer the rewrite looked at (sparse, or a sparse weight the dispatcher
kept dense: its mm / addmm) with a floating weight and a constant bias (its row bound:
linear_rewrite._row_bound), fp16 or bf16; the flag no dearer than the check it replaces (fc1's check
in x's norm, or K <= H); and h large enough (options rules.derived_lib_min_bytes) that one more
small kernel pays.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (ops defines torch.ops.sparse_inductor)
from ..options import SparseOptions
from .fuse_mlp import (BOUNDED_ACTIVATIONS, _DTYPES, _erase_dead, derived_check, guarded, identify_activation,
                       keeps_own_check, pointwise_source)
from .linear_rewrite import _derived, library_op

log = logging.getLogger("sparse_inductor")
aten = torch.ops.aten

__all__ = ["derivable", "derive_library_checks", "predicts"]

_ROW_CHECK = torch.ops.sparse_inductor.row_check.default


def _own_check(out: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(the library op, its row check g) for a layer output linear_rewrite made, where g is a check
    over the op's input (fused: sum(0 * h); separate: row_check(h)); else None."""
    found = library_op(out)
    if found is None or not isinstance(found[1], fx.Node):
        return None
    op, g = found
    h = op.args[0]
    if g.target is _ROW_CHECK and g.args[0] is h and len(g.args) == 1 and not g.kwargs.get("maybe"):
        return op, g
    if g.target is aten.sum.dim_IntList and g.args[0].target is aten.mul.Tensor and g.args[0].args[0] is h:
        return op, g
    return None


def derive_library_checks(gm: fx.GraphModule, opts: SparseOptions) -> int:
    """The pass body: how many library layers now take their check from fc1's input."""
    if opts.nonfinite != "exact" or not opts.rules.derived_lib_check:
        return 0
    done = 0
    for out in list(gm.graph.nodes):
        if "sparse_inductor_layer" not in out.meta:
            continue
        done += guarded(lambda: _try(gm, out, opts), out, "row check from fc1's input")  # (the layer keeps its own)
    return done


class Derivable(NamedTuple):
    """fc1 as derivable() found it: its layer output, the activation's nodes, its record, the bound
    and the activation; why: None where fc2 can take its check from fc1's input, else why not."""
    out1: fx.Node
    nodes: list
    dec_a: object
    layer_a: object
    safe: float
    act: Optional[str]
    why: Optional[str]


def derivable(h: fx.Node, m: Optional[int], k: int, name_b: str, opts: SparseOptions) -> Optional[Derivable]:
    """fc1 and whether a library fc2 with input h ([m, k]; m the dispatcher's M) can take its check
    from fc1's input; None where h does not come from a layer the rewrite looked at. Asked by _try
    after the rewrite, and by linear_rewrite before it decides fc2 (predicts)."""
    from ..lowering.block_mlp import safe_bound_from

    src = pointwise_source(h, lambda n: "sparse_inductor_row_bound" in n.meta)
    if src is None:
        return None
    out1, nodes = src
    dec_a, layer_a = out1.meta["sparse_inductor_layer"]
    bound, val = out1.meta["sparse_inductor_row_bound"], out1.meta.get("val")
    if bound is None or not isinstance(val, torch.Tensor) or val.dtype not in _DTYPES:
        return None
    hv = h.meta.get("val")
    h_bytes = (m or 0) * k * (hv.dtype.itemsize if isinstance(hv, torch.Tensor) else 2)
    why = None
    min_bytes = opts.rules.derived_lib_min_bytes
    if h_bytes < min_bytes:
        why = f"{name_b}'s input is small ({h_bytes / 2**20:.1f} MiB < {min_bytes / 2**20:.0f})"
    elif not (layer_a.row_check == "fused" or layer_a.k <= k):
        why = f"reading {dec_a.name}'s input costs more than reading {name_b}'s"
    safe = safe_bound_from(bound[0], bound[1], val.dtype) if why is None else 0.0
    if why is None and safe <= 0:
        why = f"{dec_a.name}'s weight or bias holds a NaN/Inf"
    act = identify_activation(nodes, out1, val.dtype, BOUNDED_ACTIVATIONS) if why is None else None
    if why is None and act is None:
        why = "the ops between the two layers are not an activation we know"
    return Derivable(out1, nodes, dec_a, layer_a, safe, act, why)


def predicts(h: fx.Node, m: Optional[int], k: int, name_b: str, opts: SparseOptions) -> bool:
    """True where this pass will give a library fc2 (input h) its check from fc1's input: the
    dispatcher then times fc2's cuSPARSELt candidate with that check (cusparselt._runner) instead
    of one more pass over h. An internal error here says False (timed as before)."""
    if opts.nonfinite != "exact" or not opts.rules.derived_lib_check:
        return False
    try:
        d = derivable(h, m, k, name_b, opts)
    except Exception:
        log.exception("sparse_inductor: derived_check.predicts failed for %s", name_b)
        return False
    return d is not None and d.why is None


def _try(gm: fx.GraphModule, out: fx.Node, opts: SparseOptions) -> int:
    found = _own_check(out)
    if found is None:
        return 0
    op2, g_old = found
    h = op2.args[0]
    dec_b, layer_b = out.meta["sparse_inductor_layer"]
    d = derivable(h, layer_b.m, layer_b.k, dec_b.name, opts)
    if d is None:
        return 0
    if d.why is not None:
        log.debug("sparse_inductor: %s keeps its own row check: %s", dec_b.name, d.why)
        keeps_own_check(dec_b, d.dec_a, d.why)
        return 0
    out1, dec_a, layer_a, safe, act = d.out1, d.dec_a, d.layer_a, d.safe, d.act
    op1 = out1.args[0] if out1.meta.get("sparse_inductor") == "nan_rows" else out1
    x1 = op1.args[1] if op1.target is aten.addmm.default else op1.args[0]  # (addmm: fc1 kept dense)
    gd = derived_check(x1, op1, op2, safe)
    graph = gm.graph
    with graph.inserting_before(g_old):
        g = graph.call_function(_ROW_CHECK, (h, gd))
    _derived(g, op2)
    g.meta["sparse_inductor"] = "row_check"
    g_old.replace_all_uses_with(g)
    _erase_dead([g_old])
    where = "in its norm" if layer_a.row_check == "fused" else "a pass over it"
    dec_b.row_check = f"from {dec_a.name}'s input ({where}), then its own input in the rows that flags"
    dec_b.reason += (f"; non-finite row check read from {dec_a.name}'s input (through the {act}), and "
                     f"from its own input only in the rows that may hold a NaN/Inf")
    return 1
