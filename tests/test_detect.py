"""detect(): which pattern a weight has, with which block size, and why (passes/detect.py)."""
from __future__ import annotations

import pytest
import torch

from sparse_inductor.options import SparseOptions
from sparse_inductor.passes.detect import detect
from sparse_inductor.prune import prune_24_, prune_blocks_

# detection of the weight as stored (the search behind a permutation: the tests at the end)
OPTS = SparseOptions(permute=False)


def w24(n=32, k=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return prune_24_(torch.randn(n, k, generator=g)).to(dtype)


def wblock(n, k, b, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    return prune_blocks_(torch.randn(n, k, generator=g), b, sparsity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_24(dtype):
    d = detect(w24(dtype=dtype), OPTS)
    assert d.pattern == "2:4"
    assert d.density == pytest.approx(0.5)
    assert "every group of four" in d.reason


@pytest.mark.parametrize("b", [16, 32, 64, 128])
def test_block_size_is_the_pruning_block(b):
    """A weight pruned in b x b blocks is read as b x b, not as a smaller size of equal density."""
    w = wblock(2 * 128, 2 * 128, b, 0.75)
    d = detect(w, OPTS)
    assert d.pattern == "block"
    assert d.block == b
    assert d.block_density == pytest.approx(0.25)
    assert d.density == pytest.approx(0.25)
    assert f"{b}x{b} blocks, 25.0% of blocks nonzero" in d.reason


def test_block_size_tolerates_holes_in_kept_blocks():
    """Zeros inside kept 64x64 blocks make the 16x16 density a little lower; still read as 64x64
    (within 25% of the lowest density), but not once the larger size is clearly worse."""
    w = wblock(256, 256, 64, 0.75)
    r, c = [int(i) * 64 for i in (w.reshape(4, 64, 4, 64) != 0).any(3).any(1).nonzero()[0]]
    w[r:r + 16, c:c + 16] = 0.0  # one 16x16 hole: 63/256 of 16x16 blocks vs 4/16 of 64x64 ones
    d = detect(w, OPTS)
    assert (d.pattern, d.block, d.block_density) == ("block", 64, 0.25)
    w = torch.zeros(256, 256)
    w[0:16, 0:16] = w[64:80, 64:80] = w[128:144, 128:144] = 1.0  # 3 of 256 vs 3 of 16
    d = detect(w, OPTS)
    assert (d.pattern, d.block) == ("block", 16)


def test_block_sizes_option():
    w = torch.zeros(64, 64)
    w[0:16, 0:16] = 1.0
    w[16:32, 16:32] = 2.0  # two 16x16 blocks (2 of 16), inside one 32x32 block (1 of 4)
    d = detect(w, OPTS)
    assert (d.pattern, d.block, d.block_density) == ("block", 16, 0.125)  # 0.25 > 1.25 * 0.125
    d = detect(w, SparseOptions(permute=False, block_sizes=(32,)))
    assert (d.pattern, d.block, d.block_density) == ("block", 32, 0.25)
    d = detect(w, SparseOptions(permute=False, block_sizes=(32,), max_block_density=0.2))
    assert d.pattern == "dense" and "25.0% of 32x32 blocks nonzero" in d.reason


def test_dense():
    d = detect(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), OPTS)
    assert d.pattern == "dense"
    assert d.density == 1.0
    assert "not 2:4 (512 of 512 groups of four have more than two nonzeros)" in d.reason
    assert "not block-sparse (100.0% of" in d.reason


def test_24_except_one_group():
    w = w24(16, 32)
    w[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    d = detect(w, OPTS)
    assert d.pattern == "dense"
    assert "1 of 128 groups of four have more than two nonzeros" in d.reason


def test_k_not_multiple_of_4():
    w = torch.zeros(16, 30)
    w[:, ::2] = 1.0  # would be "2 of 4" everywhere if K allowed groups
    d = detect(w, OPTS)
    assert d.pattern == "dense"
    assert "K=30 is not a multiple of 4" in d.reason
    # block sparsity does not need K % 4
    w = torch.zeros(32, 30)
    w[:16, :16] = 1.0
    d = detect(w, OPTS)
    assert d.pattern == "block" and d.block == 16 and d.block_density == pytest.approx(0.25)


def test_all_zero():
    d = detect(torch.zeros(64, 32), OPTS)
    assert d.pattern == "block"
    assert d.density == 0.0 and d.block_density == 0.0
    assert d.block == 64  # every size gives 0%: the largest that fits in the weight


def test_int8_weights_are_read():
    """int8 weights (weight-only quantized; the rewrite checks the convert to x's dtype) count zeros too."""
    w = w24()
    w = torch.where(w != 0, w.sign() * (w.abs() * 10 + 1), 0.0).to(torch.int8)
    d = detect(w, OPTS)
    assert d.pattern == "2:4" and d.density == pytest.approx(0.5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool])
def test_unsupported_dtypes(dtype):
    w = w24()
    w = torch.where(w != 0, w.sign() * (w.abs() * 10 + 1), 0.0).to(dtype)  # nonzeros stay nonzero
    d = detect(w, OPTS)
    assert d.pattern == "dense"
    assert f"dtype {str(dtype).replace('torch.', '')} is not supported" in d.reason
    assert d.density == pytest.approx(0.5)


def test_shapes_not_2d_or_empty():
    assert "not 2-D" in detect(torch.zeros(4, 4, 4), OPTS).reason
    assert "not 2-D" in detect(torch.zeros(16), OPTS).reason
    d = detect(torch.zeros(0, 16), OPTS)
    assert d.pattern == "dense" and "empty weight" in d.reason


def test_nan_counts_as_nonzero():
    w = w24(8, 16)
    w[0, 0:4] = torch.tensor([float("nan"), 0.0, float("nan"), 0.0])
    w[1, 0:4] = torch.tensor([float("inf"), 0.0, 0.0, 0.0])
    d = detect(w, OPTS)
    assert d.pattern == "2:4"
    # 2 per group, except row 1 group 0 (one Inf): NaN and Inf are nonzeros
    assert d.density == pytest.approx((2 * 32 - 1) / 128)
    # a third NaN breaks the group
    w[0, 1] = float("nan")
    d = detect(w, OPTS)
    assert d.pattern == "dense" and "1 of 32 groups" in d.reason
    # a NaN makes its block nonzero
    w = torch.zeros(32, 32)
    w[20, 20] = float("nan")
    d = detect(w, OPTS)
    assert d.pattern == "block" and d.block_density == pytest.approx(0.25) and d.block == 16


def test_patterns_option():
    both = wblock(64, 64, 16, 0.75)
    prune_24_(both)  # 2:4 and 25% of 16x16 blocks
    assert detect(both, OPTS).pattern == "block"  # fewer bytes than 2:4 at <= 50% of blocks
    d = detect(both, SparseOptions(permute=False, patterns=("2:4",)))
    assert d.pattern == "2:4"
    blk = wblock(64, 64, 16, 0.75)
    d = detect(blk, SparseOptions(permute=False, patterns=("2:4",)))
    assert d.pattern == "dense" and "block sparsity not requested" in d.reason
    d = detect(w24(), SparseOptions(permute=False, patterns=("block",)))
    assert d.pattern == "dense" and "2:4 not requested" in d.reason
    d = detect(w24(), SparseOptions(permute=False, patterns=()))
    assert d.pattern == "dense"


def test_max_block_density_option():
    w = wblock(64, 64, 16, 0.75)  # 25% of blocks
    d = detect(w, SparseOptions(permute=False, max_block_density=0.2))
    assert d.pattern == "dense"
    assert "25.0% of 16x16 blocks nonzero (max_block_density=0.2)" in d.reason
    assert detect(w, SparseOptions(permute=False, max_block_density=0.25)).pattern == "block"
    # between 50% and max_block_density, a 2:4 weight is read as 2:4 (2:4 moves fewer bytes)
    both = wblock(64, 64, 16, 0.25)  # 75% of blocks
    prune_24_(both)
    assert detect(both, SparseOptions(permute=False, max_block_density=0.8)).pattern == "2:4"
    not24 = wblock(64, 64, 16, 0.25)
    d = detect(not24, SparseOptions(permute=False, max_block_density=0.8))
    assert d.pattern == "block" and d.block_density == pytest.approx(0.75)
    assert detect(not24, OPTS).pattern == "dense"
