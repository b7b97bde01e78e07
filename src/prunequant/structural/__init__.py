"""Structural pruning (heads, MLP channels, whole blocks) and its joint allocation with channel-level precision."""
from ..solvers.mixed import MixSpec, dequantize_mixed, matrix_bits, mixed_quantize
from .allocation import Allocation, LayerAllocation, LayerDims, discretize, layer_bits, model_dims
from .apply import ApplyReport, apply_allocation
from .global_error import MaskLogits, layerwise_allocation, learn_global_allocation, spec_from_choices
from .prune import StructuredReport, block_influence, prune_structured, remove_blocks
from .simulate import Simulator, allocation_kl
from .surgery import drop_blocks, load_structured, prune_block, save_structured

__all__ = ["Allocation", "LayerAllocation", "LayerDims", "discretize", "layer_bits", "model_dims",
           "ApplyReport", "apply_allocation", "MaskLogits", "layerwise_allocation", "learn_global_allocation",
           "spec_from_choices", "MixSpec", "dequantize_mixed", "matrix_bits", "mixed_quantize",
           "StructuredReport", "block_influence", "prune_structured", "remove_blocks", "Simulator",
           "allocation_kl", "drop_blocks", "load_structured", "prune_block", "save_structured"]
