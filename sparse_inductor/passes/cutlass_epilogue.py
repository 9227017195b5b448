"""What follows a CUTLASS layer in the graph, into the op's generated epilogue; then the graph's
CUTLASS kernels built, all at once.

Runs last (after lib_activation.py). Before (a Llama MLP on CUTLASS, post-grad, exact mode: the row
checks g are linear_rewrite's; w1 and w3 one concatenated layer, as Inductor's freezing makes it):

    y13 = linear_cutlass(x, V13, E13, None, 2H, K, cfg, row_check=g)
    y1, y3 = split_with_sizes(y13, [H, H], 1)
    h  = silu(y1) * y3                                   (an Inductor pointwise kernel)
    y2 = linear_cutlass(h, V2, E2, None, D, H, cfg2, row_check=g2)
    out = x + y2                                         (another one)

After:

    y1 = linear_cutlass(x, V1, E1, None, H, K, cfg, row_check=g)
    h  = linear_cutlass(x, V3, E3, None, H, K, cfg, gate="silu_aux", aux=y1, row_check=g)
    out = linear_cutlass(h, V2, E2, None, D, H, cfg2, residual=True, aux=x, row_check=g2)

one kernel per linear, none for the gate or the residual. The chains that move are those of
passes/epilogues.py (activation, gate, residual; int8's dequantization: scales, bias and cast;
fp8's scales, bias, row guard and cast from linear_rewrite's rewrite of torch._scaled_mm), the
ones the dispatcher timed the layer with (linear_rewrite predicts them: Layer.epilogue). A
concatenated layer is split into one op per piece (each piece's weight compressed on its own) only
where a piece takes an epilogue; else it stays one GEMM (the pieces' views then sink below the
pointwise ops after them, as sink_views does for every rewritten layer). What the kernel cannot compute as the
graph does stays in the graph, with the reason in the layer's decision; the fused steps go into
the decision's "fused" column in the user's words, and are counted (counters["sparse_inductor"]:
cutlass_relu, cutlass_gelu, cutlass_gelu_tanh, cutlass_silu, cutlass_silu_gate, cutlass_residual,
cutlass_scales, cutlass_cast, cutlass_split).

Then the metadata layout the op's config does not read is dropped (the dispatcher had both made),
and on CUDA every kernel the graph runs is built in one parallel build (from the disk cache where
the dispatcher's timing built it). A kernel that does not build leaves its layer on the op's
reference implementation (a warning, and in the record).
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import torch
import torch.fx as fx

from ..formats.cutlass_sm90 import compress, decompress
from ..lowering import cutlass_24
from ..options import SparseOptions
from ..report import count, record
from ..runtime import cutlass as rt
from .epilogues import Chain, chain_after, dequant_chain, scaled_chain
from .graph import (LINEAR_CUTLASS, add_constant, args_of, attach_note, constant, erase_constant, erase_dead, guarded,
                    note_of, stamp)
from .sink_views import sink_views
from .split_outputs import output_pieces, split_op

log = logging.getLogger("sparse_inductor")
aten = torch.ops.aten
_CVT = torch.ops.prims.convert_element_type.default

__all__ = ["fuse_cutlass_epilogues", "graph_kernels"]

# what a fused step is called in explain's "fused" column, and its counter
_NAMES = {"relu": "relu", "gelu": "gelu", "gelu (tanh)": "gelu_tanh", "silu": "silu", "silu gate": "silu_gate",
          "residual": "residual", "scales": "scales", "cast": "cast", "bias": "bias"}


def fuse_cutlass_epilogues(gm: fx.GraphModule, opts: SparseOptions) -> int:
    """The pass body: how many chains moved into CUTLASS epilogues."""
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is LINEAR_CUTLASS]
    done = 0
    for op in ops:
        if getattr(op, "_erased", False) or op.graph is not gm.graph:
            continue
        anchor = _noted(op) or op
        done += guarded(lambda: _fuse_layer(gm, op), anchor, "CUTLASS epilogue")
    _drop_unread_layouts(gm)
    _build(gm)
    return done


def _noted(op: fx.Node) -> Optional[fx.Node]:
    """The node linear_rewrite left the layer's note on: the op, or (int8, fp8) the node that makes
    the layer's output a few steps below it."""
    cur = op
    for _ in range(8):
        note = note_of(cur)
        if note is not None:
            return cur
        if len(cur.users) != 1:
            return None
        cur = next(iter(cur.users))
    return None


def _chain(op: fx.Node) -> Chain:
    """The chain after the op that its kernel can compute (passes/epilogues.py)."""
    a = args_of(op)
    xdt = a.x.meta["val"].dtype
    if xdt == torch.float8_e4m3fn:
        return scaled_chain(op)
    if xdt == torch.int8:  # linear_rewrite read the product back as int32 (its uses convert it to float)
        p = next(iter(op.users)) if len(op.users) == 1 else None
        if p is None or p.target is not _CVT or args_of(p).dtype != torch.int32:
            return Chain()
        ch = dequant_chain(p)
        if ch.end is not None:
            ch.nodes.insert(0, p)
        return ch
    return chain_after(op)


def _fuse_layer(gm: fx.GraphModule, op: fx.Node) -> int:
    anchor = _noted(op)
    note = note_of(anchor) if anchor is not None else None
    a = args_of(op)
    pieces = output_pieces(op, a.n, None)
    targets = [op]
    if pieces:
        chains = [chain_after(item, views=True) for item, _, _ in pieces]  # (views: sunk below once split)
        if not any(c.end is not None for c in chains):
            return 0  # nothing to fuse into any piece: one GEMM
        targets = _split(gm, op, pieces)
        sink_views(targets)
        if note is not None:
            note.fused("split")
        count("cutlass_split")
    done = 0
    for t in targets:
        ch = _chain(t)
        for why in ch.refused:
            if note is not None:
                note.say(f"not in CUTLASS's epilogue: {why}")
        if ch.end is None:
            if note is not None and a.x.meta["val"].dtype == torch.int8:
                note.say("int8 product in bfloat16 (its dequantization is not one CUTLASS's epilogue computes)")
            continue
        _fold(gm, t, ch)
        if note is not None:
            for what in ch.fusion.fused:
                if what not in note.decision.fused:
                    note.fused(what)
        for what in ch.fusion.fused:
            count(f"cutlass_{_NAMES[what]}")
        done += 1
    return done


def _reshaped(graph: fx.Graph, t: Optional[fx.Node], shape: list, near: fx.Node) -> Optional[fx.Node]:
    """t reshaped to `shape` ([-1]: a vector, []: one number) before `near`, unless it is that already."""
    if t is None:
        return None
    v = t.meta["val"]
    if (shape == [] and v.dim() == 0) or (shape == [-1] and v.dim() == 1):
        return t
    with graph.inserting_before(near):
        r = graph.call_function(aten.reshape.default, (t, shape))
    stamp(r, near)
    return r


def _one(t: Optional[fx.Node]) -> bool:
    return t is not None and all(isinstance(d, int) and d == 1 for d in t.meta["val"].shape)


def _fold(gm: fx.GraphModule, op: fx.Node, ch: Chain) -> fx.Node:
    """One op in place of `op` and its chain: placed where the chain ends (every input it reads is
    computed by then), reading its inputs in the shapes the op takes."""
    graph, end, f = gm.graph, ch.end, ch.fusion
    kwargs = dict(op.kwargs)
    args = list(op.args[:7])
    if len(op.args) > 7:  # (int8 / fp8: the product's dtype, given by position)
        kwargs.setdefault("out_dtype", op.args[7])
    if f.out_dtype is not None:
        kwargs["out_dtype"] = f.out_dtype
    if ch.bias is not None:
        args[3] = ch.bias
    if f.activation:
        kwargs["activation"] = f.activation
    if f.gate:
        kwargs["gate"] = f.gate
    if f.residual:
        kwargs["residual"] = True
    if ch.aux is not None:
        kwargs["aux"] = ch.aux
    for name, node in (("weight_scale", ch.weight_scale), ("token_scale", ch.token_scale)):
        if node is not None:
            kwargs[name] = _reshaped(graph, node, [] if _one(node) else [-1], end)
    if ch.row_check is not None:
        kwargs["row_check"] = _reshaped(graph, ch.row_check, [-1], end)
    with graph.inserting_before(end):
        new = graph.call_function(LINEAR_CUTLASS, tuple(args), kwargs)
    stamp(new, op)
    for key in ("nn_module_stack", "stack_trace"):
        if key in op.meta:
            new.meta[key] = op.meta[key]
    anchor = _noted(op)
    if anchor is not None:
        attach_note(new, note_of(anchor))
    end.replace_all_uses_with(new)
    erase_dead([end, *reversed(ch.nodes), op])
    return new


def _split(gm: fx.GraphModule, op: fx.Node, pieces: list) -> list[fx.Node]:
    """The concatenated op, one op per piece of its split output: each piece's weight compressed on
    its own (from the op's constants: the metadata of a slice of rows is not a slice of the
    metadata), the bias sliced, the row check shared."""
    a = args_of(op)
    cfg, _ = cutlass_24.parse_tag(a.config)
    t = min(cfg.tile[2], 128)
    values, meta = constant(gm, a.values), constant(gm, a.meta)
    if values is None or meta is None:
        raise RuntimeError("the op's weight is not a constant")
    w = decompress(values, meta, a.n, a.k, t)

    def make(start: int, stop: int, piece_bias):
        v, m = compress(w[start:stop].contiguous(), t)
        cv = add_constant(gm, "_sparse_cutlass_piece_values", v, op, op)
        cm = add_constant(gm, "_sparse_cutlass_piece_meta", m, op, op)
        return LINEAR_CUTLASS, (a.x, cv, cm, piece_bias, stop - start, a.k, a.config), dict(op.kwargs)

    old = (a.values, a.meta)
    new = split_op(op, sorted(pieces, key=lambda p: p[1]), a.bias, make)
    for n in old:
        erase_constant(gm, n)
    return new


_LAYOUT = re.compile(r"_sparse_\d+_meta_(64|128)(_\d+)?$")


def _drop_unread_layouts(gm: fx.GraphModule) -> None:
    """The metadata layouts the dispatcher had made for CUTLASS layers that no op reads."""
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users and _LAYOUT.match(str(n.target)):
            erase_constant(gm, n)


def graph_kernels(gm: fx.GraphModule, devices: tuple = ("cuda",)) -> dict:
    """{CutlassKernel: [op nodes]} of the linear_cutlass ops in the graph whose x is on one of
    `devices` (cutlass_24.kernel_of, as the op's CUDA implementation derives it from the same
    arguments; the tests ask for the CPU's too)."""
    out: dict = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not LINEAR_CUTLASS:
            continue
        a = args_of(n)
        xv = a.x.meta["val"]
        if xv.device.type not in devices:
            continue
        val = lambda t: None if t is None else t.meta["val"]  # noqa: E731
        ts = val(a.token_scale)
        ts_kind = "vector" if a.row_check is not None else cutlass_24.scale_kind(ts)
        k, _ = cutlass_24.kernel_of(xv.dtype, a.config, out_dtype=a.out_dtype,
                                    bias=None if a.bias is None else val(a.bias).dtype, activation=a.activation,
                                    gate=a.gate, residual=a.residual, aux=None if a.aux is None else val(a.aux).dtype,
                                    weight_scale=cutlass_24.scale_kind(val(a.weight_scale)), token_scale=ts_kind)
        out.setdefault(k, []).append(n)
    return out


def _build(gm: fx.GraphModule) -> None:
    """Every kernel the graph runs on CUDA, in one parallel build (compile time, not the first call)."""
    wanted = graph_kernels(gm)
    if not wanted or rt.available() is not None:
        return
    for k, result in cutlass_24.build(list(wanted)).items():
        if isinstance(result, Exception):
            log.warning("sparse_inductor: CUTLASS kernel %s did not build: %s", k.describe(), result)
            count("cutlass_build_failed")
            for n in wanted[k]:
                anchor = _noted(n)
                if anchor is not None:
                    note_of(anchor).say(f"CUTLASS kernel {k.describe()} did not build ({str(result).splitlines()[0]}); "
                                        "the op's reference implementation runs instead")
            record(f"sparse_inductor: CUTLASS kernel {k.describe()} did not build; its layers run the op's reference "
                   "implementation")
