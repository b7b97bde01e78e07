"""1-bit weights by residual binarization with Hessian-guided salient columns (BiLLM-style; docs/methods.md)."""
from __future__ import annotations

import torch

from ..errors import RecipeError
from ..recipe import QuantSpec
from .base import LayerResult, LayerStats, QuantState
from .hessian import layer_objective, prepare_hessian
from .obs import Rule, Sweep, fixed_blocks

_SALIENT_COUNTS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PARAM_BITS = 16  # means and scales stored in fp16


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _fit_binary(x: torch.Tensor, member: torch.Tensor):
    """Per-row mean m and scale a = mean|x − m| over the members (last dim); zeros for empty rows."""
    mf = member.to(x.dtype)
    n = mf.sum(-1).clamp_min(1)
    m = (x * mf).sum(-1) / n
    a = ((x - m.unsqueeze(-1)).abs() * mf).sum(-1) / n
    return m, a


def _binarize(x, m, a):
    return m + a * _sign(x - m)


def _residual(x, p):
    """Two-pass residual binarization with params p = (m1, a1, m2, a2) (each broadcastable to x)."""
    q1 = _binarize(x, p[0], p[1])
    return q1 + _binarize(x - q1, p[2], p[3])


def _split(x, sparse, p):
    """Non-salient binarization: params (mc, ac, ms, as) for the concentrated and sparse groups."""
    return torch.where(sparse, _binarize(x, p[2], p[3]), _binarize(x, p[0], p[1]))


def _pm(s: torch.Tensor, dtype) -> torch.Tensor:
    return torch.where(s, 1.0, -1.0).to(dtype)


def _q_first(s1, p):
    return p[0] + p[1] * _pm(s1, p.dtype)


def _q_salient(s1, s2, p):
    """Stored salient value from its two signs; p = the 8 parameters (float32) broadcast to s1."""
    return _q_first(s1, p) + (p[2] + p[3] * _pm(s2, p.dtype))


def _q_split(s1, sparse, p):
    sg = _pm(s1, p.dtype)
    return torch.where(sparse, p[6] + p[7] * sg, p[4] + p[5] * sg)


def _round_params(p: torch.Tensor) -> torch.Tensor:
    """Parameters are stored in float32; use the stored values when binarizing."""
    return p.float().to(p.dtype)


def _split_errors(W1, absw, mn, cw, fr, amax):
    """Error, params (4, P, rows, 1) and break points of the non-salient binarization for every fraction in ``fr``."""
    p = fr[:, None, None] * amax
    sparse = absw > p  # (P, rows, cols)
    Wx = W1.expand(len(fr), -1, -1)
    mc, ac = _fit_binary(Wx, ~sparse & mn)
    mS, aS = _fit_binary(Wx, sparse & mn)
    pn = torch.stack([mc, ac, mS, aS], 0).unsqueeze(-1)
    q = _split(W1, sparse, pn)
    return (((W1 - q) ** 2 * mn) * cw).sum((1, 2)), pn, p


def _fit_block(W1: torch.Tensor, d: torch.Tensor, kept: torch.Tensor, n_breaks: int, max_salient: float):
    """Salient columns and break point of one block: (salient (cols,) bool, params (rows, 8) =
    (m1, a1, m2, a2, mc, ac, ms, as), break p (scalar tensor))."""
    rows, cols = W1.shape
    cw = 1.0 / d**2  # OBS weight of each column's error
    order = torch.argsort((W1**2 * kept).sum(0) * cw, descending=True)
    absw = W1.abs()
    amax = (absw * kept).max()
    coarse = torch.linspace(0.1, 0.9, 5, dtype=W1.dtype, device=W1.device)
    fine = torch.linspace(0.05, 0.95, n_breaks, dtype=W1.dtype, device=W1.device)
    best = None
    for k in _SALIENT_COUNTS:
        if k > max(1, int(max_salient * cols)) or k > cols:
            break
        sal = torch.zeros(cols, dtype=torch.bool, device=W1.device)
        sal[order[:k]] = True
        ms = kept & sal
        m1, a1 = _fit_binary(W1, ms)
        q1 = _binarize(W1, m1[:, None], a1[:, None])
        m2, a2 = _fit_binary(W1 - q1, ms)
        ps = torch.stack([m1, a1, m2, a2], 1)
        e_sal = (((W1 - _residual(W1, ps.T[:, :, None])) ** 2 * ms) * cw).sum()
        e_non, _, _ = _split_errors(W1, absw, kept & ~sal, cw, coarse, amax)
        err = float(e_sal + e_non.min())
        if best is None or err < best[0]:
            best = (err, sal, ps)
    _, sal, ps = best
    e_non, pn, p = _split_errors(W1, absw, kept & ~sal, cw, fine, amax)
    j = int(torch.argmin(e_non))
    return sal, _round_params(torch.cat([ps, pn[:, j, :, 0].T], 1)), p[j, 0, 0]


def billm_quantize(W: torch.Tensor, stats: LayerStats, spec: QuantSpec, mask: torch.Tensor | None = None,
                   *, max_salient: float = 0.1, n_breaks: int = 32) -> LayerResult:
    """BiLLM-style 1-bit residual binarization with GPTQ-style error compensation (docs/methods.md)."""
    if W.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(W.shape)}")
    if stats is None or stats.hessian is None or stats.n_tokens <= 0:
        raise ValueError("billm needs stats.hessian from calibration tokens (collect the Hessian for this layer)")
    if spec.blocksize < 1:
        raise RecipeError(f"block size {spec.blocksize} must be a positive number of columns, e.g. 128")
    rows, cols = W.shape
    H = stats.hessian.detach().to(W.device)
    W0 = W.detach()
    if mask is not None:
        W0 = torch.where(mask, W0, torch.zeros((), dtype=W0.dtype, device=W0.device))
    Wp, U, hinfo = prepare_hessian(W0, H, damp=spec.damp)
    kept = torch.ones_like(Wp, dtype=torch.bool) if mask is None else mask.to(Wp.device)
    B = spec.blocksize
    rule = _BillmRule(Wp, kept, B, n_breaks, max_salient)
    Sweep(Wp, U).run(rule, fixed_blocks(cols, B))
    salient, params, breaks, Q = rule.salient, rule.params, rule.breaks, rule.Q
    sign1, sign2, sparse = rule.sign1, rule.sign2, rule.sparse

    state = QuantState(kind="binary-residual", bits=1, group_size=B, symmetric=False, extra={
        "sign1": sign1, "sign2": sign2 & salient[None, :], "sparse": sparse & ~salient[None, :],
        "salient": salient, "params": params.float(), "breaks": breaks.float(), "blocksize": B,
        "kept": None if mask is None else mask.clone()})
    weight = billm_dequantize(state)
    assert torch.equal(weight.to(Q.dtype), Q), "stored binarization must reproduce the solved weight"
    weight = Q
    info = {"method": "billm", "error": layer_objective(W0, weight, H), "damp": hinfo["damp"],
            "dead": hinfo["dead"], **billm_bits(state)}
    out_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    return LayerResult(weight=Q.to(out_dtype), mask=mask, quant=state, info=info)


class _BillmRule(Rule):
    """Per block: binarization fitted on the block as updated so far; per column: its stored binarization."""

    def __init__(self, Wp: torch.Tensor, kept: torch.Tensor, B: int, n_breaks: int, max_salient: float):
        rows, cols = Wp.shape
        self.kept, self.B, self.n_breaks, self.max_salient = kept, B, n_breaks, max_salient
        self.salient = torch.zeros(cols, dtype=torch.bool, device=Wp.device)
        self.params = torch.zeros(rows, -(-cols // B), 8, dtype=Wp.dtype, device=Wp.device)
        self.breaks = torch.zeros(-(-cols // B), dtype=Wp.dtype, device=Wp.device)
        self.Q = torch.zeros_like(Wp)
        self.sign1, self.sign2, self.sparse = (torch.zeros_like(Wp, dtype=torch.bool) for _ in range(3))

    def start(self, sweep: Sweep, a: int, b: int) -> None:
        blk = a // self.B
        sal, prm, p = _fit_block(sweep.W[:, a:b], torch.diagonal(sweep.U[a:b, a:b]), self.kept[:, a:b],
                                 self.n_breaks, self.max_salient)
        self.salient[a:b], self.params[:, blk], self.breaks[blk] = sal, prm, p
        self.sal_list, self.prm, self.p = sal.tolist(), prm, p
        self.P32 = prm.float().T  # (8, rows): values are built in float32, exactly as billm_dequantize does
        self.a = a

    def column(self, c: int, w: torch.Tensor) -> torch.Tensor:
        prm, P32 = self.prm, self.P32
        if self.sal_list[c - self.a]:
            s1 = w >= prm[:, 0]
            s2 = (w - _q_first(s1, P32).to(w.dtype)) >= prm[:, 2]
            q = _q_salient(s1, s2, P32).to(w.dtype)
            self.sign2[:, c] = s2
        else:
            sp = w.abs() > self.p
            s1 = w >= torch.where(sp, prm[:, 6], prm[:, 4])
            q = _q_split(s1, sp, P32).to(w.dtype)
            self.sparse[:, c] = sp
        self.sign1[:, c] = s1
        q = torch.where(self.kept[:, c], q, torch.zeros((), dtype=q.dtype, device=q.device))
        self.Q[:, c] = q
        return q


def billm_dequantize(state: QuantState) -> torch.Tensor:
    """Rebuild the weight from the stored signs, group markers and per-row block parameters."""
    ex = state.extra
    s1, s2, sparse, salient, B = ex["sign1"], ex["sign2"], ex["sparse"], ex["salient"], ex["blocksize"]
    rows, cols = s1.shape
    blk = torch.arange(cols, device=s1.device) // B
    p = ex["params"][:, blk, :].permute(2, 0, 1)  # (8, rows, cols)
    W = torch.where(salient[None, :], _q_salient(s1, s2, p), _q_split(s1, sparse, p))
    if ex.get("kept") is not None:
        W = torch.where(ex["kept"], W, torch.zeros((), dtype=W.dtype, device=W.device))
    return W


def billm_bits(state: QuantState) -> dict:
    """Storage per weight; pruned weights count as stored (their mask is the pruning's cost)."""
    ex = state.extra
    rows, cols = ex["sign1"].shape
    n = rows * cols
    n_sal_cols = int(ex["salient"].sum())
    B = ex["blocksize"]
    sal_blocks = ex["salient"].reshape(-1)
    n_blocks = -(-cols // B)
    blocks_with_sal = sum(bool(sal_blocks[i:i + B].any()) for i in range(0, cols, B))
    blocks_with_non = sum(not bool(sal_blocks[i:i + B].all()) for i in range(0, cols, B))
    param_bits = PARAM_BITS * 4 * rows * (blocks_with_sal + blocks_with_non)
    signs = n + rows * n_sal_cols
    markers = rows * (cols - n_sal_cols)
    return {
        "bits_per_weight": (signs + markers + cols + param_bits) / n,
        "bits_signs": signs / n,
        "bits_paper": (signs + cols) / n,
        "bits_params": param_bits / n,
        "salient_fraction": n_sal_cols / cols,
        "n_blocks": n_blocks,
    }
