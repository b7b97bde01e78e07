"""Weight quantization solvers on uniform grids: round-to-nearest and GPTQ.

Pure tensor functions: a weight (out, in), optional statistics and a QuantSpec in, a LayerResult out.
The returned weight is always exactly ``QuantState.dequantize()`` of the returned state.
"""
from __future__ import annotations

import logging

import torch

from ..errors import NumericalError, RecipeError
from ..recipe import QuantSpec
from .base import LayerResult, LayerStats, QuantState
from .billm import billm_dequantize, billm_quantize  # noqa: F401  (1-bit solver, re-exported here)
from .grid import TERNARY_BITS, fit_grid, group_index, maxq_of, n_groups_of, quantize_grouped, quantize_to_grid
from .hessian import layer_objective, prepare_hessian

log = logging.getLogger(__name__)


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _check(W: torch.Tensor, mask: torch.Tensor | None) -> None:
    if W.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(W.shape)}")
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(W.shape)}")


def _is_symmetric(spec: QuantSpec) -> bool:
    return spec.symmetric or spec.bits == TERNARY_BITS


def _state(spec: QuantSpec, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           g_idx: torch.Tensor) -> QuantState:
    return QuantState(kind="uniform", bits=spec.bits, group_size=spec.group_size, symmetric=_is_symmetric(spec),
                      codes=codes.to(torch.uint8), scale=scale.float(), zero=zero.float(), g_idx=g_idx.int())


def _finish(state: QuantState, mask: torch.Tensor | None, info: dict, dtype: torch.dtype) -> LayerResult:
    weight = state.dequantize()
    if mask is not None:
        # codes of pruned weights equal their zero point, so they dequantize to exactly 0 already
        assert not weight[~mask].any(), "pruned weights must dequantize to 0"
    return LayerResult(weight=weight.to(torch.float32 if dtype != torch.float64 else dtype), mask=mask,
                       quant=state, info=info)


def rtn_quantize(W: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None = None) -> LayerResult:
    """Round-to-nearest onto per-group grids. With a mask, pruned weights stay exactly 0 and the grid
    is fitted on the kept weights only."""
    _check(W, mask)
    dt = _work_dtype(W)
    Wf = W.to(dt)
    if mask is not None:
        Wf = torch.where(mask, Wf, torch.zeros((), dtype=dt, device=W.device))
    maxq = maxq_of(spec.bits)
    scale, zero = fit_grid(Wf, spec.bits, spec.group_size, _is_symmetric(spec), spec.mse_clip)
    # Round scale/zero through float32 (how they are stored) so that codes are chosen on the stored grid.
    scale, zero = scale.float().to(dt), zero.float().to(dt)
    g_idx = group_index(W.shape[1], spec.group_size, W.device)
    codes = quantize_grouped(Wf, scale, zero, maxq, g_idx)
    state = _state(spec, codes, scale, zero, g_idx)
    return _finish(state, mask, {"method": "rtn", "spec": spec.describe()}, W.dtype)


def _check_stats(stats: LayerStats | None, W: torch.Tensor, method: str) -> torch.Tensor:
    if stats is None or stats.hessian is None:
        raise ValueError(f"{method} needs stats.hessian (collect the Hessian for this layer)")
    if stats.n_tokens <= 0:
        raise NumericalError(
            f"{method} needs calibration inputs but this layer saw none (e.g. an MoE expert no token was "
            f"routed to): use more calibration data, or rtn for this layer")
    if stats.hessian.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"Hessian shape {tuple(stats.hessian.shape)} does not match weight {tuple(W.shape)}")
    return stats.hessian.detach().to(W.device)


def gptq_quantize(W: torch.Tensor, stats: LayerStats, spec: QuantSpec,
                  mask: torch.Tensor | None = None) -> LayerResult:
    """GPTQ: quantize column by column, spreading each column's rounding error over the columns not
    yet quantized through the upper Cholesky factor U of the damped H⁻¹, with lazy block updates.

    Grids: per channel (fitted once on W), or per group of ``spec.group_size`` columns, fitted when the
    group's first column is reached on the weights as updated so far (as GPTQ does). With act-order
    (columns visited by decreasing diag(H)) groups are STATIC: fitted up front in the original column
    order, so g_idx stays arange(in) // group_size.
    ``mask`` (True = kept): pruned weights end exactly 0 (their code is the zero point), grids are
    fitted on kept weights only, and the error of setting a pruned weight to 0 is propagated like any
    rounding error.
    info: error (‖WX − ŴX‖²/n_tokens against the given W, pruned weights as 0), damp, dead.
    """
    _check(W, mask)
    H = _check_stats(stats, W, "gptq")
    if spec.blocksize < 1:
        raise RecipeError(f"block size {spec.blocksize} must be a positive number of columns, e.g. 128")
    rows, cols = W.shape
    maxq, sym, gs = maxq_of(spec.bits), _is_symmetric(spec), spec.group_size
    W0 = W.detach()
    if mask is not None:
        W0 = torch.where(mask, W0, torch.zeros((), dtype=W0.dtype, device=W0.device))
    perm = torch.argsort(torch.diagonal(H), descending=True) if spec.act_order else None
    Wp, U, hinfo = prepare_hessian(W0, H, damp=spec.damp, perm=perm)
    dt = Wp.dtype
    inv = torch.argsort(perm) if perm is not None else None
    maskp = None if mask is None else (mask if perm is None else mask[:, perm])
    g_idx = group_index(cols, gs, W.device)
    col_group = (g_idx if perm is None else g_idx[perm]).tolist()  # host list: no device sync per column

    static = gs <= 0 or perm is not None
    if static:  # on the (dead-column fixed) weights in the original column order
        scale, zero = fit_grid(Wp if inv is None else Wp[:, inv], spec.bits, gs, sym, spec.mse_clip, mask=mask)
    else:
        scale = torch.empty(rows, n_groups_of(cols, gs), dtype=dt, device=W.device)
        zero = torch.empty_like(scale)
    scale, zero = scale.float().to(dt), zero.float().to(dt)  # choose codes on the grid as stored
    codes = torch.empty_like(Wp)

    kernel = _triton_columns(Wp, spec.blocksize)
    for i1 in range(0, cols, spec.blocksize):
        i2 = min(i1 + spec.blocksize, cols)
        W1 = Wp[:, i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        # runs of columns between grid refits (dynamic groups are fitted when their first column comes)
        cuts = [0] + [c - i1 for c in range(i1 + 1, i2) if not static and c % gs == 0] + [i2 - i1]
        cg = None
        for a, b in zip(cuts[:-1], cuts[1:]):
            if not static and (i1 + a) % gs == 0:
                _fit_group(Wp, U, Err1, maskp, scale, zero, spec, i1 + a, i1, i2, col_group[i1 + a])
            if kernel is not None:  # one launch for the whole run of columns
                if cg is None:
                    cg = torch.tensor(col_group[i1:i2], dtype=torch.int32, device=W.device)
                    m8 = None if maskp is None else maskp[:, i1:i2].to(torch.uint8)
                try:
                    kernel(W1, U1, scale, zero, cg, m8, codes[:, i1:i2], Err1, a, b, maxq)
                    continue
                except Exception as e:  # noqa: BLE001
                    if not type(e).__module__.startswith("triton"):
                        raise
                    # a kernel that fails to compile was never launched: W1 is untouched, go on in torch
                    log.warning("Triton GPTQ kernel unavailable (%s: %s); using the torch column loop",
                                type(e).__name__, str(e).splitlines()[0][:200])
                    kernel = None
            for i in range(a, b):
                c = i1 + i
                g = col_group[c]
                s, z = scale[:, g], zero[:, g]
                w = W1[:, i]
                q_code = quantize_to_grid(w, s, z, maxq)
                if maskp is not None:
                    q_code = torch.where(maskp[:, c], q_code, z)
                codes[:, c] = q_code
                err = (w - s * (q_code - z)) / U1[i, i]
                W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1.0)
                Err1[:, i] = err
        if i2 < cols:  # lazy batch update of everything right of the block
            Wp[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)

    if inv is not None:
        codes = codes[:, inv]
    state = _state(spec, codes, scale, zero, g_idx)
    Wq = state.dequantize().to(dt)
    info = {"method": "gptq", "spec": spec.describe(), "error": layer_objective(W0, Wq, H),
            "damp": hinfo["damp"], "dead": hinfo["dead"]}
    return _finish(state, mask, info, W.dtype)


def _triton_columns(Wp: torch.Tensor, blocksize: int):
    """The Triton column-loop kernel (solvers/triton_gptq.py) when it applies to this problem, else None."""
    try:
        from . import triton_gptq
    except ImportError:
        return None
    if not triton_gptq.available(Wp) or min(blocksize, Wp.shape[1]) > triton_gptq.MAX_BLOCK:
        return None
    return triton_gptq.gptq_columns


def _fit_group(Wp, U, Err1, maskp, scale, zero, spec, c, i1, i2, g) -> None:
    """Fit group g (columns c..c+gs) on the weights as updated so far; the part beyond the current
    block has not yet received this block's lazy update, so apply it here for those columns."""
    end = min(c + spec.group_size, Wp.shape[1])
    blk = Wp[:, c:min(end, i2)]
    if end > i2:
        rest = Wp[:, i2:end] - Err1[:, :c - i1] @ U[i1:c, i2:end]
        blk = torch.cat([blk, rest], dim=1)
    m = None if maskp is None else maskp[:, c:end]
    s, z = fit_grid(blk, spec.bits, 0, _is_symmetric(spec), spec.mse_clip, mask=m)
    scale[:, g], zero[:, g] = s[:, 0].float().to(scale.dtype), z[:, 0].float().to(zero.dtype)
