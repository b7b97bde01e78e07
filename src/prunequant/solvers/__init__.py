"""Solvers: one function per method over a layer's weight and its input statistics.

``solve_layer`` dispatches a LayerPlan to the right solver; ``needs`` tells the engine which
statistic to collect (none, per-column squared norms, or the full Hessian).
"""
from __future__ import annotations

import torch

from ..recipe import LayerPlan
from .base import LayerResult, LayerStats

_HESSIAN_PRUNE = {"sparsegpt"}
_HESSIAN_QUANT = {"gptq", "billm"}


def needs(plan: LayerPlan) -> str | None:
    """'hessian', 'sq_norm' or None."""
    p, q = plan.prune, plan.quant
    if (p and p.method in _HESSIAN_PRUNE) or (q and q.method in _HESSIAN_QUANT):
        return "hessian"
    if p and p.method == "wanda":
        return "hessian" if (q and plan.joint == "onepass" and q.method != "rtn") else "sq_norm"
    if p and q and plan.joint == "onepass" and q.method != "rtn":
        return "hessian"
    return None


def run_prune(w: torch.Tensor, stats: LayerStats, spec) -> LayerResult:
    from .prune import magnitude_prune, sparsegpt_prune, wanda_prune

    if spec.method == "magnitude":
        return magnitude_prune(w, spec)
    if spec.method == "wanda":
        return wanda_prune(w, stats, spec)
    return sparsegpt_prune(w, stats, spec, per_row=False)  # block-wide threshold, as the reference SparseGPT


def run_quantize(w: torch.Tensor, stats: LayerStats, spec, mask=None) -> LayerResult:
    from . import quant as Q  # noqa: N812

    if spec.method == "rtn":
        return Q.rtn_quantize(w, spec, mask=mask)
    if spec.method == "gptq":
        return Q.gptq_quantize(w, stats, spec, mask=mask)
    return Q.billm_quantize(w, stats, spec, mask=mask)


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
        from .joint import joint_obs

        return joint_obs(w, stats, p, q)
    # sequential: prune, then quantize all weights (case A) or only the survivors (case B / one-pass
    # fallback for methods without a joint form)
    pruned = run_prune(w, stats, p)
    mask = None if plan.joint == "A" else pruned.mask
    res = run_quantize(pruned.weight, stats, q, mask=mask)
    if plan.joint == "A":
        res.mask = None  # zeros were quantized like any weight; no mask is kept
    else:
        res.mask = pruned.mask
    res.info = {**pruned.info, **res.info}
    return res
