"""Sparsity hidden behind a permutation: find row and column orders that make a weight sparse.

A weight W [N, K] whose zeros form blocks (or 2:4 groups) only after its rows and columns are
reordered (channel-permutation pruning, models whose channels were shuffled) is searched for

    rows [N], cols [K] (int64 index vectors) with  Wp = W[rows][:, cols]

(a) block-sparse: square b x b blocks, b one of the allowed sizes, at most max_block_density of
    them nonzero; or
(b) exactly 2:4 along K: rows is the identity (2:4 is a property of each row on its own) and
    cols groups the K columns into quads with at most two nonzeros of every row in each.

Only exact zeros count (W != 0, as everywhere in formats/): a permutation reorders, never
prunes, and every result is verified on the permuted mask before it is returned. The linear is
then y[:, rows] = x[:, cols] @ Wp^T: the kernel reads x gathered at cols and writes its output
column n' at rows[n'] (lowering/triton_block.py, lowering/triton_24.py; docs/formats.md).

Block search. The columns of one original block column share their row support and the rows of
one block row share their column support, so grouping lines by support recovers the blocks:
 1. columns are grouped by their exact support (bit-packed columns, hashed, checked exactly);
 2. rows by their support over one representative column of each group (identical supports of
    different block columns fall in one group, which is harmless: they have the same rows);
 3. for each block size b, the row groups are cut into block rows (pack_lines); the columns are
    then grouped by their support over those block rows and cut into block columns;
 4. the block map of the permuted mask is computed exactly; the size is chosen as detect.py
    chooses (the largest within 25% of the lowest density).
pack_lines cuts each group into whole blocks and packs the remainders (groups that are not a
multiple of b: ragged edges, zeros inside kept blocks) into the remaining blocks, each where it adds
the fewest nonzero blocks; all-zero lines fill the gaps. On a scrambled block-sparse weight this
gives at most the original's nonzero blocks at the original's block size (tests/test_permute.py
holds it over random shapes, block sizes and densities).
Exact zeros inside kept blocks make the lines they fall in differ from their group: a damaged
line's support is then a subset of its group's, and a remainder whose support is a subset of a
larger remainder's joins it (at no cost); where many columns are damaged, the rows are keyed on
the groups of identical (so intact) columns only. If the result is still above
max_block_density, the search runs again with rows and columns swapped and one refinement round
(rows regrouped by the block columns found). With a few such zeros (0.2% of the entries) it
recovered the original block count in all but a few percent of small random cases and at
14336x4096.

2:4 search (best effort): a greedy over the columns, densest first: for column a, mates b ranked
by the rows they share with a on a sample of rows, then c with no row where a, b, c are all
nonzero, then d with no row at load 2; each quad is checked exactly on the bit-packed columns.
Columns are proposed 32 at a time in one batch of tensor ops (proposals that collide, and quads
that use slack, are redone one at a time).
Rows are tracked by their slack (2 * quads left - nonzeros left): a quad that would take a row
below zero is refused, and in a row with no slack the mates must make exactly two, which forces
the mates of typical 2:4 weights (two nonzeros in every group of four). A greedy that leaves
columns over repairs by swapping them into existing quads, then runs again with random tie
breaks; up to 256 columns, an exhaustive search follows. All bounded by the budget.

Refusals are cheap: a lower bound on the nonzero blocks any order has (from the nonzero count and
the sorted row and column counts) above max_block_density rules out blocks; a row with more than
K/2 nonzeros rules out 2:4. Everything runs as torch ops on W's device (the search is fastest on
the GPU the frozen weights live on) within budget_s; a search out of time returns what it has
verified or a refusal that says so. Results are cached by a digest of the nonzero mask
(PermutationCache).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import threading
import time
from typing import Optional, Sequence

import torch

from .block import BLOCK_SIZES

log = logging.getLogger("sparse_inductor")

__all__ = ["Permutation", "PermutationCache", "find_permutation", "mask_digest", "permute", "kernel_indices",
           "rows_for", "block_count", "shared_order", "sides", "SEARCH_VERSION"]

# Part of every cache key: bump when the search or the result's meaning changes.
SEARCH_VERSION = 2

# As passes/detect.py: the largest block size within 25% of the lowest density; block-sparse
# wins over 2:4 when at most half of the blocks are nonzero.
_BLOCK_TOLERANCE = 1.25
_PREFER_BLOCK_BELOW = 0.5

_SAMPLE_ROWS = 256  # 2:4: rows on which mates are ranked and filtered before the exact check
_GREEDY_WORK = 3e7  # pack_lines: remainders x blocks x key width beyond which packing is sequential
_MAX_REPS = 1024  # block: most groups of the first side that key the second
_ATTEMPTS_24 = 4  # 2:4: greedy runs (the later ones with random tie breaks), while the budget lasts
_PAIR_TABLE_COLS = 2048  # 2:4: free columns up to which every pair is hashed (2M pairs)
_BACKTRACK_K = 256  # 2:4: up to this many columns, an exhaustive search follows a failed greedy


@dataclasses.dataclass(frozen=True)
class Permutation:
    """What find_permutation found for W [N, K].

    pattern:       "block", "2:4" or "dense" (nothing found; reason says why).
    rows, cols:    int64 index vectors: W[rows][:, cols] has the pattern (None: the identity;
                   2:4 never reorders rows). So y[:, rows] = x[:, cols] @ (W[rows][:, cols])^T.
    block:         the block size (pattern "block").
    block_density: fraction of nonzero blocks of the permuted weight (pattern "block").
    density:       fraction of nonzero weights (a permutation does not change it).
    seconds:       time the search took (of the original search, for a cached result).
    reason:        a sentence for the user: what was found, or why nothing was.
    cached:        the result came from a PermutationCache.
    """

    pattern: str
    rows: Optional[torch.Tensor]
    cols: Optional[torch.Tensor]
    density: float
    seconds: float
    reason: str
    block: Optional[int] = None
    block_density: Optional[float] = None
    cached: bool = False

    @property
    def found(self) -> bool:
        return self.pattern != "dense"

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """W[rows][:, cols] (a copy; W itself is not touched)."""
        return permute(w, self.rows, self.cols)


def permute(w: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> torch.Tensor:
    """W[rows][:, cols]; None is the identity."""
    if rows is not None:
        w = w.index_select(0, rows.to(device=w.device, dtype=torch.int64))
    if cols is not None:
        w = w.index_select(1, cols.to(device=w.device, dtype=torch.int64))
    return w.contiguous()


def kernel_indices(perm: Permutation, device=None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(x_index [K], out_index [N]) as the kernels take them, int32 and contiguous: the kernel
    reads x[m, x_index[k']] for the permuted weight's column k' and writes its output column n'
    to y[m, out_index[n']]. None where the permutation is the identity."""
    def idx(t):
        return None if t is None else t.to(device=device or t.device, dtype=torch.int32).contiguous()

    return idx(perm.cols), idx(perm.rows)


# ----------------------------------------------------------------------------------------------
# bit-level helpers (vectorised; no Python loop over elements)
# ----------------------------------------------------------------------------------------------

_PACK_MAGIC = 0x0102040810204080  # (word of eight 0/1 bytes) * magic >> 56: the eight bits as one byte


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """uint8 [L, 8w] -> int64 [L, w], the same bytes (through a flat view: a [1, n] tensor may
    carry strides a 2-D dtype view refuses)."""
    L = t.shape[0]
    return t.contiguous().reshape(-1).view(torch.int64).view(L, -1)


def _pack_last(z: torch.Tensor) -> torch.Tensor:
    """z [L, F] bool/uint8 of 0/1 -> int64 [L, ceil(F/64)], the bits of each line packed."""
    L, F = z.shape
    pad = (-F) % 64
    zu = z.to(torch.uint8) if z.dtype != torch.uint8 else z
    if pad:
        zu = torch.nn.functional.pad(zu, (0, pad))
    words = _as_words(zu)  # [L, F/8]: eight 0/1 bytes a word
    packed = ((words * _PACK_MAGIC) >> 56) & 0xFF
    return _as_words(packed.to(torch.uint8))


def _pack_columns(zu: torch.Tensor) -> torch.Tensor:
    """zu [N, K] uint8 0/1, row-major -> int64 [K, ceil(N/64)]: each column's bits, packed along N."""
    N, K = zu.shape
    pad = (-N) % 64
    if pad:
        zu = torch.cat([zu, zu.new_zeros(pad, K)])
    v = zu.view(-1, 8, K)
    p = v[:, 0].clone()
    for i in range(1, 8):
        p |= v[:, i] << i
    return _as_words(p.t())


def _lane_sums(words: torch.Tensor) -> torch.Tensor:
    """words int64 [..., 8 lanes of small counts] -> [..., 8] the byte lanes as int64."""
    shifts = torch.arange(0, 64, 8, device=words.device)
    return (words.unsqueeze(-1) >> shifts) & 0xFF


def _line_counts(zu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonzeros of every row and every column of zu [N, K] uint8 0/1 (int64 [N], [K]): sums of
    int64 words of eight bytes, at most 128 at a time (a byte lane never overflows)."""
    N, K = zu.shape
    if K % 8:
        zu = torch.nn.functional.pad(zu, (0, 8 - K % 8))
    words = _as_words(zu)  # [N, W]
    W = words.shape[1]
    rows = torch.zeros(N, dtype=torch.int64, device=zu.device)
    cols = torch.zeros(W, 8, dtype=torch.int64, device=zu.device)
    wh, nh = W - W % 128, N - N % 128
    if wh:
        rows += _lane_sums(words[:, :wh].reshape(N, wh // 128, 128).sum(2)).sum((1, 2))
    if W % 128:
        rows += _lane_sums(words[:, wh:].sum(1)).sum(-1)
    if nh:
        cols += _lane_sums(words[:nh].view(nh // 128, 128, W).sum(1)).sum(0)
    if N % 128:
        cols += _lane_sums(words[nh:].sum(0))
    return rows, cols.reshape(-1)[:K]


def _classes(keys: torch.Tensor):
    """Group lines by identical keys (int64 [L, W]): (inverse [L], counts [C], members grouped by
    class [L], first position of each class in it [C]). One word: exact; more: by a 64-bit hash of
    the words, checked exactly (a collision, never seen, falls back to torch.unique over rows)."""
    L, W = keys.shape
    if W == 1:
        flat = keys[:, 0]
    else:
        mult = torch.tensor([0x9E3779B97F4A7C15 - 2 ** 64, 0x2545F4914F6CDD1D, 0x5851F42D4C957F2D,
                             0x14057B7EF767814F], dtype=torch.int64, device=keys.device)
        flat = keys[:, 0].clone()
        for i in range(1, W):
            flat.mul_(mult[i % 4]).add_(keys[:, i]).bitwise_xor_(flat >> 29)
    _, inv, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    if W > 1 and not torch.equal(keys, keys.index_select(0, order[starts]).index_select(0, inv)):
        _, inv, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
        order = torch.argsort(inv, stable=True)
        starts = torch.cumsum(counts, 0) - counts
    return inv, counts, order, starts


def _block_or(z: torch.Tensor, b: int, dim: int) -> torch.Tensor:
    """OR (max) of z uint8 over consecutive groups of b along dim (0 or 1); a ragged tail is its own group."""
    L = z.shape[dim]
    full = L // b
    parts = []
    if full:
        head = z.narrow(dim, 0, full * b)
        parts.append(head.reshape(full, b, -1).amax(1) if dim == 0 else head.reshape(-1, full, b).amax(2))
    if L % b:
        tail = z.narrow(dim, full * b, L - full * b)
        parts.append(tail.amax(dim, keepdim=True))
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0]


# ----------------------------------------------------------------------------------------------
# arranging groups of lines into blocks
# ----------------------------------------------------------------------------------------------

def pack_lines(inv: torch.Tensor, counts: torch.Tensor, keys: torch.Tensor, filler: torch.Tensor, b: int,
               deadline: float = math.inf) -> torch.Tensor:
    """An order of L lines (int64 [L]) that puts the lines of each group together in blocks of b.

    inv [L]: each line's group; counts [C]; keys [C, G] bool: the group's support on the other
    side (what a block holding it must cover); filler [C] bool: groups of all-zero lines, which
    fit anywhere. Whole blocks of a group come first (group order), then the remainders, packed
    into the remaining ceil(L/b) - (whole blocks) blocks greedily: largest first, into the block
    to which they add the fewest nonzero keys (ties: the tightest fit; a remainder too large for
    any block is split), then the fillers fill the gaps. The last block is the short one (L % b).
    """
    L = inv.numel()
    dev = inv.device
    order = torch.argsort(inv, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    cls = inv[order]
    rank = torch.arange(L, device=dev) - starts[cls]
    whole = torch.where(filler, 0, counts // b)
    rem = torch.where(filler, 0, counts % b)
    is_whole = rank < (whole * b)[cls]
    is_filler = filler[cls]
    head = order[is_whole]
    fillers = order[is_filler]
    rem_lines = order[~is_whole & ~is_filler]  # grouped by class, class order
    n_rem = rem_lines.numel()
    if n_rem == 0:
        return torch.cat([head, fillers])
    nb_total = -(-L // b)
    n_bins = nb_total - int(whole.sum())
    pad = nb_total * b - L
    rc = torch.nonzero(rem).flatten()
    sizes = rem[rc]
    G = keys.shape[1]
    if rc.numel() * n_bins * max(G, 1) > _GREEDY_WORK or time.perf_counter() > deadline:
        return torch.cat([head, rem_lines, fillers])  # sequential: remainders in class order
    offsets = (torch.cumsum(sizes, 0) - sizes).tolist()
    rkeys = keys[rc]
    lines = [rem_lines[o:o + z] for o, z in zip(offsets, sizes.tolist())]
    # A remainder whose key is a subset of a larger remainder's (its lines lost a nonzero to an
    # exact zero inside a kept block) joins the closest such superset among those that join none:
    # together they cost no more than the superset alone.
    n_r = rc.numel()
    if 1 < n_r and n_r * n_r * max(G, 1) <= _GREEDY_WORK:
        width = rkeys.sum(1)
        sub = ~(rkeys.unsqueeze(1) & ~rkeys.unsqueeze(0)).any(-1)  # sub[i, j]: key i within key j
        sub &= width.unsqueeze(1) < width.unsqueeze(0)
        leader = ~(sub & (sizes.unsqueeze(0) >= sizes.unsqueeze(1))).any(1)
        sub &= leader.unsqueeze(0) & ~leader.unsqueeze(1)  # followers into leaders only
        has = sub.any(1)
        if bool(has.any()):
            gap = torch.where(sub, width.unsqueeze(0) - width.unsqueeze(1), G + 1)
            target = torch.where(has, torch.argmin(gap, 1), torch.arange(n_r, device=dev))
            tl_ = target.tolist()
            groups: dict[int, list[torch.Tensor]] = {}
            for i in sorted(range(n_r), key=lambda i: (tl_[i] != i, -int(width[i]))):
                groups.setdefault(tl_[i], []).append(lines[i])
            roots = list(groups)
            lines = [torch.cat(groups[r]) for r in roots]
            rkeys = rkeys[torch.tensor(roots, dtype=torch.int64, device=dev)]
    gsizes = torch.tensor([t.numel() for t in lines], dtype=torch.int64, device=dev)
    # largest groups first; among equal sizes the widest keys
    by_size = torch.argsort(-(gsizes * (G + 1) + rkeys.sum(1)), stable=True).tolist()
    sizes_l = gsizes.tolist()
    cap = torch.full((n_bins,), b, dtype=torch.int64, device=dev)
    cap[-1] = b - pad
    bin_keys = torch.zeros(n_bins, G, dtype=torch.bool, device=dev)
    contents: list[list[torch.Tensor]] = [[] for _ in range(n_bins)]
    big = G + 1
    for n_done, j in enumerate(by_size):
        need, lo = sizes_l[j], 0
        if time.perf_counter() > deadline:  # out of time: the rest in order, into whatever room is left
            rest = torch.cat([lines[i] for i in by_size[n_done:]])
            for t, c in enumerate(cap.tolist()):
                contents[t].append(rest[:c])
                rest = rest[c:]
            cap.zero_()
            break
        key = rkeys[j]
        added = (key & ~bin_keys).sum(1)  # nonzero keys the block would gain
        excess = (bin_keys & ~key).sum(1)  # the block's keys this group does not need
        while need > 0:
            fits = cap >= need
            if bool(fits.any()):
                # fewest added keys, then the block whose keys match best, then the tightest fit
                score = (added * big + excess) * (b + 1) + (cap - need)
                t = int(torch.argmin(torch.where(fits, score, torch.iinfo(torch.int64).max)))
                take = need
            else:  # split: as many as the roomiest block holds
                t = int(torch.argmax(cap * big - added))
                take = int(cap[t])
            contents[t].append(lines[j][lo:lo + take])
            cap[t] -= take
            bin_keys[t] |= key
            added[t] = 0
            excess[t] = int((bin_keys[t] & ~key).sum())
            lo += take
            need -= take
    caps = cap.tolist()
    out = [head]
    f = 0
    for t in range(n_bins):
        out.extend(contents[t])
        out.append(fillers[f:f + caps[t]])
        f += caps[t]
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# block search
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _BlockFound:
    rows: torch.Tensor
    cols: torch.Tensor
    block: int
    nnzb: int
    total: int

    @property
    def density(self) -> float:
        return self.nnzb / max(self.total, 1)


def _blocks_lower_bound(counts: torch.Tensor, b: int, other: int) -> int:
    """Fewest nonzero blocks any order can have, from one side's line counts: the lines of a block
    hold at least ceil(max count / b) blocks; sorting puts the largest counts together."""
    s = torch.sort(counts, descending=True).values
    L = s.numel()
    firsts = s[0:L:b]  # the largest count of each block, best case
    return int(torch.clamp((firsts + b - 1) // b, max=-(-other // b)).sum())


def _finish(zu: torch.Tensor, rows: torch.Tensor, b: int, deadline: float, scratch: dict) -> _BlockFound:
    """Given a row order: columns grouped by their support over its block rows (exact), cut into
    block columns; the exact block map of the result. scratch: a reused [N, K] buffer (a fresh
    58 MB tensor a call costs more in page faults than the gather itself)."""
    N, K = zu.shape
    zr = _block_or(_gather_rows(zu, rows, scratch), b, 0)  # [Nb, K]: OR over each block row
    nb = zr.shape[0]
    inv, counts, order, starts = _classes(_pack_last(zr.t()))
    keys = zr.t().index_select(0, order[starts]).bool()  # [C, Nb]
    cols = pack_lines(inv, counts, keys, ~keys.any(1), b, deadline)
    bmap = _block_or(zr.index_select(1, cols), b, 1)  # [Nb, Kb]
    return _BlockFound(rows, cols, b, int(bmap.sum()), nb * bmap.shape[1])


def _gather_rows(zu: torch.Tensor, rows: torch.Tensor, scratch: dict) -> torch.Tensor:
    buf = scratch.get("rows")
    if buf is None or buf.shape != zu.shape:
        buf = scratch["rows"] = torch.empty_like(zu)
    return torch.index_select(zu, 0, rows, out=buf)


def _row_order(zu: torch.Tensor, rkeys: torch.Tensor, b: int, deadline: float) -> torch.Tensor:
    """Rows grouped by rkeys (uint8 [N, G], 0/1) and cut into block rows of b."""
    inv, counts, order, starts = _classes(_pack_last(rkeys))
    keys = rkeys.index_select(0, order[starts]).bool()
    return pack_lines(inv, counts, keys, ~keys.any(1), b, deadline)


def _search_block_oriented(zu: torch.Tensor, colbits: torch.Tensor, sizes: Sequence[int], max_density: float,
                           deadline: float, refine: bool, scratch: dict) -> dict[int, _BlockFound]:
    """The block search on zu [N, K] (rows keyed from column groups); colbits: zu's columns packed."""
    N, K = zu.shape
    inv, counts, order, starts = _classes(colbits)
    first = order[starts]  # a representative column of each group
    cls = torch.nonzero(colbits.index_select(0, first).ne(0).any(1)).flatten()  # groups that are not all zero
    found: dict[int, _BlockFound] = {}
    if cls.numel() == 0:  # all-zero weight
        rows = torch.arange(N, device=zu.device)
        for b in sizes:
            found[b] = _finish(zu, rows, b, deadline, scratch)
        return found
    # The rows are keyed by their support over the groups. Many distinct supports (exact zeros
    # inside kept blocks make each damaged column a group of its own) also get a second keying,
    # on groups of two or more identical columns only, which are intact; the better result stays.
    keyings = [cls[torch.argsort(-counts[cls], stable=True)[:_MAX_REPS]]]
    big = cls[counts[cls] > 1]
    if int((counts == 1).sum()) > K // 8 and 0 < big.numel() < cls.numel():  # the intact groups first
        keyings.insert(0, big[torch.argsort(-counts[big], stable=True)[:_MAX_REPS]])
    for keyed in keyings:
        pick = _pick_block(found)
        if pick is not None and pick.density <= max_density:
            break  # the intact groups' keying was good enough
        for b in sizes:
            if time.perf_counter() > deadline:
                break
            rows = _row_order(zu, zu.index_select(1, first[keyed]), b, deadline)
            res = _finish(zu, rows, b, deadline, scratch)
            if refine and time.perf_counter() < deadline:
                # one round the other way: rows keyed by their support over the block columns found
                rows2 = _row_order(zu, _block_or(zu.index_select(1, res.cols), b, 1), b, deadline)
                if not torch.equal(rows2, rows) and time.perf_counter() < deadline:
                    res2 = _finish(zu, rows2, b, deadline, scratch)
                    res = res2 if res2.nnzb < res.nnzb else res
            if b not in found or res.nnzb < found[b].nnzb:
                found[b] = res
    return found


def _pick_block(found: dict[int, _BlockFound]) -> Optional[_BlockFound]:
    if not found:
        return None
    lowest = min(f.density for f in found.values())
    for b in sorted(found, reverse=True):
        if found[b].density <= lowest * _BLOCK_TOLERANCE + 1e-12:
            return found[b]
    return None


def _search_block(zu, colbits, row_counts, col_counts, sizes, max_density, deadline) -> tuple[Optional[_BlockFound], str]:
    N, K = zu.shape
    nnz = int(row_counts.sum())
    possible = []
    bounds = []
    for b in sizes:
        total = -(-N // b) * -(-K // b)
        bound = max(-(-nnz // (b * b)), _blocks_lower_bound(row_counts, b, K), _blocks_lower_bound(col_counts, b, N))
        bounds.append((b, bound / total))
        if bound <= max_density * total:
            possible.append(b)
    if not possible:
        b, frac = min(bounds, key=lambda x: x[1])
        return None, (f"no order can be block-sparse: at least {frac:.1%} of {b}x{b} blocks nonzero "
                      f"(max_block_density={max_density})")
    best: dict[int, _BlockFound] = {}

    def merge(found: dict[int, _BlockFound], transposed: bool):
        for b, f in found.items():
            if transposed:
                f = _BlockFound(f.cols, f.rows, b, f.nnzb, f.total)
            if b not in best or f.nnzb < best[b].nnzb:
                best[b] = f

    merge(_search_block_oriented(zu, colbits, possible, max_density, deadline, refine=False, scratch={}), False)
    pick = _pick_block(best)
    if (pick is None or pick.density > max_density) and time.perf_counter() < deadline:
        # the other orientation (columns keyed from row groups), then a refinement round
        zt = zu.t().contiguous()
        merge(_search_block_oriented(zt, _pack_columns(zt), possible, max_density, deadline, refine=True, scratch={}),
              True)
        pick = _pick_block(best)
    if pick is None:
        return None, "block search ran out of time"
    if pick.density > max_density:
        return None, (f"best order found has {pick.density:.1%} of {pick.block}x{pick.block} blocks nonzero "
                      f"(max_block_density={max_density})")
    return pick, ""


# ----------------------------------------------------------------------------------------------
# 2:4 search (column order only)
# ----------------------------------------------------------------------------------------------

def _quad_ok(bits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """bits [K, W] packed columns; q [..., 4] column indices -> bool [...]: no row has three or more
    nonzeros among the four."""
    a, b, c, d = (bits[q[..., i]] for i in range(4))
    bad = (a & b & (c | d)) | (c & d & (a | b))
    return ~bad.ne(0).any(-1)


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 (SWAR; torch has no popcount), summed over the last dim."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56).bitwise_and(0xFF).sum(-1)


def _unpack(words: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [W] bits -> bool [n]."""
    shifts = torch.arange(64, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).flatten()[:n].bool()


class _Greedy24:
    """Columns into quads, densest column first (module docstring). All tests are AND / OR over
    bit-packed columns: on a sample of rows (4 words a column) to rank and filter candidates, then
    exactly on every row for the quad chosen. The candidates are the free columns, compacted as
    they are used up.

    Slack: a row with c nonzeros left and q quads left has 2q - c to spare; a quad with fewer than
    two of its nonzeros uses some. A quad that would take a row below zero is refused, and in a
    tight row (no slack: every group of such a row must hold exactly two) the mates must make
    exactly two. Typical 2:4 weights have two nonzeros in every group, so every row is tight and
    the mates of a column are forced; without this a greedy on a narrow weight runs into dead ends."""

    def __init__(self, zu: torch.Tensor, bits: torch.Tensor, row_counts: torch.Tensor, col_counts: torch.Tensor,
                 deadline: float, attempt: int = 0):
        N, K = zu.shape
        self.bits, self.deadline, self.K, self.N = bits, deadline, K, N
        dev = self.dev = zu.device
        g = torch.Generator(device="cpu").manual_seed(attempt)
        if N > _SAMPLE_ROWS:
            self.sample = torch.randperm(N, generator=g)[:_SAMPLE_ROWS].sort().values.to(dev)
            self.sample_bits = _pack_last(zu.index_select(0, self.sample).t())  # [K, 4]
        else:
            self.sample = None
            self.sample_bits = bits  # every row: the sample is exact
        self.slack = 2 * (K // 4) - row_counts
        self.valid_rows = _pack_last(torch.ones(1, N, dtype=torch.bool, device=dev))[0]  # no padding rows
        self._tight()
        self.free = torch.ones(K, dtype=torch.bool, device=dev)  # global
        # attempts after the first break ties (and near-ties) in the order and the ranking at random
        self.jitter = None if attempt == 0 else torch.randint(0, 4, (K,), generator=g).to(dev)
        key = col_counts * 4 + (0 if self.jitter is None else self.jitter)
        self.order = torch.argsort(-key, stable=True).tolist()
        self.big = torch.iinfo(torch.int64).max
        self._compact()

    def _tight(self) -> None:
        """Bit sets of the rows with no slack (full and sampled) and with one."""
        zero, one = (self.slack == 0), (self.slack == 1)
        self.t_full = _pack_last(zero.unsqueeze(0))[0]
        self.s1_full = _pack_last(one.unsqueeze(0))[0]
        self.t_sample = self.t_full if self.sample is None else _pack_last(zero[self.sample].unsqueeze(0))[0]
        self.any_tight = bool(zero.any())
        self.all_tight = bool(zero.all())

    def _compact(self) -> None:
        self.pair_table = None
        self.idx = torch.nonzero(self.free).flatten()  # working set: global ids
        self.sb = self.sample_bits.index_select(0, self.idx)
        self.wjitter = None if self.jitter is None else self.jitter.index_select(0, self.idx)
        self.wfree = torch.ones(self.idx.numel(), dtype=torch.bool, device=self.dev)
        self.pos = torch.full((self.K,), -1, dtype=torch.int64, device=self.dev)
        self.pos[self.idx] = torch.arange(self.idx.numel(), device=self.dev)
        self.n_free = self.idx.numel()

    def take(self, cols: list[int]) -> None:
        t = torch.tensor(cols, dtype=torch.int64, device=self.dev)
        self.free[t] = False
        self.wfree[self.pos[t]] = False
        self.n_free -= len(cols)
        if self.n_free * 2 < self.idx.numel() and self.idx.numel() > 64:
            self._compact()

    def _deficit(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For quads q [..., 4]: bit sets of the rows where they hold no nonzero and exactly one."""
        a, b, c, d = (self.bits[q[..., i]] for i in range(4))
        anyof = a | b | c | d
        two = (a & b) | (c & d) | ((a | b) & (c | d))
        return ~anyof & self.valid_rows, anyof & ~two

    def _fits(self, q: torch.Tensor) -> torch.Tensor:
        """bool [...]: quads q [..., 4] with at most two nonzeros in every row that leave no row's
        slack below zero."""
        ok = _quad_ok(self.bits, q)
        z0, z1 = self._deficit(q)
        over = (self.t_full & (z0 | z1)) | (self.s1_full & z0)
        return ok & ~over.ne(0).any(-1)

    def _use(self, quad: tuple) -> None:
        z0, z1 = self._deficit(torch.tensor(quad, dtype=torch.int64, device=self.dev))
        if not bool((z0 | z1).ne(0).any()):  # two nonzeros in every row: no slack used
            return
        n = self.N
        self.slack -= 2 * _unpack(z0, n).to(torch.int64) + _unpack(z1, n).to(torch.int64)
        self._tight()

    def _bad_c(self, sa: torch.Tensor, sbb: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        """Sample bits of the rows that rule out c after a and b (broadcasting): a row where all three
        are nonzero, or a tight row that neither a nor b covers and c does not either."""
        bad = sa & sbb & sc
        if self.any_tight:
            bad = bad | (self.t_sample & ~(sa | sbb) & ~sc)
        return bad

    def _pair_key(self, both: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
        """A 64-bit hash of a pair's (rows where both are nonzero, rows where one is), per row of
        [..., W] word tensors."""
        h = torch.zeros(both.shape[:-1], dtype=torch.int64, device=both.device)
        for i in range(both.shape[-1]):
            h = (h * 0x2545F4914F6CDD1D + both[..., i]) ^ (h >> 31)
            h = (h * 0x5851F42D4C957F2D + one[..., i]) ^ (h >> 29)
        return h

    def _by_pairs(self, a: int):
        """Every row tight (two nonzeros in every group left), all rows in hand: a quad's other
        pair (c, d) then has exactly the complement of (a, b)'s load, both = rows where neither a
        nor b is nonzero and one = rows where just one is. All free pairs are hashed once (until
        the next compaction); each free b is one lookup. Returns mates or None."""
        F = self.idx.numel()
        bits = self.sample_bits.index_select(0, self.idx)  # the sample is every row here
        if self.pair_table is None:
            ii, jj = torch.triu_indices(F, F, 1, device=self.dev)
            keys = self._pair_key(bits[ii] & bits[jj], bits[ii] ^ bits[jj])
            keys, order = torch.sort(keys)
            self.pair_table = (keys, ii[order], jj[order])
        keys, ii, jj = self.pair_table
        sa = self.sample_bits[a]
        bs = torch.nonzero(self.wfree).flatten()
        want = self._pair_key(~(sa | bits[bs]) & self.valid_rows, sa ^ bits[bs])
        lo = torch.searchsorted(keys, want)
        hi = torch.searchsorted(keys, want, right=True)
        hit = torch.nonzero(hi > lo).flatten()
        for b, lo_, hi_ in zip(bs[hit].tolist(), lo[hit].tolist(), hi[hit].tolist()):
            c, d = ii[lo_:hi_], jj[lo_:hi_]
            ok = self.wfree[c] & self.wfree[d] & (c != b) & (d != b)
            if not bool(ok.any()):
                continue
            c, d = c[ok], d[ok]
            quads = torch.stack([torch.full_like(c, a), self.idx[b].expand_as(c), self.idx[c], self.idx[d]], 1)
            fit = self._fits(quads)
            if bool(fit.any()):
                q = quads[int(torch.nonzero(fit)[0])].tolist()
                return q[1], q[2], q[3]
        return None

    def complete(self, a: int, kb: int = 3, pairs: int = 4, all_b: bool = False):
        """Mates (b, c, d) for column a (already taken), or None. b: the kb free columns that share
        the fewest rows with a (all_b: every free column, 64 at a time); the (b, c) pairs that pass
        the sample's tests, fewest shared rows first (at most `pairs` of them), then d likewise;
        the first quad that fits exactly."""
        sb, free, big, idx, dev = self.sb, self.wfree, self.big, self.idx, self.dev
        if self.n_free < 3:
            return None
        sa = self.sample_bits[a]
        ov = _popcount(sb & sa)  # rows where a and the candidate are nonzero (sample)
        if self.wjitter is not None:
            ov = ov * 4 + self.wjitter
        ov = torch.where(free, ov, big)
        if all_b:
            cand_b = torch.nonzero(free).flatten()
            cand_b = cand_b[torch.argsort(ov[cand_b], stable=True)]
            step = 64
        else:
            cand_b = torch.topk(ov, min(kb, self.n_free), largest=False).indices
            step = kb
        tight = self.any_tight
        ts = self.t_sample
        for s0 in range(0, cand_b.numel(), step):
            if time.perf_counter() > self.deadline:
                return None
            bs = cand_b[s0:s0 + step]
            sbb = sb[bs].unsqueeze(1)  # [nb, 1, w]
            bad = sa & sbb & sb  # a row where a, b and c are all nonzero
            if tight:  # a tight row that neither a nor b covers needs c
                bad = bad | (ts & ~(sa | sbb) & ~sb)
            ok_c = ~bad.ne(0).any(-1) & free  # [nb, F]
            ok_c[torch.arange(bs.numel(), device=dev), bs] = False
            pb, pc = torch.nonzero(ok_c, as_tuple=True)
            if pb.numel() == 0:
                continue
            keep = torch.argsort(ov[bs[pb]] + ov[pc], stable=True)[:pairs]
            b_, c_ = bs[pb[keep]], pc[keep]
            sab = sa | sb[b_]
            load2 = (sa & sb[b_]) | (sab & sb[c_])  # [P, w]: rows at load 2 after a, b, c
            bad = sb & load2.unsqueeze(1)  # [P, F, w]
            if tight:  # a tight row at load 1 needs d
                bad = bad | (ts & (sab | sb[c_]) & ~load2).unsqueeze(1) & ~sb
            ok_d = ~bad.ne(0).any(-1) & free
            rows_p = torch.arange(b_.numel(), device=dev)
            ok_d[rows_p, b_] = False
            ok_d[rows_p, c_] = False
            qp, qd = torch.nonzero(ok_d, as_tuple=True)
            if qp.numel() == 0:
                continue
            keep = torch.argsort(ov[b_[qp]] + ov[c_[qp]] + ov[qd], stable=True)[:4 * pairs]
            qp, qd = qp[keep], qd[keep]
            quads = torch.stack([torch.full_like(qd, a), idx[b_[qp]], idx[c_[qp]], idx[qd]], 1)
            ok = self._fits(quads)
            if bool(ok.any()):
                q = quads[int(torch.nonzero(ok)[0])].tolist()
                return q[1], q[2], q[3]
        return None

    def propose(self, batch: list[int]) -> list[Optional[tuple[int, int, int]]]:
        """Mates for many columns at once, as complete() would choose them on its fast path (two
        b, one c each, one d), with the slack as it stands: the proposals may overlap; run()
        resolves that. [B, 2, F, words] tensors: one pass instead of B Python rounds."""
        sb, free, big, idx, dev = self.sb, self.wfree, self.big, self.idx, self.dev
        if self.n_free < 4:
            return [None] * len(batch)
        B = len(batch)
        ar = torch.arange(B, device=dev)
        pa = self.pos[torch.tensor(batch, dtype=torch.int64, device=dev)]
        sa = sb[pa]  # [B, w]
        ov = _popcount(sb.unsqueeze(0) & sa.unsqueeze(1))  # [B, F]
        if self.wjitter is not None:
            ov = ov * 4 + self.wjitter
        ov = torch.where(free, ov, big)
        ov[ar, pa] = big
        cb = torch.topk(ov, 2, largest=False).indices  # [B, 2]
        sbb = sb[cb]  # [B, 2, w]
        ab, sab = sa.unsqueeze(1) & sbb, sa.unsqueeze(1) | sbb
        bad = sb & ab.unsqueeze(2)  # [B, 2, F, w]
        if self.any_tight:
            bad = bad | (self.t_sample & ~sab).unsqueeze(2) & ~sb
        ok = ~bad.ne(0).any(-1) & free  # [B, 2, F]
        ok[ar, :, pa] = False
        ok.scatter_(2, cb.unsqueeze(2), False)
        ovc = torch.where(ok, ov.unsqueeze(1), big)
        cc = torch.argmin(ovc, 2)  # [B, 2]
        has_c = ovc.gather(2, cc.unsqueeze(2)).squeeze(2) < big
        sc = sb[cc]
        load2 = ab | (sab & sc)  # [B, 2, w]
        bad = sb & load2.unsqueeze(2)
        if self.any_tight:
            bad = bad | (self.t_sample & (sab | sc) & ~load2).unsqueeze(2) & ~sb
        ok = ~bad.ne(0).any(-1) & free
        ok[ar, :, pa] = False
        ok.scatter_(2, cb.unsqueeze(2), False)
        ok.scatter_(2, cc.unsqueeze(2), False)
        ovd = torch.where(ok, ov.unsqueeze(1), big)
        dd = torch.argmin(ovd, 2)
        has = has_c & (ovd.gather(2, dd.unsqueeze(2)).squeeze(2) < big)
        quads = torch.stack([idx[pa].unsqueeze(1).expand(B, 2), idx[cb], idx[cc], idx[dd]], 2)  # [B, 2, 4]
        z0, z1 = self._deficit(quads)
        fits = has & self._fits(quads) & ~(z0 | z1).ne(0).any(-1)  # a quad that uses slack: one at a time
        first = torch.argmax(fits.to(torch.int8), 1)
        pick = quads[ar, first].tolist()
        return [tuple(pick[i][1:]) if f else None for i, f in enumerate(fits.any(1).tolist())]

    def _one(self, a: int) -> Optional[tuple[int, int, int]]:
        """Mates for column a (already taken) the slow ways, in order of cost."""
        q = self.complete(a)
        if q is None and self.all_tight and self.sample is None and self.idx.numel() <= _PAIR_TABLE_COLS:
            q = self._by_pairs(a)
        if q is None:
            q = self.complete(a, pairs=64, all_b=True)
        return q

    def run(self, batch: int = 32) -> tuple[list[tuple[int, int, int, int]], list[int], bool]:
        """Quads in the column order: `batch` columns at a time get proposals (propose); those that
        do not collide with an earlier one of the batch are taken, the others (and quads that use
        slack) go one at a time (complete and the slower ways)."""
        quads, left = [], []
        free = [True] * self.K
        order, i = self.order, 0
        while i < len(order):
            if time.perf_counter() > self.deadline:
                return quads, left + [j for j in range(self.K) if free[j]], False
            group = []
            while i < len(order) and len(group) < batch:
                if free[order[i]]:
                    group.append(order[i])
                i += 1
            props = self.propose(group) if len(group) > 1 else [None] * len(group)
            used: set[int] = set()
            retry = []
            for a, q in zip(group, props):
                if a in used:
                    continue  # a mate of a quad this batch took
                if q is None or used.intersection(q):
                    retry.append(a)
                    continue
                used.update((a, *q))
                quads.append((a, *q))
            if used:
                self.take(sorted(used))
                for j in used:
                    free[j] = False
            for a in retry:
                if not free[a]:
                    continue
                if time.perf_counter() > self.deadline:
                    return quads, left + [j for j in range(self.K) if free[j]], False
                self.take([a])
                free[a] = False
                q = self._one(a)
                if q is None:
                    left.append(a)
                    continue
                self.take(list(q))
                for j in q:
                    free[j] = False
                quads.append((a, *q))
                self._use(quads[-1])
        return quads, left, True


def _repair24(bits: torch.Tensor, quads: list, left: list, deadline: float, max_steps: int) -> tuple[list, list]:
    """Place leftover columns by swapping each into an existing quad whose member it can replace
    (that member becomes the leftover; a seeded random walk with a tabu on the last swaps), and
    form quads among leftovers where four fit together. Bounded by max_steps and the deadline."""
    if not left:
        return quads, left
    dev = bits.device
    g = torch.Generator(device="cpu").manual_seed(1)
    q = torch.tensor(quads, dtype=torch.int64, device=dev).reshape(-1, 4)
    left = list(left)
    tabu: collections.deque = collections.deque(maxlen=8)
    for _ in range(max_steps):
        if not left or time.perf_counter() > deadline:
            break
        if 4 <= len(left) <= 12:
            combos = torch.tensor(list(itertools.combinations(left, 4)), dtype=torch.int64, device=dev)
            ok = _quad_ok(bits, combos)
            if bool(ok.any()):
                used: set = set()
                for row in combos[ok].tolist():
                    if not used.intersection(row):
                        used.update(row)
                        q = torch.cat([q, torch.tensor([row], dtype=torch.int64, device=dev)])
                left = [x for x in left if x not in used]
                continue
        x = left[int(torch.randint(len(left), (1,), generator=g))]
        if q.shape[0] == 0:
            break
        # x in place of member p of each quad: [nq, 4]
        cand = q.unsqueeze(1).repeat(1, 4, 1)
        pos = torch.arange(4, device=dev)
        cand[:, pos, pos] = x
        ok = _quad_ok(bits, cand)
        for t_q, t_p in tabu:
            ok[t_q, t_p] = False
        if not bool(ok.any()):
            continue
        nz = torch.nonzero(ok)
        qi, p = nz[int(torch.randint(nz.shape[0], (1,), generator=g))].tolist()
        y = int(q[qi, p])
        q[qi, p] = x
        left.remove(x)
        left.append(y)
        tabu.append((qi, p))
    return [tuple(r) for r in q.tolist()], left


def _backtrack24(bits: torch.Tensor, col_counts: torch.Tensor, deadline: float, max_nodes: int) -> Optional[list]:
    """Exhaustive search for a quad partition (narrow weights, where the greedy's choices are far
    from unique): depth first, the densest free column first, supports as Python ints. None when
    there is none or max_nodes / the deadline run out first."""
    K = bits.shape[0]
    sup = [int.from_bytes(row.numpy().tobytes(), "little") for row in bits.cpu()]
    dens = col_counts.tolist()
    nodes = [0]

    def dfs(free: list[int]) -> Optional[list]:
        if not free:
            return []
        nodes[0] += 1
        if nodes[0] > max_nodes or time.perf_counter() > deadline:
            nodes[0] = max_nodes + 1
            return None
        a = max(free, key=lambda j: (dens[j], -j))
        rest = [j for j in free if j != a]
        A = sup[a]
        rest.sort(key=lambda j: ((A & sup[j]).bit_count(), j))
        for ib, b in enumerate(rest):
            if time.perf_counter() > deadline:
                nodes[0] = max_nodes + 1
                return None
            ab, sab = A & sup[b], A | sup[b]
            for ic in range(ib + 1, len(rest)):
                c = rest[ic]
                if ab & sup[c]:
                    continue
                l2 = ab | (sab & sup[c])
                for idd in range(ic + 1, len(rest)):
                    d = rest[idd]
                    if l2 & sup[d]:
                        continue
                    sub = dfs([j for j in rest if j not in (b, c, d)])
                    if sub is not None:
                        return [(a, b, c, d)] + sub
                    if nodes[0] > max_nodes:
                        return None
        return None

    return dfs(list(range(K)))


def _search_24(zu, bits, row_counts, col_counts, deadline) -> tuple[Optional[torch.Tensor], str]:
    N, K = zu.shape
    if K % 4:
        return None, f"K={K} is not a multiple of 4"
    worst = int(row_counts.max())
    if worst > K // 2:
        row = int(torch.argmax(row_counts))
        return None, f"no column order is 2:4: row {row} has {worst} nonzeros of {K} (more than half)"
    for attempt in range(_ATTEMPTS_24):
        quads, left, finished = _Greedy24(zu, bits, row_counts, col_counts, deadline, attempt).run()
        if left and time.perf_counter() < deadline:
            quads, left = _repair24(bits, quads, left, deadline, max_steps=50 * len(left) + 100)
        if not left or time.perf_counter() > deadline:
            break
    if left and K <= _BACKTRACK_K and time.perf_counter() < deadline:
        found = _backtrack24(bits, col_counts, deadline, max_nodes=200_000)
        if found is not None:
            quads, left = found, []
    if left:
        if time.perf_counter() > deadline or not finished:
            return None, f"2:4 search ran out of time with {len(left)} of {K} columns left"
        return None, f"2:4 search found no group of four for {len(left)} of {K} columns"
    cols = torch.tensor([c for quad in quads for c in quad], dtype=torch.int64, device=zu.device)
    return cols, ""


# ----------------------------------------------------------------------------------------------
# one side given
# ----------------------------------------------------------------------------------------------

def _nonzero_blocks(zu: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor], b: int) -> int:
    zr = _block_or(zu if rows is None else zu.index_select(0, rows), b, 0)
    return int(_block_or(zr if cols is None else zr.index_select(1, cols), b, 1).sum())


def _rows_for(zu: torch.Tensor, cols: Optional[torch.Tensor], b: int, deadline: float = math.inf) -> torch.Tensor:
    """A row order for the mask zu with its column order fixed: rows keyed by their support over
    the block columns of cols (None: zu's own), cut into block rows (pack_lines)."""
    zc = zu if cols is None else zu.index_select(1, cols)
    return _row_order(zu, _block_or(zc, b, 1), b, deadline)


def rows_for(w: torch.Tensor, cols: Optional[torch.Tensor], block: int) -> tuple[torch.Tensor, int]:
    """For W's columns in a fixed order (cols, int64 [K]; None: W's own), a row order grouping W's
    rows into block rows of `block` as the search does, and the nonzero blocks of W[rows][:, cols]:
    used where one side's order is given by something else (the layer before, or none at all)."""
    zu = _mask(w).contiguous()
    if cols is not None:
        cols = cols.to(device=zu.device, dtype=torch.int64)
    rows = _rows_for(zu, cols, block)
    return rows, _nonzero_blocks(zu, rows, cols, block)


def shared_order(w1: torch.Tensor, w2: torch.Tensor, block: int) -> torch.Tensor:
    """An order of the hidden units between two layers, W1 [H, K] (one row a unit) and W2 [N, H] (one
    column a unit), each in its other order already: the units keyed by their support over W1's
    block columns and W2's block rows together, grouped and cut into blocks of `block` as the
    search cuts one weight's lines. Where the units were reordered alike in both (a model's hidden
    channels), the units of one original block share their key in both weights, so the order is
    block-sparse for both at once; the caller counts."""
    z1, z2 = _mask(w1).contiguous(), _mask(w2).contiguous()
    key = torch.cat([_block_or(z1, block, 1), _block_or(z2, block, 0).t()], 1).contiguous()
    return _row_order(z1, key, block, math.inf)


def block_count(w: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor], block: int) -> int:
    """The nonzero blocks of W[rows][:, cols] (None: W's own order)."""
    zu = _mask(w).contiguous()
    dev = zu.device
    return _nonzero_blocks(zu, None if rows is None else rows.to(dev), None if cols is None else cols.to(dev), block)


def _one_sided(zu: torch.Tensor, found: _BlockFound, deadline: float) -> _BlockFound:
    """The block result with one side in W's own order (None) where that costs no nonzero block:
    the kernel then reads x in its order (columns kept) or writes its outputs at their columns
    (rows kept), one gather or scatter less; else the result as found."""
    b = found.block
    if time.perf_counter() < deadline:
        rows = _rows_for(zu, None, b, deadline)
        nnzb = _nonzero_blocks(zu, rows, None, b)
        if nnzb <= found.nnzb:
            return _BlockFound(rows, None, b, nnzb, found.total)
    if time.perf_counter() < deadline:
        cols = _rows_for(zu.t().contiguous(), None, b, deadline)
        nnzb = _nonzero_blocks(zu, None, cols, b)
        if nnzb <= found.nnzb:
            return _BlockFound(None, cols, b, nnzb, found.total)
    return found


# ----------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------

def _mask(w: torch.Tensor) -> torch.Tensor:
    return (w != 0).view(torch.uint8)


def mask_digest(w: torch.Tensor) -> str:
    """blake2b of W's nonzero mask and shape: what a search result depends on."""
    return _digest(_pack_columns(_mask(w).contiguous()), tuple(w.shape))


def _digest(colbits: torch.Tensor, shape: tuple) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(shape).encode())
    h.update(colbits.cpu().numpy().tobytes())
    return h.hexdigest()


def _key(digest: str, patterns, sizes, max_density, budget_s) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((SEARCH_VERSION, digest, tuple(patterns), tuple(sizes), float(max_density),
                   round(float(budget_s), 3))).encode())
    return h.hexdigest()


def _verify(zu: torch.Tensor, colbits: torch.Tensor, res: Permutation) -> None:
    """Raise if res does not hold on the mask zu (colbits: its columns, bit-packed): the index
    vectors are permutations and the permuted mask has the pattern (a bug in the search must never
    reach a kernel). Computed from the mask again, not from the search's own numbers."""
    N, K = zu.shape
    for t, n in ((res.rows, N), (res.cols, K)):
        if t is not None and not (t.numel() == n and torch.equal(torch.sort(t).values, torch.arange(n, device=t.device))):
            raise AssertionError("permutation search returned an index vector that is not a permutation")
    if res.pattern == "2:4":
        if not bool(_quad_ok(colbits, res.cols.view(K // 4, 4)).all()):
            raise AssertionError("permutation search returned a column order that is not 2:4")
    elif res.pattern == "block":
        b = res.block
        # OR over block rows commutes with the column order: gather the rows, OR, then the columns
        zr = _block_or(zu if res.rows is None else zu.index_select(0, res.rows), b, 0)
        bmap = _block_or(zr if res.cols is None else zr.index_select(1, res.cols), b, 1)
        if int(bmap.sum()) != round(res.block_density * bmap.numel()):
            raise AssertionError("permutation search returned a wrong block density")


def find_permutation(w: torch.Tensor, *, patterns: Sequence[str] = ("2:4", "block"),
                     block_sizes: Sequence[int] = BLOCK_SIZES, max_block_density: float = 0.5,
                     budget_s: float = 2.0, cache: Optional["PermutationCache"] = None) -> Permutation:
    """Search rows / cols such that W[rows][:, cols] is block-sparse or 2:4 (module docstring).

    w: a 2-D weight (any dtype that compares with 0; on any device: the search runs there).
    patterns: which patterns to look for; block_sizes: square block sizes (16, 32, 64, 128);
    max_block_density: the most nonzero blocks a block-sparse result may have; budget_s: time for
    the search (a repeated call with the same mask and arguments is answered by cache).
    Returns a Permutation; pattern "dense" with the reason when nothing is found.
    """
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    if w.dim() != 2:
        raise ValueError(f"find_permutation: expected a 2-D weight, got shape {tuple(w.shape)}")
    bad = [b for b in block_sizes if b not in BLOCK_SIZES]
    if bad:
        raise ValueError(f"find_permutation: block sizes must be in {BLOCK_SIZES}, got {bad}")
    N, K = w.shape
    sizes = tuple(sorted(set(block_sizes), reverse=True)) if "block" in patterns else ()
    with torch.no_grad():
        if w.numel() == 0:
            return Permutation("dense", None, None, 0.0, 0.0, "empty weight")
        zu = _mask(w).contiguous()
        colbits = _pack_columns(zu)
        key = _key(_digest(colbits, (N, K)), patterns, sizes, max_block_density, budget_s)
        if cache is not None:
            hit = cache.get(key, N, K, w.device)
            if hit is not None:
                return hit
        res = _search(zu, colbits, patterns, sizes, max_block_density, t0, deadline)
        if res.found:
            try:
                _verify(zu, colbits, res)
            except AssertionError as e:  # a bug in the search: the layer stays dense, nothing cached
                log.warning("sparse_inductor: %s (%dx%d); the layer stays dense", e, N, K)
                return Permutation("dense", None, None, res.density, time.perf_counter() - t0,
                                   f"permutation search failed its own check ({e})")
        if cache is not None:
            cache.put(key, res)
    log.log(logging.INFO if res.seconds > 1.0 else logging.DEBUG,
            "sparse_inductor: permutation search %dx%d: %s (%.2f s)", N, K, res.reason, res.seconds)
    return res


def _block_reason(blk: _BlockFound) -> str:
    return f"{blk.block}x{blk.block} blocks, {blk.density:.1%} of blocks nonzero after a {sides(blk.rows, blk.cols)} permutation"


def sides(rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> str:
    """Which orders a result changes, in words: "row", "column" or "row and column"."""
    return " and ".join(w for w, t in (("row", rows), ("column", cols)) if t is not None) or "no"


def _search(zu, colbits, patterns, sizes, max_density, t0, deadline) -> Permutation:
    N, K = zu.shape
    row_counts, col_counts = _line_counts(zu)
    nnz = int(row_counts.sum())
    density = nnz / (N * K)

    def out(pattern, rows, cols, reason, **kw):
        return Permutation(pattern, rows, cols, density, time.perf_counter() - t0, reason, **kw)

    why = []
    blk = None
    if sizes:
        blk, why_b = _search_block(zu, colbits, row_counts, col_counts, sizes, max_density, deadline)
        if blk is None:
            why.append(f"not block-sparse ({why_b})")
    if blk is not None:
        blk = _one_sided(zu, blk, deadline)
    if blk is not None and blk.density <= _PREFER_BLOCK_BELOW:
        return out("block", blk.rows, blk.cols, _block_reason(blk), block=blk.block, block_density=blk.density)
    if "2:4" in patterns:
        cols, why_24 = _search_24(zu, colbits, row_counts, col_counts, deadline)
        if cols is not None:
            return out("2:4", None, cols, "2:4 after a column permutation")
        why.append(f"not 2:4 ({why_24})")
    if blk is not None:
        return out("block", blk.rows, blk.cols, _block_reason(blk), block=blk.block, block_density=blk.density)
    return out("dense", None, None, "no permutation found: " + "; ".join(why) if why else "no pattern requested")


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------

class PermutationCache:
    """Search results by key (mask digest + arguments): an in-memory LRU of `capacity` entries,
    and, with `directory`, one file a result in directory/permutations/<key>.json (the fields, the
    index vectors as lists of ints), so another process's compile of the same weight does not
    search again. Refusals are cached too. A file that does not load or does not hold permutations
    of the right sizes is ignored. (JSON, not torch.save: torch.load inside a compile gives tensors
    without data.)"""

    def __init__(self, directory: Optional[str] = None, capacity: int = 256):
        self.directory = os.path.join(directory, "permutations") if directory else None
        self.capacity = capacity
        self._mem: collections.OrderedDict[str, Permutation] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Optional[str]:
        return os.path.join(self.directory, key + ".json") if self.directory else None

    def get(self, key: str, n: int, k: int, device=None) -> Optional[Permutation]:
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None:
                self._mem.move_to_end(key)
        if hit is None:
            hit = self._load(key, n, k)
            if hit is not None:
                self._remember(key, hit)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(hit, rows=move(hit.rows), cols=move(hit.cols), cached=True)

    def put(self, key: str, res: Permutation) -> None:
        res = dataclasses.replace(res, rows=None if res.rows is None else res.rows.cpu(),
                                  cols=None if res.cols is None else res.cols.cpu(), cached=False)
        self._remember(key, res)
        path = self._path(key)
        if path is None:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            fields = {f.name: getattr(res, f.name) for f in dataclasses.fields(Permutation)}
            fields.update({name: None if t is None else t.tolist() for name, t in (("rows", res.rows),
                                                                                   ("cols", res.cols))})
            with os.fdopen(fd, "w") as f:
                json.dump(fields, f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("sparse_inductor: cannot write the permutation cache %s: %s", path, e)

    def _remember(self, key: str, res: Permutation) -> None:
        with self._lock:
            self._mem[key] = res
            self._mem.move_to_end(key)
            while len(self._mem) > self.capacity:
                self._mem.popitem(last=False)

    def _load(self, key: str, n: int, k: int) -> Optional[Permutation]:
        path = self._path(key)
        if path is None or not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                d = json.load(f)
            d.update({name: None if d[name] is None else torch.tensor(d[name], dtype=torch.int64)
                      for name in ("rows", "cols")})
            res = Permutation(**{f.name: d[f.name] for f in dataclasses.fields(Permutation)})
        except Exception as e:  # unreadable or from another version: search again
            log.debug("sparse_inductor: ignoring permutation cache file %s: %s", path, e)
            return None
        for t, size in ((res.rows, n), (res.cols, k)):
            if t is not None and not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == size and
                                      torch.equal(torch.sort(t.long()).values, torch.arange(size))):
                return None
        return res
