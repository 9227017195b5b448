"""The compressed 2:4 layout (see docs/formats.md for the bit layout).

A weight W of shape [N, K] (nn.Linear's [out_features, in_features]) is 2:4 along K when every
group of four consecutive inputs W[n, 4g:4g+4] holds at most two nonzeros. Only exact zeros count:
NaN, Inf and -0.0 behave as IEEE says (NaN != 0 is kept, -0.0 == 0 may be dropped).

Compressed form, built once at compile time:

    values: [2, N, K/4], W's dtype.  values[s, n, g] = W[n, 4g + i_s], slot 0 the lower position.
    meta:   [ceil(N/2), K/4], uint8. The 4-bit code of group (n, g) is i0 | i1 << 2 (0 <= i0 < i1 <= 3);
            rows 2r and 2r+1 share byte meta[r, g]: low nibble for the even row, high for the odd.

Groups with fewer than two nonzeros keep zeros in the free slots (positions taken in ascending
order), so every group has exactly two (position, value) pairs. Per group of four bf16 weights:
two values (4 bytes) and one 4-bit code (0.5 byte), 4.5 bytes against 8 dense (0.5625x).

The gemv layout (to_gemv_layout; what the M = 1 kernel reads, same bytes, K % 16 == 0):

    values: as above, except int8 values are stored offset-binary, as uint8 v + 128 (v ^ 0x80).
    meta:   [ceil(N/2), K/16] int32 words. Word w of row pair r holds groups 4w..4w+3 of rows 2r and
            2r+1; for group 4w + j, bit fields of two bits at 2j, 8 + 2j, 16 + 2j, 24 + 2j hold i0
            and i1 of the even row, then i0 and i1 of the odd row. So (word >> 2j) & 0x03030303 has
            the four positions as bytes, and one multiply-add turns them into byte-permute selectors.

decompress_24 reads either layout (by meta's dtype).
"""
from __future__ import annotations

import torch

__all__ = ["is_24", "violations_24", "compress_24", "decompress_24", "mask_24", "to_gemv_layout",
           "from_gemv_layout", "gemv_layout_ok"]


def _groups(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 needs K % 4 == 0, got K={k}")
    return w.reshape(n, k // 4, 4)


def violations_24(w: torch.Tensor) -> int:
    """Number of groups of four (along K) with more than two nonzeros. K must be a multiple of 4."""
    return int(((_groups(w) != 0).sum(-1) > 2).sum())


def is_24(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.shape[1] % 4 == 0 and violations_24(w) == 0


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Boolean [N, K] mask of the positions the compressed form keeps (two per group)."""
    n, k = w.shape
    i0, i1 = _kept_positions(_groups(w))
    pos = torch.arange(4, device=w.device)
    m = (pos == i0.unsqueeze(-1)) | (pos == i1.unsqueeze(-1))
    return m.reshape(n, k)


def _kept_positions(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Nonzeros first, in ascending position; then zeros in ascending position. Take two, sorted.
    pos = torch.arange(4, device=g.device, dtype=torch.int64)
    key = (g == 0).to(torch.int64) * 4 + pos
    first2 = key.argsort(dim=-1)[..., :2].sort(dim=-1).values
    return first2[..., 0], first2[..., 1]


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (2:4 along K) -> (values [2, N, K/4], meta [ceil(N/2), K/4] uint8)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    g = _groups(w)
    bad = violations_24(w)
    if bad:
        raise ValueError(f"weight is not 2:4: {bad} group(s) of four have more than two nonzeros")
    n, kg, _ = g.shape
    i0, i1 = _kept_positions(g)
    v0 = g.gather(-1, i0.unsqueeze(-1)).squeeze(-1)
    v1 = g.gather(-1, i1.unsqueeze(-1)).squeeze(-1)
    values = torch.stack([v0, v1]).contiguous()
    code = (i0 | (i1 << 2)).to(torch.uint8)  # [N, K/4], values 0..15
    if n % 2:
        code = torch.cat([code, torch.zeros_like(code[:1])])
    meta = (code[0::2] | (code[1::2] << 4)).contiguous()
    return values, meta


def gemv_layout_ok(k: int) -> bool:
    """Whether a weight with K inputs has a gemv layout (whole 32-bit meta words: K % 16 == 0)."""
    return k % 16 == 0 and k > 0


def to_gemv_layout(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compress_24's (values, meta) -> the gemv layout (module docstring): int8 values as uint8
    v + 128, meta as int32 words with the positions regrouped. Exact; from_gemv_layout inverts it."""
    r, g = meta.shape
    if meta.dtype != torch.uint8 or g % 4:
        raise ValueError(f"gemv layout: needs uint8 meta with K/4 % 4 == 0, got {meta.dtype} {tuple(meta.shape)}")
    m = meta.to(torch.int64).reshape(r, g // 4, 4)
    j = 2 * torch.arange(4, device=meta.device)
    w = (((m & 3) << j) | (((m >> 2) & 3) << (8 + j)) | (((m >> 4) & 3) << (16 + j))
         | (((m >> 6) & 3) << (24 + j))).sum(-1)
    words = torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32).contiguous()
    if values.dtype == torch.int8:
        values = (values.view(torch.uint8) ^ 0x80).contiguous()
    return values, words


def from_gemv_layout(values: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gemv layout -> compress_24's (values, meta)."""
    r, gw = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    j = 2 * torch.arange(4, device=words.device)
    f = lambda base: (w.unsqueeze(-1) >> (base + j)) & 3  # noqa: E731  [r, gw, 4]
    meta = (f(0) | (f(8) << 2) | (f(16) << 4) | (f(24) << 6)).reshape(r, 4 * gw).to(torch.uint8).contiguous()
    if values.dtype == torch.uint8:
        values = (values ^ 0x80).view(torch.int8).contiguous()
    return values, meta


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of compress_24 (or of to_gemv_layout after it): the dense [N, K] weight, zeros where
    nothing is kept."""
    if meta.dtype == torch.int32:
        values, meta = from_gemv_layout(values, meta)
    _, n, kg = values.shape
    m = meta.to(torch.int64)
    code = torch.stack([m & 0xF, m >> 4], dim=1).reshape(-1, kg)[:n]  # [N, K/4]
    i0, i1 = code & 3, code >> 2
    out = values.new_zeros(n, kg, 4)
    out.scatter_(-1, i0.unsqueeze(-1), values[0].unsqueeze(-1))
    out.scatter_(-1, i1.unsqueeze(-1), values[1].unsqueeze(-1))
    return out.reshape(n, kg * 4)
