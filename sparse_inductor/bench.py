"""Benchmarks: `python -m sparse_inductor.bench [--sections linear24,block,cusparselt,e2e,quant,int8_act,fp8,cutlass] [--json out.json]`.

Needs a CUDA GPU. Every time is the median of triton.testing.do_bench (L2 flushed between reps),
in microseconds. Compiled modules and our kernels are timed as CUDA-graph replays, so that Python
and launch overhead do not hide the kernels (a torch.compile'd single linear costs ~50 us of host
time per call in default mode, measured on the H100); PyTorch's own sparse paths are timed as a
user calls them (eager), which is what the anchors report. Ratios are dense time / candidate time
(above 1 = faster than dense), always from the same run. The header names device, versions, date.
`--json` writes {"schema_version", "header", "rows"}: one row per measured case, its fields per
section in docs/benchmarks-schema.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import signal
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
from torch.sparse import to_sparse_semi_structured
from triton.testing import do_bench

from .backend import _FrozenCall
from .formats import compress_24, compress_block, gemv_layout_ok, to_gemv_layout
from .lowering import cutlass_24
from .lowering.triton_24 import sp24_linear
from .lowering.triton_block import block_linear
from .measure import LayerTimer, graphed
from .options import SparseOptions
from .prune import prune, prune_24_, prune_blocks_
from .registry import Fusion, Layer, Scaled, kernels
from .report import LayerDecision, collect
from .runtime import cusparselt
from .runtime import cutlass as cutlass_rt


# Version of the --json layout (docs/benchmarks-schema.md); raised when a field changes meaning or is
# removed (adding one does not).
SCHEMA_VERSION = 1


def _bench(fn: Callable, rep: int = 100) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def _bench_settled(fn: Callable, rounds: int = 3, rep: int = 100) -> float:
    """The least of `rounds` medians of one callable: single medians of compiled modules under
    reduce-overhead varied up to 2x within one run (dense 4096x4096 at M = 64: 75.4 and 38.5 us,
    H100), more than the differences they are compared for."""
    return min(_bench(fn, rep=rep) for _ in range(rounds))


def _bench_gpu(fn: Callable, reps: int = 100) -> float:
    """Median GPU time of one call of fn with its host time hidden, L2 flushed: before each timed
    call the GPU sleeps ~1 ms, so the host has queued the whole call before the GPU reaches the
    start event. do_bench of a plain call counts the host time where the GPU waits for it (after
    its ~85 us cache flush): a reduce-overhead single linear at M <= 256 measured anywhere from
    38.5 to 75.4 us for one dense 4096x4096 kernel at M = 64 (H100), by the host's jitter."""
    fn()
    torch.cuda.synchronize()
    cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        cache.zero_()
        torch.cuda._sleep(2_000_000)  # cycles: ~1 ms at the H100's 1.5-2 GHz
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2] * 1e3


def _graphed(fn: Callable) -> Callable:
    return graphed(fn)


def _try(fn: Callable) -> Optional[float]:
    try:
        return fn()
    except Exception as e:  # a baseline that fails (e.g. shape limits) is reported, not fatal
        print(f"    (failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        return None


def header() -> str:
    cslt = ""
    try:
        cslt = f", cuSPARSELt {torch.backends.cusparselt.version()}"
    except Exception:
        pass
    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}{cslt}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}; bf16; "
            "medians of do_bench (L2 flushed), us")


def _fmt(t: Optional[float]) -> str:
    return "-" if t is None else f"{t:.1f}"


def _ratio(dense: Optional[float], t: Optional[float]) -> str:
    return "-" if dense is None or t is None else f"{dense / t:.2f}x"


def _pair(ro: dict, name: str) -> str:
    """"GPU / call" us of one compiled module in a _ro_case result."""
    return f"{_fmt(ro.get(name + '_gpu'))} / {_fmt(ro.get(name + '_ro'))}"


def _pair_ratio(ro: dict, name: str) -> str:
    return f"{_ratio(ro.get('dense_gpu'), ro.get(name + '_gpu'))} / {_ratio(ro.get('dense_ro'), ro.get(name + '_ro'))}"


def _compiled_linear(w: torch.Tensor, bias: Optional[torch.Tensor], backend: str, options=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    torch._dynamo.reset()
    return torch.compile(lin.eval(), backend=backend, options=options)


def _layer_times(w: torch.Tensor, x: torch.Tensor) -> dict:
    """Dense F.linear, dense torch.compile, ours compiled with force=True (CUDA-graph replays),
    and the kernel the dispatcher picks without force, for y = x @ w^T."""
    with torch.no_grad():
        dense = _bench(_graphed(lambda: F.linear(x, w)))
        dc = _compiled_linear(w, None, "inductor")
        dense_c = _bench(_graphed(lambda: dc(x)))
        ours_mod = _compiled_linear(w, None, "sparse", {"force": True})
        ours_mod(x)
        ours = _bench(_graphed(lambda: ours_mod(x)))
        with collect() as sink:
            _compiled_linear(w, None, "sparse")(x)
    chosen = next((d.kernel for d in sink if isinstance(d, LayerDecision)), "?")
    return dict(dense=dense, dense_compile=dense_c, compiled=ours, chosen=chosen)


def _case24(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded bf16 2:4 weight W [n, k] (two largest of four kept) and input x [m, k] on the GPU."""
    torch.manual_seed(0)
    w = prune_24_(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    return w, torch.randn(m, k, device="cuda", dtype=torch.bfloat16)


def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (w_int8, fp32 scale [N]) with w ~ w_int8 * scale[:, None]."""
    scale = w.float().abs().amax(1).clamp_min(1e-8) / 127
    return (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def fp8_per_tensor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor e4m3: (t_fp8, fp32 scale of shape ()) with t ~ t_fp8 * scale (zeros stay zeros)."""
    scale = t.float().abs().amax().clamp_min(1e-12) / 448
    return (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel e4m3: (w_fp8, fp32 scale [1, N]), torch._scaled_mm's row-wise scale_b."""
    scale = w.float().abs().amax(1).clamp_min(1e-12) / 448
    return (w.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), scale[None, :]


class Fp8Linear(nn.Module):
    """An fp8 linear as users write it: e4m3 weight W8 [N, K] with its fp32 scale (per-tensor, or
    per-channel [1, N]), the input quantized per tensor (or per row: rowwise=True) on the fly, then
    torch._scaled_mm(x8, W8^T, scale_a, scale_b, bias, out_dtype=out_dtype, use_fast_accum=fast_accum).
    forward(x) quantizes x; forward(x8, x_scale) takes it already quantized."""

    def __init__(self, wq: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 rowwise: bool = False, out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False):
        super().__init__()
        self.register_buffer("wq", wq)
        self.register_buffer("w_scale", w_scale.float())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.rowwise, self.out_dtype, self.fast_accum = rowwise, out_dtype, fast_accum

    def forward(self, x, x_scale=None):
        if x_scale is None:
            amax = x.abs().amax(dim=-1, keepdim=True) if self.rowwise else x.abs().amax()
            x_scale = amax.float().clamp(min=1e-12) / 448
            x = (x.float() / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        return torch._scaled_mm(x, self.wq.t(), x_scale, self.w_scale, self.bias, out_dtype=self.out_dtype,
                                use_fast_accum=self.fast_accum)

    def fp64(self, xq: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The dequantized matmul in float64: (x8 @ W8^T) * scale_a * scale_b + bias."""
        y = (xq.double() @ self.wq.double().T) * x_scale.double() * self.w_scale.double()
        return y if self.bias is None else y + self.bias.double()


def _as_compiled(compressed: tuple, x: torch.Tensor) -> tuple:
    """The 2:4 constants in the layout the compiled graph gives the Triton kernel: the gemv layout
    for M = 1 and bf16 x (lowering/triton_24._gemv_layout), else compress_24's."""
    if x.shape[0] == 1 and x.dtype == torch.bfloat16 and gemv_layout_ok(x.shape[1]):
        return to_gemv_layout(*compressed)
    return compressed


def bench_linear24(rows: list, shapes=None):
    shapes = shapes or [(m, n, k) for (n, k) in [(14336, 4096), (4096, 4096), (4096, 14336)] for m in (1, 16, 64)]
    print("\n## One 2:4 linear, y = x @ W^T (no bias)\n")
    print("| M | N | K | dense F.linear | dense compile | to_sparse_semi_structured (eager) | ours: kernel | ours: compiled | kernel vs dense | compiled vs dense compile | chosen by dispatcher |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (m, n, k) in shapes:
        w, x = _case24(m, n, k)
        values, meta = _as_compiled(compress_24(w), x)
        t = _layer_times(w, x)
        with torch.no_grad():
            cslt = _try(lambda: _bench(_cslt_fn(w, x)))
            kern = _bench(_graphed(lambda: sp24_linear(x, values, meta)))
        rows.append(dict(section="linear24", M=m, N=n, K=k, cslt_eager=cslt, kernel=kern, **t))
        print(f"| {m} | {n} | {k} | {_fmt(t['dense'])} | {_fmt(t['dense_compile'])} | {_fmt(cslt)} | {_fmt(kern)} | "
              f"{_fmt(t['compiled'])} | {_ratio(t['dense'], kern)} | {_ratio(t['dense_compile'], t['compiled'])} | "
              f"{t['chosen']} |", flush=True)


def _cslt_fn(w, x):
    ws = to_sparse_semi_structured(w)
    return lambda: F.linear(x, ws)


def bench_block(rows: list, cases=None):
    dev, dt = "cuda", torch.bfloat16
    cases = cases or [(m, 14336, 4096, 64, s) for s in (0.9, 0.8) for m in (1, 16, 8192)]
    print("\n## One block-sparse linear (64x64 blocks), y = x @ W^T\n")
    print("| M | N | K | zero blocks | dense F.linear | dense compile | torch bsr_dense_mm | ours: kernel | ours: compiled | kernel vs dense | compiled vs dense compile | chosen by dispatcher |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (m, n, k, b, sparsity) in cases:
        torch.manual_seed(0)
        w = prune_blocks_(torch.randn(n, k, device=dev, dtype=dt), b, sparsity)
        x = torch.randn(m, k, device=dev, dtype=dt)
        bs = compress_block(w, b)
        t = _layer_times(w, x)
        with torch.no_grad():
            bsr = _try(lambda: _bench(_bsr_fn(w, x, b)))
            kern = _bench(_graphed(lambda: block_linear(x, *bs, None, n, k)))
        rows.append(dict(section="block", M=m, N=n, K=k, block=b, sparsity=sparsity, bsr_eager=bsr, kernel=kern, **t))
        print(f"| {m} | {n} | {k} | {sparsity:.0%} | {_fmt(t['dense'])} | {_fmt(t['dense_compile'])} | {_fmt(bsr)} | "
              f"{_fmt(kern)} | {_fmt(t['compiled'])} | {_ratio(t['dense'], kern)} | "
              f"{_ratio(t['dense_compile'], t['compiled'])} | {t['chosen']} |", flush=True)


def _host_us(fn: Callable, n: int = 20) -> float:
    """Host time per call of fn, back to back (the GPU queue absorbs the kernels)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def _cslt_timed(layer, w: torch.Tensor, wc: torch.Tensor) -> Optional[tuple[float, int]]:
    """(us, algorithm id) of cuSPARSELt as the dispatcher's timer measures `layer` (its runner: for
    fp8 the form's library call and epilogue pass, the row guard's reduction; the fastest algorithm;
    CUDA-graph replays, what it does under mode="reduce-overhead"), its compressed weight given;
    None where it could not be timed."""
    spec = next(s for s in kernels("2:4") if s.name == "cusparselt")
    timer = LayerTimer(layer, w, False, SparseOptions(mode="reduce-overhead"), {"cusparselt": spec},
                       lambda s: {"wc": wc})
    best = timer("cusparselt", layer.m)
    return (best[0], best[1].get("alg_id", 0)) if best else None


def _cslt_best_alg(layer, w: torch.Tensor, wc: torch.Tensor) -> int:
    """The cuSPARSELt algorithm id the dispatcher's timer finds fastest for `layer` (_cslt_timed)."""
    best = _cslt_timed(layer, w, wc)
    return best[1] if best else 0


def bench_cusparselt(rows: list, shapes=None):
    """Compute-bound 2:4 linears: cuBLAS, PyTorch's cuSPARSELt paths, and ours (plan made once,
    algorithm searched at compile time), each inside a CUDA graph, plus the host cost per call."""
    dt = torch.bfloat16
    shapes = shapes or [(8192, 14336, 4096), (8192, 4096, 14336), (4096, 28672, 4096), (12608, 3072, 768),
                        (12608, 768, 3072), (6304, 5120, 1280), (6304, 1280, 5120)]
    print("\n## One 2:4 linear through cuSPARSELt, y = x @ W^T (no bias), CUDA-graph replays\n")
    print("| M | N | K | dense F.linear | dense compile | torch._cslt_sparse_mm (alg 0) | ours: kernel (best alg) | "
          "ours: compiled | kernel vs dense | compiled vs dense compile | chosen by dispatcher | "
          "host us/call: torch cslt / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (m, n, k) in shapes:
        w, x = _case24(m, n, k)
        wc = cusparselt.compress(w)
        alg = _cslt_best_alg(Layer("2:4", m, n, k, dt, "cuda", device_name=torch.cuda.get_device_name()), w, wc)
        t = _layer_times(w, x)
        with torch.no_grad():
            torch_cslt = _bench(_graphed(lambda: torch._cslt_sparse_mm(wc, x.t(), transpose_result=True)))
            kern = _bench(_graphed(lambda: cusparselt.linear(x, wc, None, n, k, alg)))
            h_torch = _host_us(lambda: torch._cslt_sparse_mm(wc, x.t(), transpose_result=True, alg_id=alg))
            h_ours = _host_us(lambda: cusparselt.linear(x, wc, None, n, k, alg))
        rows.append(dict(section="cusparselt", M=m, N=n, K=k, torch_cslt=torch_cslt, kernel=kern, alg_id=alg,
                         host_torch=h_torch, host_ours=h_ours, **t))
        print(f"| {m} | {n} | {k} | {_fmt(t['dense'])} | {_fmt(t['dense_compile'])} | {_fmt(torch_cslt)} | "
              f"{_fmt(kern)} (alg {alg}) | {_fmt(t['compiled'])} | {_ratio(t['dense'], kern)} | "
              f"{_ratio(t['dense_compile'], t['compiled'])} | {t['chosen']} | {h_torch:.0f} / {h_ours:.0f} |", flush=True)


def _bsr_fn(w, x, b):
    # PyTorch's Triton BSR kernels: loaded for this baseline only
    from torch.sparse._triton_ops import bsr_dense_mm

    wbsr = w.to_sparse_bsr((b, b))
    xt = x.t().contiguous()
    return lambda: bsr_dense_mm(wbsr, xt)


class LlamaMLP(nn.Module):
    def __init__(self, d=4096, h=14336):
        super().__init__()
        self.w1 = nn.Linear(d, h, bias=False)
        self.w3 = nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.w2(F.silu(self.w1(x)) * self.w3(x))


# backend options for every sparse compile of the e2e section (--options k=v,...)
E2E_OPTIONS: dict = {}
# which compiles the e2e section makes (--e2e-modes): "default" (timed as graph replays and as plain
# calls) and "ro" (mode="reduce-overhead")
E2E_MODES: set = {"default", "ro"}


def _layer_timings(records, kernel: bool = False) -> list[str]:
    """What the dispatcher timed for each layer of a compile (its LayerDecisions): "name: times", or
    with kernel "name -> kernel: times"."""
    return [f"{d.name}{f' -> {d.kernel}' if kernel else ''}: {d.times_text()}" for d in records
            if isinstance(d, LayerDecision) and d.candidates]


def _e2e_row(rows, name, model, x, options=None):
    """Three ways to run the same model, dense vs sparse: CUDA-graph replays of the default-mode
    compile, plain calls of it (default mode, host overhead included), and plain calls of both
    compiled with mode="reduce-overhead" (Inductor's CUDA graphs; the dispatcher then times the
    candidates without their host cost)."""
    options = {**E2E_OPTIONS, **(options or {})} or None
    if E2E_OPTIONS:
        name += " (" + ", ".join(f"{k}={v}" for k, v in E2E_OPTIONS.items()) + ")"
    t_dense = t_ours = t_dense_eager = t_ours_eager = t_dense_ro = t_ours_ro = None
    sink, sink_ro, ref, out, out_ro = [], [], None, None, None
    with torch.no_grad():
        if "default" in E2E_MODES:
            torch._dynamo.reset()
            dense_c = torch.compile(model)
            t_dense = _bench(_graphed(lambda: dense_c(x)), rep=200)
            ref = dense_c(x).float()
            torch._dynamo.reset()
            with collect() as sink:
                ours = torch.compile(model, backend="sparse", options=options)
                out = ours(x).float()
            t_ours = _bench(_graphed(lambda: ours(x)), rep=200)
            # default mode, as a user calls the compiled module (host overhead included)
            t_dense_eager, t_ours_eager = _bench(lambda: dense_c(x), rep=200), _bench(lambda: ours(x), rep=200)
            dense_c = ours = None  # free the graphs before the next compiles
        if "ro" in E2E_MODES:
            torch._dynamo.reset()
            dense_ro = torch.compile(model, mode="reduce-overhead")
            t_dense_ro = _bench(lambda: dense_ro(x), rep=200)
            if ref is None:
                ref = dense_ro(x).float()
            dense_ro = None
            torch._dynamo.reset()
            with collect() as sink_ro:
                ours_ro = torch.compile(model, backend="sparse", options={**(options or {}), "mode": "reduce-overhead"})
                ours_ro(x)
            t_ours_ro = _bench(lambda: ours_ro(x), rep=200)
            out_ro = ours_ro(x).float()
            ours_ro = None
        torch._dynamo.reset()

    def used(records):
        ks = [d.kernel for d in records if isinstance(d, LayerDecision)]
        return ", ".join(f"{k} {ks.count(k)}" for k in sorted(set(ks)))

    kernels, kernels_ro = used(sink), used(sink_ro)
    # each compile's output against the dense compile's (default mode's where both ran)
    relerrs = [None if y is None else float((y - ref).norm() / ref.norm()) for y in (out, out_ro)]
    relerr = max(e for e in relerrs if e is not None)
    rows.append(dict(section="e2e", model=name, dense_compile=t_dense, sparse=t_ours, dense_compile_nograph=t_dense_eager,
                     sparse_nograph=t_ours_eager, dense_ro=t_dense_ro, sparse_ro=t_ours_ro, kernels=kernels,
                     kernels_ro=kernels_ro, relerr=relerr, relerr_default=relerrs[0], relerr_ro=relerrs[1],
                     timed="; ".join(_layer_timings(sink, kernel=True)),  # (JSON only: too long for the table)
                     timed_ro="; ".join(_layer_timings(sink_ro, kernel=True))))
    errs = " / ".join("-" if e is None else f"{e:.1e}" for e in relerrs)
    print(f"| {name} | {_fmt(t_dense)} | {_fmt(t_ours)} | {_ratio(t_dense, t_ours)} | {_fmt(t_dense_eager)} | "
          f"{_fmt(t_ours_eager)} | {_ratio(t_dense_eager, t_ours_eager)} | {kernels} | {_fmt(t_dense_ro)} | "
          f"{_fmt(t_ours_ro)} | {_ratio(t_dense_ro, t_ours_ro)} | {kernels_ro} | {errs} |", flush=True)


def bench_e2e(rows: list, which=("llama", "vit", "llama_prefill", "vit24", "hf_llama", "hf_llama_cutlass")):
    """Whole models; `which` also takes "vit24_cutlass" and "llama_prefill_cutlass" (the 2:4 ViTs, the
    8 Llama MLP blocks at prefill, with the CUTLASS family a candidate: not in the default list, their
    libraries take a parallel build)."""
    dev, dt = "cuda", torch.bfloat16
    print("\n## Whole models: dense torch.compile vs backend=\"sparse\" (dispatcher's choice)\n")
    print("Default-mode compiles timed as CUDA-graph replays and as plain calls (host overhead included); "
          "then both compiled with mode=\"reduce-overhead\" (RO), plain calls.\n")
    print("| model | dense compile us (graph) | sparse us (graph) | speedup (graph) | dense compile us (default) | "
          "sparse us (default) | speedup (default) | kernels (default) | dense RO us | sparse RO us | speedup (RO) | "
          "kernels (RO) | rel. err vs dense (default / RO) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    if "llama" in which or "llama_prefill" in which:  # ("llama_prefill_cutlass": below)
        torch.manual_seed(0)
        model = nn.Sequential(*[LlamaMLP() for _ in range(8)]).to(dev, dt).eval()
        prune(model, "2:4")
        for b in ((1, 16) if "llama" in which else ()):
            _e2e_row(rows, f"8 Llama MLP blocks 2:4, decode batch {b}", model, torch.randn(b, 4096, device=dev, dtype=dt))
        if "llama_prefill" in which:
            _e2e_row(rows, "8 Llama MLP blocks 2:4, prefill 4096 tokens", model,
                     torch.randn(4096, 4096, device=dev, dtype=dt))
        del model
    if "llama_prefill_cutlass" in which and not cutlass_rt.available("cuda"):
        torch.manual_seed(0)
        model = nn.Sequential(*[LlamaMLP() for _ in range(8)]).to(dev, dt).eval()
        prune(model, "2:4")
        _e2e_row(rows, "8 Llama MLP blocks 2:4, prefill 4096 tokens, CUTLASS a candidate", model,
                 torch.randn(4096, 4096, device=dev, dtype=dt), options={"experimental": ("cutlass",)})
        del model
    if "vit" in which:
        try:
            # optional: timm, for the ViT cases only
            import timm
        except ImportError:
            print("| vit_base_patch16_224 | (timm not installed) | | | | |")
            return
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False).to(dev, dt).eval()
        prune(model, "block", block=64, sparsity=0.9, filter_fn=lambda m, n: ".mlp." in f".{n}.")
        _e2e_row(rows, "ViT-B/16 batch 64, MLP weights 90% zero 64x64 blocks", model,
                 torch.randn(64, 3, 224, 224, device=dev, dtype=dt))
        del model
    if "vit24" in which or "vit24_cutlass" in which:
        # optional: timm, for the ViT cases only
        import timm

        runs = ([("", None)] if "vit24" in which else []) + (
            [(", CUTLASS a candidate", {"experimental": ("cutlass",)})]
            if "vit24_cutlass" in which and not cutlass_rt.available("cuda") else [])
        for name, batch in (("vit_base_patch16_224", 64), ("vit_huge_patch14_224", 32)):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).to(dev, dt).eval()
            prune(model, "2:4")
            for suffix, options in runs:
                _e2e_row(rows, f"{name} batch {batch}, every linear 2:4{suffix}", model,
                         torch.randn(batch, 3, 224, 224, device=dev, dtype=dt), options=options)
            del model
            torch.cuda.empty_cache()
    if "hf_llama" in which or "hf_llama_cutlass" in which:
        _hf_llama_rows(rows, default="hf_llama" in which, cutlass="hf_llama_cutlass" in which)
    torch.cuda.empty_cache()


class _Logits(nn.Module):
    """A causal LM's logits for input ids, no KV cache (one decode step of a batch, as its own call)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


HF_LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000)


def _hf_llama_rows(rows: list, batch: int = 32, default: bool = True, cutlass: bool = True) -> None:
    """transformers' LlamaForCausalLM (HF_LLAMA, random weights), every projection of its layers 2:4
    (lm_head dense), batch 32, one token, no KV cache: with the dispatcher's default families
    (default) and with the CUTLASS family as a candidate too (cutlass: options
    experimental=("cutlass",))."""
    try:
        # optional: transformers, for this case only
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("| LlamaForCausalLM | (transformers not installed) | | | | |")
        return
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**HF_LLAMA)).to("cuda", torch.bfloat16).eval()
    prune(lm, "2:4", filter_fn=lambda m, n: n.endswith("_proj"))
    model = _Logits(lm)
    ids = torch.randint(0, HF_LLAMA["vocab_size"], (batch, 1), device="cuda")
    name = f"HF LlamaForCausalLM 2048/5632 x8, batch {batch}, one token, every projection 2:4"
    if default:
        _e2e_row(rows, name, model, ids)
    if cutlass and not cutlass_rt.available("cuda"):
        _e2e_row(rows, name + ", CUTLASS a candidate", model, ids, options={"experimental": ("cutlass",)})
    del model, lm
    torch.cuda.empty_cache()


class W8Linear(nn.Module):
    """Weight-only int8 linear (per-output-channel scale), as a user writes it."""

    def __init__(self, wq: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("wq", wq)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, self.wq.to(x.dtype)) * self.scale


def _quantize_linears_(model: nn.Module) -> None:
    """Replace every nn.Linear (no bias) by a W8Linear of its weight, symmetric per channel."""
    for name, mod in list(model.named_children()):
        if isinstance(mod, nn.Linear) and mod.bias is None:
            wq, scale = _int8_per_channel(mod.weight.detach())
            setattr(model, name, W8Linear(wq, scale.to(mod.weight.dtype)))
        else:
            _quantize_linears_(mod)


class W8A8Linear(nn.Module):
    """Dynamic per-token int8 activations x int8 weight (per-channel scale), via torch._int_mm
    (x of any rank; an optional bias added after the scales)."""

    def __init__(self, wq: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("wq", wq)
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("bias", bias)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        s = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-5) / 127
        xq = (x2.float() / s).round().clamp(-128, 127).to(torch.int8)
        y = (torch._int_mm(xq, self.wq.t()).float() * s * self.w_scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _w8a8_linears_(model: nn.Module, keep: Callable[[str], bool], prefix: str = "") -> None:
    """Replace the nn.Linear layers whose qualified name passes `keep` by W8A8Linear (in place)."""
    for name, mod in list(model.named_children()):
        qual = f"{prefix}.{name}" if prefix else name
        if isinstance(mod, nn.Linear) and keep(qual):
            wq, scale = _int8_per_channel(mod.weight.detach())
            b = mod.bias.detach() if mod.bias is not None else None
            setattr(model, name, W8A8Linear(wq, scale, b))
        else:
            _w8a8_linears_(mod, keep, qual)


def bench_compose(rows: list, name: str = "vit_huge_patch14_224", batch: int = 32, core: bool = False):
    """Sparsity and int8 composed: one ViT with its MLP weights 2:4, as 2:4 bf16
    (backend="sparse"), int8 dynamic activations on dense Inductor (the same 2:4 int8 weights, not
    exploited), and int8 + 2:4 (backend="sparse"), against bf16 dense; all mode="reduce-overhead",
    plain calls. core=True: only the three the target compares (no bf16 dense, no int32 product)."""
    # optional: timm, for the ViT cases only
    import timm

    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(dev, dt).eval()
    mlp = lambda q: ".mlp." in f".{q}."  # noqa: E731
    prune(model, "2:4", filter_fn=lambda m, n: mlp(n))
    x = torch.randn(batch, 3, 224, 224, device=dev, dtype=dt)
    times = {}

    def run(label, mod, backend, **options):
        if core and label in ("bf16 dense", "int8 + 2:4, int32 product"):
            times[label] = None
            return
        with torch.no_grad():
            torch._dynamo.reset()
            kw = ({"backend": "sparse", "options": {"mode": "reduce-overhead", **options}} if backend
                  else {"mode": "reduce-overhead"})
            c = torch.compile(mod, **kw)
            c(x)
            times[label] = _bench(lambda: c(x), rep=100)
        print(f"    {label}: {times[label]:.1f} us", file=sys.stderr, flush=True)

    run("bf16 dense", model, False)
    run("2:4 bf16", model, True)
    _w8a8_linears_(model, mlp)
    run("int8 dense", model, False)
    run("int8 + 2:4, int32 product", model, True, int8_product="int32")
    run("int8 + 2:4", model, True)
    print(f"\n## Composition: {name} batch {batch}, MLP weights 2:4, mode=\"reduce-overhead\" (us)\n")
    print("| bf16 dense | 2:4 bf16 | int8 dense (W8A8) | int8 + 2:4, int32 product | int8 + 2:4 (bf16 product, default) | "
          "int8+2:4 vs 2:4 | int8+2:4 vs int8 | int8+2:4 vs bf16 dense |")
    print("|---|---|---|---|---|---|---|---|")
    t = times
    print(f"| {_fmt(t['bf16 dense'])} | {_fmt(t['2:4 bf16'])} | {_fmt(t['int8 dense'])} | "
          f"{_fmt(t['int8 + 2:4, int32 product'])} | {_fmt(t['int8 + 2:4'])} | "
          f"{_ratio(t['2:4 bf16'], t['int8 + 2:4'])} | {_ratio(t['int8 dense'], t['int8 + 2:4'])} | "
          f"{_ratio(t['bf16 dense'], t['int8 + 2:4'])} |", flush=True)
    rows.append(dict(section="compose", model=name, batch=batch, **{k.replace(' ', '_'): v for k, v in t.items()}))


def bench_int8_act(rows: list, shapes=None):
    """int8 dynamic activations x int8 2:4 weights through cuSPARSELt (int32 out, scales fused by
    Inductor after it) vs bf16 dense F.linear and vs the same int8 model compiled densely
    (torch._int_mm + scales). Compiled modules timed as CUDA-graph replays."""

    shapes = shapes or [(8192, 14336, 4096), (8192, 4096, 14336)]
    print("\n## int8 dynamic activations x int8 2:4 weights\n")
    print("| M | N | K | bf16 dense F.linear | int8 dense compile (_int_mm + scales) | ours compiled, int32 product | "
          "ours compiled (bf16 product, default) | vs bf16 dense | vs int8 dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (m, n, k) in shapes:
        w, x = _case24(m, n, k)
        model = W8A8Linear(*_int8_per_channel(w)).eval()
        with torch.no_grad():
            bf16 = _bench(_graphed(lambda: F.linear(x, w)))
            torch._dynamo.reset()
            dense_c = torch.compile(model)
            t_int8 = _bench(_graphed(lambda: dense_c(x)))
            t = {}
            for product in ("int32", "bf16"):
                torch._dynamo.reset()
                ours = torch.compile(model, backend="sparse", options={"int8_product": product})
                ours(x)
                t[product] = _bench(_graphed(lambda: ours(x)))
        t_ours = t["bf16"]
        rows.append(dict(section="int8_act", M=m, N=n, K=k, bf16_dense=bf16, int8_dense_compile=t_int8,
                         sparse_int32_product=t["int32"], sparse=t_ours))
        print(f"| {m} | {n} | {k} | {_fmt(bf16)} | {_fmt(t_int8)} | {_fmt(t['int32'])} | {_fmt(t_ours)} | "
              f"{_ratio(bf16, t_ours)} | {_ratio(t_int8, t_ours)} |", flush=True)


def bench_quant(rows: list, shapes=None, models=True):
    """Weight-only int8 2:4: the Triton kernels read int8 values; vs bf16 dense."""
    dev, dt = "cuda", torch.bfloat16
    shapes = shapes or [(1, 14336, 4096), (1, 4096, 4096), (1, 4096, 14336)]
    print("\n## Weight-only int8 2:4 linears vs bf16 dense\n")
    print("| M | N | K | bf16 dense F.linear | bf16 dense compile | ours: int8 kernel | ours: compiled (scale fused) | kernel vs dense | compiled vs dense compile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (m, n, k) in shapes:
        w, x = _case24(m, n, k)
        mod = nn.Sequential(nn.Linear(k, n, bias=False, device=dev, dtype=dt))
        with torch.no_grad():
            mod[0].weight.copy_(w)
        _quantize_linears_(mod)
        values, meta = _as_compiled(compress_24(mod[0].wq), x)
        with torch.no_grad():
            dense = _bench(_graphed(lambda: F.linear(x, w)))
            torch._dynamo.reset()
            dc = torch.compile(nn.Linear(k, n, bias=False, device=dev, dtype=dt).eval())
            dense_c = _bench(_graphed(lambda: dc(x)))
            kern = _bench(_graphed(lambda: sp24_linear(x, values, meta)))
            torch._dynamo.reset()
            ours = torch.compile(mod.eval(), backend="sparse", options={"force": True, "kernel": "triton"})
            ours(x)
            comp = _bench(_graphed(lambda: ours(x)))
        rows.append(dict(section="quant", M=m, N=n, K=k, dense=dense, dense_compile=dense_c, kernel=kern, compiled=comp))
        print(f"| {m} | {n} | {k} | {_fmt(dense)} | {_fmt(dense_c)} | {_fmt(kern)} | {_fmt(comp)} | "
              f"{_ratio(dense, kern)} | {_ratio(dense_c, comp)} |", flush=True)
    if models:
        torch.manual_seed(0)
        model = nn.Sequential(*[LlamaMLP() for _ in range(8)]).to(dev, dt).eval()
        prune(model, "2:4")
        x = torch.randn(1, 4096, device=dev, dtype=dt)
        with torch.no_grad():
            torch._dynamo.reset()
            dense_c = torch.compile(model)
            t_dense = _bench(_graphed(lambda: dense_c(x)), rep=200)
            _quantize_linears_(model)
            torch._dynamo.reset()
            ours = torch.compile(model, backend="sparse")
            ours(x)
            t_ours = _bench(_graphed(lambda: ours(x)), rep=200)
        rows.append(dict(section="quant", model="llama8 int8 woq 2:4 decode b1", dense_compile=t_dense, sparse=t_ours))
        print(f"\n8 Llama MLP blocks, int8 weight-only 2:4, decode batch 1: bf16 dense compile {t_dense:.1f} us, "
              f"ours {t_ours:.1f} us, {t_dense / t_ours:.2f}x", flush=True)


def _fp8_chosen(model: nn.Module, x: torch.Tensor, mode: Optional[str]) -> str:
    """What the dispatcher picks for the model's one fp8 layer (measured), with its timed ratio."""
    torch._dynamo.reset()
    with torch.no_grad(), collect() as sink:
        torch.compile(model, backend="sparse", mode=mode)(x)
    d = next((d for d in sink if isinstance(d, LayerDecision)), None)
    if d is None:
        return "?"
    sparse = d.candidates.get("cusparselt")
    return f"{d.kernel} ({_ratio(d.candidates.get('dense'), sparse)})" if sparse else f"{d.kernel} ({d.reason[-80:]})"


def bench_fp8(rows: list, shapes=None):
    """fp8 e4m3 x e4m3 2:4: dense fp8 torch._scaled_mm (per-tensor scales, bf16 out), bf16 F.linear
    and torch._cslt_sparse_mm, each a CUDA-graph replay of the kernel alone; then cuSPARSELt in the
    two forms as the dispatcher times them (CUDA graphs, best algorithm of each; the row guard's
    reduction, the library call, the epilogue's pass over y): "row" (fp32 product, options
    fp8_product="fp32") and "lib16" (bf16 product, the default for bf16 outputs). Then what the
    dispatcher picks for Fp8Linear (quantization in the graph, default options: form "lib16") in the
    default mode and under mode="reduce-overhead", with its measured ratio."""
    out = torch.bfloat16
    shapes = shapes or [(8192, 14336, 4096), (8192, 4096, 14336), (16, 14336, 4096)]
    print("\n## fp8 e4m3 2:4 linears through cuSPARSELt vs dense fp8 torch._scaled_mm (per-tensor scales, bf16 out)\n")
    print("| M | N | K | bf16 dense F.linear | fp8 dense _scaled_mm | torch._cslt_sparse_mm fp8 (alg 0) | "
          "form row as timed (fp32 product) | form lib16 as timed (bf16 product) | lib16 vs fp8 dense | "
          "lib16 vs bf16 dense | dispatcher picks (default mode) | dispatcher picks (reduce-overhead) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (m, n, k) in shapes:
        w, x = _case24(m, n, k)
        wq, ws = fp8_per_tensor(w)
        xq, xs = fp8_per_tensor(x)
        wc = cusparselt.compress(wq)
        layer = Layer("2:4", m, n, k, torch.float8_e4m3fn, "cuda", device_name=torch.cuda.get_device_name())
        forms = {f: _try(lambda f=f: _cslt_timed(dataclasses.replace(layer, scaled=Scaled(f, out)), wq, wc))
                 for f in ("row", "lib16")}
        ft = {f: (v[0] if v else None) for f, v in forms.items()}
        fcell = {f: f"{_fmt(v[0])} (alg {v[1]})" if v else "-" for f, v in forms.items()}
        wqt = wq.t()
        with torch.no_grad():
            bf16 = _bench(_graphed(lambda: F.linear(x, w)))
            dense = _try(lambda: _bench(_graphed(lambda: torch._scaled_mm(xq, wqt, xs, ws, out_dtype=out))))
            tcslt = _try(lambda: _bench(_graphed(lambda: torch._cslt_sparse_mm(wc, xq.t(), None, None, out,
                                                                                transpose_result=True))))
        model = Fp8Linear(wq, ws).eval()
        picks = [_try(lambda mode=mode: _fp8_chosen(model, x, mode)) for mode in (None, "reduce-overhead")]
        rows.append(dict(section="fp8", M=m, N=n, K=k, bf16_dense=bf16, fp8_dense=dense, torch_cslt=tcslt,
                         form_row=ft["row"], form_lib16=ft["lib16"],
                         alg_row=forms["row"] and forms["row"][1], alg_lib16=forms["lib16"] and forms["lib16"][1],
                         chosen=picks[0], chosen_graphs=picks[1]))
        print(f"| {m} | {n} | {k} | {_fmt(bf16)} | {_fmt(dense)} | {_fmt(tcslt)} | {fcell['row']} | {fcell['lib16']} | "
              f"{_ratio(dense, ft['lib16'])} | {_ratio(bf16, ft['lib16'])} | {picks[0]} | {picks[1]} |", flush=True)


# The project's targets, as ratios of this bench's rows (stated for the H100; the summary says what the
# run's GPU measured against them). (group, case, section, match, ratio, at least):
# match: the row's keys and values (an e2e model by its exact name: a run with --options does not count);
# ratio: (numerator key, denominator key), or "e2e" (the best of the modes measured: graph replays,
# default-mode calls, reduce-overhead).
TARGETS = [
    ("block", "block 90% 64x64, 14336x4096, M=1 vs F.linear", "block", dict(M=1, N=14336, K=4096, sparsity=0.9), ("dense", "compiled"), 6.0),
    ("block", "block 90%, M=16", "block", dict(M=16, N=14336, K=4096, sparsity=0.9), ("dense", "compiled"), 6.0),
    ("block", "block 90%, M=8192", "block", dict(M=8192, N=14336, K=4096, sparsity=0.9), ("dense", "compiled"), 3.5),
    ("block", "block 80%, M=16", "block", dict(M=16, N=14336, K=4096, sparsity=0.8), ("dense", "compiled"), 3.0),
    ("block", "block 80%, M=8192", "block", dict(M=8192, N=14336, K=4096, sparsity=0.8), ("dense", "compiled"), 2.5),
    ("block", "ViT-B/16 b64, MLPs 90% blocks, vs dense compile", "e2e",
     dict(model="ViT-B/16 batch 64, MLP weights 90% zero 64x64 blocks"), "e2e", 1.5),
    ("2:4", "2:4 cuSPARSELt 8192x14336x4096 vs F.linear", "cusparselt", dict(M=8192, N=14336, K=4096), ("dense", "compiled"), 1.5),
    ("2:4", "2:4 cuSPARSELt 8192x4096x14336", "cusparselt", dict(M=8192, N=4096, K=14336), ("dense", "compiled"), 1.3),
    ("2:4", "8 Llama MLP blocks 2:4, prefill 4096", "e2e", dict(model="8 Llama MLP blocks 2:4, prefill 4096 tokens"), "e2e", 1.35),
    ("2:4", "ViT-B/16 b64, every linear 2:4", "e2e", dict(model="vit_base_patch16_224 batch 64, every linear 2:4"), "e2e", 1.1),
    ("2:4", "ViT-H/14 b32, every linear 2:4", "e2e", dict(model="vit_huge_patch14_224 batch 32, every linear 2:4"), "e2e", 1.1),
    ("CUTLASS", "ViT-B/16 b64, every linear 2:4, CUTLASS a candidate (RO)", "e2e",
     dict(model="vit_base_patch16_224 batch 64, every linear 2:4, CUTLASS a candidate"), ("dense_ro", "sparse_ro"), 1.15),
    ("CUTLASS", "same, default mode (plain calls)", "e2e",
     dict(model="vit_base_patch16_224 batch 64, every linear 2:4, CUTLASS a candidate"),
     ("dense_compile_nograph", "sparse_nograph"), 1.1),
    ("CUTLASS", "ViT-H/14 b32, every linear 2:4, CUTLASS a candidate (RO)", "e2e",
     dict(model="vit_huge_patch14_224 batch 32, every linear 2:4, CUTLASS a candidate"), ("dense_ro", "sparse_ro"), 1.3),
    ("CUTLASS", "same, default mode (plain calls)", "e2e",
     dict(model="vit_huge_patch14_224 batch 32, every linear 2:4, CUTLASS a candidate"),
     ("dense_compile_nograph", "sparse_nograph"), 1.2),
    ("CUTLASS", "8 Llama MLP blocks, prefill 4096, CUTLASS a candidate, default mode (plain calls)", "e2e",
     dict(model="8 Llama MLP blocks 2:4, prefill 4096 tokens, CUTLASS a candidate"),
     ("dense_compile_nograph", "sparse_nograph"), 1.35),
    ("CUTLASS", "HF LlamaForCausalLM b32 one token, CUTLASS a candidate (RO)", "e2e",
     dict(model="HF LlamaForCausalLM 2048/5632 x8, batch 32, one token, every projection 2:4, CUTLASS a candidate"),
     ("dense_ro", "sparse_ro"), 1.3),
    ("8-bit", "weight-only int8 2:4, 14336x4096, M=1 vs bf16 F.linear", "quant", dict(M=1, N=14336, K=4096), ("dense", "compiled"), 2.5),
    ("8-bit", "8 Llama MLP blocks, int8 weight-only 2:4, decode b1", "quant", dict(model="llama8 int8 woq 2:4 decode b1"),
     ("dense_compile", "sparse"), 2.2),
    ("8-bit", "int8 activations 2:4, 8192x14336x4096 vs bf16 F.linear", "int8_act", dict(M=8192, N=14336, K=4096),
     ("bf16_dense", "sparse"), 1.6),
    ("8-bit", "same, vs int8 dense compile", "int8_act", dict(M=8192, N=14336, K=4096), ("int8_dense_compile", "sparse"), 1.5),
    ("8-bit", "ViT-H/14 int8 + 2:4 MLPs vs 2:4 bf16", "compose", dict(model="vit_huge_patch14_224"), ("2:4_bf16", "int8_+_2:4"), 1.0),
    ("8-bit", "ViT-H/14 int8 + 2:4 MLPs vs int8 dense", "compose", dict(model="vit_huge_patch14_224"), ("int8_dense", "int8_+_2:4"), 1.0),
]

# The CUTLASS issue's targets, reduce-overhead compiles with the family a candidate: single linears
# by GPU time (a single layer's plain-call time is mostly host time at small M), whole models and
# the 8-bit cases as named.
_CUTLASS_SINGLE_TARGETS = {16: 1.5, 64: 1.4, 256: 1.3, 2048: 1.4, 8192: 1.5}
TARGETS += [("CUTLASS", f"{n}x{k} M={m}, chosen vs dense compile (GPU time)", "cutlass",
             dict(case="linear", N=n, K=k, M=m), ("dense_gpu", "choice_gpu"), least)
            for n, k in ((14336, 4096), (4096, 14336), (4096, 4096)) for m, least in _CUTLASS_SINGLE_TARGETS.items()]
TARGETS += [
    ("CUTLASS", "11008x4096 M=32, chosen vs dense compile (GPU time)", "cutlass", dict(case="linear", N=11008, K=4096, M=32),
     ("dense_gpu", "choice_gpu"), 1.45),
    ("CUTLASS", "8 Llama MLP blocks, decode 16", "cutlass", dict(case="llama_mlp", M=16), ("dense_ro", "choice_ro"), 1.4),
    ("CUTLASS", "8 Llama MLP blocks, decode 64", "cutlass", dict(case="llama_mlp", M=64), ("dense_ro", "choice_ro"), 1.4),
    ("CUTLASS", "8 Llama MLP blocks, prefill 4096 (RO)", "cutlass", dict(case="llama_mlp", M=4096),
     ("dense_ro", "choice_ro"), 1.45),
    ("CUTLASS", "fp8 row-wise 8192x14336x4096 vs dense fp8 _scaled_mm (GPU time)", "cutlass", dict(case="fp8_rowwise"),
     ("dense_gpu", "choice_gpu"), 1.35),
    ("CUTLASS", "same, use_fast_accum=True vs dense fp8 _scaled_mm with it (GPU time)", "cutlass",
     dict(case="fp8_rowwise_fast"), ("dense_gpu", "choice_gpu"), 1.35),
    ("CUTLASS", "int8 activations 8192x14336x4096 vs bf16 F.linear (GPU time)", "cutlass", dict(case="int8_act"),
     ("bf16_gpu", "choice_gpu"), 2.0),
]

_E2E_MODES = (("graph", "dense_compile", "sparse"), ("default", "dense_compile_nograph", "sparse_nograph"),
              ("RO", "dense_ro", "sparse_ro"))


def _host_per_call_us(fn: Callable, n: int = 20000) -> float:
    """Median over 5 rounds of the host time per call of fn, us."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(rounds)[2]


def bench_guard(rows: list, blocks: int = 8, batch: int = 1):
    """The weight guard's cost (backend._FrozenCall, options on_weight_change): 8 Llama MLP blocks
    (4096 / 14336, every weight 2:4) at decode batch 1. The guard itself: host time per call of the
    check over the model's frozen tensors (version, identity, data pointer), against the same call
    with nothing watched; the call: do_bench medians of the compiled model in the default and
    reduce-overhead modes, on_weight_change="recompile" (checked) and "ignore" (no check)."""
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(*[LlamaMLP() for _ in range(blocks)]).to(dev, dt).eval()
    prune(model, "2:4")
    x = torch.randn(batch, 4096, device=dev, dtype=dt)
    params = list(model.parameters())
    args = [*params, x]
    frozen = dict(enumerate(params))
    names = [f"p{i}" for i in range(len(args))]
    checked = _FrozenCall(lambda *a: None, len(args), frozen, frozen, names, None, "recompile", None)
    unchecked = _FrozenCall(lambda *a: None, len(args), frozen, {}, names, None, "ignore", None)
    guard_us = _host_per_call_us(lambda: checked(*args)) - _host_per_call_us(lambda: unchecked(*args))
    print(f"\n## The weight guard: {blocks} Llama MLP blocks (4096/14336, 2:4), decode batch {batch}, "
          f"{len(params)} frozen tensors\n")
    print(f"The check alone: {guard_us:.2f} us of host time per call.\n")
    print("| mode | on_weight_change=recompile (checked) | ignore (no check) | check / call |")
    print("|---|---|---|---|")
    for mode in ("default", "reduce-overhead"):
        times = {}
        for on_change in ("recompile", "ignore"):
            torch._dynamo.reset()
            with torch.no_grad():
                c = torch.compile(model, backend="sparse", options={"mode": mode, "on_weight_change": on_change})
                c(x)
                times[on_change] = _bench(lambda: c(x), rep=300)
            c = None
        torch._dynamo.reset()
        rows.append(dict(section="guard", mode=mode, blocks=blocks, batch=batch, guard_host_us=guard_us,
                         checked=times["recompile"], unchecked=times["ignore"]))
        print(f"| {mode} | {_fmt(times['recompile'])} | {_fmt(times['ignore'])} | "
              f"{guard_us / times['recompile']:.2%} |", flush=True)


# ---- the CUTLASS family: single linears and Llama MLP blocks, compiled, under CUDA graphs

# (N, K, M): the single linears of the cutlass section
CUTLASS_SINGLES = [(n, k, m) for (n, k) in ((14336, 4096), (4096, 14336), (4096, 4096))
                   for m in (16, 64, 256, 2048, 8192)] + [(11008, 4096, 32)]
CUTLASS_MLP_BATCHES = (16, 64, 4096)  # 8 Llama MLP blocks: decode batch 16 and 64, prefill 4096 tokens
CUTLASS_QUANT8 = (14336, 4096, 8192)  # N, K, M of the 8-bit cases (int8 activations, fp8 row-wise)
CUTLASS_PARTS = ("singles", "mlp", "quant8", "choice")


def cutlass_kernels(parts=CUTLASS_PARTS) -> list:
    """The CUTLASS libraries the cutlass section's compiles ask for (every config of each layer's M
    bucket with the epilogue it gets: the row check a token scale, the gate in w3's, the residual in
    w2's), for one parallel build ahead of it (`--cutlass-build-only`): a compile builds what is
    missing, one layer's candidates at a time."""
    lay = []
    if "singles" in parts:  # x a graph input: the row check a kernel of its own
        lay += [Layer("2:4", m, n, k, torch.bfloat16, "cuda", row_check="separate") for n, k, m in CUTLASS_SINGLES]
    if "mlp" in parts:
        d, h = 4096, 14336
        for m in CUTLASS_MLP_BATCHES:
            for first in (None, Fusion(gate="silu_aux", aux_dtype=torch.bfloat16)):  # w1 | w3, in either order
                second = Fusion(gate="silu_aux", aux_dtype=torch.bfloat16) if first is None else None
                lay.append(Layer("2:4", m, 2 * h, d, torch.bfloat16, "cuda", row_check="separate",
                                 epilogue=((h, first), (h, second))))
            lay.append(Layer("2:4", m, d, h, torch.bfloat16, "cuda", row_check="separate",
                             epilogue=((d, Fusion(residual=True, aux_dtype=torch.bfloat16)),)))
    out = [k for ly in lay for p in cutlass_24._all_params(ly) for k in cutlass_24._variant_kernels(ly, p)]
    if "quant8" in parts:  # x quantized in the graph: both scales vectors, bf16 out (a bias slot either way)
        for dt, name in ((torch.int8, "int8"), (torch.float8_e4m3fn, "e4m3")):
            out += [cutlass_24.kernel_of(dt, cutlass_24.config_tag(c), out_dtype=torch.bfloat16, bias=torch.bfloat16,
                                         weight_scale="vector", token_scale="vector")[0]
                    for fast in ((False, True) if name == "e4m3" else (False,))
                    for c in cutlass_24.configs_for(CUTLASS_QUANT8[2], name, fast_accum=fast)]
    return list(dict.fromkeys(out))


def build_cutlass(parts=CUTLASS_PARTS, kernels=None) -> dict:
    """Build the section's libraries (or `kernels`) in one parallel build (no GPU needed: nvcc and
    the headers); kernel -> library path or the exception its build raised."""
    why = cutlass_rt.available()
    if why:
        sys.exit(f"CUTLASS toolchain not available: {why}")
    ks = cutlass_kernels(parts) if kernels is None else kernels
    start = time.perf_counter()
    res = cutlass_24.build(ks)
    bad = [k for k, r in res.items() if isinstance(r, Exception)]
    print(f"CUTLASS: {len(ks) - len(bad)} of {len(ks)} libraries ready in {time.perf_counter() - start:.0f} s "
          f"(cache {cutlass_rt.cache_dir()})", flush=True)
    for k in bad:
        print(f"  did not build: {k.describe()}: {str(res[k]).splitlines()[0][:200]}")
    return res


def _ro_compiled(model: nn.Module, backend: str, options: Optional[dict] = None) -> Callable:
    torch._dynamo.reset()
    if backend == "inductor":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model, backend="sparse", options={**(options or {}), "mode": "reduce-overhead"})


def _ro_case(model: nn.Module, x: torch.Tensor, choice: bool) -> dict:
    """Dense compiled, CUTLASS forced and the dispatcher's choice, each under mode="reduce-overhead",
    with the kernels used and the error against dense. Each is timed three ways: "gpu", the GPU
    time of a call with its host time hidden (_bench_gpu); "ro", do_bench of a plain call (the
    least of three medians), which counts the host time where the GPU waits for it; "host", the
    host time per call."""
    out: dict = {}
    with torch.no_grad():
        dense = _ro_compiled(model, "inductor")
        ref = dense(x).float()
        out["dense_ro"] = _bench_settled(lambda: dense(x))
        out["dense_gpu"], out["dense_host"] = _bench_gpu(lambda: dense(x)), _host_us(lambda: dense(x))
        del dense
        # fx_cache off: on an FX graph cache hit (the same layer compiled earlier in the process or on
        # the machine) the pass does not run, and the kernels / fused columns would stay empty
        runs = [("cutlass", {"force": True, "kernel": "cutlass", "fx_cache": False})] + (
            [("choice", {"experimental": ("cutlass",), "fx_cache": False})] if choice else [])
        for name, options in runs:
            with collect() as sink:
                ours = _ro_compiled(model, "sparse", options)
                y = ours(x).float()
            out[f"{name}_ro"] = _bench_settled(lambda: ours(x))
            out[f"{name}_gpu"], out[f"{name}_host"] = _bench_gpu(lambda: ours(x)), _host_us(lambda: ours(x))
            ks = [d.kernel for d in sink if isinstance(d, LayerDecision)]
            layers = _layer_timings(sink)
            out[f"{name}_timed"] = "; ".join(layers)
            out[f"{name}_timed_first"] = "; ".join(layers[:2])
            out[f"{name}_kernels"] = ", ".join(f"{k} {ks.count(k)}" for k in sorted(set(ks)))
            out[f"{name}_fused"] = "; ".join(sorted({d.fused_text() for d in sink if isinstance(d, LayerDecision)}))
            out[f"{name}_relerr"] = float((y - ref).norm() / ref.norm())
            del ours
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def _print_timed(lines: list, which: str = "") -> None:
    """What the dispatcher timed at compile time for the chosen compiles, a bullet per case."""
    if lines:
        print(f"\nThe dispatcher's timings at compile time (chosen compiles{which}):\n\n" + "\n".join(lines))


def bench_cutlass(rows: list, parts=CUTLASS_PARTS, singles=None, batches=None):
    """The CUTLASS family compiled (backend="sparse", CUTLASS forced, and the dispatcher's choice among
    dense, Triton, cuSPARSELt and CUTLASS) against dense torch.compile, all under
    mode="reduce-overhead": single 2:4 linears, and 8 Llama MLP blocks (the gate in w3's epilogue,
    the residual in w2's)."""
    why = cutlass_rt.available("cuda")
    print("\n## CUTLASS sm90 2:4: compiled, mode=\"reduce-overhead\", vs dense torch.compile in the same mode\n")
    if why:
        print(f"(CUTLASS family not available here: {why})")
        return
    choice = "choice" in parts
    print("Each time is GPU / call: the GPU time of one call with its host time hidden, and do_bench of a "
          "plain call (the host time counted where the GPU waits for it; the least of three medians); "
          "host: the host time per call, dense / chosen.\n")
    cols = "| cutlass us | vs dense | fused |" + (" chosen | chosen us | vs dense | host us |" if choice else "")
    timed: list = []  # what the dispatcher timed at compile time for the choice compiles

    def cells(ro: dict) -> str:
        extra = (f" {ro['choice_kernels']} | {_pair(ro, 'choice')} | {_pair_ratio(ro, 'choice')} | "
                 f"{_fmt(ro['dense_host'])} / {_fmt(ro['choice_host'])} |" if choice else "")
        return (f"{_pair(ro, 'dense')} | {_pair(ro, 'cutlass')} | {_pair_ratio(ro, 'cutlass')} | {ro['cutlass_fused']} |"
                f"{extra} {ro['cutlass_relerr']:.1e} |")

    if "singles" in parts:
        print("| N | K | M | dense us " + cols + " rel. err (cutlass) |")
        print("|---|---|---|---|---|---|---|" + ("---|---|---|---|" if choice else "") + "---|")
        for n, k, m in singles or CUTLASS_SINGLES:
            w, x = _case24(m, n, k)
            lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).eval()
            with torch.no_grad():
                lin.weight.copy_(w)
            ro = _ro_case(lin, x, choice)
            rows.append(dict(section="cutlass", case="linear", N=n, K=k, M=m, **ro))
            if ro.get("choice_timed"):
                timed.append(f"- {n}x{k}, M = {m}: {ro['choice_timed']}")
            print(f"| {n} | {k} | {m} | {cells(ro)}", flush=True)
            del lin, w, x
        _print_timed(timed)
    if "mlp" in parts:
        timed = []
        print("\n| 8 Llama MLP blocks 2:4 (4096 x 14336) | tokens | dense us " + cols + " rel. err (cutlass) |")
        print("|---|---|---|---|---|---|" + ("---|---|---|---|" if choice else "") + "---|")
        torch.manual_seed(0)
        model = nn.Sequential(*[LlamaMLP() for _ in range(8)]).to("cuda", torch.bfloat16).eval()
        prune(model, "2:4")
        for m in batches or CUTLASS_MLP_BATCHES:
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            ro = _ro_case(model, x, choice)
            what = "prefill" if m > 256 else "decode"
            rows.append(dict(section="cutlass", case="llama_mlp", M=m, **ro))
            if ro.get("choice_timed"):
                timed.append(f"- {m} tokens: {ro['choice_timed_first']}")
            print(f"| {what} | {m} | {cells(ro)}", flush=True)
        _print_timed(timed, ", the first block's two layers")
        del model
        torch.cuda.empty_cache()
    if "quant8" in parts:
        timed = []
        n, k, m = CUTLASS_QUANT8
        print(f"\n| 8-bit 2:4, {n} x {k} (dense: the same model compiled) | M | dense us " + cols
              + " rel. err (cutlass) | bf16 F.linear GPU us | chosen vs bf16 (GPU) |")
        print("|---|---|---|---|---|---|" + ("---|---|---|---|" if choice else "") + "---|---|---|")
        w, x = _case24(m, n, k)
        with torch.no_grad():
            bf16 = _bench_gpu(_graphed(lambda: F.linear(x, w)))
        for case, what, model in (
                ("int8_act", "int8 dynamic activations x int8 weight (torch._int_mm + scales)",
                 W8A8Linear(*_int8_per_channel(w))),
                ("fp8_rowwise", "fp8 e4m3, row-wise scales (torch._scaled_mm)", Fp8Linear(*fp8_per_channel(w), rowwise=True)),
                ("fp8_rowwise_fast", "fp8 e4m3, row-wise scales, use_fast_accum=True",
                 Fp8Linear(*fp8_per_channel(w), rowwise=True, fast_accum=True))):
            ro = _ro_case(model.eval(), x, choice)
            rows.append(dict(section="cutlass", case=case, M=m, N=n, K=k, bf16_gpu=bf16, **ro))
            best = ro.get("choice_gpu") or ro.get("cutlass_gpu")
            print(f"| {what} | {m} | {cells(ro)} {_fmt(bf16)} | {_ratio(bf16, best)} |", flush=True)
            if ro.get("choice_timed"):
                timed.append(f"- {case}: {ro['choice_timed']}")
        _print_timed(timed)
        del w, x
        torch.cuda.empty_cache()


def target_summary(rows: list) -> str:
    """A markdown table of the TARGETS this run's rows measured: the ratio, the target, met or not.
    A compose target ("faster than") needs a ratio above 1."""
    lines = ["| group | case | measured | target | met |", "|---|---|---|---|---|"]
    for group, name, section, match, ratio, least in TARGETS:
        row = next((r for r in rows if r.get("section") == section
                    and all(r.get(k) == v for k, v in match.items())), None)
        if row is None:
            continue
        if ratio == "e2e":
            got = [(row[d] / row[o], mode) for mode, d, o in _E2E_MODES if row.get(d) and row.get(o)]
            if not got:
                continue
            value, how = max(got)
            how = f" ({how})"
        else:
            num, den = row.get(ratio[0]), row.get(ratio[1])
            if not num or not den:
                continue
            value, how = num / den, ""
        met = value > least if least == 1.0 else value >= least
        lines.append(f"| {group} | {name} | {value:.2f}x{how} | {'>' if least == 1.0 else '>='} {least:.2f}x | "
                     f"{'yes' if met else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


SECTIONS = {"linear24": bench_linear24, "block": bench_block, "cusparselt": bench_cusparselt, "e2e": bench_e2e,
            "quant": bench_quant, "int8_act": bench_int8_act, "fp8": bench_fp8, "compose": bench_compose,
            "guard": bench_guard, "cutlass": bench_cutlass}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--e2e", default="llama,vit,llama_prefill,vit24,hf_llama,hf_llama_cutlass",
                   help="models of the e2e section: llama (decode), vit (block), llama_prefill, vit24 (2:4 ViT-B, "
                        "ViT-H), vit24_cutlass (the same with the CUTLASS family a candidate), llama_prefill_cutlass (the "
                        "prefill with the CUTLASS family a candidate), hf_llama (transformers' "
                        "LlamaForCausalLM, batch 32, one token), hf_llama_cutlass (the same "
                        "with the CUTLASS family a candidate)")
    p.add_argument("--quick", action="store_true", help="one small case per section (a smoke test)")
    p.add_argument("--options", default="", help="backend options for the e2e compiles, e.g. nonfinite=fast")
    p.add_argument("--e2e-modes", default="default,ro",
                   help="e2e compiles: default (graph replays and plain calls), ro (reduce-overhead)")
    p.add_argument("--targets", action="store_true",
                   help="only the cases TARGETS sets targets for (quant 14336x4096 + Llama, cusparselt and "
                        "int8_act at M=8192, compose core)")
    p.add_argument("--compose-core", action="store_true",
                   help="compose: only 2:4 bf16, int8 dense and int8 + 2:4 (the comparison of the target)")
    p.add_argument("--cutlass", default=",".join(CUTLASS_PARTS),
                   help="the cutlass section's parts: singles (one linear), mlp (8 Llama MLP blocks), quant8 (int8 "
                        "activations and fp8 row-wise, one linear at M = 8192), choice "
                        "(also compile with the dispatcher's choice)")
    p.add_argument("--cutlass-batches", default=None,
                   help="the mlp part's token counts, comma-separated (default: "
                        + ",".join(map(str, CUTLASS_MLP_BATCHES)) + ")")
    p.add_argument("--cutlass-build-only", action="store_true",
                   help="build the cutlass section's CUTLASS libraries in parallel and exit (no GPU needed)")
    args = p.parse_args(argv)
    cutlass_parts = tuple(part.strip() for part in args.cutlass.split(",") if part.strip())
    if set(cutlass_parts) - set(CUTLASS_PARTS):
        sys.exit(f"unknown --cutlass part(s) {sorted(set(cutlass_parts) - set(CUTLASS_PARTS))}; choose from "
                 f"{', '.join(CUTLASS_PARTS)}")
    if args.cutlass_build_only:
        build_cutlass(cutlass_parts)
        return
    E2E_OPTIONS.update(kv.split("=", 1) for kv in args.options.split(",") if kv)
    E2E_MODES.clear()
    E2E_MODES.update(m.strip() for m in args.e2e_modes.split(",") if m.strip())
    if not torch.cuda.is_available():
        sys.exit("sparse_inductor.bench needs a CUDA GPU")
    print(header())
    rows: list = []
    quick = {"linear24": dict(shapes=[(1, 4096, 4096)]), "block": dict(cases=[(16, 4096, 4096, 64, 0.9)]),
             "cusparselt": dict(shapes=[(2048, 4096, 4096)]), "e2e": dict(which=()),
             "quant": dict(shapes=[(1, 4096, 4096)], models=False), "int8_act": dict(shapes=[(2048, 4096, 4096)]),
             "fp8": dict(shapes=[(2048, 4096, 4096)]), "compose": dict(name="vit_base_patch16_224", batch=8),
             "guard": dict(blocks=2), "cutlass": dict(parts=("singles",), singles=[(4096, 4096, 16)])}
    targets = {"quant": dict(shapes=[(1, 14336, 4096)]), "cusparselt": dict(shapes=[(8192, 14336, 4096), (8192, 4096, 14336)]),
               "int8_act": dict(shapes=[(8192, 14336, 4096)]), "compose": dict(core=True)}
    names = [name.strip() for name in args.sections.split(",")]
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")

    def stop(signum, frame):  # e.g. `timeout`: end the section, keep what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        for name in names:
            kw = quick[name] if args.quick else ({"which": tuple(args.e2e.split(","))} if name == "e2e" else {})
            if name == "cutlass" and not args.quick:
                kw = {"parts": cutlass_parts}
                if args.cutlass_batches:
                    kw["batches"] = [int(b) for b in args.cutlass_batches.split(",")]
            if args.targets and not args.quick:
                kw = {**kw, **targets.get(name, {})}
            if name == "compose" and args.compose_core:
                kw = {**kw, "core": True}
            SECTIONS[name](rows, **kw)
    except KeyboardInterrupt as e:
        print(f"\n(stopped by {e} in section {name!r}: the tables below hold what was measured before)", flush=True)
    summary = target_summary(rows)
    if summary:
        print("\n## The targets (stated for the H100) against this run\n")
        print(header())
        print()
        print(summary, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(schema_version=SCHEMA_VERSION, header=header(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
