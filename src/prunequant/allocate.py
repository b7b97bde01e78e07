"""Allocators: a recipe's global budget as per-layer overrides (``owl`` sparsity, ``bits``; docs/methods.md)."""
from __future__ import annotations

import copy
import re

import torch

from .engine import compress_model
from .errors import RecipeError
from .recipe import LayerPlan, Override, PruneSpec, QuantSpec, Recipe
from .solvers.base import LayerResult


def touched_layers(model, recipe: Recipe) -> list[str]:
    """Names of the block linears the recipe changes, in engine order."""
    from .models import all_linear_names

    return [n for n in all_linear_names(model) if not recipe.plan_for(n).is_identity]


def measure(model, calib_ids, recipe: Recipe, probe, stat: str, device=None, batch_size: int = 8) -> dict:
    """One pass over the unmodified model: ``probe(name, W, stats)`` for every layer the recipe touches."""
    out: dict = {}
    dummy = (LayerPlan(prune=PruneSpec(method="wanda", sparsity=0.5)) if stat == "sq_norm"
             else LayerPlan(quant=QuantSpec(method="gptq", bits=4, group_size=0)))
    def plan_for(name):
        plan = recipe.plan_for(name)
        return LayerPlan() if plan.is_identity else dummy

    names = iter(touched_layers(model, recipe))  # the engine visits the touched layers in this order

    def solver(w, stats, plan):
        name = next(names)
        out[name] = probe(name, w, stats)
        return LayerResult(weight=w)  # identity: the model stays the original

    compress_model(model, calib_ids, plan_for, device=device, batch_size=batch_size,
                   true_sequential=False, keep_states=False, solver=solver, progress=False)
    return out


def _block_of(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def allocate(model, recipe: Recipe, calib_ids, device=None, batch_size: int = 8) -> tuple[Recipe, dict]:
    """A copy of ``recipe`` with per-layer overrides from the allocation method, and what was decided."""
    method = recipe.allocation.method
    if method == "owl":
        return _owl(model, recipe, calib_ids, device, batch_size)
    if method == "bits":
        return _bits(model, recipe, calib_ids, device, batch_size)
    if method == "uniform":
        return recipe, {"method": "uniform"}
    raise RecipeError(f"unknown allocation {method!r}; choose uniform, owl or bits")


def _owl(model, recipe, calib_ids, device, batch_size):
    from .allocate_sparsity import outlier_ratio, owl_sparsity

    if recipe.prune is None or recipe.prune.structured:
        raise RecipeError("OWL allocation needs an unstructured --prune METHOD:SPARSITY")
    opts = recipe.allocation
    M = float(opts.M)

    def probe(name, w, stats):
        return outlier_ratio(w, stats, M=M) + (w.numel(),)

    counts = measure(model, calib_ids, recipe, probe, "sq_norm", device, batch_size)
    per_block: dict[int, list] = {}
    for name, (n_out, n_all, n_par) in counts.items():
        acc = per_block.setdefault(_block_of(name), [0, 0, 0])
        acc[0] += n_out
        acc[1] += n_all
        acc[2] += n_par
    ratios = {b: v[0] / v[1] for b, v in per_block.items()}
    params = {b: v[2] for b, v in per_block.items()}
    sp = owl_sparsity(ratios, recipe.prune.sparsity, lam=float(opts.lam), params=params)
    out = copy.deepcopy(recipe)
    # allocation overrides go first so that the user's own overrides (e.g. a dense first block) still win
    out.overrides = [Override(pattern=f"re:\\.{b}\\.", prune={"sparsity": round(s, 6)}) for b, s in sp.items()] + \
        list(recipe.overrides)
    return out, {"method": "owl", "outlier_ratio": ratios, "sparsity": sp}


def output_fisher(model, calib_ids, names: list[str], device=None, max_samples: int = 16,
                  batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Per output channel of each named linear: the mean over tokens of (∂ loss / ∂ output)² (docs/internals.md)."""
    from .engine import default_device

    dev = torch.device(device) if device else default_device()
    home = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    acc = {n: None for n in names}
    count = 0
    handles = []

    def hook_for(name):
        def fwd(module, inputs, output):
            def grad_hook(g):
                sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                acc[name] = sq if acc[name] is None else acc[name] + sq
            if output.requires_grad:
                output.register_hook(grad_hook)
        return fwd

    ids = calib_ids[:max_samples]
    try:
        model.to(dev)
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(hook_for(n)))
        with torch.enable_grad():
            for i in range(0, len(ids), batch_size):
                x = ids[i:i + batch_size].to(dev)
                emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="sum")
                loss.backward()
                count += x[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.to(home)
    return {n: (v / max(count, 1)).cpu() for n, v in acc.items() if v is not None}


def _bits(model, recipe, calib_ids, device, batch_size):
    from .allocate_bits import allocate_bits
    from .solvers import run_quantize

    if recipe.quant is None:
        raise RecipeError("bit allocation needs --quant METHOD:BITS (its group size and method are kept)")
    opts = recipe.allocation
    choices = list(opts.choices)
    base = recipe.quant
    proxy, weighting = opts.proxy, opts.weighting
    fisher = {}
    if weighting == "fisher":
        fisher = output_fisher(model, calib_ids, touched_layers(model, recipe), device=device)

    def probe(name, w, stats):
        errs = {}
        h = stats.hessian.to(w.device)
        f = fisher[name].to(w.device) if name in fisher else None
        for b in choices:
            spec = QuantSpec(**{**base.__dict__, "bits": b, "method": proxy})
            q = run_quantize(w, stats, spec).weight
            d = (w - q).float()
            per_row = torch.einsum("ij,jk,ik->i", d, h, d)
            errs[b] = float(per_row.sum() if f is None else (f * per_row).sum())
        return errs

    sens = measure(model, calib_ids, recipe, probe, "hessian", device, batch_size)
    from .models import get_weight

    n_params = {n: get_weight(model.get_submodule(n)).numel() for n in sens}
    # the budget counts weight bits (as papers quote "2.5 bits"); the achieved figure with scale/zero overhead
    # is reported beside it
    assign = allocate_bits(sens, n_params, float(opts.avg_bits))
    from .allocate_bits import average_bits

    in_f = {n: get_weight(model.get_submodule(n)).shape[1] for n in sens}
    with_overhead = average_bits(assign, n_params, group_size=base.group_size, symmetric=base.symmetric,
                                 in_features=in_f)
    out = copy.deepcopy(recipe)
    out.overrides = [Override(pattern=n, quant={"bits": b}) for n, b in assign.items()] + list(recipe.overrides)
    achieved = sum(n_params[n] * b for n, b in assign.items()) / sum(n_params.values())
    return out, {"method": "bits", "weighting": weighting, "avg_bits_target": float(opts.avg_bits), "avg_bits": achieved,
                 "avg_bits_with_overhead": with_overhead, "bits": assign,
                 "sensitivity": sens}
