"""Options of the sparse backend, in one dataclass, and the environment variables the project reads.

torch.compile accepts either `mode=` or `options=`, not both; so `options` may also carry "mode".
Keys that are not fields of SparseOptions are Inductor config settings and pass through to
Inductor unchanged (e.g. {"force": True, "max_autotune": True}).

Environment variables (read when a compile starts, never at import):
    SPARSE_INDUCTOR_CACHE_DIR   where measured kernel timings are cached (default: a folder
                                "sparse_inductor" in Inductor's cache directory).
    SPARSE_INDUCTOR_DISABLE=1   compile with plain Inductor: no detection, no rewrite.
    SPARSE_INDUCTOR_FORCE=1     as options={"force": True}.
The two switches take 1/0, true/false, yes/no or on/off (any case; unset or empty: off); any other
value is an error that names the variable.
Logging: TORCH_LOGS="+sparse_inductor" (the per-layer decisions at INFO, details at DEBUG).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from .formats import BLOCK_SIZES

__all__ = ["Rules", "SparseOptions", "resolve_options", "ENV_DISABLE", "ENV_FORCE"]

ENV_DISABLE = "SPARSE_INDUCTOR_DISABLE"
ENV_FORCE = "SPARSE_INDUCTOR_FORCE"

PATTERNS = ("2:4", "block")
_DISPATCH = ("auto", "measure", "model")
_NONFINITE = ("exact", "fast")
_FP8_PRODUCT = ("bf16", "fp32")
_INT8_PRODUCT = ("bf16", "int32")
_REDUCTIONS = ("one-pass", "inductor")
_PERMUTE_APPLY = ("timed", "kernel", "graph")
_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_ON_WEIGHT_CHANGE = ("recompile", "raise", "ignore")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_CHECK_TIMING = ("separate", "fused")


@dataclasses.dataclass(frozen=True)
class Rules:
    """Rules of the rewrite that each default to what measured best; switching one gives the build
    without it, for A/B comparisons (bench/ab_rules.py) and tests. They are part of the options, so
    of opts.digest() and of the pass's FX-cache key: a graph built under one rule is never reused
    under another. options={"rules": {"derived_check": False}} or SparseOptions(rules=Rules(...)).

    row_fixup_in_graph:       after a cuSPARSELt layer whose every use is pointwise, its non-finite
                              row fixup is y * (1 + g), which Inductor inlines into those ops (no
                              kernel of its own); False: the op's own nan_rows_ launch
                              (passes/row_checks.py).
    pointwise_producer_check: how a row check over x is timed where x comes from an Inductor
                              pointwise kernel (a GELU, the gated product), which the check would
                              turn into a reduction: "separate" (one more read of x, the check a
                              kernel of its own), or "fused" (free). On the H200 ViT-B/16's GELU with
                              the check fused ran 27-35 us a layer slower than the GELU alone, more
                              than a separate pass over x (~20 us; docs/performance.md).
    norm_reads_its_input:     a reduction among a pointwise x's sources counts as x's norm (the
                              check then rides in it, timed free) only where the pointwise ops also
                              read what it reduces, as a LayerNorm / RMSNorm does; False: any
                              reduction counts (a cuSPARSELt layer's row fixup, a sum over that
                              layer's input, then makes the check after it "fused").
    derived_check:            a block-sparse fc2 after a block-sparse fc1 and an activation takes its
                              non-finite row check from fc1's input (passes/fuse_mlp.py); False:
                              its own check over the hidden activations.
    skip_hidden:              such an fc1 leaves out the hidden units fc2 does not read or folds into
                              its bias (passes/fuse_mlp.py); False: fc1 computes every hidden unit.
    derived_lib_check:        the same derived check for a cuSPARSELt fc2 (passes/derived_check.py);
                              False: fc2's own check over the hidden activations.
    derived_lib_min_bytes:    the hidden activations' bytes (M x H x itemsize at the dispatcher's M)
                              under which a cuSPARSELt fc2 keeps its own check: the check over h is
                              cheap there, the derived one one more launch (~1-2 us in a CUDA graph).
                              4 MiB, ~1 us of HBM traffic on the H100 / H200: a guess, not timed.
    lib_activation:           a ReLU / GELU after a cuSPARSELt layer moves into the library's
                              epilogue where the library computes the graph's function
                              (passes/lib_activation.py); False: an Inductor kernel after the call.
    """

    row_fixup_in_graph: bool = True
    pointwise_producer_check: str = "separate"
    norm_reads_its_input: bool = True
    derived_check: bool = True
    skip_hidden: bool = True
    derived_lib_check: bool = True
    derived_lib_min_bytes: int = 4 << 20
    lib_activation: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            name, value = f"rules.{f.name}", getattr(self, f.name)
            if f.type in ("bool", bool):
                _check_type(name, value, bool, "True or False")
            elif f.type in ("int", int):
                _check_type(name, value, int, "an int", exclude=bool)
                if value < 0:
                    raise ValueError(f"option {name!r} must be >= 0, got {value}")
            else:
                _check_type(name, value, str, "a string")
        if self.pointwise_producer_check not in _CHECK_TIMING:
            raise ValueError(f"unknown rules.pointwise_producer_check {self.pointwise_producer_check!r}; "
                             f"choose from {_CHECK_TIMING}")

    @classmethod
    def of(cls, value: Any) -> "Rules":
        """Rules from a Rules or a mapping of some of its fields (the others at their defaults)."""
        if isinstance(value, Rules):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"option 'rules' must be a Rules or a dict of its fields, got {type(value).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown rule(s) {unknown} in option 'rules'; the rules are {names}")
        return cls(**value)


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
                       apart (docs/performance.md).
    reductions:        how Inductor compiles the activation-quantize kernels around the 8-bit
                       linears (amax over a row, then scale, round, clamp and cast to 8 bits,
                       fused with x's producer):
                       "one-pass" (default): a persistent reduction for rows of up to 8192 elements
                       (the row held in registers), where Inductor would loop over it twice and
                       compute the producer (e.g. a dequantization and GELU) twice; "inductor":
                       Inductor's own choice. Other kernels are untouched (lowering/reductions.py).
    on_weight_change:  what a compiled model does when a frozen parameter or buffer changed since
                       compile time (an in-place update: load_state_dict, an optimizer step,
                       `weight.mul_(2)` under no_grad, `copy_`; or the parameter object replaced,
                       or its `.data` reassigned), checked on every call by PyTorch's version counter,
                       the tensor's identity and its data pointer: "recompile" (default): this call
                       runs the captured graph eagerly with the new values and the next one compiles
                       it again; "raise": a WeightsChangedError naming the changed tensors; "ignore":
                       Inductor's freezing semantics, the values of compile time for every weight,
                       dense or sparse alike (the compiled model holds its own copy of the frozen
                       tensors, so it costs their memory once more; no check per call).
                       Writes through `.data` (`weight.data.mul_(2)`) bypass the version counter:
                       no mode sees them (docs/decisions.md, "Weights that change").
    rules:             the rewrite's rules (Rules: each on by default), a Rules or a dict of some of its
                       fields, e.g. {"derived_check": False}.
    permute:           where a weight is neither 2:4 nor block-sparse as stored, search row and column
                       orders that make it so (formats/permute.py: exact on shuffled block-sparse
                       weights, best effort for 2:4 under a column order); the layer's kernel then
                       reads x gathered and writes its outputs at their own columns, or the orders are
                       folded into a constant neighbour (passes/fold_permutations.py). Only exact
                       zeros count: a permutation reorders, never prunes. A weight with no more than
                       half of its entries zero is refused before any search (no order can help).
    experimental:      kernel families that are candidates only where named here (or pinned with
                       `kernel`), e.g. ("cutlass",): the CUTLASS family, until its GPU tests pass
                       (docs/decisions.md, "The CUTLASS family").
    permute_apply:     where a permuted layer's orders go that no neighbour takes (the Triton kernels;
                       cuSPARSELt and CUTLASS always read x gathered before the call): "timed" (the
                       dispatcher times both and keeps the faster, per side), "kernel" (x gathered in
                       the kernel's loads, outputs mapped in its store: no pass of their own), "graph"
                       (gathers of x before the call and of the outputs after it, which Inductor can fuse
                       into the kernels that make x and read y).
    permute_budget_s:  the search's time per weight, in seconds (results, refusals included, are cached
                       on disk by the weight's nonzero mask, next to the timing cache; a search over a
                       second is logged).
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
    on_weight_change: str = "recompile"
    rules: Rules = dataclasses.field(default_factory=Rules)
    permute: bool = True
    permute_budget_s: float = 2.0
    permute_apply: str = "timed"
    experimental: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "rules", Rules.of(self.rules))
        for name in ("force", "fx_cache", "fuse_mlp", "permute"):
            _check_type(name, getattr(self, name), bool, "True or False")
        for name in ("max_block_density", "min_speedup", "permute_budget_s"):
            _check_type(name, getattr(self, name), (int, float), "a number", exclude=bool)
        for name in ("dispatch", "nonfinite", "fp8_product", "int8_product", "reductions", "on_weight_change",
                     "permute_apply"):
            _check_type(name, getattr(self, name), str, "a string")
        for name in ("kernel", "mode"):
            if getattr(self, name) is not None:
                _check_type(name, getattr(self, name), str, "a string or None")
        object.__setattr__(self, "patterns", _sequence("patterns", self.patterns, str, '("2:4", "block")'))
        object.__setattr__(self, "experimental", _sequence("experimental", self.experimental, str, '("cutlass",)'))
        sizes = _sequence("block_sizes", self.block_sizes, int, "(32, 64)")
        object.__setattr__(self, "block_sizes", tuple(sorted(set(sizes), reverse=True)))
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
        if not 0 < self.permute_budget_s < float("inf"):
            raise ValueError(f"permute_budget_s must be a positive number of seconds, got {self.permute_budget_s}")
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
        if self.permute_apply not in _PERMUTE_APPLY:
            raise ValueError(f"unknown permute_apply {self.permute_apply!r}; choose from {_PERMUTE_APPLY}")
        if self.mode not in _MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {_MODES[1:]}")
        if self.on_weight_change not in _ON_WEIGHT_CHANGE:
            raise ValueError(f"unknown on_weight_change {self.on_weight_change!r}; choose from {_ON_WEIGHT_CHANGE}")

    def digest(self) -> str:
        return repr(dataclasses.astuple(self))


def _check_type(name: str, value: Any, types, what: str, exclude: type | None = None) -> None:
    if not isinstance(value, types) or (exclude is not None and isinstance(value, exclude)):
        raise TypeError(f"option {name!r} must be {what}, got {type(value).__name__} {value!r}")


def _sequence(name: str, value: Any, item: type, example: str) -> tuple:
    """A tuple of `item`s from a list or tuple (a lone string is not a sequence of patterns here)."""
    if not isinstance(value, (list, tuple)) or any(not isinstance(v, item) or isinstance(v, bool) for v in value):
        raise TypeError(f"option {name!r} must be a tuple of {item.__name__}s, e.g. {example}, "
                        f"got {type(value).__name__} {value!r}")
    return tuple(value)


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
    if env_flag(ENV_FORCE):
        ours["force"] = True
    opts = SparseOptions(**ours)
    if opts.mode not in (None, "default"):
        # Inductor's internals: loaded by the compile that calls this
        import torch._inductor

        inductor = {**torch._inductor.list_mode_options(opts.mode), **inductor}
    _check_inductor_keys(inductor)
    return opts, inductor


def _check_inductor_keys(patches: Mapping[str, Any]) -> None:
    # Inductor's internals: loaded by the compile that calls this
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


def env_flag(name: str) -> bool:
    """An on/off environment variable: 1/0, true/false, yes/no, on/off (any case); unset or empty is
    off. Any other value raises, naming the variable: a typo must not silently pick a side."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r}: expected one of "
                     f"1/0, true/false, yes/no, on/off")


def disabled_by_env() -> bool:
    return env_flag(ENV_DISABLE)
