"""Where a compiled model's GPU time goes: per-kernel CUDA times (torch.profiler) of one forward,
for the variants of the int8 + 2:4 composition case (ViT with MLP weights 2:4: bf16 dense, 2:4 bf16,
int8 dense W8A8 (plain, and under lowering/reductions.py's quantize-kernel choices), int8 + 2:4
with and without those choices), and cuSPARSELt's int8 kernel alone with an int32 vs a bf16
output (every alg id).

    python bench/profile_models.py [--model vit_huge_patch14_224] [--batch 32] [--top 12]
                                   [--variants ...] [--int8-kernels]

Compiles in default mode (the profiler sees each kernel; reduce-overhead's graph replays the same
kernels). Prints device, versions and date first, then per variant: total CUDA time of one
forward, kernel launches, and the top kernels by time (name, calls, total us).
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch

from sparse_inductor.bench import _bench, _int8_per_channel, _w8a8_linears_, header
from sparse_inductor.lowering.reductions import quantize_reductions

# name -> (int8 W8A8 MLPs, compile kwargs, compile plain Inductor under our quantize-kernel choices)
VARIANTS = {
    "bf16 dense": (False, {}, False),
    "2:4 bf16": (False, {"backend": "sparse"}, False),
    "int8 dense": (True, {}, False),
    "int8 dense, persistent quantize": (True, {}, True),
    "int8+2:4, inductor reductions": (True, {"backend": "sparse", "options": {"reductions": "inductor"}}, False),
    "int8+2:4": (True, {"backend": "sparse"}, False),
    "2:4 cusparselt forced": (False, {"backend": "sparse", "options": {"force": True, "kernel": "cusparselt"}}, False),
    "2:4 cusparselt forced, nonfinite fast": (False, {"backend": "sparse", "options": {
        "force": True, "kernel": "cusparselt", "nonfinite": "fast"}}, False),
    # with --pattern block (the names say what the default pattern does; these are neutral)
    "sparse": (False, {"backend": "sparse"}, False),
    # the backend's compile with every layer kept dense (its frozen graph against plain Inductor's)
    "sparse, kept dense": (False, {"backend": "sparse", "options": {"min_speedup": 1000.0}}, False),
    "sparse, nonfinite fast": (False, {"backend": "sparse", "options": {"nonfinite": "fast"}}, False),
    "sparse, MLPs fused": (False, {"backend": "sparse", "options": {"fuse_mlp": True}}, False),
    "sparse, MLPs fused (forced)": (False, {"backend": "sparse", "options": {
        "force": True, "kernel": "triton", "fuse_mlp": True}}, False),
}


def _profile(fn, iters: int = 3) -> tuple[float, int, list]:
    """(CUDA us per call, kernels per call, [(name, calls per call, us per call)]) of fn()."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            p = per[ev.name]
            p[0] += 1
            p[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    rows = sorted(((n, c / iters, t / iters) for n, (c, t) in per.items()), key=lambda r: -r[2])
    return sum(r[2] for r in rows), int(sum(r[1] for r in rows)), rows


def profile_vit(name: str, batch: int, variants, top: int, prune_all: bool = False, pattern: str = "2:4") -> None:
    import timm

    from sparse_inductor.prune import prune

    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(dev, dt).eval()
    mlp = lambda q: ".mlp." in f".{q}."  # noqa: E731
    how = {"block": 64, "sparsity": 0.9} if pattern == "block" else {}  # the bench's ViT-B block case
    prune(model, pattern, filter_fn=(lambda m, n: n != "head") if prune_all else (lambda m, n: mlp(n)), **how)
    x = torch.randn(batch, 3, 224, 224, device=dev, dtype=dt)
    quantized = False
    summary = []
    for v, (int8, kw, ours_choices) in VARIANTS.items():
        if v not in variants:
            continue
        if int8 and not quantized:
            _w8a8_linears_(model, mlp)
            quantized = True
        with torch.no_grad():
            torch._dynamo.reset()
            c = torch.compile(model, **kw)
            # plain Inductor under our choices: its FX graph cache would hand back the plain compile
            with quantize_reductions(ours_choices), torch._inductor.config.patch(fx_graph_cache=not ours_choices):
                c(x)  # compiles here
            total, launches, rows = _profile(lambda: c(x))
            wall = _bench(lambda: c(x), rep=50)
        summary.append((v, total, launches, wall))
        print(f"\n### {name} b{batch}: {v}: {total:.0f} us of kernels per forward, {launches} launches, "
              f"{wall:.0f} us per call (default mode, do_bench)\n", flush=True)
        print("| kernel | calls | us per forward |\n|---|---|---|")
        for n, c_, t in rows[:top]:
            print(f"| {n[:90]} | {c_:.0f} | {t:.1f} |")
    what = "2:4" if pattern == "2:4" else "90% zero 64x64 blocks"
    print(f"\n## {name} b{batch}, {'every linear' if prune_all else 'MLP'} {what}: summary (kernel time per forward, us)\n")
    print("| variant | kernel us | launches | do_bench us (default mode) |\n|---|---|---|---|")
    for v, total, launches, wall in summary:
        print(f"| {v} | {total:.0f} | {launches} | {wall:.0f} |", flush=True)


def int8_kernels(shapes) -> None:
    """cuSPARSELt int8 x int8 2:4 with an int32 and a bf16 output: the best alg's time of each."""
    from sparse_inductor.bench import _case24
    from sparse_inductor.runtime import cusparselt

    print("\n## cuSPARSELt int8 2:4 kernel alone: int32 vs bf16 output (best alg, us)\n")
    print("| M | N | K | torch._int_mm (dense int8) | int32 out | bf16 out | per-alg bf16 (first 6 by time) |")
    print("|---|---|---|---|---|---|---|")
    for m, n, k in shapes:
        w, _ = _case24(m, n, k)
        wq, _s = _int8_per_channel(w)
        xq = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        wc = cusparselt.compress(wq)
        dense = _bench(lambda: torch._int_mm(xq, wq.t()))
        best, per_bf16 = {}, []
        for out in (torch.int32, torch.bfloat16):
            top = cusparselt.max_alg_id(wc, xq, n, k, out) or 0
            for a in range(top + 1):
                try:
                    cusparselt.linear(xq, wc, None, n, k, a, 1, out)
                    t = _bench(lambda: cusparselt.linear(xq, wc, None, n, k, a, 1, out), rep=30)
                except Exception as e:  # an alg the library refuses
                    print(f"    alg {a} {out}: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
                    continue
                if out == torch.bfloat16:
                    per_bf16.append((t, a))
                if out not in best or t < best[out][0]:
                    best[out] = (t, a)
        fmt = lambda b: f"{b[0]:.1f} (alg {b[1]})" if b else "-"  # noqa: E731
        algs = ", ".join(f"{a}:{t:.0f}" for t, a in sorted(per_bf16)[:6])
        print(f"| {m} | {n} | {k} | {dense:.1f} | {fmt(best.get(torch.int32))} | {fmt(best.get(torch.bfloat16))} | "
              f"{algs} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_huge_patch14_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--variants", default=";".join(VARIANTS), help=f"semicolon-separated of {list(VARIANTS)}")
    ap.add_argument("--int8-kernels", action="store_true", help="also time cuSPARSELt's int8 kernel by output dtype")
    ap.add_argument("--no-models", action="store_true")
    ap.add_argument("--prune-all", action="store_true", help="every linear but the head (default: the MLPs)")
    ap.add_argument("--pattern", default="2:4", choices=("2:4", "block"),
                    help="2:4, or block: 90%% zero 64x64 blocks (variants: 'bf16 dense; sparse; sparse, nonfinite fast')")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_models: needs a CUDA GPU")
    print(header(), flush=True)
    if a.int8_kernels:
        int8_kernels([(8192, 14336, 4096), (8192, 4096, 14336), (8224, 5120, 1280), (8224, 1280, 5120)])
    if not a.no_models:
        profile_vit(a.model, a.batch, [v.strip() for v in a.variants.split(";")], a.top, a.prune_all, a.pattern)


if __name__ == "__main__":
    main()
