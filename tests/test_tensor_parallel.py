"""backend="sparse" on a block sharded with tensor parallelism (DTensor, ColwiseParallel /
RowwiseParallel): two CPU processes on gloo (tests/tp_worker.py). Each rank's local shard is
detected on its own (2:4 along N or K, block-sparse along its local K) and the outputs match the
unsharded model (docs/tensor-parallel.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from test_backend import REPO, assert_close_fp64

WORLD = 2
TIMEOUT_S = 300  # both ranks compile on a shared machine; gloo's own timeout is 120 s


def _run_ranks(tmp_path) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "tp_worker.py"), str(r), str(WORLD), str(store)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(WORLD)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, err[-4000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.compat
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_tensor_parallel_block(tmp_path):
    results = _run_ranks(tmp_path)
    assert [r["rank"] for r in results] == list(range(WORLD))
    expected = [  # every rank's local shards: [name, (N, K) of the shard, pattern, kernel]
        ["attn.q", [16, 32], "2:4", "reference"],   # colwise: N / 2
        ["attn.k", [16, 32], "block", "reference"],  # colwise: half of each rank's blocks zero
        ["attn.v", [16, 32], "dense", "dense"],
        ["attn.o", [32, 16], "2:4", "reference"],   # rowwise: K / 2, still 2:4 along K
        ["fc1", [32, 32], "2:4", "reference"],
        ["fc2", [32, 32], "block", "reference"],     # rowwise: block-sparse along its local K
    ]
    for r in results:
        assert not r["notes"], r["notes"]
        # two compiles: batch 2, then a dynamic batch at 3
        assert sorted(r["decisions"]) == sorted(expected * 2), r["decisions"]
        assert r["ops"] == {"linear_24": 6, "linear_block": 4} and r["all_reduce"] >= 4, (r["ops"], r["all_reduce"])
        for out, ref in zip(r["outs"], r["refs"]):
            assert_close_fp64(torch.tensor(out), torch.tensor(ref, dtype=torch.float64), torch.float32)
    assert results[0]["outs"] == results[1]["outs"]  # replicated after the rowwise all-reduce


def test_freezing_drops_only_unused_opaque_pieces():
    """_compat.freezing_skips_unused_opaque_inputs on a plain graph: inside the block an unused
    non-tensor input is dropped, a used one still fails as in torch, a tensor becomes a constant;
    after the block torch's function is back."""
    import torch._inductor.freezing as freezing

    from sparse_inductor import _compat

    original = freezing.replace_node_with_constant
    g = torch.fx.Graph()
    x, unused, used, w = (g.placeholder(n) for n in ("x", "unused", "used", "w"))
    g.output(g.call_function(torch.add, (x, w)))
    g.call_function(print, (used,))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    mesh_like = object()
    with _compat.freezing_skips_unused_opaque_inputs():
        freezing.replace_node_with_constant(gm, unused, mesh_like)
        with pytest.raises(TypeError, match="cannot assign"):
            freezing.replace_node_with_constant(gm, used, mesh_like)
        freezing.replace_node_with_constant(gm, w, torch.ones(2))
    assert freezing.replace_node_with_constant is original
    assert "unused" not in [n.name for n in gm.graph.nodes]
    assert [n.op for n in gm.graph.nodes if n.name == "w"] == ["get_attr"]
