"""Where one compiled sparse linear's GPU time goes: for a block-sparse or 2:4 weight and each M,
the CUDA-graph replay time (do_bench median) of dense F.linear, dense torch.compile and
backend="sparse" with force=True under each option set, then the per-kernel CUDA times
(torch.profiler) of each compiled call; the "ro" variants compile with mode="reduce-overhead" and
are timed as a user calls them (do_bench of the call: Inductor's CUDA-graph replay with its input
copy and its host time where the GPU waits for it), as the GPU time of a call with its host time
hidden ("gpu"), and with their host time per call beside; "ro cutlass" forces the CUTLASS family.

    python bench/profile_layer.py [--pattern block|2:4] [--nk 14336x4096] [--ms 1,16,8192]
                                  [--sparsity 0.9] [--block 64] [--variants "exact;fast"]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from profile_models import _profile  # noqa: E402

from sparse_inductor.bench import _bench, _bench_gpu, _compiled_linear, _graphed, header  # noqa: E402
from sparse_inductor.prune import prune_24_, prune_blocks_  # noqa: E402

VARIANTS = {"exact": {"force": True}, "fast": {"force": True, "nonfinite": "fast"}}
# compiled with mode="reduce-overhead" (Inductor's CUDA graphs) and called as a user calls it:
# do_bench of the call, which includes the host time of each replay where the GPU waits for it
RO_VARIANTS = {"ro exact": {"force": True, "mode": "reduce-overhead"},
               "ro fast": {"force": True, "nonfinite": "fast", "mode": "reduce-overhead"},
               "ro cutlass": {"force": True, "kernel": "cutlass", "mode": "reduce-overhead"}}


def host_us(fn, n: int = 50) -> float:
    """Median host time per call of fn behind a deep GPU queue (the GPU never waits for the host)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(ts)[n // 2] * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="block", choices=("block", "2:4"))
    ap.add_argument("--nk", default="14336x4096")
    ap.add_argument("--ms", default="1,16,8192")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--variants", default="exact;fast;ro exact;ro fast")
    ap.add_argument("--top", type=int, default=6)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_layer: needs a CUDA GPU")
    print(header(), flush=True)
    n, k = (int(v) for v in a.nk.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w = prune_blocks_(w, a.block, a.sparsity) if a.pattern == "block" else prune_24_(w)
    summary = []
    for m in (int(v) for v in a.ms.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            row = {"dense F.linear": _bench(_graphed(lambda: F.linear(x, w)))}
            dc = _compiled_linear(w, None, "inductor")
            dc(x)
            row["dense compile"] = _bench(_graphed(lambda: dc(x)))
            dro = _compiled_linear(w, None, "inductor")
            dro = torch.compile(dro._orig_mod, mode="reduce-overhead")
            for _ in range(3):
                dro(x)
            row["dense compile ro"] = _bench(lambda: dro(x))
            row["dense compile ro gpu"] = _bench_gpu(lambda: dro(x))
            row["dense ro host"] = host_us(lambda: dro(x))
            for v in a.variants.split(";"):
                v = v.strip()
                mod = _compiled_linear(w, None, "sparse", {**VARIANTS, **RO_VARIANTS}[v])
                for _ in range(3):
                    mod(x)
                if v in RO_VARIANTS:
                    row[v] = _bench(lambda: mod(x))
                    row[v + " gpu"] = _bench_gpu(lambda: mod(x))
                    row[v + " host"] = host_us(lambda: mod(x))
                    total, launches, kernels = _profile(lambda: mod(x))
                    print(f"\n### M={m} {v}: {row[v]:.1f} us (call), {row[v + ' gpu']:.1f} us (GPU, host hidden); "
                          f"{total:.1f} us of kernels, {launches} launches")
                    for name, calls, us in kernels[: a.top]:
                        print(f"- {name[:100]}: {calls:.0f} x, {us:.1f} us")
                    continue
                row[v] = _bench(_graphed(lambda: mod(x)))
                total, launches, kernels = _profile(lambda: mod(x))
                print(f"\n### M={m} {v}: {row[v]:.1f} us (graph replay); {total:.1f} us of kernels, {launches} launches")
                for name, calls, us in kernels[: a.top]:
                    print(f"- {name[:100]}: {calls:.0f} x, {us:.1f} us")
        summary.append((m, row))
    print(f"\n## {a.pattern} {a.nk}" + (f" {a.block}x{a.block} {a.sparsity:.0%} zero" if a.pattern == "block" else "")
          + " (us, CUDA-graph replays)\n")
    cols = list(summary[0][1])
    print("| M | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for m, row in summary:
        print(f"| {m} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
