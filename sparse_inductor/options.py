"""Options of the sparse backend, in one dataclass, and the environment variables the project reads.

torch.compile accepts either `mode=` or `options=`, not both; so `options` may also carry "mode".
Keys that are not fields of SparseOptions are Inductor config settings and pass through to
Inductor unchanged (e.g. {"force": True, "max_autotune": True}).

Environment variables (read when a compile starts, never at import):
    SPARSE_INDUCTOR_CACHE_DIR   where measured kernel timings are cached (default: a folder
                                "sparse_inductor" in Inductor's cache directory).
    SPARSE_INDUCTOR_DISABLE=1   compile with plain Inductor: no detection, no rewrite.
    SPARSE_INDUCTOR_FORCE=1     as options={"force": True}.
Logging: TORCH_LOGS="+sparse_inductor" (the per-layer decisions at INFO, details at DEBUG).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from .formats import BLOCK_SIZES

__all__ = ["SparseOptions", "resolve_options", "ENV_DISABLE", "ENV_FORCE"]

ENV_DISABLE = "SPARSE_INDUCTOR_DISABLE"
ENV_FORCE = "SPARSE_INDUCTOR_FORCE"

PATTERNS = ("2:4", "block")
_DISPATCH = ("auto", "measure", "model")
_NONFINITE = ("exact", "fast")
_FP8_PRODUCT = ("bf16", "fp32")
_INT8_PRODUCT = ("bf16", "int32")
_REDUCTIONS = ("one-pass", "inductor")
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class SparseOptions:
    """What the sparse backend detects and when it rewrites a layer.

    force:             rewrite every detected 2:4 / block-sparse layer, even where the cost model
                       expects dense to be faster (tests use it on CPU, where nothing else is).
    patterns:          which sparsity patterns to look for.
    block_sizes:       square block sizes to try for block sparsity.
    max_block_density: a weight counts as block-sparse only if at most this fraction of its
                       blocks hold a nonzero.
    min_speedup:       a layer is made sparse only if its kernel is expected to be at least this
                       much faster than dense (1.05 = 5%).
    kernel:            pin one kernel family for every sparse layer ("reference", "triton", ...);
                       None lets the dispatcher choose.
    dispatch:          how the dispatcher decides: "auto" (measure where it can: CUDA), "measure"
                       (time dense and each candidate on the device, cached on disk; see measure.py),
                       "model" (the roofline estimate only, no timing at compile time).
    fx_cache:          let Inductor's FX graph cache store graphs with sparse weights (keyed by a
                       digest of the weights' contents; the compressed weights go into the
                       artifact). False bypasses the cache for such graphs.
    mode:              torch.compile's mode, for callers that also pass options.
    nonfinite:         "exact" (default): a NaN/Inf input row gives a non-finite output row, as dense
                       does, also after cuSPARSELt and the block-sparse kernel (which never multiply
                       the pruned zeros): a row check (a reduction over x) that the op applies. It is
                       nearly free where the reduction joins x's producer (a norm) and one more
                       read of x elsewhere (x from a graph input, attention, a GELU: a kernel of
                       its own, lowering/row_check.py). "fast": no row check; an input NaN/Inf that
                       meets only pruned zeros then leaves those outputs finite (the 2:4 Triton
                       kernels stay exact either way: they multiply the zeros or check inside).
    fp8_product:       how an fp8 torch._scaled_mm rewritten to cuSPARSELt hands its product to the
                       epilogue (the Inductor kernel that applies the scales, bias, row guard and
                       cast; docs/formats.md, "fp8"): "bf16" (default): where out_dtype is bf16, the
                       library writes the unscaled product in bf16 (form "lib16": half the bytes of
                       fp32, one more rounding: at most 2^-8 of the product, so at most one bf16 ulp
                       of the output in all instead of half of one); "fp32": the library writes its
                       fp32 accumulator (form "row": one rounding, as torch._scaled_mm). fp16 and fp32
                       outputs always take "fp32" (an unscaled fp16 product can overflow 65504).
    int8_product:      what cuSPARSELt writes for a torch._int_mm (int8 x int8) it computes
                       (docs/formats.md, "int8 activations"): "bf16" (default): the int32 product
                       rounded to bf16 (half the bytes of int32; at most 2^-8 of the product, the
                       size of the bf16 output's own rounding), and only where every use of the
                       product converts it to a floating dtype first (the dequantization); an
                       integer use (e.g. a zero-point correction) keeps "int32"; "int32": exact, as
                       torch._int_mm.
    fuse_mlp:          fuse two block-sparse linears on the block template with an activation
                       between them (ReLU, GELU, SiLU or none; fp16 / bf16) into one kernel that
                       never writes the hidden activations (passes/fuse_mlp.py), where it is
                       measured faster than the two layers apart. Off by default: on the H200 the
                       fused kernel ran ViT-B's MLP in 119.9 us against 111.6 for the two layers
                       apart (docs/benchmarks.md K2).
    reductions:        how Inductor compiles the activation-quantize kernels around the 8-bit
                       linears (amax over a row, then scale, round, clamp and cast to 8 bits,
                       fused with x's producer):
                       "one-pass" (default): a persistent reduction for rows of up to 8192 elements
                       (the row held in registers), where Inductor would loop over it twice and
                       compute the producer (e.g. a dequantization and GELU) twice; "inductor":
                       Inductor's own choice. Other kernels are untouched (lowering/reductions.py).
    """

    force: bool = False
    patterns: tuple[str, ...] = PATTERNS
    block_sizes: tuple[int, ...] = BLOCK_SIZES
    max_block_density: float = 0.5
    min_speedup: float = 1.05
    kernel: Optional[str] = None
    dispatch: str = "auto"
    fx_cache: bool = True
    mode: Optional[str] = None
    nonfinite: str = "exact"
    fp8_product: str = "bf16"
    int8_product: str = "bf16"
    reductions: str = "one-pass"
    fuse_mlp: bool = False

    def __post_init__(self):
        object.__setattr__(self, "patterns", tuple(self.patterns))
        object.__setattr__(self, "block_sizes", tuple(sorted(set(self.block_sizes), reverse=True)))
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad:
            raise ValueError(f"unknown sparsity pattern(s) {bad}; choose from {PATTERNS}")
        bad = [b for b in self.block_sizes if b not in BLOCK_SIZES]
        if bad:
            raise ValueError(f"unsupported block size(s) {bad}; choose from {BLOCK_SIZES}")
        if not 0.0 <= self.max_block_density <= 1.0:
            raise ValueError(f"max_block_density must be in [0, 1], got {self.max_block_density}")
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be positive, got {self.min_speedup}")
        if self.dispatch not in _DISPATCH:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; choose from {_DISPATCH}")
        if self.nonfinite not in _NONFINITE:
            raise ValueError(f"unknown nonfinite {self.nonfinite!r}; choose from {_NONFINITE}")
        if self.fp8_product not in _FP8_PRODUCT:
            raise ValueError(f"unknown fp8_product {self.fp8_product!r}; choose from {_FP8_PRODUCT}")
        if self.int8_product not in _INT8_PRODUCT:
            raise ValueError(f"unknown int8_product {self.int8_product!r}; choose from {_INT8_PRODUCT}")
        if self.reductions not in _REDUCTIONS:
            raise ValueError(f"unknown reductions {self.reductions!r}; choose from {_REDUCTIONS}")
        if self.mode not in _MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {_MODES[1:]}")

    def digest(self) -> str:
        return repr(dataclasses.astuple(self))


_FIELDS = {f.name for f in dataclasses.fields(SparseOptions)}


def resolve_options(
    mode: Optional[str] = None, options: Optional[Mapping[str, Any] | SparseOptions] = None
) -> tuple[SparseOptions, dict[str, Any]]:
    """Split what torch.compile passed into (SparseOptions, Inductor config patches)."""
    if isinstance(options, SparseOptions):
        ours, inductor = dataclasses.asdict(options), {}
    else:
        options = dict(options or {})
        ours = {k: v for k, v in options.items() if k in _FIELDS}
        inductor = {k: v for k, v in options.items() if k not in _FIELDS}
    if mode is not None:
        if ours.get("mode") not in (None, mode):
            raise ValueError(f"mode given twice: {mode!r} and options['mode']={ours['mode']!r}")
        ours["mode"] = mode
    if os.environ.get(ENV_FORCE, "") not in ("", "0"):
        ours["force"] = True
    opts = SparseOptions(**ours)
    if opts.mode not in (None, "default"):
        import torch._inductor

        inductor = {**torch._inductor.list_mode_options(opts.mode), **inductor}
    _check_inductor_keys(inductor)
    return opts, inductor


def _check_inductor_keys(patches: Mapping[str, Any]) -> None:
    import torch._inductor.config as ic

    known = set(ic._config.keys()) if hasattr(ic, "_config") else None
    if known is None:
        return
    unknown = [k for k in patches if k not in known]
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}: neither a SparseOptions field ({sorted(_FIELDS)}) "
            "nor an Inductor config setting"
        )


def disabled_by_env() -> bool:
    return os.environ.get(ENV_DISABLE, "") not in ("", "0")
