import math

import pytest
import torch

from prunequant.errors import RecipeError
from prunequant.solvers.grid import fit_grid, maxq_of, quantize_to_grid
from prunequant.solvers.mixed import MixSpec, dequantize_mixed, matrix_bits, mixed_quantize, rtn_fake

from structural_models import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def _reference_gptq(W, H, high, spec, damp=0.01):
    """Slow, obviously-right OBS: explicit inverse of the remaining columns' Hessian at every step."""
    perm = torch.cat([high.nonzero().flatten(), (~high).nonzero().flatten()])
    W = W[:, perm].clone()
    H = H[perm][:, perm].clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    n, n_high = W.shape[1], int(high.sum())
    Q = torch.zeros_like(W)
    grid = None
    for i in range(n):
        part_lo, part_hi = (0, n_high) if i < n_high else (n_high, n)
        bits = spec.high_bits if i < n_high else spec.low_bits
        gs = spec.group_size
        if (gs > 0 and (i - part_lo) % gs == 0) or (gs == 0 and i == part_lo):
            end = min(i + gs, part_hi) if gs > 0 else part_hi
            grid = [t.float().double() for t in fit_grid(W[:, i:end], bits, 0, spec.symmetric)]  # stored as fp32
        sc, z = grid
        q = sc[:, 0] * (quantize_to_grid(W[:, i:i + 1], sc, z, maxq_of(bits))[:, 0] - z[:, 0])
        Q[:, i] = q
        Hinv = torch.linalg.inv(H[i:, i:])
        W[:, i:] -= ((W[:, i] - q) / Hinv[0, 0])[:, None] * Hinv[0][None, :]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("group_size", [0, 8])
def test_mixed_gptq_matches_slow_reference(group_size):
    torch.manual_seed(0)
    W = torch.randn(5, 24, dtype=torch.float64)
    X = torch.randn(200, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    H = X.T @ X / 200
    high = torch.rand(24) < 0.4
    spec = MixSpec(low_bits=2, high_bits=4, group_size=group_size)
    res = mixed_quantize(W, high, spec, H=H, blocksize=16)
    torch.testing.assert_close(res.weight, _reference_gptq(W, H, high, spec), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dequantize_mixed(res.quant).double(), res.weight, rtol=1e-6, atol=1e-6)


def test_rtn_parts_use_their_bits_and_gptq_beats_rtn():
    torch.manual_seed(1)
    W = torch.randn(16, 32, dtype=torch.float64)
    high = torch.zeros(32, dtype=torch.bool)
    high[::4] = True
    spec = MixSpec(low_bits=2, high_bits=4, group_size=8)
    res = mixed_quantize(W, high, spec)
    assert res.weight[:, high].unique().numel() <= 16 * 2 ** 4
    for r in range(16):  # each row's low-part group holds at most 4 levels
        for g in range(3):
            cols = (~high).nonzero().flatten()[g * 8:(g + 1) * 8]
            assert res.weight[r, cols].unique().numel() <= 4
    X = torch.randn(300, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64)
    H = X.T @ X / 300
    err = lambda Q: float(torch.trace((W - Q) @ H @ (W - Q).T))  # noqa: E731
    assert err(mixed_quantize(W, high, spec, H=H).weight) < err(res.weight)


def test_all_high_equals_plain_rtn_and_bits_are_exact():
    torch.manual_seed(2)
    W = torch.randn(6, 40)
    spec = MixSpec(low_bits=2, high_bits=4, group_size=16)
    res = mixed_quantize(W, torch.ones(40, dtype=torch.bool), spec)
    torch.testing.assert_close(res.weight, rtn_fake(W, 4, spec))
    # 40 cols at 4 bits, 3 groups of (16-bit scale + 4-bit zero) per row, no column map
    assert res.info["bits"] == 6 * (40 * 4 + 3 * 20)
    assert matrix_bits(spec, 6, 10, 30) == 6 * (10 * 4 + 30 * 2 + 1 * 20 + 2 * 18) + 40
    assert math.isclose(matrix_bits(spec, 6, 10, 30, exact=False), 6 * (40 + 60 + 10 / 16 * 20 + 30 / 16 * 18) + 40)


def test_bad_spec():
    with pytest.raises(RecipeError):
        MixSpec(low_bits=4, high_bits=2)
    with pytest.raises(RecipeError):
        MixSpec(low_bits=0)


def test_registry_solver_is_mixed_quantize_and_refuses_masks():
    """The engine reaches channel-mixed quantization through the solver registry, with the layer's own plan."""
    from prunequant.recipe import LayerPlan
    from prunequant.solvers import SOLVERS, needs, solve_layer
    from prunequant.solvers.base import LayerStats
    from prunequant.solvers.hessian import layer_objective
    from prunequant.solvers.mixed import MixedQuant

    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(8, 32, generator=g), torch.randn(200, 32, generator=g)
    H = X.T @ X / 200
    high = torch.rand(32, generator=g) < 0.3
    spec = MixSpec(low_bits=2, high_bits=4, group_size=8)
    stats = LayerStats(hessian=H, sq_norm=None, n_tokens=200)
    for method, want, ref in (("mixed", "hessian", mixed_quantize(W, high, spec, H=H)),
                              ("mixed-rtn", None, mixed_quantize(W, high, spec))):
        plan = LayerPlan(quant=MixedQuant(spec, tuple(high.tolist()), method))
        assert needs(plan) == want and not SOLVERS[method].row_separable
        res = solve_layer(W, stats, plan)
        assert torch.equal(res.weight, ref.weight) and res.info["bits"] == ref.info["bits"]
        assert plan.quant.bits == pytest.approx((4 * int(high.sum()) + 2 * int((~high).sum())) / 32)
    assert res.info.get("error") is None  # rtn: no Hessian to measure against
    gptq = solve_layer(W, stats, LayerPlan(quant=MixedQuant(spec, tuple(high.tolist()))))
    assert gptq.info["error"] == pytest.approx(layer_objective(W, gptq.weight, H)) and gptq.info["error"] > 0
    with pytest.raises(RecipeError, match="pruning mask"):
        SOLVERS["mixed"].fn(W, stats, plan.quant, mask=torch.ones_like(W, dtype=torch.bool))
