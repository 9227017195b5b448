"""Detection: read a weight W [N, K] and say which sparsity pattern it has, with a reason.

No graph here: detect() takes a tensor. Only exact zeros count (W != 0 is the test, so NaN and
Inf are nonzeros); nothing is pruned. Precedence when a weight fits both patterns: block-sparse
when at most half of its blocks are nonzero (it then moves fewer bytes than 2:4), else 2:4.

Block size: the largest size whose block density is within 25% of the smallest density seen
across sizes, so a weight pruned in 64x64 blocks is read as 64x64 and not 16x16.

fp8 (e4m3) weights, read from torch._scaled_mm: 2:4 only (cuSPARSELt's fp8 kernels; there is no
block-sparse fp8 kernel), with the same exact-zero rule (-0.0 is a zero, NaN a nonzero).

Behind a permutation (options permute, default on): a weight that is neither, as stored, is searched
for row and column orders that make it block-sparse or 2:4 (formats/permute.find_permutation, within
options permute_budget_s; results cached on disk by the weight's nonzero mask under
measure.cache_dir()). Detection.perm then holds the orders: the pattern, block size and density
are those of W[rows][:, cols]. A weight with more than half of its entries nonzero and more nonzero
blocks than max_block_density allows at any size whatever the order (a trained dense weight: no
exact zeros) is refused before the search, from the density alone.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ..formats import block_nonzero_map, violations_24
from ..formats.permute import Permutation, PermutationCache, find_permutation, sides
from ..measure import cache_dir
from ..options import SparseOptions
from ..report import count

__all__ = ["Detection", "detect", "SUPPORTED_DTYPES"]

# int8: weight-only quantized, or torch._int_mm's; fp8 e4m3: torch._scaled_mm's (2:4 only)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn)
_NO_BLOCK = {torch.float8_e4m3fn: "fp8 weights are read as 2:4 only: there is no block-sparse fp8 kernel"}
_BLOCK_TOLERANCE = 1.25
_PREFER_BLOCK_BELOW = 0.5


@dataclasses.dataclass(frozen=True)
class Detection:
    pattern: str  # "2:4", "block" or "dense"
    density: float  # fraction of nonzero weights
    reason: str
    block: Optional[int] = None
    block_density: Optional[float] = None  # fraction of nonzero blocks
    # the pattern is that of W[perm.rows][:, perm.cols] (None: of W as stored)
    perm: Optional[Permutation] = None


def _dtype_guard(w: torch.Tensor) -> Optional[str]:
    if w.dtype not in SUPPORTED_DTYPES:
        return (f"dtype {str(w.dtype).replace('torch.', '')} is not supported "
                "(float16, bfloat16, float32, int8, float8_e4m3fn)")
    if w.dim() != 2:
        return f"weight is {w.dim()}-D, not 2-D"
    if w.numel() == 0:
        return "empty weight"
    return None


def _why_not_24(w: torch.Tensor) -> Optional[str]:
    n, k = w.shape
    if k % 4:
        return f"K={k} is not a multiple of 4"
    bad = violations_24(w)
    if bad:
        total = n * k // 4
        return f"{bad} of {total} groups of four have more than two nonzeros"
    return None


def _best_block(w: torch.Tensor, sizes: tuple[int, ...]) -> tuple[Optional[int], Optional[float]]:
    dens = {b: float(block_nonzero_map(w, b).float().mean()) for b in sizes if b <= max(w.shape)}
    if not dens:
        return None, None
    lowest = min(dens.values())
    for b in sorted(dens, reverse=True):
        if dens[b] <= lowest * _BLOCK_TOLERANCE + 1e-12:
            return b, dens[b]
    return None, None  # unreachable


def detect(w: torch.Tensor, opts: SparseOptions, search: bool = True) -> Detection:
    """What W is (stored, or behind a permutation where options permute and `search` allow it: the
    caller says no for linears whose kernels take no permuted weight)."""
    det = _detect_stored(w, opts)
    if det.pattern != "dense" or not (search and opts.permute) or _dtype_guard(w) or w.dtype in _NO_BLOCK:
        return det
    return _behind_permutation(w, det, opts)


def _detect_stored(w: torch.Tensor, opts: SparseOptions) -> Detection:
    with torch.no_grad():
        why = _dtype_guard(w)
        if why:
            density = float((w != 0).float().mean()) if w.numel() else 0.0
            return Detection("dense", density, why)
        density = float((w != 0).float().mean())
        why24 = _why_not_24(w) if "2:4" in opts.patterns else "2:4 not requested"
        b, bd = (None, None)
        no_block = _NO_BLOCK.get(w.dtype)
        if "block" in opts.patterns and opts.block_sizes and not no_block:
            b, bd = _best_block(w, opts.block_sizes)
        is_block = bd is not None and bd <= opts.max_block_density
        if is_block and (why24 is not None or bd <= _PREFER_BLOCK_BELOW):
            return Detection("block", density, f"{b}x{b} blocks, {bd:.1%} of blocks nonzero", b, bd)
        if why24 is None:
            return Detection("2:4", density, "every group of four along K has at most two nonzeros", b, bd)
        why_block = ((no_block or "block sparsity not requested") if bd is None else
                     f"{bd:.1%} of {b}x{b} blocks nonzero (max_block_density={opts.max_block_density})")
        return Detection("dense", density, f"not 2:4 ({why24}); not block-sparse ({why_block})", b, bd)


# ---- behind a permutation

_CACHES: dict[str, PermutationCache] = {}  # one per cache directory (the environment may name another)


def permutation_cache() -> PermutationCache:
    """The search results' cache under measure.cache_dir() (memory and disk)."""
    directory = cache_dir()
    if directory not in _CACHES:
        _CACHES[directory] = PermutationCache(directory)
    return _CACHES[directory]


def _hopeless(w: torch.Tensor, density: float, opts: SparseOptions) -> Optional[str]:
    """Why no row and column order can make W one of the requested patterns, from its density
    alone (no search), or None. 2:4 holds at most half of the entries nonzero; a block-sparse order
    has at least nnz / (a block's entries inside W) of its blocks nonzero."""
    n, k = w.shape
    nnz = round(density * n * k)
    if "2:4" in opts.patterns and density <= 0.5:
        return None
    for b in opts.block_sizes if "block" in opts.patterns else ():
        if b > max(n, k):  # (as detection: no block larger than the weight)
            continue
        least = math.ceil(nnz / (min(b, n) * min(b, k)))
        if least <= opts.max_block_density * math.ceil(n / b) * math.ceil(k / b):
            return None
    return f"no row or column order can help ({density:.1%} of the weights nonzero)"


def _behind_permutation(w: torch.Tensor, stored: Detection, opts: SparseOptions) -> Detection:
    """detect()'s answer for a weight that is dense as stored: the search's, with its reason."""
    why = _hopeless(w, stored.density, opts)
    if why is not None:
        return dataclasses.replace(stored, reason=f"{stored.reason}; {why}")
    perm = find_permutation(w.detach(), patterns=opts.patterns, block_sizes=opts.block_sizes,
                            max_block_density=opts.max_block_density, budget_s=opts.permute_budget_s,
                            cache=permutation_cache())
    count("permutation_cached" if perm.cached else "permutation_search")
    when = f"found in {perm.seconds:.2f} s" + ("; cached" if perm.cached else "")
    if perm.pattern == "block":
        count("permutation_found")
        b, bd = perm.block, perm.block_density
        return Detection("block", stored.density, f"block {b}x{b} after {sides(perm.rows, perm.cols)} permutation, "
                         f"{bd:.1%} of blocks nonzero ({when})", b, bd, perm)
    if perm.pattern == "2:4":
        count("permutation_found")
        return Detection("2:4", stored.density, f"2:4 after column permutation ({when})", perm=perm)
    took = f"searched {perm.seconds:.2f} s" + ("; cached" if perm.cached else "")
    return dataclasses.replace(stored, reason=f"{stored.reason}; {perm.reason} ({took})")
