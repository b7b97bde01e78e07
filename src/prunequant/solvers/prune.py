"""Pruning solvers: magnitude, Wanda and SparseGPT, unstructured or N:M (masks True where kept)."""
from __future__ import annotations

import torch

from ..errors import RecipeError
from ..recipe import PruneSpec
from .base import LayerResult, LayerStats
from .hessian import check_tokens, checked_hessian, compute_dtype, layer_objective, prepare_hessian
from .obs import Rule, Sweep, fixed_blocks, n_pruned, nm_keep, prune_columns, prune_lowest


# ---- masks ------------------------------------------------------------------------------------

def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune the ``round(sparsity · n)`` lowest scores of each row (per_row) or of the whole matrix."""
    if not 0.0 <= sparsity < 1.0:
        raise RecipeError(f"sparsity {sparsity} is outside [0, 1); e.g. use 0.5 for 50% of weights pruned")
    size = score.shape[1] if per_row else score.numel()
    return prune_lowest(score, n_pruned(sparsity, size), per_row)


def _check_nm(in_features: int, n: int, m: int) -> None:
    if not (1 <= n < m):
        raise RecipeError(f"N:M pattern {n}:{m} is invalid: need integers 1 <= N < M")
    if in_features % m:
        raise RecipeError(f"N:M pattern {n}:{m} needs the input size to be a multiple of {m}, "
                          f"but this layer has {in_features} inputs; use unstructured sparsity "
                          f"or an override that leaves this layer dense")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive input columns of each row, prune the n lowest scores."""
    _check_nm(score.shape[1], n, m)
    return nm_keep(score, n, m)


def _spec_mask(score: torch.Tensor, spec: PruneSpec, per_row: bool) -> torch.Tensor:
    if spec.structured:
        return nm_mask(score, spec.n, spec.m)
    return unstructured_mask(score, spec.sparsity, per_row)


def _check_weight(W: torch.Tensor) -> None:
    if W.ndim != 2:
        raise ValueError(f"weights must be (out_features, in_features); got shape {tuple(W.shape)}")
    if W.shape[1] == 0 or W.shape[0] == 0:
        raise ValueError(f"empty weight of shape {tuple(W.shape)}")


def _result(W_hat: torch.Tensor, mask: torch.Tensor, error, **info) -> LayerResult:
    W_hat = W_hat.to(torch.float32)
    W_hat[~mask] = 0.0  # exact zeros, whatever rounding the updates left
    return LayerResult(weight=W_hat, mask=mask, info={"error": error, **info})


# ---- magnitude and Wanda ------------------------------------------------------------------------

def magnitude_prune(W: torch.Tensor, spec: PruneSpec, per_row: bool = False) -> LayerResult:
    """Prune the smallest |W|: over the whole layer by default, or per output row; N:M per group."""
    _check_weight(W)
    W = W.detach()
    mask = _spec_mask(W.abs(), spec, per_row)
    return _result(W.clone(), mask, None)


def _wanda_score(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    norm = stats.col_norm.to(device=W.device, dtype=compute_dtype(W))
    if norm.shape != (W.shape[1],):
        raise ValueError(f"input statistics have {norm.shape[0]} columns but the weight has {W.shape[1]}")
    return W.abs().to(norm.dtype) * norm[None, :]


def wanda_prune(W: torch.Tensor, stats: LayerStats, spec: PruneSpec) -> LayerResult:
    """Wanda: score |W_ij| · ‖x_j‖₂, pruned per output row (unstructured) or per N:M group."""
    _check_weight(W)
    check_tokens(stats, "wanda", "magnitude pruning / a dense override")
    W = W.detach()
    mask = _spec_mask(_wanda_score(W, stats), spec, per_row=True)
    W_hat = W.clone()
    W_hat[~mask] = 0
    err = layer_objective(W, W_hat, stats.hessian) if stats.hessian is not None else None
    return _result(W_hat, mask, err)


# ---- SparseGPT ----------------------------------------------------------------------------------

def sparsegpt_prune(W: torch.Tensor, stats: LayerStats, spec: PruneSpec, per_row: bool = True) -> LayerResult:
    """SparseGPT: OBS pruning, column block by column block (obs.py's sweep); ``per_row``: docs/methods.md."""
    _check_weight(W)
    rows, cols = W.shape
    if spec.structured:
        _check_nm(cols, spec.n, spec.m)
    if spec.blocksize < 1:
        raise RecipeError(f"block size {spec.blocksize} must be a positive number of columns, e.g. 128")
    W0 = W.detach()
    H = checked_hessian(stats, W0, "sparsegpt", "magnitude pruning / a dense override")
    if not spec.structured and n_pruned(spec.sparsity, cols if per_row else W.numel()) == 0:
        return _result(W0.clone(), torch.ones_like(W0, dtype=torch.bool), 0.0, damp=None, dead=0)

    W, U, hinfo = prepare_hessian(W0, H, damp=spec.damp)
    blocksize = max(spec.m, spec.blocksize // spec.m * spec.m) if spec.structured else spec.blocksize
    rule = _SparseGPTRule(spec, per_row, torch.diagonal(U) ** -2, W)
    Sweep(W, U).run(rule, fixed_blocks(cols, blocksize))
    mask = rule.mask
    err = layer_objective(W0, W, H)
    return _result(W, mask, err, damp=hinfo["damp"], dead=hinfo["dead"])


class _SparseGPTRule(Rule):
    """SparseGPT's rule: each window's lowest saliencies w²/U_jj² pruned, compensated column by column."""

    def __init__(self, spec: PruneSpec, per_row: bool, inv_d2: torch.Tensor, W: torch.Tensor):
        self.spec, self.per_row, self.inv_d2 = spec, per_row, inv_d2
        self.mask = torch.ones_like(W, dtype=torch.bool)

    def cuts(self, i1: int, i2: int) -> list[int]:
        return list(range(i1 + self.spec.m, i2, self.spec.m)) if self.spec.structured else []

    def solve_run(self, sweep: Sweep, a: int, b: int) -> bool:
        spec, rows = self.spec, sweep.W.shape[0]
        i2 = sweep.i2
        Wr, Ur = sweep.W[:, a:b], sweep.U[a:b, a:b]
        sal = Wr ** 2 * self.inv_d2[a:b]
        if spec.structured:
            keep = nm_keep(sal, spec.n, spec.m)
        else:
            size = 1 if self.per_row else rows
            keep = prune_lowest(sal, n_pruned(spec.sparsity, b * size) - n_pruned(spec.sparsity, a * size),
                                self.per_row)
        E = prune_columns(Wr, Ur, keep)  # Wr in place: pruned → 0, the run's later columns compensated
        if b < i2:
            sweep.W[:, b:i2].addmm_(E, sweep.U[a:b, b:i2], alpha=-1.0)
        sweep.Err1[:, a - sweep.i1:b - sweep.i1] = E
        self.mask[:, a:b] = keep
        return True
