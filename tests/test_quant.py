"""Quantization solvers on small random problems (float64 where checking math)."""
import math

import pytest
import torch

from prunequant.recipe import QuantSpec
from prunequant.solvers.grid import fit_grid, maxq_of, quantize_to_grid
from prunequant.solvers.quant import rtn_quantize


def _w(out=16, inp=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=dtype)


@pytest.mark.parametrize("bits", [1.58, 2, 3, 4, 8])
@pytest.mark.parametrize("gs", [0, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_codes_on_grid(bits, gs, sym):
    W = _w()
    r = rtn_quantize(W, QuantSpec(method="rtn", bits=bits, group_size=gs, symmetric=sym))
    st = r.quant
    maxq = maxq_of(bits)
    assert st.codes.dtype == torch.uint8 and int(st.codes.max()) <= maxq
    assert torch.equal(r.weight, st.dequantize().to(r.weight.dtype))
    g = st.g_idx.long()
    assert torch.equal(r.weight, (st.scale[:, g] * (st.codes.float() - st.zero[:, g])).to(r.weight.dtype))
    ng = st.scale.shape[1]
    assert ng == (1 if gs == 0 else W.shape[1] // gs)
    for j in range(ng):
        cols = g == j
        for row in range(W.shape[0]):
            assert r.weight[row, cols].unique().numel() <= maxq + 1
    if bits == 1.58:
        assert set(st.codes.unique().tolist()) <= {0, 1, 2} and bool((st.zero == 1).all())
    # without clipping every weight is within half a step of its grid point
    step = st.scale[:, g]
    assert ((r.weight - W).abs() <= step / 2 + 1e-6).all()


def test_degenerate_groups_finite():
    W = torch.zeros(4, 32)
    W[1] = 3.0
    W[2, :16] = 1e-30
    for sym in (False, True):
        for mse in (False, True):
            s, z = fit_grid(W, 4, 16, sym, mse)
            assert torch.isfinite(s).all() and torch.isfinite(z).all() and (s > 0).all()
            r = rtn_quantize(W, QuantSpec(method="rtn", bits=4, group_size=16, symmetric=sym, mse_clip=mse))
            assert torch.isfinite(r.weight).all()
            assert not r.weight[0].any()
            if not sym:  # asymmetric grids hit a constant row exactly (symmetric: within half a step)
                assert torch.allclose(r.weight[1], W[1])
            assert (r.weight[1] - W[1]).abs().max() <= r.quant.scale[1].max() / 2 + 1e-6


def test_mse_clip_not_worse():
    W = _w(32, 128)
    W[0, 0] = 20.0  # an outlier makes clipping worthwhile
    for bits in (2, 3, 4):
        plain = rtn_quantize(W, QuantSpec(method="rtn", bits=bits, group_size=0))
        mse = rtn_quantize(W, QuantSpec(method="rtn", bits=bits, group_size=0, mse_clip=True))
        e0 = ((plain.weight - W).abs() ** 2.4).sum(1)
        e1 = ((mse.weight - W).abs() ** 2.4).sum(1)
        assert (e1 <= e0 + 1e-9).all() and e1.sum() < e0.sum()


def test_rtn_mask_keeps_zeros_and_fits_on_kept():
    W = _w()
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    spec = QuantSpec(method="rtn", bits=3, group_size=16)
    r = rtn_quantize(W, spec, mask)
    assert not r.weight[~mask].any()
    ref = rtn_quantize(W * mask, spec)
    assert torch.equal(r.weight, ref.weight)
    # grid only from kept weights: a huge pruned weight must not change the grid
    W2 = W.clone()
    W2[~mask] = 1e6
    assert torch.equal(rtn_quantize(W2, spec, mask).weight, r.weight)


def test_quantize_one_column_with_given_grid():
    W = _w()
    s, z = fit_grid(W[:, :8], 4, 0, False)
    c = quantize_to_grid(W[:, 3:4], s, z, 15)
    assert c.shape == (16, 1) and c.min() >= 0 and c.max() <= 15 and torch.equal(c, c.round())
