"""The storage ledger: bits of each layer from its typed specs, TCr and the real rate (docs/internals.md)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .solvers.base import LayerRecord
    from .recipe import LayerPlan, PruneSpec, QuantSpec

DENSE_BITS = 16
SCALE_BITS = 16
TERNARY = 1.58


def effective_bits(quant: QuantSpec | None) -> float:
    """Bits per weight TCr counts (ternary: log2 3)."""
    return float(DENSE_BITS) if quant is None else tcr_bits(quant.bits)


def tcr_bits(bits: float) -> float:
    return math.log2(3) if bits == TERNARY else float(bits)


def code_bits(bits: float) -> float:
    """Bits a stored code takes (ternary codes pack 5 to a byte)."""
    return 1.6 if bits == TERNARY else float(bits)


def zero_bits(quant: QuantSpec, bits: float | None = None) -> int:
    """A zero point is stored at the code width; symmetric and ternary grids have none."""
    b = quant.bits if bits is None else bits
    return 0 if quant.symmetric or b == TERNARY else math.ceil(code_bits(b))


def grid_bits_per_weight(quant: QuantSpec, in_features: int, bits: float | None = None) -> float:
    """Scale and zero point of one group, spread over the weights sharing it (a row when per-channel)."""
    span = quant.group_size if quant.group_size > 0 else in_features
    if not span:
        raise ValueError("per-channel grids need in_features (the number of weights sharing one scale)")
    return (SCALE_BITS + zero_bits(quant, bits)) / span


def nm_rank_bits(m: int, kept: int) -> int:
    """Bits per group of m naming which ``kept`` positions are kept."""
    return max(1, math.ceil(math.log2(math.comb(m, kept))))


def mask_bits(prune: PruneSpec | None, n_params: int, sparsity: float | None = None) -> float:
    s = (prune.sparsity if prune else 0.0) if sparsity is None else sparsity
    if prune is None or s == 0:
        return 0.0
    if prune.structured:
        return n_params / prune.m * nm_rank_bits(prune.m, prune.m - prune.n)
    return float(n_params)


def layer_bits(shape: tuple[int, int], plan: LayerPlan, sparsity: float | None = None,
               bits: float | None = None) -> float:
    """Stored bits of one layer (out, in) under ``plan``, with a measured ``sparsity`` or code ``bits`` if given."""
    out_f, in_f = shape
    n = out_f * in_f
    p, q = plan.prune, plan.quant
    s = (p.sparsity if p else 0.0) if sparsity is None else sparsity
    if q is not None and p is not None and plan.joint == "quantize-pruned":
        p, s = None, 0.0  # zeros are stored as codes like any weight, and no mask is kept
    kept = n * (1 - s)
    if q is None:
        values = DENSE_BITS * kept
    else:
        b = q.bits if bits is None else bits
        groups = out_f * (math.ceil(in_f / q.group_size) if q.group_size else 1)
        values = kept * code_bits(b) + groups * (SCALE_BITS + zero_bits(q, b))
    return values + mask_bits(p, n, s)


def tcr(sparsity: float = 0.0, bits: float = 16.0) -> float:
    """Theoretical compression rate against 16-bit weights: 1 − (q/16)(1 − s)."""
    return 1.0 - (bits / DENSE_BITS) * (1.0 - sparsity)


def tcr_layers(layers: list[tuple[int, float, float]]) -> float:
    """Per-layer mixed configurations: ``layers`` holds (n_params, sparsity, bits) per compressed layer."""
    total = sum(n for n, _, _ in layers)
    if total == 0:
        return 0.0
    return 1.0 - sum(n * q * (1 - s) for n, s, q in layers) / (DENSE_BITS * total)


def summarize(layers: dict[str, LayerRecord], plan_for: Callable[[str], LayerPlan], n_params_total: int,
              linear_names: list[tuple[str, int]] | None = None) -> dict:
    """Rates of a compressed model from the engine's per-layer records; untouched linears count as 16-bit."""
    rows = list(layers.values())
    seen = {r.name for r in rows}
    dense = [(n, 0.0, float(DENSE_BITS)) for name, n in (linear_names or []) if name not in seen]
    plans = {r.name: plan_for(r.name) for r in rows}
    theo = [(r.n_params, r.sparsity, effective_bits(plans[r.name].quant)) for r in rows]
    layer_total = sum(layer_bits(tuple(r.shape), plans[r.name], r.sparsity) for r in rows)
    compressed = sum(r.n_params for r in rows)
    dense_params = sum(n for n, _, _ in dense)
    linear_params = compressed + dense_params
    stored_bits = layer_total + DENSE_BITS * (n_params_total - compressed)
    return {
        "tcr": tcr_layers(theo + dense),
        "compressed_params": compressed,
        "compressed_bytes": layer_total / 8,
        "linear_params": linear_params,
        "total_params": n_params_total,
        "bits_per_param_linears": (layer_total + DENSE_BITS * dense_params) / max(linear_params, 1),
        "rate_with_overheads": 1 - stored_bits / (DENSE_BITS * n_params_total),
        "mean_sparsity": sum(r.n_params * r.sparsity for r in rows) / max(linear_params, 1),
    }
