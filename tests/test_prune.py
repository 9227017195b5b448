"""prune(): the demo helper that makes 2:4 and block-sparse weights (sparse_inductor/prune.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparse_inductor
from sparse_inductor.formats import block_nonzero_map, is_24
from sparse_inductor.prune import prune_24_, prune_blocks_


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 64, bias=False)
        self.odd = nn.Linear(30, 64)  # K % 4 != 0 and not a multiple of any block size
        self.conv = nn.Conv1d(4, 4, 1)  # not a linear: never touched


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_24_makes_exact_24_weights():
    m, ref = net(), net()
    done = sparse_inductor.prune(m, "2:4")
    assert done == ["a", "b"]
    for name in done:
        w, w0 = getattr(m, name).weight, getattr(ref, name).weight
        assert is_24(w)
        # exactly two nonzeros per group (random weights have no zeros), the two largest |w|
        g, g0 = w.detach().reshape(w.shape[0], -1, 4), w0.detach().reshape(w.shape[0], -1, 4)
        assert bool(((g != 0).sum(-1) == 2).all())
        kept = g0.abs().topk(2, dim=-1).values.sum(-1)
        torch.testing.assert_close(g.abs().sum(-1), kept, rtol=0, atol=0)
        torch.testing.assert_close(w[w != 0], w0[w != 0], rtol=0, atol=0)  # values unchanged
    torch.testing.assert_close(m.odd.weight, ref.odd.weight, rtol=0, atol=0)
    torch.testing.assert_close(m.a.bias, ref.a.bias, rtol=0, atol=0)
    torch.testing.assert_close(m.conv.weight, ref.conv.weight, rtol=0, atol=0)


@pytest.mark.parametrize("block,sparsity", [(16, 0.9), (32, 0.5), (64, 0.75), (16, 0.0), (32, 1.0)])
def test_block_zeroes_that_fraction_of_blocks(block, sparsity):
    m, ref = net(), net()
    done = sparse_inductor.prune(m, "block", block=block, sparsity=sparsity)
    assert done == ["a", "b"]
    for name in done:
        w, w0 = getattr(m, name).weight.detach(), getattr(ref, name).weight.detach()
        nz = block_nonzero_map(w, block)
        total = nz.numel()
        assert int((~nz).sum()) == round(sparsity * total)
        # the zeroed blocks are the ones with the smallest L2 norm
        norms = w0.reshape(w0.shape[0] // block, block, -1, block).pow(2).sum((1, 3))
        if 0 < int(nz.sum()) < total:
            assert float(norms[nz].min()) >= float(norms[~nz].max())
        # the kept blocks keep their values
        torch.testing.assert_close(w[w != 0], w0[w != 0], rtol=0, atol=0)


def test_filter_fn():
    m, ref = net(), net()
    seen = []

    def only_b(mod, name):
        seen.append(name)
        return name == "b"

    assert sparse_inductor.prune(m, "2:4", filter_fn=only_b) == ["b"]
    assert set(seen) == {"a", "b", "odd"}  # called with every nn.Linear, and nothing else
    assert is_24(m.b.weight) and not is_24(m.a.weight)
    torch.testing.assert_close(m.a.weight, ref.a.weight, rtol=0, atol=0)
    assert sparse_inductor.prune(net(), "block", block=32, filter_fn=lambda mod, name: name == "a") == ["a"]


def test_filter_fn_on_a_layer_that_does_not_fit():
    with pytest.raises(ValueError, match=r"K % 4 == 0"):
        sparse_inductor.prune(net(), "2:4", filter_fn=lambda mod, name: name == "odd")
    with pytest.raises(ValueError, match="not a multiple of the block size 16"):
        sparse_inductor.prune(net(), "block", block=16, filter_fn=lambda mod, name: name == "odd")


def test_bad_pattern():
    with pytest.raises(ValueError, match="pattern must be"):
        sparse_inductor.prune(net(), "4:8")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_in_place(dtype):
    w = torch.randn(16, 32).to(dtype)
    ptr = w.data_ptr()
    assert prune_24_(w) is w and w.data_ptr() == ptr and is_24(w)
    w = torch.randn(32, 32).to(dtype)
    prune_blocks_(w, 16, 0.5)
    assert w.dtype == dtype and int((~block_nonzero_map(w, 16)).sum()) == 2
