"""The pass Inductor calls (post_grad_custom_pre_pass), with a cache-safe uuid().

Inductor's FX graph cache keys frozen weights by shape and dtype only, so two models of the same
shapes would share an artifact. The rewrite bakes compressed weights into the graph, so uuid()
covers (1) every source file of this package, (2) the options, and (3) a digest of the contents
of every weight that the pass may compress, computed by the backend before Inductor starts
(`weights_digest`). With options fx_cache=False and sparse weights present, uuid() is None and
Inductor bypasses its cache for the graph.

One pass object per hook on torch 2.11/2.12: a pass the user had installed runs after ours.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
from typing import Any, Iterable, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..options import SparseOptions
from ..report import record
from .detect import Detection, detect
from .linear_rewrite import rewrite_linears

log = logging.getLogger("sparse_inductor")

__all__ = ["SparseGraphPass", "weights_digest", "source_hash"]


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    root = pathlib.Path(__file__).resolve().parents[1]
    files = tuple(sorted(str(p) for p in root.rglob("*.py")))
    return get_hash_for_files(files).hex()


def _candidates(tensors: Iterable[Any]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            continue
        if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
            continue
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def weights_digest(tensors: Iterable[Any], opts: SparseOptions) -> tuple[Optional[str], set[int]]:
    """sha256 over the contents of the 2-D float tensors that detection calls sparse.

    Returns (digest, storage pointers of the digested tensors); digest is None when the cache
    must be bypassed (fx_cache=False and a sparse weight is present).
    """
    h = hashlib.sha256()
    digested: set[int] = set()
    for t in _candidates(tensors):
        for w in (t, t.t()):  # a weight may appear as W or as W^T
            det: Detection = detect(w.detach(), opts)
            if det.pattern == "dense":
                continue
            digested.add(t.untyped_storage().data_ptr())
            h.update(f"{det.pattern}|{det.block}|{tuple(w.shape)}|{w.dtype}|".encode())
            data = w.detach().contiguous().cpu()
            h.update(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
            break
    if digested and not opts.fx_cache:
        return None, digested
    return h.hexdigest(), digested


class SparseGraphPass(CustomGraphPass):
    """weights_digest: see weights_digest(); digested: storages the digest covers (None: any weight
    may be rewritten, which is only safe when uuid() is None)."""

    def __init__(self, opts: SparseOptions, weights_digest: Optional[str], digested: Optional[set[int]] = None,
                 user_pass: Any = None):
        self.opts = opts
        self.weights_digest = weights_digest
        self.digested = None if weights_digest is None else (digested or set())
        self.user_pass = user_pass

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        try:
            rewrite_linears(gm, self.opts, self.digested)
        except Exception as e:  # never break the user's compile: the graph is valid layer by layer
            log.exception("sparse_inductor: the rewrite pass failed")
            record(f"sparse_inductor: rewrite pass failed ({type(e).__name__}: {e}); remaining layers stay dense")
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
