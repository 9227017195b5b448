"""One pass over the row for the activation-quantize kernels Inductor makes around the 8-bit
linears (docs/decisions.md, "Quantize kernels").

Dynamic int8 activations (per-token scale: amax over the row, divide, round, clamp, cast) fuse
into one Inductor reduction kernel with whatever produces x: a norm, or the previous linear's
dequantization, bias and GELU. Inductor makes a reduction over more than 1024 elements a looped
one: a first loop computes the amax, a second loop computes the same inputs again to quantize
them. For ViT-H's fc2 input (8224 x 5120: the int32 product, its scales, bias and an erf GELU)
that is two reads and two GELUs per element, 215 us per call on the H100 where one pass would
move the bytes in about 70. A persistent reduction keeps the row in registers: one read, one
GELU: 148 us (bench/profile_models.py, docs/performance.md; still compute-bound).

`quantize_reductions()` is the context the backend compiles in (options reductions="one-pass",
the default): Inductor's own choice, except that an inner reduction whose kernel stores an 8-bit
tensor (the quantize step) or computes a row check (below), and whose row is at most MAX_ROW
elements, is made persistent. Every other kernel is left to Inductor. Only where Inductor's
choices handler is its default one (a user's own handler is left alone).

The same for the non-finite row checks of the zero-skipping linears (passes/row_checks.row_check:
sum_k 0 * x[m, k], FX nodes marked ROW_CHECK_MARK), where the check is Inductor ops fused with x's
producer: a norm's kernel (a check after a pointwise producer is a kernel of its own,
lowering/row_check.py), and sparse_inductor::row_check's own CPU lowering (Inductor ops). A GELU +
check kernel between a cuSPARSELt fc1 and fc2 made persistent ran 994 us per forward against 1092
looped (the 12 such kernels of ViT-B/16 b64 on the H200; dense's GELU 673; docs/performance.md).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger("sparse_inductor")

MAX_ROW = 8192  # 5120 fp32 values per row: 20 per thread at 8 warps; 8192 would be 32
# the mark (FX node meta key, value) the passes put on the nodes of a non-finite row check
# (passes/graph.mark): the kernels Inductor makes from them are the row-check kernels here
ROW_CHECK_MARK = ("sparse_inductor", "row_check")
_EIGHT_BIT = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)


def _stores_8bit(features) -> bool:
    for node in features.scheduler_nodes():
        buf = getattr(node, "node", None)
        try:
            if buf is not None and buf.get_dtype() in _EIGHT_BIT:
                return True
        except (AttributeError, NotImplementedError):
            continue
    return False


def _computes_row_check(features) -> bool:
    """Whether the kernel computes a sparse linear's non-finite row check (the FX nodes it lowers
    from carry ROW_CHECK_MARK). Never raises: Inductor asks during codegen."""
    try:
        for node in features.scheduler_nodes():
            buf = getattr(node, "node", None)
            for origin in getattr(buf, "origins", None) or ():
                meta = getattr(origin, "meta", None)
                if isinstance(meta, dict) and meta.get(ROW_CHECK_MARK[0]) == ROW_CHECK_MARK[1]:
                    return True
    except Exception as e:  # another Inductor's IR: Inductor's own choice
        log.debug("sparse_inductor: row-check kernel not recognised (%s)", e)
    return False


def _choices_class():
    # Inductor's internals: loaded by the compile that calls this
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class QuantizeChoices(InductorChoices):
        """InductorChoices with persistent reductions for the quantize and row-check kernels (see the module)."""

        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            if cooperative_reduction or not torch._inductor.config.triton.persistent_reductions:
                return False
            if features.get_reduction_hint() != ReductionHint.INNER:
                return False
            if not (_stores_8bit(features) or _computes_row_check(features)):
                return False
            return V.graph.sizevars.statically_known_leq(features.reduction_numel, MAX_ROW)

    return QuantizeChoices


@contextlib.contextmanager
def quantize_reductions(enabled: bool = True) -> Iterator[None]:
    """Compile inside this to make Inductor's quantize kernels one pass (see the module)."""
    if not enabled:
        yield
        return
    try:
        # Inductor's internals: loaded by the compile that calls this
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V

        prior = V.choices
        if type(prior) is not InductorChoices:  # a user's (or a later torch's) own handler: theirs
            log.debug("sparse_inductor: Inductor choices handler %s kept", type(prior).__name__)
            ctx = contextlib.nullcontext()
        else:
            ctx = V.set_choices_handler(_choices_class()())
    except Exception as e:  # an Inductor without this hook: its own choices
        log.debug("sparse_inductor: no choices handler (%s)", e)
        ctx = contextlib.nullcontext()
    with ctx:
        yield
