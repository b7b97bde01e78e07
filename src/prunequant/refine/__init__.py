"""End-to-end refinement after the layer-wise solve (issue: retention at TCr >= 0.875).

Block-wise (``BlockRefiner``, an engine hook): each compressed block against the original block's outputs
on its calibration inputs. Global (``global_refine``): KL to the original model's next-token
distribution on the calibration tokens. Both train only what the export format stores as continuous
(weights.py) and keep masks, bit widths and formats as they were.
"""
from .blockwise import BlockRefiner, block_error
from .global_kl import global_refine, teacher_topk, topk_kl
from .weights import BinaryWeight, MaskedWeight, UniformWeight, make_view

__all__ = ["BinaryWeight", "BlockRefiner", "MaskedWeight", "UniformWeight", "block_error", "global_refine",
           "make_view", "teacher_topk", "topk_kl"]
