"""`torch.compile(model, backend="sparse")`: Inductor with freezing and the sparse rewrite pass.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so it works without
importing this package. Everything else (mode, Inductor options) passes through to Inductor.

Inference (grad disabled): the parameters and buffers of the model's modules, which Dynamo hands
over as graph inputs, become attributes of the graph, so that Inductor's freezing makes them
constants the pass can read (Dynamo does this itself only when `torch._inductor.config.freezing` is
set globally before tracing; we set nothing globally). Only module state is frozen: a tensor that
reaches the graph as an argument of the compiled function (a parameter passed to it, or through
`torch.func.functional_call` with tensors of its own) stays an input, and a layer reading it stays
dense and says so; so does a buffer the graph writes to. `options={"freezing": False}` freezes
nothing: every layer stays dense, with that reason.

Frozen values are read at compile time; options `on_weight_change` says what happens when one of
them changes later (options.py): by default the call that sees the change runs the captured graph
eagerly with the new values and marks the frame for Dynamo to compile again on its next call, so
that no call mixes old and new weights.

Grad enabled: nothing is frozen; every linear stays dense and its decision says why (and a model
holding sparse weights gets a warning, once a process).

If compiling with the pass fails for any reason, the graph is compiled again by plain Inductor and
the failure is recorded: the backend never breaks a compile that Inductor alone would finish.
Dynamo's requests to trace the frame again (RestartAnalysis, e.g. under dynamic shapes) pass
through: they are not failures, and Dynamo calls the backend again on the new graph.
"""
from __future__ import annotations

import copy
import logging
import operator
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
from torch._dynamo.exc import RestartAnalysis

from . import _compat
from .options import SparseOptions, disabled_by_env, resolve_options
from .report import record

log = logging.getLogger("sparse_inductor")

__all__ = ["sparse_backend", "WeightsChangedError"]


class WeightsChangedError(RuntimeError):
    """A frozen parameter or buffer changed after compile time, under options
    on_weight_change="raise"."""


def sparse_backend(gm: fx.GraphModule, example_inputs: list, *, mode: Optional[str] = None,
                   options: Optional[Mapping[str, Any] | SparseOptions] = None):
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.compile_fx import compile_fx

    opts, patches = resolve_options(mode, options)
    if disabled_by_env():
        return compile_fx(gm, example_inputs, config_patches=patches)

    # the passes and the kernels (Triton, Inductor's lowerings) are loaded when a compile starts, so
    # that `import sparse_inductor` stays light
    from . import lowering, ops  # noqa: F401  (registers the ops and their lowerings)
    from .lowering.reductions import quantize_reductions
    from .passes.manager import SparseGraphPass, weights_digest

    user_pass = patches.pop("post_grad_custom_pre_pass", None) or torch._inductor.config.post_grad_custom_pre_pass
    inference = not torch.is_grad_enabled()
    freezing = patches.get("freezing", True) is not False  # an explicit freezing=False is honoured
    # Dynamo builds the call from the placeholders of `gm`, so `gm` stays untouched: the pass
    # works on a copy, and `gm` is what the fallbacks compile or run.
    work = _copy_graph_module(gm)
    try:
        frozen: dict[int, torch.Tensor] = {}
        if inference and freezing:
            frozen = _lift_module_state(work, example_inputs, snapshot=opts.on_weight_change == "ignore")
            inputs = [x for i, x in enumerate(example_inputs) if i not in frozen]
            constants = [*frozen.values(), *(v for _, v in gm.named_parameters()), *(v for _, v in gm.named_buffers()),
                         *_attr_tensors(gm)]
            digest = weights_digest(gm.code, constants, opts)
        else:
            inputs = example_inputs
            digest = "grad-enabled" if not inference else "no-freezing"
            if not inference:
                _warn_if_sparse_weights(gm, example_inputs, opts)
        sparse_pass = SparseGraphPass(opts, digest, user_pass, input_reason=_input_reason(gm, inputs, inference, freezing))
    except RestartAnalysis:
        raise
    except Exception as e:
        log.exception("sparse_inductor: setup failed")
        record(f"sparse_inductor: setup failed ({type(e).__name__}: {e}); compiled with plain Inductor")
        return compile_fx(gm, example_inputs, config_patches=patches)

    ours = {**patches, "post_grad_custom_pre_pass": sparse_pass}
    if inference and freezing:
        # freezing turns weights into constants; CPU weight prepacking would hide the linears;
        # Inductor inlines 1-D constants of <= 8 elements as code that rebuilds them on every call
        # (seen on the H100 as two extra kernels for a small block-sparse layer's index arrays)
        ours.update({"freezing": True, "cpp.weight_prepack": False, "always_keep_tensor_constants": True})
    try:
        with quantize_reductions(opts.reductions == "one-pass"), _compat.freezing_skips_unused_opaque_inputs():
            compiled = compile_fx(work, inputs, config_patches=ours)
    except RestartAnalysis:  # Dynamo's signal to trace the frame again (e.g. a float scalar made a
        raise                # tensor under dynamic shapes, after a LayerNorm): not a failure of ours
    except Exception as e:
        log.exception("sparse_inductor: compile with the sparse pass failed; retrying with plain Inductor")
        record(f"sparse_inductor: compile failed ({type(e).__name__}: {str(e)[:300]}); "
               "compiled with plain Inductor instead")
        torch._dynamo.utils.counters["sparse_inductor"]["fallback_plain_inductor"] += 1
        return compile_fx(gm, example_inputs, config_patches=patches)
    if not frozen:
        return compiled
    watched = {} if opts.on_weight_change == "ignore" else frozen
    return _FrozenCall(compiled, len(example_inputs), frozen, watched, _input_names(gm), gm, opts.on_weight_change,
                       _compat.compiling_code())


def _attr_tensors(gm: fx.GraphModule) -> list:
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                out.append(_compat.get_attr(gm, node.target))
            except AttributeError:
                pass
    return out


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own graph (attributes shared) and Dynamo's metadata, which AOTAutograd reads."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(gm.meta)
    for old_node, new_node in zip(gm.graph.nodes, new.graph.nodes):
        if hasattr(old_node, "_dynamo_source"):
            new_node._dynamo_source = old_node._dynamo_source
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = dict(gm._param_name_to_source)
    return new


def _source(node: fx.Node) -> Any:
    source = getattr(node, "_dynamo_source", None)
    if source is None and node.meta.get("grapharg") is not None:
        source = node.meta["grapharg"].source
    return source


def _is_module_state(node: fx.Node, example: Any) -> bool:
    """A parameter or buffer of an nn.Module (Dynamo marks those as static inputs and reads them
    through the module's `_parameters` / `_buffers`), as opposed to a tensor the compiled function
    takes as an argument."""
    return (isinstance(example, torch.Tensor) and not isinstance(example, torch._subclasses.FakeTensor)
            and getattr(example, "_dynamo_static_input_type", None) is not None
            and _compat.is_module_state_source(_source(node)))


# ops through which a write to the result writes to the input (Dynamo's graph: torch functions,
# Tensor methods and operator.getitem)
_ALIASING = {"getitem", "__getitem__", "view", "view_as", "reshape", "transpose", "permute", "t", "narrow", "select",
             "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten", "split", "chunk", "unbind",
             "as_strided", "detach", "diagonal", "movedim", "swapaxes", "real", "imag", "contiguous"}


def _name_of(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _written(node: fx.Node) -> bool:
    """Whether the graph writes to this node's tensor: an in-place op (add_, copy_, setitem, an
    `out=`) on it or on a view of it."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            name = _name_of(user)
            first = user.args[0] if user.args else None
            if first is n and (name in ("setitem", "__setitem__") or (name.endswith("_") and not name.startswith("_"))):
                return True
            if user.kwargs.get("out") is n:
                return True
            if first is n and name in _ALIASING:
                todo.append(user)
    return False


def _lift_module_state(gm: fx.GraphModule, example_inputs: list, snapshot: bool = False) -> dict[int, torch.Tensor]:
    """Turn the placeholders of module parameters/buffers that the graph only reads into get_attr
    nodes (in place); with snapshot, the graph holds copies of them (their values now).

    Returns {input index: the user's tensor} of the lifted inputs.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return {}
    lifted = {}
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if not _is_module_state(node, ex) or _written(node):
            continue
        name = f"_sparse_state_{i}"
        held = ex.detach().clone() if snapshot else ex
        if isinstance(ex, torch.nn.Parameter):
            gm.register_parameter(name, held if not snapshot else torch.nn.Parameter(held, ex.requires_grad))
        else:
            gm.register_buffer(name, held)
        if hasattr(gm, "_param_name_to_source"):
            gm._param_name_to_source[name] = _source(node)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
        lifted[i] = ex
    if lifted:
        gm.recompile()
    return lifted


def _input_names(gm: fx.GraphModule) -> list[str]:
    """A readable name for each graph input, e.g. "fc1.weight" for L['self']._modules['fc1']._parameters['weight']."""
    return [_compat.source_path(_source(n)) or n.name for n in gm.graph.nodes if n.op == "placeholder"]


def _has_subgraphs(gm: fx.GraphModule) -> bool:
    return any(isinstance(getattr(gm, n.target, None), torch.nn.Module) for n in gm.graph.nodes
               if n.op == "get_attr") or any(isinstance(m, fx.GraphModule) for m in gm.children())


def _input_reason(gm: fx.GraphModule, inputs: list, inference: bool, freezing: bool) -> Callable[[fx.Node], str]:
    """Why a linear whose weight is an input of the graph the pass sees stays dense, in words."""
    if not inference:
        text = ("grad is enabled, so the weights stay inputs of the graph and none is read: compile and run under "
                "torch.no_grad() or torch.inference_mode() so that Inductor freezes them")
    elif not freezing:
        text = "options freezing=False: nothing is frozen, so the weights stay inputs of the graph and none is read"
    else:
        text = None
    branches = _has_subgraphs(gm)
    shapes = {tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)}

    def reason(node: fx.Node) -> str:
        if text is not None:
            return text
        argument = ("the weight is an argument of the compiled function (passed to it, or through "
                    "torch.func.functional_call with tensors of its own), not a parameter or buffer of a module: "
                    "only module state is frozen, so it stays an input")
        if not branches:
            return argument
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and tuple(val.shape) not in shapes:
            return ("the weight is an operand of a control-flow branch (torch.cond, torch.while_loop, ...), whose "
                    "graph freezing does not reach: it stays an input")
        return ("the weight is an input of this graph: an argument of the compiled function, or an operand of a "
                "control-flow branch (torch.cond, ...); only module state read outside such branches is frozen")
    return reason


_grad_warned = False  # the grad-mode warning, once a process


def _warn_if_sparse_weights(gm: fx.GraphModule, example_inputs: list, opts: SparseOptions) -> None:
    """Under grad mode nothing is frozen, so nothing can run sparse: say so once where a module's
    2-D weight is 2:4 or block-sparse (a weight with fewer than half of its values exactly zero is
    neither, by the default rules, and costs one count)."""
    global _grad_warned
    if _grad_warned:
        return
    from .passes.detect import detect  # (loaded where a warning is due, as the passes above)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, ex in zip(placeholders, example_inputs):
        if not _is_module_state(node, ex) or ex.dim() != 2 or not (ex.is_floating_point() or ex.dtype == torch.int8):
            continue
        with torch.no_grad():
            if int(torch.count_nonzero(ex)) > ex.numel() * max(0.5, opts.max_block_density):
                continue
            found = detect(ex.detach(), opts).pattern
        if found != "dense":
            _grad_warned = True
            name = _compat.source_path(_source(node)) or node.name
            record(f"sparse_inductor: {name} is {found} sparse, but grad is enabled, so weights are not frozen and "
                   "every layer stays dense: compile and run under torch.no_grad() or torch.inference_mode()")
            return


def _picker(indices: list[int]) -> Callable[[tuple], tuple]:
    """args -> the tuple of args at `indices`, in C (operator.itemgetter; one index gives a 1-tuple)."""
    if len(indices) == 1:
        i = indices[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


# unbound, so that a Parameter (a Python subclass) skips the __torch_function__ lookup: half the
# host time of p.data_ptr() per tensor (0.19 vs 0.44 us on a 2-core CPU)
_DATA_PTR = torch._C.TensorBase.data_ptr
_VERSION = operator.attrgetter("_version")


class _FrozenCall:
    """Calls the compiled graph without the frozen inputs, after checking that none of the
    watched ones changed since compile time: the same tensor object, the same version (PyTorch's
    counter of in-place writes) and the same data pointer. On a change, options on_weight_change:
    "recompile" runs this call's graph eagerly with the new values and drops Dynamo's cached code
    for the frame, so that its next call traces and compiles again; "raise" raises
    WeightsChangedError. ("ignore" watches nothing: the graph holds copies of the values.)

    The check is three passes in C over the watched inputs (docs/benchmarks.md, "The weight
    guard", has its host time). Version counters only grow, so while the objects are the same, an
    equal sum of versions means equal versions. Inference tensors have no version counter: their
    identity and data pointer are checked."""

    def __init__(self, compiled: Callable, n_inputs: int, frozen: dict[int, torch.Tensor],
                 watched: dict[int, torch.Tensor], names: list[str], eager: Optional[fx.GraphModule],
                 on_change: str, code: Any):
        self.compiled = compiled
        self.keep = _picker([i for i in range(n_inputs) if i not in frozen])
        self.watched = dict(watched)
        self.pick = _picker(list(watched))
        self.tensors = tuple(watched.values())
        self.ptrs = {i: _data_ptr(t) for i, t in watched.items()}  # None: a wrapper subclass (DTensor)
        pointed = [i for i, p in self.ptrs.items() if p is not None]
        self.pick_pointed = _picker(pointed)
        self.ptr_list = [self.ptrs[i] for i in pointed]
        self.versions = {i: _version(t) for i, t in watched.items()}  # None: an inference tensor
        versioned = [i for i, v in self.versions.items() if v is not None]
        self.pick_versioned = _picker(versioned)
        self.version_sum = sum(self.versions[i] for i in versioned)
        self.names = names
        self.eager = eager
        self.on_change = on_change
        self.code = code
        self.changed = False

    def __call__(self, *args):
        if not self.changed:
            picked = self.pick(args)
            if (all(map(operator.is_, picked, self.tensors))
                    and list(map(_DATA_PTR, self.pick_pointed(args))) == self.ptr_list
                    and sum(map(_VERSION, self.pick_versioned(args))) == self.version_sum):
                return self.compiled(*self.keep(args))
        return self._changed(args)

    def _changed(self, args):
        names = [self.names[i] for i, t in self.watched.items()
                 if args[i] is not t or _data_ptr(args[i]) != self.ptrs[i] or _version(args[i]) != self.versions[i]]
        what = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        if self.on_change == "raise":
            raise WeightsChangedError(
                f"sparse_inductor: {what or 'a frozen tensor'} changed after compilation (options "
                "on_weight_change='raise'); compile again (torch.compiler.reset()), or choose "
                "on_weight_change='recompile' or 'ignore'")
        if not self.changed:
            self.changed = True
            torch._dynamo.utils.counters["sparse_inductor"]["weights_changed"] += 1
            again = _compat.drop_compiled_code(self.code)
            record(f"sparse_inductor: {what or 'a frozen tensor'} changed after compilation; this call runs the graph "
                   "eagerly with the new values" + (", and the next one compiles it again" if again else
                                                    " (compile again to make it fast: torch.compiler.reset())"))
        with torch.no_grad():
            return self.eager(*args)


def _data_ptr(t: torch.Tensor) -> Optional[int]:
    """The tensor's data pointer; None for a wrapper subclass without storage of its own (DTensor:
    its local shard is another tensor; identity and version are checked there)."""
    try:
        return _DATA_PTR(t)
    except RuntimeError:
        return None


def _version(t: torch.Tensor) -> Optional[int]:
    """The tensor's version counter; None for an inference tensor, which has none."""
    return None if t.is_inference() else t._version
