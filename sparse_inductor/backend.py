"""`torch.compile(model, backend="sparse")`: Inductor with freezing and the sparse rewrite pass.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so it works without
importing this package. Everything else (mode, Inductor options) passes through to Inductor.

Inference (grad disabled): the module's parameters and buffers, which Dynamo hands over as graph
inputs, become attributes of the graph, so that Inductor's freezing makes them constants the pass
can read (Dynamo does this itself only when `torch._inductor.config.freezing` is set globally
before tracing; we set nothing globally). As with freezing, the weights' values are taken at
compile time: the compiled model keeps computing with them. If a parameter object is replaced
afterwards (`model.fc.weight = nn.Parameter(...)`), the call notices and runs the graph eagerly
with the new weights instead (logged once); in-place changes (`load_state_dict`, `.data.copy_`)
are not seen, exactly as with Inductor's freezing.

Grad enabled: nothing is frozen; every linear stays dense and its decision says why.

If compiling with the pass fails for any reason, the graph is compiled again by plain Inductor and
the failure is recorded: the backend never breaks a compile that Inductor alone would finish.
Dynamo's requests to trace the frame again (RestartAnalysis, e.g. under dynamic shapes) pass
through: they are not failures, and Dynamo calls the backend again on the new graph.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
from torch._dynamo.exc import RestartAnalysis

from .options import SparseOptions, disabled_by_env, resolve_options
from .report import record

log = logging.getLogger("sparse_inductor")

__all__ = ["sparse_backend"]


def sparse_backend(gm: fx.GraphModule, example_inputs: list, *, mode: Optional[str] = None,
                   options: Optional[Mapping[str, Any] | SparseOptions] = None):
    from torch._inductor.compile_fx import compile_fx

    opts, patches = resolve_options(mode, options)
    if disabled_by_env():
        return compile_fx(gm, example_inputs, config_patches=patches)

    from . import lowering, ops  # noqa: F401  (registers the ops and their lowerings)
    from .lowering.reductions import quantize_reductions
    from .passes.manager import SparseGraphPass, weights_digest

    user_pass = patches.pop("post_grad_custom_pre_pass", None) or torch._inductor.config.post_grad_custom_pre_pass
    inference = not torch.is_grad_enabled()
    # Dynamo builds the call from the placeholders of `gm`, so `gm` stays untouched: the pass
    # works on a copy, and `gm` is what the fallbacks compile or run.
    work = _copy_graph_module(gm)
    try:
        if inference:
            frozen = _lift_module_state(work, example_inputs)
            inputs = [x for i, x in enumerate(example_inputs) if i not in frozen]
            constants = [*frozen.values(), *(v for _, v in gm.named_parameters()), *(v for _, v in gm.named_buffers()),
                         *_attr_tensors(gm)]
            digest = weights_digest(gm.code, constants, opts)
        else:
            frozen, inputs = {}, example_inputs
            digest = "grad-enabled"
        sparse_pass = SparseGraphPass(opts, digest, user_pass)
    except RestartAnalysis:
        raise
    except Exception as e:
        log.exception("sparse_inductor: setup failed")
        record(f"sparse_inductor: setup failed ({type(e).__name__}: {e}); compiled with plain Inductor")
        return compile_fx(gm, example_inputs, config_patches=patches)

    ours = {**patches, "post_grad_custom_pre_pass": sparse_pass}
    if inference:
        # freezing turns weights into constants; CPU weight prepacking would hide the linears;
        # Inductor inlines 1-D constants of <= 8 elements as code that rebuilds them on every call
        # (seen on the H100 as two extra kernels for a small block-sparse layer's index arrays)
        ours.update({"freezing": True, "cpp.weight_prepack": False, "always_keep_tensor_constants": True})
    try:
        with quantize_reductions(opts.reductions == "one-pass"):
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
    return _FrozenCall(compiled, len(example_inputs), frozen, gm)


def _attr_tensors(gm: fx.GraphModule) -> list:
    from ._compat import get_attr

    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                out.append(get_attr(gm, node.target))
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


def _is_module_state(node: fx.Node, example: Any) -> bool:
    """A parameter or buffer of an nn.Module, which Dynamo marks as a static input."""
    return (isinstance(example, torch.Tensor) and not isinstance(example, torch._subclasses.FakeTensor)
            and getattr(example, "_dynamo_static_input_type", None) is not None)


def _lift_module_state(gm: fx.GraphModule, example_inputs: list) -> dict[int, torch.Tensor]:
    """Turn the placeholders of module parameters/buffers into get_attr nodes (in place).

    Returns {input index: tensor} of the lifted inputs.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return {}
    lifted = {}
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if not _is_module_state(node, ex):
            continue
        name = f"_sparse_state_{i}"
        if isinstance(ex, torch.nn.Parameter):
            gm.register_parameter(name, ex)
        else:
            gm.register_buffer(name, ex)
        source = getattr(node, "_dynamo_source", None)
        if source is None and node.meta.get("grapharg") is not None:
            source = node.meta["grapharg"].source
        if hasattr(gm, "_param_name_to_source"):
            gm._param_name_to_source[name] = source
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
        lifted[i] = ex
    if lifted:
        gm.recompile()
    return lifted


class _FrozenCall:
    """Calls the compiled graph without the frozen inputs; runs the graph eagerly if one of the
    frozen parameters was replaced by another object since compile time."""

    def __init__(self, compiled: Callable, n_inputs: int, frozen: dict[int, torch.Tensor], eager: fx.GraphModule):
        self.compiled = compiled
        self.keep = [i for i in range(n_inputs) if i not in frozen]
        self.frozen = list(frozen.items())
        self.eager = eager
        self.warned = False

    def __call__(self, *args):
        for i, t in self.frozen:
            if args[i] is not t:
                return self._stale(args)
        return self.compiled(*[args[i] for i in self.keep])

    def _stale(self, args):
        if not self.warned:
            self.warned = True
            record("sparse_inductor: a parameter was replaced after compilation; running this graph "
                   "eagerly with the new weights (compile again to make it fast)")  # logs it too
        with torch.no_grad():
            return self.eager(*args)
