"""Per-layer decision records: the source of `explain`, the log lines and the tests' assertions.

The rewrite pass makes one LayerDecision per linear it looks at and hands it to `record()`, which
logs it on the `sparse_inductor` logger and appends it to every `collect()` context open on the
same thread. A compile runs on the thread that calls the model, so a context sees the records of
the compiles its own thread makes, never those of another thread's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
import warnings
from typing import Any, Iterable, Iterator, Optional

from torch._dynamo.utils import counters

log = logging.getLogger("sparse_inductor")

__all__ = ["LayerDecision", "Report", "collect", "record", "count", "log", "trace_decisions", "TRACE_ARTIFACT",
           "SCHEMA_VERSION"]

# The name of the TORCH_TRACE artifact that holds one compile's decisions (docs/debugging.md).
TRACE_ARTIFACT = "sparse_inductor_decisions"
# Version of the dict layout of Report.to_dict() / LayerDecision.to_dict() (and so of the
# artifact's payload); raised when a field changes meaning or is removed.
SCHEMA_VERSION = 1


def _jsonable(v: Any) -> Any:
    """v with tuples as lists, NaN / Inf as None (strict JSON has neither: e.g. the density of a
    weight that was never read) and anything else JSON cannot hold (a dtype) as str."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


@dataclasses.dataclass
class LayerDecision:
    """What the compiler decided for one linear, and why.

    name:     module path of the linear (e.g. "blocks.0.mlp.fc1"), or the constant's name.
    shape:    (N, K) = (out_features, in_features).
    dtype:    the weight's dtype, e.g. "bfloat16".
    pattern:  "2:4", "block" or "dense" (what the weight is, exact zeros only).
    block:    the block size for "block", else None.
    density:  fraction of nonzero weights.
    kernel:   what runs: "dense" when the layer was not rewritten, else the sparse kernel.
    fused:    ops folded into the kernel (e.g. "bias", "transpose").
    reason:   why this kernel (or why dense).
    m:        rows of the input the decision assumed (None if unknown).
    dense_us / sparse_us: dense's and the chosen (or best) sparse kernel's time, measured on the
              device where `measured`, else the cost model's estimates, where it made them.
    candidates: measured median times (us) at M of "dense" and of each sparse kernel tried (None:
              it could not run); empty where nothing was measured.
    params:   the chosen kernel's parameters (e.g. cuSPARSELt's {"alg_id": 20, "split_k": 1}).
    row_check: how dense's non-finite rows come back where the kernel skips the zeros (cuSPARSELt,
              the block template; options nonfinite): "in x's norm" (the check fused into the
              norm that makes x), "own kernel" (one more read of x, lowering/row_check.py), "off"
              (nonfinite="fast"), "" (not needed: dense, or a kernel that multiplies the zeros).
    permutation: where a weight's row and column orders (a weight sparse behind a permutation; the
              reason says what was found) and the graph's shuffles next to the layer went, e.g. "x
              gathered in the kernel's loads; outputs mapped to their columns in the kernel's store",
              "x's order folded into blocks.0.fc1"; on a layer before: what a later layer folded into it.
    """

    name: str
    shape: tuple[int, int]
    dtype: str
    pattern: str
    block: Optional[int]
    density: float
    kernel: str
    fused: tuple[str, ...]
    reason: str
    m: Optional[int] = None
    dense_us: Optional[float] = None
    sparse_us: Optional[float] = None
    candidates: dict = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)
    measured: bool = False
    row_check: str = ""
    permutation: str = ""

    @property
    def sparse(self) -> bool:
        return self.kernel != "dense"

    def fused_text(self) -> str:
        """e.g. "transpose,bias; row check: own kernel"; a permuted layer's orders after it
        ("; permutation: x gathered in the kernel's loads")."""
        return ((",".join(self.fused) or "-") + (f"; row check: {self.row_check}" if self.row_check else "")
                + (f"; permutation: {self.permutation}" if self.permutation else ""))

    def line(self) -> str:
        blk = f" {self.block}x{self.block}" if self.block else ""
        fused = self.fused_text()
        return (f"{self.name}: {self.shape[0]}x{self.shape[1]} {self.dtype} {self.pattern}{blk} "
                f"density={self.density:.3f} -> {self.kernel}{self.params_text()} (fused: {fused}): {self.reason}"
                + (f" [timed: {self.times_text()}]" if self.candidates else ""))

    def params_text(self) -> str:
        return "(" + ", ".join(f"{k}={v}" for k, v in self.params.items()) + ")" if self.params else ""

    def times_text(self) -> str:
        """The measured candidates, e.g. "dense 1350.1 us, cusparselt 953.8 us, triton 1590.2 us"."""
        return ", ".join(f"{k} {v:.1f} us" if v is not None else f"{k} n/a" for k, v in self.candidates.items())

    def to_dict(self) -> dict:
        """Every field under its own name, JSON-safe (tuples as lists, NaN as None: strict JSON;
        `json.dumps` takes it), plus "sparse" (kernel != "dense"). Times are microseconds; a
        candidate that could not run is None."""
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["sparse"] = self.sparse
        return d


class Report:
    """The decisions of one compile; `str(report)` is a table, `.layers` the records."""

    def __init__(self, layers: list[LayerDecision], notes: Optional[list[str]] = None):
        self.layers = list(layers)
        self.notes = list(notes or [])

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def by_name(self, name: str) -> list[LayerDecision]:
        return [d for d in self.layers if d.name == name]

    def __str__(self) -> str:
        head = ("layer", "N x K", "dtype", "pattern", "density", "kernel", "fused", "timed (M)", "reason")
        rows = [head]
        for d in self.layers:
            pat = d.pattern + (f" {d.block}x{d.block}" if d.block else "")
            rows.append((d.name, f"{d.shape[0]}x{d.shape[1]}", d.dtype, pat, f"{d.density:.3f}",
                         d.kernel + d.params_text(), d.fused_text(), d.times_text() or "-", d.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = []
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(head[-1]))
        n_sparse = sum(d.sparse for d in self.layers)
        lines.append(f"{n_sparse} of {len(self.layers)} linear(s) run sparse")
        lines.extend(self.notes)
        return "\n".join(lines)

    __repr__ = __str__

    @classmethod
    def from_records(cls, items: Iterable[LayerDecision | str]) -> "Report":
        """A report of what a `collect()` block gathered (decisions and notes, in order)."""
        items = list(items)
        return cls([d for d in items if isinstance(d, LayerDecision)], [d for d in items if isinstance(d, str)])

    def to_dict(self) -> dict:
        """{"schema_version", "layers": [LayerDecision.to_dict(), ...], "notes": [...],
        "sparse": layers that run sparse, "total": layers}; JSON-safe, for notebooks and logs."""
        return {"schema_version": SCHEMA_VERSION, "layers": [d.to_dict() for d in self.layers],
                "notes": list(self.notes), "sparse": sum(d.sparse for d in self.layers), "total": len(self.layers)}

    def to_markdown(self) -> str:
        """The table of `str(report)` as a GitHub markdown table, then the count and the notes
        (a notebook shows it with `IPython.display.Markdown(report.to_markdown())`)."""
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ") or "-"

        head = ("layer", "N x K", "dtype", "pattern", "density", "kernel", "fused", "timed (M)", "reason")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in self.layers:
            pat = d.pattern + (f" {d.block}x{d.block}" if d.block else "")
            timed = (d.times_text() + (f" (M={d.m})" if d.m is not None else "")) if d.candidates else "-"
            row = (d.name, f"{d.shape[0]}x{d.shape[1]}", d.dtype, pat, f"{d.density:.3f}", d.kernel + d.params_text(),
                   d.fused_text(), timed, d.reason)
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
        lines.append("")
        lines.append(f"{sum(d.sparse for d in self.layers)} of {len(self.layers)} linear(s) run sparse")
        if self.notes:
            lines.append("")
            lines.extend(f"- {cell(n)}" for n in self.notes)
        return "\n".join(lines)


_local = threading.local()  # .sinks: the open collect() contexts of this thread


def _sinks() -> list[list]:
    if not hasattr(_local, "sinks"):
        _local.sinks = []
    return _local.sinks


@contextlib.contextmanager
def collect() -> Iterator[list]:
    """Collect the records (and notes, as strings) that this thread makes while the block runs."""
    sink: list = []
    _sinks().append(sink)
    try:
        yield sink
    finally:
        sinks = _sinks()  # by identity: list.remove would take the first sink of equal contents
        sinks[:] = [s for s in sinks if s is not sink]


def record(item: LayerDecision | str) -> None:
    """Log a decision (INFO) or a note (WARNING, and a Python warning so that it is seen)."""
    if isinstance(item, LayerDecision):
        log.info("%s", item.line())
    else:
        log.warning("%s", item)
        warnings.warn(item, RuntimeWarning, stacklevel=2)
    for sink in _sinks():
        sink.append(item)


def count(event: str, n: int = 1) -> None:
    """torch._dynamo.utils.counters["sparse_inductor"][event] += n: one event per rewrite, fold
    and fallback of the compiler (e.g. "rewrite", "kept_dense", "row_check_shared", "mlp_fused",
    "lowering_fallback"), beside Inductor's own counters; the tests assert on them."""
    if n:
        counters["sparse_inductor"][event] += n


def trace_decisions(items: Iterable[LayerDecision | str]) -> None:
    """Emit one compile's decisions and notes as the TORCH_TRACE artifact TRACE_ARTIFACT (JSON:
    Report.to_dict()), which tlparse lists under the compile it belongs to (docs/debugging.md).

    Costs one check of a logger's handlers when TORCH_TRACE is unset: the payload is built only
    when a trace is written.
    """
    from torch._logging import trace_structured  # torch's logging internals: loaded by the compile that traces

    items = list(items)
    trace_structured("artifact", metadata_fn=lambda: {"name": TRACE_ARTIFACT, "encoding": "json"},
                     payload_fn=lambda: json.dumps(Report.from_records(items).to_dict(), indent=1))
