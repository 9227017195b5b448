"""What identifies this build of the package in every cache key: its version and a hash of its
sources (the FX graph cache key of the pass, passes/manager.py; the timing cache, measure.py)."""
from __future__ import annotations

import functools
import pathlib

from torch._inductor.custom_graph_pass import get_hash_for_files  # Inductor's own file hash, as its caches use

__version__ = "0.1.0"

__all__ = ["__version__", "source_hash"]


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A hash of every source file of this package (hex)."""
    root = pathlib.Path(__file__).resolve().parent
    files = tuple(sorted(str(p) for p in root.rglob("*.py")))
    return get_hash_for_files(files).hex()
