"""Global-error allocation: learn every layer's keep / high masks against the output (docs/internals.md)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError
from ..solvers.mixed import MixSpec
from .allocation import MASKS, Allocation, LayerDims, discretize, layer_bits, model_dims
from .calib import batches as split
from .layerwise import input_stats, layerwise_priorities, priorities_to_logits
from .simulate import Simulator, kl_to_teacher, rtn_copies, teacher_pass


def spec_from_choices(choices, group_size: int = 128, symmetric: bool = False) -> MixSpec:
    """``(("prune", 0), ("low", 2), ("high", 4))`` → MixSpec(low_bits=2, high_bits=4, allow_prune=True)."""
    d = {}
    for name, bits in choices:
        if name not in ("prune", "low", "high"):
            raise RecipeError(f"unknown choice {name!r}: use 'prune', 'low' and 'high'")
        d[name] = bits
    if "low" not in d or "high" not in d:
        raise RecipeError("choices need a 'low' and a 'high' bit width, e.g. (('low', 2), ('high', 4))")
    if d.get("prune", 0) != 0:
        raise RecipeError("a pruned channel costs 0 bits: write ('prune', 0)")
    return MixSpec(low_bits=int(d["low"]), high_bits=int(d["high"]), group_size=group_size,
                   symmetric=symmetric, allow_prune="prune" in d)


class MaskLogits(nn.Module):
    """Logits of all six masks of every layer; keep_heads is per KV group in "group" mode."""

    def __init__(self, dims: list[LayerDims], gqa: str, init: list[dict], hypernet: bool = False,
                 emb_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.dims, self.gqa, self.hypernet = dims, gqa, hypernet
        target = [self._compact(d, lg) for d, lg in zip(dims, init)]
        if not hypernet:
            self.direct = nn.ParameterList(
                [nn.ParameterDict({k: nn.Parameter(v.clone().float()) for k, v in t.items()}) for t in target])
            return
        if len({d for d in dims}) != 1:
            raise RecipeError("the hypernetwork needs layers of one shape: use hypernet=False on a pruned model")
        self.emb = nn.Parameter(torch.randn(len(dims), emb_dim) * 0.5)
        self.trunk = nn.Sequential(nn.Linear(emb_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, v.numel()) for k, v in target[0].items()})
        self._fit(target)

    def _compact(self, d: LayerDims, lg: dict) -> dict:
        out = {k: lg[k].float() for k in MASKS}
        if self.gqa == "group":
            out["keep_heads"] = out["keep_heads"].reshape(d.n_kv, d.rep).mean(1)
        return out

    def _fit(self, target, steps: int = 150):
        """Warm start: regress the hypernetwork's outputs onto the initial logits."""
        opt = torch.optim.Adam(self.parameters(), lr=2e-2)
        for _ in range(steps):
            opt.zero_grad()
            out = self._raw()
            loss = sum(F.mse_loss(o[k], t[k].to(o[k].device)) for o, t in zip(out, target) for k in t)
            loss.backward()
            opt.step()

    def _raw(self) -> list[dict]:
        if not self.hypernet:
            return [dict(p.items()) for p in self.direct]
        z = self.trunk(self.emb)
        per_mask = {k: h(z) for k, h in self.heads.items()}
        return [{k: v[i] for k, v in per_mask.items()} for i in range(len(self.dims))]

    def forward(self) -> list[dict]:
        out = []
        for d, r in zip(self.dims, self._raw()):
            r = dict(r)
            if self.gqa == "group":
                r["keep_heads"] = r["keep_heads"].repeat_interleave(d.rep)
            out.append(r)
        return out


def _relax(logit: torch.Tensor, tau: float, noise: bool) -> torch.Tensor:
    if noise:
        u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
        logit = logit + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(logit / tau)
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


def layerwise_allocation(model: nn.Module, calib_ids: torch.Tensor, avg_bits: float,
                         choices=(("prune", 0), ("low", 2), ("high", 4)), group_size: int = 128,
                         gqa: str = "group", batch_size: int = 8, prios: list[dict] | None = None) -> Allocation:
    """Baseline: every layer gets ``avg_bits`` on its own, spent by local output error avoided per bit."""
    spec = spec_from_choices(choices, group_size)
    if prios is None:
        prios = layerwise_priorities(model, input_stats(model, calib_ids, batch_size), spec)
    return discretize(model_dims(model), prios, spec, avg_bits, gqa, per_layer=True,
                      info={"method": "layerwise"})


def learn_global_allocation(model: nn.Module, calib_ids: torch.Tensor, avg_bits: float,
                            choices=(("prune", 0), ("low", 2), ("high", 4)), steps: int = 100,
                            lr: float = 0.05, group_size: int = 128, gqa: str = "group",
                            objective: str = "kl", init: str = "layerwise", hypernet: bool = False,
                            temperature: tuple[float, float] = (1.0, 0.3), noise: bool = True,
                            budget_weight: float = 1.0, dual_lr: float = 0.5, batch_size: int = 4,
                            seed: int = 0, log_every: int = 0) -> Allocation:
    """Learn per-layer keep and high/low masks meeting ``avg_bits`` per original weight exactly."""
    if objective not in ("kl", "ce", "kl+ce"):
        raise RecipeError(f"objective {objective!r} unknown: use 'kl', 'ce' or 'kl+ce'")
    if init not in ("layerwise", "uniform"):
        raise RecipeError(f"init {init!r} unknown: use 'layerwise' or 'uniform'")
    if steps < 0:
        raise RecipeError("steps must be >= 0")
    spec = spec_from_choices(choices, group_size)
    dims = model_dims(model)
    if any(d != dims[0] for d in dims) and getattr(model.config, "prunequant_layer_shapes", None):
        raise RecipeError("learn the allocation on the uncompressed model, then apply it")
    torch.manual_seed(seed)
    t0 = time.time()
    bs = split(calib_ids, batch_size)
    model.eval()
    copies = rtn_copies(model, spec)
    prios = layerwise_priorities(model, input_stats(model, calib_ids, batch_size), spec, copies)
    base = layerwise_allocation(model, calib_ids, avg_bits, choices, group_size, gqa, prios=prios)
    if init == "layerwise":
        start = priorities_to_logits(prios, base)
    else:
        start = [{k: torch.full((n,), 3.0) for k, n in d.sizes().items()} for d in dims]
    dev = next(model.parameters()).device
    params = MaskLogits(dims, gqa, start, hypernet).to(dev)
    finals, means = teacher_pass(model, bs)
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(params.parameters(), lr=lr)
    n_w = sum(d.n_weights for d in dims)
    lam, history = None, []
    try:
        with Simulator(model, spec, means, copies=copies) as sim:
            for step in range(steps):
                frac = step / max(steps - 1, 1)
                tau = temperature[0] * (temperature[1] / temperature[0]) ** frac
                logits = params()
                masks = [{k: _relax(v, tau, noise) for k, v in lg.items()} for lg in logits]
                if not spec.allow_prune:
                    for m in masks:
                        m["keep_heads"] = torch.ones_like(m["keep_heads"])
                        m["keep_mlp"] = torch.ones_like(m["keep_mlp"])
                sim.set_allocation(masks)
                ids, fin = bs[step % len(bs)], finals[step % len(finals)]
                loss = _objective(model, ids, fin, objective)
                # cost of the sampled hard masks (what discretization will count), straight-through gradient
                bits = sum(layer_bits(d, m, spec, exact=False) for d, m in zip(dims, masks)) / n_w
                if lam is None:  # the multiplier starts on the scale of the objective, and stays near it
                    lam0 = lam = budget_weight * max(float(loss.detach()), 1e-4)
                over = bits / avg_bits - 1
                (loss + lam * over).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                lam = min(max(lam * math.exp(dual_lr * float(over.detach()) * 10), lam0 * 1e-2), lam0 * 1e2)
                history.append({"step": step, "loss": float(loss.detach()), "bits": float(bits.detach()), "lambda": lam})
                if log_every and step % log_every == 0:
                    print(f"step {step}: {objective} {float(loss.detach()):.4f} expected bits {float(bits):.3f} "
                          f"lambda {lam:.3g} ({time.time() - t0:.0f}s)", flush=True)
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
    with torch.no_grad():
        final = [{k: v.detach().float().cpu() for k, v in lg.items()} for lg in params()]
    alloc = discretize(dims, final, spec, avg_bits, gqa,
                       info={"method": "global", "objective": objective, "steps": steps, "lr": lr,
                             "init": init, "hypernet": hypernet, "seconds": time.time() - t0,
                             "history": history})
    alloc.info["layerwise"] = base
    return alloc


def _objective(model, ids, teacher_hidden, objective):
    if objective == "kl":
        return kl_to_teacher(model, ids, teacher_hidden)
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    logits = model(input_ids=ids, use_cache=False).logits.float()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    if objective == "ce":
        return ce
    return ce + kl_to_teacher(model, ids, teacher_hidden)
