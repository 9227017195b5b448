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
import operator
import re
from typing import Any, Optional

import torch
import torch.fx as fx

from .. import _compat, ops  # noqa: F401  (ops defines torch.ops.sparse_inductor)
from ..dispatch import choose
from ..formats import compress_24, compress_block
from ..measure import LayerTimer
from ..options import SparseOptions
from ..registry import KernelSpec, Layer, Scaled, kernels
from ..report import LayerDecision, record
from .detect import Detection, detect
from .sink_views import sink_views
from .split_outputs import output_pieces, split_op

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
    chain: list = dataclasses.field(default_factory=list)  # nodes between the mm and the get_attr
    dequant: Optional[torch.dtype] = None  # int8 weight-only: the float dtype W is converted to
    scaled: Optional[Scaled] = None  # fp8: how the torch._scaled_mm it replaces is computed


_TRANSPOSES = {aten.permute.default, aten.t.default, aten.transpose.int}
_OPS = (torch.ops.sparse_inductor.linear_24.default, torch.ops.sparse_inductor.linear_block.default,
        torch.ops.sparse_inductor.linear_cslt.default)


def _module_path(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    path = re.sub(r"^L\['[^']*'\]\.?", "", str(path))  # L['self'].blocks.0 -> blocks.0
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)  # _modules['fc1'] -> fc1
    return path.strip(".") or None


def _is_linear_module(node: fx.Node) -> bool:
    """Whether the node was traced from a linear layer: F.linear (Dynamo's source_fn_stack), or
    inside an nn.Linear (or a subclass): the innermost module of its stack, which Dynamo records as
    a class or as its qualified name."""
    fns = node.meta.get("source_fn_stack")
    if fns and fns[-1][1] in (torch._C._nn.linear, torch.nn.functional.linear):
        return True
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    _, ty = list(stack.values())[-1]
    if isinstance(ty, str):
        import pydoc

        ty = pydoc.locate(ty.replace("<class '", "").replace("'>", ""))
    return isinstance(ty, type) and issubclass(ty, torch.nn.Linear)


_CONVERTS = {torch.ops.prims.convert_element_type.default, aten._to_copy.default}
_DEQUANT_TO = (torch.bfloat16, torch.float16, torch.float32)


def _convert_dtype(node: fx.Node) -> Optional[torch.dtype]:
    if node.target is aten._to_copy.default:
        return node.kwargs.get("dtype")
    return node.args[1] if len(node.args) > 1 else None


def _resolve_weight(gm: fx.GraphModule, wt: fx.Node, input_reason=None) -> tuple[Optional[fx.Node], Optional[torch.Tensor], Optional[str],
                                                               list[fx.Node], Optional[torch.dtype]]:
    """W_t operand of mm -> (get_attr node, W [N, K], why not, the nodes between, dequant dtype).

    Accepted: a get_attr holding W_t [K, N] (freezing folded the transpose), a transpose of a
    get_attr holding W, and either of those through one convert of an int8 constant to a float
    dtype (weight-only int8: Inductor's freezing keeps int8 -> bf16 unfolded). W is returned as
    stored (int8 for the latter); the dtype it is converted to comes last.
    """
    node, transposed, chain, dequant = wt, True, [], None
    for _ in range(2):
        if node.op != "call_function":
            break
        if node.target in _TRANSPOSES and transposed:
            dims = node.args[1:] if node.target != aten.t.default else ()
            if node.target == aten.permute.default and list(dims[0]) != [1, 0]:
                return None, None, "weight operand is not a plain transpose", [], None
            chain.append(node)
            node, transposed = node.args[0], False
        elif node.target in _CONVERTS and dequant is None:
            dequant = _convert_dtype(node)
            chain.append(node)
            node = node.args[0]
        else:
            break
    if node.op == "get_attr":
        t = _compat.get_attr(gm, node.target)
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            return None, None, "weight is not a 2-D tensor constant", [], None
        if dequant is not None and (t.dtype != torch.int8 or dequant not in _DEQUANT_TO):
            return None, None, f"weight is converted from {t.dtype} to {dequant} in the graph (only int8 -> float is read)", [], None
        return node, (t.t() if transposed else t), None, chain, dequant
    if node.op == "placeholder":
        return None, None, (input_reason(node) if input_reason is not None else
                            "the weight is an input of the graph, not a constant"), [], None
    return None, None, ("weight is computed in the graph, not a constant (e.g. dequantized with per-group "
                        "scales before the matmul)"), [], None


def _from_int8_constant(gm: fx.GraphModule, node: fx.Node, depth: int = 8) -> bool:
    """Whether an int8 constant feeds this operand within a few ops (a dequantized weight)."""
    seen, todo = set(), [(node, 0)]
    while todo:
        n, d = todo.pop()
        if n in seen or d > depth:
            continue
        seen.add(n)
        if n.op == "get_attr":
            t = _compat.get_attr(gm, n.target)
            if isinstance(t, torch.Tensor) and t.dtype == torch.int8:
                return True
        todo.extend((a, d + 1) for a in n.all_input_nodes)
    return False


def find_linears(gm: fx.GraphModule, opts: Optional[SparseOptions] = None, input_reason=None) -> list[LinearSite]:
    """The linears of the graph. input_reason(placeholder) says why a weight that is a graph input
    stays dense (backend.py knows whether grad, freezing or the model's structure kept it one)."""
    product = (opts or SparseOptions()).fp8_product
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.mm.default:
            x, wt = node.args[:2]
            bias = None
        elif node.target is aten.addmm.default:
            bias, x, wt = node.args[:3]
        elif node.target is aten._int_mm.default:  # int8 x int8 -> int32 (dynamic int8 activations)
            x, wt = node.args[:2]
            bias = None
        elif node.target is aten._scaled_mm.default:  # fp8 x fp8 with scales (docs/formats.md, "fp8")
            x, wt = node.args[:2]
            bias = _scaled_mm_arg(node, "bias")
        else:
            continue
        if not isinstance(wt, fx.Node) or not isinstance(x, fx.Node):
            continue
        wnode, w, why, chain, dequant = _resolve_weight(gm, wt, input_reason)
        if w is None and not _is_linear_module(node) and not _from_int8_constant(gm, wt):
            continue  # a matmul of activations, not a linear layer
        name = _module_path(node) or (str(wnode.target) if wnode is not None else node.name)
        site = LinearSite(node, x, wnode, w, bias, name, why, chain, dequant)
        if site.why_not is None and node.target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                site.why_not = "addmm with alpha/beta != 1"
            elif not _bias_is_row(bias, w.shape[0]):
                site.why_not = "bias is not a vector of out_features"
        if site.why_not is None and node.target is aten._scaled_mm.default:
            site.scaled, site.why_not = _read_scaled_mm(node, w.shape[0], product)
        sites.append(site)
    return sites


_SCALED_MM_ARGS = ("self", "mat2", "scale_a", "scale_b", "bias", "scale_result", "out_dtype", "use_fast_accum")
_SCALED_OUT = (torch.bfloat16, torch.float16, torch.float32)


def _scaled_mm_arg(node: fx.Node, name: str) -> Any:
    """An argument of aten._scaled_mm.default, positional or keyword (None where defaulted)."""
    i = _SCALED_MM_ARGS.index(name)
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _read_scaled_mm(node: fx.Node, n: int, product: str = "bf16") -> tuple[Optional[Scaled], Optional[str]]:
    """How `_scaled_mm(x8, W8_t, scale_a, scale_b, bias, scale_result, out_dtype)` is rewritten, or
    why it is not. Read: fp32 scales per-tensor (one number) or row-wise (scale_a [M, 1],
    scale_b [1, N]), a bias vector of N, out_dtype bf16 / fp16 / fp32 (no scale_result).

    The library writes the unscaled product and one Inductor kernel applies the scales, bias, row
    guard and cast after it (registry.Scaled): form "lib16" where out_dtype is bf16 and `product` (options fp8_product) is
    "bf16": the product in bf16 (one more rounding, at most 2^-8 of |product|; no overflow, bf16
    has fp32's exponent range); else form "row": the product in fp32 (fp16: an unscaled fp16
    product could overflow 65504; fp32: nothing to gain; or fp8_product="fp32").
    """
    val = {a: (_scaled_mm_arg(node, a).meta.get("val") if isinstance(_scaled_mm_arg(node, a), fx.Node) else None)
           for a in ("scale_a", "scale_b", "bias")}
    if _scaled_mm_arg(node, "scale_result") is not None:
        return None, "torch._scaled_mm with scale_result (an fp8 output) is not rewritten"
    out = _scaled_mm_arg(node, "out_dtype")
    if out not in _SCALED_OUT:
        return None, f"torch._scaled_mm to {out or 'its input dtype (fp8)'} is not rewritten (bf16, fp16 or fp32 only)"
    sa, sb, bias = val["scale_a"], val["scale_b"], val["bias"]
    if not isinstance(sa, torch.Tensor) or not isinstance(sb, torch.Tensor):
        return None, "torch._scaled_mm scales have no metadata"
    if sa.dtype != torch.float32 or sb.dtype != torch.float32:
        return None, f"torch._scaled_mm scales are {sa.dtype} / {sb.dtype}, not float32"
    a_tensor, b_tensor = _is_one(sa), _is_one(sb)
    a_row = sa.dim() == 2 and isinstance(sa.shape[1], int) and sa.shape[1] == 1
    b_col = sb.dim() == 2 and tuple(sb.shape) == (1, n)
    if not (a_tensor or a_row) or not (b_tensor or b_col):
        return None, (f"torch._scaled_mm scales of shapes {list(sa.shape)} / {list(sb.shape)}: only per-tensor "
                      f"or row-wise ([M, 1] / [1, {n}]) scales are rewritten")
    if bias is not None and not _bias_is_row(_scaled_mm_arg(node, "bias"), n):
        return None, "bias is not a vector of out_features"
    form = "lib16" if out == torch.bfloat16 and product == "bf16" else "row"
    return Scaled(form, out, not a_tensor, not b_tensor), None


def _is_one(t: torch.Tensor) -> bool:
    """A tensor of one element whatever its shape ((), [1], [1, 1]), by static sizes only."""
    return all(isinstance(s, int) and s == 1 for s in t.shape)


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
        idx = self.count
        self.count += 1
        first = next(n for n in self.gm.graph.nodes if n.op != "placeholder")  # (the parts in order, above it)
        self.made[key] = tuple(add_constant(self.gm, f"_sparse_{idx}_{part}", t, before, first)
                               for part, t in tensors.items())
        return self.made[key]

    def drop_unused(self, key: tuple) -> None:
        """Forget the constants made for key and remove them where nothing reads them any more."""
        for n in self.made.pop(key, ()):
            erase_constant(self.gm, n)


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


def erase_constant(gm: fx.GraphModule, node) -> bool:
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


def _fmt(spec: KernelSpec, det: Detection, layer: Layer) -> str:
    """The constant format a kernel reads: its own (which may depend on the layer), else its
    pattern's (blocks of one size)."""
    own = spec.fmt(layer) if callable(spec.fmt) else spec.fmt
    return own or (f"block{det.block}" if det.pattern == "block" else "sp24")


def _structure(det: Detection) -> str:
    """What, besides the shape, a kernel's time depends on: the number of nonzero blocks."""
    if det.pattern != "block":
        return ""
    return f"density={det.block_density:.4f}"


def _compress(det: Detection, w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.detach()
    if det.pattern == "2:4":
        values, meta = compress_24(w)
        return {"values": values, "meta": meta}
    bs = compress_block(w, det.block)
    return {"blocks": bs.blocks, "row_ptr": bs.row_ptr, "col_idx": bs.col_idx, "row_order": bs.row_order}


def rewrite_linears(gm: fx.GraphModule, opts: SparseOptions, input_reason=None) -> list[LinearSite]:
    """The pass body: detect, decide, rewrite. Returns the sites it looked at."""
    sites = find_linears(gm, opts, input_reason)
    detections: dict[int, Detection] = {}
    consts = _Constants(gm)
    compressed: dict[int, dict[str, dict]] = {}  # weight -> format -> constants, made once
    outputs: list[fx.Node] = []  # the node that now produces each rewritten linear's output
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
        wdt = _dtype_name(w.dtype) + (f"->{_dtype_name(site.dequant)} (weight-only)" if site.dequant else "")
        decision = LayerDecision(site.name, (n, k), wdt, det.pattern,
                                 det.block if det.pattern == "block" else None,
                                 det.density, "dense", (), det.reason, m)
        if det.pattern == "dense" or site.why_not:
            decision.reason = site.why_not or det.reason
            record(decision)
            continue
        x_val = site.x.meta.get("val")
        compute = site.dequant or w.dtype
        if not isinstance(x_val, torch.Tensor) or x_val.dtype != compute or x_val.dim() != 2:
            decision.reason = "input dtype differs from the weight's" if isinstance(x_val, torch.Tensor) else "input has no metadata"
            record(decision)
            continue
        check = _row_check_mode(site.x, compute, opts)
        layer = Layer(det.pattern, m, n, k, compute, w.device.type, det.block, det.block_density,
                      _compat.device_name(w.device), m_static=isinstance(x_val.shape[0], int),
                      weight_dtype=w.dtype if w.dtype != compute else None, scaled=site.scaled,
                      row_check=check,
                      product=_int8_product(node, opts) if node.target is aten._int_mm.default else None,
                      derived_check=check == "separate" and _derived_ahead(gm, site, node, det.pattern, m, k, opts))
        specs = {spec.name: spec for spec in kernels(det.pattern)}
        made: dict[str, dict] = compressed.setdefault(key, {})

        def tensors(spec: KernelSpec, det=det, w=w, layer=layer, made=made) -> dict:
            fmt = _fmt(spec, det, layer)
            if fmt not in made:
                made[fmt] = spec.compress(w.detach(), layer) if spec.compress else _compress(det, w)
            return made[fmt]

        timer = None
        if layer.device == "cuda" and opts.dispatch != "model":
            timer = LayerTimer(layer, w.detach(), site.bias is not None, opts, specs, tensors, _structure(det))
        try:
            choice = choose(layer, opts, timer)
        except Exception as e:  # never break the user's compile
            log.exception("sparse_inductor: dispatch failed for %s", site.name)
            decision.reason = f"internal error in the dispatcher, left dense: {type(e).__name__}: {e}"
            record(decision)
            continue
        decision.kernel, decision.dense_us, decision.sparse_us = choice.kernel, choice.dense_us, choice.sparse_us
        decision.candidates, decision.params, decision.measured = choice.candidates, choice.params, choice.measured
        # an fp8 layer rewritten or timed: in which form (registry.Scaled), before the dispatcher's words
        timed = choice.kernel != "dense" or any(v is not None for n_, v in choice.candidates.items() if n_ != "dense")
        form = f"{site.scaled.describe()}; " if site.scaled is not None and timed else ""
        if layer.product is not None and timed:
            form = f"int8 product in {_dtype_name(layer.product)}; "
        decision.reason = f"{det.reason}; {form}{choice.reason}"
        if choice.kernel == "dense":
            if node.target in (aten.addmm.default, aten.mm.default):  # for passes/derived_check.py: fc1 kept dense
                node.meta["sparse_inductor_layer"] = (decision, layer)
                node.meta["sparse_inductor_row_bound"] = _row_bound(gm, w, site)
            record(decision)
            continue
        try:
            spec = specs[choice.kernel]
            fmt = _fmt(spec, det, layer)
            cnodes = consts.nodes((key, fmt), tensors(spec), node)
            out = _replace(site, det, spec, cnodes, choice.kernel, choice.params, n, k,
                           check=layer.row_check, product=layer.product,
                           fixup_in_graph=opts.rules.row_fixup_in_graph)
            pieces = _split(out, site, det, spec, choice.kernel, w, layer, consts, key) if spec.split_outputs else None
            if pieces:
                consts.drop_unused((key, fmt))
            outputs.extend(pieces or [out])
            if not pieces:  # for passes/fuse_mlp.py: the layer's record and how its check runs
                out.meta["sparse_inductor_layer"] = (decision, layer)
                # for passes/derived_check.py: how large the layer's outputs can get
                out.meta["sparse_inductor_row_bound"] = _row_bound(gm, w, site)
            decision.fused = (("transpose",) + (("dequant",) if site.dequant else ())
                              + (("bias",) if site.bias is not None else ()) + (("split",) if pieces else ()))
            decision.row_check = _row_check_text(spec, det, choice.kernel, layer, opts)
        except Exception as e:  # never break the user's compile
            log.exception("sparse_inductor: rewrite failed for %s", site.name)
            decision.kernel = "dense"
            decision.reason = f"internal error, left dense: {type(e).__name__}: {e}"
        record(decision)
    _erase_dead_weights(sites)
    sink_views(outputs)
    return sites


def _derived_ahead(gm: fx.GraphModule, site: LinearSite, node: fx.Node, pattern: str, m: Optional[int], k: int,
                   opts: SparseOptions) -> bool:
    """A later pass will give this layer its row check from the input of the layer before it (decided
    already: the sites go in graph order): derived_check.py on cuSPARSELt (2:4), fuse_mlp.py on the
    block template after a block fc1 (block). Layer.derived_check: each family's runner times it."""
    if pattern == "2:4":
        from .derived_check import predicts

        return predicts(site.x, m, k, site.name, opts)
    if pattern == "block":
        from .fuse_mlp import predicts

        return predicts(gm, site.x, node, site.name, opts)
    return False


def _row_bound(gm: fx.GraphModule, w: torch.Tensor, site: LinearSite) -> Optional[tuple[float, float]]:
    """(L1, B): the largest absolute row sum of W (fp64) and the largest |bias| (0 without one), so
    that |y[m, n]| <= max_k |x[m, k]| * L1 + B before rounding; None where W is not the floating
    weight the kernel multiplies (weight-only int8, fp8 with scales), the bias is not a constant, or
    it cannot be computed (logged: the derived checks then leave the layer alone)."""
    if site.dequant is not None or site.scaled is not None or not w.dtype.is_floating_point or w.dtype.itemsize == 1:
        return None
    try:
        return _row_bound_of(gm, w, site)
    except Exception:  # never break the user's compile
        log.exception("sparse_inductor: row bound of %s", site.name)
        return None


def _row_bound_of(gm: fx.GraphModule, w: torch.Tensor, site: LinearSite) -> Optional[tuple[float, float]]:
    bmax = 0.0
    if site.bias is not None:
        b = _compat.get_attr(gm, site.bias.target) if site.bias.op == "get_attr" else None
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


def _erase_dead_weights(sites: list[LinearSite]) -> None:
    """Drop the dense W constants, and the transposes / converts between them and the matmuls,
    that no longer have users."""
    for site in sites:
        for node in [*site.chain, site.weight_node]:
            if node is not None and not getattr(node, "_erased", False) and not node.users:
                node.graph.erase_node(node)


def _int8_product(node: fx.Node, opts: SparseOptions) -> torch.dtype:
    """What cuSPARSELt writes for this torch._int_mm: bf16 where options int8_product says so and
    every use of the int32 product converts it to a floating dtype first (the dequantization,
    which then reads 2 bytes per output instead of 4), else int32 (exact: an integer use such as
    a zero-point correction must see torch._int_mm's integers)."""
    def to_float(user: fx.Node) -> bool:
        if user.target is torch.ops.prims.convert_element_type.default:
            dt = user.args[1] if len(user.args) > 1 else None
        elif user.target is aten._to_copy.default:
            dt = user.kwargs.get("dtype")
        else:
            return False
        return isinstance(dt, torch.dtype) and dt.is_floating_point

    if opts.int8_product == "bf16" and node.users and all(to_float(u) for u in node.users):
        return torch.bfloat16
    return torch.int32


def _replace(site: LinearSite, det: Detection, spec: KernelSpec, cnodes: tuple[fx.Node, ...], kernel: str,
             params: dict, n: int, k: int, check: str = "fused", product: Optional[torch.dtype] = None,
             fixup_in_graph: bool = True) -> fx.Node:
    """The matmul `site.node` replaced by the chosen kernel's op; check: the non-finite row check's
    mode (_row_check_mode: "none", "fused", "separate"), for the kernels that need one;
    fixup_in_graph (options rules.row_fixup_in_graph): a library op's row fixup in the pointwise
    ops after it where every use is one, else in the op."""
    node, graph = site.node, site.node.graph
    if node.target is aten._scaled_mm.default:
        return _replace_scaled_mm(site, spec, cnodes, params, n, k)
    # read x and bias from the node now: rewrites of earlier layers may have replaced them
    bias, x = (node.args[0], node.args[1]) if node.target is aten.addmm.default else (None, node.args[0])
    if node.target is aten._int_mm.default and spec.node_args is None:
        raise RuntimeError(f"kernel {kernel!r} cannot compute torch._int_mm")
    floating = x.meta["val"].dtype.is_floating_point  # int8 x cannot hold a NaN/Inf
    g = None  # the row check, applied in the graph after the op (_nan_rows_in_graph)
    if spec.node_args is not None:
        target, args = spec.node_args(x, cnodes, bias, n, k, params)
        kwargs = {}
        if spec.row_check and floating and check != "none":
            g = _row_check(x, node, check)
            if not (fixup_in_graph and _pointwise_users(node)):
                kwargs, g = {"row_check": g}, None
    else:
        # the block template reads g from the graph where the check does not join x's producer
        # (the reference kernel is dense's F.linear: no check to compute)
        g_block = _row_check(x, node, check) if det.pattern == "block" and kernel == "triton" and check == "separate" \
            else None
        target, args, kwargs = _pattern_op(det, x, cnodes, bias, n, k, kernel, check != "none", g_block)
    with graph.inserting_before(node):
        if product in (None, torch.int32):
            new = graph.call_function(target, args, kwargs)
            new.meta.update(node.meta)
            if g is not None:
                new = _nan_rows_in_graph(new, g)
        else:  # torch._int_mm's product rounded, read back as int32 (its uses convert it to float: _int8_product)
            meta = {key: v for key, v in node.meta.items() if key != "eager_input_vals"}
            lib = graph.call_function(target, (*args[:-1], product), kwargs)
            lib.meta.update({key: v for key, v in meta.items() if key != "val"})
            lib.meta["val"] = _compat.fake_eval(lib)
            new = graph.call_function(torch.ops.prims.convert_element_type.default, (lib, torch.int32))
            new.meta.update(meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _replace_scaled_mm(site: LinearSite, spec: KernelSpec, cnodes: tuple[fx.Node, ...], params: dict, n: int,
                       k: int) -> fx.Node:
    """torch._scaled_mm(x8, W8_t, scale_a, scale_b, bias, None, out_dtype) -> linear_cslt and its
    scales (docs/formats.md, "fp8"; the form comes from _read_scaled_mm). Form "row":

        y32 = linear_cslt(x8, wc, None, N, K, alg, split_k, torch.float32) + g       # the fp32 accumulator
        y = convert(y32 * scale_a * scale_b + bias, out_dtype)                       # one Inductor kernel

    form "lib16" (out_dtype bf16): the same with the product written in bf16, upcast in the epilogue:

        y16 = linear_cslt(x8, wc, None, N, K, alg, split_k, torch.bfloat16)          # unscaled, rounded
        y = convert((convert(y16, fp32) + g) * scale_a * scale_b + bias, bf16)       # one Inductor kernel

    y16 is the fp32 accumulator rounded to bf16 (relative error at most 2^-8, bf16's unit roundoff;
    bf16 has fp32's exponent range, so the unscaled product cannot overflow as it could in fp16).
    Scaling in fp32 keeps that relative error, so the output is within 2^-8 * |product| + 2^-8 *
    |output| (+ fp32 steps) of the exact value: one bf16 ulp where "row" is within half of one.
    The epilogue reads and writes 2 bytes per output instead of "row"'s 4 + 2, and Inductor fuses
    it with the pointwise op that consumes the linear.

    The non-finite row guard (e4m3 holds NaN, no Inf): g[m] = sum_k 0 * x[m, k], 0 or NaN. Forms
    "row" and "lib16" add it to the product (in the epilogue kernel).
    """
    node, graph, sc = site.node, site.node.graph, site.scaled
    if sc is None or spec.node_args is None:
        raise RuntimeError(f"kernel {spec.name!r} cannot compute torch._scaled_mm")
    # read the operands from the node now: rewrites of earlier layers may have replaced them
    x, sa, sb = node.args[0], _scaled_mm_arg(node, "scale_a"), _scaled_mm_arg(node, "scale_b")
    bias = _scaled_mm_arg(node, "bias")
    target, args = spec.node_args(x, cnodes, None, n, k, params)  # (x, wc, None, n, k, alg_id, split_k)
    cvt = torch.ops.prims.convert_element_type.default

    def call(op, *a, **kw) -> fx.Node:
        new = graph.call_function(op, a, kw)
        if op is target:  # (not the inputs torch._scaled_mm saw: Inductor would constrain ours to them)
            new.meta.update({key: v for key, v in node.meta.items() if key != "eager_input_vals"})
            new.meta["val"] = _compat.fake_eval(new)
        else:
            _derived(new, node)
        return new

    with graph.inserting_before(node):
        xf = call(cvt, x, torch.float32)
        g = call(aten.sum.dim_IntList, call(aten.mul.Tensor, xf, 0.0), [1], True)
        # the unscaled product (fp32 or bf16: sc.lib_out_dtype), then the epilogue in fp32
        y = call(target, *args[:7], sc.lib_out_dtype)
        if sc.lib_out_dtype != torch.float32:
            y = call(cvt, y, torch.float32)
        y = call(aten.add.Tensor, y, g)
        y = call(aten.mul.Tensor, call(aten.mul.Tensor, y, sa), sb)
        if bias is not None:
            y = call(aten.add.Tensor, y, bias)
        out = call(cvt, y, sc.out_dtype)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def _pattern_op(det: Detection, x: fx.Node, cnodes: tuple, bias: Any, n: int, k: int, kernel: str,
                check: bool = True, g: Optional[fx.Node] = None) -> tuple:
    """(target, args, kwargs) of the pattern's own op: sparse_inductor::linear_24 / linear_block.
    check=False (options nonfinite="fast"): linear_block(..., guard=False), its kernel without the
    non-finite row check (the 2:4 kernels multiply the zeros, or check inside: nothing to drop);
    g: the check computed in the graph (sparse_inductor::row_check), linear_block's row_check=."""
    if det.pattern == "2:4":
        return torch.ops.sparse_inductor.linear_24.default, (x, *cnodes, bias, kernel), {}
    kwargs = {"guard": False} if not check else {"row_check": g} if g is not None else {}
    return torch.ops.sparse_inductor.linear_block.default, (x, *cnodes, bias, n, k, kernel), kwargs


def _split(out: fx.Node, site: LinearSite, det: Detection, spec: KernelSpec, kernel: str, w: torch.Tensor,
           layer: Layer, consts: _Constants, key: int) -> Optional[list[fx.Node]]:
    """The op `out` (the pattern's own op) split into one op per piece of its output, where the
    graph splits that output (passes/split_outputs.py); None where it does not, or cannot be."""
    if spec.node_args is not None or spec.row_check or out.target not in _OPS[:2]:
        return None
    n, k = w.shape
    pieces = output_pieces(out, n, det.block if det.pattern == "block" else None)
    if not pieces:
        return None
    x = out.args[0]
    bias = out.args[3] if det.pattern == "2:4" else out.args[5]

    def make(a: int, b: int, piece_bias: Optional[fx.Node]) -> tuple:
        piece, piece_layer = w[a:b], dataclasses.replace(layer, n=b - a)
        t = spec.compress(piece.detach(), piece_layer) if spec.compress else _compress(det, piece)
        cnodes = consts.nodes((key, _fmt(spec, det, piece_layer), a, b), t, out)
        return _pattern_op(det, x, cnodes, piece_bias, b - a, k, kernel, out.kwargs.get("guard", True),
                           out.kwargs.get("row_check"))

    return split_op(out, pieces, bias, make)


_VIEWS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.squeeze.dim,
          aten.unsqueeze.default}


def _row_check_text(spec: KernelSpec, det: Detection, kernel: str, layer: Layer, opts: SparseOptions) -> str:
    """LayerDecision.row_check: how the rewritten layer gets dense's non-finite rows back."""
    skips_zeros = spec.row_check or (det.pattern == "block" and kernel == "triton")
    if not skips_zeros or not layer.dtype.is_floating_point or layer.dtype.itemsize == 1:
        return ""
    if opts.nonfinite != "exact":
        return "off"
    return {"fused": "in x's norm", "separate": "own kernel"}.get(layer.row_check, "")


def _row_check_mode(x: fx.Node, compute: torch.dtype, opts: SparseOptions) -> str:
    """How the non-finite row check of a zero-skipping kernel (cuSPARSELt, the block template)
    costs, for its timing: "none" (int8 / fp8 inputs, which have their own handling, or options
    nonfinite="fast"); "fused" where x comes from an Inductor reduction kernel (a norm), which the
    reduction over x joins at little cost; rules.pointwise_producer_check where x comes from an Inductor
    pointwise kernel (which the check turns into a reduction); "separate" otherwise (a graph input,
    an extern kernel's output, e.g. attention, a pointwise epilogue of our templates), where it is
    one more read of x."""
    if opts.nonfinite != "exact" or not compute.is_floating_point or compute.itemsize == 1:
        return "none"
    node = x
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    target = node.target if node.op == "call_function" else None
    if not isinstance(target, torch._ops.OpOverload) or target in _OPS:
        return "separate"
    if target in _FUSABLE_REDUCTIONS:
        return "fused"
    if not _is_pointwise(target):
        return "separate"
    reached: set = set()
    sources = _pointwise_sources(node, reached=reached)
    # a norm (a reduction, then pointwise ops in the same kernel): the check joins a reduction.
    # First, since a norm's input may itself come from a template (a ViT's LayerNorm after the
    # residual add that is the previous fc2's epilogue): the norm is still a kernel of its own.
    # A norm's pointwise ops read what it reduces, or what that is computed from ((u - mean(u)) * ...,
    # u * rsqrt(mean(u * u))); a reduction whose result alone is read is another kernel's (a
    # cuSPARSELt fc1's row fixup y * (1 + g), g a sum over fc1's input: the GELU after it is a
    # pointwise kernel of its own, which the check would turn into a reduction; session 14 found
    # such checks timed, and built, as "fused")
    if any(a.target in _FUSABLE_REDUCTIONS
           and (not opts.rules.norm_reads_its_input or not _pointwise_closure(a.args[0]).isdisjoint(reached))
           for a in sources):
        return "fused"
    # a pointwise x that only our Triton templates feed becomes their epilogue (a GELU after
    # fc1, the gated product): no kernel of its own that the reduction could join
    if any(a.target in _TEMPLATE_OPS and "triton" in a.args for a in sources):
        return "separate"
    return opts.rules.pointwise_producer_check


_FUSABLE_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.var_mean.correction}
_TEMPLATE_OPS = _OPS[:2]  # linear_24 / linear_block: Triton templates when their kernel is "triton"


def _pointwise_sources(node: fx.Node, depth: int = 16, reached: Optional[set] = None) -> list[fx.Node]:
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
            if _is_pointwise(a.target) or a.target in _VIEWS or a.target is operator.getitem:
                todo.append(a)
            else:
                out.append(a)
    return out


def _made_check(x: fx.Node, mode: str) -> Optional[fx.Node]:
    """The check over x that _row_check made for an earlier layer in this mode, if any."""
    for u in x.users:
        if u.meta.get("sparse_inductor") != "row_check":
            continue
        if mode == "separate" and u.target is torch.ops.sparse_inductor.row_check.default and u.args == (x,):
            return u
        if mode != "separate" and u.target is aten.mul.Tensor and u.args == (x, 0.0) and len(u.users) == 1:
            (s,) = u.users
            if s.target is aten.sum.dim_IntList and s.meta.get("sparse_inductor") == "row_check":
                return s
    return None


def _pointwise_closure(node: fx.Node) -> set:
    """node and what it is computed from through pointwise ops, views and getitem."""
    out = {node}
    if node.op == "call_function" and (_is_pointwise(node.target) or node.target in _VIEWS):
        _pointwise_sources(node, reached=out)
    return out


def _is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _derived(n: fx.Node, near: fx.Node) -> None:
    """A node the rewrite made: its FakeTensor value, and `near`'s provenance (module stack, trace)."""
    n.meta["val"] = _compat.fake_eval(n)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in near.meta:
            n.meta[key] = near.meta[key]


def _pointwise_users(node: fx.Node, depth: int = 4) -> bool:
    """Whether every use of `node` is a pointwise op, directly or through reshapes and views (into
    which Inductor then inlines a pointwise op on `node`: no kernel of its own)."""
    if not node.users or depth == 0:
        return False
    for user in node.users:
        target = user.target if user.op == "call_function" else None
        if target in _VIEWS:
            if not _pointwise_users(user, depth - 1):
                return False
        elif not _is_pointwise(target):
            return False
    return True


def _nan_rows_in_graph(y: fx.Node, g: fx.Node) -> fx.Node:
    """y * (1 + g)[:, None] in y's dtype: y exactly where g[m] = 0 (a multiplication by one keeps
    every value, a zero's sign and an Inf), NaN in the rows where g[m] is NaN. The same rows as
    nan_rows_ (the op's row_check), as a pointwise op that Inductor inlines into the pointwise ops
    after the library call (a bias, GELU, residual add): no kernel of its own, where nan_rows_ is
    one more launch per layer. Used where every use of y is pointwise (_pointwise_users)."""
    graph = y.graph
    one = factor = graph.call_function(aten.add.Tensor, (g, 1))  # g is fp32
    if y.meta["val"].dtype != torch.float32:  # 1 and NaN are exact in any float dtype
        factor = graph.call_function(torch.ops.prims.convert_element_type.default, (one, y.meta["val"].dtype))
    col = graph.call_function(aten.unsqueeze.default, (factor, 1))
    out = graph.call_function(aten.mul.Tensor, (y, col))
    for n in dict.fromkeys((one, factor, col, out)):
        _derived(n, y)
    out.meta["sparse_inductor"] = "nan_rows"
    return out


def nan_rows_check(out: fx.Node) -> Optional[fx.Node]:
    """g, for a node _nan_rows_in_graph made (out = y * (1 + g)[:, None]), else None."""
    if out.op != "call_function" or out.meta.get("sparse_inductor") != "nan_rows":
        return None
    factor = out.args[1].args[0]
    one = factor.args[0] if factor.target is torch.ops.prims.convert_element_type.default else factor
    return one.args[0]


def library_op(out: fx.Node) -> Optional[tuple[fx.Node, Optional[fx.Node]]]:
    """(the linear_cslt op behind a layer output the rewrite made, its row check g: the one in the
    nan-rows product after it, or its row_check argument; None without one), else None."""
    g = nan_rows_check(out)
    op = out.args[0] if g is not None else out
    if op.op != "call_function" or op.target is not _OPS[2]:
        return None
    if g is None:
        return op, op.kwargs.get("row_check")
    return (op, g) if op.kwargs.get("row_check") is None else None


def _row_check(x: fx.Node, near: fx.Node, mode: str = "fused") -> fx.Node:
    """g [M] fp32, g[m] = sum_k 0 * x[m, k]: 0 for a finite row, NaN for a row holding a NaN or Inf;
    those rows of the op's output (linear_cslt, sparse tensor cores) become NaN: in the pointwise
    ops after it where every use is one (_nan_rows_in_graph), else in the op (nan_rows_). The block
    kernel takes g as its row_check (where the check is "separate") and finds the exact positions.

    Dense computes 0 * x for every zero weight, so a non-finite input makes its whole output row
    non-finite; a kernel that skips the zeros would leave the outputs finite where the input meets
    only zeros. With the check every output of such a row is NaN (dense has +-Inf at some of them:
    the non-finite positions match dense, the NaN-vs-Inf split does not, so an activation after it
    can differ: ReLU(-Inf) = 0 where ReLU(NaN) = NaN). The op writes only the rows concerned, so a
    finite input costs one small kernel after the library call and no pass over y.

    mode (_row_check_mode) "fused": Inductor ops (mul, sum), which fuse with x's producer, a norm;
    "separate": sparse_inductor::row_check, a kernel of its own that fuses nothing in, so that a
    pointwise producer keeps its kernel, or stays the epilogue of the template it is
    (lowering/row_check.py). Layers that read the same x (w1 and w3 after a norm, q / k / v after
    an input) share one check: the first one's, made before it.
    """
    made_before = _made_check(x, mode)
    if made_before is not None:
        return made_before
    graph = x.graph
    with graph.inserting_before(near):
        if mode == "separate":
            made = (g := graph.call_function(torch.ops.sparse_inductor.row_check.default, (x,))),
        else:
            zero = graph.call_function(aten.mul.Tensor, (x, 0.0))  # a float zero: Inductor folds x * 0 (int) to 0
            made = zero, (g := graph.call_function(aten.sum.dim_IntList, (zero, [1]), {"dtype": torch.float32}))
    for n in made:
        _derived(n, near)
        n.meta["sparse_inductor"] = "row_check"  # lowering/reductions.py: a one-pass kernel
    return g
