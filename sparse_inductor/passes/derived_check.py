"""fc2's non-finite row check from fc1's input, where fc2 runs on the library (cuSPARSELt).

Runs after linear_rewrite and fuse_mlp, on what they made, in exact mode. Before (a ViT's MLP
with 2:4 linears on cuSPARSELt, post-grad; linear_rewrite's row checks):

    g1 = sum(0 * x, 1)                                  (fc1's check, in x's norm)
    y1 = linear_cslt(x, W1c, b1) * (1 + g1)[:, None]
    h  = <pointwise ops of y1 alone: the activation>   (GELU: mul, erf, add, mul)
    g2 = sum(0 * h, 1)                                  (fc2's check over h)
    y  = linear_cslt(h, W2c, b2) * (1 + g2)[:, None]

g2 turns the GELU's pointwise kernel into a reduction kernel: 27-35 us a layer on the H200 at
ViT-B/16 b64 (docs/performance.md), more than cuSPARSELt saves on fc2. After:

    flag = amax(|x|, 1) + sum(0 * x, 1)                 (in x's norm, beside g1)
    gd   = 0 * log(safe - flag)                         (row_checks.check_from_input: NaN where h
                                                         may be non-finite, 0 where it cannot be)
    g2   = sparse_inductor.row_check(h, gd)             (reads h only in the rows gd flags)
    y    = linear_cslt(h, W2c, b2) * (1 + g2)[:, None]

gd alone is not enough here, as it is for the block template (fuse_mlp._derive_check): the
library's fixup makes a whole row NaN, and gd also flags rows whose x is merely large (h finite
there, and dense finite); the block template's fixup finds the exact positions in h instead.
row_check(h, gd) gives g2 exactly (0 for a row of h that is finite, NaN otherwise): what dense
computes is unchanged. A finite, moderate input reads a [M] vector instead of h; the GELU stays
pointwise.

Conditions: fc2 a library layer with a check over its input h; h computed from fc1's output alone
by pointwise ops and views, which compute an activation graph.identify_activation knows
(|act(t)| <= |t|); fc1 a layer the rewrite looked at (sparse, or a sparse weight the dispatcher
kept dense: its mm / addmm) with a floating weight and a constant bias (its row bound:
row_checks.row_bound), fp16 or bf16; the flag no dearer than the check it replaces (fc1's check
in x's norm, or K <= H); and h large enough (options rules.derived_lib_min_bytes) that one more
small kernel pays.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx

from ..options import SparseOptions
from ..report import count
from .graph import ROW_CHECK, args_of, erase_dead, guarded, mark, marked, note_of, stamp
from .row_checks import check_from_input, keeps_own_check, library_fc1, library_op

log = logging.getLogger("sparse_inductor")
aten = torch.ops.aten

__all__ = ["derive_library_checks"]


def derive_library_checks(gm: fx.GraphModule, opts: SparseOptions) -> int:
    """The pass body: how many library layers now take their check from fc1's input."""
    if opts.nonfinite != "exact" or not opts.rules.derived_lib_check:
        return 0
    done = 0
    for out in list(gm.graph.nodes):
        if note_of(out) is None:
            continue
        done += guarded(lambda: _try(gm, out, opts), out, "row check from fc1's input")  # (the layer keeps its own)
    return done


def _own_check(out: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(the library op, its row check g) for a layer output linear_rewrite made, where g is a check
    over the op's input (fused: sum(0 * h); separate: row_check(h)); else None."""
    found = library_op(out)
    if found is None or not isinstance(found[1], fx.Node):
        return None
    op, g = found
    h = args_of(op).x
    if g.target is ROW_CHECK and g.args[0] is h and len(g.args) == 1 and not g.kwargs.get("maybe"):
        return op, g
    if g.target is aten.sum.dim_IntList and g.args[0].target is aten.mul.Tensor and g.args[0].args[0] is h:
        return op, g
    return None


def _layer_input(op: fx.Node) -> fx.Node:
    """x of the op a layer's note is on: a sparse op's, or the mm / addmm of a layer kept dense."""
    a = args_of(op)
    return a.mat1 if op.target is aten.addmm.default else a.self if op.target is aten.mm.default else a.x


def _try(gm: fx.GraphModule, out: fx.Node, opts: SparseOptions) -> int:
    found = _own_check(out)
    if found is None:
        return 0
    op2, g_old = found
    h = args_of(op2).x
    note_b = note_of(out)
    fc1 = library_fc1(h, note_b.layer.m, note_b.layer.k, note_b.name, opts)
    if fc1 is None:
        return 0
    if fc1.why is not None:
        log.debug("sparse_inductor: %s keeps its own row check: %s", note_b.name, fc1.why)
        keeps_own_check(note_b, fc1.note.name, fc1.why)
        return 0
    op1 = fc1.out1.args[0] if marked(fc1.out1, "nan_rows") else fc1.out1
    gd = check_from_input(_layer_input(op1), op1, op2, fc1.safe)
    graph = gm.graph
    with graph.inserting_before(g_old):
        g = graph.call_function(ROW_CHECK, (h, gd))
    stamp(g, op2)
    mark(g, "row_check")
    g_old.replace_all_uses_with(g)
    erase_dead([g_old])
    where = "in its norm" if fc1.note.layer.row_check == "fused" else "a pass over it"
    note_b.decision.row_check = f"from {fc1.note.name}'s input ({where}), then its own input in the rows that flags"
    note_b.say(f"non-finite row check read from {fc1.note.name}'s input (through the {fc1.act}), and "
               f"from its own input only in the rows that may hold a NaN/Inf")
    count("derived_lib_check")
    return 1
