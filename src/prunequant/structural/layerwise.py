"""Layer-wise priorities: each decision scored by its own layer's output error per bit (docs/internals.md)."""
from __future__ import annotations

import torch
from torch import nn

from ..solvers.mixed import MixSpec, rtn_fake
from .allocation import LayerDims, model_dims
from .arch import parts
from .calib import InputStats, run_model

# which linear's input statistics stand for each shared input
STAT_OF = {"qkv": "q", "o": "o", "gu": "gate", "down": "down"}


@torch.no_grad()
def input_stats(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> list[dict[str, InputStats]]:
    """Mean / variance / second moment of the inputs of q, o, gate and down, per block, on the original model."""
    dev = next(model.parameters()).device
    stats, handles = [], []
    for p in parts(model):
        st = {}
        for key, role in STAT_OF.items():
            lin = p[role]
            st[key] = InputStats(lin.in_features, dev)
            handles.append(lin.register_forward_pre_hook(lambda m, a, s=st[key]: s.add(a[0])))
        stats.append(st)
    run_model(model, calib_ids, batch_size, handles)
    return stats


def _gain(W: torch.Tensor, spec: MixSpec, pair=None) -> torch.Tensor:
    """Per input column: ‖W_low − W‖² − ‖W_high − W‖² (how much the high grid reduces the squared error)."""
    W = W.detach().float()
    lo, hi = pair if pair is not None else (rtn_fake(W, spec.low_bits, spec), rtn_fake(W, spec.high_bits, spec))
    return (lo - W).pow(2).sum(0) - (hi - W).pow(2).sum(0)


@torch.no_grad()
def layerwise_priorities(model: nn.Module, stats: list[dict[str, InputStats]], spec: MixSpec,
                         copies: list[dict] | None = None) -> list[dict]:
    """Priority (local output error avoided per stored bit) of every keep / high decision of every layer."""
    out = []
    dq = spec.high_bits - spec.low_bits
    for i, (ps, d, st) in enumerate(zip(parts(model), model_dims(model), stats)):
        cp = copies[i] if copies is not None else {}

        def _g(role):
            return _gain(ps[role].weight, spec, cp.get(role))

        e2 = {k: (s.sq_norm / max(s.n_tokens, 1)).to(ps["q"].weight.device) for k, s in st.items()}
        qkv_rows = ps["q"].out_features + ps["k"].out_features + ps["v"].out_features
        gain_qkv = _g("q") + _g("k") + _g("v")
        gain_gu = _g("gate") + _g("up")
        p = {
            "high_qkv": e2["qkv"] * gain_qkv / (dq * qkv_rows),
            "high_o": e2["o"] * _g("o") / (dq * d.hidden),
            "high_gu": e2["gu"] * gain_gu / (dq * 2 * ps["gate"].out_features),
            "high_down": e2["down"] * _g("down") / (dq * d.hidden),
        }
        fl_o = st["o"].var.to(e2["o"].device) * ps["o"].weight.float().pow(2).sum(0)
        fl_d = st["down"].var.to(e2["o"].device) * ps["down"].weight.float().pow(2).sum(0)
        head_cost = d.hidden * d.head_dim * spec.low_bits * (2 + 2 / d.rep)
        p["keep_heads"] = fl_o.reshape(d.n_heads, d.head_dim).sum(1) / head_cost
        p["keep_mlp"] = fl_d / (3 * d.hidden * spec.low_bits)
        out.append({k: v.float().cpu() for k, v in p.items()})
    return out


def priorities_to_logits(prios: list[dict], chosen, margin: float = 2.0, spread: float = 0.4) -> list[dict]:
    """Warm-start logits: ±margin from a chosen allocation, ordered within a mask by log-priority."""
    out = []
    for p, la in zip(prios, chosen.layers):
        lg = {}
        for k, v in p.items():
            z = v.clamp_min(1e-30).log()
            z = ((z - z.mean()) / (z.std() + 1e-8)).clamp(-2, 2) if z.numel() > 1 else torch.zeros_like(z)
            sign = getattr(la, k).float() * 2 - 1
            lg[k] = margin * sign + spread * z
        out.append(lg)
    return out


__all__ = ["input_stats", "layerwise_priorities", "priorities_to_logits", "LayerDims"]
