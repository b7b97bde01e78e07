"""Weight quantization solvers on uniform grids: round-to-nearest and GPTQ."""
from __future__ import annotations

import torch

from ..errors import RecipeError
from ..recipe import QuantSpec
from .base import LayerResult, LayerStats, QuantState
from .grid import TERNARY_BITS, fit_grid, group_index, maxq_of, n_groups_of, quantize_grouped
from .hessian import checked_hessian, layer_objective, prepare_hessian
from .obs import GridRule, Sweep, fixed_blocks


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
    """Round-to-nearest onto per-group grids; pruned weights stay 0 and grids fit the kept ones."""
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


def gptq_quantize(W: torch.Tensor, stats: LayerStats, spec: QuantSpec,
                  mask: torch.Tensor | None = None) -> LayerResult:
    """GPTQ: quantize column by column, spreading each rounding error over the later columns."""
    _check(W, mask)
    H = checked_hessian(stats, W, "gptq", "rtn")
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
    rule = _GPTQRule(Wp, col_group, n_groups_of(cols, gs), maxq, maskp, spec, static)
    if static:  # on the (dead-column fixed) weights in the original column order
        s, z = fit_grid(Wp if inv is None else Wp[:, inv], spec.bits, gs, sym, spec.mse_clip, mask=mask)
        rule.set_grid(slice(None), s, z)
    Sweep(Wp, U).run(rule, fixed_blocks(cols, spec.blocksize))
    codes, scale, zero = rule.codes, rule.scale, rule.zero
    if inv is not None:
        codes = codes[:, inv]
    state = _state(spec, codes, scale, zero, g_idx)
    Wq = state.dequantize().to(dt)
    info = {"method": "gptq", "spec": spec.describe(), "error": layer_objective(W0, Wq, H),
            "damp": hinfo["damp"], "dead": hinfo["dead"]}
    return _finish(state, mask, info, W.dtype)


class _GPTQRule(GridRule):
    """GPTQ's rule: nearest grid point; a dynamic group's grid is fitted when its first column comes."""

    def __init__(self, Wp, col_group, n_groups, maxq, keep, spec: QuantSpec, static: bool):
        super().__init__(Wp, col_group, n_groups, maxq, keep, spec.blocksize)
        self.spec, self.static = spec, static

    def cuts(self, i1: int, i2: int) -> list[int]:
        gs = self.spec.group_size
        return [] if self.static else [c for c in range(i1 + 1, i2) if c % gs == 0]

    def start(self, sweep: Sweep, a: int, b: int) -> None:
        gs = self.spec.group_size
        if self.static or a % gs:
            return
        end = min(a + gs, sweep.W.shape[1])
        m = None if self.keep is None else self.keep[:, a:end]
        s, z = fit_grid(sweep.current(a, end), self.spec.bits, 0, _is_symmetric(self.spec), self.spec.mse_clip,
                        mask=m)
        self.set_grid(self.col_group[a], s[:, 0], z[:, 0])
