"""Mixed precision per layer: bit widths under an average-bit budget, a knapsack (docs/internals.md)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .accounting import grid_bits_per_weight, tcr_bits
from .errors import RecipeError
from .recipe import QuantSpec


def overhead_per_param(bits: float, group_size: int, symmetric: bool = False,
                       in_features: int | None = None) -> float:
    """Scale/zero storage per weight of a grid at ``bits`` (per-channel needs ``in_features``)."""
    if group_size <= 0 and not in_features:
        raise ValueError("per-channel overhead needs in_features (the number of weights sharing one scale)")
    spec = QuantSpec(method="billm" if bits == 1 else "rtn", bits=bits, group_size=max(group_size, 0),
                     symmetric=symmetric)
    return grid_bits_per_weight(spec, in_features)


def _to_int_costs(costs: list[list[float]], budget: float, max_units: int):
    """Integer costs and budget: exact common unit when one exists, else rounded up onto a grid."""
    fr = [[Fraction(c).limit_denominator(10**6) for c in row] for row in costs]
    exact = all(abs(float(f) - c) <= 1e-9 * max(1.0, abs(c)) for row, frow in zip(costs, fr) for c, f in zip(row, frow))
    if exact:
        den = math.lcm(*(f.denominator for row in fr for f in row))
        ints = [[int(f * den) for f in row] for row in fr]
        g = math.gcd(*(v for row in ints for v in row)) or 1
        units = math.floor(Fraction(budget).limit_denominator(10**6) * den / g + Fraction(1, 10**9))
        if units <= max_units:
            return [[v // g for v in row] for row in ints], units, True
    unit = budget / max_units
    return [[math.ceil(c / unit - 1e-9) for c in row] for row in costs], max_units, False


def allocate_bits(
    sensitivity: dict[str, dict[float, float]],
    n_params: dict[str, int],
    avg_bits: float,
    overhead_bits: dict[float, float] | None = None,
    max_units: int = 200_000,
) -> dict[str, float]:
    """Bits per layer minimising Σ sensitivity[layer][bits] with average storage (overheads in) ≤ ``avg_bits``."""
    names = list(sensitivity)
    if not names:
        return {}
    missing = [n for n in names if n not in n_params]
    if missing:
        raise ValueError(f"n_params lacks layer(s) {missing[:5]}")
    overhead_bits = overhead_bits or {}
    options, costs, errs = [], [], []
    for name in names:
        opts = sorted(sensitivity[name])
        if not opts:
            raise RecipeError(f"layer {name!r} has no candidate bit width")
        e = [float(sensitivity[name][b]) for b in opts]
        if not all(math.isfinite(x) for x in e):
            raise ValueError(f"sensitivity of layer {name!r} is not finite: {dict(zip(opts, e))}")
        options.append(opts)
        errs.append(e)
        costs.append([n_params[name] * (tcr_bits(b) + overhead_bits.get(b, 0.0)) for b in opts])
    total_n = sum(n_params[n] for n in names)
    budget = avg_bits * total_n
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget * (1 + 1e-12):
        raise RecipeError(
            f"average budget {avg_bits:g} bits is infeasible: the cheapest choice per layer already needs "
            f"{cheapest / total_n:.4f} bits per weight (including scale/zero overhead); raise the average "
            f"bits or offer lower bit widths / larger groups")

    icosts, units, _exact = _to_int_costs(costs, budget, max_units)
    # f[u] = least error of the layers so far within u units; choice[k, u] = option picked for layer k
    f = np.zeros(units + 1)
    choice = np.zeros((len(names), units + 1), dtype=np.int16)
    for k in range(len(names)):
        best = np.full(units + 1, np.inf)
        for o, (c, e) in enumerate(zip(icosts[k], errs[k])):
            if c > units:
                continue
            cand = np.full(units + 1, np.inf)
            cand[c:] = f[: units + 1 - c] + e
            better = cand < best
            best[better] = cand[better]
            choice[k, better] = o
        f = best
    if not np.isfinite(f[units]):
        raise RecipeError(f"average budget {avg_bits:g} bits is infeasible at the allocator's resolution; "
                          f"raise it slightly")
    out, u = {}, units
    for k in range(len(names) - 1, -1, -1):
        o = int(choice[k, u])
        out[names[k]] = options[k][o]
        u -= icosts[k][o]
    return {n: out[n] for n in names}


def average_bits(
    assign: dict[str, float],
    n_params: dict[str, int],
    group_size: int = 128,
    symmetric: bool = False,
    in_features: dict[str, int] | None = None,
    overhead: dict[str, float] | None = None,
) -> float:
    """Achieved storage bits per weight over the assigned layers, scale/zero overhead included."""
    total = bits = 0.0
    for name, b in assign.items():
        n = n_params[name]
        if overhead and name in overhead:
            oh = overhead[name]
        else:
            oh = overhead_per_param(b, group_size, symmetric, (in_features or {}).get(name))
        total += n
        bits += n * (tcr_bits(b) + oh)
    return bits / total if total else 0.0
