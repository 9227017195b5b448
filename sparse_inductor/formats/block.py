"""The packed block-sparse layout (see docs/formats.md).

A weight W [N, K] is cut into square b x b blocks (b in 16, 32, 64, 128); ragged edges are padded
with zeros to whole blocks (Nb = ceil(N / b), Kb = ceil(K / b)). A block counts as nonzero when
any of its entries is not exactly zero (NaN and Inf count as nonzero).

Compressed form, built once at compile time (a BSR variant):

    blocks:    [nnzb, b, b], W's dtype, row-major inside a block; blocks of block-row r are
               blocks[row_ptr[r]:row_ptr[r+1]], in ascending block column.
    row_ptr:   [Nb + 1], int32.
    col_idx:   [nnzb], int32, the block column of each block.
    row_order: [Nb], int32, block rows by descending nonzero count (ties by index): a kernel that
               walks rows in this order starts the longest work first.

So blocks[i][r, c] = W[rb * b + r, col_idx[i] * b + c] for the block row rb that holds i.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["BLOCK_SIZES", "BlockSparse", "block_nonzero_map", "compress_block", "decompress_block"]

BLOCK_SIZES = (16, 32, 64, 128)


class BlockSparse(NamedTuple):
    blocks: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    row_order: torch.Tensor


def _padded(w: torch.Tensor, b: int) -> torch.Tensor:
    n, k = w.shape
    pn, pk = math.ceil(n / b) * b - n, math.ceil(k / b) * b - k
    if pn or pk:
        w = torch.nn.functional.pad(w, (0, pk, 0, pn))
    return w


def block_nonzero_map(w: torch.Tensor, b: int) -> torch.Tensor:
    """Boolean [ceil(N/b), ceil(K/b)]: which b x b blocks hold a nonzero."""
    wp = _padded(w, b)
    nb, kb = wp.shape[0] // b, wp.shape[1] // b
    return (wp.reshape(nb, b, kb, b) != 0).any(dim=3).any(dim=1)


def compress_block(w: torch.Tensor, b: int) -> BlockSparse:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if b not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {b}")
    wp = _padded(w, b)
    nb, kb = wp.shape[0] // b, wp.shape[1] // b
    tiles = wp.reshape(nb, b, kb, b).permute(0, 2, 1, 3)  # [Nb, Kb, b, b]
    nz = (tiles != 0).flatten(2).any(-1)  # [Nb, Kb]
    rows, cols = nz.nonzero(as_tuple=True)  # row-major order: by block row, then column
    blocks = tiles[rows, cols].contiguous()
    counts = nz.sum(1)
    row_ptr = torch.zeros(nb + 1, dtype=torch.int32, device=w.device)
    row_ptr[1:] = counts.cumsum(0).to(torch.int32)
    # stable sort on -count keeps ties in index order
    row_order = torch.sort(-counts, stable=True).indices.to(torch.int32)
    return BlockSparse(blocks, row_ptr, cols.to(torch.int32).contiguous(), row_order.contiguous())


def decompress_block(blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of compress_block: the dense [N, K] weight."""
    b = blocks.shape[-1]
    nb, kb = row_ptr.numel() - 1, math.ceil(k / b)
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(nb, device=blocks.device), counts)
    tiles = blocks.new_zeros(nb, kb, b, b)
    tiles[rows, col_idx.to(torch.int64)] = blocks
    return tiles.permute(0, 2, 1, 3).reshape(nb * b, kb * b)[:n, :k]
