"""Simulated per-token activation quantization with SmoothQuant migration (docs/methods.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import RecipeError

ACT_BITS = (4, 8, 16)

def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token (last dim) fake quantization; 16 bits = unchanged."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero tokens stay zero
    return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_j = a_j^α / w_j^(1-α); channels with a zero statistic keep s = 1."""
    a = act_absmax.float()
    w = weight_absmax.float()
    ok = (a > 0) & (w > 0)
    s = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1 - alpha)
    return torch.where(ok, s.clamp(1e-5, 1e5), torch.ones_like(s))


@dataclass
class ActQuantHandle:
    """What apply_activation_quant changed; ``remove()`` restores the model exactly."""

    hooks: list = field(default_factory=list)
    saved: list = field(default_factory=list)  # (parameter, original data)
    folded: dict = field(default_factory=dict)  # norm name -> linear names it now feeds smoothed
    divided: list = field(default_factory=list)  # linears whose input a pre-hook divides by s
    scales: dict = field(default_factory=dict)  # linear name -> s (in,)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        with torch.no_grad():
            for p, data in self.saved:
                p.copy_(data)
        self.hooks.clear()
        self.saved.clear()


def _weight_oi(module: nn.Module) -> torch.Tensor:
    """(out, in) view of the weight (GPT-2 Conv1D stores (in, out))."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def _scale_weight_columns(module: nn.Module, s: torch.Tensor, handle: ActQuantHandle) -> None:
    handle.saved.append((module.weight, module.weight.detach().clone()))
    with torch.no_grad():
        w = _weight_oi(module)
        w.mul_(s.to(w.device, w.dtype)[None, :])


def _fold_into_norm(norm: nn.Module, s: torch.Tensor, handle: ActQuantHandle) -> None:
    """norm output / s: scale weight (and bias); Gemma norms compute x̂ · (1 + weight)."""
    s = s.to(norm.weight.device, torch.float32)
    handle.saved.append((norm.weight, norm.weight.detach().clone()))
    with torch.no_grad():
        w = norm.weight.float()
        if "Gemma" in type(norm).__name__:
            norm.weight.copy_(((1 + w) / s - 1).to(norm.weight.dtype))
        else:
            norm.weight.copy_((w / s).to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            handle.saved.append((norm.bias, norm.bias.detach().clone()))
            norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))


def apply_activation_quant(model: nn.Module, act_absmax: dict[str, torch.Tensor], bits: int = 8,
                           alpha: float = 0.5, smooth: bool = True,
                           groups: list[tuple[str, list[str]]] = ()) -> ActQuantHandle:
    """Fake-quantize the inputs of the linears in ``act_absmax``, SmoothQuant first if ``smooth``; in place."""
    if bits not in ACT_BITS:
        raise RecipeError(f"activation bits {bits} unsupported; choose one of {', '.join(map(str, ACT_BITS))}")
    if not 0 <= alpha <= 1:
        raise RecipeError(f"SmoothQuant alpha {alpha} must be in [0, 1], e.g. 0.5")
    modules = dict(model.named_modules())
    missing = [n for n in act_absmax if n not in modules]
    if missing:
        raise ValueError(f"act_absmax names unknown modules: {missing[:5]}")
    handle = ActQuantHandle()
    scales: dict[str, torch.Tensor] = {}
    if smooth:
        grouped: set[str] = set()
        for norm_name, linears in groups:
            a = torch.stack([act_absmax[n].float().cpu() for n in linears]).amax(0)
            w = torch.stack([_weight_oi(modules[n]).detach().abs().amax(0).float().cpu() for n in linears]).amax(0)
            s = smooth_scales(a, w, alpha)
            _fold_into_norm(modules[norm_name], s, handle)
            for n in linears:
                _scale_weight_columns(modules[n], s, handle)
                scales[n] = s
                grouped.add(n)
            handle.folded[norm_name] = linears
        tied = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
        for n in act_absmax:
            if n in grouped or id(modules[n].weight) in tied:
                continue  # a weight tied to the embedding (lm_head) must not be rescaled
            w = _weight_oi(modules[n]).detach().abs().amax(0).float().cpu()
            s = smooth_scales(act_absmax[n].float().cpu(), w, alpha)
            _scale_weight_columns(modules[n], s, handle)
            scales[n] = s
            handle.divided.append(n)
    divided = set(handle.divided)
    for n in act_absmax:
        inv = (1.0 / scales[n]) if n in divided else None
        if inv is None and bits >= 16:
            continue
        handle.hooks.append(modules[n].register_forward_pre_hook(_make_hook(inv, bits)))
    handle.scales = scales
    return handle


def _make_hook(inv_scale: torch.Tensor | None, bits: int):
    cache = {}

    def hook(module, args):
        x = args[0]
        if inv_scale is not None:
            key = (x.device, x.dtype)
            if key not in cache:
                cache[key] = inv_scale.to(x.device, x.dtype)
            x = x * cache[key]
        return (fake_quant_per_token(x, bits),) + tuple(args[1:])

    return hook


def collect_act_absmax(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of the named linears over ``batches`` (iterable of input_ids)."""
    modules = dict(model.named_modules())
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def make(name):
        def hook(module, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return hook

    for n in names:
        hooks.append(modules[n].register_forward_pre_hook(make(n)))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return stats
