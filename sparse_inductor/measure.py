"""Timing a layer's candidates on its device at compile time, with an on-disk cache.

The dispatcher (dispatch.choose) asks a LayerTimer for the time of "dense" (F.linear on the real
weight: what Inductor runs for a dense linear, a cuBLAS call with the bias fused; torch._int_mm for
int8 x int8; torch._scaled_mm with the layer's scale shapes, bias and out_dtype for fp8) and of each
sparse kernel family (its eager launcher on the real compressed weight) at the layer's M. A
family with several parameter sets (cuSPARSELt's algorithm ids) is timed for each, and the
fastest set is returned with its time.

What a time means depends on how the model will run:
- mode="reduce-overhead" (CUDA graphs): the GPU time alone, the median of
  `triton.testing.do_bench` with the L2 cache flushed;
- otherwise (default mode), for kernels whose launch is heavy on the host (KernelSpec.host_heavy:
  cuSPARSELt: ~630 us per call through torch._cslt_sparse_mm, ~60 us through our plan cache, both
  measured on the H100 behind a deep GPU queue): GPU time + host time per call. Added, not the
  larger of the two: Inductor-compiled models are often close to host-bound already (ViT-H/14 at
  batch 32: 13.8 ms of host time per 26 ms forward, dense), so the extra host time of a sparse call
  is not hidden behind the GPU. Dense and the Triton templates are launched by Inductor's generated
  code at a few us per kernel, so their GPU time alone is compared (their eager launchers, used
  here for timing, cost more host time than the compiled code does).

Times are cached in a JSON file (SPARSE_INDUCTOR_CACHE_DIR, default `<Inductor cache dir>/
sparse_inductor/timings.json`), keyed by GPU name, torch / triton / cuSPARSELt versions, this
package's source hash, the kernel, the timing mode and the layer's shape, dtype and structure, so
a second compile of the same shapes times nothing. Delete the file to re-measure.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import version
from ._compat import device_name
from .options import SparseOptions
from .registry import KernelSpec, Layer
from .runtime import cusparselt

log = logging.getLogger("sparse_inductor")

__all__ = ["LayerTimer", "cache_dir", "cache_path", "time_cached", "time_us", "ENV_CACHE_DIR"]

ENV_CACHE_DIR = "SPARSE_INDUCTOR_CACHE_DIR"


def cache_dir() -> str:
    """The folder of this package's on-disk caches: SPARSE_INDUCTOR_CACHE_DIR, else a folder
    sparse_inductor in Inductor's cache directory (timings.json here; formats/permute.py's
    PermutationCache takes it as its directory)."""
    root = os.environ.get(ENV_CACHE_DIR)
    if not root:
        # Inductor's internals: loaded by the compile that calls this
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

        root = os.path.join(inductor_cache_dir(), "sparse_inductor")
    return root


def cache_path() -> str:
    return os.path.join(cache_dir(), "timings.json")


class _DiskCache:
    """A dict persisted as one JSON file; writes merge with what other processes wrote."""

    def __init__(self):
        self.lock = threading.Lock()
        self.path: Optional[str] = None
        self.data: dict = {}

    def _load(self, path: str) -> dict:
        try:
            with open(path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> Optional[dict]:
        with self.lock:
            path = cache_path()
            if path != self.path:
                self.path, self.data = path, self._load(path)
            return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        with self.lock:
            path = cache_path()
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                data = self._load(path)
                data[key] = value
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=0, sort_keys=True)
                os.replace(tmp, path)
                self.path, self.data = path, data
            except OSError as e:  # a read-only cache costs re-measuring, nothing else
                log.warning("sparse_inductor: cannot write the timing cache %s: %s", path, e)
                self.data[key] = value


CACHE = _DiskCache()


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture fn() in a CUDA graph (after a warm-up on a side stream) and return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_us(fn: Callable[[], object], count_host: bool) -> float:
    """Median GPU time of fn, L2 flushed, as a CUDA-graph replay (so that the eager launchers' host
    cost, which Inductor's generated code does not pay, stays out); with count_host, plus fn's
    median host time per call."""
    # Triton's benchmarking: loaded where something is timed
    import triton.testing

    try:
        replay = graphed(fn)
    except Exception as e:  # e.g. compiling inside someone's capture: time it as it is
        log.debug("sparse_inductor: CUDA-graph capture for timing failed (%s); timing eagerly", e)
        replay = fn
    gpu = triton.testing.do_bench(replay, warmup=5, rep=25, return_mode="median") * 1e3
    del replay
    if not count_host:
        return gpu
    # host time per call behind a deep GPU queue, as inside a model (launches get slower there)
    torch.cuda.synchronize()
    torch.cuda._sleep(40_000_000)  # ~20 ms of GPU time queued ahead of the calls
    host = []
    for _ in range(21):
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return gpu + sorted(host)[len(host) // 2] * 1e6


def _versions(device: torch.device) -> str:
    try:
        import triton  # (optional here: the key says "-" without it)

        tv = triton.__version__
    except ImportError:
        tv = "-"
    return (f"{device_name(device)}|torch {torch.__version__}|triton {tv}|"
            f"cusparselt {cusparselt.version()}|sparse_inductor {version.__version__} {version.source_hash()[:12]}")


def time_cached(key: str, make: Callable[[], Callable[[], object]], device: Optional[torch.device] = None) -> Optional[float]:
    """GPU time (us, as time_us without host time) of the function make() returns, cached on disk
    under key (prefixed with the device and versions, as LayerTimer's keys); None where it fails."""
    full = f"{_versions(device or torch.device('cuda'))}|{key}"
    hit = CACHE.get(full)
    if hit is not None:
        return hit.get("us")
    try:
        fn = make()
        fn()  # compile outside the timed region
        us = time_us(fn, False)
    except Exception as e:
        log.warning("sparse_inductor: timing %s failed: %s: %s", key, type(e).__name__, e)
        us = None
    CACHE.put(full, {"us": us})
    return us


# How far a candidate's output may be from the fp64 reference (relative Frobenius error over the
# checked rows) before it is dropped: a check for a wrong kernel (garbage, a layout mix-up: errors
# of order 1), not a precision test. x and W are exact in the layer's dtype, so what remains is the
# output's rounding (at most half an ulp: 2^-8 of |y| for bf16, 2^-11 for fp16) and fp32
# accumulation; the bounds below are four times the unit roundoff of what the kernel writes.
CHECK_TOLERANCE = {
    torch.float32: 2e-3,   # tf32 operands (10-bit mantissa) where the kernel's dot uses them: 2^-11 = 4.9e-4
    torch.float16: 2e-3,   # 4 * 2^-11
    torch.bfloat16: 1.6e-2,  # 4 * 2^-8
    torch.int32: 0.0,      # an int8 x int8 product in int32 is exact
}
CHECK_ROWS = 64  # rows of the output compared with the reference (evenly spread over M)


def check_output(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                 reference: Optional[Callable] = None) -> Optional[str]:
    """Why y is not x @ w^T (+ bias) within CHECK_TOLERANCE[y.dtype] on a few rows, or None.

    The reference is computed in float64 on CHECK_ROWS rows, with W in slices of 4096 rows (a
    large layer's fp64 copy would cost gigabytes). A runner whose kernel computes more than the
    product (a fused epilogue: lowering/cutlass_24.py) says what: reference(ref, rows) maps the fp64
    product of x's rows `rows` to what y's rows are (the runner's `reference` attribute)."""
    m, n = x.shape[0], w.shape[0]
    if tuple(y.shape) != (m, n):
        return f"wrong output shape {tuple(y.shape)}, expected {(m, n)}"
    rows = torch.linspace(0, m - 1, min(m, CHECK_ROWS), device=x.device).round().long().unique()
    xr = x[rows].double()
    ref = torch.cat([xr @ w[i:i + 4096].double().t() for i in range(0, n, 4096)], dim=1)
    if bias is not None:
        ref += bias.double()
    if reference is not None:
        ref = reference(ref, rows)
    got = y[rows].double()
    if not torch.isfinite(got).all():
        return "non-finite output on a finite input"
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-300))
    tol = CHECK_TOLERANCE.get(y.dtype, CHECK_TOLERANCE[torch.bfloat16])
    if not err <= tol:
        return f"wrong result: relative error {err:.2e} against an fp64 reference (allowed {tol:.0e})"
    return None


_KERNEL_SIDE = {"x": "loads", "y": "store"}


def pinned(variants: list[dict], apply: str) -> list[dict]:
    """A family's variants with options permute_apply held: "kernel" keeps those that apply a
    permuted layer's orders in the kernel's loads / store, "graph" those that gather in the graph,
    "timed" all (variants without those keys are kept by every setting)."""
    if apply == "timed":
        return variants

    def ok(p: dict) -> bool:
        want = _KERNEL_SIDE if apply == "kernel" else {side: "graph" for side in _KERNEL_SIDE}
        return all(p[side] == form for side, form in want.items() if side in p)

    return [p for p in variants if ok(p)] or variants


class LayerTimer:
    """The dispatcher's timer for one layer: (kernel name or "dense", M) -> (us, params) or None.

    Before a candidate is timed, its first call (which compiles or plans it) is checked against an
    fp64 reference (check_output) and synchronized, so that a kernel that computes something else,
    or that fails on the device, is dropped with the reason instead of being timed.

    w: the dense weight [N, K] on the device; tensors(spec): the spec's compressed constants
    (memoized by the caller, so the chosen kernel's constants are made once); structure: a string
    that tells apart weights whose kernel time differs at equal shape (the block layout).
    """

    def __init__(self, layer: Layer, w: torch.Tensor, has_bias: bool, opts: SparseOptions,
                 specs: dict[str, KernelSpec], tensors: Callable[[KernelSpec], dict], structure: str = ""):
        self.layer, self.w, self.has_bias, self.opts = layer, w, has_bias, opts
        self.specs, self.tensors = specs, tensors
        self.graphs = opts.mode == "reduce-overhead"
        self.structure = structure
        self._env: Optional[str] = None
        self.failures: dict[str, str] = {}  # kernel name -> why it could not be timed (the first error)

    def key(self, name: str, m: int) -> str:
        if self._env is None:
            self._env = _versions(self.w.device)
        ly = self.layer
        scaled = "" if ly.scaled is None else f"|scaled={ly.scaled}|guard={ly.guard}"
        if ly.product is not None:  # int8: what the library writes (its best algorithm differs)
            scaled += f"|product={ly.product}"
        if ly.epilogue and name != "dense":  # a family that fuses it is timed with it (CUTLASS)
            scaled += f"|epilogue={ly.epilogue!r}"
        return (f"{self._env}|{'graph' if self.graphs else 'eager'}|{name}|{ly.pattern}|M={m} N={ly.n} K={ly.k}|"
                f"{ly.dtype}|w={ly.weight_dtype}|bias={self.has_bias}|block={ly.block}|{self.structure}{scaled}"
                f"|rc={ly.row_check}{'+derived' if ly.derived_check else ''}"
                + (f"|perm={'x' if ly.x_index else ''}{'y' if ly.out_index else ''}|{self.opts.permute_apply}"
                   if ly.x_index or ly.out_index else ""))

    def __call__(self, name: str, m: int) -> Optional[tuple]:
        try:
            key = self.key(name, m)
            hit = CACHE.get(key)
            if hit is not None:
                if hit.get("us") is None and hit.get("why"):
                    self.failures.setdefault(name, hit["why"])
                return (hit["us"], hit.get("params", {})) if hit.get("us") is not None else None
            result = self._measure(name, m)
            entry = {"us": result[0] if result else None, "params": result[1] if result else {}}
            if result is None and name in self.failures:
                entry["why"] = self.failures[name]
            CACHE.put(key, entry)
            if result is not None:
                log.info("sparse_inductor: timed %s at M=%d N=%d K=%d: %.1f us %s", name, m, self.layer.n,
                         self.layer.k, result[0], result[1] or "")
            return result
        except Exception as e:  # a kernel that cannot be timed is not a candidate
            log.warning("sparse_inductor: timing %s failed at M=%d: %s: %s", name, m, type(e).__name__, e)
            self.failures.setdefault(name, f"{type(e).__name__}: {e}")
            return None

    def _measure(self, name: str, m: int) -> Optional[tuple]:
        ly, w = self.layer, self.w
        gen = torch.Generator(device=w.device).manual_seed(0)
        if ly.dtype == torch.float8_e4m3fn:
            x, bias, dense = self._fp8_inputs(m, gen)
            if name == "dense":
                return time_us(dense, False), {}
        elif ly.dtype == torch.int8:  # int8 x int8 -> int32: dense is torch._int_mm, as in the graph
            x = torch.randint(-127, 128, (m, ly.k), device=w.device, dtype=torch.int8, generator=gen)
            if name == "dense":  # with the graph's dequantization pass after it (read int32, write bf16)
                wt = w.t()
                return time_us(lambda: torch._int_mm(x, wt).to(torch.bfloat16), False), {}
            bias = None
        else:
            x = torch.randn(m, ly.k, device=w.device, dtype=ly.dtype, generator=gen)
            bias = torch.randn(ly.n, device=w.device, dtype=ly.dtype, generator=gen) if self.has_bias else None
        if name == "dense":  # (16-bit x)
            # a weight-only quantized W against its dequantized copy, converted once: dense's best case
            wd = w if w.dtype == x.dtype else w.to(x.dtype)
            return time_us(lambda: F.linear(x, wd, bias), False), {}
        spec = self.specs[name]
        tensors = self.tensors(spec)
        best, first_error = None, None
        for params in pinned(spec.variants(ly, tensors) if spec.variants else [{}], self.opts.permute_apply):
            try:
                fn = spec.runner(tensors, bias, ly, params)
                y = fn(x)  # compile / plan outside the timed region, and check what it computes
                if x.is_cuda:  # a failure on the device surfaces here, named for this candidate
                    torch.cuda.synchronize(x.device)
                why = check_output(y, x, w, self._reference_bias(bias), getattr(fn, "reference", None))
                if why is not None:
                    raise RuntimeError(f"{why} at M={m}")
                del y
                t = time_us(lambda: fn(x), spec.host_heavy and not self.graphs)
            except Exception as e:
                log.debug("sparse_inductor: %s %s failed at M=%d: %s", name, params, m, e)
                first_error = first_error or str(e)
                continue
            if best is None or t < best[0]:
                best = (t, dict(params))
        if best is None and first_error:  # no variant ran: the dispatcher reports why
            self.failures.setdefault(name, first_error)
        return best

    def _reference_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The bias the runner's output includes: none for fp8 forms whose epilogue adds it later."""
        sc = self.layer.scaled
        return None if sc is not None and sc.form != "tensor" else bias

    def _fp8_inputs(self, m: int, gen: torch.Generator) -> tuple:
        """fp8 x [m, K], the bias (out_dtype) and dense: torch._scaled_mm as the graph calls it, with
        the layer's scale shapes (per-tensor, or scale_a [M, 1] / scale_b [1, N]), out_dtype and
        use_fast_accum."""
        ly, w, sc = self.layer, self.w, self.layer.scaled
        dev = w.device
        x = torch.randn(m, ly.k, device=dev, generator=gen).to(torch.float8_e4m3fn)
        bias = torch.randn(ly.n, device=dev, generator=gen).to(sc.out_dtype) if self.has_bias else None
        sa = torch.full((m, 1) if sc.scale_a_vector else (), 0.5, device=dev)
        sb = torch.full((1, ly.n) if sc.scale_b_vector else (), 0.5, device=dev)
        wt = w.t()
        fast = sc.fast_accum
        return x, bias, lambda: torch._scaled_mm(x, wt, sa, sb, bias, out_dtype=sc.out_dtype, use_fast_accum=fast)
