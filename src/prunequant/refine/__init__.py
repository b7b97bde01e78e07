"""End-to-end refinement after the layer-wise solve: block-wise (``BlockRefiner``, an engine hook, against the
original block's outputs) and global (``global_refine``, KL to the original next-token distribution). Both
train only what the export format stores as continuous (weights.py); masks, bit widths and formats stay."""
from .blockwise import BlockRefiner, block_error
from .global_kl import global_refine, teacher_topk, topk_kl
from .weights import BinaryWeight, MaskedWeight, UniformWeight, make_view

__all__ = ["BinaryWeight", "BlockRefiner", "MaskedWeight", "UniformWeight", "block_error", "global_refine",
           "make_view", "teacher_topk", "topk_kl"]
