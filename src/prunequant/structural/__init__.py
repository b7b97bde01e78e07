"""Structural pruning, channel-level mixed precision and their joint global-error allocation."""
from .prune import StructuredReport, block_influence, prune_structured, remove_blocks
from .surgery import drop_blocks, load_structured, prune_block, save_structured

__all__ = ["StructuredReport", "block_influence", "prune_structured", "remove_blocks", "drop_blocks",
           "load_structured", "prune_block", "save_structured"]
