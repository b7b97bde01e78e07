"""Compression rates of a compressed model: theoretical (TCr) and with real storage overheads.

TCr counts only the weights of the compressed layers at 16 bits baseline:
``1 − Σ n·q·(1−s) / (16·Σ n)``. The overhead figure adds what a real format must also store — group
scales and zero points (16 bits each), the sparsity mask (1 bit per weight for unstructured,
log2 C(m, n)/m bits per weight for N:M) — and counts every other parameter (embeddings, norms,
lm_head) at 16 bits, over the whole model.
"""
from __future__ import annotations

import math

from .recipe import tcr_layers


def mask_bits_per_weight(layer: dict) -> float:
    p = layer.get("prune") or ""
    if not p or layer.get("sparsity", 0) == 0:
        return 0.0
    nm = layer.get("nm")
    if nm:
        n, m = nm
        return math.log2(math.comb(m, n)) / m
    return 1.0


def layer_bits(layer: dict) -> float:
    """Bits to store one layer including overheads."""
    n = layer["n_params"]
    out_f, in_f = layer["shape"]
    bits = layer.get("avg_bits") or layer["bits"]
    s = layer.get("sparsity", 0.0)
    if layer.get("quant"):
        value_bits = n * (1 - s) * bits
        gs = layer.get("group_size") or in_f
        groups = out_f * math.ceil(in_f / gs)
        sym = " sym" in layer["quant"]
        value_bits += groups * (16 + (0 if sym else 16))
    else:
        value_bits = n * (1 - s) * 16
    return value_bits + n * mask_bits_per_weight(layer)


def summarize(layers: dict[str, dict], n_params_total: int, linear_names: list[str] | None = None) -> dict:
    """TCr over the block linears (untouched ones count as dense 16-bit) and the overhead-inclusive rate."""
    rows = list(layers.values())
    seen = {r["name"] for r in rows}
    dense_params = 0
    extra_dense = []
    for name, n in (linear_names or []):
        if name not in seen:
            extra_dense.append((n, 0.0, 16.0))
            dense_params += n
    tcr = tcr_layers([(r["n_params"], r.get("sparsity", 0.0), float(r.get("avg_bits") or r["bits"])) for r in rows]
                     + extra_dense)
    linear_params = sum(r["n_params"] for r in rows) + dense_params
    stored_bits = sum(layer_bits(r) for r in rows) + 16 * (n_params_total - sum(r["n_params"] for r in rows))
    return {
        "tcr": tcr,
        "compressed_params": sum(r["n_params"] for r in rows),
        "linear_params": linear_params,
        "total_params": n_params_total,
        "bits_per_param_linears": (sum(layer_bits(r) for r in rows) + 16 * dense_params) / max(linear_params, 1),
        "rate_with_overheads": 1 - stored_bits / (16 * n_params_total),
        "mean_sparsity": sum(r["n_params"] * r.get("sparsity", 0.0) for r in rows) / max(linear_params, 1),
    }
