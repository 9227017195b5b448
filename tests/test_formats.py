"""The compressed weight formats (sparse_inductor/formats/): round trips, layouts and errors.

Expectations are written from the layout spec in the module docstrings, with independent
(loop-based) helpers where a test needs an expected layout, never by calling the code under test.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_inductor.formats import (
    BLOCK_SIZES, block_nonzero_map, compress_24, compress_block, decompress_24, decompress_block,
    is_24, mask_24, violations_24,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The 11 subsets of at most two of the four positions of a group, and the 6 two-element ones.
SUBSETS = [s for r in range(3) for s in itertools.combinations(range(4), r)]
PAIRS = list(itertools.combinations(range(4), 2))
SPECIALS = (float("nan"), float("inf"), float("-inf"))


def code_of(i0: int, i1: int) -> int:
    """The 4-bit code of a group, from the spec: i0 | i1 << 2."""
    return i0 | (i1 << 2)


def expected_positions(group: list[float]) -> tuple[int, int]:
    """The spec's kept positions: nonzeros in ascending order, then zeros in ascending order."""
    nz = [p for p, v in enumerate(group) if v != 0]  # NaN != 0 is True: NaN is a nonzero
    z = [p for p, v in enumerate(group) if not v != 0]
    i0, i1 = sorted((nz + z)[:2])
    return i0, i1


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exactly equal, NaN where NaN (and -0.0 == 0.0, as the spec allows)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- 2:4

@st.composite
def weights_24(draw):
    """A 2:4 weight: per group a subset of <= 2 positions holding values (NaN/Inf/0 included)."""
    n = draw(st.integers(1, 7))  # odd N included: meta pads the last byte
    kg = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    values = st.one_of(st.sampled_from(SPECIALS + (0.0, -0.0)),
                       st.floats(-1e3, 1e3, allow_nan=False, width=32))
    rows = []
    for _ in range(n):
        row = []
        for _ in range(kg):
            group = [0.0] * 4
            for p in draw(st.sampled_from(SUBSETS)):
                group[p] = draw(values)
            row.extend(group)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32).to(dtype)


@settings(max_examples=150, deadline=None)
@given(weights_24())
def test_24_round_trip(w):
    values, meta = compress_24(w)
    n, k = w.shape
    assert values.shape == (2, n, k // 4) and values.dtype == w.dtype
    assert meta.shape == (math.ceil(n / 2), k // 4) and meta.dtype == torch.uint8
    assert values.is_contiguous() and meta.is_contiguous()
    same(decompress_24(values, meta), w)
    # every NaN and Inf of the weight is kept, at its position
    out = decompress_24(values, meta)
    assert torch.equal(torch.isnan(out), torch.isnan(w))
    assert torch.equal(torch.isinf(out), torch.isinf(w))
    # the codes and values follow the spec, group by group
    wl = w.float().tolist()
    for r in range(n):
        for g in range(k // 4):
            i0, i1 = expected_positions(wl[r][4 * g:4 * g + 4])
            nibble = (int(meta[r // 2, g]) >> (4 * (r % 2))) & 0xF
            assert nibble == code_of(i0, i1), (r, g)
            same(values[:, r, g], w[r, [4 * g + i0, 4 * g + i1]])
    if n % 2:  # the odd row's partner nibble is zero
        assert int((meta[-1] >> 4).max()) == 0
    # mask_24 marks exactly the two kept positions per group
    m = mask_24(w)
    assert m.dtype == torch.bool and m.shape == w.shape
    assert torch.equal(m.reshape(n, k // 4, 4).sum(-1), torch.full((n, k // 4), 2))
    assert bool(((w != 0) <= m).all())  # every nonzero (NaN included) is kept


@pytest.mark.parametrize("i0,i1", PAIRS)
def test_24_every_code(i0, i1):
    """Each of the 6 codes, in both nibbles (even row low, odd row high)."""
    w = torch.zeros(2, 8)
    w[0, i0], w[0, i1] = 1.5, -2.5  # group 0 of row 0: the code under test
    w[1, 4 + i0], w[1, 4 + i1] = 3.0, 4.0  # group 1 of row 1
    w[1, 0], w[1, 3] = 7.0, 8.0  # row 1, group 0: code (0, 3) = 12
    values, meta = compress_24(w)
    code = code_of(i0, i1)
    assert code in (4, 8, 12, 9, 13, 14)
    assert int(meta[0, 0]) == code | (code_of(0, 3) << 4)
    assert int(meta[0, 1]) == code_of(0, 1) | (code << 4)  # row 0 group 1 is empty: (0, 1)
    assert values[:, 0, 0].tolist() == [1.5, -2.5]
    assert values[:, 1, 1].tolist() == [3.0, 4.0]
    same(decompress_24(values, meta), w)


@pytest.mark.parametrize("nonzeros", [(), (0,), (1,), (2,), (3,)] + PAIRS, ids=str)
def test_24_groups_with_few_nonzeros(nonzeros):
    """0, 1 or 2 nonzeros: free slots take zeros at the lowest free positions."""
    w = torch.zeros(1, 4)
    for j, p in enumerate(nonzeros):
        w[0, p] = 10.0 + j
    values, meta = compress_24(w)
    i0, i1 = expected_positions(w[0].tolist())
    assert int(meta[0, 0]) == code_of(i0, i1)
    assert values[:, 0, 0].tolist() == [w[0, i0].item(), w[0, i1].item()]
    same(decompress_24(values, meta), w)
    # spelled out for the single-nonzero cases
    expect = {(): (0, 1), (0,): (0, 1), (1,): (0, 1), (2,): (0, 2), (3,): (0, 3)}
    if nonzeros in expect:
        assert (i0, i1) == expect[nonzeros]


def test_24_meta_nibbles_layout():
    """meta[r, g] = code(2r, g) | code(2r + 1, g) << 4, across several row pairs and groups."""
    n, kg = 5, 3
    w = torch.zeros(n, 4 * kg)
    codes = {}
    for r in range(n):
        for g in range(kg):
            i0, i1 = PAIRS[(r * kg + g) % len(PAIRS)]
            w[r, 4 * g + i0] = 1.0 + r
            w[r, 4 * g + i1] = -1.0 - g
            codes[r, g] = code_of(i0, i1)
    _, meta = compress_24(w)
    assert meta.shape == (3, kg)
    for r in range(3):
        for g in range(kg):
            low = codes[2 * r, g]
            high = codes.get((2 * r + 1, g), 0)  # N = 5: the last byte has no odd row
            assert int(meta[r, g]) == low | (high << 4), (r, g)


def test_24_all_zero_and_negative_zero():
    w = torch.zeros(3, 8)
    values, meta = compress_24(w)
    assert torch.count_nonzero(values) == 0
    assert int(meta[0, 0]) == code_of(0, 1) | (code_of(0, 1) << 4)
    assert int(meta[1, 0]) == code_of(0, 1)
    same(decompress_24(values, meta), w)
    w = torch.tensor([[-0.0, 0.0, -0.0, 0.0]])
    same(decompress_24(*compress_24(w)), w)  # -0.0 may come back as +0.0 (equal as floats)


def test_24_errors():
    with pytest.raises(ValueError, match="not 2:4: 1 group"):
        compress_24(torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))
    nan3 = torch.tensor([[float("nan"), float("nan"), 1.0, 0.0]])  # NaN counts as a nonzero
    with pytest.raises(ValueError, match="not 2:4"):
        compress_24(nan3)
    with pytest.raises(ValueError, match="K % 4 == 0, got K=6"):
        compress_24(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="2-D"):
        compress_24(torch.zeros(8))
    assert violations_24(torch.ones(3, 8)) == 6
    assert violations_24(nan3) == 1
    with pytest.raises(ValueError, match="K % 4"):
        violations_24(torch.zeros(2, 5))
    assert is_24(torch.zeros(2, 8)) and not is_24(torch.zeros(2, 6)) and not is_24(torch.zeros(8))
    assert not is_24(torch.ones(1, 4)) and is_24(torch.tensor([[0.0, 1.0, 0.0, 1.0]]))


# ---------------------------------------------------------------- blocks

def expected_block_map(w: torch.Tensor, b: int) -> list[list[bool]]:
    n, k = w.shape
    return [[bool((w[r * b:(r + 1) * b, c * b:(c + 1) * b] != 0).any()) for c in range(math.ceil(k / b))]
            for r in range(math.ceil(n / b))]


@st.composite
def block_weights(draw):
    b = draw(st.sampled_from(BLOCK_SIZES))
    nb, kb = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    # ragged: the last block row / column may be cut short
    n = nb * b - draw(st.integers(0, b - 1))
    k = kb * b - draw(st.integers(0, b - 1))
    keep = draw(st.lists(st.booleans(), min_size=nb * kb, max_size=nb * kb))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(nb * b, kb * b, generator=g)
    w = w * (torch.rand(w.shape, generator=g) < draw(st.sampled_from([0.02, 0.5, 1.0])))  # zeros inside blocks too
    mask = torch.tensor(keep).reshape(nb, 1, kb, 1).expand(nb, b, kb, b).reshape(nb * b, kb * b)
    w = (w * mask)[:n, :k]
    for _ in range(draw(st.integers(0, 3))):  # NaN / Inf somewhere
        w[draw(st.integers(0, n - 1)), draw(st.integers(0, k - 1))] = draw(st.sampled_from(SPECIALS))
    return w.to(dtype), b


@settings(max_examples=60, deadline=None)
@given(block_weights())
def test_block_round_trip(wb):
    w, b = wb
    n, k = w.shape
    nb, kb = math.ceil(n / b), math.ceil(k / b)
    bs = compress_block(w, b)
    same(decompress_block(bs.blocks, bs.row_ptr, bs.col_idx, n, k), w)

    expect = expected_block_map(w, b)
    assert block_nonzero_map(w, b).tolist() == expect
    nnz = [(r, c) for r in range(nb) for c in range(kb) if expect[r][c]]
    assert bs.blocks.shape == (len(nnz), b, b) and bs.blocks.dtype == w.dtype
    for t in (bs.row_ptr, bs.col_idx, bs.row_order):
        assert t.dtype == torch.int32
    counts = [sum(row) for row in expect]
    assert bs.row_ptr.tolist() == [sum(counts[:r]) for r in range(nb + 1)]
    assert bs.col_idx.tolist() == [c for _, c in nnz]  # by block row, ascending column
    # row_order: descending count, ties by index
    assert bs.row_order.tolist() == sorted(range(nb), key=lambda r: (-counts[r], r))
    # each stored block is the weight's block (zero padded at ragged edges)
    wp = torch.zeros(nb * b, kb * b, dtype=w.dtype)
    wp[:n, :k] = w
    for i, (r, c) in enumerate(nnz):
        same(bs.blocks[i], wp[r * b:(r + 1) * b, c * b:(c + 1) * b])


@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_block_all_zero_and_empty_rows(b):
    w = torch.zeros(2 * b + 3, b + 1)
    bs = compress_block(w, b)
    assert bs.blocks.shape == (0, b, b) and bs.col_idx.numel() == 0
    assert bs.row_ptr.tolist() == [0, 0, 0, 0]
    same(decompress_block(bs.blocks, bs.row_ptr, bs.col_idx, *w.shape), w)
    # only the middle block row and the ragged last block column hold anything
    w[b + 5, b] = 2.0
    bs = compress_block(w, b)
    assert bs.row_ptr.tolist() == [0, 0, 1, 1] and bs.col_idx.tolist() == [1]
    assert bs.row_order.tolist() == [1, 0, 2]
    same(decompress_block(bs.blocks, bs.row_ptr, bs.col_idx, *w.shape), w)


def test_block_errors():
    with pytest.raises(ValueError, match="block size must be one of"):
        compress_block(torch.zeros(16, 16), 8)
    with pytest.raises(ValueError, match="2-D"):
        compress_block(torch.zeros(16), 16)
