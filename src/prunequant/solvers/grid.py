"""Uniform quantization grids: fit (scale, zero) per output row and column group, round onto them (docs/methods.md)."""
from __future__ import annotations

import math

import torch

TERNARY_BITS = 1.58
# Smallest scale we allow: a group whose range is (almost) zero would otherwise give 0/0 = NaN.
_MIN_SCALE = 1e-12


def maxq_of(bits: float) -> int:
    """Largest integer code for a bit width (2 for ternary)."""
    if bits == TERNARY_BITS:
        return 2
    b = int(bits)
    if b != bits or not 1 <= b <= 8:
        raise ValueError(f"unsupported bit width {bits}; use 1..8 or 1.58 (ternary)")
    return 2**b - 1


def n_groups_of(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx: the group of every input column (int32), static layout arange(in) // group_size."""
    idx = torch.arange(in_features, device=device, dtype=torch.int32)
    return torch.zeros_like(idx) if group_size <= 0 else idx // group_size


_FP16_MIN = 2.0 ** -24  # smallest positive fp16 (subnormal)


def _grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, symmetric: bool):
    """scale/zero for ranges with xmin <= 0 <= xmax (elementwise)."""
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = _fp16_ceil(2 * amax / maxq)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = _fp16_ceil((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _fp16_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= scale (docs/internals.md)."""
    s = scale.clamp(_FP16_MIN, 65504.0)
    h = s.to(torch.float16)
    low = h.to(s.dtype) < s
    h = torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.to(scale.dtype)


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (in w's float dtype) of w on the grid; scale/zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round w onto the grid and back (the value the model will see)."""
    return dequantize_codes(quantize_to_grid(w, scale, zero, maxq), scale, zero)


def _grouped(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) -> (rows, n_groups, group_size), zero-padded (zeros never move min/max or error)."""
    rows, cols = W.shape
    gs = cols if group_size <= 0 else group_size
    ng = n_groups_of(cols, group_size)
    pad = ng * gs - cols
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    return W.reshape(rows, ng, gs)


def fit_grid(
    W: torch.Tensor,
    bits: float,
    group_size: int = 0,
    symmetric: bool = False,
    mse_clip: bool = False,
    *,
    mask: torch.Tensor | None = None,
    maxshrink: float = 0.8,
    grid_points: int = 100,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row and group of ``group_size`` columns (0: one per row): (scale, zero), each (rows, n_groups)
    in W's float dtype, fitted on the kept weights with a ``mask``; ``mse_clip`` as in GPTQ."""
    if W.dim() != 2:
        raise ValueError(f"fit_grid expects a 2-D (rows, cols) tensor, got shape {tuple(W.shape)}")
    maxq = maxq_of(bits)
    symmetric = symmetric or bits == TERNARY_BITS
    x = W if W.dtype in (torch.float32, torch.float64) else W.float()
    if mask is not None:
        # Pruned weights become 0; 0 already lies inside every range and quantizes exactly, so the
        # fitted grid depends on the kept weights only.
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    xg = _grouped(x, group_size)  # (rows, ng, gs)
    xmin = xg.amin(dim=2).clamp_max(0)
    xmax = xg.amax(dim=2).clamp_min(0)
    scale, zero = _grid_from_range(xmin, xmax, maxq, symmetric)
    if mse_clip:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(maxshrink * grid_points)):
            p = 1 - i / grid_points
            s1, z1 = _grid_from_range(p * xmin, p * xmax, maxq, symmetric)
            q = fake_quantize(xg, s1.unsqueeze(2), z1.unsqueeze(2), maxq)
            err = (q - xg).abs_().pow_(norm).sum(dim=2)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


def quantize_grouped(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                     g_idx: torch.Tensor) -> torch.Tensor:
    """Codes (float, W's shape) of a whole matrix given per-group grids and each column's group."""
    g = g_idx.long()
    return quantize_to_grid(W, scale[:, g], zero[:, g], maxq)
