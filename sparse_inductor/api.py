"""User-facing verbs: explain, and inductor_pass for stock Inductor."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .backend import sparse_backend
from .options import SparseOptions, resolve_options
from .report import LayerDecision, Report, collect, record

__all__ = ["explain", "inductor_pass"]


class _BypassFxCache(CustomGraphPass):
    """A post-grad pass without a uuid, so Inductor bypasses its FX graph cache for the graph.

    On a cache hit Inductor does not run the post-grad passes, so the sparse pass would record no
    decisions and explain() would return an empty report. Runs the user's own pass, if any.
    """

    def __init__(self, inner: Any = None):
        self.inner = inner

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self) -> None:
        return None


def explain(model: torch.nn.Module, *example_inputs: Any,
            options: Optional[Mapping[str, Any] | SparseOptions] = None) -> Report:
    """Compile `model` with the sparse backend under inference mode, run it once on the inputs,
    and return what the compiler decided for each linear (`report.layers`; `print(report)`).

    The compiled module is `report.compiled`, its output on the inputs `report.output`.
    Inductor's FX graph cache is bypassed for this compile, so that the pass runs and reports.
    """
    if isinstance(options, SparseOptions):
        options = dataclasses.asdict(options)
    options = dict(options or {})
    user_pass = options.get("post_grad_custom_pre_pass") or torch._inductor.config.post_grad_custom_pre_pass
    options["post_grad_custom_pre_pass"] = _BypassFxCache(user_pass)

    def backend(gm, inputs):
        return sparse_backend(gm, inputs, options=options)

    compiled = torch.compile(model, backend=backend)
    with collect() as sink, torch.inference_mode():
        output = compiled(*example_inputs)
    report = Report([d for d in sink if isinstance(d, LayerDecision)], [d for d in sink if isinstance(d, str)])
    report.compiled, report.output = compiled, output
    return report


# Why a weight that reached the pass as a graph input stays dense, with stock Inductor
_NOT_FROZEN = ("the weight is an input of the graph, not a constant: Inductor's freezing did not make it one "
               "(torch._inductor.config.freezing must be on when Dynamo traces, under torch.no_grad() or "
               "torch.inference_mode())")


class _StockInductorPass(CustomGraphPass):
    """The sparse pass as stock Inductor's post_grad_custom_pre_pass (see inductor_pass)."""

    def __init__(self, opts: SparseOptions):
        # the passes load with the first pass made, so that `import sparse_inductor` stays light
        from .passes.manager import SparseGraphPass

        self.opts = opts
        self.inner = SparseGraphPass(opts, weights_digest=None, input_reason=self._not_frozen)
        self._unfrozen = 0

    def _not_frozen(self, node: torch.fx.Node) -> str:
        self._unfrozen += 1
        return _NOT_FROZEN

    def __call__(self, graph: torch.fx.Graph) -> None:
        self._unfrozen = 0
        self.inner(graph)
        if self._unfrozen:
            record(f"sparse_inductor: {self._unfrozen} weight(s) reached the pass as graph inputs and stay dense: "
                   "set torch._inductor.config.freezing = True before the model is first called (Dynamo reads it "
                   "while tracing; options={'freezing': True} alone does not freeze the parameters) and call it "
                   "under torch.no_grad() or torch.inference_mode()")

    def uuid(self) -> None:
        """None: Inductor bypasses its FX graph cache for graphs compiled with this pass. Its cache
        key covers frozen weights by shape and dtype only, and this pass, unlike the backend, never
        sees the weights before Inductor computes the key, so a key it made could not tell a 2:4
        model's compiled graph from a dense one's of the same shapes (docs/upstream.md)."""
        return None


def inductor_pass(options: Optional[Mapping[str, Any] | SparseOptions] = None) -> CustomGraphPass:
    """The sparse rewrite as a pass for stock Inductor (`backend="inductor"`), for a caller who
    composes Inductor's options itself. `backend="sparse"` does all of the below by itself.

        torch._inductor.config.freezing = True   # before the first call: Dynamo reads it while tracing
        compiled = torch.compile(model, options={
            "post_grad_custom_pre_pass": sparse_inductor.inductor_pass({"force": True}),
            "cpp.weight_prepack": False,         # CPU: else Inductor packs the linears for MKL first (*)
        })
        with torch.inference_mode():
            y = compiled(x)

    (*) and the process's first freezing compile must have had it off: Inductor keeps the packing
    it turned on then (or set TORCHINDUCTOR_CPP_WEIGHT_PREPACK=0).

    `options`: SparseOptions fields only (force, patterns, ...; the rest of Inductor's settings
    go into torch.compile's options). What the backend does and this pass cannot (docs/upstream.md):
    freezing (without it every linear stays dense, with a reason and a note), CPU weight prepacking
    off (a note names the packed linears), `always_keep_tensor_constants` (speed only: small index
    arrays are otherwise inlined), options reductions (Inductor's own reduction choices here), and
    the FX graph cache (bypassed: uuid() is None).
    """
    # the kernels and their lowerings load here, as in backend.py, so that `import sparse_inductor` stays light
    from . import lowering, ops  # noqa: F401  (registers the ops and their lowerings)

    opts, inductor = resolve_options(None, options)
    if inductor:
        raise ValueError(f"inductor_pass() takes SparseOptions fields only; {sorted(inductor)} are Inductor "
                         "settings: pass them in torch.compile's options")
    if opts.mode is not None:
        raise ValueError("inductor_pass() takes no mode: pass mode to torch.compile")
    return _StockInductorPass(opts)
