"""Permutations around a sparse linear: where a weight's row and column orders go, and the graph's shuffles.

linear_rewrite asks this module, for a layer it is about to make sparse, how the orders are applied
(plan), and has it edit the graph once the layer is rewritten (apply). Three sources of order, all
constant: the search's (Detection.perm: Wp = W[rows][:, cols] is sparse, formats/permute.py), a
shuffle of the layer's input features before it, and a shuffle of its output features after it
(index_select, gather or advanced indexing with a constant index on the last dim, or a channel
shuffle written as view / permute / reshape; through views and pointwise ops that treat every
column alike). Before (a block-sparse W behind rows / cols, q and p constant permutations):

    xs = aten.index.Tensor(x, [None, q])            # x[:, q]; or gather / index_select / a channel shuffle
    y  = aten.addmm(b, xs, W_t)
    z  = aten.index.Tensor(y, [None, p])            # y[:, p]

After, the shuffles gone (block; the kernel gathers x in its loads and writes its output column n'
at out_index[n'], Inductor's epilogue then reading y's own columns):

    z = sparse_inductor.linear_block(x, blocks(W[rows][:, cols]), ..., b[p], N, K, kernel,
                                     x_index=q[cols], out_index=p^-1[rows])

Where the dispatcher's timing says so (the kernels' variants: a scattered load or store costs more
than a pass at large M), the orders go into the graph instead, as gathers Inductor can fuse into the
kernels that make x and read z (Plan.gathered_after):

    xs = aten.index.Tensor(x, [None, q[cols]])
    yp = sparse_inductor.linear_block(xs, blocks(W[rows][:, cols]), ..., b[p][oi], N, K, kernel)
    z  = aten.index.Tensor(yp, [None, inverse(oi)])                     # oi = p^-1[rows]

The output order read downstream: where all of the layer's output reaches one dense linear with a
constant weight W2 as its input, through column-agnostic ops only (downstream), that linear reads
the op's rows in their order and its weight's columns are permuted alike (fold_down), before it is
itself detected; the order is first one shared by both weights (shared_order), so a model whose
hidden units were reordered alike gets both layers back as blocks with nothing permuted:

    h = linear_block(x, blocks(W1[r]), ..., b1[r], ...)              # (no out_index)
    a = aten.gelu(h)
    y = aten.addmm(b2, a, W2[:, r]^T)                                 # W2[:, r]: detected as it now stands

Taken where W2 has no zero at all or W2[:, r] is block-sparse as stored (the downstream linear then
needs no order of its own). The downstream sum over its input runs in another order, as a sparse
kernel's does.

2:4 weights keep their rows (2:4 is a property of each row): the rows of the compressed constant are
W[p]'s, and only x_index remains (linear_24(x, compress(W[p][:, cols]), b[p], kernel, x_index=q[cols])).
cuSPARSELt has no gather of its own: x_index becomes `aten.index_select(x, 1, x_index)` before the
call (a pass over x, which the dispatcher times).

The input order folded upstream: where x is computed, through pointwise ops and views that treat
every column alike, from layers whose outputs nothing else reads (a dense linear with a constant
weight and bias, or one of our ops), those layers write x already gathered:

    h = aten.addmm(b1, x1, W1_t)                     h = aten.addmm(b1[xi], x1, W1[xi]^T)
    a = aten.gelu(h)                        ->       a = aten.gelu(h)
    y = linear_block(a, ..., x_index=xi)             y = linear_block(a, ...)

Exact: each output of the layer before is the same dot product, written at another column. A
2:4 or cuSPARSELt layer before permutes the rows of its constants; a block layer before composes
its out_index with xi (free where it had one already: the product may even be the identity, when
the two layers' orders agree; a block layer without one would gain a scattered store, so its
x_index stays in the consumer's loads unless the consumer is cuSPARSELt, which would pay a pass).
A norm's affine parameters are not folded into: permuting what the norm reads would change the
order of its sum (docs/formats.md).

The non-finite row check of a layer (a sum over x's row) is the same over any order of x's
columns, so the checks are made as before (passes/row_checks.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Optional

import torch
import torch.fx as fx

from ..formats import violations_24
from ..formats.permute import block_count, permute, rows_for, shared_order
from ..ops import unpermute
from .graph import LINEAR_24, LINEAR_BLOCK, LINEAR_CSLT, VIEWS, add_constant, args_of, constant, erase_constant, \
    erase_dead, is_pointwise, set_args, stamp, tensor_val

aten = torch.ops.aten

__all__ = ["Shuffle", "Placed", "Plan", "plan", "shuffles_in", "shuffles_out", "in_perm", "out_perm", "upstream",
           "remove", "fold_into", "permuted_constant", "gather_x", "is_our_op", "dense_site_ok", "compose", "inverse",
           "is_identity", "index_tensor", "downstream", "fold_down", "gather_after"]

STORE_MAPPED = "outputs mapped to their columns in the kernel's store"  # (a block layer's own out_index)
_CHANNEL_OPS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.permute.default,
                aten.transpose.int, aten.clone.default}
_DENSE_LINEARS = (aten.mm.default, aten.addmm.default)


# ---- index vectors

def compose(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """a[b] (None: the identity)."""
    if a is None:
        return b
    return a if b is None else a[b.to(a.device)]


def inverse(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if p is None else torch.argsort(p)


def is_identity(p: Optional[torch.Tensor]) -> bool:
    return p is None or torch.equal(p, torch.arange(p.numel(), device=p.device))


def _or_none(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if is_identity(p) else p


def index_tensor(p: torch.Tensor, device) -> torch.Tensor:
    """An index vector as the kernels take it: int32, contiguous, on the weight's device."""
    return p.to(device=device, dtype=torch.int32).contiguous()


def _digest(p: Optional[torch.Tensor]) -> Optional[str]:
    return None if p is None else hashlib.blake2b(p.cpu().numpy().tobytes(), digest_size=12).hexdigest()


# ---- column-agnostic ops

def _same(a, b) -> bool:
    """Two sizes equal without a guard: ints by value, symbolic sizes by their expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(_same(x, y) for x, y in zip(a.shape, b.shape))


def _broadcast_over_columns(v: torch.Tensor) -> bool:
    return v.dim() == 0 or _same(v.shape[-1], 1)


def _carried(n: fx.Node, c: int) -> Optional[list[fx.Node]]:
    """The inputs of n whose columns are n's own, where n treats every column of its last dim (c
    wide) alike: a view that keeps the last dim, or a pointwise op whose other operands broadcast
    over the columns (numbers, [..., 1] tensors); None where n does not."""
    val = tensor_val(n)
    if n.op != "call_function" or val is None or val.dim() == 0 or not _same(val.shape[-1], c):
        return None
    if n.target in VIEWS:
        src = tensor_val(n.args[0])
        return [n.args[0]] if src is not None and src.dim() > 0 and _same(src.shape[-1], c) else None
    if not is_pointwise(n.target) or any(isinstance(v, fx.Node) for v in n.kwargs.values()):
        return None
    carried = []
    for a in n.args:
        if isinstance(a, (list, tuple)) and any(isinstance(e, fx.Node) for e in a):
            return None
        if not isinstance(a, fx.Node):
            continue
        v = tensor_val(a)
        if v is None:
            return None
        if _broadcast_over_columns(v):
            continue
        if not _same_shape(v, val):  # a per-column operand ([c], [1, c], ...): it has an order of its own
            return None
        carried.append(a)
    return carried or None


# ---- shuffles

@dataclasses.dataclass
class Shuffle:
    """A constant permutation of the last dim in the graph: end[..., j] = start[..., perm[j]]."""
    perm: torch.Tensor  # int64 [C], on the CPU
    start: fx.Node
    end: fx.Node
    kind: str  # "index_select", "index", "gather", "channel shuffle"
    nodes: tuple  # the nodes that compute it (start excluded)


def _permutation(t: Optional[torch.Tensor], c: int) -> Optional[torch.Tensor]:
    """t as an int64 permutation of range(c) (negative indices wrap), or None."""
    if t is None or t.dim() != 1 or t.numel() != c or t.dtype not in (torch.int64, torch.int32):
        return None
    p = t.detach().cpu().long() % max(c, 1)
    return p if torch.equal(torch.sort(p).values, torch.arange(c)) else None


def _last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and dim % ndim == ndim - 1


def _gather_index(gm: fx.GraphModule, idx: fx.Node, c: int) -> Optional[torch.Tensor]:
    """The one row of a gather index that is the same for every row (a constant, or an expand of one)."""
    t = constant(gm, idx)
    if t is None and isinstance(idx, fx.Node) and idx.op == "call_function" and idx.target is aten.expand.default:
        t = constant(gm, idx.args[0])
    if t is None or t.numel() == 0 or t.shape[-1] != c:
        return None
    rows = t.reshape(-1, c)
    return rows[0] if bool((rows == rows[0]).all()) else None


def _shuffle_op(gm: fx.GraphModule, end: fx.Node) -> Optional[Shuffle]:
    """end as index_select / index / gather of its input by a constant permutation of the last dim."""
    val = tensor_val(end)
    if end.op != "call_function" or val is None or val.dim() == 0 or not isinstance(val.shape[-1], int):
        return None
    c, nd = val.shape[-1], val.dim()
    src = end.args[0] if end.args else None
    sv = tensor_val(src)
    if sv is None or not _same_shape(sv, val):
        return None
    idx, kind = None, None
    if end.target is aten.index_select.default and _last_dim(end.args[1], nd):
        idx, kind = constant(gm, end.args[2]), "index_select"
    elif end.target is aten.index.Tensor:
        ix = list(end.args[1])
        if len(ix) == nd and all(i is None for i in ix[:-1]) and isinstance(ix[-1], fx.Node):
            idx, kind = constant(gm, ix[-1]), "index"
    elif end.target is aten.gather.default and _last_dim(end.args[1], nd) and not end.kwargs.get("sparse_grad"):
        idx, kind = _gather_index(gm, end.args[2], c), "gather"
    perm = _permutation(idx, c)
    if perm is None:
        return None
    return Shuffle(perm, src, end, kind, (end,))


def _channel_shuffle(end: fx.Node, start: fx.Node, chain: list[fx.Node]) -> Optional[Shuffle]:
    """start -> chain (views, permutes, clones; chain[-1] is end) as a permutation of the last dim:
    the leading dims kept, the last one split, its parts permuted and merged again (e.g.
    x.view(B, g, C // g).transpose(1, 2).reshape(B, C))."""
    sv, ev = tensor_val(start), tensor_val(end)
    if sv is None or ev is None or not _same_shape(sv, ev) or not isinstance(ev.shape[-1], int):
        return None
    if not any(n.target in (aten.permute.default, aten.transpose.int) for n in chain):
        return None
    lead, c = ev.dim() - 1, ev.shape[-1]
    idx = torch.arange(c)
    for n in chain:
        v = tensor_val(n)
        if v is None or v.dim() < lead or not all(_same(a, b) for a, b in zip(v.shape[:lead], ev.shape[:lead])):
            return None
        tail = tuple(v.shape[lead:])
        if not all(isinstance(s, int) for s in tail):
            return None
        if n.target is aten.permute.default:
            dims = [d % v.dim() for d in n.args[1]]
            if dims[:lead] != list(range(lead)):
                return None
            idx = idx.permute([d - lead for d in dims[lead:]])
        elif n.target is aten.transpose.int:
            d0, d1 = (d % v.dim() for d in n.args[1:3])
            if min(d0, d1) < lead:
                return None
            idx = idx.transpose(d0 - lead, d1 - lead)
        elif n.target is aten.clone.default:
            pass
        else:
            idx = idx.reshape(tail)
    perm = idx.reshape(c)
    return Shuffle(perm, start, end, "channel shuffle", tuple(chain))


def _channel_up(end: fx.Node) -> Optional[Shuffle]:
    """A channel shuffle ending at `end`, found walking up its inputs."""
    ev = tensor_val(end)
    if ev is None or ev.dim() == 0 or end.op != "call_function" or end.target not in _CHANNEL_OPS:
        return None
    chain, cur = [end], end
    for _ in range(8):
        src = cur.args[0]
        if not isinstance(src, fx.Node):
            return None
        sv = tensor_val(src)
        if sv is not None and _same_shape(sv, ev) and src.target not in (aten.permute.default, aten.transpose.int):
            return _channel_shuffle(end, src, list(reversed(chain)))
        if src.op != "call_function" or src.target not in _CHANNEL_OPS or len(src.users) != 1:
            return None
        chain.append(src)
        cur = src
    return None


def _channel_down(start: fx.Node) -> Optional[Shuffle]:
    """A channel shuffle starting at `start` (its input), found walking down single users."""
    sv = tensor_val(start)
    if sv is None or sv.dim() == 0:
        return None
    chain, cur = [], start
    for _ in range(8):
        if len(cur.users) != 1:
            return None
        (u,) = cur.users
        if u.op != "call_function" or u.target not in _CHANNEL_OPS or u.args[0] is not cur:
            return None
        chain.append(u)
        uv = tensor_val(u)
        if uv is not None and _same_shape(uv, sv) and u.target not in (aten.permute.default, aten.transpose.int):
            return _channel_shuffle(u, start, chain)
        cur = u
    return None


def shuffles_in(gm: fx.GraphModule, x: fx.Node, k: int) -> list[Shuffle]:
    """The shuffles of the layer input x's features (k of them) that only this layer's input goes
    through, nearest first: walking up from x through single-user column-agnostic ops."""
    found, cur = [], x
    for _ in range(32):
        if len(cur.users) != 1:
            break
        s = _shuffle_op(gm, cur) or _channel_up(cur)
        if s is not None and tensor_val(s.start).shape[-1] == k:
            found.append(s)
            cur = s.start
            continue
        carried = _carried(cur, k)
        if carried is None or len(carried) != 1:
            break
        cur = carried[0]
    return found


def shuffles_out(gm: fx.GraphModule, y: fx.Node, n: int) -> list[Shuffle]:
    """The shuffles of the layer output y's features (n of them) that all of y goes through, nearest
    first: walking down from y through single users that treat every column alike."""
    found, cur = [], y
    for _ in range(32):
        if len(cur.users) != 1:
            break
        (u,) = cur.users
        s = _shuffle_op(gm, u) if u.args and u.args[0] is cur else None
        s = s or _channel_down(cur)
        if s is not None:
            found.append(s)
            cur = s.end
            continue
        carried = _carried(u, n)
        if carried != [cur]:
            break
        cur = u
    return found


def in_perm(found: list[Shuffle]) -> Optional[torch.Tensor]:
    """layer input = top[:, in_perm] for the shuffles found by shuffles_in (nearest first)."""
    acc = None
    for s in found:
        acc = compose(s.perm, acc)
    return acc


def out_perm(found: list[Shuffle]) -> Optional[torch.Tensor]:
    """what the graph reads after the shuffles = y[:, out_perm] (shuffles_out's, nearest first)."""
    acc = None
    for s in found:
        acc = compose(acc, s.perm)
    return acc


# ---- the layers a later layer's input order can be folded into

@dataclasses.dataclass
class Placed:
    """A linear the rewrite looked at, whose output order a later layer may change (the consumer of
    its output): a dense mm / addmm with a constant weight, or one of our ops.

    node:      the node that makes the layer's output (the mm / addmm, or the op).
    pattern:   "dense", "2:4" or "block".
    name:      the layer's name; decision: its LayerDecision (where the fold is said).
    out_perm:  the op writes y[:, out_perm] of the layer as the model wrote it (None: y itself).
    w:         our ops: the weight W as stored [N, K].
    rows, cols: block ops: the blocks are of W[rows][:, cols] (None: W's order); 2:4 ops: cols.
    block, nnzb: block ops: the block size and the nonzero blocks of its constants.
    remake:    our ops: W[rows][:, cols] -> the constants (dict by the op's argument names), as the
               family makes them.
    """
    node: fx.Node
    pattern: str
    name: str
    decision: object
    out_perm: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    cols: Optional[torch.Tensor] = None
    block: Optional[int] = None
    nnzb: Optional[int] = None
    remake: Optional[object] = None
    _reblock: dict = dataclasses.field(default_factory=dict)

    def out_map(self, out_perm: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """A block op's out_index for an output order (default: its own): inverse(out_perm)[rows]."""
        out_perm = self.out_perm if out_perm is None else out_perm
        return _or_none(compose(inverse(out_perm), self.rows) if self.rows is not None else inverse(out_perm))

    def reblocks(self, p: torch.Tensor) -> bool:
        """Whether a block op writing out[:, p] can have its blocks made again in that order (rows
        W[out_perm[p]], no out_index) with no more nonzero blocks than it has."""
        key = _digest(p)
        if key not in self._reblock:
            rows = compose(self.out_perm, p)
            self._reblock[key] = block_count(self.w, rows, self.cols, self.block) <= self.nnzb
        return self._reblock[key]

    def free(self, p: torch.Tensor) -> bool:
        """Whether writing the output as out[:, p] costs this layer nothing: rows of a constant, or a
        block op's out_index that it has already, that becomes the identity, or that its blocks
        made again in the new order do without."""
        if self.pattern != "block":
            return True
        return (self.out_map() is not None or self.out_map(compose(self.out_perm, p)) is None
                or self.reblocks(p))


def upstream(top: fx.Node, below: fx.Node, placed: dict, k: int) -> Optional[list[Placed]]:
    """The placed layers (placed: node -> Placed) whose outputs alone make `top` (k columns; read by
    `below` only) through column-agnostic ops, where nothing else reads those outputs or the ops
    between; None where another tensor with columns of its own comes in (a residual, a graph
    input, a norm) or another node reads them."""
    leaves, inside, todo = [], set(), [top]
    while todo:
        cur = todo.pop()
        if cur in inside or any(p.node is cur for p in leaves):
            continue
        if cur in placed:
            leaves.append(placed[cur])
            continue
        carried = _carried(cur, k) if isinstance(cur, fx.Node) else None
        if not carried:
            return None
        inside.add(cur)
        todo.extend(carried)
    allowed = inside | {below}
    for n in [*inside, *(p.node for p in leaves)]:
        if any(u not in allowed for u in n.users):
            return None
    return leaves or None


# ---- a layer's plan

@dataclasses.dataclass
class Plan:
    """How a sparse layer's orders are applied (module docstring).

    wc:        the weight its constants compress: W[rows][:, cols] (block), W[out_perm][:, cols] (2:4).
    x_index:   int64 [K]: the kernel reads x[:, x_index[k']] for wc's column k' (None: x's order).
    out_index: int64 [N]: the block kernel writes wc's row n' to output column out_index[n'].
    out_perm:  the op's output is the layer's y[:, out_perm] (output shuffles folded): the bias is
               permuted by it.
    inputs / outputs: the shuffles folded (removed from the graph by apply).
    neighbours: the layers x_index can be folded into (upstream), or None.
    rows, cols: wc is W[rows][:, cols] (block; 2:4: W[out_perm][:, cols]): the search's orders, or
               _agree's, for the Placed record.
    key:       what the constants depend on, beyond the weight (for sharing them).
    agreed:    the column order is the block layer before's output order (_agree), not the search's.
    after:     int64 [N]: the op's output is read through a gather of its columns by `after` (the
               output map applied in the graph: gathered_after), None: read as the op writes it.
    down:      the dense linear after the layer that reads its output in the op's order (downstream):
               the op writes y[:, out_perm] with no out_index, and fold_down permutes that linear's
               weight columns alike (None: the op maps its outputs itself, or has no order to map).
    """
    pattern: str
    wc: torch.Tensor
    x_index: Optional[torch.Tensor]
    out_index: Optional[torch.Tensor]
    out_perm: Optional[torch.Tensor]
    inputs: list
    outputs: list
    neighbours: Optional[list]
    rows: Optional[torch.Tensor]
    cols: Optional[torch.Tensor]
    key: tuple
    agreed: bool
    down: Optional[fx.Node] = None
    after: Optional[torch.Tensor] = None

    def gathered_after(self) -> "Plan":
        """The plan with its output map applied after the call instead of in the kernel's store: the
        op writes wc's rows in their order (the layer's y[:, out_perm[out_index]], its bias so
        permuted) and a gather of the output's columns by `after` (inverse(out_index)) puts them
        back, a gather Inductor can fuse into the kernel that reads it."""
        return dataclasses.replace(self, out_index=None, out_perm=compose(self.out_perm, self.out_index),
                                   after=inverse(self.out_index))

    def neighbours_possible(self) -> bool:
        """x_index can go into the layers before (at some cost to them, maybe)."""
        return self.x_index is not None and self.neighbours is not None

    def neighbours_free(self) -> bool:
        """... and it costs them nothing (Placed.free)."""
        return self.neighbours_possible() and all(p.free(self.x_index) for p in self.neighbours)

    def reference_weight(self, fold: bool) -> torch.Tensor:
        """The weight the op computes with (y = x @ W^T + bias in the op's own orders), for the
        dispatcher's check of each kernel against fp64."""
        return unpermute(self.wc, None if fold else self.x_index, self.out_index)


def plan(gm: fx.GraphModule, node: fx.Node, x: fx.Node, w: torch.Tensor, bias: Optional[fx.Node], det,
         placed: dict, max_density: float = 0.0) -> Optional[Plan]:
    """The plan of a layer (the mm / addmm `node` with input x, weight W [N, K] as stored, its
    detection det, sparse; placed: the layers before it, fold_permutations.Placed by output node;
    max_density: the options' max_block_density, for the layer after it: _down_order), or None
    where nothing is permuted (the rewrite then runs as for any layer)."""
    n, k = w.shape
    perm = det.perm
    rows_s = perm.rows if perm is not None else None
    cols_s = perm.cols if perm is not None else None
    inputs = shuffles_in(gm, x, k)
    outputs = shuffles_out(gm, node, n) if bias is None or constant(gm, bias) is not None else []
    q, p = in_perm(inputs), out_perm(outputs)
    top, below = (inputs[-1].start, inputs[-1].nodes[0]) if inputs else (x, node)
    neighbours = upstream(top, below, placed, k)
    agreed = _agree(w, det, q, neighbours)
    if agreed is not None:
        rows_s, cols_s = agreed
    if perm is None and agreed is None and not inputs and not outputs:
        return None
    x_index = _or_none(compose(q, cols_s))
    down = None
    if det.pattern == "block" and rows_s is not None and not outputs:
        found = _down_order(gm, node, w, det, rows_s, cols_s, max_density)
        if found is not None:
            down, rows_s = found
    if det.pattern == "block":
        wc = w.detach() if rows_s is None and cols_s is None else permute(w.detach(), rows_s, cols_s)
        if down is not None:
            out_index, p = None, rows_s  # (the op's output is y[:, rows_s], read so by `down`)
        else:
            out_index = _or_none(compose(inverse(p), rows_s) if rows_s is not None else inverse(p))
        key = ("block", _digest(rows_s), _digest(cols_s))
    else:
        wc = permute(w.detach(), p, cols_s) if p is not None or cols_s is not None else w.detach()
        out_index = None
        key = ("2:4", _digest(p), _digest(cols_s))
    return Plan(det.pattern, wc, x_index, out_index, p, inputs, outputs, neighbours if x_index is not None else None,
                rows_s, cols_s, key, agreed is not None, down)


def _agree(w: torch.Tensor, det, q: Optional[torch.Tensor], neighbours: Optional[list]):
    """(rows, cols) for W that make the layer read x in an order its one block neighbour can write
    without an out_index (then folding x_index into it costs neither layer a permuted access), or
    None. First the neighbour's own output order (its out_index o: the fold then cancels it); then
    an order shared by both (formats/permute.shared_order: the hidden units keyed by the
    neighbour's rows and this layer's columns together; the neighbour's blocks are then made again
    in it). Taken where W[rows][:, cols] keeps detection's pattern with no more nonzero blocks
    (2:4: still 2:4), and the neighbour's blocks in the shared order none more. The channel orders
    of a model whose hidden units were reordered alike (fc1's rows and fc2's columns) agree so."""
    if neighbours is None or len(neighbours) != 1 or neighbours[0].pattern != "block":
        return None
    nb = neighbours[0]
    o = nb.out_map()
    if o is not None:
        found = _keeps(w, det, compose(inverse(q), o))  # (q[cols] = o: the layer's x_index)
        if found is not None:
            return found
    if det.pattern != "block" or det.block != nb.block:
        return None
    if det.perm is None and q is None and nb.out_perm is None and nb.rows is None and nb.cols is None:
        return None  # nothing permuted on either side: both keep their blocks as stored
    rows_s = det.perm.rows if det.perm is not None else None
    w2 = permute(w.detach(), rows_s, inverse(q))  # its columns in the order the neighbour's output has
    h = shared_order(permute(nb.w, nb.out_perm, nb.cols), w2, nb.block)
    if is_identity(h) or not nb.reblocks(h):
        return None
    return _keeps(w, det, compose(inverse(q), h))


def _keeps(w: torch.Tensor, det, cols: torch.Tensor):
    """(rows, cols) where W[:, cols] keeps detection's pattern (block: a row order found for it, none
    where W's own will do, with no more nonzero blocks), else None."""
    if det.pattern == "2:4":
        return (None, cols) if violations_24(permute(w.detach(), None, cols)) == 0 else None
    b, have = det.block, _detected_blocks(w, det)
    if block_count(w, None, cols, b) <= have:
        return None, cols
    rows, nnzb = rows_for(w, cols, b)
    return (rows, cols) if nnzb <= have else None


def _detected_blocks(w: torch.Tensor, det) -> int:
    """The nonzero blocks detection found for W (block pattern)."""
    b = det.block
    return round(det.block_density * math.ceil(w.shape[0] / b) * math.ceil(w.shape[1] / b))


def _mm_input(mm_node: fx.Node) -> fx.Node:
    """x of a dense linear: mm(x, W_t) / addmm(b, x, W_t)."""
    mm = args_of(mm_node)
    return mm.self if mm_node.target is aten.mm.default else mm.mat1


def downstream(gm: fx.GraphModule, node: fx.Node, n: int) -> Optional[fx.Node]:
    """The one dense linear (mm / addmm with a constant weight, dense_site_ok) that all of node's
    output (n columns) reaches, as its input, through column-agnostic ops that nothing else reads,
    with no other tensor with columns of its own coming in (upstream, from that linear); else None."""
    inside, todo, found = {node}, [node], set()
    while todo:
        cur = todo.pop()
        for u in cur.users:
            if u in inside or u in found:
                continue
            if u.op == "call_function" and u.target in _DENSE_LINEARS:
                mm = args_of(u)
                if _mm_input(u) is cur and mm.mat2 is not cur and (u.target is aten.mm.default or mm.self is not cur):
                    found.add(u)
                    continue
                return None
            carried = _carried(u, n)
            if not carried or cur not in carried:
                return None
            inside.add(u)
            todo.append(u)
    if len(found) != 1:
        return None
    (c,) = found
    mm = args_of(c)
    if not dense_site_ok(gm, c) or len(mm.mat2.users) != 1:
        return None
    mark = Placed(node, "dense", "", None)  # (upstream's leaf record for this layer)
    return c if upstream(_mm_input(c), c, {node: mark}, n) == [mark] else None


def _down_order(gm: fx.GraphModule, node: fx.Node, w: torch.Tensor, det, rows: torch.Tensor,
                cols: Optional[torch.Tensor], max_density: float):
    """(the linear after, a row order for W) where a block layer's output order can be read by the
    dense linear after it (downstream) instead of mapped in its own store: that linear's weight W2
    then has its columns permuted alike (fold_down), which costs it nothing where W2 has no zero
    at all, or where W2 in that order is block-sparse as stored (at most max_density of its
    blocks nonzero: no order of its own to apply). The order is first one shared by both weights
    (formats/permute.shared_order; a model whose hidden units were reordered alike in fc1's rows
    and fc2's columns gets both back as blocks), then detection's; taken where W keeps its nonzero
    block count. Else None."""
    c = downstream(gm, node, w.shape[0])
    if c is None:
        return None
    w2 = constant(gm, args_of(c).mat2).t()  # [N2, H]: one column per output of this layer
    b, have = det.block, _detected_blocks(w, det)
    dense = bool((w2 != 0).all())
    total2 = math.ceil(w2.shape[0] / b) * math.ceil(w2.shape[1] / b)
    candidates = [] if dense else [shared_order(permute(w.detach(), None, cols), w2, b)]
    for h in [*candidates, rows]:
        if h is not rows and block_count(w, h, cols, b) > have:
            continue
        if dense or block_count(w2, None, h, b) <= max_density * total2:
            return c, h
    return None


def fold_down(gm: fx.GraphModule, down: fx.Node, p: torch.Tensor) -> None:
    """The dense linear `down` reads its input as x[:, p]: its weight's columns permuted by p
    (W2[:, p], in the layout the constant had)."""
    mm = args_of(down)
    wt = mm.mat2
    set_args(down, mat2=permuted_constant(gm, wt, p, "_permuted_weight", down, dim=0))
    erase_constant(gm, wt)


# ---- graph edits (after the layer is rewritten)

def remove(found: list) -> int:
    """Take the shuffles out of the graph: what read each one's output reads its input (for stacked
    shuffles, the input of the first). Returns how many."""
    replaced: dict = {}
    for s in found:
        start = s.start
        while start in replaced:
            start = replaced[start]
        s.end.replace_all_uses_with(start)
        replaced[s.end] = start
    for s in found:
        gm = s.end.graph.owning_module
        idx = [a for nd in s.nodes for a in nd.all_input_nodes if a.op == "get_attr"]
        erase_dead([s.end])
        for a in idx:
            erase_constant(gm, a)
    return len(found)


def permuted_constant(gm: fx.GraphModule, node: fx.Node, p: torch.Tensor, base: str, near: fx.Node,
                      dim: int = 0) -> fx.Node:
    """A new constant: node's tensor with its entries along dim permuted by p (t.index_select(dim, p)),
    in the layout it had (a transposed weight stays transposed)."""
    t = constant(gm, node)
    if t is None:
        raise RuntimeError(f"{node} is not a constant")
    idx = p.to(t.device)
    if t.dim() == 2 and t.stride(0) == 1 and t.stride(1) != 1:  # W^T [K, N] as a transposed view of W [N, K]
        new = t.t().index_select(1 - dim, idx).contiguous().t()
    else:
        new = t.index_select(dim, idx).contiguous()
    return add_constant(gm, base, new, near)


def fold_into(gm: fx.GraphModule, layer: Placed, p: torch.Tensor, consumer: str) -> str:
    """Make `layer` write its output as out[:, p] (p: the consumer's x_index); returns what it says."""
    node = layer.node
    # a block op whose new out_index would not be the identity: its blocks made again where that
    # costs no nonzero block (asked before its output order changes)
    reblock = layer.pattern == "block" and layer.out_map(compose(layer.out_perm, p)) is not None and \
        layer.reblocks(p)
    layer.out_perm = compose(layer.out_perm, p)
    if layer.pattern == "dense":
        mm = args_of(node)
        wt = mm.mat2
        set_args(node, mat2=permuted_constant(gm, wt, p, "_permuted_weight", node, dim=1))
        if node.target is aten.addmm.default:
            set_args(node, self=permuted_constant(gm, mm.self, p, "_permuted_bias", node))
            erase_constant(gm, mm.self)
        erase_constant(gm, wt)
        return f"weight rows and bias permuted to write {consumer}'s input order"
    op = args_of(node)
    if op.bias is not None:
        set_args(node, bias=permuted_constant(gm, op.bias, p, "_permuted_bias", node))
        erase_constant(gm, op.bias)
    if layer.pattern == "block":
        if reblock:  # the blocks made again in the new order: no out_index
            layer.rows = layer.out_perm
            _remake(gm, layer, op)
            _set_index(gm, node, "out_index", None)
            return f"blocks made again in {consumer}'s input order (no output map)"
        oi = layer.out_map()
        dev = constant(gm, op.blocks).device
        _set_index(gm, node, "out_index", None if oi is None else index_tensor(oi, dev))
        if oi is None:
            return f"writes {consumer}'s input order: its output order and {consumer}'s cancel (no output map)"
        return f"outputs mapped to {consumer}'s input order in the kernel's store"
    _remake(gm, layer, op)
    return f"rows of its constants permuted to write {consumer}'s input order"


def _set_index(gm: fx.GraphModule, node: fx.Node, name: str, t: Optional[torch.Tensor]) -> None:
    """An op's index argument (x_index / out_index, given by keyword) set to a new constant, or
    taken out for None; the old constant removed where nothing else reads it."""
    old = node.kwargs.get(name)
    kwargs = {k: v for k, v in node.kwargs.items() if k != name}
    if t is not None:
        kwargs[name] = add_constant(gm, f"_permuted_{name}", t, node)
    node.kwargs = kwargs
    erase_constant(gm, old)


def _remake(gm: fx.GraphModule, layer: Placed, op) -> None:
    """The op's constants made again from W[rows][:, cols] (2:4: W[out_perm][:, cols])."""
    rows = layer.rows if layer.pattern == "block" else layer.out_perm
    tensors = layer.remake(permute(layer.w, rows, layer.cols))
    old = [getattr(op, name) for name in tensors]
    set_args(layer.node, **{name: add_constant(gm, f"_permuted_{name}", t, layer.node) for name, t in tensors.items()})
    for o in old:
        erase_constant(gm, o)


def gather_x(x: fx.Node, x_index: fx.Node, near: fx.Node) -> fx.Node:
    """x[:, x_index] as a graph node before near (for a kernel without an in-kernel gather), as
    post-grad graphs write it (index_select is decomposed to index before they are made)."""
    graph = near.graph
    with graph.inserting_before(near):
        g = graph.call_function(aten.index.Tensor, (x, [None, x_index]))
    stamp(g, near)
    return g


def gather_after(y: fx.Node, index: fx.Node) -> fx.Node:
    """y[:, index] as a graph node right after y, read by what read y."""
    graph = y.graph
    with graph.inserting_after(y):
        g = graph.call_function(aten.index.Tensor, (y, [None, index]))
    y.replace_all_uses_with(g, delete_user_cb=lambda u: u is not g)
    stamp(g, y)
    return g


def is_our_op(node: fx.Node) -> bool:
    """One of the sparse linear ops (the records of a rewritten layer)."""
    return node.op == "call_function" and node.target in (LINEAR_24, LINEAR_BLOCK, LINEAR_CSLT)


def dense_site_ok(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A dense mm / addmm whose output order can be changed by permuting constants: its weight a
    constant transposed view (as freezing leaves nn.Linear's) and its bias a constant."""
    if node.op != "call_function" or node.target not in _DENSE_LINEARS:
        return False
    mm = args_of(node)
    wt = constant(gm, mm.mat2)
    if wt is None or wt.dim() != 2 or not wt.dtype.is_floating_point:
        return False
    if node.target is aten.addmm.default:
        b = constant(gm, mm.self)
        if b is None or b.dim() != 1 or mm.beta != 1 or mm.alpha != 1:
            return False
    return True

