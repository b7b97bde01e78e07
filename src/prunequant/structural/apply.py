"""Apply an allocation to the real model: prune, then quantize at two bit widths (docs/internals.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import RecipeError
from ..recipe import LayerPlan
from ..solvers.mixed import MixedQuant
from .allocation import Allocation, model_dims
from .arch import ROLES, parts, role_of, structured_arch
from .calib import block_loop, block_stats
from .surgery import finish, prune_block


@dataclass
class ApplyReport:
    avg_bits: float  # stored bits per original block-linear weight, counted from what was quantized
    planned_bits: float  # the allocation's exact count (the same number unless something went wrong)
    n_weights: int
    layer_errors: list[dict] = field(default_factory=list)
    states: dict = field(default_factory=dict)  # layer name -> its channel-mixed QuantState (for packing)


@torch.no_grad()
def apply_allocation(model: nn.Module, allocation: Allocation, calib_ids: torch.Tensor, method: str = "gptq",
                     batch_size: int = 8, damp: float = 0.01, compensate: bool = True) -> ApplyReport:
    """Compress ``model`` in place as ``allocation`` says; returns the stored bits actually used."""
    if method not in ("gptq", "rtn"):
        raise RecipeError(f"method {method!r} unknown: use 'gptq' (error propagation) or 'rtn'")
    dims = model_dims(model)
    if dims != allocation.dims:
        raise RecipeError("this allocation was learnt for a model of other shapes: apply it to the model "
                          "it was learnt on, before any other pruning")
    arch = structured_arch(model)
    roles = role_of(arch)
    model.eval()

    def plan_for(name: str) -> LayerPlan:  # after the block's surgery: masks over the kept channels
        i, rel = name[len(arch.blocks) + 1:].split(".", 1)
        la, d = allocation.layers[int(i)], dims[int(i)]
        high = {"q": la.high_qkv, "k": la.high_qkv, "v": la.high_qkv, "o": la.high_o[la.keep_heads.repeat_interleave(
            d.head_dim)], "gate": la.high_gu, "up": la.high_gu, "down": la.high_down[la.keep_mlp]}[roles[rel]]
        return LayerPlan(quant=MixedQuant(allocation.spec, tuple(high.tolist()), "mixed" if method == "gptq" else
                                          "mixed-rtn", damp))

    def prune(i, p, inputs, device):
        la = allocation.layers[i]
        prune_heads, prune_mlp = not bool(la.keep_heads.all()), not bool(la.keep_mlp.all())
        if prune_heads or prune_mlp:
            st = block_stats(p.block, inputs, device, {"o": p["o"], "down": p["down"]}) if compensate else None
            prune_block(p, la.keep_heads.nonzero().flatten() if prune_heads else None,
                        la.keep_mlp.nonzero().flatten() if prune_mlp else None,
                        st["o"].mean if st and prune_heads else None,
                        st["down"].mean if st and prune_mlp else None)

    # one statistics pass per block before any of its layers is quantized, as the allocation was scored
    report = block_loop(model, calib_ids, batch_size, prune, plan_for=plan_for, sequential=False)
    finish(model)
    total, errors = 0.0, []
    for i, p in enumerate(parts(model)):
        row = {}
        for role in ROLES:
            name = f"{arch.blocks}.{i}.{p.rel(role)}"
            total += report.states[name].info["bits"]
            if p[role].bias is not None:
                total += allocation.spec.bias_bits * p[role].out_features
            if method == "gptq":
                row[getattr(p.st, role)] = report.layers[name].error
        errors.append(row)
    model.config.prunequant_mixed_precision = {k: v for k, v in allocation.summary().items() if k != "layers"}
    n_w = sum(d.n_weights for d in dims)
    return ApplyReport(total / n_w, allocation.avg_bits, n_w, errors, {n: r.quant for n, r in report.states.items()})
