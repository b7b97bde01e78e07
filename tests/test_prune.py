from dataclasses import replace

import pytest
import torch

from prunequant.errors import NumericalError, RecipeError
from prunequant.recipe import PruneSpec
from prunequant.solvers.base import LayerStats
from prunequant.solvers.hessian import layer_objective
from prunequant.solvers.prune import (
    magnitude_prune, nm_mask, sparsegpt_prune, unstructured_mask, wanda_prune,
)


def problem(out=16, inn=32, tokens=400, seed=0, dtype=torch.float32):
    """Correlated inputs like an LLM's: X = A·Z (rank inn/4) plus noise, uneven feature scales, two
    outlier features. (With extremely heavy-tailed scales, e.g. exp(1.5·N(0,1)), 1% damping relative to
    the mean diagonal swamps the small features and SparseGPT's unstructured mask can lose to Wanda's.)"""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(inn, inn // 4, generator=g, dtype=torch.float64)
    X = A @ torch.randn(inn // 4, tokens, generator=g, dtype=torch.float64)
    X += 0.3 * torch.randn(inn, tokens, generator=g, dtype=torch.float64)
    scale = torch.exp(0.5 * torch.randn(inn, 1, generator=g, dtype=torch.float64))
    scale[:2] *= 10
    X *= scale
    W = torch.randn(out, inn, generator=g, dtype=torch.float64)
    stats = LayerStats(hessian=(X @ X.T / tokens).to(dtype), sq_norm=(X ** 2).sum(1).to(dtype), n_tokens=tokens)
    return W.to(dtype), X, stats


SPECS = [PruneSpec(sparsity=0.5), PruneSpec(sparsity=0.7), PruneSpec(sparsity=0.3),
         PruneSpec(n=2, m=4), PruneSpec(n=4, m=8), PruneSpec(n=1, m=4)]


def _run(method, W, stats, spec, blocksize=8):
    spec = replace(spec, method=method, blocksize=blocksize)
    if method == "magnitude":
        return magnitude_prune(W, spec)
    return {"wanda": wanda_prune, "sparsegpt": sparsegpt_prune}[method](W, stats, spec)


# ---- masks ------------------------------------------------------------------------------------

def test_unstructured_mask_exact_counts():
    s = torch.randn(5, 20)
    m = unstructured_mask(s, 0.45, per_row=True)
    assert (m.sum(1) == 11).all()  # round(0.45 * 20) = 9 pruned per row
    assert (s[~m].reshape(5, 9).max(1).values <= s.masked_fill(~m, float("inf")).min(1).values).all()
    m = unstructured_mask(s, 0.45, per_row=False)
    assert int((~m).sum()) == 45 and s[~m].max() <= s[m].min()
    assert unstructured_mask(s, 0.0).all()


def test_nm_mask_exact_pattern():
    s = torch.randn(6, 24)
    for n, m in [(2, 4), (4, 8), (1, 4), (3, 8)]:
        keep = nm_mask(s, n, m)
        groups, sg = keep.reshape(6, -1, m), s.reshape(6, -1, m)
        assert ((~groups).sum(2) == n).all()
        pruned_max = sg.masked_fill(groups, -float("inf")).max(2).values
        kept_min = sg.masked_fill(~groups, float("inf")).min(2).values
        assert (pruned_max <= kept_min).all()


def test_bad_specs_raise_recipe_error():
    with pytest.raises(RecipeError):
        nm_mask(torch.randn(2, 10), 2, 4)  # 10 inputs: not a multiple of 4
    with pytest.raises(RecipeError):
        unstructured_mask(torch.randn(2, 4), 1.0)
    for kw in [dict(method="random"), dict(sparsity=1.0), dict(sparsity=-0.1), dict(n=4, m=4), dict(n=0, m=4),
               dict(damp=1.5)]:
        with pytest.raises(RecipeError):
            PruneSpec(**kw)
    W, _, stats = problem(inn=30)
    for method in ("magnitude", "wanda", "sparsegpt"):
        with pytest.raises(RecipeError, match="multiple of 4"):
            _run(method, W, stats, PruneSpec(n=2, m=4))


# ---- all solvers: exact sparsity, exact zeros, N:M pattern -------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_exact_sparsity_and_zeros(method, spec):
    W, _, stats = problem()
    r = _run(method, W, stats, spec)
    assert r.weight.dtype == torch.float32 and r.weight.shape == W.shape
    assert r.mask.dtype == torch.bool and r.mask.shape == W.shape
    assert (r.weight[~r.mask] == 0).all()
    assert torch.isfinite(r.weight).all()
    if spec.structured:
        assert ((~r.mask).reshape(16, -1, spec.m).sum(2) == spec.n).all()
    elif method == "magnitude":  # per layer
        assert int((~r.mask).sum()) == round(spec.sparsity * W.numel())
    else:  # per row
        assert ((~r.mask).sum(1) == round(spec.sparsity * 32)).all()
    if method != "sparsegpt":
        assert torch.equal(r.weight[r.mask], W[r.mask])  # no compensation
    assert "error" in r.info


def test_magnitude_per_row_and_wanda_scores():
    W, _, stats = problem()
    r = magnitude_prune(W, PruneSpec(sparsity=0.25), per_row=True)
    assert ((~r.mask).sum(1) == 8).all()
    r = wanda_prune(W, stats, PruneSpec(method="wanda", sparsity=0.5))
    expected = unstructured_mask(W.abs() * stats.sq_norm.sqrt(), 0.5, per_row=True)
    assert torch.equal(r.mask, expected)


def test_wanda_works_without_hessian():
    W, _, stats = problem()
    r = wanda_prune(W, LayerStats(None, stats.sq_norm, stats.n_tokens), PruneSpec(method="wanda", n=2, m=4))
    assert r.info["error"] is None and r.sparsity == 0.5


def test_sparsegpt_block_wide_selection_exact_layer_total():
    W, _, stats = problem()
    r = sparsegpt_prune(W, stats, PruneSpec(sparsity=0.6, blocksize=12), per_row=False)
    assert int((~r.mask).sum()) == round(0.6 * W.numel())


# ---- quality ordering on correlated inputs ------------------------------------------------------

@pytest.mark.parametrize("spec", [PruneSpec(sparsity=0.5), PruneSpec(n=2, m=4), PruneSpec(sparsity=0.7)],
                         ids=lambda s: s.describe())
def test_objective_sparsegpt_lt_wanda_lt_magnitude(spec):
    for seed in range(3):
        W, X, stats = problem(out=32, inn=64, tokens=1000, seed=seed)
        err = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            r = _run(method, W, stats, spec, blocksize=spec.blocksize)
            err[method] = float(((W.double() @ X - r.weight.double() @ X) ** 2).sum())
        assert err["sparsegpt"] < 0.8 * err["wanda"], (seed, err)
        assert err["wanda"] < 0.8 * err["magnitude"], (seed, err)


# ---- SparseGPT against a slow, obviously-correct OBS reference ------------------------------------

def obs_reference(W, H, spec, damp=0.01):
    """One weight at a time, one row at a time, explicit inverses. Columns are visited left to right;
    a pruned weight's removal is compensated optimally (OBS) over the columns not yet visited.
    The mask is chosen as SparseGPT defines it: at each block start (unstructured, exact count per row)
    or each group start (N:M), by saliency w² / [H_F⁻¹]_00 on the current weights, F = {j, ...}."""
    n = H.shape[0]
    Hd = H + damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    denom = torch.tensor([float(torch.linalg.inv(Hd[j:, j:])[0, 0]) for j in range(n)], dtype=H.dtype)
    out, keep = W.clone(), torch.ones_like(W, dtype=torch.bool)
    bs = spec.blocksize
    for r in range(W.shape[0]):
        w = out[r]
        for j in range(n):
            if not spec.structured and j % bs == 0:
                j2 = min(j + bs, n)
                k = round(spec.sparsity * j2) - round(spec.sparsity * j)
                sal = w[j:j2] ** 2 / denom[j:j2]
                keep[r, j + torch.argsort(sal)[:k]] = False
            if spec.structured and j % spec.m == 0:
                sal = w[j:j + spec.m] ** 2 / denom[j:j + spec.m]
                keep[r, j + torch.argsort(sal)[:spec.n]] = False
            if not keep[r, j]:
                Hinv_F = torch.linalg.inv(Hd[j:, j:])
                w[j:] -= w[j] / Hinv_F[0, 0] * Hinv_F[:, 0]
                w[j] = 0.0
    return out, keep


@pytest.mark.parametrize("spec", [PruneSpec(sparsity=0.5, blocksize=16), PruneSpec(sparsity=0.6, blocksize=5),
                                  PruneSpec(n=2, m=4, blocksize=16), PruneSpec(n=1, m=4, blocksize=8)],
                         ids=lambda s: f"{s.describe()} bs{s.blocksize}")
def test_sparsegpt_matches_sequential_obs_reference(spec):
    W, X, stats = problem(out=6, inn=16, tokens=80, seed=3, dtype=torch.float64)
    r = sparsegpt_prune(W, stats, spec)
    ref, keep = obs_reference(W, stats.hessian, spec)
    assert torch.equal(r.mask, keep)
    assert torch.allclose(r.weight.double(), ref, rtol=1e-4, atol=1e-5)


def test_sparsegpt_between_least_squares_optimum_and_no_compensation():
    W, X, stats = problem(out=8, inn=24, tokens=200, seed=1, dtype=torch.float64)
    r = sparsegpt_prune(W, stats, PruneSpec(sparsity=0.5, damp=0.0))
    H, keep = stats.hessian, r.mask
    best = W.clone()
    for i in range(W.shape[0]):  # optimal kept weights for this mask: least squares on the kept columns
        K = keep[i]
        best[i, K] = torch.linalg.lstsq(X[K].T, (W[i] @ X).unsqueeze(1)).solution.squeeze(1)
        best[i, ~K] = 0
    plain = W * keep
    e_best, e_sgpt, e_plain = (layer_objective(W, V, H) for V in (best, r.weight, plain))
    assert e_best <= e_sgpt * (1 + 1e-6) and e_sgpt < 0.8 * e_plain
    assert r.info["error"] == pytest.approx(e_sgpt, rel=1e-4)


# ---- numerics edge cases ------------------------------------------------------------------------------

def test_sparsegpt_dead_columns():
    W, _, stats = problem(dtype=torch.float64)
    H = stats.hessian.clone()
    H[3, :] = H[:, 3] = 0
    r = sparsegpt_prune(W, LayerStats(H, None, stats.n_tokens), PruneSpec(sparsity=0.5))
    assert r.info["dead"] == 1 and (r.weight[:, 3] == 0).all() and torch.isfinite(r.weight).all()
    assert ((~r.mask).sum(1) == 16).all()


def test_no_tokens_raises():
    W, _, stats = problem()
    empty = LayerStats(torch.zeros(32, 32), torch.zeros(32), 0)
    for fn in (wanda_prune, sparsegpt_prune):
        with pytest.raises(NumericalError, match="saw none"):
            fn(W, empty, PruneSpec())


def test_zero_sparsity_is_identity():
    W, _, stats = problem()
    r = sparsegpt_prune(W, stats, PruneSpec(sparsity=0.0))
    assert r.mask.all() and torch.equal(r.weight, W)


def test_low_precision_weights_accepted():
    W, _, stats = problem()
    r = sparsegpt_prune(W.to(torch.bfloat16), stats, PruneSpec(sparsity=0.5))
    assert r.weight.dtype == torch.float32 and r.sparsity == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    W, _, stats = problem(out=64, inn=128, tokens=1000)
    gstats = LayerStats(stats.hessian.cuda(), stats.sq_norm.cuda(), stats.n_tokens)
    for method in ("magnitude", "wanda", "sparsegpt"):
        for spec in (PruneSpec(sparsity=0.5), PruneSpec(n=2, m=4)):
            a = _run(method, W, stats, spec)
            b = _run(method, W.cuda(), gstats, spec)
            assert b.weight.is_cuda
            agree = float((a.mask == b.mask.cpu()).float().mean())
            assert agree > 0.99, (method, agree)
            if method == "sparsegpt":
                assert b.info["error"] == pytest.approx(a.info["error"], rel=2e-2)
