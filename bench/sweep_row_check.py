"""The non-finite row check's kernel (lowering/row_check.py) against what Inductor makes of the same
reduction, on the GPU: per (M, K), Inductor's compiled `sum(0 * x, -1)` (its own reduction kernel,
x a graph input), eager torch.sum (what the dispatcher times a "separate" check as), and the
Triton kernel with the table's config and a small grid of others. do_bench medians of CUDA-graph
replays (L2 flushed), us, and the bandwidth each reaches on x's bytes.

    python bench/sweep_row_check.py [--shapes 8192x14336,12608x3072,8192x4096,16x4096] [--quick]

Written in session 9 and not yet run on the GPU (the session's device time was spent): the row-check
kernel's configs are a guess (run J measured 24 us for 77 MB, ~3.2 TB/s, and the compiled
cuSPARSELt 8192x4096x14336 layer 89 us over its kernel in one call, 41 in another).
"""
from __future__ import annotations

import argparse
import itertools

import torch

from sparse_inductor.bench import _bench, _graphed, header
from sparse_inductor.lowering.row_check import pick_config, row_check_eager


def grid(quick: bool):
    bks = (1024, 4096) if quick else (512, 1024, 2048, 4096)
    for bm, bk, w in itertools.product((1, 2, 4, 8), bks, (4, 8)):
        if bm * bk <= 8192:
            yield dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8192x14336,12608x3072,8192x4096,16x4096", help="M x K, comma-separated")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(header())
    print("\n| M | K | Inductor's reduction | eager torch.sum | ours, table config | best configs (us) | table GB/s |")
    print("|---|---|---|---|---|---|---|")
    for m, k in (tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = row_check_eager(x)
        assert torch.equal(ref, torch.zeros_like(ref))
        torch._dynamo.reset()
        ind = torch.compile(lambda t: (t * 0).sum(-1, dtype=torch.float32))
        ind(x)
        t_ind = _bench(_graphed(lambda: ind(x)))
        t_eager = _bench(_graphed(lambda: torch.sum(x, dim=-1, dtype=torch.float32)))
        table = pick_config(k, m)
        t_table = _bench(_graphed(lambda: row_check_eager(x, table)))
        res = []
        for cfg in grid(a.quick):
            if cfg["BLOCK_K"] > max(16, 1 << (k - 1).bit_length()):
                continue
            res.append((_bench(_graphed(lambda: row_check_eager(x, cfg)), rep=30), cfg))
        best = "; ".join(f"m{c['BLOCK_M']} k{c['BLOCK_K']} w{c['num_warps']}: {t:.1f}" for t, c in sorted(res, key=lambda r: r[0])[:3])
        gbs = m * k * 2 / t_table / 1e3
        print(f"| {m} | {k} | {t_ind:.1f} | {t_eager:.1f} | {t_table:.1f} (m{table['BLOCK_M']} k{table['BLOCK_K']} "
              f"w{table['num_warps']}) | {best} | {gbs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
