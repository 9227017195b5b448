"""What follows a linear in the graph that a generated epilogue (CUTLASS's: lowering/cutlass_24.py)
computes: the chains passes/cutlass_epilogue.py folds into the op, and the prediction of them that
linear_rewrite gives the dispatcher before it decides a layer (Layer.epilogue), so that the family
is timed with the epilogue it will run. One matcher serves both: before the rewrite it starts at
the matmul (mm / addmm / torch._int_mm / torch._scaled_mm) and looks through the views that
sink_views will move below the pointwise ops; after it, at the op, and stops at a view.

From the value v of one output (piece) of a linear, in this order, each step only where every use
of what it reads is the step (the op's output then replaces the last node):

    int8 (torch._int_mm's int32 product p): p -> float32, * per-token / per-channel / one-number
        scales, + an fp32 bias, -> bf16 / fp16, + a bias of that dtype (the dequantization)
    activation: the pointwise ops of v alone, identified exhaustively (graph.identify_activation)
        as relu, gelu (erf), gelu (tanh) or silu
    gate: v * silu(s) (v is w3 of a Llama MLP: "silu_aux", aux = s, w1's output), or silu(v) * t
        ("silu_acc", aux = t) where t is not a linear's output (that linear takes the gate instead)
    residual: v + r, r of v's shape and dtype (aux = r)

aux, scales and r must not depend on v. What the graph computes in several roundings the kernel
computes in fp32 and rounds once (one unit in the last place at most apart). Refused where the
two differ beyond that: in fp16 a GELU / SiLU, the gate and the residual (a finite fp32 sum beyond
fp16's 65504 is -Inf / Inf in the graph before the activation or the add, finite in the kernel;
ReLU commutes with the rounding); for bf16 that happens only in its last binade (3.39e38 to
3.40e38), accepted as for cuSPARSELt's activations (docs/decisions.md). A 16-bit linear's output
cast to another dtype is not folded (the kernel would drop the graph's rounding to 16 bits).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx

from ..registry import Fusion
from .graph import LINEAR_CUTLASS, SPARSE_LINEARS, VIEWS, args_of, identify_activation, is_pointwise, marked, tensor_val
from .split_outputs import output_pieces

aten = torch.ops.aten

__all__ = ["Chain", "chain_after", "dequant_chain", "scaled_chain", "predict", "is_linear_value", "depends_on"]

_CVT = {torch.ops.prims.convert_element_type.default, aten._to_copy.default}
_ACTS = ("relu", "gelu", "gelu_tanh", "silu")
_16BIT = (torch.bfloat16, torch.float16)
_MATMULS = {aten.mm.default, aten.addmm.default, aten._int_mm.default, aten._scaled_mm.default}
_LIMIT = 64  # nodes an activation may span


@dataclasses.dataclass
class Chain:
    """What the kernel will compute after the product, and the graph nodes that compute it now.

    end: the node whose value the fused op computes (its uses move to the op); nodes: every node
    folded, in graph order (dead once end's uses move, unless read elsewhere too); aux / scales /
    bias / row_check: the op's inputs; refused: why a step that follows was not folded."""

    fusion: Fusion = dataclasses.field(default_factory=Fusion)
    end: Optional[fx.Node] = None
    nodes: list = dataclasses.field(default_factory=list)
    aux: Optional[fx.Node] = None
    token_scale: Optional[fx.Node] = None
    weight_scale: Optional[fx.Node] = None
    bias: Optional[fx.Node] = None
    row_check: Optional[fx.Node] = None
    refused: list = dataclasses.field(default_factory=list)

    def then(self, other: "Chain") -> "Chain":
        """This chain followed by `other` (a 16-bit chain after a dequantization)."""
        if other.end is None:
            return dataclasses.replace(self, refused=self.refused + other.refused)
        f = dataclasses.replace(self.fusion, activation=other.fusion.activation, gate=other.fusion.gate,
                                residual=other.fusion.residual, aux_dtype=other.fusion.aux_dtype)
        return dataclasses.replace(self, fusion=f, end=other.end, nodes=self.nodes + other.nodes, aux=other.aux,
                                   refused=self.refused + other.refused)


def _same(a, b) -> bool:
    """Two sizes equal (ints, or symbols the shape environment knows to be equal)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true  # (with the compile's shapes)

        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(_same(x, y) for x, y in zip(a.shape, b.shape))


def _fits(t: fx.Node, cur: fx.Node, v: fx.Node) -> bool:
    """Whether t can be the aux of the chain at cur: of cur's shape, or (before the rewrite, where cur
    may be a view of v) of v's, the [M, N] shape the views sink to."""
    tv = tensor_val(t)
    return tv is not None and (_same_shape(tv, tensor_val(cur)) or _same_shape(tv, tensor_val(v)))


def depends_on(node: fx.Node, v: fx.Node) -> bool:
    """Whether node's value is computed from v's (a walk back over the inputs, pruned at the nodes
    that come before v in the graph: those cannot read it)."""
    order = {n: i for i, n in enumerate(v.graph.nodes)}
    start = order[v]
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        if cur is v:
            return True
        if cur in seen or order.get(cur, -1) < start:
            continue
        seen.add(cur)
        todo.extend(cur.all_input_nodes)
    return False


def _through(n: fx.Node) -> fx.Node:
    """n with the views, converts, getitems and splits above it stepped over."""
    for _ in range(8):
        if n.op == "call_function" and (n.target in VIEWS or n.target in _CVT or n.target is operator.getitem
                                        or n.target in (aten.split_with_sizes.default, aten.split.Tensor)):
            n = n.args[0]
        else:
            break
    return n


def is_linear_value(n: fx.Node) -> bool:
    """Whether n is (a view, convert or split piece of) a linear's output: a matmul or a sparse op."""
    src = _through(n)
    return src.op == "call_function" and (src.target in _MATMULS or src.target in SPARSE_LINEARS
                                          or src.target is LINEAR_CUTLASS)


def _sole_user(n: fx.Node) -> Optional[fx.Node]:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    """n's inputs that are tensors (not the sizes a view of a dynamic shape reads)."""
    return [a for a in n.all_input_nodes if tensor_val(a) is not None]


def _other(node: fx.Node, v: fx.Node) -> Optional[fx.Node]:
    """The other tensor operand of a binary op node one of whose operands is v, or None."""
    if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[0], node.args[1]
    if a is v and isinstance(b, fx.Node) and b is not v:
        return b
    if b is v and isinstance(a, fx.Node) and a is not v:
        return a
    return None


def _region(v: fx.Node, views: bool) -> list[fx.Node]:
    """The pointwise nodes (and views, with `views`) computed from v alone, in graph order, at most
    _LIMIT; a non-finite row check over them is not one of them."""
    inside: dict = {v: None}
    order = {n: i for i, n in enumerate(v.graph.nodes)}
    todo = sorted(v.users, key=order.__getitem__)
    changed = True
    while changed and len(inside) <= _LIMIT:
        changed = False
        for u in list(todo):
            if u in inside or u.op != "call_function" or marked(u, "row_check"):
                continue
            ok = is_pointwise(u.target) or (views and u.target in VIEWS)
            if ok and all(a in inside for a in _tensor_inputs(u)):
                inside[u] = None
                todo.extend(sorted(u.users, key=order.__getitem__))
                changed = True
    return sorted((n for n in inside if n is not v), key=order.__getitem__)


def _activation(v: fx.Node, dtype: torch.dtype, views: bool) -> Optional[tuple[str, fx.Node, list]]:
    """(activation, its last node, its nodes) where the ops of v alone that every use of v reads end
    in one node and compute one of _ACTS; the longest such chain."""
    region = _region(v, views)
    if not region or dtype not in _16BIT:
        return None
    for end in reversed(region):
        part = _ancestors_within(end, set(region))
        if not all(u in part for u in v.users):
            continue
        if any(u not in part for n in part if n is not end for u in n.users):
            continue
        nodes = [n for n in region if n in part]
        ev = tensor_val(end)
        if ev is None or ev.dtype != dtype:
            continue
        act = identify_activation(nodes, v, dtype, _ACTS)
        if act is not None:
            return act, end, nodes
    return None


def _ancestors_within(end: fx.Node, region: set) -> set:
    out, todo = set(), [end]
    while todo:
        cur = todo.pop()
        if cur in out or cur not in region:
            continue
        out.add(cur)
        todo.extend(_tensor_inputs(cur))
    return out


def _skip_views(cur: fx.Node, views: bool) -> tuple[fx.Node, list]:
    """With `views`: cur past the views that are its only use (sink_views moves them below)."""
    passed = []
    while views:
        u = _sole_user(cur)
        if u is None or u.op != "call_function" or u.target not in VIEWS:
            break
        passed.append(u)
        cur = u
    return cur, passed


def _silu_of(a: fx.Node, dtype: torch.dtype, views: bool) -> Optional[fx.Node]:
    """s where a = silu(s) by pointwise ops (and views) of s alone, else None."""
    seen: dict = {}
    todo, src = [a], None
    while todo:
        cur = todo.pop()
        if cur in seen or cur is src:
            continue
        pure = cur.op == "call_function" and (is_pointwise(cur.target) or (views and cur.target in VIEWS))
        if not pure or len(seen) > _LIMIT:
            if src is not None:
                return None
            src = cur
            continue
        seen[cur] = None
        todo.extend(_tensor_inputs(cur))
    if src is None or not seen:
        return None
    order = {n: i for i, n in enumerate(a.graph.nodes)}
    nodes = sorted(seen, key=order.__getitem__)
    return src if identify_activation(nodes, src, dtype, ("silu",)) == "silu" else None


def chain_after(v: fx.Node, *, views: bool = False) -> Chain:
    """The activation, gate and residual after v (a 16-bit or fp32 linear output) that the kernel
    computes as the graph does."""
    vv = tensor_val(v)
    out = Chain()
    if vv is None or vv.dtype not in (*_16BIT, torch.float32):
        return out
    dtype = vv.dtype
    cur, passed = _skip_views(v, views)
    nodes: list = list(passed)
    fusion = Fusion()
    act = _activation(cur, dtype, views)
    if act is not None:
        name, end, act_nodes = act
        gate_user = _sole_user(end)
        t = _other(gate_user, end) if gate_user is not None and gate_user.target is aten.mul.Tensor else None
        if name == "silu" and t is not None and _fits(t, end, v) and tensor_val(t).dtype == dtype and not depends_on(t, v):
            if is_linear_value(t):  # the gate is the other linear's (silu_aux); this one stays plain
                return Chain()
            if dtype == torch.float16:
                out.refused.append("silu gate: fp16 (the graph's SiLU and product see Inf where the fp32 sum "
                                   "overflows fp16; the kernel's do not)")
                return out
            fusion = dataclasses.replace(fusion, gate="silu_acc", aux_dtype=dtype)
            return Chain(fusion, gate_user, nodes + act_nodes + [gate_user], aux=t)
        if dtype == torch.float16 and name != "relu":
            out.refused.append(f"{name}: fp16 (the graph's {name} sees -Inf where the fp32 sum overflows fp16, the "
                               "kernel's the sum)")
            return out
        fusion = dataclasses.replace(fusion, activation=name)
        nodes += act_nodes
        cur = end
        cur, passed = _skip_views(cur, views)
        nodes += passed
    aux = None
    user = _sole_user(cur)
    if user is not None and user.target is aten.mul.Tensor and fusion.gate is None:
        a = _other(user, cur)
        s = _silu_of(a, dtype, views) if a is not None and tensor_val(a) is not None and dtype in _16BIT else None
        if s is not None and _fits(s, cur, v) and tensor_val(s).dtype in (*_16BIT, torch.float32) \
                and tensor_val(a).dtype == dtype and not depends_on(s, v):
            if dtype == torch.float16:
                out.refused.append("silu gate: fp16 (the graph's product sees Inf where the fp32 sum overflows "
                                   "fp16; the kernel's does not)")
            else:
                fusion = dataclasses.replace(fusion, gate="silu_aux", aux_dtype=tensor_val(s).dtype)
                aux = s
                nodes.append(user)
                cur = user
                cur, passed = _skip_views(cur, views)
                nodes += passed
                user = _sole_user(cur)
    if aux is None and user is not None and user.target is aten.add.Tensor:
        r = _other(user, cur)
        rv = tensor_val(r) if r is not None else None
        if rv is not None and _fits(r, cur, v) and rv.dtype == dtype and not depends_on(r, v):
            if dtype == torch.float16:
                out.refused.append("residual: fp16 (the graph adds to the output rounded to fp16, Inf where the "
                                   "fp32 sum overflows; the kernel to the sum)")
            else:
                fusion = dataclasses.replace(fusion, residual=True, aux_dtype=dtype)
                aux = r
                nodes.append(user)
                cur = user
    if not (fusion.activation or fusion.gate or fusion.residual):
        return Chain(refused=out.refused)
    return Chain(fusion, cur, nodes, aux=aux, refused=out.refused)


def _scale_kind(s: fx.Node, cur: torch.Tensor) -> Optional[str]:
    """"token" ([M, 1]), "weight" ([N] or [1, N]) or "one" (one number) for an fp32 factor of the
    [M, N] product, else None."""
    sv = tensor_val(s)
    if sv is None or sv.dtype != torch.float32:
        return None
    if all(isinstance(d, int) and d == 1 for d in sv.shape):
        return "one"
    if sv.dim() == 2 and _same(sv.shape[0], cur.shape[0]) and isinstance(sv.shape[1], int) and sv.shape[1] == 1:
        return "token"
    if sv.dim() in (1, 2) and _same(sv.shape[-1], cur.shape[1]) and all(isinstance(d, int) and d == 1 for d in sv.shape[:-1]):
        return "weight"
    return None


def _bias_of(b: Optional[fx.Node], n, dtype: torch.dtype) -> bool:
    bv = tensor_val(b)
    return bv is not None and bv.dim() == 1 and _same(bv.shape[0], n) and bv.dtype == dtype


def dequant_chain(p: fx.Node, *, views: bool = False) -> Chain:
    """torch._int_mm's product p (int32 [M, N]) -> float32, its scales, a bias and a cast to 16 bits,
    then chain_after (views: only before the rewrite, where the 16-bit chain may be 3-D)."""
    pv = tensor_val(p)
    c = _sole_user(p)
    if pv is None or pv.dim() != 2 or c is None or c.target not in _CVT or args_of(c).dtype != torch.float32:
        return Chain()
    n = pv.shape[1]
    cur, nodes = c, [c]
    ch = Chain(Fusion(out_dtype=torch.float32), c, nodes)
    kinds: dict = {}
    while True:
        u = _sole_user(cur)
        if u is None:
            break
        other = _other(u, cur) if u.target in (aten.mul.Tensor, aten.add.Tensor) else None
        if u.target is aten.mul.Tensor and other is not None and ch.bias is None and not depends_on(other, p):
            kind = _scale_kind(other, tensor_val(cur))
            if kind == "one":
                kind = "weight" if "weight" not in kinds else "token"
            if kind is None or kind in kinds:
                break
            kinds[kind] = other
        elif u.target is aten.add.Tensor and other is not None and ch.bias is None and _bias_of(other, n, torch.float32) \
                and not depends_on(other, p):
            ch.bias = other
        else:
            break
        nodes.append(u)
        cur = u
    ch.token_scale, ch.weight_scale = kinds.get("token"), kinds.get("weight")
    u = _sole_user(cur)
    out = torch.float32
    if u is not None and u.target in _CVT and args_of(u).dtype in _16BIT:
        out = args_of(u).dtype
        nodes.append(u)
        cur = u
        b = _sole_user(cur)
        other = _other(b, cur) if b is not None and b.target is aten.add.Tensor else None
        if ch.bias is None and other is not None and _bias_of(other, n, out) and not depends_on(other, p):
            ch.bias = other
            nodes.append(b)
            cur = b
    ch.end = cur
    ch.fusion = Fusion(out_dtype=out, token_scale=_kind_name(ch.token_scale), weight_scale=_kind_name(ch.weight_scale),
                       bias=tensor_val(ch.bias).dtype if ch.bias is not None else None)
    return ch.then(chain_after(cur, views=views)) if out in _16BIT else ch


def _kind_name(s: Optional[fx.Node]) -> Optional[str]:
    if s is None:
        return None
    return "tensor" if all(isinstance(d, int) and d == 1 for d in tensor_val(s).shape) else "vector"


def scaled_chain(op: fx.Node) -> Chain:
    """After the rewrite of torch._scaled_mm (linear_rewrite._replace_scaled_mm) into the op:

        y = op(x8, ..., lib) [-> float32] + g -> * scale_a -> * scale_b [+ bias] -> out_dtype

    with g = sum(0 * float(x8), 1, keepdim) the row guard: all of it the kernel's (then
    chain_after)."""
    x = args_of(op).x
    cur, nodes = op, []
    u = _sole_user(cur)
    if u is not None and u.target in _CVT and args_of(u).dtype == torch.float32:
        nodes.append(u)
        cur = u
    steps: dict = {}
    for name, target in (("g", aten.add.Tensor), ("sa", aten.mul.Tensor), ("sb", aten.mul.Tensor)):
        u = _sole_user(cur)
        other = _other(u, cur) if u is not None and u.target is target else None
        if other is None:
            return Chain()
        steps[name] = other
        nodes.append(u)
        cur = u
    if not _is_guard(steps["g"], x):
        return Chain()
    u = _sole_user(cur)
    bias = None
    if u is not None and u.target is aten.add.Tensor:
        bias = _other(u, cur)
        nodes.append(u)
        cur = u
    u = _sole_user(cur)
    if u is None or u.target not in _CVT:
        return Chain()
    nodes.append(u)
    out = args_of(u).dtype
    ch = Chain(Fusion(out_dtype=out, token_scale=_kind_name(steps["sa"]), weight_scale=_kind_name(steps["sb"]),
                      bias=tensor_val(bias).dtype if bias is not None else None), u, nodes,
               token_scale=steps["sa"], weight_scale=steps["sb"], bias=bias, row_check=steps["g"])
    return ch.then(chain_after(u)) if out in _16BIT else ch


def _is_guard(g: fx.Node, x: fx.Node) -> bool:
    """g = sum(mul(convert(x, fp32), 0.0), [1], keepdim) (linear_rewrite._replace_scaled_mm's)."""
    if g.target is not aten.sum.dim_IntList:
        return False
    m = g.args[0]
    if not (isinstance(m, fx.Node) and m.target is aten.mul.Tensor and m.args[1] == 0.0):
        return False
    c = m.args[0]
    return isinstance(c, fx.Node) and c.target in _CVT and c.args[0] is x


def _from_scaled_mm(node: fx.Node) -> Chain:
    """The prediction for a torch._scaled_mm not yet rewritten: its scales, bias and out_dtype are
    the kernel's (the fp8 row guard too), then chain_after."""
    mm = args_of(node)
    sa, sb = tensor_val(mm.scale_a), tensor_val(mm.scale_b)
    one = lambda t: all(isinstance(d, int) and d == 1 for d in t.shape)  # noqa: E731
    f = Fusion(out_dtype=mm.out_dtype, token_scale="tensor" if one(sa) else "vector",
               weight_scale="tensor" if one(sb) else "vector", bias=tensor_val(mm.bias).dtype if mm.bias is not None else None)
    ch = Chain(f, node, [])
    return ch.then(chain_after(node, views=True)) if mm.out_dtype in _16BIT else ch


def predict(node: fx.Node, n: int) -> tuple:
    """Layer.epilogue for the linear `node` (mm / addmm / _int_mm / _scaled_mm, before the rewrite):
    ((size, Fusion), ...), one entry per output piece where the graph splits a concatenated layer
    and a piece has something to fuse; () where nothing would be fused."""
    if node.target is aten._scaled_mm.default:
        return ((n, _from_scaled_mm(node).fusion),)
    if node.target is aten._int_mm.default:
        ch = dequant_chain(node, views=True)
        return ((n, ch.fusion),) if ch.end is not None else ()
    pieces = output_pieces(node, n, None)
    if pieces:
        chains = [(b - a, chain_after(item, views=True)) for item, a, b in sorted(pieces, key=lambda p: p[1])]
        if any(c.end is not None for _, c in chains):
            return tuple((size, c.fusion if c.end is not None else None) for size, c in chains)
        return ()
    ch = chain_after(node, views=True)
    return ((n, ch.fusion),) if ch.end is not None else ()
