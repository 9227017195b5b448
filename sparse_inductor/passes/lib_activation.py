"""A cuSPARSELt layer's activation into the library's epilogue, where the library computes the
graph's activation.

Runs last (after derived_check.py). Before (a ViT's fc1 on cuSPARSELt, exact mode):

    y1 = linear_cslt(x, W1c, b1) * (1 + g1)[:, None]      (the row fixup, in the graph)
    h  = <pointwise ops of y1 alone: the activation>       (GELU: mul, erf, add, mul)

After:

    h  = linear_cslt(x, W1c, b1, row_check=g1, activation="gelu")

The activation's kernel after the library call, which reads and writes h (ViT-B/16 b64: the GELU
kernels take 673 us of a ~5500 us forward on the H200, docs/performance.md), is gone; the row fixup moves into
the op (nan_rows_: a small kernel that writes only the flagged rows), since nothing pointwise is
left after the call to fold it into.

Exactness: the chain is identified exhaustively (graph.identify_activation, here with the tanh
GELU as a candidate too), and the library's own activation is measured on every finite value of
the dtype and on NaN / Inf / max (cusparselt.activation_matches, once per device and dtype); only
where the two agree to within one unit in the last place does the activation move. The library
applies it to its fp32 sum before rounding, where the graph rounded y1 first: at most one unit in
the last place of h apart, a rounding fewer. Where that rounding overflows (a finite sum beyond the
dtype's range) the two differ: the graph's GELU sees -Inf and gives NaN, the library's gives -0 (as
the fp64 reference does); ReLU agrees either way. So the GELUs move for bf16 only, whose range is
fp32's but for its last binade (3.39e38 .. 3.40e38), and not for fp16 (65504). cuSPARSELt offers
ReLU and GELU; which GELU it computes is what activation_matches measures. cuSPARSELt 0.8 on sm90
refuses the GELU for bf16 (status 3, invalid value; H200): there only ReLUs move.

Conditions: fp16 / bf16 (a GELU: bf16 only); fc1 a plain 16-bit library layer (no int8 product, alpha or scales); h
computed from its output alone, with no view between (sink_views moves views below the
activation); nothing else reading y1 or the ops between.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx

from ..activations import ACTIVATIONS
from ..options import SparseOptions
from ..report import count
from ..runtime import cusparselt
from .graph import (LINEAR_CSLT, LayerNote, args_of, attach_note, constant, erase_dead, guarded, is_pointwise,
                    identify_activation, marked, note_of, pointwise_source)
from .row_checks import library_op

log = logging.getLogger("sparse_inductor")

__all__ = ["fuse_library_activations"]

_DTYPES = (torch.float16, torch.bfloat16)
# the graph activations the library's epilogue may compute (activations.py: each one's `library`)
_CANDIDATES = [name for name, a in ACTIVATIONS.items() if a.library is not None]


def fuse_library_activations(gm: fx.GraphModule, opts: SparseOptions) -> int:
    """The pass body: how many activations moved into the library's epilogue."""
    if not opts.rules.lib_activation:
        return 0
    done = 0
    for out in list(gm.graph.nodes):
        if getattr(out, "_erased", False) or note_of(out) is None:
            continue
        done += guarded(lambda: _try(gm, out), out, "activation in cuSPARSELt's epilogue")
    return done


def _library_op(out: fx.Node) -> Optional[tuple[fx.Node, Optional[fx.Node]]]:
    """(the plain 16-bit linear_cslt op, its row check g or None) behind a layer output, or None."""
    found = library_op(out)
    if found is None:
        return None
    a = args_of(found[0])
    if a.out_dtype is not None or a.alpha is not None or a.activation is not None:
        return None  # (an out_dtype: int8 / fp8)
    return found


def _chain_end(out: fx.Node) -> Optional[fx.Node]:
    """The one node h that the pointwise ops after `out` end in (a row check over h, fc2's, is not one
    of them), or None."""
    inside: dict[fx.Node, None] = {}
    todo = [out]
    while todo:
        cur = todo.pop()
        for u in cur.users:
            if (u not in inside and u.op == "call_function" and is_pointwise(u.target) and len(inside) < 64
                    and not marked(u, "row_check")):
                inside[u] = None
                todo.append(u)
    ends = [n for n in inside if any(u not in inside for u in n.users) or not n.users]
    return ends[0] if len(ends) == 1 else None


def _runs(gm: fx.GraphModule, op: fx.Node, note: LayerNote, library: str, dtype: torch.dtype) -> Optional[str]:
    """cusparselt.activation_runs for this op's constants and parameters, at the decision's M."""
    a = args_of(op)
    wc_t, bias_t = constant(gm, a.wc), constant(gm, a.bias)
    if wc_t is None or (a.bias is not None and bias_t is None):
        return "its weight or bias is not a constant"
    return cusparselt.activation_runs(wc_t, bias_t, a.n, a.k, note.decision.m or 16, dtype, a.alg_id, a.split_k,
                                      library)


def _try(gm: fx.GraphModule, out: fx.Node) -> int:
    found = _library_op(out)
    val = out.meta.get("val")
    if found is None or not isinstance(val, torch.Tensor) or val.dtype not in _DTYPES:
        return 0
    op, g = found
    h = _chain_end(out)
    src = pointwise_source(h, lambda n: n is out) if h is not None else None
    if src is None:
        return 0
    _, nodes = src
    inside = set(nodes)
    if any(u not in inside for u in out.users) or any(u not in inside for n in nodes if n is not h for u in n.users):
        return 0  # y1, or a step of the activation, is read elsewhere too
    hv = h.meta.get("val")
    if not isinstance(hv, torch.Tensor) or hv.dtype != val.dtype or tuple(hv.shape) != tuple(val.shape):
        return 0
    act = identify_activation(nodes, out, val.dtype, _CANDIDATES)
    note = note_of(out)
    if act is None:
        return 0
    library = ACTIVATIONS[act].library
    why = None
    if act != "relu" and val.dtype == torch.float16:
        why = "fp16: where fc1's sum overflows, the graph's GELU sees -Inf (NaN) and the library the finite sum (-0)"
    why = why or cusparselt.activation_matches(library, ACTIVATIONS[act].fn, act, val.dtype, val.device)
    if why is None:
        why = _runs(gm, op, note, library, val.dtype)
    if why is not None:
        log.debug("sparse_inductor: %s keeps its %s after the call: %s", note.name, act, why)
        note.say(f"{act} not in cuSPARSELt's epilogue: {why}")
        return 0
    graph = gm.graph
    kwargs = {**op.kwargs, "activation": library}
    if g is not None:
        kwargs["row_check"] = g  # (in the op now: no pointwise op after the call to fold it into)
    with graph.inserting_before(op):
        new = graph.call_function(LINEAR_CSLT, op.args, kwargs)
    new.meta.update(op.meta)
    new.meta["val"] = hv
    attach_note(new, note)
    h.replace_all_uses_with(new)
    erase_dead([h])
    note.fused(act)
    note.say(f"the {act} in cuSPARSELt's epilogue (it computes the graph's on every {val.dtype} value)")
    count("lib_activation")
    return 1
