"""User-facing verbs: explain."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .backend import sparse_backend
from .options import SparseOptions
from .report import LayerDecision, Report, collect

__all__ = ["explain"]


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
