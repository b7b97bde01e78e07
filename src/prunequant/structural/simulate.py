"""Simulating an allocation inside the frozen model: every block linear computes

    y = W_low x̃ + (W_high − W_low)(h ⊙ x̃) + b + W (μ ⊙ (1 − k)),   x̃ = k ⊙ x

with W_low / W_high round-to-nearest copies (cached once), h the high-precision mask over input
channels, k the keep mask over o_proj / down_proj inputs (heads, MLP channels) and μ their calibration
mean (FLAP bias compensation). Masks may be soft or straight-through; gradients reach them only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .allocation import LayerAllocation
from .arch import blocks
from .mixed import MixSpec, rtn_fake

_HIGH_KEY = {"q_proj": "high_qkv", "k_proj": "high_qkv", "v_proj": "high_qkv", "o_proj": "high_o",
             "gate_proj": "high_gu", "up_proj": "high_gu", "down_proj": "high_down"}


LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def rtn_copies(model: nn.Module, spec: MixSpec) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per block and linear: (round-to-nearest at low bits, at high bits), computed once."""
    out = []
    for b in blocks(model):
        row = {}
        for n in LINEAR_NAMES:
            W = b.get_submodule(n).weight.detach().float()
            row[n.split(".")[1]] = (rtn_fake(W, spec.low_bits, spec), rtn_fake(W, spec.high_bits, spec))
        out.append(row)
    return out


class Simulator:
    """Patches the block linears of ``model`` (in place, undone by ``close``) to run under masks."""

    def __init__(self, model: nn.Module, spec: MixSpec, means: list[dict] | None = None,
                 compensate: bool = True, copies: list[dict] | None = None):
        self.model = model
        self.layers = blocks(model)
        self.masks: list[dict | None] = [None] * len(self.layers)
        self._patched = []
        copies = copies or rtn_copies(model, spec)
        for i, b in enumerate(self.layers):
            hd = b.self_attn.head_dim
            for parent, names in ((b.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (b.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    lin = getattr(parent, n)
                    lo32, hi32 = copies[i][n]
                    lo = lo32.to(lin.weight.dtype)
                    dW = (hi32 - lo32).to(lin.weight.dtype)
                    mu = None
                    if compensate and means is not None and n in ("o_proj", "down_proj"):
                        mu = means[i]["o" if n == "o_proj" else "down"].to(lin.weight.device, lin.weight.dtype)
                    lin.forward = self._make(lin, i, n, lo, dW, mu, hd)
                    self._patched.append(lin)

    def _make(self, lin, i, name, lo, dW, mu, hd):
        hkey = _HIGH_KEY[name]

        def forward(x):
            m = self.masks[i]
            if m is None:
                return F.linear(x, lin.weight, lin.bias)
            keep = None
            if name == "o_proj":
                keep = m["keep_heads"].repeat_interleave(hd)
            elif name == "down_proj":
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
            self.masks = [None] * len(self.layers)
            return
        self.masks = [la.masks() if isinstance(la, LayerAllocation) else la for la in layers]
        self.masks = [{k: v.float().to(self.layers[0].self_attn.q_proj.weight.device) if v.dtype == torch.bool else v
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
    """Final (normed) hidden states of the uncompressed model per batch, and the mean input of every
    o_proj / down_proj (for bias compensation)."""
    from .calib import InputStats

    dev = next(model.parameters()).device
    layers = blocks(model)
    st = [{"o": InputStats(b.self_attn.o_proj.in_features, dev),
           "down": InputStats(b.mlp.down_proj.in_features, dev)} for b in layers]
    hs = []
    for b, s in zip(layers, st):
        hs.append(b.self_attn.o_proj.register_forward_pre_hook(lambda m, a, s=s: s["o"].add(a[0])))
        hs.append(b.mlp.down_proj.register_forward_pre_hook(lambda m, a, s=s: s["down"].add(a[0])))
    finals = []
    try:
        for ids in batches:
            finals.append(model.model(input_ids=ids.to(dev), use_cache=False).last_hidden_state)
    finally:
        for h in hs:
            h.remove()
    return finals, [{k: v.mean for k, v in s.items()} for s in st]


def kl_to_teacher(model: nn.Module, ids: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions."""
    dev = next(model.parameters()).device
    h = model.model(input_ids=ids.to(dev), use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    log_s = F.log_softmax(head(h).float(), -1).flatten(0, 1)
    with torch.no_grad():
        log_t = F.log_softmax(head(teacher_hidden).float(), -1).flatten(0, 1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


@torch.no_grad()
def allocation_kl(model: nn.Module, allocation, calib_ids: torch.Tensor, batch_size: int = 8,
                  compensate: bool = True) -> float:
    """The global objective of a hard allocation: mean KL to the uncompressed model on calib_ids, with
    both precisions simulated by round-to-nearest (what the learner optimises)."""
    from .calib import batches as split

    bs = split(calib_ids, batch_size)
    finals, means = teacher_pass(model, bs)
    with Simulator(model, allocation.spec, means, compensate) as sim:
        sim.set_allocation(allocation.layers)
        tot = sum(float(kl_to_teacher(model, ids, t)) * ids.numel() for ids, t in zip(bs, finals))
    return tot / calib_ids.numel()
