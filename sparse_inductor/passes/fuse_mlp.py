"""Block MLP pairs: fc1 -> activation -> fc2, both block-sparse on the block template.

Runs after linear_rewrite, on what it made. Before (a ViT's MLP, post-grad; the views and the row
checks as linear_rewrite leaves them):

    g1  = <row check of x>                                      (exact mode; in x's norm)
    y1  = sparse_inductor.linear_block(x, W1..., b1, H, K, "triton", row_check=g1)
    a   = <pointwise ops of y1 alone: the activation, decomposed (GELU: mul, erf, add, mul)>
    g2  = sparse_inductor.row_check(a)                          (exact mode: reads all of a)
    y   = sparse_inductor.linear_block(a, W2..., b2, N, H, "triton", row_check=g2)

After, by default (exact mode): fc2's check comes from fc1's input (_derive_check):

    flag = amax(|x|, 1) + sum(0 * x, 1)                         (fuses into x's norm)
    g2   = 0 * log(safe - flag)                                (NaN where h may be non-finite)
    y    = sparse_inductor.linear_block(a, W2..., b2, N, H, "triton", row_check=g2)

or, with options fuse_mlp (where measured faster than the two apart):

    y    = sparse_inductor.mlp_block(x, W1..., b1, W2..., b2, H, N, act, "triton", safe, flag)

so h = act(y1) never reaches memory (lowering/block_mlp.py). Conditions: fp16 or bf16 (the
activation is identified exhaustively, below), y1 used only by the activation's ops and those only
by fc2 and fc2's row check, b1 a constant (`safe`, the threshold under which fc1 cannot overflow,
needs max|b1|); fusion also needs the same block size in both.

The activation is identified by running the ops between the layers on every value of the 16-bit
dtype (all 65536 bit patterns, NaN and Inf included) and comparing with each activation the
kernel has, computed as the kernel computes it (KERNEL_ACTIVATIONS: in fp32, rounded to the dtype):
equal up to one unit in the last place (the ops may come in another order) with the same NaN and
Inf positions. So the kernel applies the function the graph did, not a guess from op names, and
|act(t)| <= |t| holds for what is accepted (the derived check relies on it).
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Optional

import torch
import torch.fx as fx

from .. import _compat, ops  # noqa: F401  (ops defines torch.ops.sparse_inductor)
from ..options import SparseOptions
from .linear_rewrite import _derived, _is_pointwise, add_constant, erase_constant

log = logging.getLogger("sparse_inductor")
aten = torch.ops.aten

__all__ = ["BOUNDED_ACTIVATIONS", "HiddenPlan", "derived_check", "fuse_mlps", "guarded", "hidden_plan",
           "identify_activation", "pointwise_source", "predicts"]

_BLOCK = torch.ops.sparse_inductor.linear_block.default
_VIEWS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_DTYPES = (torch.float16, torch.bfloat16)


def _is_check(node: fx.Node) -> bool:
    return node.meta.get("sparse_inductor") == "row_check"


def _pair(b: fx.Node, h: Optional[fx.Node] = None) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """For fc2's op node b (input h, default b's first argument): (fc1's op node, the pointwise / view
    nodes between them in graph order), where fc2's input is computed from fc1's output alone by
    pointwise ops and views (a DAG: the GELU decomposed reads its input twice) and nothing else reads
    fc1's output or those nodes (but the row check over fc2's input, for fc2); else None."""
    found = pointwise_source(b.args[0] if h is None else h,
                             lambda n: n.op == "call_function" and n.target is _BLOCK and n.args[8] == "triton")
    if found is None:
        return None
    a, seen = found
    inside = set(seen) | {b}
    for n in [a, *seen]:
        for u in n.users:
            if u not in inside and not (_is_check(u) and _feeds_only(u, b)):
                return None
    return a, seen


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
        if cur.op != "call_function" or not (cur.target in _VIEWS or _is_pointwise(cur.target)) or len(seen) > 64:
            return None
        seen[cur] = None
        todo.extend(cur.all_input_nodes)
    if src is None:
        return None
    order = {n: i for i, n in enumerate(h.graph.nodes)}
    return src, sorted(seen, key=order.__getitem__)


def _feeds_only(node: fx.Node, target: fx.Node, depth: int = 4) -> bool:
    """Whether every path from node ends at target within a few row-check nodes."""
    if depth == 0:
        return False
    return all(u is target or (_is_check(u) and _feeds_only(u, target, depth - 1)) for u in node.users)


def _probe(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def _run_chain(nodes: list[fx.Node], start: fx.Node, t: torch.Tensor) -> torch.Tensor:
    env = {start: t}
    for n in nodes:
        if n.target in _VIEWS:
            env[n] = env[n.args[0]]
            continue
        args = [env[a] if isinstance(a, fx.Node) else a for a in n.args]
        kwargs = {k: (env[v] if isinstance(v, fx.Node) else v) for k, v in n.kwargs.items()}
        env[n] = n.target(*args, **kwargs)
    return env[nodes[-1]] if nodes else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to one unit in the last place, NaN where the other is NaN, Inf where it is Inf."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return False
    a, b = a[~na], b[~nb]
    if not torch.equal(a.isinf(), b.isinf()):
        return False
    eq = a == b
    ia, ib = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)  # (16-bit dtypes)
    near = ((ia - ib).abs() <= 1) & (a.signbit() == b.signbit()) & a.isfinite() & b.isfinite()
    return bool((eq | near).all())


def identify_activation(nodes: list[fx.Node], start: fx.Node, dtype: torch.dtype,
                        candidates: Optional[dict] = None) -> Optional[str]:
    """Which of candidates (default KERNEL_ACTIVATIONS) the chain computes on every value of the
    16-bit dtype, or None."""
    if dtype not in _DTYPES:
        return None
    p = _probe(dtype)
    try:
        with torch.no_grad():
            out = _run_chain(nodes, start, p)
    except Exception as e:  # an op that will not run on a 1-D CPU tensor: not an activation we know
        log.debug("sparse_inductor: fuse_mlp: chain did not run on the probe: %s", e)
        return None
    if not isinstance(out, torch.Tensor) or out.dtype != dtype or out.shape != p.shape:
        return None
    h = p.float()
    for name, fn in (KERNEL_ACTIVATIONS if candidates is None else candidates).items():
        if _same(out, fn(h).to(dtype)):
            return name
    return None


# What block_mlp.mlp_act computes on an fp32 tile, in torch ops (the chain is compared with these,
# not with F.gelu & co., whose CPU kernels treat subnormals and Inf their own way)
KERNEL_ACTIVATIONS = {
    "none": lambda h: h,
    "relu": lambda h: torch.where(h < 0, 0.0, h),
    "gelu": lambda h: 0.5 * h * (1.0 + torch.erf(h * 0.7071067811865476)),
    "silu": lambda h: h * torch.sigmoid(h),
}
# With the tanh GELU too (no kernel of ours computes it): every one has |act(t)| <= |t|, all a
# derived row check needs (passes/derived_check.py, passes/lib_activation.py)
BOUNDED_ACTIVATIONS = {
    **KERNEL_ACTIVATIONS,
    "gelu_tanh": lambda h: 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))),
}


def _constant(gm: fx.GraphModule, n) -> Optional[torch.Tensor]:
    if n is None:
        return None
    if isinstance(n, fx.Node) and n.op == "get_attr":
        t = _compat.get_attr(gm, n.target)
        return t if isinstance(t, torch.Tensor) else None
    return None


def _flag(x: fx.Node, near: fx.Node) -> fx.Node:
    """flag [M] fp32 = max_k |x[m, k]| + sum_k 0 * x[m, k] (block_mlp.row_flag: NaN or Inf for a row
    holding one), as Inductor ops: two reductions over x that fuse into x's norm."""
    graph = x.graph
    with graph.inserting_before(near):
        xf = graph.call_function(torch.ops.prims.convert_element_type.default, (x, torch.float32))
        amax = graph.call_function(aten.amax.default, (graph.call_function(aten.abs.default, (xf,)), [1]))
        zero = graph.call_function(aten.sum.dim_IntList, (graph.call_function(aten.mul.Tensor, (xf, 0.0)), [1]))
        f = graph.call_function(aten.add.Tensor, (amax, zero))
    for n in (xf, amax.args[0], amax, zero.args[0], zero, f):
        _derived(n, near)
        n.meta["sparse_inductor"] = "row_check"
    return f


def _erase_dead(nodes) -> None:
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


def fuse_mlps(gm: fx.GraphModule, opts: SparseOptions) -> int:
    """The pass body: returns how many pairs it fused (options fuse_mlp); in exact mode, the pairs it
    leaves apart get fc2's row check from fc1's input (_derive_check); and the pairs left apart skip
    the hidden units fc2 does not read (_skip_hidden)."""
    if not opts.fuse_mlp and opts.nonfinite != "exact" and not opts.rules.skip_hidden:
        return 0
    fused = 0
    for b in list(gm.graph.nodes):
        if b.op != "call_function" or b.target is not _BLOCK or b.args[8] != "triton":
            continue
        fused += guarded(lambda: _try_fuse(gm, b, opts), b, "MLP fusion")
    return fused


def guarded(fn: Callable[[], int], node: fx.Node, what: str) -> int:
    """fn(), or 0 where it raises (never break the user's compile; fn rewires uses only at its end,
    so what it made before raising is unread, and Inductor drops it): logged, and the record of
    node's layer says what failed."""
    try:
        return fn()
    except Exception as e:
        log.exception("sparse_inductor: %s failed at %s", what, node.name)
        note = node.meta.get("sparse_inductor_layer")
        if note:
            note[0].reason += f"; {what} failed ({type(e).__name__}: {e})"
        return 0


def _try_fuse(gm: fx.GraphModule, b: fx.Node, opts: SparseOptions) -> int:
    """One fc1 -> activation -> fc2 pair ending at fc2's op node b: fused (options fuse_mlp, where
    measured faster), else, in exact mode, fc2's row check derived from fc1's input (_derive_check).
    Returns 1 where it fused."""
    found = _pair(b)
    if found is None:
        return 0
    a, nodes = found
    (dec_a, layer_a), (dec_b, _) = a.meta.get("sparse_inductor_layer", (None, None)), \
        b.meta.get("sparse_inductor_layer", (None, None))
    if dec_a is None or dec_b is None:
        return 0
    x, blocks1, row_ptr1, col_idx1, row_order1, bias1, h, k = a.args[:8]
    hx, blocks2, row_ptr2, col_idx2, row_order2, bias2, n, h2 = b.args[:8]
    t2 = _constant(gm, blocks2)
    why, act, safe = _fc1_side(gm, a, nodes)
    if why is None and (t2 is None or h != h2):
        why = "a weight is not a constant"
    exact = opts.nonfinite == "exact"
    if why is not None:
        log.debug("sparse_inductor: %s + %s: neither fused nor checked through fc1: %s", dec_a.name, dec_b.name, why)
        if exact and isinstance(b.kwargs.get("row_check"), fx.Node):
            keeps_own_check(dec_b, dec_a, why)
        return 0
    t1, b1 = _constant(gm, blocks1), _constant(gm, bias1)
    if opts.fuse_mlp and t1.shape[-1] == t2.shape[-1]:
        consts = tuple(_constant(gm, c) for c in (blocks1, row_ptr1, col_idx1, blocks2, row_ptr2, col_idx2, row_order2))
        t_fused, t_apart = _time(dec_a, dec_b, layer_a, consts, b1, h, n, act, exact, safe, opts)
        if opts.force or t_fused is None or t_apart is None or t_fused * opts.min_speedup <= t_apart:
            _fuse(gm, a, b, nodes, act, safe, exact, dec_a, dec_b, layer_a, t_fused, t_apart)
            return 1
        dec_a.reason += f"; not fused with {dec_b.name}: one kernel {t_fused:.1f} us vs {t_apart:.1f} us apart"
    g = None
    if exact and opts.rules.derived_check and isinstance(b.kwargs.get("row_check"), fx.Node):
        why = _derive_why(a, safe, dec_a, layer_a, dec_b.name)
        if why is not None:
            keeps_own_check(dec_b, dec_a, why)
        else:
            g = _derive_check(a, b, safe, dec_a, dec_b, layer_a, act)
    if opts.rules.skip_hidden and (g is not None or (not exact and not a.kwargs.get("guard", True)
                                          and not b.kwargs.get("guard", True))):
        _skip_hidden(gm, a, b, act, g, dec_a, dec_b)
    return 0


def _fc1_side(gm: fx.GraphModule, a: fx.Node, nodes: list) -> tuple[Optional[str], Optional[str], float]:
    """(why fc1's op a and the ops after it neither fuse nor give a check, or None; the activation;
    safe, the bound under which fc1 cannot overflow: block_mlp.safe_bound, 0 where W1 / b1 hold a
    NaN or Inf)."""
    from ..lowering import block_mlp

    blocks1, row_ptr1, bias1 = a.args[1], a.args[2], a.args[5]
    val = a.meta.get("val")
    t1 = _constant(gm, blocks1)
    why = None
    if not isinstance(val, torch.Tensor) or val.dtype not in _DTYPES:
        why = "fp16 / bf16 only"
    elif t1 is None:
        why = "a weight is not a constant"
    elif bias1 is not None and _constant(gm, bias1) is None:
        why = "fc1's bias is not a constant"
    act = identify_activation(nodes, a, val.dtype) if why is None else None
    if why is None and act is None:
        why = "the ops between the two layers are not an activation the fused kernel has"
    if why is not None:
        return why, None, 0.0
    return None, act, block_mlp.safe_bound(t1, _constant(gm, row_ptr1), _constant(gm, bias1), val.dtype)


def _derive_why(a: fx.Node, safe: float, dec_a, layer_a, name_b: str) -> Optional[str]:
    """Why fc2 cannot take its check from fc1's (op a) input, or None."""
    # (safe 0: W1 or b1 holds a NaN/Inf, so even a zero row of x may give a non-finite h)
    if safe <= 0:
        return f"{dec_a.name}'s weight or bias holds a NaN/Inf"
    if not (layer_a.row_check == "fused" or a.args[7] <= a.args[6]):  # (fc1's K <= H)
        return f"reading {dec_a.name}'s input costs more than reading {name_b}'s"
    return None


def predicts(gm: fx.GraphModule, h: fx.Node, b: fx.Node, name_b: str, opts: SparseOptions) -> bool:
    """True where this pass will give a block fc2 (its linear node b, input h, not yet rewritten) its
    check from fc1's input (or fuse the two): the dispatcher then times fc2's block template without
    a pass over h (triton_block._runner). An internal error here says False (timed as before)."""
    if opts.nonfinite != "exact" or not opts.rules.derived_check:
        return False
    try:
        found = _pair(b, h)
        if found is None or "sparse_inductor_layer" not in found[0].meta:
            return False
        a, nodes = found
        dec_a, layer_a = a.meta["sparse_inductor_layer"]
        why, _, safe = _fc1_side(gm, a, nodes)
        return why is None and _derive_why(a, safe, dec_a, layer_a, name_b) is None
    except Exception:
        log.exception("sparse_inductor: fuse_mlp.predicts failed for %s", name_b)
        return False


def keeps_own_check(dec_b, dec_a, why: str) -> None:
    """Says in fc2's record why its non-finite row check stays over its own input."""
    dec_b.reason += f"; non-finite row check over its own input, not from {dec_a.name}'s: {why}"


def _derive_check(a: fx.Node, b: fx.Node, safe: float, dec_a, dec_b, layer_a, act: str) -> fx.Node:
    """fc2's non-finite row check, read from fc1's input instead of from the hidden activations.

    fc2 (the block template) needs g[m] NaN for the rows whose input (h = act(fc1(x))) may hold a
    NaN/Inf: only then does it read the columns it skips (nan_where_skipped) and put NaN where dense
    has it. h's row is finite when x's row is and fc1 cannot overflow: flag[m] = max|x[m]| + sum 0 *
    x[m] under `safe` (block_mlp.safe_bound; |act(t)| <= |t|). So g[m] = 0 * log(safe - flag[m]) is 0
    for such rows (a finite log) and NaN for the others (log of 0 is -Inf, of a negative number or
    NaN is NaN: strictly under, as the fused kernel's `flag < SAFE`): a NaN or Inf in x, or an x large
    enough that fc1 might overflow. For those the kernel looks at h itself: the same NaN/Inf
    positions as before.
    The flag is two reductions over x that Inductor fuses into x's norm (ViT: LayerNorm), where the
    check over h was a kernel of its own reading the hidden activations (ViT-B/16 b64: 77 MB, ~29 us
    a layer on the H200, run K). Returns g (made before fc1, which _skip_hidden may give it too)."""
    old = b.kwargs["row_check"]
    g = derived_check(a.args[0], a, b, safe)
    b.kwargs = {**b.kwargs, "row_check": g}
    _erase_dead([old])
    dec_b.row_check = "from fc1's input, in its norm" if layer_a.row_check == "fused" else "from fc1's input"
    dec_b.reason += f"; non-finite row check read from {dec_a.name}'s input (through the {act})"
    return g


def derived_check(x: fx.Node, a: fx.Node, b: fx.Node, safe: float) -> fx.Node:
    """g [M] fp32 = 0 * log(safe - flag(x)) (_derive_check): 0 where fc1 (node a, input x) cannot make
    a row of h non-finite, NaN where it may; made before a, with b's provenance."""
    graph = a.graph
    flag = _flag(x, a)
    with graph.inserting_before(a):
        gap = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.sub.Tensor, (flag, float(safe))), -1.0))
        g = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.log.default, (gap,)), 0.0))
    for n in (gap.args[0], gap, g.args[0], g):
        _derived(n, b)
        n.meta["sparse_inductor"] = "row_check"
    return g


class HiddenPlan(NamedTuple):
    """What _skip_hidden changes (hidden_plan): fc1's row order with its `live` block rows first;
    fc2's weight without the blocks on constant hidden units (None: none dropped) and its bias with
    their product folded in (fp32 [n]; None: nothing to fold)."""
    live: int
    row_order1: torch.Tensor
    weight2: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    bias2: Optional[torch.Tensor]
    unread: int
    constant: int
    dropped: int


def hidden_plan(blocks1: torch.Tensor, row_ptr1: torch.Tensor, row_order1: torch.Tensor, bias1: Optional[torch.Tensor],
                blocks2: torch.Tensor, row_ptr2: torch.Tensor, col_idx2: torch.Tensor, bias2: Optional[torch.Tensor],
                h: int, n: int, act: str) -> Optional[HiddenPlan]:
    """The hidden units fc2 does not need (see _skip_hidden), for W1 [h, K] and W2 [n, h] in the block
    layout (one block size, x's dtype); None where there are none."""
    bsz, dtype = blocks1.shape[-1], blocks1.dtype
    hb = row_ptr1.numel() - 1
    if blocks2.shape[-1] != bsz or blocks2.dtype != dtype or dtype not in _DTYPES or hb != -(-h // bsz):
        return None
    ci2 = col_idx2.long().cpu()
    used = torch.zeros(hb, dtype=torch.bool)
    used[ci2] = True
    empty1 = (row_ptr1[1:] - row_ptr1[:-1]).cpu() == 0
    # act(b1) as fc1's template and the activation compute it (fp32, one rounding to the dtype)
    c = torch.zeros(hb * bsz, dtype=torch.float64)
    c[:h] = KERNEL_ACTIVATIONS[act](bias1.float().cpu() if bias1 is not None else torch.zeros(h)).to(dtype).double()
    drop = empty1[ci2]  # fc2's blocks on constant hidden blocks
    if drop.any() and not (bool(c.isfinite().all()) and bool(blocks2[drop.to(blocks2.device)].isfinite().all())):
        drop[:] = False  # a NaN/Inf to fold: left to the kernels
    const = torch.zeros(hb, dtype=torch.bool)
    const[ci2[drop]] = True
    skip = ~used | const
    if not skip.any():
        return None
    order = row_order1.long().cpu()
    keep = ~skip[order]
    order1 = torch.cat([order[keep], order[~keep]]).to(torch.int32).to(row_order1.device)
    plan = HiddenPlan(int(keep.sum()), order1, None, None, int((~used).sum()), int(const.sum()), int(drop.sum()))
    if not drop.any():
        return plan
    nb2 = row_ptr2.numel() - 1
    counts2 = (row_ptr2[1:] - row_ptr2[:-1]).long().cpu()
    rows2 = torch.repeat_interleave(torch.arange(nb2), counts2)
    dropped = blocks2[drop.to(blocks2.device)].double().cpu()  # [nd, B, B]: [r, s] = W2[rb*B + r, j*B + s]
    contrib = torch.einsum("irs,is->ir", dropped, c.view(hb, bsz)[ci2[drop]])
    fold = torch.zeros(nb2 * bsz, dtype=torch.float64)
    fold.index_add_(0, (rows2[drop][:, None] * bsz + torch.arange(bsz)).flatten(), contrib.flatten())
    fold = fold[:n]
    if bias2 is not None:
        fold += bias2.double().cpu()
    kept = ~drop
    counts = torch.zeros(nb2, dtype=torch.long).index_add_(0, rows2[kept], torch.ones(int(kept.sum()), dtype=torch.long))
    row_ptr = torch.zeros(nb2 + 1, dtype=torch.int32)
    row_ptr[1:] = counts.cumsum(0).to(torch.int32)
    row_order = torch.sort(-counts, stable=True).indices.to(torch.int32)  # as compress_block orders them
    dev = blocks2.device
    weight2 = (blocks2[kept.to(dev)].contiguous(), row_ptr.to(dev), col_idx2[kept.to(dev)].contiguous(), row_order.to(dev))
    return plan._replace(weight2=weight2, bias2=fold.to(torch.float32).to(dev))


def _skip_hidden(gm: fx.GraphModule, a: fx.Node, b: fx.Node, act: str, g: Optional[fx.Node], dec_a, dec_b) -> None:
    """Hidden units that fc2 does not need, left out of fc1's work.

    With W1, W2 block-sparse, a hidden block j (B units) is
    - unread: W2's block column j is empty (no W2 block reads h[:, j]);
    - constant: W1's block row j is empty, so for a finite row of x, h[m, j] = act(b1[j]), whatever
      x: fc2 drops its blocks in column j and adds their product with act(b1[j]), computed here once
      (fp64, rounded to fp32), to its bias: y = dtype(fp32(fc2 without bias) + (b2 + W2[:, j] @ c));
    - live otherwise.
    fc1 then computes only its live block rows (linear_block's live: row_order puts them first),
    except in the M tiles holding a row whose g is NaN (skip_check=g): the rows fc2's non-finite
    fixup reads h for, where dense would compute 0 * h[m, j] (unread) or W2[:, j] * h[m, j]
    (constant: h[m, j] is NaN there when x's row holds a NaN/Inf). The fixup reads only such rows
    (nan_where_skipped), so nothing reads an unwritten tile. Without the check (options
    nonfinite="fast": no guard on either layer), the rows are skipped everywhere.

    Random 90%-zero 64x64 masks (bench: ViT-B's MLPs) leave 0.9**12 = 28% of the hidden blocks
    unread and as many constant: fc1 computes about half of its output."""
    x, blocks1, row_ptr1, col_idx1, row_order1, bias1, h = a.args[:7]
    hx, blocks2, row_ptr2, col_idx2, row_order2, bias2, n = b.args[:7]
    args = (blocks1, row_ptr1, row_order1, bias1, blocks2, row_ptr2, col_idx2, bias2)
    consts = [_constant(gm, c) for c in args]
    if any(t is None and c is not None for t, c in zip(consts, args)):  # (a bias may be None)
        return
    plan = hidden_plan(*consts, h, n, act)
    if plan is None:
        return
    graph = gm.graph

    def constant(name: str, t: torch.Tensor, near: fx.Node) -> fx.Node:
        return add_constant(gm, f"_sparse_hidden_{name}", t, near)

    a.args = (*a.args[:4], constant("row_order", plan.row_order1, a), *a.args[5:])
    a.kwargs = {**a.kwargs, "live": plan.live, "skip_check": g}
    erase_constant(gm, row_order1)
    hb = plan.row_order1.numel()
    dec_a.fused = dec_a.fused + ("hidden-skip",)
    dec_a.reason += (f"; computes {plan.live} of its {hb} block rows ({plan.unread} that {dec_b.name} does not "
                     f"read, {plan.constant} constant, folded into {dec_b.name}'s bias)") + \
        ("; the others only in M tiles holding a row fc2's check flags" if g is not None else "")
    if plan.weight2 is None:
        return
    # fc2 without its blocks on constant hidden units; their product goes into an fp32 bias
    new2 = tuple(constant(name, t, b) for name, t in zip(("blocks", "row_ptr", "col_idx", "row_order"), plan.weight2))
    b.args = (hx, *new2, None, *b.args[6:])
    bias_node = constant("bias", plan.bias2, b)
    with graph.inserting_after(b):
        yf = graph.call_function(torch.ops.prims.convert_element_type.default, (b, torch.float32))
    with graph.inserting_after(yf):
        ys = graph.call_function(aten.add.Tensor, (yf, bias_node))
    with graph.inserting_after(ys):
        y = graph.call_function(torch.ops.prims.convert_element_type.default, (ys, b.meta["val"].dtype))
    b.replace_all_uses_with(y, delete_user_cb=lambda u: u is not yf)
    for nd in (yf, ys, y):
        _derived(nd, b)
    for nd in (blocks2, row_ptr2, col_idx2, row_order2, bias2):
        erase_constant(gm, nd)
    dec_b.fused = dec_b.fused + ("hidden-fold",)
    dec_b.reason += f"; its {plan.dropped} blocks on {dec_a.name}'s constant hidden units folded into its bias"


def _fuse(gm, a, b, nodes, act, safe, exact, dec_a, dec_b, layer_a, t_fused, t_apart) -> None:
    graph = gm.graph
    x, blocks1, row_ptr1, col_idx1, row_order1, bias1, h, k = a.args[:8]
    hx, blocks2, row_ptr2, col_idx2, row_order2, bias2, n, h2 = b.args[:8]
    flag = _flag(x, b) if exact else None
    with graph.inserting_before(b):
        new = graph.call_function(torch.ops.sparse_inductor.mlp_block.default,
                                  (x, blocks1, row_ptr1, col_idx1, bias1, blocks2, row_ptr2, col_idx2, row_order2, bias2,
                                   h, n, act, "triton", float(safe), flag))
    new.meta.update({key: v for key, v in b.meta.items() if key not in ("val", "sparse_inductor_layer")})
    new.meta["val"] = _compat.fake_eval(new)
    b.replace_all_uses_with(new)
    starts = [v for v in (b.kwargs.get("row_check"), *reversed(nodes), a, a.kwargs.get("row_check"))
              if isinstance(v, fx.Node)]
    graph.erase_node(b)
    _erase_dead(starts)  # the chain, fc1's op and both row checks
    if not row_order1.users:
        graph.erase_node(row_order1)
    timed = f": one kernel {t_fused:.1f} us vs {t_apart:.1f} us apart" if t_fused is not None and t_apart else ""
    if t_fused is not None and t_apart is not None and t_fused > t_apart:
        timed += "; slower, fused under options force"
    for dec, other in ((dec_a, dec_b), (dec_b, dec_a)):
        dec.fused = dec.fused + ("mlp",)
        dec.reason += f"; fused with {other.name} and the {act} between them into one kernel (block MLP{timed})"
        if exact:
            dec.row_check = "MLP flag in x's norm" if dec is dec_a and layer_a.row_check == "fused" else \
                "MLP flag" if dec is dec_a else "in the MLP kernel"
    log.info("sparse_inductor: fused %s + %s (%s) into one block MLP kernel%s", dec_a.name, dec_b.name, act, timed)


def _time(dec_a, dec_b, layer_a, consts, b1, h, n, act, exact, safe, opts) -> tuple[Optional[float], Optional[float]]:
    """(fused us, the two layers' us) where both can be known: the layers' times from their records
    (the dispatcher's measurements), the fused kernel's measured now (cached on disk), on CUDA with
    dispatch other than "model". (None, None) otherwise: fused without a comparison."""
    apart = (dec_a.sparse_us + dec_b.sparse_us) if dec_a.measured and dec_b.measured and \
        dec_a.sparse_us is not None and dec_b.sparse_us is not None else None
    if apart is None or layer_a.device != "cuda" or opts.dispatch == "model" or layer_a.m is None:
        return None, None
    from ..measure import time_cached

    blocks1, row_ptr1, col_idx1, blocks2, row_ptr2, col_idx2, row_order2 = consts
    m, k = layer_a.m, layer_a.k
    key = (f"mlp|M={m} K={k} H={h} N={n}|{layer_a.dtype}|block={blocks1.shape[-1]}|nnzb={blocks1.shape[0]},"
           f"{blocks2.shape[0]}|bias={b1 is not None}|act={act}|exact={exact}|rc={layer_a.row_check}")

    def make():
        from ..lowering import block_mlp

        gen = torch.Generator(device=blocks1.device).manual_seed(0)
        x = torch.randn(m, k, device=blocks1.device, dtype=layer_a.dtype, generator=gen)
        # the flag rides in x's norm where the row check would ("fused"); else its own kernels
        flag = block_mlp.row_flag(x) if exact and layer_a.row_check == "fused" else None
        w1, w2 = (blocks1, row_ptr1, col_idx1), (blocks2, row_ptr2, col_idx2, row_order2)
        if flag is not None:
            return lambda: block_mlp.block_mlp(x, w1, b1, w2, h, n, act, safe=safe, flag=flag)
        return lambda: block_mlp.block_mlp(x, w1, b1, w2, h, n, act, exact=exact, safe=safe)

    t = time_cached(key, make, blocks1.device)
    return t, apart
