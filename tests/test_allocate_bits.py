import itertools
import math
import random

import pytest
import torch

from prunequant.accounting import tcr_bits as bits_cost
from prunequant.allocate_bits import allocate_bits, average_bits, overhead_per_param
from prunequant.errors import RecipeError
from prunequant.recipe import QuantSpec
from prunequant.solvers.base import LayerStats


def _brute(sens, n_params, avg, oh):
    names = list(sens)
    best, arg = math.inf, None
    total = sum(n_params.values())
    for combo in itertools.product(*(sorted(sens[n]) for n in names)):
        cost = sum(n_params[n] * (bits_cost(b) + oh.get(b, 0)) for n, b in zip(names, combo))
        if cost <= avg * total + 1e-9:
            err = sum(sens[n][b] for n, b in zip(names, combo))
            if err < best:
                best, arg = err, dict(zip(names, combo))
    return best, arg


def _instance(seed, n_layers=5, bits=(2, 3, 4, 8)):
    rng = random.Random(seed)
    n_params = {f"l{i}": rng.choice([64, 128, 256, 512]) * rng.randint(1, 4) for i in range(n_layers)}
    sens = {}
    for n in n_params:
        base = rng.uniform(0.1, 10)
        sens[n] = {b: base * 4.0 ** (-b) * rng.uniform(0.5, 1.5) for b in bits}
    return sens, n_params


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg", [2.3, 2.75, 3.0, 3.6, 5.0])
def test_knapsack_equals_brute_force(seed, avg):
    sens, n_params = _instance(seed)
    oh = {b: overhead_per_param(b, 128) for b in (2, 3, 4, 8)}
    best, _ = _brute(sens, n_params, avg, oh)
    if best == math.inf:
        with pytest.raises(RecipeError):
            allocate_bits(sens, n_params, avg, oh)
        return
    got = allocate_bits(sens, n_params, avg, oh)
    assert sum(sens[n][b] for n, b in got.items()) == pytest.approx(best, rel=1e-12)
    assert average_bits(got, n_params, 128) <= avg + 1e-12


def test_knapsack_coarse_grid_respects_budget():
    sens, n_params = _instance(1, n_layers=6, bits=(1.58, 2, 3, 4))
    got = allocate_bits(sens, n_params, 2.6, max_units=500)  # log2(3) costs: rounded-up grid
    cost = sum(n_params[n] * bits_cost(b) for n, b in got.items()) / sum(n_params.values())
    assert cost <= 2.6
    best, _ = _brute(sens, n_params, 2.6, {})
    assert sum(sens[n][b] for n, b in got.items()) <= best * 1.2


def test_infeasible_budget_raises():
    sens, n_params = _instance(0)
    with pytest.raises(RecipeError, match="infeasible"):
        allocate_bits(sens, n_params, 1.9)
    with pytest.raises(RecipeError, match="infeasible"):
        allocate_bits(sens, n_params, 2.0, {2: 0.25, 3: 0.25, 4: 0.25, 8: 0.25})


def test_average_bits_overhead():
    n = {"a": 1000, "b": 3000}
    assert average_bits({"a": 4, "b": 2}, n, group_size=128) == pytest.approx(
        (1000 * (4 + 20 / 128) + 3000 * (2 + 18 / 128)) / 4000)
    assert average_bits({"a": 4}, n, group_size=128, symmetric=True) == pytest.approx(4 + 16 / 128)
    assert average_bits({"a": 4}, n, group_size=0, in_features={"a": 64}) == pytest.approx(4 + 20 / 64)
    assert average_bits({"a": 1}, n, overhead={"a": 0.1}) == pytest.approx(1.1)
    with pytest.raises(ValueError):
        average_bits({"a": 4}, n, group_size=0)
