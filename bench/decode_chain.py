"""Decode-size layers timed one at a time and back to back (the harness floor experiment).

    python bench/decode_chain.py [--layers 8]

Every decode-size number in docs/benchmarks.md is one CUDA-graph replay of one layer under
do_bench (L2 flushed), which also times the graph launch: run E1 measured 4.93 us for a tiny
kernel timed that way on the H100. A model runs its layers back to back inside one graph, where
that floor is paid once. This script times, in one call, for dense F.linear and the project's
kernels (eager launchers, the weights of each layer distinct so that nothing stays in L2):
- "one": one layer, one graph replay (the bench's way);
- "chain": L layers of the same shape and structure with distinct weights in one graph, the time
  divided by L (what each layer costs inside a decode model);
and the floor itself: a one-element kernel, one per replay and L per replay.
The block kernel is timed with one row-check reduction over x per layer (what the compiled
template's check costs when it cannot join x's producer). Ratios are dense / ours, same call.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparse_inductor.bench import _bench, _graphed, _int8_per_channel, header
from sparse_inductor.formats import compress_24, compress_block, to_gemv_layout
from sparse_inductor.lowering.triton_24 import sp24_linear
from sparse_inductor.lowering.triton_block import block_linear
from sparse_inductor.prune import prune_24_, prune_blocks_


def _time(fns) -> float:
    return _bench(_graphed(lambda: [f() for f in fns]), rep=200) / len(fns)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args()
    L = args.layers
    dev, dt = "cuda", torch.bfloat16
    print(header())
    t = torch.zeros(1, device=dev)
    one, chain = _time([lambda: t.add_(1)]), _time([lambda: t.add_(1)] * L)
    print(f"\nfloor: one-element kernel, one per replay {one:.2f} us; {L} per replay {chain:.2f} us each\n")
    print(f"| case | M | N x K | dense one | ours one | ratio one | dense chain ({L}) | ours chain | ratio chain |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [("block 64 90%", m, 0.9) for m in (1, 16)] + [("block 64 80%", m, 0.8) for m in (1, 16)] \
        + [("2:4 bf16", 1, None), ("2:4 int8 weight-only", 1, None)]
    n, k = 14336, 4096
    for name, m, sparsity in cases:
        torch.manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=dt)
        dense_w, fns = [], []
        for i in range(L):
            w = torch.randn(n, k, device=dev, dtype=dt)
            if name.startswith("block"):
                w = prune_blocks_(w, 64, sparsity)
                bs = compress_block(w, 64)
                fns.append(lambda bs=bs: (torch.sum(x, dim=-1, dtype=torch.float32),
                                          block_linear(x, *bs, None, n, k, guard=False)))
            else:
                w = prune_24_(w)
                wv = _int8_per_channel(w)[0] if "int8" in name else w
                vm = to_gemv_layout(*compress_24(wv))
                fns.append(lambda vm=vm: sp24_linear(x, *vm))
            dense_w.append(w)
        dense = [lambda w=w: F.linear(x, w) for w in dense_w]
        with torch.no_grad():
            d1, o1, dl, ol = _time(dense[:1]), _time(fns[:1]), _time(dense), _time(fns)
        print(f"| {name} | {m} | {n}x{k} | {d1:.1f} | {o1:.1f} | {d1 / o1:.2f}x | {dl:.1f} | {ol:.1f} | {dl / ol:.2f}x |",
              flush=True)
        del dense_w, fns, dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
