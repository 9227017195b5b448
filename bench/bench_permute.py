"""Sparsity behind a permutation: search time per layer, and the permuted kernels against plain.

    python bench/bench_permute.py            # GPU: search times (GPU and CPU) and kernel times
    python bench/bench_permute.py --cpu      # the search times on the CPU only (no GPU needed)
    python bench/bench_permute.py --cpu --threads 1   # ... with torch on one thread

1. Search time (formats/permute.find_permutation, default budget 2 s) for one 14336x4096 bf16
   layer: 64x64 blocks with 90% zero, rows and columns scrambled; magnitude 2:4, columns
   scrambled; a random dense weight (refused by the early exits); a near-miss 2:4 weight (one row
   with three nonzeros in one group: no order is 2:4, refused at the budget). Median of 3, with
   the weight on the CPU (torch threads printed) and, with a GPU, on the GPU.
2. Kernel times (GPU, CUDA graph replays under do_bench, L2 flushed, us): 14336x4096, 64x64
   blocks, 90% zero, at M = 1, 16, 8192, in one run: dense F.linear on the scrambled weight;
   the block kernel on the weight as if stored unscrambled ("plain"); on the scrambled weight
   with x gathered in the kernel and the output columns mapped ("x_index + out_index"); with
   the output columns mapped only ("out_index", the cost of P alone); and with x gathered by a
   separate index_select before the kernel ("gather x first"). The block kernel runs without its
   row check (guard=False) in every column, so the numbers are the kernels' own. Also the 2:4
   gemv layout at M = 1, plain and with x_index.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from sparse_inductor.formats import compress_24, compress_block, to_gemv_layout
from sparse_inductor.formats import permute as pm
from sparse_inductor.prune import prune_24_, prune_blocks_, scramble_

N, K, B, SPARSITY = 14336, 4096, 64, 0.9


def weights(device):
    """(name, weight as the model holds it) for the search table."""
    g = torch.Generator().manual_seed(0)
    blk = prune_blocks_(torch.randn(N, K, generator=g), B, SPARSITY)
    w24 = prune_24_(torch.randn(N, K, generator=g))
    near = w24.clone()
    row = near[0].view(-1, 4)
    row[0, (row[0] == 0).nonzero()[0]] = 1.0  # three nonzeros in group 0 ...
    row[1, (row[1] != 0).nonzero()[0]] = 0.0  # ... one in group 1: still K/2 in the row
    out = [("block 64x64, 90% zero, rows+cols scrambled", scramble_(blk, rows=True, seed=1)),
           ("2:4, columns scrambled", scramble_(w24, rows=False, seed=2)),
           ("dense (random)", torch.randn(N, K, generator=g)),
           ("near-miss 2:4 (no order exists)", scramble_(near, rows=False, seed=3))]
    return [(name, w.to(device=device, dtype=torch.bfloat16)) for name, w in out]


def search_table(devices):
    print("\n### Permutation search, one 14336x4096 bf16 layer (find_permutation, budget 2 s)\n")
    print("| weight | device | result | seconds (median of 3) |")
    print("|---|---|---|---|")
    reasons = []
    for device in devices:
        where = (f"CPU ({torch.get_num_threads()} threads)" if device == "cpu"
                 else torch.cuda.get_device_name())
        for name, w in weights(device):
            times, res = [], None
            for _ in range(3):
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = pm.find_permutation(w)  # no cache: every run searches
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            what = res.pattern + (f" {res.block}x{res.block} {res.block_density:.1%}" if res.pattern == "block" else "")
            print(f"| {name} | {where} | {what} | {statistics.median(times):.2f} |", flush=True)
            reasons.append(f"- {name}, {where}: {res.reason}")
    print("\n" + "\n".join(reasons))


def kernel_table():
    from sparse_inductor.bench import _bench, _graphed
    from sparse_inductor.lowering.triton_24 import sp24_linear
    from sparse_inductor.lowering.triton_block import block_linear

    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    wp = prune_blocks_(torch.randn(N, K, generator=g), B, SPARSITY).to(dev, dt)  # block-sparse as stored
    rows, cols = torch.randperm(N, generator=g).to(dev), torch.randperm(K, generator=g).to(dev)
    ws = torch.empty_like(wp)
    ws[rows] = wp
    ws[:, cols] = ws.clone()  # the model's weight: ws[rows][:, cols] = wp
    fmt = compress_block(wp, B)
    xi, oi = cols.to(torch.int32).contiguous(), rows.to(torch.int32).contiguous()
    print(f"\n### Block kernel, {N}x{K}, {B}x{B} blocks, {SPARSITY:.0%} zero (guard off), us\n")
    print("| M | dense (scrambled W) | plain | x_index + out_index | out_index | gather x first + out_index |")
    print("|---|---|---|---|---|---|")
    for m in (1, 16, 8192):
        x = torch.randn(m, K, device=dev, dtype=dt)
        runs = {
            "dense": lambda: F.linear(x, ws),
            "plain": lambda: block_linear(x, *fmt, None, N, K, guard=False),
            "both": lambda: block_linear(x, *fmt, None, N, K, guard=False, x_index=xi, out_index=oi),
            "out": lambda: block_linear(x, *fmt, None, N, K, guard=False, out_index=oi),
            "first": lambda: block_linear(x.index_select(1, cols), *fmt, None, N, K, guard=False, out_index=oi),
        }
        ref = F.linear(x.float(), ws.float())
        err = ((runs["both"]().float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, err  # the permuted kernel computes the layer (bf16 output: ~2^-8 relative)
        with torch.no_grad():
            t = {k: _bench(_graphed(f)) for k, f in runs.items()}
        print(f"| {m} | {t['dense']:.1f} | {t['plain']:.1f} | {t['both']:.1f} | {t['out']:.1f} | {t['first']:.1f} |",
              flush=True)
    w24 = prune_24_(torch.randn(N, K, generator=g)).to(dev, dt)
    vm = to_gemv_layout(*compress_24(w24))
    x = torch.randn(1, K, device=dev, dtype=dt)
    with torch.no_grad():
        plain = _bench(_graphed(lambda: sp24_linear(x, *vm)))
        perm = _bench(_graphed(lambda: sp24_linear(x, *vm, x_index=xi)))
    print(f"\n2:4 gemv layout, M = 1, {N}x{K}: plain {plain:.1f} us, x_index {perm:.1f} us")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="the search times on the CPU only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import triton

    gpu = torch.cuda.is_available() and not args.cpu
    print(f"{torch.cuda.get_device_name() if gpu else platform.processor() or 'CPU'}, torch {torch.__version__}, "
          f"triton {triton.__version__}, Python {platform.python_version()}, {datetime.date.today().isoformat()}")
    search_table(["cpu"] + (["cuda"] if gpu else []))
    if gpu:
        kernel_table()


if __name__ == "__main__":
    main()
