"""Structural pruning, channel-level mixed precision and their joint global-error allocation.

- ``prune_structured`` / ``remove_blocks``: heads (GQA-consistent) + MLP channels by FLAP / Wanda-like
  importance with bias compensation; whole blocks by Block Influence. ``save_structured`` /
  ``load_structured`` keep the per-layer shapes in the config.
- ``mixed_quantize``: one matrix, high-bit and low-bit input channels, GPTQ with per-column bit widths.
- ``learn_global_allocation`` → ``Allocation`` → ``apply_allocation``: keep / high / low per channel,
  learnt against the model's own output under one budget of bits per original weight.
"""
from .allocation import Allocation, LayerAllocation, LayerDims, discretize, layer_bits, model_dims
from .apply import ApplyReport, apply_allocation
from .global_error import MaskLogits, layerwise_allocation, learn_global_allocation, spec_from_choices
from ..solvers.mixed import MixSpec, dequantize_mixed, matrix_bits, mixed_quantize
from .prune import StructuredReport, block_influence, prune_structured, remove_blocks
from .simulate import Simulator, allocation_kl
from .surgery import drop_blocks, load_structured, prune_block, save_structured

__all__ = ["Allocation", "LayerAllocation", "LayerDims", "discretize", "layer_bits", "model_dims",
           "ApplyReport", "apply_allocation", "MaskLogits", "layerwise_allocation", "learn_global_allocation",
           "spec_from_choices", "MixSpec", "dequantize_mixed", "matrix_bits", "mixed_quantize",
           "StructuredReport", "block_influence", "prune_structured", "remove_blocks", "Simulator",
           "allocation_kl", "drop_blocks", "load_structured", "prune_block", "save_structured"]
