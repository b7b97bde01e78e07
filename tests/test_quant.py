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
            if not sym:  # asymmetric grids hit a constant row up to the fp16 rounding of the stored scale
                assert torch.allclose(r.weight[1], W[1], rtol=1e-3)
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


# ---- GPTQ ----------------------------------------------------------------------------------------
from prunequant.solvers.base import LayerStats  # noqa: E402
from prunequant.solvers.quant import gptq_quantize  # noqa: E402


def _stats(inp=64, n=512, seed=0, diagonal=False):
    """Correlated inputs: x = A z with a random mixing matrix; H = mean x xᵀ."""
    g = torch.Generator().manual_seed(seed)
    if diagonal:
        d = torch.rand(inp, generator=g, dtype=torch.float64) * 3 + 0.1
        return LayerStats(hessian=torch.diag(d), sq_norm=None, n_tokens=n)
    A = torch.randn(inp, inp, generator=g, dtype=torch.float64) / math.sqrt(inp) + torch.eye(inp, dtype=torch.float64)
    X = A @ torch.randn(inp, n, generator=g, dtype=torch.float64)
    return LayerStats(hessian=X @ X.T / n, sq_norm=None, n_tokens=n), X


def _obj(W, Q, H):
    D = W - Q.to(W.dtype)
    return float(((D @ H) * D).sum())


def _slow_gptq(W, H, spec, mask=None):
    """Textbook OBS, one column at a time: invert the damped Hessian of the remaining columns."""
    W = W.clone()
    if mask is not None:
        W[~mask] = 0
    n = W.shape[1]
    Hd = H + spec.damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    maxq = maxq_of(spec.bits)
    sym = spec.symmetric or spec.bits == 1.58
    Q = torch.zeros_like(W)
    s = z = None
    if spec.group_size == 0:
        s, z = fit_grid(W, spec.bits, 0, sym, spec.mse_clip, mask=mask)
    for i in range(n):
        if spec.group_size and i % spec.group_size == 0:
            m = None if mask is None else mask[:, i:i + spec.group_size]
            s, z = fit_grid(W[:, i:i + spec.group_size], spec.bits, 0, sym, spec.mse_clip, mask=m)
        s, z = s.float().double(), z.float().double()
        code = quantize_to_grid(W[:, i:i + 1], s, z, maxq)
        if mask is not None:
            code = torch.where(mask[:, i:i + 1], code, z)
        Q[:, i:i + 1] = s * (code - z)
        Hinv = torch.linalg.inv(Hd[i:, i:])
        W[:, i:] -= (W[:, i:i + 1] - Q[:, i:i + 1]) / Hinv[0, 0] * Hinv[0:1, :]
    return Q


@pytest.mark.parametrize("gs,blocksize", [(0, 128), (16, 128), (16, 8), (24, 16)])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_equals_slow_reference(gs, blocksize, sym):
    stats, _ = _stats(48)
    W = _w(12, 48)
    spec = QuantSpec(method="gptq", bits=3, group_size=gs, symmetric=sym, blocksize=blocksize)
    r = gptq_quantize(W, stats, spec)
    ref = _slow_gptq(W, stats.hessian, spec)
    assert torch.allclose(r.weight, ref, atol=1e-9)
    assert r.info["error"] == pytest.approx(_obj(W, r.weight, stats.hessian))


def test_gptq_beats_rtn():
    stats, X = _stats(64, 1024)
    W = _w(32, 64)
    for bits, gs in ((2, 0), (3, 16), (4, 0), (1.58, 0)):
        spec = QuantSpec(method="gptq", bits=bits, group_size=gs, blocksize=16)
        e_gptq = _obj(W, gptq_quantize(W, stats, spec).weight, stats.hessian)
        e_rtn = _obj(W, rtn_quantize(W, QuantSpec(method="rtn", bits=bits, group_size=gs)).weight, stats.hessian)
        assert e_gptq < 0.8 * e_rtn, (bits, gs, e_gptq, e_rtn)
        # the objective is ‖WX − ŴX‖² / n_tokens
        Q = gptq_quantize(W, stats, spec).weight
        assert _obj(W, Q, stats.hessian) == pytest.approx(float(((W - Q) @ X).pow(2).sum()) / X.shape[1])


@pytest.mark.parametrize("gs", [0, 16])
def test_act_order_no_change_with_diagonal_hessian(gs):
    stats = _stats(64, diagonal=True)
    W = _w(8, 64)
    a = gptq_quantize(W, stats, QuantSpec(method="gptq", bits=3, group_size=gs, act_order=False, blocksize=16))
    b = gptq_quantize(W, stats, QuantSpec(method="gptq", bits=3, group_size=gs, act_order=True, blocksize=16))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.quant.codes, b.quant.codes)
    assert torch.equal(b.quant.g_idx, torch.arange(64, dtype=torch.int32) // (gs or 64 * 2))


def test_act_order_static_groups_on_grid():
    stats, _ = _stats(64)
    W = _w(8, 64)
    spec = QuantSpec(method="gptq", bits=4, group_size=16, act_order=True, blocksize=8, mse_clip=True)
    r = gptq_quantize(W, stats, spec)
    assert torch.equal(r.weight, r.quant.dequantize())
    assert torch.equal(r.quant.g_idx.long(), torch.arange(64) // 16)
    rtn = rtn_quantize(W, QuantSpec(method="rtn", bits=4, group_size=16, mse_clip=True))
    assert torch.equal(r.quant.scale, rtn.quant.scale)  # static grids come from the original W
    assert _obj(W, r.weight, stats.hessian) < _obj(W, rtn.weight, stats.hessian)


@pytest.mark.parametrize("gs,act", [(0, False), (16, False), (16, True)])
def test_gptq_mask_keeps_zeros(gs, act):
    stats, _ = _stats(64)
    W = _w(16, 64)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    spec = QuantSpec(method="gptq", bits=3, group_size=gs, act_order=act, blocksize=16)
    r = gptq_quantize(W, stats, spec, mask)
    assert not r.weight[~mask].any() and torch.equal(r.weight, r.quant.dequantize())
    assert r.mask is mask
    if not act:
        assert torch.allclose(r.weight, _slow_gptq(W, stats.hessian, spec, mask), atol=1e-9)
    rtn = rtn_quantize(W, QuantSpec(method="rtn", bits=3, group_size=gs), mask)
    assert _obj(W * mask, r.weight, stats.hessian) < _obj(W * mask, rtn.weight, stats.hessian)


def test_gptq_float32_and_dead_columns():
    stats, _ = _stats(32)
    H = stats.hessian.float().clone()
    H[5, :] = 0
    H[:, 5] = 0
    W = _w(8, 32, dtype=torch.float32)
    r = gptq_quantize(W, LayerStats(hessian=H, sq_norm=None, n_tokens=10), QuantSpec(bits=4, group_size=16))
    assert r.weight.dtype == torch.float32 and torch.isfinite(r.weight).all()
    assert r.info["dead"] == 1 and not r.weight[:, 5].any()


# ---- BiLLM (1 bit) ----------------------------------------------------------------------------------
from prunequant.solvers.billm import _fit_block  # noqa: E402
from prunequant.solvers.billm import billm_dequantize, billm_quantize  # noqa: E402

_B1 = QuantSpec(method="billm", bits=1, blocksize=32)


def _slow_billm(W, H, spec, max_salient=0.1, n_breaks=32):
    """Same block decisions, but OBS done one column at a time with explicit inverses."""
    W = W.clone()
    n = W.shape[1]
    Hd = H + spec.damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, spec.blocksize):
        i2 = min(i1 + spec.blocksize, n)
        sal, prm, p = _fit_block(W[:, i1:i2].clone(), U.diagonal()[i1:i2], torch.ones_like(W[:, i1:i2], dtype=torch.bool),
                                 n_breaks, max_salient)
        prm = prm.float().double()
        for i in range(i1, i2):
            w = W[:, i]
            if sal[i - i1]:
                q1 = prm[:, 0] + prm[:, 1] * torch.where(w >= prm[:, 0], 1.0, -1.0).double()
                q = q1 + prm[:, 2] + prm[:, 3] * torch.where(w - q1 >= prm[:, 2], 1.0, -1.0).double()
            else:
                sp = w.abs() > p
                m = torch.where(sp, prm[:, 6], prm[:, 4])
                a = torch.where(sp, prm[:, 7], prm[:, 5])
                q = m + a * torch.where(w >= m, 1.0, -1.0).double()
            Q[:, i] = q
            Hinv = torch.linalg.inv(Hd[i:, i:])
            W[:, i:] -= (w - q)[:, None] / Hinv[0, 0] * Hinv[0:1, :]
    return Q


def test_billm_equals_slow_reference_and_dequantizes():
    stats, _ = _stats(64)
    W = _w(16, 64)
    r = billm_quantize(W, stats, _B1)
    assert torch.allclose(r.weight, _slow_billm(W, stats.hessian, _B1), atol=1e-6)
    assert torch.equal(billm_dequantize(r.quant).to(r.weight.dtype), r.weight)
    assert r.quant.kind == "binary-residual" and r.quant.extra["salient"].any()


def test_billm_error_and_bits():
    stats, _ = _stats(64, 1024)
    W = _w(32, 64)
    r = billm_quantize(W, stats, _B1)
    e = _obj(W, r.weight, stats.hessian)
    sign = torch.sign(W) * W.abs().mean(1, keepdim=True)
    assert e < 0.5 * _obj(W, sign, stats.hessian)
    assert e == pytest.approx(r.info["error"])
    info = r.info
    # per weight: 1 sign, 2nd sign on salient columns, group marker elsewhere, column bitmap, 8 fp16/row/block
    sal = info["salient_fraction"]
    assert info["bits_signs"] == pytest.approx(1 + sal)
    assert info["bits_paper"] == pytest.approx(1 + sal + 1 / 32)
    assert info["bits_per_weight"] == pytest.approx(1 + sal + (1 - sal) + 1 / 32 + info["bits_params"])
    # at most 2 values per row and group for non-salient weights of a block, 4 for salient
    for row in range(4):
        for b in range(2):
            cols = slice(b * 32, b * 32 + 32)
            s = r.quant.extra["salient"][cols]
            sp = r.quant.extra["sparse"][row, cols]
            vals = r.weight[row, cols]
            assert vals[~s & sp].unique().numel() <= 2 and vals[~s & ~sp].unique().numel() <= 2
            assert vals[s].unique().numel() <= 4


def test_billm_mask_keeps_zeros():
    stats, _ = _stats(64)
    W = _w(16, 64)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    r = billm_quantize(W, stats, _B1, mask)
    assert not r.weight[~mask].any() and r.weight[mask].ne(0).float().mean() > 0.9
    assert torch.equal(billm_dequantize(r.quant).to(r.weight.dtype), r.weight)
