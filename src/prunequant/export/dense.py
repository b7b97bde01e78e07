"""Dequantized export: a plain transformers checkpoint, written shard by shard."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..solvers.base import LayerResult
from .common import (DTYPES, analyse_linear, dtype_name, forget_mark, read_descriptor, save_config, write_descriptor,
                     write_extras, write_whole_model)
from .integrity import ShardWriter, parse_size, check_integrity

FORMAT = "dense"


class DenseWriter:
    """Writes a plain checkpoint as tensors come (whole model, or block by block)."""

    def __init__(self, root: Path, states: dict[str, LayerResult] | None, dtype: torch.dtype, *,
                 max_shard_size: int | str = "2GB"):
        dtype_name(dtype)
        self.root, self.states, self.dtype = root, states if states is not None else {}, dtype
        self.writer = ShardWriter(root, "model", parse_size(max_shard_size))
        self.layers: dict[str, dict] = {}

    def add(self, key: str, t: torch.Tensor, module_of) -> None:
        self.writer.add({key: t.to(self.dtype) if t.is_floating_point() else t})
        name = key[:-7] if key.endswith(".weight") else None
        if name in self.states:  # only the per-layer record (sparsity, bits) used by size_report
            self.layers[name] = {**analyse_linear(name, module_of(name), self.states[name]).record,
                                 "stored_as": "float"}

    def close(self, model, tied: dict, tokenizer=None, extra_files: dict | None = None) -> None:
        save_config(model, self.root, self.dtype)
        self.writer.close()
        write_descriptor(self.root, FORMAT, self.dtype, self.layers, tied=tied)
        write_extras(self.root, tokenizer, extra_files)


def save_dense(model, out_dir: str | Path, dtype: torch.dtype = torch.float16, *,
               states: dict[str, LayerResult] | None = None, max_shard_size: int | str = "2GB",
               overwrite: bool = False, tokenizer=None, extra_files: dict | None = None) -> Path:
    """Write every weight in ``dtype`` as a standard sharded safetensors checkpoint any tool can load."""
    dtype_name(dtype)
    return write_whole_model(model, Path(out_dir), overwrite,
                             lambda tmp: DenseWriter(tmp, states, dtype, max_shard_size=max_shard_size),
                             model.get_submodule, tokenizer, extra_files)


def load_dense(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               verify: bool = True):
    from transformers import AutoModelForCausalLM

    root = Path(path)
    if verify:
        check_integrity(root)
    desc = read_descriptor(root) or {}
    dtype = dtype or DTYPES.get(desc.get("dtype", ""), None) or "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad checkpoint
        raise ModelLoadError(f"cannot load {root} with transformers: {e}") from None
    forget_mark(model)
    return model.to(device).eval()
