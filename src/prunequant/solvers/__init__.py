"""Solvers: the registry ``SOLVERS`` (statistic, row separability, function per method) and ``solve_layer``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import RecipeError
from ..recipe import LayerPlan, PruneSpec, QuantSpec
from .base import LayerResult, LayerStats
from .billm import billm_quantize
from .joint import joint_obs
from .mixed import mixed_solve
from .prune import magnitude_prune, sparsegpt_prune, wanda_prune
from .quant import gptq_quantize, rtn_quantize

_NEED_ORDER = (None, "sq_norm", "hessian")  # a Hessian also gives the squared norms (its diagonal)


@dataclass(frozen=True)
class Solver:
    needs: str | None  # the statistic it reads: None, "sq_norm" or "hessian"
    row_separable: bool  # rows solved independently given the statistics
    fn: Callable[..., LayerResult]  # prune: fn(w, stats, spec); quantize: fn(w, stats, spec, mask=None)


SOLVERS: dict[str, Solver] = {
    "magnitude": Solver(None, False, lambda w, stats, spec: magnitude_prune(w, spec)),  # layer-wide threshold
    "wanda": Solver("sq_norm", True, wanda_prune),
    # block-wide threshold, as the reference SparseGPT
    "sparsegpt": Solver("hessian", False, lambda w, stats, spec: sparsegpt_prune(w, stats, spec, per_row=False)),
    "rtn": Solver(None, True, lambda w, stats, spec, mask=None: rtn_quantize(w, spec, mask=mask)),
    "gptq": Solver("hessian", True, gptq_quantize),
    "billm": Solver("hessian", False, billm_quantize),  # block-wide salient columns and break points
    # channel-mixed (solvers.mixed.MixedQuant plans, from a structural allocation): per-column bit widths
    "mixed": Solver("hessian", False, mixed_solve),
    "mixed-rtn": Solver(None, False, mixed_solve),
}


def solver(method: str) -> Solver:
    try:
        return SOLVERS[method]
    except KeyError:
        raise RecipeError(f"unknown method {method!r}; choose one of {', '.join(SOLVERS)}") from None


def _specs(plan: LayerPlan) -> list[PruneSpec | QuantSpec]:
    return [s for s in (plan.prune, plan.quant) if s is not None]


def needs(plan: LayerPlan) -> str | None:
    """'hessian', 'sq_norm' or None: the strongest statistic any method of the plan reads."""
    return max((solver(s.method).needs for s in _specs(plan)), key=_NEED_ORDER.index, default=None)


def row_separable(plan: LayerPlan) -> bool:
    return all(solver(s.method).row_separable for s in _specs(plan))


def run_prune(w: torch.Tensor, stats: LayerStats, spec: PruneSpec) -> LayerResult:
    return solver(spec.method).fn(w, stats, spec)


def run_quantize(w: torch.Tensor, stats: LayerStats, spec: QuantSpec, mask=None) -> LayerResult:
    return solver(spec.method).fn(w, stats, spec, mask=mask)


def solve_layer(w: torch.Tensor, stats: LayerStats, plan: LayerPlan) -> LayerResult:
    """Compress one weight (out, in) according to its plan."""
    p, q = plan.prune, plan.quant
    if p is None and q is None:
        return LayerResult(weight=w)
    if q is None:
        return run_prune(w, stats, p)
    if p is None:
        return run_quantize(w, stats, q)
    if plan.joint == "onepass" and p.method == "sparsegpt" and q.method == "gptq":
        return joint_obs(w, stats, p, q)
    # in sequence: prune, then quantize every weight (quantize-pruned: zeros are quantized like any weight, no
    # mask kept) or only the kept ones (keep-mask; also one-pass for methods without a joint form)
    pruned = run_prune(w, stats, p)
    mask = None if plan.joint == "quantize-pruned" else pruned.mask
    res = run_quantize(pruned.weight, stats, q, mask=mask)
    res.mask = mask
    res.info = {**pruned.info, **res.info}
    return res
