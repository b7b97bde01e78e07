"""The Triton kernels as torch custom ops, so that ``torch.compile`` can trace a model of packed layers.

Eagerly the layers call the kernels directly (no op dispatch on the decode path). While torch.compile
traces, they call these ops instead: the compiled graph fuses the element-wise work between the layers
(norms, RoPE, residual adds: most of a batch-1 decode step besides the weights) and calls each kernel,
tuned at run time, as one opaque node.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from . import triton_wmm


def segment_view(codes, scale, zero, cols, bits, group_size, k, meta=None):
    """What the kernels read of a segment (codes, grid, columns, 2:4 positions), without the module."""
    return SimpleNamespace(codes=codes, scale=scale, zero=zero, cols=cols, bits=bits, group_size=group_size, k=k,
                           meta=meta)


@torch.library.custom_op("prunequant::packed_mm", mutates_args=())
def packed_mm(x: torch.Tensor, codes: list[torch.Tensor], scales: list[torch.Tensor], zeros: list[torch.Tensor],
              cols: list[Optional[torch.Tensor]], bits: list[int], group_sizes: list[int], ks: list[int], n: int,
              bias: Optional[torch.Tensor], metas: list[Optional[torch.Tensor]]) -> torch.Tensor:
    segs = [segment_view(*a) for a in zip(codes, scales, zeros, cols, bits, group_sizes, ks, metas)]
    return triton_wmm.matmul(x, segs, n, bias)


@packed_mm.register_fake
def _packed_mm_fake(x, codes, scales, zeros, cols, bits, group_sizes, ks, n, bias, metas):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("prunequant::packed_dequant", mutates_args=())
def packed_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                   k: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(codes.shape[0], k, device=codes.device, dtype=dtype)
    return triton_wmm.dequantize_into(segment_view(codes, scale, zero, None, bits, group_size, k), out, 0)


@packed_dequant.register_fake
def _packed_dequant_fake(codes, scale, zero, bits, group_size, k, dtype):
    return codes.new_empty((codes.shape[0], k), dtype=dtype)


def matmul(x: torch.Tensor, segments: list, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``triton_wmm.matmul``; through the custom op while torch.compile traces."""
    if not torch.compiler.is_compiling():
        return triton_wmm.matmul(x, segments, n, bias)
    return packed_mm(x, [s.codes for s in segments], [s.scale for s in segments], [s.zero for s in segments],
                     [s.cols for s in segments], [s.bits for s in segments], [s.group_size for s in segments],
                     [s.k for s in segments], n, bias, [getattr(s, "meta", None) for s in segments])


def dequantize_into(seg, out: torch.Tensor, col0: int) -> torch.Tensor:
    """``triton_wmm.dequantize_into``; through the custom op while torch.compile traces."""
    if not torch.compiler.is_compiling():
        return triton_wmm.dequantize_into(seg, out, col0)
    out[:, col0:col0 + seg.k] = packed_dequant(seg.codes, seg.scale, seg.zero, seg.bits, seg.group_size, seg.k,
                                               out.dtype)
    return out
