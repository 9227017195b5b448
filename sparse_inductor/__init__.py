"""sparse_inductor: a torch.compile backend for 2:4 and block-sparse nn.Linear weights.

    compiled = torch.compile(model, backend="sparse")      # no import needed (entry point)
    report = sparse_inductor.explain(model, x)             # what the compiler decided, per layer
    sparse_inductor.inductor_pass()                        # the pass, for stock Inductor (docs/upstream.md)
    sparse_inductor.prune(model, "2:4")                    # demo helper: make 2:4 weights
"""
from .api import explain, inductor_pass
from .backend import WeightsChangedError
from .options import SparseOptions
from .prune import prune
from .report import LayerDecision, Report
from .version import __version__

__all__ = ["explain", "inductor_pass", "prune", "SparseOptions", "LayerDecision", "Report", "WeightsChangedError", "__version__"]
