"""Export and reload of compressed models, with size accounting and integrity checks (docs/format.md)."""
from __future__ import annotations

from pathlib import Path

import torch

from .compact import load_compact, save_compact
from .ctensors import load_compressed_tensors, save_compressed_tensors
from .dense import load_dense, save_dense
from .integrity import ExportError, check_integrity, verify_manifest
from .size import detect_format, print_size_report, size_report, size_tables

FORMATS = ("compact", "compressed-tensors", "dense")

__all__ = ["FORMATS", "ExportError", "check_integrity", "detect_format", "export", "load_compact", "load_compressed_tensors",
           "load_dense", "load_checked", "load_exported", "print_size_report", "save_compact", "save_compressed_tensors",
           "save_dense", "size_report", "size_tables", "verify_manifest"]


def export(model, states: dict | None, out_dir: str | Path, fmt: str = "compact",
           dtype: torch.dtype = torch.float16, **kwargs) -> Path:
    """Save ``model`` in one of FORMATS; kwargs go to the format's save function."""
    if fmt == "compact":
        return save_compact(model, states or {}, out_dir, dtype, **kwargs)
    if fmt == "compressed-tensors":
        return save_compressed_tensors(model, states or {}, out_dir, dtype, **kwargs)
    if fmt == "dense":
        return save_dense(model, out_dir, dtype, states=states, **kwargs)
    raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def load_exported(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  verify: bool = True):
    """Load any export (format detected) after checking its manifest; returns (model, format_name)."""
    path = Path(path)
    check_integrity(path, verify)
    return load_checked(path, dtype, device)


def load_checked(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load any export (format detected) whose files the caller has already checked (``check_integrity``)."""
    path = Path(path)
    fmt = detect_format(path)
    loader = {"compact": load_compact, "compressed-tensors": load_compressed_tensors, "dense": load_dense}[fmt]
    return loader(path, dtype=dtype, device=device, verify=False), fmt
