"""One-pass joint OBS: prune (SparseGPT's rule) and quantize (GPTQ's grids) in one sweep (docs/methods.md)."""
from __future__ import annotations

import torch

from ..errors import RecipeError
from ..recipe import PruneSpec, QuantSpec
from .base import LayerResult, LayerStats, QuantState
from .grid import TERNARY_BITS, fit_grid, group_index, maxq_of, quantize_to_grid
from .hessian import checked_hessian, layer_objective, prepare_hessian
from .obs import GridRule, Sweep, after_pruning, fixed_blocks, n_pruned, nm_keep, prune_lowest


def _windows(cols: int, prune: PruneSpec) -> list[tuple[int, int]]:
    """Mask windows in sweep order: the mask of a window is chosen when the sweep reaches its start."""
    size = prune.m if prune.structured else max(1, prune.blocksize)
    return [(a, min(a + size, cols)) for a in range(0, cols, size)]


def _select(cur: torch.Tensor, inv_d2: torch.Tensor, a: int, b: int, prune: PruneSpec, per_row: bool,
            deq: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the window [a, b): the lowest saliencies pruned (docs/methods.md)."""
    sal = cur ** 2 * inv_d2
    if deq is not None:
        marginal = (cur ** 2 - (cur - deq) ** 2) * inv_d2
        if prune.structured or per_row:
            sal = _lexicographic_rank(marginal, sal)
        else:
            sal = _lexicographic_rank(marginal.reshape(1, -1), sal.reshape(1, -1)).reshape(sal.shape)
    if prune.structured:
        return nm_keep(sal, prune.n, prune.m)
    size = 1 if per_row else cur.shape[0]
    k = n_pruned(prune.sparsity, b * size) - n_pruned(prune.sparsity, a * size)
    return prune_lowest(sal, k, per_row)


def _lexicographic_rank(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Per row, the rank of every entry ordered by (primary, secondary, column), as floats."""
    order = torch.argsort(secondary, dim=1, stable=True)
    order = order.gather(1, torch.argsort(primary.gather(1, order), dim=1, stable=True))
    rank = torch.empty_like(primary)
    rank.scatter_(1, order, torch.arange(primary.shape[1], dtype=primary.dtype, device=primary.device)
                  .expand_as(primary).contiguous())
    return rank


def _check(W: torch.Tensor, stats: LayerStats | None, prune: PruneSpec, quant: QuantSpec) -> torch.Tensor:
    if W.ndim != 2 or W.numel() == 0:
        raise ValueError(f"weight must be a non-empty (out, in) matrix, got shape {tuple(W.shape)}")
    if prune.method != "sparsegpt":
        raise RecipeError(f"the one-pass joint solver chooses masks with SparseGPT's rule, not {prune.method!r}; "
                          "use prune method sparsegpt, or joint mode keep-mask (prune, then quantize with the mask kept)")
    if quant.method != "gptq":
        raise RecipeError(f"the one-pass joint solver quantizes with GPTQ grids, not {quant.method!r}; "
                          "use quant method gptq, or joint mode keep-mask")
    H = checked_hessian(stats, W, "joint_obs", "rtn/magnitude")
    if prune.structured and W.shape[1] % prune.m:
        raise RecipeError(f"N:M pattern {prune.n}:{prune.m} needs the input size to be a multiple of {prune.m}, "
                          f"but this layer has {W.shape[1]} inputs; use unstructured sparsity or leave it dense")
    if prune.structured and quant.act_order:
        raise RecipeError("act-order visits columns out of order, which breaks N:M groups of consecutive "
                          "columns: turn act_order off for N:M joint compression")
    if quant.blocksize < 1 or prune.blocksize < 1:
        raise RecipeError("block sizes must be positive numbers of columns, e.g. 128")
    return H


class _JointRule(GridRule):
    """Mask windows chosen and group grids fitted as the sweep reaches them (GridRule rounds)."""

    def __init__(self, sweep: Sweep, prune: PruneSpec, quant: QuantSpec, col_group: list[int], rule: str,
                 per_row: bool, mask: torch.Tensor | None):
        Wp = sweep.W
        rows, cols = Wp.shape
        keep = torch.ones(rows, cols, dtype=torch.bool, device=Wp.device) if mask is None else mask.clone()
        super().__init__(Wp, col_group, 1 + max(col_group), maxq_of(quant.bits), keep, quant.blocksize)
        self.sweep, self.prune, self.quant, self.rule, self.per_row = sweep, prune, quant, rule, per_row
        self.cols, self.gs = cols, quant.group_size
        self.sym = quant.symmetric or quant.bits == TERNARY_BITS
        self.inv_d2 = torch.diagonal(sweep.U) ** -2
        self.windows = _windows(cols, prune) if mask is None else [(0, cols)]
        self.win_at = {a: b for a, b in self.windows} if mask is None else {}
        self.win_of = [0] * cols
        for k, (a, b) in enumerate(self.windows):
            self.win_of[a:b] = [k] * (b - a)
        self.sel_end = 0 if mask is None else cols  # columns [0, sel_end) have their final mask
        self.static = self.gs <= 0 or quant.act_order
        self.fitted_upto = -1  # last group whose final grid is fitted (dynamic groups)

    def cuts(self, i1: int, i2: int) -> list[int]:
        return [c for c in range(i1 + 1, i2) if c in self.win_at or (not self.static and c % self.gs == 0)]

    def start(self, sweep: Sweep, a: int, b: int) -> None:
        if a in self.win_at:
            self.select_window(a, self.win_at[a])
        if not self.static and a % self.gs == 0:
            s1, z1 = self.fit(a, min(a + self.gs, self.cols))
            self.scale[:, self.col_group[a]], self.zero[:, self.col_group[a]] = s1[:, 0], z1[:, 0]
            self.fitted_upto = self.col_group[a]

    def keep_for(self, a: int, b: int) -> torch.Tensor:
        """Mask of columns [a, b): final where selected, provisional beyond (SparseGPT's rule, now)."""
        sel = self.sel_end
        if b <= sel:
            return self.keep[:, a:b]
        parts = [self.keep[:, a:sel]] if a < sel else []
        k = self.win_of[max(a, sel)]
        while k < len(self.windows) and self.windows[k][0] < b:
            wa, wb = self.windows[k]
            prov = _select(self.sweep.current(wa, wb), self.inv_d2[wa:wb], wa, wb, self.prune, self.per_row)
            lo, hi = max(wa, a, sel), min(wb, b)
            parts.append(prov[:, lo - wa:hi - wa])
            k += 1
        return torch.cat(parts, dim=1)

    def fit(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid (rows, 1) for columns [a, b) on the kept weights as they will be after pruning compensation."""
        kp = self.keep_for(a, b)
        Wa = after_pruning(self.sweep.current(a, b), self.sweep.U[a:b, a:b], kp)
        s, z = fit_grid(Wa, self.quant.bits, 0, self.sym, self.quant.mse_clip, mask=kp)
        dt = self.scale.dtype
        return s.float().to(dt), z.float().to(dt)  # choose codes on the grid as stored

    def fit_static(self, inv: torch.Tensor | None) -> None:
        """Per-channel / act-order grids, fitted before the sweep in the original column order."""
        prov = self.keep_for(0, self.cols)
        Wa = after_pruning(self.sweep.W, self.sweep.U, prov)
        if inv is not None:
            Wa, prov = Wa[:, inv], prov[:, inv]
        s, z = fit_grid(Wa, self.quant.bits, self.gs, self.sym, self.quant.mse_clip, mask=prov)
        self.scale, self.zero = s.float().to(self.scale.dtype), z.float().to(self.scale.dtype)

    def grid_of_columns(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of every column in [a, b): fitted grids, or provisional ones for groups not started."""
        groups = self.col_group[a:b]
        if self.static:
            g = torch.tensor(groups, device=self.scale.device)
            return self.scale[:, g], self.zero[:, g]
        ss, zz = [], []
        j = a
        while j < b:
            g = self.col_group[j]
            g0, g1 = g * self.gs, min((g + 1) * self.gs, self.cols)
            s, z = (self.scale[:, g:g + 1], self.zero[:, g:g + 1]) if g <= self.fitted_upto else self.fit(g0, g1)
            n = min(g1, b) - j
            ss.append(s.expand(-1, n))
            zz.append(z.expand(-1, n))
            j += n
        return torch.cat(ss, dim=1), torch.cat(zz, dim=1)

    def select_window(self, a: int, b: int) -> None:
        cur = self.sweep.current(a, b)
        deq = None
        if self.rule == "quant":
            s, z = self.grid_of_columns(a, b)
            deq = s * (quantize_to_grid(cur, s, z, self.maxq) - z)
        self.keep[:, a:b] = _select(cur, self.inv_d2[a:b], a, b, self.prune, self.per_row, deq)
        self.sel_end = b


MASK_RULES = ("obs", "quant")


def joint_obs(W: torch.Tensor, stats: LayerStats, prune: PruneSpec, quant: QuantSpec, *,
              mask: torch.Tensor | None = None, mask_rule: str = "obs", per_row: bool = False) -> LayerResult:
    """Prune and quantize one weight (out, in) in a single OBS sweep (options: docs/methods.md)."""
    H = _check(W, stats, prune, quant)
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(W.shape)}")
    if mask_rule not in MASK_RULES:
        raise RecipeError(f"mask rule {mask_rule!r} unknown; choose one of {', '.join(MASK_RULES)}")
    rows, cols = W.shape
    W0 = W.detach()
    perm = torch.argsort(torch.diagonal(H), descending=True) if quant.act_order else None
    Wp, U, hinfo = prepare_hessian(W0, H, damp=quant.damp, perm=perm)
    inv = torch.argsort(perm) if perm is not None else None
    g_idx = group_index(cols, quant.group_size, W.device)
    col_group = (g_idx if perm is None else g_idx[perm]).tolist()
    if mask is not None:
        mask = (mask if perm is None else mask[:, perm]).to(device=W.device, dtype=torch.bool)

    sweep = Sweep(Wp, U)
    rule = _JointRule(sweep, prune, quant, col_group, mask_rule, per_row, mask)
    if rule.static:
        rule.fit_static(inv)
    sweep.run(rule, fixed_blocks(cols, quant.blocksize))
    codes, keep = rule.codes, rule.keep
    if inv is not None:
        codes, keep = codes[:, inv], keep[:, inv]
    qstate = QuantState(kind="uniform", bits=quant.bits, group_size=quant.group_size, symmetric=rule.sym,
                        codes=codes.to(torch.uint8), scale=rule.scale.float(), zero=rule.zero.float(),
                        g_idx=g_idx.int())
    Wq = qstate.dequantize().to(Wp.dtype)
    assert not Wq[~keep].any(), "pruned weights must dequantize to exactly 0"
    info = {"method": "joint_obs", "spec": f"{prune.describe()} + {quant.describe()} [onepass, {mask_rule}]",
            "error": layer_objective(W0, Wq, H), "damp": hinfo["damp"], "dead": hinfo["dead"],
            "sparsity": 1.0 - float(keep.float().mean())}
    out_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    return LayerResult(weight=Wq.to(out_dtype), mask=keep, quant=qstate, info=info)
