"""User-facing verbs: explain."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .options import SparseOptions
from .report import LayerDecision, Report, collect

__all__ = ["explain"]


def explain(model: torch.nn.Module, *example_inputs: Any,
            options: Optional[Mapping[str, Any] | SparseOptions] = None) -> Report:
    """Compile `model` with the sparse backend under inference mode, run it once on the inputs,
    and return what the compiler decided for each linear (`report.layers`; `print(report)`).

    The compiled module is `report.compiled`, its output on the inputs `report.output`.
    """
    from .backend import sparse_backend

    def backend(gm, inputs):
        return sparse_backend(gm, inputs, options=options)

    compiled = torch.compile(model, backend=backend)
    with collect() as sink, torch.inference_mode():
        output = compiled(*example_inputs)
    report = Report([d for d in sink if isinstance(d, LayerDecision)], [d for d in sink if isinstance(d, str)])
    report.compiled, report.output = compiled, output
    return report
