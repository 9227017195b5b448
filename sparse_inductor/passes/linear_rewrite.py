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

A weight that is sparse only behind a row / column order (detection's search), and constant
shuffles of a layer's input or output features next to it, go into the op's x_index / out_index or
into a constant neighbour (passes/fold_permutations.py draws those graphs).

Invariants: the op computes what the matched node computed (same shape, dtype, device); a weight
shared by several linears is compressed once; a layer that cannot be rewritten is left untouched
and says why in its LayerDecision. Analysis (detection, compression) happens before any graph
edit for that layer, so a failure leaves the graph as it was.
"""
from __future__ import annotations

import dataclasses
import logging
import pydoc
import re
from typing import Any, Optional

import torch
import torch.fx as fx

from .. import _compat
from ..dispatch import choose
from ..formats import compress_24, compress_block
from ..measure import LayerTimer
from ..options import SparseOptions
from ..registry import KernelSpec, Layer, Scaled, kernels
from ..report import LayerDecision, count, record
from . import fold_permutations as perms
from .detect import Detection, detect
from .epilogues import predict
from .graph import (LINEAR_24, LINEAR_BLOCK, LayerNote, add_constant, args_of, attach_note, erase_constant,
                    pointwise_users, stamp)
from .row_checks import (check_mode, decision_text, derives, nan_rows_check, nan_rows_in_graph, reduction_cost, row_bound,
                         row_check)
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
        ty = pydoc.locate(ty.replace("<class '", "").replace("'>", ""))
    return isinstance(ty, type) and issubclass(ty, torch.nn.Linear)


_CONVERTS = {torch.ops.prims.convert_element_type.default, aten._to_copy.default}
_DEQUANT_TO = (torch.bfloat16, torch.float16, torch.float32)


def _convert_dtype(node: fx.Node) -> Optional[torch.dtype]:
    """The dtype a convert (one of _CONVERTS) converts to."""
    return args_of(node).dtype


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
        # mm, _int_mm (int8 x int8 -> int32: dynamic int8 activations) and _scaled_mm (fp8 x fp8 with
        # scales: docs/formats.md, "fp8") read (x, W_t) as (self, mat2); addmm reads (bias, x, W_t)
        if node.target in (aten.mm.default, aten._int_mm.default, aten._scaled_mm.default):
            mm = args_of(node)
            x, wt, bias = mm.self, mm.mat2, mm.bias if node.target is aten._scaled_mm.default else None
        elif node.target is aten.addmm.default:
            mm = args_of(node)
            bias, x, wt = mm.self, mm.mat1, mm.mat2
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
            if mm.beta != 1 or mm.alpha != 1:
                site.why_not = "addmm with alpha/beta != 1"
            elif not _bias_is_row(bias, w.shape[0]):
                site.why_not = "bias is not a vector of out_features"
        if site.why_not is None and node.target is aten._scaled_mm.default:
            site.scaled, site.why_not = _read_scaled_mm(node, w.shape[0], product)
        sites.append(site)
    return sites


_SCALED_OUT = (torch.bfloat16, torch.float16, torch.float32)


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
    mm = args_of(node)
    val = {a: (getattr(mm, a).meta.get("val") if isinstance(getattr(mm, a), fx.Node) else None)
           for a in ("scale_a", "scale_b", "bias")}
    if mm.scale_result is not None:
        return None, "torch._scaled_mm with scale_result (an fp8 output) is not rewritten"
    out = mm.out_dtype
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
    if bias is not None and not _bias_is_row(mm.bias, n):
        return None, "bias is not a vector of out_features"
    form = "lib16" if out == torch.bfloat16 and product == "bf16" else "row"
    return Scaled(form, out, not a_tensor, not b_tensor, fast_accum=bool(mm.use_fast_accum)), None


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
    """The pass body: for each linear, in graph order, what its weight is (detect), which kernel
    runs it (the dispatcher) and, where that is a sparse kernel, the graph edit; every linear gets
    its LayerDecision, recorded. Returns the sites it looked at."""
    sites = find_linears(gm, opts, input_reason)
    run = _Run(gm, opts, _Constants(gm), sites={s.node: s for s in sites})
    _prepare(run, sites)
    for site in sites:
        record(_rewrite_one(run, site))
    _erase_dead_weights(sites)
    sink_views(run.outputs)
    return sites


@dataclasses.dataclass
class _Run:
    """One run of the rewrite over a graph: each weight detected once, its constants made once per
    format (shared weights, and the constants a timing made, serve every layer that reads them),
    and the nodes that now make the rewritten layers' outputs (for sink_views)."""
    gm: fx.GraphModule
    opts: SparseOptions
    consts: _Constants
    detections: dict[int, Detection] = dataclasses.field(default_factory=dict)
    compressed: dict[int, dict[str, dict]] = dataclasses.field(default_factory=dict)  # weight -> format -> constants
    outputs: list[fx.Node] = dataclasses.field(default_factory=list)
    # the layers a later layer's input order may be folded into (fold_permutations.Placed), by output node
    placed: dict = dataclasses.field(default_factory=dict)
    sites: dict = dataclasses.field(default_factory=dict)  # mm / addmm node -> its LinearSite
    # a later layer whose weight's columns were permuted to read a layer's output order (Plan.down) ->
    # what its record says
    reads: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Perm:
    """A layer's orders (fold_permutations.plan) and whether its x_index goes into its neighbours."""
    plan: perms.Plan
    fold: bool


def _rewrite_one(run: _Run, site: LinearSite) -> LayerDecision:
    """One linear: its decision, and the graph edit where a sparse kernel wins. Every analysis comes
    before the edit, so a failure leaves the layer as it was (and says so)."""
    if site.weight is None:
        return _unread_decision(site)
    det = _detect(run, site)
    decision = _decision(site, det)
    decision.permutation = run.reads.get(site.node, "")
    why = site.why_not or (det.reason if det.pattern == "dense" else None) or _input_mismatch(site)
    if why:
        decision.reason = why
        _place_dense(run, site, decision)
        return decision
    perm = _perm(run, site, det)
    layer = _layer(run, site, det, perm)
    tensors = _tensors(run, site, det, layer, perm)
    try:
        choice = choose(layer, run.opts, _timer(run, site, det, layer, tensors, perm))
    except Exception as e:  # never break the user's compile
        log.exception("sparse_inductor: dispatch failed for %s", site.name)
        decision.reason = f"internal error in the dispatcher, left dense: {type(e).__name__}: {e}"
        count("internal_error")
        _place_dense(run, site, decision)
        return decision
    _take(decision, choice, site, det, layer)
    if choice.kernel == "dense":
        if site.node.target in (aten.addmm.default, aten.mm.default):  # for derived_check.py: an fc1 kept dense
            attach_note(site.node, LayerNote(decision, layer, _row_bound(run.gm, site.weight, site)))
        count("kept_dense")
        _place_dense(run, site, decision)
        return decision
    try:
        _rewrite(run, site, det, layer, choice, tensors, decision, perm)
    except Exception as e:  # never break the user's compile
        log.exception("sparse_inductor: rewrite failed for %s", site.name)
        decision.kernel = "dense"
        decision.reason = f"internal error, left dense: {type(e).__name__}: {e}"
        decision.permutation = ""
        count("internal_error")
        _place_dense(run, site, decision)
    return decision


def _unread_decision(site: LinearSite) -> LayerDecision:
    """The record of a linear whose weight is not a constant the pass can read (site.why_not)."""
    node = site.node
    out_val = node.meta.get("val")
    dtype = out_val.dtype if isinstance(out_val, torch.Tensor) else None
    k = n = 0
    wt_val = node.args[-1].meta.get("val") if isinstance(node.args[-1], fx.Node) else None
    if isinstance(wt_val, torch.Tensor) and wt_val.dim() == 2:
        k, n = (int(s) for s in wt_val.shape)
    return LayerDecision(site.name, (n, k), _dtype_name(dtype) if dtype else "?", "dense", None,
                         float("nan"), "dense", (), site.why_not, _m_of(site.x))


def _detect(run: _Run, site: LinearSite) -> Detection:
    """detect() of the site's weight, once per weight node; an internal error reads as dense."""
    search = _plain_linear(site)  # (the permuted kernels serve mm / addmm, not _int_mm / _scaled_mm)
    key = (id(site.weight_node), search)
    try:
        if key not in run.detections:
            run.detections[key] = detect(site.weight, run.opts, search=search)
        return run.detections[key]
    except Exception as e:  # never break the user's compile
        log.exception("sparse_inductor: detection failed for %s", site.name)
        count("internal_error")
        return Detection("dense", float("nan"), f"internal error in detection: {type(e).__name__}: {e}")


def _decision(site: LinearSite, det: Detection) -> LayerDecision:
    """The layer's record as detection leaves it: dense until the dispatcher says otherwise."""
    w = site.weight
    wdt = _dtype_name(w.dtype) + (f"->{_dtype_name(site.dequant)} (weight-only)" if site.dequant else "")
    return LayerDecision(site.name, tuple(w.shape), wdt, det.pattern, det.block if det.pattern == "block" else None,
                         det.density, "dense", (), det.reason, _m_of(site.x))


def _prepare(run: _Run, sites: list[LinearSite]) -> None:
    """Before the first layer is timed: each family's `prepare` (KernelSpec) with the graph's layers
    it can run on the timing device (the CUTLASS family builds all their candidate kernels in one
    parallel build). A layer's Layer is made again when it is decided (earlier rewrites may change
    it; what was not built here is built then). An internal error here costs time, not the compile."""
    specs = [s for s in kernels() if s.prepare is not None and run.opts.kernel in (None, s.name) and s.enabled(run.opts)]
    if not specs or run.opts.dispatch == "model":
        return
    try:
        layers = []
        for site in sites:
            if site.weight is None or site.why_not or _input_mismatch(site):
                continue
            det = _detect(run, site)
            if det.pattern != "dense":
                layer = _layer(run, site, det)
                if layer.device == "cuda":
                    layers.append(layer)
        for spec in specs:
            ok = [ly for ly in layers if ly.pattern == spec.pattern and spec.check(ly) is None]
            if ok:
                spec.prepare(ok)
    except Exception:  # never break the user's compile
        log.exception("sparse_inductor: preparing the kernel families failed")


def _predict(site: LinearSite) -> tuple:
    """Layer.epilogue: what a family that generates its epilogue would fuse after the layer
    (passes/epilogues.predict); () where that cannot be said (logged)."""
    try:
        return predict(site.node, site.weight.shape[0])
    except Exception:  # never break the user's compile: the layer is timed without an epilogue
        log.exception("sparse_inductor: predicting the epilogue of %s", site.name)
        return ()


def _input_mismatch(site: LinearSite) -> Optional[str]:
    """Why the layer's input cannot go to a sparse op (its dtype is not the one W computes in, or it
    is not a 2-D tensor with metadata), or None."""
    x_val = site.x.meta.get("val")
    if not isinstance(x_val, torch.Tensor):
        return "input has no metadata"
    if x_val.dtype != (site.dequant or site.weight.dtype) or x_val.dim() != 2:
        return "input dtype differs from the weight's"
    return None


def _layer(run: _Run, site: LinearSite, det: Detection, perm: Optional[_Perm] = None) -> Layer:
    """What the dispatcher is told of the layer: shape, dtypes, device, how its non-finite row check
    costs (row_checks.check_mode; fp8's row guard: row_checks.reduction_cost), whether a later pass
    will derive that check from the layer before (row_checks.derives), and whether its kernel reads
    x gathered / maps its output columns (a weight behind a permutation, graph shuffles: perm)."""
    w, node, x_val = site.weight, site.node, site.x.meta["val"]
    (n, k), m, compute = w.shape, _m_of(site.x), site.dequant or w.dtype
    check = check_mode(site.x, compute, run.opts)
    x_index = perm is not None and perm.plan.x_index is not None and not perm.fold
    # (a gathered x before cuSPARSELt hides fc1 from derived_check.py: a 2:4 fc2 keeps its own check)
    derived = check == "separate" and not (x_index and det.pattern == "2:4") and \
        derives(run.gm, node, site.x, det.pattern, m, k, site.name, run.opts)
    return Layer(det.pattern, m, n, k, compute, w.device.type, det.block, det.block_density,
                 _compat.device_name(w.device), m_static=isinstance(x_val.shape[0], int),
                 weight_dtype=w.dtype if w.dtype != compute else None, scaled=site.scaled, row_check=check,
                 guard=reduction_cost(site.x, run.opts) if site.scaled is not None else "separate",
                 product=_int8_product(node, run.opts) if node.target is aten._int_mm.default else None,
                 derived_check=derived, x_index=x_index,
                 out_index=perm is not None and perm.plan.out_index is not None,
                 epilogue=_predict(site) if det.pattern == "2:4" else ())


def _tensors(run: _Run, site: LinearSite, det: Detection, layer: Layer, perm: Optional[_Perm] = None):
    """spec -> the compressed constants that kernel family reads, made once per (weight, orders,
    format); a permuted layer's are those of its plan's weight (fold_permutations.Plan.wc)."""
    w = site.weight if perm is None else perm.plan.wc
    made = run.compressed.setdefault(_weight_key(site, perm), {})

    def tensors(spec: KernelSpec) -> dict:
        fmt = _fmt(spec, det, layer)
        if fmt not in made:
            made[fmt] = spec.compress(w.detach(), layer) if spec.compress else _compress(det, w)
        return made[fmt]

    return tensors


def _timer(run: _Run, site: LinearSite, det: Detection, layer: Layer, tensors,
           perm: Optional[_Perm] = None) -> Optional[LayerTimer]:
    """The dispatcher's timer for the layer (measure.py): on CUDA, unless options dispatch="model".
    A permuted layer's candidates run with its index vectors and are checked against the weight the
    op computes with (its orders undone)."""
    if layer.device != "cuda" or run.opts.dispatch == "model":
        return None
    specs = {spec.name: spec for spec in kernels(det.pattern)}
    w, structure = site.weight.detach(), _structure(det)
    if perm is not None:
        w = perm.plan.reference_weight(perm.fold)
        indices = _index_tensors(perm, w.device)
        plain = tensors

        def tensors(spec: KernelSpec) -> dict:
            return {**plain(spec), **indices}
    return LayerTimer(layer, w, site.bias is not None, run.opts, specs, tensors, structure)


def _take(decision: LayerDecision, choice, site: LinearSite, det: Detection, layer: Layer) -> None:
    """The dispatcher's choice into the record; the reason from its parts: detection's, the form an
    fp8 or int8 layer was timed or rewritten in, the dispatcher's."""
    decision.kernel, decision.dense_us, decision.sparse_us = choice.kernel, choice.dense_us, choice.sparse_us
    decision.candidates, decision.params, decision.measured = choice.candidates, choice.params, choice.measured
    timed = choice.kernel != "dense" or any(v is not None for n_, v in choice.candidates.items() if n_ != "dense")
    form = None
    if choice.kernel == "cutlass":  # (its epilogue computes the dequantization: cutlass_epilogue.py says)
        pass
    elif timed and layer.product is not None:
        form = f"int8 product in {_dtype_name(layer.product)}"
    elif timed and site.scaled is not None:
        form = site.scaled.describe()
    decision.reason = "; ".join(part for part in (det.reason, form, choice.reason) if part)


def _rewrite(run: _Run, site: LinearSite, det: Detection, layer: Layer, choice, tensors,
             decision: LayerDecision, perm: Optional[_Perm] = None) -> None:
    """The graph edit: the chosen kernel's constants and op in place of the matmul, split where the
    graph splits its output; the layer's note for the passes after this one. A permuted layer's
    index vectors go into the op (or its x_index into its neighbours), its shuffles out of the graph."""
    spec = {s.name: s for s in kernels(det.pattern)}[choice.kernel]
    fmt = _fmt(spec, det, layer)
    key = _weight_key(site, perm)
    n, k = site.weight.shape
    if perm is not None and not perm.fold and perm.plan.neighbours_possible() and spec.node_args is not None:
        perm.fold = True  # (no in-kernel gather: the neighbours' store is cheaper than a pass over x)
    params = choice.params or {}
    if perm is not None and spec.node_args is None and run.opts.permute_apply == "graph":
        params = {**params, "x": "graph", "y": "graph"}  # (held by the options, timed or not)
    if perm is not None and perm.plan.out_index is not None and params.get("y") == "graph":
        perm.plan = perm.plan.gathered_after()  # (the timing chose the output map after the call)
    cnodes = run.consts.nodes((key, fmt), tensors(spec), site.node)
    pnodes = _perm_nodes(run, site, perm, key)
    out = _replace(site, det, spec, cnodes, choice.kernel, params, n, k, check=layer.row_check,
                   product=layer.product, fixup_in_graph=run.opts.rules.row_fixup_in_graph, perm=pnodes)
    after = None
    if perm is not None and perm.plan.after is not None:
        (idx,) = run.consts.nodes((key, "after"), {"out_gather": perms.index_tensor(perm.plan.after,
                                                                                     site.weight.device)}, out)
        after = perms.gather_after(out, idx)
    split_ok = spec.split_outputs and (perm is None or (perm.plan.out_index is None and after is None))
    w = site.weight if perm is None else perm.plan.wc
    pieces = _split(out, site, det, spec, choice.kernel, w, layer, run.consts, key) if split_ok else None
    if pieces:
        run.consts.drop_unused((key, fmt))
    run.outputs.extend(pieces or [out])
    decision.fused = (("transpose",) + (("dequant",) if site.dequant else ())
                      + (("bias",) if site.bias is not None else ()) + (("split",) if pieces else ()))
    skips_zeros = spec.row_check or (det.pattern == "block" and choice.kernel == "triton")
    decision.row_check = decision_text(skips_zeros, layer, run.opts)
    if not pieces:  # for the passes after this one: the layer's record, how its check runs, its bound
        attach_note(out, LayerNote(decision, layer, _row_bound(run.gm, site.weight, site)))
    if perm is not None:
        _apply_perm(run, site, perm, spec, out if after is None else after, decision, params)
    op = out if nan_rows_check(out) is None else out.args[0]  # (cuSPARSELt's row fixup in the graph: y * (1 + g))
    if not pieces and layer.product is None and after is None and perms.is_our_op(op):
        _place_op(run, site, det, layer, spec, op, decision, perm)
    count("rewrite")
    count("split_outputs", len(pieces or ()))


def _row_bound(gm: fx.GraphModule, w: torch.Tensor, site: LinearSite) -> Optional[tuple[float, float]]:
    """row_checks.row_bound of the layer; None where W is not the floating weight the kernel
    multiplies (weight-only int8, fp8 with scales)."""
    if site.dequant is not None or site.scaled is not None or not w.dtype.is_floating_point or w.dtype.itemsize == 1:
        return None
    return row_bound(gm, w, site.bias, site.name)


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
        if user.target not in _CONVERTS:
            return False
        dt = _convert_dtype(user)
        return isinstance(dt, torch.dtype) and dt.is_floating_point

    if opts.int8_product == "bf16" and node.users and all(to_float(u) for u in node.users):
        return torch.bfloat16
    return torch.int32


def _replace(site: LinearSite, det: Detection, spec: KernelSpec, cnodes: tuple[fx.Node, ...], kernel: str,
             params: dict, n: int, k: int, check: str = "fused", product: Optional[torch.dtype] = None,
             fixup_in_graph: bool = True, perm: Optional["_PermNodes"] = None) -> fx.Node:
    """The matmul `site.node` replaced by the chosen kernel's op; check: the non-finite row check's
    mode (row_checks.check_mode: "none", "fused", "separate"), for the kernels that need one;
    fixup_in_graph (options rules.row_fixup_in_graph): a library op's row fixup in the pointwise
    ops after it where every use is one, else in the op. perm: a permuted layer's index vectors
    and bias (the template ops take them as arguments; a library op gets x gathered before it)."""
    node, graph = site.node, site.node.graph
    if node.target is aten._scaled_mm.default:
        return _replace_scaled_mm(site, spec, cnodes, params, n, k)
    # read x and bias from the node now: rewrites of earlier layers may have replaced them
    mm = args_of(node)
    bias, x = (mm.self, mm.mat1) if node.target is aten.addmm.default else (None, mm.self)
    if perm is not None and perm.bias is not None:
        bias = perm.bias
    if node.target is aten._int_mm.default and spec.node_args is None:
        raise RuntimeError(f"kernel {kernel!r} cannot compute torch._int_mm")
    floating = x.meta["val"].dtype.is_floating_point  # int8 x cannot hold a NaN/Inf
    g = None  # the row check, applied in the graph after the op (row_checks.nan_rows_in_graph)
    if spec.node_args is not None:
        xg = x if perm is None or perm.x_index is None else perms.gather_x(x, perm.x_index, node)
        target, args = spec.node_args(xg, cnodes, bias, n, k, params)
        kwargs = {}
        if spec.row_check and floating and check != "none":
            g = row_check(x, node, check)
            if not (fixup_in_graph and spec.fixup_in_graph and pointwise_users(node)):
                kwargs, g = {"row_check": g}, None
    else:
        # the block template reads g from the graph where the check does not join x's producer
        # (the reference kernel is dense's F.linear: no check to compute)
        g_block = row_check(x, node, check) if det.pattern == "block" and kernel == "triton" and check == "separate" \
            else None
        x_first = perm is not None and perm.x_index is not None and params.get("x") == "graph"
        target, args, kwargs = _pattern_op(det, perms.gather_x(x, perm.x_index, node) if x_first else x, cnodes,
                                           bias, n, k, kernel, check != "none", g_block,
                                           *((None if x_first else perm.x_index, perm.out_index)
                                             if perm is not None else ()))
    with graph.inserting_before(node):
        if product in (None, torch.int32):
            new = graph.call_function(target, args, kwargs)
            new.meta.update(node.meta)
            if g is not None:
                new = nan_rows_in_graph(new, g)
                count("row_fixup_in_graph")
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
    mm = args_of(node)
    x, sa, sb, bias = mm.self, mm.scale_a, mm.scale_b, mm.bias
    if sc.fast_accum and not params:  # untimed (forced): the hint a family's first config may read
        params = {"fast_accum": True}
    target, args = spec.node_args(x, cnodes, None, n, k, params)  # (x, wc, None, n, k, alg_id, split_k)
    cvt = torch.ops.prims.convert_element_type.default

    def call(op, *a, **kw) -> fx.Node:
        new = graph.call_function(op, a, kw)
        if op is target:  # (not the inputs torch._scaled_mm saw: Inductor would constrain ours to them)
            new.meta.update({key: v for key, v in node.meta.items() if key != "eager_input_vals"})
            new.meta["val"] = _compat.fake_eval(new)
        else:
            stamp(new, node)
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
                check: bool = True, g: Optional[fx.Node] = None, x_index: Optional[fx.Node] = None,
                out_index: Optional[fx.Node] = None) -> tuple:
    """(target, args, kwargs) of the pattern's own op: sparse_inductor::linear_24 / linear_block.
    check=False (options nonfinite="fast"): linear_block(..., guard=False), its kernel without the
    non-finite row check (the 2:4 kernels multiply the zeros, or check inside: nothing to drop);
    g: the check computed in the graph (sparse_inductor::row_check), linear_block's row_check=;
    x_index / out_index: a permuted weight's index constants (the ops' arguments of those names)."""
    perm = {name: t for name, t in (("x_index", x_index), ("out_index", out_index)) if t is not None}
    if det.pattern == "2:4":
        return LINEAR_24, (x, *cnodes, bias, kernel), perm
    kwargs = {"guard": False} if not check else {"row_check": g} if g is not None else {}
    return LINEAR_BLOCK, (x, *cnodes, bias, n, k, kernel), {**kwargs, **perm}


def _split(out: fx.Node, site: LinearSite, det: Detection, spec: KernelSpec, kernel: str, w: torch.Tensor,
           layer: Layer, consts: _Constants, key: Any) -> Optional[list[fx.Node]]:
    """The op `out` (the pattern's own op) split into one op per piece of its output, where the
    graph splits that output (passes/split_outputs.py); None where it does not, or cannot be."""
    if spec.node_args is not None or spec.row_check or out.target not in (LINEAR_24, LINEAR_BLOCK):
        return None
    n, k = w.shape
    pieces = output_pieces(out, n, det.block if det.pattern == "block" else None)
    if not pieces:
        return None
    op = args_of(out)
    guard, g = (op.guard, op.row_check) if out.target is LINEAR_BLOCK else (True, None)

    def make(a: int, b: int, piece_bias: Optional[fx.Node]) -> tuple:
        piece, piece_layer = w[a:b], dataclasses.replace(layer, n=b - a)
        t = spec.compress(piece.detach(), piece_layer) if spec.compress else _compress(det, piece)
        cnodes = consts.nodes((key, _fmt(spec, det, piece_layer), a, b), t, out)
        return _pattern_op(det, op.x, cnodes, piece_bias, b - a, k, kernel, guard, g, op.x_index)

    return split_op(out, pieces, op.bias, make)


# ---- a weight behind a permutation, and the shuffles next to a layer (passes/fold_permutations.py)

def _plain_linear(site: LinearSite) -> bool:
    """An mm / addmm (float or weight-only int8 W): what the permuted kernels serve."""
    return site.node.target in (aten.mm.default, aten.addmm.default) and site.scaled is None


def _weight_key(site: LinearSite, perm: Optional[_Perm]) -> tuple:
    """What a layer's constants are made from: its weight node, and its plan's orders."""
    return (id(site.weight_node),) + (perm.plan.key if perm is not None else ())


def _perm(run: _Run, site: LinearSite, det: Detection) -> Optional[_Perm]:
    """The layer's plan (fold_permutations.plan), or None where nothing is permuted; an internal
    error is logged and reads as no plan (graph shuffles then stay where they are: a search's order
    is then not applied either, so the layer stays dense)."""
    if not _plain_linear(site):
        return None
    try:
        plan = perms.plan(run.gm, site.node, site.x, site.weight, site.bias, det, run.placed,
                          run.opts.max_block_density)
    except Exception:  # never break the user's compile
        log.exception("sparse_inductor: permutation plan failed for %s", site.name)
        count("internal_error")
        return None
    if plan is None:
        return None
    return _Perm(plan, plan.x_index is not None and plan.neighbours_free())


def _index_tensors(perm: _Perm, device) -> dict[str, torch.Tensor]:
    """The kernels' index vectors of a plan (int32 on the weight's device), by the ops' argument names."""
    plan, out = perm.plan, {}
    if plan.x_index is not None and not perm.fold:
        out["x_index"] = perms.index_tensor(plan.x_index, device)
    if plan.out_index is not None:
        out["out_index"] = perms.index_tensor(plan.out_index, device)
    return out


@dataclasses.dataclass
class _PermNodes:
    """What _replace puts into a permuted layer's op: the index constants and the permuted bias."""
    x_index: Optional[fx.Node]
    out_index: Optional[fx.Node]
    bias: Optional[fx.Node]


def _perm_nodes(run: _Run, site: LinearSite, perm: Optional[_Perm], key: tuple) -> Optional[_PermNodes]:
    if perm is None:
        return None
    indices = _index_tensors(perm, site.weight.device)
    nodes = dict(zip(indices, run.consts.nodes((key, "index", perm.fold), indices, site.node))) if indices else {}
    bias = None
    if perm.plan.out_perm is not None and site.bias is not None:
        bias = perms.permuted_constant(run.gm, args_of(site.node).self, perm.plan.out_perm, "_permuted_bias",
                                       site.node)
    return _PermNodes(nodes.get("x_index"), nodes.get("out_index"), bias)


def _apply_perm(run: _Run, site: LinearSite, perm: _Perm, spec: KernelSpec, out: fx.Node,
                decision: LayerDecision, params: Optional[dict] = None) -> None:
    """After the op is in the graph (out: what reads as the layer's output, the op or the gather
    after it): the shuffles it absorbed taken out, its x_index folded into its neighbours where
    planned; what went where, in its record and counters."""
    plan, said = perm.plan, [p for p in (decision.permutation,) if p]
    if plan.out_perm is not None and site.bias is not None:  # (the op reads the bias permuted)
        erase_constant(run.gm, site.bias)
    for s in plan.outputs:
        if s.start is site.node:  # (the matmul the op replaced)
            s.start = out
    if plan.inputs or plan.outputs:
        count("shuffle_fold", perms.remove(plan.inputs + plan.outputs))
        said += [f"{s.kind} of its input folded" for s in plan.inputs]
        said += [f"{s.kind} of its output folded" for s in plan.outputs]
    if plan.agreed:
        said.append(f"columns in the order {plan.neighbours[0].name} writes")
    if plan.x_index is not None and perm.fold:
        names = []
        for nb in plan.neighbours:
            what = perms.fold_into(run.gm, nb, plan.x_index, site.name)
            kept = [p for p in nb.decision.permutation.split("; ") if p and p != perms.STORE_MAPPED]
            nb.decision.permutation = "; ".join([*kept, what])
            names.append(nb.name)
        said.append(f"x's order folded into {', '.join(names)}")
        count("permutation_fold")
    elif plan.x_index is not None:
        first = spec.node_args is not None or (params or {}).get("x") == "graph"
        gather = "x gathered before the call" if first else "x gathered in the kernel's loads"
        said.append(gather)
        count("permutation_gather")
    if plan.down is not None:
        said.append(_fold_down(run, site, plan))
    if plan.out_index is not None:
        said.append(perms.STORE_MAPPED)
    elif plan.after is not None:
        said.append("outputs mapped to their columns after the call (a gather)")
        count("permutation_gather_after")
    elif plan.pattern == "2:4" and plan.out_perm is not None:
        said.append("rows permuted in its constants")
    decision.permutation = "; ".join(said)


def _fold_down(run: _Run, site: LinearSite, plan: perms.Plan) -> str:
    """The linear after the layer (Plan.down) made to read the layer's output in the op's order:
    its weight's columns permuted, its site reading the new constant (it is decided later, in
    graph order); returns what the layer's record says."""
    perms.fold_down(run.gm, plan.down, plan.out_perm)
    reader = run.sites.get(plan.down)
    name = reader.name if reader is not None else plan.down.name
    if reader is not None:
        reader.weight_node, reader.weight, reader.why_not, reader.chain, reader.dequant = \
            _resolve_weight(run.gm, args_of(plan.down).mat2)
        run.reads[plan.down] = f"weight's columns permuted to read {site.name}'s output order"
    count("permutation_fold_down")
    return f"outputs in {name}'s input order (no output map)"


def _place_dense(run: _Run, site: LinearSite, decision: LayerDecision) -> None:
    """A dense linear a later layer may fold its input order into (its weight's rows, its bias)."""
    if site.weight is not None and perms.dense_site_ok(run.gm, site.node):
        run.placed[site.node] = perms.Placed(site.node, "dense", site.name, decision)


def _place_op(run: _Run, site: LinearSite, det: Detection, layer: Layer, spec: KernelSpec, out: fx.Node,
              decision: LayerDecision, perm: Optional[_Perm]) -> None:
    """A rewritten layer a later layer may fold its input order into (its out_index, its blocks
    made again, or the rows of its constants)."""
    plan = perm.plan if perm is not None else None

    def remake(w: torch.Tensor) -> dict:
        return spec.compress(w, layer) if spec.compress else _compress(det, w)

    blocks = args_of(out).blocks if det.pattern == "block" else None
    nnzb = int(blocks.meta["val"].shape[0]) if blocks is not None else None
    run.placed[out] = perms.Placed(out, det.pattern, site.name, decision, out_perm=plan.out_perm if plan else None,
                                   w=site.weight.detach(), rows=plan.rows if plan else None,
                                   cols=plan.cols if plan else None, block=det.block, nnzb=nnzb, remake=remake)
