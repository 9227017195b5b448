"""One rank of tests/test_tensor_parallel.py: `python tests/tp_worker.py RANK WORLD STORE_FILE`.

Builds the same small transformer block on every rank (seeded), shards it with
torch.distributed.tensor.parallel (q/k/v and fc1 ColwiseParallel, o and fc2 RowwiseParallel, gloo
on the CPU), compiles it with backend="sparse" (force=True) and prints one JSON line: the compiled
output at two batch sizes (the second compiles again, with a dynamic batch), the unsharded model's output in float64 on the same inputs, what the
pass decided for each local shard, and how often the generated code calls each sparse op.
"""
from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, d: int, head_dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head_dim = head_dim

    def forward(self, x):
        b, s, _ = x.shape  # -1 heads: a rank holds d / head_dim / world of them

        def heads(t):
            return t.view(b, s, -1, self.head_dim).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.o(a.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64, head_dim: int = 8):
        super().__init__()
        self.attn = Attention(d, head_dim)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


PLAN = {"attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.o": "rowwise",
        "fc1": "colwise", "fc2": "rowwise"}


def make_block(world: int) -> Block:
    """q, o, fc1: 2:4 (a shard along N or K of a 2:4 weight is 2:4); k: 16x16 blocks, half of
    them zero in each rank's rows; fc2: 16x16 blocks, half zero in each rank's columns (its K);
    v: dense."""
    from sparse_inductor.prune import prune_24_, prune_blocks_

    torch.manual_seed(0)
    blk = Block().eval()
    with torch.no_grad():
        for lin in (blk.attn.q, blk.attn.o, blk.fc1):
            prune_24_(lin.weight)
        for w, dim in ((blk.attn.k.weight, 0), (blk.fc2.weight, 1)):
            for part in w.chunk(world, dim=dim):
                prune_blocks_(part, 16, 0.5)
    return blk


def main(rank: int, world: int, store: str) -> None:
    from torch._inductor.utils import run_and_get_code
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from sparse_inductor.report import LayerDecision, collect

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (world,))
        blk = make_block(world)
        torch.manual_seed(1)
        xs = [torch.randn(2, 8, 32), torch.randn(3, 8, 32)]
        with torch.no_grad():
            refs = [blk.double()(x.double()) for x in xs]
        blk = make_block(world)
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(blk, mesh, {name: styles[s]() for name, s in PLAN.items()})
        compiled = torch.compile(blk, backend="sparse", options={"force": True})
        with torch.no_grad(), collect() as sink:
            outs, codes = [], []
            for x in xs:
                out, code = run_and_get_code(compiled, x)
                outs.append(out)
                codes.extend(code)
        code = "\n".join(codes)
        print(json.dumps({
            "rank": rank,
            "outs": [o.tolist() for o in outs], "refs": [r.tolist() for r in refs],
            "decisions": [[d.name, list(d.shape), d.pattern, d.kernel] for d in sink if isinstance(d, LayerDecision)],
            "notes": [n for n in sink if isinstance(n, str)],
            "ops": {op: code.count(f"sparse_inductor.{op}.default(") for op in ("linear_24", "linear_block")},
            "all_reduce": code.count("all_reduce"),
        }))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
