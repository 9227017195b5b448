"""Move reshapes below the pointwise ops that follow a sparse linear, so Inductor fuses them.

A linear on a 3-D input is a 2-D op between two reshapes; whatever follows it (bias, GELU,
residual add) runs on the 3-D view. Inductor's template epilogue fusion then stops at the view
(measured on the H100: `relu(view(op(x)))` ran as the template plus a separate pointwise kernel).
Pointwise ops commute with reshapes, so this pass rewrites

    y = op(x2d)                        [M, N]
    v = aten.reshape(y, [B, S, N])
    z = aten.gelu(v)                   (or add(v, r) with r [B, S, N] / [N] / scalar, ...)

into

    y = op(x2d)
    z2 = aten.gelu(y)                  (r, if [B, S, N], becomes aten.reshape(r, [M, N]))
    z = aten.reshape(z2, [B, S, N])

and repeats down the chain while the next op is pointwise and has the reshape as its only tensor
of that shape. Shapes and values are unchanged; only where the reshape sits moves.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..report import count
from .graph import RESHAPES, is_pointwise

aten = torch.ops.aten

__all__ = ["sink_views"]

def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _flat_source(a, flat_shape) -> fx.Node | None:
    """If `a` is reshape(t, ...) of a tensor t of the flat shape, return t."""
    if isinstance(a, fx.Node) and a.op == "call_function" and a.target in RESHAPES:
        src = _val(a.args[0])
        if isinstance(src, torch.Tensor) and tuple(src.shape) == tuple(flat_shape):
            return a.args[0]
    return None


def _sink_into(user: fx.Node, view: fx.Node) -> fx.Node | None:
    """Rewrite pointwise `user` (output of the shape `full` of `view`, a reshape of a flat [M, N]
    tensor) on flat operands followed by one reshape back to `full`; returns that reshape, or None
    (graph untouched) if it cannot. The new reshapes take their sizes as the graph has them: `full`
    as `view` was given it, and [M, N] as [-1, N] where M is symbolic (N is a weight's size; a raw
    SymInt in a node's arguments is not a graph value: torch.fx warns of it)."""
    full, flat = _val(view).shape, _val(view.args[0]).shape
    full_arg = view.args[1] if len(view.args) > 1 else None
    if not isinstance(flat[1], int) or not isinstance(full_arg, (list, tuple)):
        return None
    flat_arg = [flat[0] if isinstance(flat[0], int) else -1, flat[1]]
    out = _val(user)
    if not (user.op == "call_function" and is_pointwise(user.target) and isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(full)):
        return None
    if any(isinstance(k, fx.Node) for k in user.kwargs.values()):
        return None
    plan = []
    for a in user.args:
        src = _flat_source(a, flat)
        v = _val(a)
        if src is not None and tuple(v.shape) == tuple(full):
            plan.append(("use", src))
        elif isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(full):
            plan.append(("reshape", a))
        elif not isinstance(a, fx.Node) or (isinstance(v, torch.Tensor) and v.dim() <= 1):
            plan.append(("keep", a))  # scalars and row vectors broadcast the same over [M, N]
        else:
            return None
    if not any(kind == "use" for kind, _ in plan):
        return None
    graph = user.graph
    with graph.inserting_before(user):
        args = []
        for kind, a in plan:
            if kind == "reshape":
                r = graph.call_function(aten.reshape.default, (a, flat_arg))
                r.meta["val"] = _val(a).reshape(flat)
                a = r
            args.append(a)
        flat_user = graph.call_function(user.target, tuple(args), dict(user.kwargs))
        flat_user.meta.update(user.meta)
        flat_user.meta["val"] = out.reshape(flat)
        back = graph.call_function(aten.reshape.default, (flat_user, list(full_arg)))
        back.meta["val"] = out
    user.replace_all_uses_with(back)
    graph.erase_node(user)
    return back


def sink_views(outputs: list[fx.Node]) -> int:
    """Sink the reshape after each sparse-op node in `outputs` through the pointwise ops below it.
    Returns the number of pointwise ops moved."""
    moved = 0
    work = []
    for out in outputs:
        for user in list(out.users):
            if user.op == "call_function" and user.target in RESHAPES:
                work.append(user)
    while work:
        view = work.pop()
        if view.graph is None:
            continue
        full, flat = _val(view), _val(view.args[0])
        if not isinstance(full, torch.Tensor) or not isinstance(flat, torch.Tensor) or flat.dim() != 2:
            continue
        for user in list(view.users):
            back = _sink_into(user, view)
            if back is not None:
                moved += 1
                work.append(back)
        for user in list(view.users):  # reshape(reshape(t, S), shape of t) -> t
            if user.op == "call_function" and user.target in RESHAPES and user.args[0] is view:
                if isinstance(_val(user), torch.Tensor) and tuple(_val(user).shape) == tuple(flat.shape):
                    user.replace_all_uses_with(view.args[0])
                    user.graph.erase_node(user)
        if not view.users:
            view.graph.erase_node(view)
    count("views_sunk", moved)
    return moved
