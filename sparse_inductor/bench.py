"""Benchmarks: `python -m sparse_inductor.bench [--sections linear24,block,e2e] [--json out.json]`.

Needs a CUDA GPU. Every time is the median of triton.testing.do_bench (L2 flushed between reps),
in microseconds. Compiled modules and our kernels are timed as CUDA-graph replays, so that Python
and launch overhead do not hide the kernels (a torch.compile'd single linear costs ~50 us of host
time per call in default mode, ../shared/BASELINES.md); PyTorch's own sparse paths are timed as a
user calls them (eager), which is what the anchors report. Ratios are dense time / candidate time
(above 1 = faster than dense), always from the same run. The header names device, versions, date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _bench(fn: Callable, rep: int = 100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def _graphed(fn: Callable) -> Callable:
    """Capture fn() in a CUDA graph (after warm-up) and return its replay."""
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


def _try(fn: Callable) -> Optional[float]:
    try:
        return fn()
    except Exception as e:  # a baseline that fails (e.g. shape limits) is reported, not fatal
        print(f"    (failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
        return None


def header() -> str:
    import triton

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
    from .report import LayerDecision, collect

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


def bench_linear24(rows: list, shapes=None):
    from .formats import compress_24
    from .lowering.triton_24 import sp24_linear
    from .prune import prune_24_

    dev, dt = "cuda", torch.bfloat16
    shapes = shapes or [(m, n, k) for (n, k) in [(14336, 4096), (4096, 4096), (4096, 14336)] for m in (1, 16, 64)]
    print("\n## One 2:4 linear, y = x @ W^T (no bias)\n")
    print("| M | N | K | dense F.linear | dense compile | to_sparse_semi_structured (eager) | ours: kernel | ours: compiled | kernel vs dense | compiled vs dense compile | chosen by dispatcher |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (m, n, k) in shapes:
        torch.manual_seed(0)
        w = prune_24_(torch.randn(n, k, device=dev, dtype=dt))
        x = torch.randn(m, k, device=dev, dtype=dt)
        values, meta = compress_24(w)
        t = _layer_times(w, x)
        with torch.no_grad():
            cslt = _try(lambda: _bench(_cslt_fn(w, x)))
            kern = _bench(_graphed(lambda: sp24_linear(x, values, meta)))
        rows.append(dict(section="linear24", M=m, N=n, K=k, cslt_eager=cslt, kernel=kern, **t))
        print(f"| {m} | {n} | {k} | {_fmt(t['dense'])} | {_fmt(t['dense_compile'])} | {_fmt(cslt)} | {_fmt(kern)} | "
              f"{_fmt(t['compiled'])} | {_ratio(t['dense'], kern)} | {_ratio(t['dense_compile'], t['compiled'])} | "
              f"{t['chosen']} |", flush=True)


def _cslt_fn(w, x):
    from torch.sparse import to_sparse_semi_structured

    ws = to_sparse_semi_structured(w)
    return lambda: F.linear(x, ws)


def bench_block(rows: list, cases=None):
    from .formats import compress_block
    from .lowering.triton_block import block_linear
    from .prune import prune_blocks_

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


def _bsr_fn(w, x, b):
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


def _e2e_row(rows, name, model, x, options=None):
    from .report import LayerDecision, collect

    with torch.no_grad():
        torch._dynamo.reset()
        dense_c = torch.compile(model)
        t_dense = _bench(_graphed(lambda: dense_c(x)), rep=200)
        ref = dense_c(x).float()
        torch._dynamo.reset()
        with collect() as sink:
            ours = torch.compile(model, backend="sparse", options=options)
            out = ours(x).float()
        t_ours = _bench(_graphed(lambda: ours(x)), rep=200)
    kernels = sorted({d.kernel for d in sink if isinstance(d, LayerDecision)})
    relerr = float((out - ref).norm() / ref.norm())
    rows.append(dict(section="e2e", model=name, dense_compile=t_dense, sparse=t_ours, kernels=kernels, relerr=relerr))
    print(f"| {name} | {t_dense:.1f} | {t_ours:.1f} | {t_dense / t_ours:.2f}x | {','.join(kernels)} | {relerr:.1e} |", flush=True)


def bench_e2e(rows: list, which=("llama", "vit")):
    from .prune import prune

    dev, dt = "cuda", torch.bfloat16
    print("\n## Whole models: dense torch.compile vs backend=\"sparse\" (dispatcher's choice), CUDA-graph replay\n")
    print("| model | dense compile us | sparse us | speedup | kernels used | rel. err vs dense |")
    print("|---|---|---|---|---|---|")
    if "llama" in which:
        torch.manual_seed(0)
        model = nn.Sequential(*[LlamaMLP() for _ in range(8)]).to(dev, dt).eval()
        prune(model, "2:4")
        for b in (1, 16):
            _e2e_row(rows, f"8 Llama MLP blocks 2:4, decode batch {b}", model, torch.randn(b, 4096, device=dev, dtype=dt))
        del model
    if "vit" in which:
        try:
            import timm
        except ImportError:
            print("| vit_base_patch16_224 | (timm not installed) | | | | |")
            return
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False).to(dev, dt).eval()
        prune(model, "block", block=64, sparsity=0.9, filter_fn=lambda m, n: ".mlp." in f".{n}.")
        _e2e_row(rows, "ViT-B/16 batch 64, MLP weights 90% zero 64x64 blocks", model,
                 torch.randn(64, 3, 224, 224, device=dev, dtype=dt))
    torch.cuda.empty_cache()


SECTIONS = {"linear24": bench_linear24, "block": bench_block, "e2e": bench_e2e}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="one small case per section (a smoke test)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("sparse_inductor.bench needs a CUDA GPU")
    print(header())
    rows: list = []
    quick = {"linear24": dict(shapes=[(1, 4096, 4096)]), "block": dict(cases=[(16, 4096, 4096, 64, 0.9)]),
             "e2e": dict(which=())}
    for name in args.sections.split(","):
        name = name.strip()
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        SECTIONS[name](rows, **(quick[name] if args.quick else {}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
