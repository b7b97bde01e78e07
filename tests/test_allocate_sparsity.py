import pytest
import torch

from prunequant.allocate_sparsity import owl_sparsity, outlier_ratio
from prunequant.errors import RecipeError
from prunequant.solvers.base import LayerStats


def _mean(s, params=None):
    w = params or {k: 1 for k in s}
    return sum(s[k] * w[k] for k in s) / sum(w.values())


def test_owl_orders_by_outliers_and_keeps_mean():
    ratios = {0: 0.02, 1: 0.10, 2: 0.05, 3: 0.01, 4: 0.07}
    s = owl_sparsity(ratios, 0.6, lam=0.08)
    assert _mean(s) == pytest.approx(0.6, abs=1e-12)
    order_by_ratio = sorted(ratios, key=ratios.get)
    assert [s[k] for k in order_by_ratio] == sorted(s.values(), reverse=True)  # more outliers, less sparse
    assert max(s.values()) - min(s.values()) == pytest.approx(0.16)  # spans 2λ
    assert all(0.6 - 0.16 <= v <= 0.6 + 0.16 for v in s.values())


def test_owl_matches_reference_formula_for_equal_blocks():
    ratios = {0: 0.3, 1: 0.1, 2: 0.2}
    s = owl_sparsity(ratios, 0.5, lam=0.1)
    # OWL: density = (r − min)/(max − min)·2λ, shifted to mean 1 − target
    dens = {k: (r - 0.1) / 0.2 * 0.2 for k, r in ratios.items()}
    mean = sum(dens.values()) / 3
    for k in ratios:
        assert s[k] == pytest.approx(1 - (dens[k] - mean + 0.5))


def test_owl_parameter_weighted_mean():
    ratios = {0: 0.01, 1: 0.04, 2: 0.02}
    params = {0: 100, 1: 300, 2: 50}
    s = owl_sparsity(ratios, 0.5, lam=0.1, params=params)
    assert _mean(s, params) == pytest.approx(0.5, abs=1e-12)
    assert s[1] < s[2] < s[0]


def test_owl_clipping_still_keeps_mean():
    ratios = {i: r for i, r in enumerate([0.0, 0.01, 0.02, 0.5])}
    s = owl_sparsity(ratios, 0.95, lam=0.2)
    assert all(0.0 <= v <= 0.99 for v in s.values())
    assert max(s.values()) == pytest.approx(0.99)
    assert _mean(s) == pytest.approx(0.95, abs=1e-9)
    s = owl_sparsity(ratios, 0.02, lam=0.2)
    assert min(s.values()) == 0.0 and _mean(s) == pytest.approx(0.02, abs=1e-9)


def test_owl_degenerate_and_bad_inputs():
    assert owl_sparsity({0: 0.1, 1: 0.1}, 0.5) == {0: 0.5, 1: 0.5}
    assert owl_sparsity({}, 0.5) == {}
    with pytest.raises(RecipeError):
        owl_sparsity({0: 0.1}, 1.2)
    with pytest.raises(RecipeError):
        owl_sparsity({0: 0.1}, 0.5, lam=-0.1)
    with pytest.raises(ValueError):
        owl_sparsity({0: 0.1, 1: 0.2}, 0.5, params={0: 10})


def test_outlier_ratio_counts_scores_above_m_times_mean():
    W = torch.ones(4, 10)
    W[0, 0] = W[2, 5] = 1000.0
    stats = LayerStats(None, torch.ones(10), 1)
    n, total = outlier_ratio(W, stats, M=5.0)
    assert (n, total) == (2, 40)  # mean ≈ 50.95, threshold ≈ 255: only the two big ones
    stats = LayerStats(None, torch.full((10,), 4.0), 1)  # ‖x‖ = 2 everywhere: same ratio
    assert outlier_ratio(W, stats, M=5.0) == (2, 40)
    assert outlier_ratio(W, stats, M=5.0, mean=0.1) == (40, 40)  # block mean given by the caller
    with pytest.raises(RecipeError):
        outlier_ratio(W, stats, M=0)
