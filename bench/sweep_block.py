"""Sweep the block-sparse kernel's launch configs on the GPU (for triton_block.CONFIGS).

    python bench/sweep_block.py [--quick]

Times `block_linear(..., guard=False, config=cfg)` as CUDA-graph replays (do_bench medians, L2
flushed) for the decode and prefill shapes of the bench (N=14336, K=4096, 64x64 blocks, 90% and
80% zero), every config in the grid below, and prints per case: dense F.linear, the table's
config, and the five fastest configs. Weights pruned like the bench (lowest-norm blocks zeroed).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from sparse_inductor.bench import _bench, _graphed, header
from sparse_inductor.formats import compress_block
from sparse_inductor.lowering import triton_block as tb
from sparse_inductor.prune import prune_blocks_


def grid(m: int, b: int, quick: bool):
    if m <= 16:
        for bn, w, s in itertools.product((16, 32, 64), (2, 4), (2, 3, 4, 5) if not quick else (3, 5)):
            yield tb.BlockLinearConfig(16, w, s, bn)
    else:
        for bm, w, s in itertools.product((64, 128, 256), (4, 8), (2, 3, 4) if not quick else (3, 4)):
            if bm == 256 and w == 4:
                continue
            yield tb.BlockLinearConfig(bm, w, s, 64)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ms", default="1,16,8192")
    args = p.parse_args(argv)
    print(header())
    dev, dt, n, k, b = "cuda", torch.bfloat16, 14336, 4096, 64
    print("\n| M | zero blocks | dense F.linear | table config | table us | best configs (us) | best vs dense |")
    print("|---|---|---|---|---|---|---|")
    for sparsity in (0.9, 0.8):
        torch.manual_seed(0)
        w = prune_blocks_(torch.randn(n, k, device=dev, dtype=dt), b, sparsity)
        bs = compress_block(w, b)
        for m in (int(s) for s in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=dt)
            dense = _bench(_graphed(lambda: F.linear(x, w)))
            table = tb.pick_config(b, m, dt)
            results = []
            for cfg in [table, *grid(m, b, args.quick)]:
                try:
                    t = _bench(_graphed(lambda: tb.block_linear(x, *bs, None, n, k, guard=False, config=cfg)), rep=50)
                except Exception as e:  # e.g. out of shared memory
                    print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                    continue
                results.append((t, cfg))
            t_table = results[0][0] if results and results[0][1] == table else float("nan")
            best = sorted(results, key=lambda r: r[0])[:5]
            txt = "; ".join(f"bm{c.block_m} bn{c.block_n or b} w{c.num_warps} s{c.num_stages}: {t:.1f}"
                           for t, c in best)
            print(f"| {m} | {sparsity:.0%} | {dense:.1f} | {tuple(table)} | {t_table:.1f} | {txt} | "
                  f"{dense / best[0][0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
