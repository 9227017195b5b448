"""Rewrite linears whose frozen weight is 2:4 or block-sparse into the project's ops.

Before (post-grad, after freezing; nn.Linear with bias on a 3-D input):

    x2d  = aten.reshape(x, [M, K])
    W_t  = get_attr _frozen_paramN          # [K, N], a transposed view of W [N, K]
    y    = aten.addmm(bias, x2d, W_t)       # no bias: aten.mm(x2d, W_t)
    out  = aten.reshape(y, [B, S, N])

After:

    values, meta = get_attr _sparse24_0_values, get_attr _sparse24_0_meta
    y = sparse_inductor.linear_24(x2d, values, meta, bias, "<kernel>")
      | sparse_inductor.linear_block(x2d, blocks, row_ptr, col_idx, row_order, bias, N, K, "<kernel>")

Invariants: the op computes what the matched node computed (same shape, dtype, device); a weight
shared by several linears is compressed once; a layer that cannot be rewritten is left untouched
and says why in its LayerDecision. Analysis (detection, compression) happens before any graph
edit for that layer, so a failure leaves the graph as it was.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Optional

import torch
import torch.fx as fx

from .. import _compat, ops  # noqa: F401  (ops defines torch.ops.sparse_inductor)
from ..dispatch import Layer, choose
from ..formats import compress_24, compress_block
from ..options import SparseOptions
from ..report import LayerDecision, record
from .detect import Detection, detect
from .sink_views import sink_views

log = logging.getLogger("sparse_inductor")
aten = torch.ops.aten

__all__ = ["LinearSite", "find_linears", "rewrite_linears"]


@dataclasses.dataclass
class LinearSite:
    node: fx.Node  # the mm / addmm
    x: fx.Node
    weight_node: Optional[fx.Node]  # the get_attr holding W_t (None: W is not a constant)
    weight: Optional[torch.Tensor]  # W [N, K]
    bias: Optional[fx.Node]
    name: str
    why_not: Optional[str] = None  # set when the site cannot be considered at all


_TRANSPOSES = {aten.permute.default, aten.t.default, aten.transpose.int}
_OPS = (torch.ops.sparse_inductor.linear_24.default, torch.ops.sparse_inductor.linear_block.default)


def _module_path(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    path = re.sub(r"^L\['[^']*'\]\.?", "", str(path))  # L['self'].blocks.0 -> blocks.0
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)  # _modules['fc1'] -> fc1
    return path.strip(".") or None


def _is_linear_module(node: fx.Node) -> bool:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    _, ty = list(stack.values())[-1]
    return isinstance(ty, type) and issubclass(ty, torch.nn.Linear) or "Linear" in str(ty)


def _resolve_weight(gm: fx.GraphModule, wt: fx.Node) -> tuple[Optional[fx.Node], Optional[torch.Tensor], Optional[str]]:
    """W_t operand of mm -> (get_attr node, W [N, K], None) or (None, None, why)."""
    node, transposed = wt, True
    if node.op == "call_function" and node.target in _TRANSPOSES:
        dims = node.args[1:] if node.target != aten.t.default else ()
        if node.target == aten.permute.default and list(dims[0]) != [1, 0]:
            return None, None, "weight operand is not a plain transpose"
        node, transposed = node.args[0], False
    if node.op == "get_attr":
        t = _compat.get_attr(gm, node.target)
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            return None, None, "weight is not a 2-D tensor constant"
        return node, (t.t() if transposed else t), None
    if node.op == "placeholder":
        return None, None, ("weight is a graph input, not a constant: compile under torch.no_grad() or "
                            "torch.inference_mode() so that Inductor freezes the weights")
    return None, None, "weight is computed in the graph, not a constant"


def find_linears(gm: fx.GraphModule) -> list[LinearSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.mm.default:
            x, wt = node.args[:2]
            bias = None
        elif node.target is aten.addmm.default:
            bias, x, wt = node.args[:3]
        else:
            continue
        if not isinstance(wt, fx.Node) or not isinstance(x, fx.Node):
            continue
        wnode, w, why = _resolve_weight(gm, wt)
        if w is None and not _is_linear_module(node):
            continue  # a matmul of activations, not a linear layer
        name = _module_path(node) or (str(wnode.target) if wnode is not None else node.name)
        site = LinearSite(node, x, wnode, w, bias, name, why)
        if site.why_not is None and node.target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                site.why_not = "addmm with alpha/beta != 1"
            elif not _bias_is_row(bias, w.shape[0]):
                site.why_not = "bias is not a vector of out_features"
        sites.append(site)
    return sites


def _bias_is_row(bias: Any, n: int) -> bool:
    val = bias.meta.get("val") if isinstance(bias, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 1 and val.shape[0] == n


def _m_of(x: fx.Node) -> Optional[int]:
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    return _compat.size_hint(val.shape[0])


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class _Constants:
    """Adds compressed weights to the GraphModule as constants, once per (weight, pattern)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.made: dict[tuple, tuple[fx.Node, ...]] = {}
        self.count = 0

    def nodes(self, key: tuple, tensors: dict[str, torch.Tensor], before: fx.Node) -> tuple[fx.Node, ...]:
        if key in self.made:
            return self.made[key]
        graph, idx = self.gm.graph, self.count
        self.count += 1
        first = next(n for n in graph.nodes if n.op != "placeholder")
        out = []
        with graph.inserting_before(first):
            for part, t in tensors.items():
                qual = _unique_attr(self.gm, f"_sparse_{idx}_{part}")
                self.gm.register_buffer(qual, t)
                n = graph.get_attr(qual)
                n.meta["val"] = _compat.fake_constant(before, t)
                out.append(n)
        self.made[key] = tuple(out)
        return self.made[key]


def _unique_attr(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _compress(det: Detection, w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.detach()
    if det.pattern == "2:4":
        values, meta = compress_24(w)
        return {"values": values, "meta": meta}
    bs = compress_block(w, det.block)
    return {"blocks": bs.blocks, "row_ptr": bs.row_ptr, "col_idx": bs.col_idx, "row_order": bs.row_order}


def rewrite_linears(gm: fx.GraphModule, opts: SparseOptions) -> list[LinearSite]:
    """The pass body: detect, decide, rewrite. Returns the sites it looked at."""
    sites = find_linears(gm)
    detections: dict[int, Detection] = {}
    consts = _Constants(gm)
    for site in sites:
        node = site.node
        out_val = node.meta.get("val")
        dtype = out_val.dtype if isinstance(out_val, torch.Tensor) else None
        if site.weight is None:
            k = n = 0
            wt_val = node.args[-1].meta.get("val") if isinstance(node.args[-1], fx.Node) else None
            if isinstance(wt_val, torch.Tensor) and wt_val.dim() == 2:
                k, n = (int(s) for s in wt_val.shape)
            record(LayerDecision(site.name, (n, k), _dtype_name(dtype) if dtype else "?", "dense", None,
                                 float("nan"), "dense", (), site.why_not, _m_of(site.x)))
            continue
        w = site.weight
        n, k = w.shape
        key = id(site.weight_node)
        try:
            if key not in detections:
                detections[key] = detect(w, opts)
            det = detections[key]
        except Exception as e:  # never break the user's compile
            log.exception("sparse_inductor: detection failed for %s", site.name)
            det = Detection("dense", float("nan"), f"internal error in detection: {type(e).__name__}: {e}")
        m = _m_of(site.x)
        decision = LayerDecision(site.name, (n, k), _dtype_name(w.dtype), det.pattern,
                                 det.block if det.pattern == "block" else None,
                                 det.density, "dense", (), det.reason, m)
        if det.pattern == "dense" or site.why_not:
            decision.reason = site.why_not or det.reason
            record(decision)
            continue
        x_val = site.x.meta.get("val")
        if not isinstance(x_val, torch.Tensor) or x_val.dtype != w.dtype or x_val.dim() != 2:
            decision.reason = "input dtype differs from the weight's" if isinstance(x_val, torch.Tensor) else "input has no metadata"
            record(decision)
            continue
        layer = Layer(det.pattern, m, n, k, w.dtype, w.device.type, det.block, det.block_density,
                      _compat.device_name(w.device), m_static=isinstance(x_val.shape[0], int))
        choice = choose(layer, opts)
        decision.kernel, decision.dense_us, decision.sparse_us = choice.kernel, choice.dense_us, choice.sparse_us
        decision.reason = f"{det.reason}; {choice.reason}"
        if choice.kernel == "dense":
            record(decision)
            continue
        try:
            tensors = _compress(det, w)
            cnodes = consts.nodes((key, det.pattern, det.block), tensors, node)
            _replace(site, det, cnodes, choice.kernel, n, k)
            decision.fused = ("transpose",) + (("bias",) if site.bias is not None else ())
        except Exception as e:  # never break the user's compile
            log.exception("sparse_inductor: rewrite failed for %s", site.name)
            decision.kernel = "dense"
            decision.reason = f"internal error, left dense: {type(e).__name__}: {e}"
        record(decision)
    _erase_dead_weights(sites)
    sink_views([n for n in gm.graph.nodes if n.op == "call_function" and n.target in _OPS])
    return sites


def _erase_dead_weights(sites: list[LinearSite]) -> None:
    """Drop the dense W_t constants (and transposes of them) that no longer have users."""
    seen = set()
    for site in sites:
        wnode = site.weight_node
        if wnode is None or wnode in seen:
            continue
        seen.add(wnode)
        for user in list(wnode.users):
            if user.op == "call_function" and user.target in _TRANSPOSES and not user.users:
                user.graph.erase_node(user)
        if not wnode.users:
            wnode.graph.erase_node(wnode)


def _replace(site: LinearSite, det: Detection, cnodes: tuple[fx.Node, ...], kernel: str, n: int, k: int) -> None:
    node, graph = site.node, site.node.graph
    # read x and bias from the node now: rewrites of earlier layers may have replaced them
    bias, x = (node.args[0], node.args[1]) if node.target is aten.addmm.default else (None, node.args[0])
    if det.pattern == "2:4":
        target = torch.ops.sparse_inductor.linear_24.default
        args = (x, *cnodes, bias, kernel)
    else:
        target = torch.ops.sparse_inductor.linear_block.default
        args = (x, *cnodes, bias, n, k, kernel)
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
