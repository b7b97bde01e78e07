"""Apply an allocation to the real model: prune what it removes (with bias compensation), then quantize
what remains at its two bit widths with GPTQ, block by block on the outputs of the compressed blocks
before it (error propagation across layers), and account for the bits actually stored."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import RecipeError
from .allocation import Allocation, model_dims
from .arch import ROLES
from .calib import block_loop, block_stats
from .mixed import mixed_quantize
from .surgery import finish, prune_block


@dataclass
class ApplyReport:
    avg_bits: float  # stored bits per original block-linear weight, counted from what was quantized
    planned_bits: float  # the allocation's exact count (the same number unless something went wrong)
    n_weights: int
    layer_errors: list[dict] = field(default_factory=list)


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
    spec = allocation.spec
    model.eval()
    total, errors = [0.0], []

    def compress(i, p, inputs, device):
        la, d = allocation.layers[i], dims[i]
        prune_heads, prune_mlp = not bool(la.keep_heads.all()), not bool(la.keep_mlp.all())
        if prune_heads or prune_mlp:
            st = None
            if compensate:
                st = block_stats(p.block, inputs, device, {"o": p["o"], "down": p["down"]})
            prune_block(p, la.keep_heads.nonzero().flatten() if prune_heads else None,
                        la.keep_mlp.nonzero().flatten() if prune_mlp else None,
                        st["o"].mean if st and prune_heads else None,
                        st["down"].mean if st and prune_mlp else None)
        kept_cols = la.keep_heads.repeat_interleave(d.head_dim)
        high = {"q": la.high_qkv, "k": la.high_qkv, "v": la.high_qkv, "o": la.high_o[kept_cols],
                "gate": la.high_gu, "up": la.high_gu, "down": la.high_down[la.keep_mlp]}
        hess = {}
        if method == "gptq":
            st = block_stats(p.block, inputs, device, {r: p[r] for r in ("q", "o", "gate", "down")}, hessian=True)
            hess = {r: st[src].hessian for r, src in (("q", "q"), ("k", "q"), ("v", "q"), ("o", "o"),
                                                       ("gate", "gate"), ("up", "gate"), ("down", "down"))}
        row = {}
        for n in ROLES:
            lin = p[n]
            W = lin.weight.data.float()
            res = mixed_quantize(W, high[n], spec, H=hess.get(n), damp=damp)
            lin.weight.data.copy_(res.weight.to(lin.weight.dtype))
            total[0] += res.info["bits"]
            if lin.bias is not None:
                total[0] += spec.bias_bits * lin.out_features
            if n in hess:
                D = W - res.weight
                row[getattr(p.st, n)] = float(((D @ hess[n]) * D).sum())
        errors.append(row)

    block_loop(model, calib_ids, batch_size, compress)
    finish(model)
    model.config.prunequant_mixed_precision = {k: v for k, v in allocation.summary().items() if k != "layers"}
    n_w = sum(d.n_weights for d in dims)
    return ApplyReport(total[0] / n_w, allocation.avg_bits, n_w, errors)
