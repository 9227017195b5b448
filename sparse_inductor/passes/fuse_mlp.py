"""Block MLP pairs: fc1 -> activation -> fc2, both block-sparse on the block template.

Runs after linear_rewrite, on what it made. Before (a ViT's MLP, post-grad; the views and the row
checks as linear_rewrite leaves them):

    g1  = <row check of x>                                      (exact mode; in x's norm)
    y1  = sparse_inductor.linear_block(x, W1..., b1, H, K, "triton", row_check=g1)
    a   = <pointwise ops of y1 alone: the activation, decomposed (GELU: mul, erf, add, mul)>
    g2  = sparse_inductor.row_check(a)                          (exact mode: reads all of a)
    y   = sparse_inductor.linear_block(a, W2..., b2, N, H, "triton", row_check=g2)

After, by default (exact mode): fc2's check comes from fc1's input (_derive_check; the
conditions and the graph: row_checks.py):

    flag = amax(|x|, 1) + sum(0 * x, 1)                         (fuses into x's norm)
    g2   = 0 * log(safe - flag)                                (NaN where h may be non-finite)
    y    = sparse_inductor.linear_block(a, W2..., b2, N, H, "triton", row_check=g2)

or, with options fuse_mlp (where measured faster than the two apart):

    y    = sparse_inductor.mlp_block(x, W1..., b1, W2..., b2, H, N, act, "triton", safe, flag)

so h = act(y1) never reaches memory (lowering/block_mlp.py). Conditions: fp16 or bf16 (the
activation is identified exhaustively, below), y1 used only by the activation's ops and those only
by fc2 and fc2's row check, b1 a constant (`safe`, the threshold under which fc1 cannot overflow,
needs max|b1|); fusion also needs the same block size in both.

The activation is identified (graph.identify_activation) by running the ops between the layers on
every value of the 16-bit dtype (all 65536 bit patterns, NaN and Inf included) and comparing with each activation the
kernel has, computed as the kernel computes it (activations.py: in fp32, rounded to the dtype):
equal up to one unit in the last place (the ops may come in another order) with the same NaN and
Inf positions. So the kernel applies the function the graph did, not a guess from op names, and
|act(t)| <= |t| holds for what is accepted (the derived check relies on it).
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
import torch.fx as fx

from .. import _compat
from ..activations import ACTIVATIONS
from ..lowering import block_mlp
from ..measure import time_cached
from ..options import SparseOptions
from ..report import count
from .graph import (LINEAR_BLOCK, MLP_BLOCK, LayerNote, add_constant, args_of, constant, erase_constant, erase_dead,
                    drop_note, guarded, note_of, set_args, stamp)
from .row_checks import block_fc1, check_from_input, derive_why, fc1_side, flag, keeps_own_check

log = logging.getLogger("sparse_inductor")
aten = torch.ops.aten

__all__ = ["HiddenPlan", "fuse_mlps", "hidden_plan"]

_DTYPES = (torch.float16, torch.bfloat16)


def fuse_mlps(gm: fx.GraphModule, opts: SparseOptions) -> int:
    """The pass body: returns how many pairs it fused (options fuse_mlp); in exact mode, the pairs it
    leaves apart get fc2's row check from fc1's input (_derive_check); and the pairs left apart skip
    the hidden units fc2 does not read (_skip_hidden)."""
    if not opts.fuse_mlp and opts.nonfinite != "exact" and not opts.rules.skip_hidden:
        return 0
    fused = 0
    for b in list(gm.graph.nodes):
        if b.op != "call_function" or b.target is not LINEAR_BLOCK or args_of(b).kernel != "triton":
            continue
        fused += guarded(lambda: _try_fuse(gm, b, opts), b, "MLP fusion")
    return fused


def _try_fuse(gm: fx.GraphModule, b: fx.Node, opts: SparseOptions) -> int:
    """One fc1 -> activation -> fc2 pair ending at fc2's op node b: fused (options fuse_mlp, where
    measured faster), else, in exact mode, fc2's row check derived from fc1's input (_derive_check).
    Returns 1 where it fused."""
    found = block_fc1(b)
    if found is None:
        return 0
    a, nodes = found
    note_a, note_b = note_of(a), note_of(b)
    if note_a is None or note_b is None:
        return 0
    fc1, fc2 = args_of(a), args_of(b)
    t2 = constant(gm, fc2.blocks)
    why, act, safe = fc1_side(gm, a, nodes)
    if why is None and (t2 is None or fc1.n != fc2.k):
        why = "a weight is not a constant"
    exact = opts.nonfinite == "exact"
    if why is not None:
        log.debug("sparse_inductor: %s + %s: neither fused nor checked through fc1: %s", note_a.name, note_b.name, why)
        if exact and isinstance(fc2.row_check, fx.Node):
            keeps_own_check(note_b, note_a.name, why)
        return 0
    t1 = constant(gm, fc1.blocks)
    # a permuted pair (passes/fold_permutations.py: fc1's output columns mapped, fc2's x gathered, or
    # either layer's other side): the hidden units are no longer fc1's block rows and fc2's block
    # columns, which the fused kernel and the hidden-unit skip rely on; the derived check is a bound
    # over a whole row of x, which holds in any order
    permuted = any(v is not None for v in (fc1.x_index, fc1.out_index, fc2.x_index, fc2.out_index))
    if opts.fuse_mlp and t1.shape[-1] == t2.shape[-1] and not permuted:
        t_fused, t_apart = _time(gm, fc1, fc2, note_a, note_b, act, exact, safe, opts)
        if opts.force or t_fused is None or t_apart is None or t_fused * opts.min_speedup <= t_apart:
            _fuse(gm, a, b, nodes, act, safe, exact, note_a, note_b, t_fused, t_apart)
            return 1
        note_a.say(f"not fused with {note_b.name}: one kernel {t_fused:.1f} us vs {t_apart:.1f} us apart")
    g = None
    if exact and opts.rules.derived_check and isinstance(fc2.row_check, fx.Node):
        why = derive_why(a, safe, note_a, note_b.name)
        if why is not None:
            keeps_own_check(note_b, note_a.name, why)
        else:
            g = _derive_check(a, b, safe, note_a, note_b, act)
    if opts.rules.skip_hidden and not permuted and (g is not None or (not exact and not fc1.guard and not fc2.guard)):
        _skip_hidden(gm, a, b, act, g, note_a, note_b)
    return 0


def _derive_check(a: fx.Node, b: fx.Node, safe: float, note_a: LayerNote, note_b: LayerNote, act: str) -> fx.Node:
    """fc2's non-finite row check, read from fc1's input instead of from the hidden activations.

    fc2 (the block template) needs g[m] NaN for the rows whose input (h = act(fc1(x))) may hold a
    NaN/Inf: only then does it read the columns it skips (nan_where_skipped) and put NaN where dense
    has it. h's row is finite when x's row is and fc1 cannot overflow: flag[m] = max|x[m]| + sum 0 *
    x[m] under `safe` (block_mlp.safe_bound; |act(t)| <= |t|). So g[m] = 0 * log(safe - flag[m])
    (row_checks.check_from_input) is 0 for such rows and NaN for the others: a NaN or Inf in x, or
    an x large enough that fc1 might overflow. For those the kernel looks at h itself: the same
    NaN/Inf positions as before.
    The flag is two reductions over x that Inductor fuses into x's norm (ViT: LayerNorm), where the
    check over h was a kernel of its own reading the hidden activations (ViT-B/16 b64: 77 MB, ~29 us
    a layer on the H200, docs/performance.md). Returns g (made before fc1, which _skip_hidden may
    give it too)."""
    old = args_of(b).row_check
    g = check_from_input(args_of(a).x, a, b, safe)
    set_args(b, row_check=g)
    erase_dead([old])
    note_b.decision.row_check = ("from fc1's input, in its norm" if note_a.layer.row_check == "fused"
                                 else "from fc1's input")
    note_b.say(f"non-finite row check read from {note_a.name}'s input (through the {act})")
    count("derived_check")
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
    c[:h] = ACTIVATIONS[act].fn(bias1.float().cpu() if bias1 is not None else torch.zeros(h)).to(dtype).double()
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


def _skip_hidden(gm: fx.GraphModule, a: fx.Node, b: fx.Node, act: str, g: Optional[fx.Node], note_a: LayerNote,
                 note_b: LayerNote) -> None:
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
    fc1, fc2 = args_of(a), args_of(b)
    args = (fc1.blocks, fc1.row_ptr, fc1.row_order, fc1.bias, fc2.blocks, fc2.row_ptr, fc2.col_idx, fc2.bias)
    consts = [constant(gm, c) for c in args]
    if any(t is None and c is not None for t, c in zip(consts, args)):  # (a bias may be None)
        return
    plan = hidden_plan(*consts, fc1.n, fc2.n, act)
    if plan is None:
        return
    graph = gm.graph

    def new_constant(name: str, t: torch.Tensor, near: fx.Node) -> fx.Node:
        return add_constant(gm, f"_sparse_hidden_{name}", t, near)

    set_args(a, row_order=new_constant("row_order", plan.row_order1, a), live=plan.live, skip_check=g)
    erase_constant(gm, fc1.row_order)
    hb = plan.row_order1.numel()
    note_a.fused("hidden-skip")
    note_a.say(f"computes {plan.live} of its {hb} block rows ({plan.unread} that {note_b.name} does not "
               f"read, {plan.constant} constant, folded into {note_b.name}'s bias)")
    if g is not None:
        note_a.say("the others only in M tiles holding a row fc2's check flags")
    count("hidden_skip")
    if plan.weight2 is None:
        return
    # fc2 without its blocks on constant hidden units; their product goes into an fp32 bias
    blocks2, row_ptr2, col_idx2, row_order2 = (new_constant(name, t, b) for name, t in
                                               zip(("blocks", "row_ptr", "col_idx", "row_order"), plan.weight2))
    set_args(b, blocks=blocks2, row_ptr=row_ptr2, col_idx=col_idx2, row_order=row_order2, bias=None)
    bias_node = new_constant("bias", plan.bias2, b)
    with graph.inserting_after(b):
        yf = graph.call_function(torch.ops.prims.convert_element_type.default, (b, torch.float32))
    with graph.inserting_after(yf):
        ys = graph.call_function(aten.add.Tensor, (yf, bias_node))
    with graph.inserting_after(ys):
        y = graph.call_function(torch.ops.prims.convert_element_type.default, (ys, b.meta["val"].dtype))
    b.replace_all_uses_with(y, delete_user_cb=lambda u: u is not yf)
    for nd in (yf, ys, y):
        stamp(nd, b)
    for nd in (fc2.blocks, fc2.row_ptr, fc2.col_idx, fc2.row_order, fc2.bias):
        erase_constant(gm, nd)
    note_b.fused("hidden-fold")
    note_b.say(f"its {plan.dropped} blocks on {note_a.name}'s constant hidden units folded into its bias")
    count("hidden_fold")


def _fuse(gm: fx.GraphModule, a: fx.Node, b: fx.Node, nodes: list, act: str, safe: float, exact: bool,
          note_a: LayerNote, note_b: LayerNote, t_fused: Optional[float], t_apart: Optional[float]) -> None:
    """fc1, the activation and fc2 replaced by one sparse_inductor::mlp_block."""
    graph = gm.graph
    fc1, fc2 = args_of(a), args_of(b)
    row_flag = flag(fc1.x, b) if exact else None
    with graph.inserting_before(b):
        new = graph.call_function(MLP_BLOCK, (fc1.x, fc1.blocks, fc1.row_ptr, fc1.col_idx, fc1.bias, fc2.blocks,
                                              fc2.row_ptr, fc2.col_idx, fc2.row_order, fc2.bias, fc1.n, fc2.n, act,
                                              "triton", float(safe), row_flag))
    new.meta.update({key: v for key, v in b.meta.items() if key != "val"})
    drop_note(new)  # (the pair's records stay with fc1's and fc2's notes)
    new.meta["val"] = _compat.fake_eval(new)
    b.replace_all_uses_with(new)
    starts = [v for v in (fc2.row_check, *reversed(nodes), a, fc1.row_check) if isinstance(v, fx.Node)]
    graph.erase_node(b)
    erase_dead(starts)  # the chain, fc1's op and both row checks
    if not fc1.row_order.users:
        graph.erase_node(fc1.row_order)
    timed = f": one kernel {t_fused:.1f} us vs {t_apart:.1f} us apart" if t_fused is not None and t_apart else ""
    if t_fused is not None and t_apart is not None and t_fused > t_apart:
        timed += "; slower, fused under options force"
    for note, other in ((note_a, note_b), (note_b, note_a)):
        note.fused("mlp")
        note.say(f"fused with {other.name} and the {act} between them into one kernel (block MLP{timed})")
        if exact:
            note.decision.row_check = ("MLP flag in x's norm" if note is note_a and note_a.layer.row_check == "fused"
                                       else "MLP flag" if note is note_a else "in the MLP kernel")
    count("mlp_fused")
    log.info("sparse_inductor: fused %s + %s (%s) into one block MLP kernel%s", note_a.name, note_b.name, act, timed)


def _time(gm: fx.GraphModule, fc1, fc2, note_a: LayerNote, note_b: LayerNote, act: str, exact: bool, safe: float,
          opts: SparseOptions) -> tuple[Optional[float], Optional[float]]:
    """(fused us, the two layers' us) where both can be known: the layers' times from their records
    (the dispatcher's measurements), the fused kernel's measured now (cached on disk), on CUDA with
    dispatch other than "model". (None, None) otherwise: fused without a comparison."""
    dec_a, dec_b, layer_a = note_a.decision, note_b.decision, note_a.layer
    apart = (dec_a.sparse_us + dec_b.sparse_us) if dec_a.measured and dec_b.measured and \
        dec_a.sparse_us is not None and dec_b.sparse_us is not None else None
    if apart is None or layer_a.device != "cuda" or opts.dispatch == "model" or layer_a.m is None:
        return None, None
    blocks1, row_ptr1, col_idx1, blocks2, row_ptr2, col_idx2, row_order2 = (
        constant(gm, c) for c in (fc1.blocks, fc1.row_ptr, fc1.col_idx, fc2.blocks, fc2.row_ptr, fc2.col_idx,
                                  fc2.row_order))
    b1, h, n = constant(gm, fc1.bias), fc1.n, fc2.n
    m, k = layer_a.m, layer_a.k
    key = (f"mlp|M={m} K={k} H={h} N={n}|{layer_a.dtype}|block={blocks1.shape[-1]}|nnzb={blocks1.shape[0]},"
           f"{blocks2.shape[0]}|bias={b1 is not None}|act={act}|exact={exact}|rc={layer_a.row_check}")

    def make():
        gen = torch.Generator(device=blocks1.device).manual_seed(0)
        x = torch.randn(m, k, device=blocks1.device, dtype=layer_a.dtype, generator=gen)
        # the flag rides in x's norm where the row check would ("fused"); else its own kernels
        f = block_mlp.row_flag(x) if exact and layer_a.row_check == "fused" else None
        w1, w2 = (blocks1, row_ptr1, col_idx1), (blocks2, row_ptr2, col_idx2, row_order2)
        if f is not None:
            return lambda: block_mlp.block_mlp(x, w1, b1, w2, h, n, act, safe=safe, flag=f)
        return lambda: block_mlp.block_mlp(x, w1, b1, w2, h, n, act, exact=exact, safe=safe)

    t = time_cached(key, make, blocks1.device)
    return t, apart
