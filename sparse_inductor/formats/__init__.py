"""Compressed weight formats: pure tensor code, no torch.fx and no Inductor (docs/formats.md)."""
from .block import BLOCK_SIZES, BlockSparse, block_nonzero_map, compress_block, decompress_block
from .sparse24 import (compress_24, decompress_24, from_gemv_layout, gemv_layout_ok, is_24, mask_24, to_gemv_layout,
                       violations_24)

__all__ = [
    "BLOCK_SIZES", "BlockSparse", "block_nonzero_map", "compress_block", "decompress_block",
    "compress_24", "decompress_24", "from_gemv_layout", "gemv_layout_ok", "is_24", "mask_24", "to_gemv_layout",
    "violations_24",
]
