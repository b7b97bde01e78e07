"""Simulating an allocation inside the frozen model, differentiably in its masks (docs/internals.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.arch import base_model
from ..solvers.mixed import MixSpec, rtn_fake
from .allocation import LayerAllocation
from .arch import ROLES, parts

HIGH_KEY = {"q": "high_qkv", "k": "high_qkv", "v": "high_qkv", "o": "high_o", "gate": "high_gu", "up": "high_gu",
            "down": "high_down"}


@torch.no_grad()
def rtn_copies(model: nn.Module, spec: MixSpec) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per block and linear: (round-to-nearest at low bits, at high bits), computed once."""
    out = []
    for p in parts(model):
        row = {}
        for role in ROLES:
            W = p[role].weight.detach().float()
            row[role] = (rtn_fake(W, spec.low_bits, spec), rtn_fake(W, spec.high_bits, spec))
        out.append(row)
    return out


class Simulator:
    """Patches the block linears of ``model`` (in place, undone by ``close``) to run under masks."""

    def __init__(self, model: nn.Module, spec: MixSpec, means: list[dict] | None = None,
                 compensate: bool = True, copies: list[dict] | None = None):
        self.model = model
        self.parts = parts(model)
        self.masks: list[dict | None] = [None] * len(self.parts)
        self._patched = []
        copies = copies or rtn_copies(model, spec)
        for i, p in enumerate(self.parts):
            for role in ROLES:
                lin = p[role]
                lo32, hi32 = copies[i][role]
                lo = lo32.to(lin.weight.dtype)
                dW = (hi32 - lo32).to(lin.weight.dtype)
                mu = None
                if compensate and means is not None and role in ("o", "down"):
                    mu = means[i][role].to(lin.weight.device, lin.weight.dtype)
                lin.forward = self._make(lin, i, role, lo, dW, mu, p.head_dim)
                self._patched.append(lin)

    def _make(self, lin, i, name, lo, dW, mu, hd):
        hkey = HIGH_KEY[name]

        def forward(x):
            m = self.masks[i]
            if m is None:
                return F.linear(x, lin.weight, lin.bias)
            keep = None
            if name == "o":
                keep = m["keep_heads"].repeat_interleave(hd)
            elif name == "down":
                keep = m["keep_mlp"]
            if keep is not None:
                x = x * keep.to(x.dtype)
            y = F.linear(x, lo, lin.bias) + F.linear(x * m[hkey].to(x.dtype), dW)
            if keep is not None and mu is not None:
                y = y + F.linear((1 - keep.to(x.dtype)) * mu, lin.weight)
            return y

        return forward

    def set_allocation(self, layers: list[LayerAllocation | dict] | None) -> None:
        if layers is None:
            self.masks = [None] * len(self.parts)
            return
        self.masks = [la.masks() if isinstance(la, LayerAllocation) else la for la in layers]
        self.masks = [{k: v.float().to(self.parts[0]["q"].weight.device) if v.dtype == torch.bool else v
                       for k, v in m.items()} for m in self.masks]

    def close(self) -> None:
        for lin in self._patched:
            if "forward" in lin.__dict__:
                del lin.forward
        self._patched = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@torch.no_grad()
def teacher_pass(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
    """Final hidden states of the uncompressed model per batch, and the mean input of every o_proj / down_proj."""
    from .calib import InputStats

    dev = next(model.parameters()).device
    ps = parts(model)
    st = [{r: InputStats(p[r].in_features, dev) for r in ("o", "down")} for p in ps]
    hs = [p[r].register_forward_pre_hook(lambda m, a, s=s[r]: s.add(a[0])) for p, s in zip(ps, st) for r in ("o", "down")]
    finals = []
    try:
        for ids in batches:
            finals.append(base_model(model)(input_ids=ids.to(dev), use_cache=False).last_hidden_state)
    finally:
        for h in hs:
            h.remove()
    return finals, [{k: v.mean for k, v in s.items()} for s in st]


def kl_to_teacher(model: nn.Module, ids: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions."""
    dev = next(model.parameters()).device
    h = base_model(model)(input_ids=ids.to(dev), use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    log_s = F.log_softmax(head(h).float(), -1).flatten(0, 1)
    with torch.no_grad():
        log_t = F.log_softmax(head(teacher_hidden).float(), -1).flatten(0, 1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


@torch.no_grad()
def allocation_kl(model: nn.Module, allocation, calib_ids: torch.Tensor, batch_size: int = 8,
                  compensate: bool = True) -> float:
    """Mean KL to the uncompressed model on calib_ids of a hard allocation, both precisions simulated by RTN."""
    from .calib import batches as split

    bs = split(calib_ids, batch_size)
    finals, means = teacher_pass(model, bs)
    with Simulator(model, allocation.spec, means, compensate) as sim:
        sim.set_allocation(allocation.layers)
        tot = sum(float(kl_to_teacher(model, ids, t)) * ids.numel() for ids, t in zip(bs, finals))
    return tot / calib_ids.numel()
