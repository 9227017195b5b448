"""The pass Inductor calls (post_grad_custom_pre_pass), with a cache-safe uuid().

Inductor's FX graph cache keys frozen weights by shape and dtype only, so two models of the same
shapes would share an artifact. The rewrite bakes compressed weights into the graph, so uuid()
covers (1) every source file of this package, (2) the options, and (3) a digest of the captured
graph and of the contents of every tensor it reads as a constant, computed by the backend before
Inductor starts (`weights_digest`). With options fx_cache=False, uuid() is None and Inductor
bypasses its cache for the graph.

One pass object per hook on torch 2.11/2.12: a pass the user had installed runs after ours.

Each call emits the decisions of its graph as the TORCH_TRACE artifact "sparse_inductor_decisions"
(report.trace_decisions; docs/debugging.md).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
from typing import Any, Callable, Iterable, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..options import SparseOptions
from ..report import collect, count, record, trace_decisions
from ..version import source_hash
from .cutlass_epilogue import fuse_cutlass_epilogues
from .derived_check import derive_library_checks
from .fuse_mlp import fuse_mlps
from .lib_activation import fuse_library_activations
from .linear_rewrite import rewrite_linears

log = logging.getLogger("sparse_inductor")

__all__ = ["SparseGraphPass", "weights_digest"]


def _update_with_bytes(h: Any, t: torch.Tensor) -> None:
    """Feed the raw bytes of `t` (row-major) to hash `h`, without numpy: a torch
    may run without it, and `Tensor.numpy()` then raises."""
    data = t.detach().contiguous().cpu()  # keeps the storage alive while we read it
    nbytes = data.numel() * data.element_size()
    if nbytes:
        h.update(memoryview((ctypes.c_ubyte * nbytes).from_address(data.data_ptr())))


def _plain_tensors(t: Any, h: Any) -> Iterable[Any]:
    """`t`, or for a tensor subclass that wraps others (a DTensor: its local shard) the tensors it
    wraps, after feeding its type and metadata (a DTensor's mesh and placements) to hash `h`."""
    if isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t):
        attrs, ctx = t.__tensor_flatten__()
        h.update(f"{type(t).__qualname__}{ctx!r}".encode())
        for a in attrs:
            yield from _plain_tensors(getattr(t, a), h)
    else:
        yield t


def weights_digest(graph_code: str, tensors: Iterable[Any], opts: SparseOptions) -> Optional[str]:
    """sha256 over the graph Dynamo captured and the contents of every tensor it reads as a
    constant (parameters, buffers, tensor attributes; of a DTensor its local shard and placements).

    Every constant the pass may compress, including those Inductor derives while freezing (e.g.
    the concatenated weight of two linears sharing an input), is a function of these. None when
    options fx_cache=False: Inductor then bypasses its cache and nothing is hashed.
    """
    if not opts.fx_cache:
        return None
    h = hashlib.sha256(graph_code.encode())
    seen = set()
    for t in (p for t in tensors for p in _plain_tensors(t, h)):
        if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        h.update(repr(key[1:]).encode())
        if key in seen:
            continue
        seen.add(key)
        _update_with_bytes(h, t)
    return h.hexdigest()


# What Inductor's CPU weight prepacking (freezing with cpp.weight_prepack) makes of a linear before
# the post-grad passes: an op on an opaque packed weight, which the rewrite cannot read.
_PREPACKED_LINEARS = ("mkl._mkl_linear", "mkldnn._linear_pointwise", "onednn.qlinear_pointwise")


def _note_prepacked(graph: torch.fx.Graph) -> None:
    """A note naming the linears that reach the pass prepacked for the CPU (they stay dense).

    Inductor registers its packing patterns at the first freezing compile of a process, if
    cpp.weight_prepack is on then, and applies them from then on whatever the setting: the
    backend's cpp.weight_prepack=False does not help after such a compile (torch 2.13, 2.14).
    """
    packed = [n.name for n in graph.nodes if n.op == "call_function" and str(n.target).startswith(_PREPACKED_LINEARS)]
    if packed:
        record(f"sparse_inductor: {len(packed)} linear(s) reached the pass prepacked for the CPU by Inductor's "
               f"freezing ({', '.join(packed[:4])}{', ...' if len(packed) > 4 else ''}) and stay dense: Inductor "
               "turns its CPU weight packing on at the first freezing compile of the process if "
               "cpp.weight_prepack is on then, and keeps it whatever the setting later; set "
               "TORCHINDUCTOR_CPP_WEIGHT_PREPACK=0 (or cpp.weight_prepack=False before that first compile)")


class SparseGraphPass(CustomGraphPass):
    """weights_digest: see weights_digest(); None makes uuid() None (no FX graph cache)."""

    def __init__(self, opts: SparseOptions, weights_digest: Optional[str], user_pass: Any = None,
                 input_reason: Optional[Callable[[torch.fx.Node], str]] = None):
        self.opts = opts
        self.weights_digest = weights_digest
        self.user_pass = user_pass
        self.input_reason = input_reason  # why a weight that is a graph input stays dense (backend.py)

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        with collect() as sink:
            _note_prepacked(graph)
            try:
                rewrite_linears(gm, self.opts, self.input_reason)
                fuse_mlps(gm, self.opts)
                derive_library_checks(gm, self.opts)
                fuse_library_activations(gm, self.opts)
                fuse_cutlass_epilogues(gm, self.opts)
            except Exception as e:  # never break the user's compile: the graph is valid layer by layer
                log.exception("sparse_inductor: the rewrite pass failed")
                count("pass_failed")
                record(f"sparse_inductor: rewrite pass failed ({type(e).__name__}: {e}); remaining layers stay dense")
        try:  # the decisions as they stand after every pass, inside this compile's TORCH_TRACE frame
            trace_decisions(sink)
        except Exception:
            log.exception("sparse_inductor: writing the TORCH_TRACE artifact failed")
        if self.user_pass is not None:
            self.user_pass(graph)

    def uuid(self) -> Optional[Any]:
        if self.weights_digest is None:
            return None
        user = None
        if self.user_pass is not None:
            user = self.user_pass.uuid() if isinstance(self.user_pass, CustomGraphPass) else None
            if user is None:
                return None
        return ("sparse_inductor", source_hash(), self.opts.digest(), self.weights_digest, user)
