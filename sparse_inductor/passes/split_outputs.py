"""Split a rewritten linear whose output Inductor concatenated back into one op per piece.

With frozen weights, Inductor concatenates linears that share an input (a Llama MLP's w1 and w3)
into one matmul and splits its output (freezing_patterns.addmm_patterns_init):

    y  = op(x, W_cat)                        [M, N1 + N2]
    s  = aten.split_with_sizes(y, [N1, N2], 1)
    h1 = s[0];  h3 = s[1]
    z  = silu(h1) * h3                       the SiLU-gated product

For a Triton template that is one kernel for the linear and a second one for the gate: the gate
reads both halves of the output, so Inductor cannot fuse it into the template's store (each
program of the template writes only some columns). Split back,

    h1 = op(x, W_cat[:N1]);  h3 = op(x, W_cat[N1:])
    z  = silu(h1) * h3

the gate is a pointwise epilogue of the second template that reads the first one's output: one
kernel per linear, none for the gate. Each piece's weight is compressed on its own (made once per
(weight, piece)); the bias, if any, is sliced. The dispatcher timed the concatenated layer; two
kernels of half the width cost about the same plus one launch, and the gate kernel is gone.

Only for kernels whose op is a template that fuses epilogues (KernelSpec.split_outputs): one
cuSPARSELt call stays one call (its epilogue is a separate pointwise kernel anyway, and one large
GEMM beats two). Block-sparse pieces must start at a multiple of the block size, so that the
pieces keep the weight's blocks.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx

from .. import _compat
from .graph import args_of

aten = torch.ops.aten

__all__ = ["output_pieces", "split_op"]

_SPLITS = {aten.split_with_sizes.default, aten.split.Tensor}


def output_pieces(node: fx.Node, n: int, block: Optional[int]) -> Optional[list[tuple[fx.Node, int, int]]]:
    """[(getitem, start, end)] when the only user of `node` (an [M, n] linear output) splits it
    along its last dimension and every piece is used through a getitem; None otherwise."""
    if len(node.users) != 1:
        return None
    (split,) = node.users
    if split.op != "call_function" or split.target not in _SPLITS or split.args[0] is not node:
        return None
    dim = args_of(split).dim
    if dim not in (1, -1):
        return None
    sizes = split.args[1]
    if isinstance(sizes, int):  # aten.split.Tensor(y, size): equal pieces, the last one shorter
        sizes = [min(sizes, n - a) for a in range(0, n, sizes)] if sizes > 0 else None
    if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes) or sum(sizes) != n or len(sizes) < 2:
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if block and any(a % block for a in starts):
        return None
    users = list(split.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
               for u in users):
        return None
    return [(u, starts[u.args[1]], starts[u.args[1]] + sizes[u.args[1]]) for u in users]


def split_op(node: fx.Node, pieces: list[tuple[fx.Node, int, int]], bias: Optional[fx.Node],
             make: Callable[[int, int, Optional[fx.Node]], tuple]) -> list[fx.Node]:
    """Replace `node` and its split by one op per piece. make(start, end, bias_piece) -> (target,
    args[, kwargs]) of the piece's op (its constants already in the graph). Returns the new op nodes."""
    graph = node.graph
    split = next(iter(node.users))
    new_nodes = []
    for item, a, b in pieces:
        with graph.inserting_before(node):
            piece_bias = None
            if bias is not None:
                piece_bias = graph.call_function(aten.slice.Tensor, (bias, 0, a, b))
                piece_bias.meta["val"] = _compat.fake_eval(piece_bias)
            target, args, *kwargs = make(a, b, piece_bias)
            new = graph.call_function(target, args, kwargs[0] if kwargs else None)
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        new.meta["val"] = _compat.fake_eval(new)
        item.replace_all_uses_with(new)
        new_nodes.append(new)
    for item, _, _ in pieces:
        graph.erase_node(item)
    graph.erase_node(split)
    graph.erase_node(node)
    return new_nodes
