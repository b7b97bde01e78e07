"""Models: architectures as data (arch.py) and loading from every source (load.py)."""
from .arch import (ARCHITECTURES, BOS_FIRST, NORM_BEFORE, ArchSpec, Structure, all_linear_names, arch_of, base_model,
                   block_linears, bos_first, get_blocks, get_weight, max_length, named_linears, norm_groups,
                   prepend_bos, set_blocks, set_weight)
from .load import ASSEMBLED, EMBEDDED, checkpoint_dtype, load_model, package_dir, resolve_model

__all__ = ["ARCHITECTURES", "BOS_FIRST", "NORM_BEFORE", "ArchSpec", "Structure", "all_linear_names", "arch_of",
           "base_model", "block_linears", "bos_first", "get_blocks", "get_weight", "max_length", "named_linears",
           "norm_groups", "prepend_bos", "set_blocks", "set_weight", "ASSEMBLED", "EMBEDDED", "checkpoint_dtype",
           "load_model", "package_dir", "resolve_model"]
