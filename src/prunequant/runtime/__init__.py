"""Inference with packed low-bit weights: QuantLinear (Triton / torch int4 / torch int8 kernels, a CPU path)
and the swap of a compressed model's linears for them (``pack_model``)."""
from .convert import backend_summary, default_backends, pack_model, segments_of, state_weight
from .fuse import fuse_siblings
from .load import load_packed
from .qlinear import (BACKENDS, SMALL_M, QuantLinear, Unsupported, build_quant_linear, module_bytes, pack_codes,
                      set_runtime_mode, unpack_codes)

__all__ = ["BACKENDS", "SMALL_M", "QuantLinear", "Unsupported", "backend_summary", "build_quant_linear",
           "default_backends", "fuse_siblings", "load_packed", "module_bytes", "pack_codes", "pack_model", "segments_of", "set_runtime_mode",
           "state_weight", "unpack_codes"]
