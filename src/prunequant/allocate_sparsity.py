"""Per-layer sparsity allocation: uniform, and OWL (Outlier-Weighted Layerwise sparsity; docs/internals.md)."""
from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from .errors import RecipeError
from .solvers.base import LayerStats

MAX_SPARSITY = 0.99


def _check_target(target: float) -> None:
    if not 0.0 <= float(target) < 1.0:
        raise RecipeError(f"target sparsity {target} is outside [0, 1); e.g. use 0.5 for 50% of weights pruned")


def outlier_ratio(W: torch.Tensor, stats: LayerStats, M: float = 5.0,
                  mean: float | None = None) -> tuple[int, int]:
    """(number of Wanda scores above M × mean score, number of scores) for one linear layer."""
    if M <= 0:
        raise RecipeError(f"OWL outlier threshold M={M} must be positive, e.g. 5")
    norm = stats.col_norm.to(device=W.device, dtype=torch.float32)
    score = W.detach().abs().float() * norm[None, :]
    thresh = M * (float(score.mean()) if mean is None else float(mean))
    return int((score > thresh).sum()), score.numel()


def owl_sparsity(outlier_ratio: Mapping[Hashable, float], target: float, lam: float = 0.08,
                 params: Mapping[Hashable, int] | None = None) -> dict:
    """OWL per-block sparsity from per-block outlier ratios: more outliers, lower sparsity (docs/internals.md)."""
    _check_target(target)
    if lam < 0 or lam >= 1:
        raise RecipeError(f"OWL lambda {lam} must be in [0, 1), e.g. 0.08 (sparsities span target ± lambda)")
    keys = list(outlier_ratio)
    if not keys:
        return {}
    r = torch.tensor([float(outlier_ratio[k]) for k in keys], dtype=torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError("OWL outlier ratios must be finite numbers")
    if params is None:
        w = torch.ones_like(r)
    else:
        missing = [k for k in keys if k not in params]
        if missing:
            raise ValueError(f"OWL: no parameter count for block(s) {missing}")
        w = torch.tensor([float(params[k]) for k in keys], dtype=torch.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("OWL parameter counts must be non-negative with a positive total")
    w = w / w.sum()

    span = float(r.max() - r.min())
    if span == 0 or lam == 0:
        return {k: float(target) for k in keys}
    # outlier ratio scaled to [0, 2λ]: the density bonus; sparsity = target + λ − bonus, then shifted
    bonus = (r - r.min()) / span * (2 * lam)
    raw = target + lam - bonus
    raw = raw - float((w * raw).sum()) + target

    if raw.min() >= 0 and raw.max() <= MAX_SPARSITY:
        return {k: float(v) for k, v in zip(keys, raw)}

    def weighted_mean(shift: float) -> float:
        return float((w * (raw + shift).clamp(0.0, MAX_SPARSITY)).sum())

    # clipping can move the mean; find the shift that restores it (monotone, so bisection)
    lo, hi = -1.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if weighted_mean(mid) < target:
            lo = mid
        else:
            hi = mid
    s = (raw + (lo + hi) / 2).clamp(0.0, MAX_SPARSITY)
    return {k: float(v) for k, v in zip(keys, s)}
