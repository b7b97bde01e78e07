"""End-to-end refinement: block-wise (``BlockRefiner``) and global (``global_refine``); docs/internals.md."""
from .blockwise import BlockRefiner, block_error
from .global_kl import global_refine, teacher_topk, topk_kl
from .weights import BinaryWeight, MaskedWeight, UniformWeight, make_view

__all__ = ["BinaryWeight", "BlockRefiner", "MaskedWeight", "UniformWeight", "block_error", "global_refine",
           "make_view", "teacher_topk", "topk_kl"]
