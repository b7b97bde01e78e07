"""Semantic retention (Sr) and the retention-compression score SrCr_λ = Sr · (16 / b)^λ (docs/srcr.md)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ..errors import PrunequantError

BASE_BITS = 16.0


def semantic_retention(ratios: Mapping[str, float], weights: Mapping[str, float] | None = None) -> float:
    """Sr: the (optionally weighted) mean of retention ratios, each clipped below at 0."""
    if not ratios:
        raise PrunequantError("no retention measures given: Sr needs at least one ratio (e.g. {'ppl_wiki': 0.9})")
    total = wsum = 0.0
    for name, r in ratios.items():
        r = float(r)
        if not math.isfinite(r):
            raise PrunequantError(f"retention ratio {name!r} is {r}: every measure must be a finite number")
        w = 1.0 if weights is None else float(weights.get(name, 0.0))
        if w < 0 or not math.isfinite(w):
            raise PrunequantError(f"weight of measure {name!r} is {w}: weights must be finite and >= 0")
        total += w * max(r, 0.0)
        wsum += w
    if wsum <= 0:
        raise PrunequantError("all measure weights are 0: give at least one measure a positive weight")
    return total / wsum


def _check(sr: float, lam: float) -> None:
    if not math.isfinite(sr) or sr < 0:
        raise PrunequantError(f"Sr = {sr} must be a finite number >= 0 (a mean of retention ratios)")
    if not math.isfinite(lam) or lam < 0:
        raise PrunequantError(f"compression weight λ = {lam} must be >= 0 (0 = Sr alone, 1 = Sr per stored bit)")


def _check_config(sparsity: float, bits: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise PrunequantError(f"sparsity {sparsity} is outside [0, 1)")
    if not 0.0 < bits <= BASE_BITS:
        raise PrunequantError(f"bit width {bits} is outside (0, 16]; 16 is the uncompressed baseline")


def stored_bits(sparsity: float = 0.0, bits: float = BASE_BITS) -> float:
    """Bits stored per weight, overheads excluded: q · (1 − s) (= 16 · (1 − TCr))."""
    _check_config(sparsity, bits)
    return bits * (1.0 - sparsity)


def srcr_from_rate(sr: float, rate: float, lam: float = 1.0) -> float:
    """SrCr from any compression rate in [0, 1) against 16 bits (TCr, or the overhead-inclusive rate)."""
    _check(sr, lam)
    if not 0.0 <= rate < 1.0:
        raise PrunequantError(f"compression rate {rate} is outside [0, 1)")
    return sr * (1.0 - rate) ** (-lam)


def srcr(sr: float, sparsity: float = 0.0, bits: float = BASE_BITS, lam: float = 1.0) -> float:
    """SrCr_λ = Sr · (16 / (q · (1 − s)))^λ for one uniform configuration."""
    _check(sr, lam)
    return sr * (BASE_BITS / stored_bits(sparsity, bits)) ** lam


def _param_weighted_mean(layers: Iterable[tuple[int, float, float]], per_layer) -> float:
    """The mean of ``per_layer(sparsity, bits)`` over (n_params, sparsity, bits) layers, weighted by n_params."""
    layers = list(layers)
    total = sum(n for n, _, _ in layers)
    if total <= 0:
        raise PrunequantError("per-layer SrCr needs at least one layer with a positive parameter count")
    return sum(n * per_layer(s, q) for n, s, q in layers) / total


def srcr_layers(sr: float, layers: Iterable[tuple[int, float, float]], lam: float = 1.0) -> float:
    """SrCr of per-layer mixed configurations: ``layers`` holds (n_params, sparsity, bits) per layer."""
    _check(sr, lam)
    return sr * (BASE_BITS / _param_weighted_mean(layers, stored_bits)) ** lam


# ---- reconstruction of the paper's form (for comparison only) ----------------------------------------

def _sqrt_log_exponent(sparsity: float, bits: float) -> float:
    _check_config(sparsity, bits)
    return math.log2(BASE_BITS / bits) + math.sqrt(sparsity)


def srcr_sqrt_log(sr: float, sparsity: float = 0.0, bits: float = BASE_BITS, lam: float = 1.0) -> float:
    """Reconstruction, NOT the paper's verified formula: Sr · 2^(λ · (log2(16/q) + √s)) (docs/srcr.md)."""
    _check(sr, lam)
    return sr * 2.0 ** (lam * _sqrt_log_exponent(sparsity, bits))


def srcr_sqrt_log_layers(sr: float, layers: Iterable[tuple[int, float, float]], lam: float = 1.0) -> float:
    """Per-layer form of the reconstruction: parameter-weighted mean of the exponent."""
    _check(sr, lam)
    return sr * 2.0 ** (lam * _param_weighted_mean(layers, _sqrt_log_exponent))


def relative_gain(sr_a: float, sr_b: float) -> float:
    """How much more a keeps than b, as a fraction (the paper's '+20%' is relative_gain(joint, quant) = 0.2)."""
    if sr_b <= 0:
        raise PrunequantError(f"cannot compare against Sr = {sr_b}: the reference retains nothing")
    return sr_a / sr_b - 1.0
