"""The non-finite row checks of the zero-skipping kernels (cuSPARSELt, the block template) in the graph.

Dense computes 0 * x for every zero weight, so a NaN or Inf in an input row makes that whole output
row non-finite; a kernel that skips the zeros would leave outputs finite where the input meets
only zeros. In exact mode (options nonfinite="exact", the default) such a layer gets a check
g[m] = sum_k 0 * x[m, k] (fp32: 0 for a finite row, NaN for a row holding a NaN or Inf), and its
output rows where g is NaN become NaN. This module holds what the passes know about checks:

- how a check costs, for the dispatcher's timing (check_mode: "none", "fused" into x's producer,
  "separate"), and how the rewrite builds it (row_check), one per x for the layers that read it;
- the cuSPARSELt row fixup in the graph, y * (1 + g) (nan_rows_in_graph), and how to find a
  library layer and its check again (library_op);
- a layer's row bound (row_bound), and when fc2 of a pair fc1 -> activation -> fc2 can take its
  check from fc1's input instead of from the hidden activations h (a derived check): for a block
  fc2 (block_fc1, fc1_side, derive_why; applied by fuse_mlp.py) and a cuSPARSELt fc2
  (library_fc1; applied by derived_check.py), and the graph that computes it (check_from_input).
  linear_rewrite asks derives() before it decides fc2, so the dispatcher times fc2 with the check
  the graph will run.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.fx as fx

from .. import _compat
from ..activations import ACTIVATIONS
from ..lowering.block_mlp import safe_bound, safe_bound_from
from ..options import SparseOptions
from ..registry import Layer
from ..report import count
from .graph import (LINEAR_BLOCK, LINEAR_CSLT, ROW_CHECK, SPARSE_LINEARS, VIEWS, LayerNote, args_of, constant,
                    identify_activation, is_pointwise, mark, marked, note_of, pointwise_closure, pointwise_source,
                    pointwise_sources, stamp)

log = logging.getLogger("sparse_inductor")
aten = torch.ops.aten

__all__ = ["check_mode", "reduction_cost", "decision_text", "row_check", "nan_rows_in_graph", "nan_rows_check",
           "library_op", "row_bound", "block_fc1", "fc1_side", "derive_why", "library_fc1", "Fc1", "derives",
           "keeps_own_check", "check_from_input", "flag"]

_DTYPES = (torch.float16, torch.bfloat16)  # the derived checks: the activation is identified exhaustively
_FUSABLE_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.var_mean.correction}
_TEMPLATE_OPS = SPARSE_LINEARS[:2]  # linear_24 / linear_block: Triton templates when their kernel is "triton"


# ---- how a check costs, and the check itself

def check_mode(x: fx.Node, compute: torch.dtype, opts: SparseOptions) -> str:
    """How the non-finite row check of a zero-skipping kernel (cuSPARSELt, the block template)
    costs, for its timing: "none" (int8 / fp8 inputs, which have their own handling, or options
    nonfinite="fast"); "fused" where x comes from an Inductor reduction kernel (a norm), which the
    reduction over x joins at little cost; rules.pointwise_producer_check where x comes from an
    Inductor pointwise kernel (which the check turns into a reduction); "separate" otherwise (a
    graph input, an extern kernel's output, e.g. attention, a pointwise epilogue of our templates),
    where it is one more read of x."""
    if opts.nonfinite != "exact" or not compute.is_floating_point or compute.itemsize == 1:
        return "none"
    return reduction_cost(x, opts)


def reduction_cost(x: fx.Node, opts: SparseOptions) -> str:
    """How a reduction over the rows of x costs: "fused" where it joins x's producer kernel (a
    reduction, or pointwise ops after one: a norm, fp8's quantization by the row's amax),
    rules.pointwise_producer_check after other pointwise ops, "separate" otherwise (check_mode)."""
    node = x
    while node.op == "call_function" and node.target in VIEWS:
        node = node.args[0]
    target = node.target if node.op == "call_function" else None
    if not isinstance(target, torch._ops.OpOverload) or target in SPARSE_LINEARS:
        return "separate"
    if target in _FUSABLE_REDUCTIONS:
        return "fused"
    if not is_pointwise(target):
        return "separate"
    reached: set = set()
    sources = pointwise_sources(node, reached=reached)
    # a norm (a reduction, then pointwise ops in the same kernel): the check joins a reduction.
    # First, since a norm's input may itself come from a template (a ViT's LayerNorm after the
    # residual add that is the previous fc2's epilogue): the norm is still a kernel of its own.
    # A norm's pointwise ops read what it reduces, or what that is computed from ((u - mean(u)) * ...,
    # u * rsqrt(mean(u * u))); a reduction whose result alone is read is another kernel's (a
    # cuSPARSELt fc1's row fixup y * (1 + g), g a sum over fc1's input: the GELU after it is a
    # pointwise kernel of its own, which the check would turn into a reduction)
    if any(a.target in _FUSABLE_REDUCTIONS
           and (not opts.rules.norm_reads_its_input or not pointwise_closure(a.args[0]).isdisjoint(reached))
           for a in sources):
        return "fused"
    # a pointwise x that only our Triton templates feed becomes their epilogue (a GELU after
    # fc1, the gated product): no kernel of its own that the reduction could join
    if any(a.target in _TEMPLATE_OPS and args_of(a).kernel == "triton" for a in sources):
        return "separate"
    return opts.rules.pointwise_producer_check


def decision_text(skips_zeros: bool, layer: Layer, opts: SparseOptions) -> str:
    """LayerDecision.row_check: how the rewritten layer gets dense's non-finite rows back (skips_zeros:
    its kernel skips the zeros: cuSPARSELt, the block template)."""
    if not skips_zeros or not layer.dtype.is_floating_point or layer.dtype.itemsize == 1:
        return ""
    if opts.nonfinite != "exact":
        return "off"
    return {"fused": "in x's norm", "separate": "own kernel"}.get(layer.row_check, "")


def _made_check(x: fx.Node, mode: str) -> Optional[fx.Node]:
    """The check over x that row_check made for an earlier layer in this mode, if any."""
    for u in x.users:
        if not marked(u, "row_check"):
            continue
        if mode == "separate" and u.target is ROW_CHECK and u.args == (x,):
            return u
        if mode != "separate" and u.target is aten.mul.Tensor and u.args == (x, 0.0) and len(u.users) == 1:
            (s,) = u.users
            if s.target is aten.sum.dim_IntList and marked(s, "row_check"):
                return s
    return None


def row_check(x: fx.Node, near: fx.Node, mode: str = "fused") -> fx.Node:
    """g [M] fp32, g[m] = sum_k 0 * x[m, k]: 0 for a finite row, NaN for a row holding a NaN or Inf;
    those rows of the op's output (linear_cslt, sparse tensor cores) become NaN: in the pointwise
    ops after it where every use is one (nan_rows_in_graph), else in the op (nan_rows_). The block
    kernel takes g as its row_check (where the check is "separate") and finds the exact positions.

    With the check every output of a non-finite row is NaN (dense has +-Inf at some of them: the
    non-finite positions match dense, the NaN-vs-Inf split does not, so an activation after it can
    differ: ReLU(-Inf) = 0 where ReLU(NaN) = NaN). The op writes only the rows concerned, so a
    finite input costs one small kernel after the library call and no pass over y.

    mode (check_mode) "fused": Inductor ops (mul, sum), which fuse with x's producer, a norm;
    "separate": sparse_inductor::row_check, a kernel of its own that fuses nothing in, so that a
    pointwise producer keeps its kernel, or stays the epilogue of the template it is
    (lowering/row_check.py). Layers that read the same x (w1 and w3 after a norm, q / k / v after
    an input) share one check: the first one's, made before it (counted: "row_check_shared").
    """
    made_before = _made_check(x, mode)
    if made_before is not None:
        count("row_check_shared")
        return made_before
    graph = x.graph
    with graph.inserting_before(near):
        if mode == "separate":
            made = (g := graph.call_function(ROW_CHECK, (x,))),
        else:
            zero = graph.call_function(aten.mul.Tensor, (x, 0.0))  # a float zero: Inductor folds x * 0 (int) to 0
            made = zero, (g := graph.call_function(aten.sum.dim_IntList, (zero, [1]), {"dtype": torch.float32}))
    for n in made:
        stamp(n, near)
        mark(n, "row_check")  # lowering/reductions.py: a one-pass kernel
    return g


# ---- cuSPARSELt's row fixup in the graph

def nan_rows_in_graph(y: fx.Node, g: fx.Node) -> fx.Node:
    """y * (1 + g)[:, None] in y's dtype: y exactly where g[m] = 0 (a multiplication by one keeps
    every value, a zero's sign and an Inf), NaN in the rows where g[m] is NaN. The same rows as
    nan_rows_ (the op's row_check), as a pointwise op that Inductor inlines into the pointwise ops
    after the library call (a bias, GELU, residual add): no kernel of its own, where nan_rows_ is
    one more launch per layer. Used where every use of y is pointwise (graph.pointwise_users)."""
    graph = y.graph
    one = factor = graph.call_function(aten.add.Tensor, (g, 1))  # g is fp32
    if y.meta["val"].dtype != torch.float32:  # 1 and NaN are exact in any float dtype
        factor = graph.call_function(torch.ops.prims.convert_element_type.default, (one, y.meta["val"].dtype))
    col = graph.call_function(aten.unsqueeze.default, (factor, 1))
    out = graph.call_function(aten.mul.Tensor, (y, col))
    for n in dict.fromkeys((one, factor, col, out)):
        stamp(n, y)
    mark(out, "nan_rows")
    return out


def nan_rows_check(out: fx.Node) -> Optional[fx.Node]:
    """g, for a node nan_rows_in_graph made (out = y * (1 + g)[:, None]), else None."""
    if out.op != "call_function" or not marked(out, "nan_rows"):
        return None
    factor = out.args[1].args[0]
    one = factor.args[0] if factor.target is torch.ops.prims.convert_element_type.default else factor
    return one.args[0]


def library_op(out: fx.Node) -> Optional[tuple[fx.Node, Optional[fx.Node]]]:
    """(the linear_cslt op behind a layer output the rewrite made, its row check g: the one in the
    nan-rows product after it, or its row_check argument; None without one), else None."""
    g = nan_rows_check(out)
    op = out.args[0] if g is not None else out
    if op.op != "call_function" or op.target is not LINEAR_CSLT:
        return None
    if g is None:
        return op, op.kwargs.get("row_check")
    return (op, g) if op.kwargs.get("row_check") is None else None


# ---- a layer's row bound

def row_bound(gm: fx.GraphModule, w: torch.Tensor, bias: Optional[fx.Node], name: str) -> Optional[tuple[float, float]]:
    """(L1, B): the largest absolute row sum of W (fp64) and the largest |bias| (0 without one), so
    that |y[m, n]| <= max_k |x[m, k]| * L1 + B before rounding; None where the bias is not a
    constant, or it cannot be computed (logged: the derived checks then leave the layer alone).
    The caller asks only for a floating W that the kernel multiplies as it is (not weight-only int8,
    not fp8 with scales)."""
    try:
        return _row_bound_of(gm, w, bias)
    except Exception:  # never break the user's compile
        log.exception("sparse_inductor: row bound of %s", name)
        return None


def _row_bound_of(gm: fx.GraphModule, w: torch.Tensor, bias: Optional[fx.Node]) -> Optional[tuple[float, float]]:
    bmax = 0.0
    if bias is not None:
        b = _compat.get_attr(gm, bias.target) if bias.op == "get_attr" else None
        if not isinstance(b, torch.Tensor):
            return None
        bmax = float(b.detach().double().abs().max()) if b.numel() else 0.0
    w = w.detach()
    l1 = 0.0
    for i in range(0, w.shape[0], 1024):  # fp64 a slice of rows at a time: no fp64 copy of a large W
        v = float(w[i:i + 1024].double().abs().sum(1).max())
        if v != v:  # a NaN row: the bound is NaN (max() would drop it)
            return v, bmax
        l1 = max(l1, v)
    return l1, bmax


# ---- fc2's check from fc1's input: when

def _is_check(node: fx.Node) -> bool:
    return marked(node, "row_check")


def _feeds_only(node: fx.Node, target: fx.Node, depth: int = 4) -> bool:
    """Whether every path from node ends at target within a few row-check nodes."""
    if depth == 0:
        return False
    return all(u is target or (_is_check(u) and _feeds_only(u, target, depth - 1)) for u in node.users)


def _is_block_template(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is LINEAR_BLOCK and args_of(n).kernel == "triton"


def block_fc1(b: fx.Node, h: Optional[fx.Node] = None) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """For a block fc2's op node b (input h, default b's x): (fc1's op node, the pointwise / view
    nodes between them in graph order), where fc1 is a block layer on the template, fc2's input is
    computed from fc1's output alone by pointwise ops and views (a DAG: the GELU decomposed reads
    its input twice) and nothing else reads fc1's output or those nodes (but the row check over
    fc2's input, for fc2); else None."""
    found = pointwise_source(args_of(b).x if h is None else h, _is_block_template)
    if found is None:
        return None
    a, seen = found
    inside = set(seen) | {b}
    for n in [a, *seen]:
        for u in n.users:
            if u not in inside and not (_is_check(u) and _feeds_only(u, b)):
                return None
    return a, seen


def fc1_side(gm: fx.GraphModule, a: fx.Node, nodes: list) -> tuple[Optional[str], Optional[str], float]:
    """(why a block fc1's op a and the ops after it neither fuse with fc2 nor give it a check, or
    None; the activation; safe, the bound under which fc1 cannot overflow: block_mlp.safe_bound, 0
    where W1 / b1 hold a NaN or Inf)."""
    fc1 = args_of(a)
    val = a.meta.get("val")
    t1 = constant(gm, fc1.blocks)
    why = None
    if not isinstance(val, torch.Tensor) or val.dtype not in _DTYPES:
        why = "fp16 / bf16 only"
    elif t1 is None:
        why = "a weight is not a constant"
    elif fc1.bias is not None and constant(gm, fc1.bias) is None:
        why = "fc1's bias is not a constant"
    act = identify_activation(nodes, a, val.dtype) if why is None else None
    if why is None and act is None:
        why = "the ops between the two layers are not an activation the fused kernel has"
    if why is not None:
        return why, None, 0.0
    return None, act, safe_bound(t1, constant(gm, fc1.row_ptr), constant(gm, fc1.bias), val.dtype)


def derive_why(a: fx.Node, safe: float, note_a: LayerNote, name_b: str) -> Optional[str]:
    """Why a block fc2 cannot take its check from its fc1's (op a) input, or None."""
    # (safe 0: W1 or b1 holds a NaN/Inf, so even a zero row of x may give a non-finite h)
    if safe <= 0:
        return f"{note_a.name}'s weight or bias holds a NaN/Inf"
    fc1 = args_of(a)
    if not (note_a.layer.row_check == "fused" or fc1.k <= fc1.n):  # (fc1's K <= H)
        return f"reading {note_a.name}'s input costs more than reading {name_b}'s"
    return None


@dataclasses.dataclass
class Fc1:
    """fc1 of a cuSPARSELt fc2, as library_fc1 finds it: its layer output, the activation's nodes,
    its note, the bound and the activation; why: None where fc2 can take its check from fc1's
    input, else why not."""
    out1: fx.Node
    nodes: list
    note: LayerNote
    safe: float
    act: Optional[str]
    why: Optional[str]


def library_fc1(h: fx.Node, m: Optional[int], k: int, name_b: str, opts: SparseOptions) -> Optional[Fc1]:
    """fc1 and whether a library fc2 with input h ([m, k]; m the dispatcher's M) can take its check
    from fc1's input; None where h does not come from a layer the rewrite looked at. Asked by
    derived_check.py after the rewrite, and by linear_rewrite before it decides fc2 (derives)."""
    src = pointwise_source(h, lambda n: note_of(n) is not None)
    if src is None:
        return None
    out1, nodes = src
    note = note_of(out1)
    val = out1.meta.get("val")
    if note.row_bound is None or not isinstance(val, torch.Tensor) or val.dtype not in _DTYPES:
        return None
    hv = h.meta.get("val")
    h_bytes = (m or 0) * k * (hv.dtype.itemsize if isinstance(hv, torch.Tensor) else 2)
    min_bytes = opts.rules.derived_lib_min_bytes
    why = None
    if h_bytes < min_bytes:
        why = f"{name_b}'s input is small ({h_bytes / 2**20:.1f} MiB < {min_bytes / 2**20:.0f})"
    elif not (note.layer.row_check == "fused" or note.layer.k <= k):
        why = f"reading {note.name}'s input costs more than reading {name_b}'s"
    safe = safe_bound_from(note.row_bound[0], note.row_bound[1], val.dtype) if why is None else 0.0
    if why is None and safe <= 0:
        why = f"{note.name}'s weight or bias holds a NaN/Inf"
    # (any activation of the table: each has |act(t)| <= |t|, all the check needs)
    act = identify_activation(nodes, out1, val.dtype, ACTIVATIONS) if why is None else None
    if why is None and act is None:
        why = "the ops between the two layers are not an activation we know"
    return Fc1(out1, nodes, note, safe, act, why)


def derives(gm: fx.GraphModule, node: fx.Node, x: fx.Node, pattern: str, m: Optional[int], k: int, name: str,
            opts: SparseOptions) -> bool:
    """Whether a later pass will give this layer (the linear `node`, input x, not yet rewritten) its
    row check from the input of the layer before it (decided already: the rewrite goes in graph
    order): derived_check.py on cuSPARSELt (2:4), fuse_mlp.py on the block template after a block
    fc1 (block). Layer.derived_check: each family's runner then times that check, not a pass over x.
    An internal error here says False (timed as before)."""
    if opts.nonfinite != "exact":
        return False
    try:
        if pattern == "2:4" and opts.rules.derived_lib_check:
            fc1 = library_fc1(x, m, k, name, opts)
            return fc1 is not None and fc1.why is None
        if pattern == "block" and opts.rules.derived_check:
            found = block_fc1(node, x)
            if found is None or note_of(found[0]) is None:
                return False
            a, nodes = found
            why, _, safe = fc1_side(gm, a, nodes)
            return why is None and derive_why(a, safe, note_of(a), name) is None
    except Exception:
        log.exception("sparse_inductor: whether %s's row check comes from its fc1's input", name)
    return False


def keeps_own_check(note_b: LayerNote, name_a: str, why: str) -> None:
    """Says in fc2's record why its non-finite row check stays over its own input."""
    note_b.say(f"non-finite row check over its own input, not from {name_a}'s: {why}")


# ---- fc2's check from fc1's input: the graph

def flag(x: fx.Node, near: fx.Node) -> fx.Node:
    """flag [M] fp32 = max_k |x[m, k]| + sum_k 0 * x[m, k] (block_mlp.row_flag: NaN or Inf for a row
    holding one), as Inductor ops: two reductions over x that fuse into x's norm."""
    graph = x.graph
    with graph.inserting_before(near):
        xf = graph.call_function(torch.ops.prims.convert_element_type.default, (x, torch.float32))
        amax = graph.call_function(aten.amax.default, (graph.call_function(aten.abs.default, (xf,)), [1]))
        zero = graph.call_function(aten.sum.dim_IntList, (graph.call_function(aten.mul.Tensor, (xf, 0.0)), [1]))
        f = graph.call_function(aten.add.Tensor, (amax, zero))
    for n in (xf, amax.args[0], amax, zero.args[0], zero, f):
        stamp(n, near)
        mark(n, "row_check")
    return f


def check_from_input(x: fx.Node, a: fx.Node, b: fx.Node, safe: float) -> fx.Node:
    """g [M] fp32 = 0 * log(safe - flag(x)): 0 where fc1 (node a, input x) cannot make a row of h
    non-finite, NaN where it may (log of 0 is -Inf, of a negative number or NaN is NaN: strictly
    under, as the fused kernel's `flag < SAFE`); made before a, with b's provenance."""
    graph = a.graph
    f = flag(x, a)
    with graph.inserting_before(a):
        gap = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.sub.Tensor, (f, float(safe))), -1.0))
        g = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.log.default, (gap,)), 0.0))
    for n in (gap.args[0], gap, g.args[0], g):
        stamp(n, b)
        mark(n, "row_check")
    return g
