"""CUTLASS's sm90 2:4 layout: the compressed weight its sparse GEMM reads (docs/formats.md,
"CUTLASS sm90 2:4 layout"). Pure tensor code, on any device; the same bytes as CUTLASS's own
compressor (`cutlass/transform/kernel/sm90_sparse_gemm_compressor.hpp`), which the tests check:
against a host port of that kernel built with the generated library (CPU) and against the device
kernel itself (GPU).

W [N, K] row-major (the sparse A of the swapped GEMM), 2:4 along K. With `bits` the element width
(16: bf16 / fp16, 8: int8 / fp8 e4m3) and T = min(tile K, 128) of the kernel (`layout_tile_k`):

values [N, Kv] W's dtype, Kv = round_up(K, A) / 2 with A = 16 (16-bit) or 32 (8-bit): row-major,
       the two values of group g of row n at columns 2g, 2g + 1 (zeros past K).
meta   [Me, Ke] uint8, Me = round_up(N, 64), Ke = round_up(K, T) / 8: one 4-bit code per group,
       i0 | i1 << 2 (the two positions of the values, 0 <= i0 <= i1 <= 3), two groups to a byte
       (group 2j in the low nibble of byte j of the row), the bytes permuted into CuTe's metadata
       atoms: `meta_byte_offsets` (the layout `Sm90GemmSparseConfig::fill_layoutE`, in bytes).

Which positions a group keeps (the compressor's rules, which decide what the tensor core reads):
two nonzeros: both, in order; one nonzero at position p < 3: (p, 3) with a zero in the second
slot; one at 3: (0, 3) with a zero in the first; none: (0, 0), both values zero. A nonzero is a
value whose bits are not all zero after the sign bit is dropped for floating types (so -0.0 is a
zero, NaN and Inf are kept).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["layout_tile_k", "compressed_shape", "meta_byte_offsets", "compress", "decompress",
           "selected_positions", "element_bits"]

_FLOAT_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float8_e4m3fn: 8}
_INT_BITS = {torch.int8: 8}
_VIEW = {16: torch.int16, 8: torch.int8}
_ATOM_M = 64  # TensorEAtomM: 8 x 2 x 4 rows (16-bit) or 64 (8-bit)


def element_bits(dtype: torch.dtype) -> int:
    bits = _FLOAT_BITS.get(dtype) or _INT_BITS.get(dtype)
    if bits is None:
        raise ValueError(f"CUTLASS sm90 2:4 layout: dtype {dtype} not supported (bf16, fp16, int8, float8_e4m3fn)")
    return bits


def layout_tile_k(tile_k: int) -> int:
    """The metadata atom's K extent for a kernel of tile K `tile_k` (CollectiveBuilder's MinTileShapeK)."""
    return min(tile_k, 128)


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def compressed_shape(n: int, k: int, dtype: torch.dtype, tile_k: int = 128) -> tuple[tuple[int, int], tuple[int, int]]:
    """((values rows, cols), (meta rows, bytes per row)) for W [n, k] (get_tensorA_*_physical and
    get_metadata_*_physical of CUTLASS's StructuredSparseCompressorUtility)."""
    bits = element_bits(dtype)
    t = layout_tile_k(tile_k)
    align_k = 16 if bits == 16 else 32
    return (n, _round_up(k, align_k) // 2), (_round_up(n, _ATOM_M), _round_up(k, t) // 8)


def meta_byte_offsets(me: int, ke: int, bits: int, tile_k: int = 128) -> torch.Tensor:
    """[me, ke] int64: where metadata byte (row m, byte kb of the row, i.e. logical K 8 kb..8 kb + 7)
    lives in the buffer. CuTe's layout (`Sm90GemmSparseConfig`, sm90_sparse_config.inl), in
    logical K elements, then divided by the 8 elements a byte covers:

    16-bit: atom ((8, 2, 4), (16, 2, T/32)) with strides ((2T, 16, 16T), (1, 8T, 32)), i.e.
            make_ordered_layout with steps ((3, 1, 5), (0, 4, 2)); T = tile_k
     8-bit: atom (64, T) row-major (strides (T, 1))
    atoms: column-major over the (me / 64, Ke / T) grid, strides (64 T, me T).
    """
    t = layout_tile_k(tile_k)
    m = torch.arange(me).view(-1, 1)
    k = (torch.arange(ke) * 8).view(1, -1)
    mt, mi = m // _ATOM_M, m % _ATOM_M
    kt, ki = k // t, k % t
    if bits == 16:
        num_k = t // 32
        m0, m1, m2 = mi % 8, (mi // 8) % 2, mi // 16
        k0, k1, k2 = ki % 16, (ki // 16) % 2, ki // 32
        inner = k0 + 16 * m1 + 32 * k2 + 32 * num_k * m0 + 256 * num_k * k1 + 512 * num_k * m2
    else:
        inner = mi * t + ki
    off = inner + (_ATOM_M * t) * mt + (me * t) * kt
    return off // 8


def _nonzero(bits_view: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in _FLOAT_BITS:  # the sign bit dropped: -0.0 is a zero
        mask = 0x7FFF if _FLOAT_BITS[dtype] == 16 else 0x7F
        return (bits_view & mask) != 0
    return bits_view != 0


def _slots(w: torch.Tensor):
    """Per group: (positions [N, G, 2] int64, value bits [N, G, 2]) by the compressor's rules."""
    n, k = w.shape
    bits = element_bits(w.dtype)
    v = w.contiguous().view(_VIEW[bits]).reshape(n, k // 4, 4)
    nz = _nonzero(v, w.dtype)
    cnt = nz.sum(-1)
    if bool((cnt > 2).any()):
        bad = int((cnt > 2).sum())
        raise ValueError(f"W is not 2:4 along K: {bad} of {cnt.numel()} groups of four have more than two nonzeros")
    pos = torch.arange(4, device=w.device)
    big = torch.full_like(nz, 4, dtype=torch.int64)
    first = torch.where(nz, pos, big).min(-1).values  # 4 where the group is empty
    second = torch.where(nz & (pos > first.unsqueeze(-1)), pos, big).min(-1).values
    i0 = torch.where(cnt == 2, first, torch.where((cnt == 1) & (first < 3), first, torch.zeros_like(first)))
    i1 = torch.where(cnt == 2, second, torch.where(cnt == 1, torch.full_like(first, 3), torch.zeros_like(first)))
    zero = torch.zeros((), dtype=v.dtype, device=w.device)
    g0 = torch.gather(v, -1, i0.unsqueeze(-1)).squeeze(-1)
    g1 = torch.gather(v, -1, i1.unsqueeze(-1)).squeeze(-1)
    # slot 0 holds a value only where it is a kept nonzero; a lone nonzero at 3 sits in slot 1
    s0 = torch.where((cnt == 2) | ((cnt == 1) & (first < 3)), g0, zero)
    s1 = torch.where((cnt == 2) | ((cnt == 1) & (first == 3)), g1, zero)
    return torch.stack([i0, i1], -1), torch.stack([s0, s1], -1)


def compress(w: torch.Tensor, tile_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (2:4 along K, K % 4 == 0) -> (values [N, Kv], meta [Me, Ke] uint8), on W's device."""
    if w.dim() != 2:
        raise ValueError(f"W must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 needs K % 4 == 0, got K={k}")
    bits = element_bits(w.dtype)
    (vr, vc), (me, ke) = compressed_shape(n, k, w.dtype, tile_k)
    idx, vals = _slots(w)
    g = k // 4
    values = torch.zeros(vr, vc, dtype=_VIEW[bits], device=w.device)
    values[:, : 2 * g] = vals.reshape(n, 2 * g)
    codes = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int32)  # [N, G]
    # two groups to a byte (group 2j low nibble); K past the last group stays zero
    padded = torch.zeros(me, ke * 2, dtype=torch.int32, device=w.device)
    padded[:n, :g] = codes
    logical = (padded[:, 0::2] | (padded[:, 1::2] << 4)).to(torch.uint8)  # [me, ke]
    meta = torch.zeros(me * ke, dtype=torch.uint8, device=w.device)
    offsets = meta_byte_offsets(me, ke, bits, tile_k).to(w.device)
    meta[offsets.reshape(-1)] = logical.reshape(-1)
    return values.view(w.dtype), meta.view(me, ke)


def selected_positions(values: torch.Tensor, meta: torch.Tensor, n: int, k: int,
                       tile_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """What the tensor core multiplies: (vals [N, K/2] as stored, k indices [N, K/2] int64) for
    W's row n, i.e. y[m, n] = sum_j vals[n, j] * x[m, idx[n, j]] (a slot's zero included: it still
    reads its x)."""
    bits = element_bits(values.dtype)
    (vr, vc), (me, ke) = compressed_shape(n, k, values.dtype, tile_k)
    if tuple(values.shape) != (vr, vc) or tuple(meta.shape) != (me, ke):
        raise ValueError(f"compressed shapes {tuple(values.shape)}, {tuple(meta.shape)}: expected {(vr, vc)}, {(me, ke)}")
    g = k // 4
    offsets = meta_byte_offsets(me, ke, bits, tile_k).to(meta.device)
    logical = meta.reshape(-1)[offsets.reshape(-1)].view(me, ke).to(torch.int64)
    codes = torch.stack([logical & 0xF, logical >> 4], -1).reshape(me, 2 * ke)[:n, :g]  # [N, G]
    i0, i1 = codes & 3, codes >> 2
    base = torch.arange(g, device=meta.device).view(1, -1) * 4
    idx = torch.stack([base + i0, base + i1], -1).reshape(n, 2 * g)
    return values[:, : 2 * g], idx


def decompress(values: torch.Tensor, meta: torch.Tensor, n: int, k: int, tile_k: int = 128,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W [N, K] back from the compressed form (exact: the kept bits, zeros elsewhere)."""
    vals, idx = selected_positions(values, meta, n, k, tile_k)
    bits = element_bits(values.dtype)
    w = torch.zeros(n, k, dtype=_VIEW[bits], device=values.device) if out is None else out.view(_VIEW[bits]).zero_()
    v = vals.contiguous().view(_VIEW[bits])
    # a group with an empty slot selects a position twice ((0, 0)) or a zero slot: the nonzero
    # one must win, so scatter the zeros first
    order = (v == 0).to(torch.int8)
    for keep in (1, 0):
        sel = order == keep
        rows = torch.arange(n, device=values.device).view(-1, 1).expand_as(idx)
        w[rows[sel], idx[sel]] = v[sel]
    return w.view(values.dtype)
