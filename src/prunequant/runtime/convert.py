"""Swap a compressed model's linears for QuantLinears built from the quantization states it was made with.

``states`` maps a linear's name to its QuantState: ``uniform`` (the engine's GPTQ / RTN; one segment) or
``channel-mixed`` (solvers/mixed.py; a high-bit and a low-bit segment over the permuted input columns).
Before a layer is swapped its state is checked against the model's weight (they must dequantize to the
same values in the model's dtype), so the packed model computes what the dequantized model computed.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ..solvers.base import QuantState
from .qlinear import QuantLinear, build_quant_linear


def default_backends(device) -> dict[int, list[str]]:
    """Backend preference per bit width: the Triton kernels on CUDA; torch's CPU kernels on the CPU."""
    if torch.device(device).type == "cuda":
        return {2: ["triton", "packed"], 3: ["triton", "packed"], 4: ["triton", "tinygemm", "packed"],
                8: ["triton", "packed"]}
    return {2: ["packed"], 3: ["packed"], 4: ["tinygemm", "packed"], 8: ["int8pack", "packed"]}


def segments_of(q: QuantState) -> list[tuple[QuantState, torch.Tensor | None]]:
    """(state, input columns) of each segment: one for a uniform grid, one or two for a channel-mixed one."""
    if q.kind == "channel-mixed":
        perm = q.extra["perm"].long()
        n_high = int(q.extra["n_high"])
        parts = []
        if "high" in q.extra:
            parts.append((q.extra["high"], perm[:n_high]))
        if "low" in q.extra:
            parts.append((q.extra["low"], perm[n_high:]))
        return parts
    return [(q, None)]


def state_to(q: QuantState, device) -> QuantState:
    """A copy of ``q`` with its tensors (and those of its parts) on ``device``."""
    import dataclasses

    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, QuantState):
            return state_to(v, device)
        return v

    return dataclasses.replace(q, codes=mv(q.codes), scale=mv(q.scale), zero=mv(q.zero), g_idx=mv(q.g_idx),
                               extra={k: mv(v) for k, v in q.extra.items()})


def state_weight(q: QuantState) -> torch.Tensor:
    """Float32 weight a state describes, in the layer's own column order."""
    if q.kind == "channel-mixed":
        from ..solvers.mixed import dequantize_mixed

        return dequantize_mixed(q)
    return q.dequantize()


@torch.no_grad()
def pack_model(model: nn.Module, states: dict[str, QuantState], *, prefer: dict[int, list[str]] | None = None,
               check: bool = True, verify_weights: bool = True) -> dict:
    """Replace every linear named in ``states`` by a QuantLinear (in place) on the model's device and dtype.

    Returns a record: layers swapped, segments per backend (by bit width), fallbacks and their reasons,
    and how many weights of the model differed from their state (0 when the states describe the model).
    """
    counts: Counter = Counter()
    reasons: Counter = Counter()
    mismatched = compared = 0
    for name, q in states.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, attr)
        if isinstance(lin, QuantLinear):
            continue
        w = lin.weight
        device, dtype = w.device, w.dtype
        q = state_to(q, device)
        if verify_weights:
            ref = state_weight(q).to(device).to(dtype)
            mismatched += int((ref != w).sum())
            compared += w.numel()
        ql, recs = build_quant_linear(segments_of(q), lin.in_features, lin.out_features,
                                      None if lin.bias is None else lin.bias.detach(), device=device, dtype=dtype,
                                      prefer=prefer or default_backends(device), check=check)
        setattr(parent, attr, ql)
        del lin
        for r in recs:
            counts[f"{r['bits']}-bit:{r['backend']}"] += 1
            for f in r["fallbacks"]:
                reasons[f] += 1
    out = {"layers": len(states), "segments": dict(sorted(counts.items())),
           "fallbacks": [{"reason": k, "count": v} for k, v in reasons.most_common()]}
    if verify_weights:
        out["weights_differing_from_state"] = mismatched
        out["weights_compared"] = compared
    return out


def backend_summary(model: nn.Module) -> dict[str, int]:
    """How many QuantLinears run on each backend combination."""
    return dict(Counter(m.backend for m in model.modules() if isinstance(m, QuantLinear)))
