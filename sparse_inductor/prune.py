"""Helpers that make sparse weights for demos and tests (magnitude based, in place).

These are not pruning methods: they zero weights without any retraining, so a real model loses
accuracy. Use them to try the compiler on a model, or prune with a proper method and let the
compiler find the zeros.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

__all__ = ["prune", "prune_24_", "prune_blocks_", "scramble_"]


@torch.no_grad()
def prune_24_(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest |w| in every group of four along the last dim (K % 4 == 0)."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 needs K % 4 == 0, got shape {tuple(w.shape)}")
    g = w.reshape(n, k // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    w.copy_((g * keep).reshape(n, k))
    return w


@torch.no_grad()
def prune_blocks_(w: torch.Tensor, block: int = 64, sparsity: float = 0.9) -> torch.Tensor:
    """Zero the `sparsity` fraction of block x block blocks with the smallest L2 norm."""
    n, k = w.shape
    if n % block or k % block:
        raise ValueError(f"shape {tuple(w.shape)} is not a multiple of the block size {block}")
    tiles = w.reshape(n // block, block, k // block, block)
    norms = tiles.float().pow(2).sum(dim=(1, 3))
    n_zero = int(round(sparsity * norms.numel()))
    mask = torch.ones_like(norms, dtype=torch.bool)
    if n_zero:
        mask.view(-1)[norms.view(-1).argsort()[:n_zero]] = False
    w.mul_(mask[:, None, :, None].expand_as(tiles).reshape(n, k).to(w.dtype))
    return w


@torch.no_grad()
def scramble_(w: torch.Tensor, rows: bool = True, seed: int = 0) -> torch.Tensor:
    """Reorder w's columns (and, with rows, its rows) in place by a random permutation seeded by
    seed: the sparsity pattern is then hidden behind the permutation (see formats/permute.py)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, k = w.shape
    out = w
    if rows:
        out = out[torch.randperm(n, generator=g).to(w.device)]
    out = out[:, torch.randperm(k, generator=g).to(w.device)]
    w.copy_(out)
    return w


def prune(model: nn.Module, pattern: str = "2:4", *, block: int = 64, sparsity: float = 0.9,
          filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, permute: bool = False,
          seed: int = 0) -> list[str]:
    """Prune the weights of the model's nn.Linear layers in place; returns the pruned names.

    pattern "2:4": two nonzeros in every four inputs. pattern "block": `sparsity` of the
    block x block blocks set to zero. filter_fn(module, name) picks layers (default: every
    nn.Linear whose shape fits the pattern).

    permute=True (a demo and test helper): after pruning, each weight's rows and columns
    ("block") or its columns ("2:4") are shuffled by a random permutation (seeded by seed and the
    layer's position), so the pattern is there only behind a permutation, as after
    channel-permutation pruning: the model then computes something else than before the shuffle,
    as pruning already made it do. The compiler finds such weights with formats/permute.py.
    """
    if pattern not in ("2:4", "block"):
        raise ValueError(f"pattern must be '2:4' or 'block', got {pattern!r}")
    done = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        n, k = mod.weight.shape
        fits = k % 4 == 0 if pattern == "2:4" else (n % block == 0 and k % block == 0)
        if not (filter_fn(mod, name) if filter_fn is not None else fits):
            continue
        if pattern == "2:4":
            prune_24_(mod.weight.data)
        else:
            prune_blocks_(mod.weight.data, block, sparsity)
        if permute:
            scramble_(mod.weight.data, rows=pattern == "block", seed=seed + len(done))
        done.append(name)
    return done
