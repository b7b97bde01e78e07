"""Trainable views of a compressed linear that only move what its format stores (docs/internals.md)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..solvers.base import QuantState
from ..solvers.grid import maxq_of

_FP16_MIN, _FP16_MAX = 2.0 ** -24, 65504.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fp16_scale_ste(x: torch.Tensor) -> torch.Tensor:
    """A positive scale rounded to the nearest fp16 value forward, identity backward."""
    x = x.clamp(_FP16_MIN, _FP16_MAX)
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


class _View(nn.Module):
    """Common interface: ``weight()`` (out, in) float32 with gradients; ``export()`` -> (weight, QuantState|None);
    ``param_groups(spec)`` for the optimiser; ``project_()`` after each step."""

    def param_groups(self, spec) -> list[dict]:
        raise NotImplementedError

    def project_(self) -> None:
        pass


class UniformWeight(_View):
    def __init__(self, q: QuantState, mask: torch.Tensor | None):
        super().__init__()
        self.bits, self.group_size, self.symmetric = q.bits, q.group_size, q.symmetric
        self.maxq = maxq_of(q.bits)
        self.register_buffer("g_idx", q.g_idx.long())
        self.register_buffer("scale0", q.scale.float())
        self.register_buffer("mask", None if mask is None else mask.bool())
        self.code = nn.Parameter(q.codes.float())
        self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))
        if q.symmetric:  # the format implies the zero point: it stays
            self.register_buffer("zero", q.zero.float())
        else:
            self.zero = nn.Parameter(q.zero.float())

    def _pieces(self):
        s = fp16_scale_ste(self.scale0 * torch.exp(self.log_scale))
        z = round_ste(self.zero).clamp(0, self.maxq)
        c = round_ste(self.code).clamp(0, self.maxq)
        return s, z, c

    def weight(self) -> torch.Tensor:
        s, z, c = self._pieces()
        w = s[:, self.g_idx] * (c - z[:, self.g_idx])
        return w if self.mask is None else w * self.mask

    def param_groups(self, spec) -> list[dict]:
        groups = [{"params": [self.code], "lr": spec.lr_code}]
        if spec.lr_scale > 0:
            groups.append({"params": [self.log_scale], "lr": spec.lr_scale})
        if isinstance(self.zero, nn.Parameter):
            groups.append({"params": [self.zero], "lr": spec.lr_code})
        return groups

    @torch.no_grad()
    def project_(self) -> None:
        # a latent code beyond the grid's ends gets no gradient back through the clamp: keep it inside
        self.code.clamp_(-0.49, self.maxq + 0.49)
        if isinstance(self.zero, nn.Parameter):
            self.zero.clamp_(-0.49, self.maxq + 0.49)

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, QuantState]:
        s, z, c = (t.detach() for t in self._pieces())
        if self.mask is not None:
            c = torch.where(self.mask, c, z[:, self.g_idx])
        q = QuantState(kind="uniform", bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                       codes=c.to(torch.uint8), scale=s.float(), zero=z.float(), g_idx=self.g_idx.int())
        return q.dequantize(), q


class BinaryWeight(_View):
    def __init__(self, q: QuantState, mask: torch.Tensor | None):
        super().__init__()
        self.state = q
        self.params = nn.Parameter(q.extra["params"].float().clone())

    def _state(self, params) -> QuantState:
        return dataclasses.replace(self.state, extra={**self.state.extra, "params": params})

    def weight(self) -> torch.Tensor:
        from ..solvers.billm import billm_dequantize

        return billm_dequantize(self._state(self.params))

    def param_groups(self, spec) -> list[dict]:
        # means and scales are weight-sized: train them relative to their own size via the scale rate
        return [{"params": [self.params], "lr": spec.lr_scale * float(self.params.detach().abs().mean().clamp_min(1e-8))}]

    @torch.no_grad()
    def export(self):
        from ..solvers.billm import billm_dequantize

        q = self._state(self.params.detach().clone())
        return billm_dequantize(q).float(), q


class MaskedWeight(_View):
    def __init__(self, w: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("w0", w.float())
        self.register_buffer("mask", mask.bool())
        # one step = lr_code x the row's mean |w|, as grid steps are for quantized layers
        self.register_buffer("unit", w.float().abs().mean(1, keepdim=True).clamp_min(1e-12))
        self.delta = nn.Parameter(torch.zeros_like(self.w0))

    def weight(self) -> torch.Tensor:
        return (self.w0 + self.unit * self.delta) * self.mask

    def param_groups(self, spec) -> list[dict]:
        return [{"params": [self.delta], "lr": spec.lr_code}]

    @torch.no_grad()
    def export(self):
        return self.weight().detach(), None


def make_view(weight: torch.Tensor, mask: torch.Tensor | None, q: QuantState | None) -> _View | None:
    """The trainable view of one compressed layer, or None for an untouched dense layer."""
    if q is not None and q.kind == "uniform":
        return UniformWeight(q, mask)
    if q is not None and q.kind == "binary-residual":
        return BinaryWeight(q, mask)
    if q is None and mask is not None:
        return MaskedWeight(weight, mask)
    return None
