"""What the passes share: walks over pointwise ops and views, the ops' arguments by name, new nodes
and constants, dead-node removal, the marks passes leave on nodes, and LayerNote, what the rewrite
tells the passes after it about a layer.

Nothing here rewrites a graph on its own; the passes (one per file beside this one) do.
"""
from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

from .. import _compat
from ..activations import ACTIVATIONS, every_16bit_value, same
from ..lowering.reductions import ROW_CHECK_MARK
from ..ops import OpArgs, arg_index
from ..registry import Layer
from ..report import LayerDecision, count

log = logging.getLogger("sparse_inductor")
aten = torch.ops.aten

__all__ = [
    "LINEAR_24", "LINEAR_BLOCK", "LINEAR_CSLT", "LINEAR_CUTLASS", "MLP_BLOCK", "ROW_CHECK", "SPARSE_LINEARS", "VIEWS", "RESHAPES",
    "is_pointwise", "pointwise_sources", "pointwise_closure", "pointwise_users", "pointwise_source", "run_chain",
    "identify_activation", "args_of", "set_args", "stamp", "constant", "add_constant", "erase_constant",
    "erase_dead", "mark", "marked", "LayerNote", "note_of", "attach_note", "drop_note", "guarded",
]

# the project's ops, as graph targets (ops.py defines them)
LINEAR_24 = torch.ops.sparse_inductor.linear_24.default
LINEAR_BLOCK = torch.ops.sparse_inductor.linear_block.default
LINEAR_CSLT = torch.ops.sparse_inductor.linear_cslt.default
LINEAR_CUTLASS = torch.ops.sparse_inductor.linear_cutlass.default
MLP_BLOCK = torch.ops.sparse_inductor.mlp_block.default
ROW_CHECK = torch.ops.sparse_inductor.row_check.default
SPARSE_LINEARS = (LINEAR_24, LINEAR_BLOCK, LINEAR_CSLT, LINEAR_CUTLASS)

# ops that change only the shape (the walks below pass through them), and those of them that take a
# target shape (what sink_views moves)
VIEWS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.squeeze.dim,
         aten.unsqueeze.default}
RESHAPES = {aten.reshape.default, aten.view.default}


# ---- pointwise walks

def is_pointwise(target) -> bool:
    """Whether a node's target is an aten op tagged pointwise."""
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def pointwise_sources(node: fx.Node, depth: int = 16, reached: Optional[set] = None) -> list[fx.Node]:
    """The call_function nodes that the pointwise `node` reads through pointwise ops, views and
    getitem only (the kernels that Inductor fuses it with, or that it is an epilogue of). reached:
    a set to collect every node read on the way (graph inputs too)."""
    seen, todo, out = set(), [node], []
    while todo and depth > 0:
        depth -= 1
        cur = todo.pop()
        for a in cur.all_input_nodes:
            if reached is not None:
                reached.add(a)
            if a in seen or a.op != "call_function":
                continue
            seen.add(a)
            if is_pointwise(a.target) or a.target in VIEWS or a.target is operator.getitem:
                todo.append(a)
            else:
                out.append(a)
    return out


def pointwise_closure(node: fx.Node) -> set:
    """node and what it is computed from through pointwise ops, views and getitem."""
    out = {node}
    if node.op == "call_function" and (is_pointwise(node.target) or node.target in VIEWS):
        pointwise_sources(node, reached=out)
    return out


def pointwise_users(node: fx.Node, depth: int = 4) -> bool:
    """Whether every use of `node` is a pointwise op, directly or through views (into which Inductor
    then inlines a pointwise op on `node`: no kernel of its own)."""
    if not node.users or depth == 0:
        return False
    for user in node.users:
        target = user.target if user.op == "call_function" else None
        if target in VIEWS:
            if not pointwise_users(user, depth - 1):
                return False
        elif not is_pointwise(target):
            return False
    return True


def pointwise_source(h: fx.Node, is_source: Callable[[fx.Node], bool]) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """(the one node s with is_source(s), the pointwise / view nodes from it to h in graph order)
    where h is computed from s alone by such nodes (a DAG: the GELU decomposed reads its input
    twice); else None (two sources, or another tensor enters: a residual, a scale, a graph input)."""
    seen: dict[fx.Node, None] = {}
    todo, src = [h], None
    while todo:
        cur = todo.pop()
        if cur in seen or cur is src:
            continue
        if is_source(cur):
            if src is not None:
                return None
            src = cur
            continue
        if cur.op != "call_function" or not (cur.target in VIEWS or is_pointwise(cur.target)) or len(seen) > 64:
            return None
        seen[cur] = None
        todo.extend(cur.all_input_nodes)
    if src is None:
        return None
    order = {n: i for i, n in enumerate(h.graph.nodes)}
    return src, sorted(seen, key=order.__getitem__)


def run_chain(nodes: list[fx.Node], start: fx.Node, t: torch.Tensor) -> torch.Tensor:
    """The pointwise chain `nodes` (pointwise_source's) run eagerly on t in place of `start`; views
    pass t through (t is 1-D: a pointwise chain computes the same values in any shape)."""
    env = {start: t}
    for n in nodes:
        if n.target in VIEWS:
            env[n] = env[n.args[0]]
            continue
        args = [env[a] if isinstance(a, fx.Node) else a for a in n.args]
        kwargs = {k: (env[v] if isinstance(v, fx.Node) else v) for k, v in n.kwargs.items()}
        env[n] = n.target(*args, **kwargs)
    return env[nodes[-1]] if nodes else t


def identify_activation(nodes: list[fx.Node], start: fx.Node, dtype: torch.dtype,
                        among: Optional[Iterable[str]] = None) -> Optional[str]:
    """Which activation of the table (activations.py; `among` names the candidates, by default those
    our kernels compute) the chain computes on every value of the 16-bit dtype, or None."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    p = every_16bit_value(dtype)
    try:
        with torch.no_grad():
            out = run_chain(nodes, start, p)
    except Exception as e:  # an op that will not run on a 1-D CPU tensor: not an activation we know
        log.debug("sparse_inductor: the chain did not run on the 16-bit probe: %s", e)
        return None
    if not isinstance(out, torch.Tensor) or out.dtype != dtype or out.shape != p.shape:
        return None
    names = [n for n, a in ACTIVATIONS.items() if a.code is not None] if among is None else list(among)
    h = p.float()
    for name in names:
        if same(out, ACTIVATIONS[name].fn(h).to(dtype)):
            return name
    return None


# ---- the ops' arguments by name

def tensor_val(n: Any) -> Optional[torch.Tensor]:
    """A node's example value (meta["val"]) where it is a tensor, else None."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def args_of(node: fx.Node) -> OpArgs:
    """A call_function node's arguments by the names of its op's schema: args_of(node).bias."""
    return OpArgs(node.target, node.args, node.kwargs)


def set_args(node: fx.Node, **named: Any) -> None:
    """Set arguments of a call_function node by name, where they are: positional if given by
    position, else as keywords (the node keeps the layout it had)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in named.items():
        i = arg_index(node.target, name)
        if i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs


# ---- new nodes and constants

def stamp(n: fx.Node, near: fx.Node) -> None:
    """A node a pass made: its FakeTensor value, and `near`'s provenance (module stack, trace)."""
    n.meta["val"] = _compat.fake_eval(n)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in near.meta:
            n.meta[key] = near.meta[key]


def constant(gm: fx.GraphModule, n: Any) -> Optional[torch.Tensor]:
    """The tensor a get_attr node reads, else None."""
    if isinstance(n, fx.Node) and n.op == "get_attr":
        t = _compat.get_attr(gm, n.target)
        return t if isinstance(t, torch.Tensor) else None
    return None


def add_constant(gm: fx.GraphModule, base: str, t: torch.Tensor, near: fx.Node,
                 above: Optional[fx.Node] = None) -> fx.Node:
    """t as a buffer of gm (named base, or base_1, ... where taken) read by a get_attr node placed
    just above `above` (default: the graph's first node after the placeholders), with a FakeTensor
    value made in near's fake mode."""
    graph = gm.graph
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, t)
    with graph.inserting_before(above or next(n for n in graph.nodes if n.op != "placeholder")):
        n = graph.get_attr(name)
    n.meta["val"] = _compat.fake_constant(near, t)
    return n


def erase_constant(gm: fx.GraphModule, node: Any) -> bool:
    """Remove a get_attr node that nothing reads any more, and its attribute where no other node
    reads that; False where node is not such a node."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr") or node.users:
        return False
    target = node.target
    gm.graph.erase_node(node)
    if "." not in target and hasattr(gm, target) and \
            not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        delattr(gm, target)
    return True


def erase_dead(nodes: Iterable[fx.Node]) -> None:
    """Erase the nodes among `nodes` (and, transitively, their inputs) that nothing reads any more."""
    todo = dict.fromkeys(nodes)
    changed = True
    while changed:
        changed = False
        for n in list(todo):
            if n.op in ("placeholder", "output", "get_attr") or n.users:
                continue
            ins = n.all_input_nodes
            n.graph.erase_node(n)
            del todo[n]
            todo.update(dict.fromkeys(i for i in ins if i not in todo))
            changed = True


# ---- marks: what a node a pass made is for (read by the passes, and by lowering/reductions.py)

_MARK_KEY, _ROW_CHECK_KIND = ROW_CHECK_MARK  # ("sparse_inductor", "row_check")


def mark(node: fx.Node, kind: str) -> None:
    """kind: "row_check" (a node of a non-finite row check), "nan_rows" (a row fixup y * (1 + g))."""
    node.meta[_MARK_KEY] = kind


def marked(node: fx.Node, kind: str) -> bool:
    return node.meta.get(_MARK_KEY) == kind


# ---- what the rewrite tells the passes after it

_NOTE_KEY = "sparse_inductor_layer"


@dataclasses.dataclass
class LayerNote:
    """What linear_rewrite leaves on the node that makes a layer's output (or, for a layer the
    dispatcher kept dense, on its mm / addmm), for the passes after it: the layer's decision
    record, the dispatcher's Layer, and its row bound (row_checks.row_bound: (L1, B), so that
    |y[m, n]| <= max_k |x[m, k]| * L1 + B; None where not known).

    The decision's reason is built from parts: the rewrite's, then one per later pass that says
    something (say()), joined with "; "."""

    decision: LayerDecision
    layer: Layer
    row_bound: Optional[tuple[float, float]] = None
    parts: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.parts:
            self.parts = [self.decision.reason]

    @property
    def name(self) -> str:
        return self.decision.name

    def say(self, part: str) -> None:
        """Add a part to the decision's reason."""
        self.parts.append(part)
        self.decision.reason = "; ".join(self.parts)

    def fused(self, what: str) -> None:
        """Add to the ops the decision lists as fused (e.g. "hidden-skip", an activation)."""
        self.decision.fused = (*self.decision.fused, what)


def note_of(node: Any) -> Optional[LayerNote]:
    return node.meta.get(_NOTE_KEY) if isinstance(node, fx.Node) else None


def attach_note(node: fx.Node, note: Optional[LayerNote]) -> None:
    if note is not None:
        node.meta[_NOTE_KEY] = note


def drop_note(node: fx.Node) -> None:
    node.meta.pop(_NOTE_KEY, None)


def guarded(fn: Callable[[], int], node: fx.Node, what: str) -> int:
    """fn(), or 0 where it raises (never break the user's compile; fn rewires uses only at its end,
    so what it made before raising is unread, and Inductor drops it): logged, counted
    ("step_failed"), and the record of node's layer says what failed."""
    try:
        return fn()
    except Exception as e:
        log.exception("sparse_inductor: %s failed at %s", what, node.name)
        count("step_failed")
        note = note_of(node)
        if note is not None:
            note.say(f"{what} failed ({type(e).__name__}: {e})")
        return 0
