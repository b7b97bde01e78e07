"""Weight quantization solvers on uniform grids: round-to-nearest and GPTQ.

Pure tensor functions: a weight (out, in), optional statistics and a QuantSpec in, a LayerResult out.
The returned weight is always exactly ``QuantState.dequantize()`` of the returned state.
"""
from __future__ import annotations

import torch

from .base import LayerResult, LayerStats, QuantState
from .grid import (TERNARY_BITS, dequantize_codes, fit_grid, group_index, maxq_of, quantize_grouped,
                   quantize_to_grid)
from ..recipe import QuantSpec


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _check(W: torch.Tensor, mask: torch.Tensor | None) -> None:
    if W.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(W.shape)}")
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(W.shape)}")


def _is_symmetric(spec: QuantSpec) -> bool:
    return spec.symmetric or spec.bits == TERNARY_BITS


def _state(spec: QuantSpec, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           g_idx: torch.Tensor) -> QuantState:
    return QuantState(kind="uniform", bits=spec.bits, group_size=spec.group_size, symmetric=_is_symmetric(spec),
                      codes=codes.to(torch.uint8), scale=scale.float(), zero=zero.float(), g_idx=g_idx.int())


def _finish(state: QuantState, mask: torch.Tensor | None, info: dict, dtype: torch.dtype) -> LayerResult:
    weight = state.dequantize()
    if mask is not None:
        # codes of pruned weights equal their zero point, so they dequantize to exactly 0 already
        assert not weight[~mask].any(), "pruned weights must dequantize to 0"
    return LayerResult(weight=weight.to(torch.float32 if dtype != torch.float64 else dtype), mask=mask,
                       quant=state, info=info)


def layer_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Layer objective mean_x ‖(W − Q) x‖² = tr(ΔW H ΔWᵀ) with H the mean of x xᵀ."""
    D = (W - Q).to(H.dtype)
    return float(((D @ H) * D).sum())


def rtn_quantize(W: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None = None) -> LayerResult:
    """Round-to-nearest onto per-group grids. With a mask, pruned weights stay exactly 0 and the grid
    is fitted on the kept weights only."""
    _check(W, mask)
    dt = _work_dtype(W)
    Wf = W.to(dt)
    if mask is not None:
        Wf = torch.where(mask, Wf, torch.zeros((), dtype=dt, device=W.device))
    maxq = maxq_of(spec.bits)
    scale, zero = fit_grid(Wf, spec.bits, spec.group_size, _is_symmetric(spec), spec.mse_clip)
    # Round scale/zero through float32 (how they are stored) so that codes are chosen on the stored grid.
    scale, zero = scale.float().to(dt), zero.float().to(dt)
    g_idx = group_index(W.shape[1], spec.group_size, W.device)
    codes = quantize_grouped(Wf, scale, zero, maxq, g_idx)
    state = _state(spec, codes, scale, zero, g_idx)
    return _finish(state, mask, {"method": "rtn", "spec": spec.describe()}, W.dtype)
