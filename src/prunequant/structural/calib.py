"""Calibration activations for a block-by-block loop: the inputs of each block and its call arguments.

One forward pass of the whole model catches, per batch, the hidden state entering block 0 and the keyword
arguments every block is called with (position embeddings, masks), so each block can then be run on its
own — on the outputs of the already-compressed blocks before it, which is how errors get compensated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DataError
from .arch import blocks

_DROP = ("past_key_values", "past_key_value", "use_cache", "cache_position")


def check_ids(calib_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise DataError("calibration data must be a non-empty LongTensor of token ids shaped (N, L)")
    if calib_ids.dtype not in (torch.int64, torch.int32):
        raise DataError(f"calibration ids must be integer token ids, got {calib_ids.dtype}")
    return calib_ids.long()


def batches(calib_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(check_ids(calib_ids).split(max(1, batch_size)))


@dataclass
class BlockInputs:
    """Per batch: the hidden state entering the current block, and per block its call kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]  # [batch][block]

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.hidden = outputs


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    layers = blocks(model)
    dev = next(model.parameters()).device
    hidden, kwargs = [], []
    for ids in batches(calib_ids, batch_size):
        seen: list[dict] = []
        first: list[torch.Tensor] = []

        def grab(mod, args, kw, i=None):
            h = args[0] if args else kw["hidden_states"]
            if not first:
                first.append(h.detach())
            kept = {k: v for k, v in kw.items() if k not in _DROP and k != "hidden_states"}
            seen.append(kept)
            if len(seen) == len(layers):
                raise _Stop

        handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in layers]
        try:
            model(input_ids=ids.to(dev), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        hidden.append(first[0])
        kwargs.append(seen)
    return BlockInputs(hidden, kwargs)


def call_block(block: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = block(h, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, index: int) -> list[torch.Tensor]:
    return [call_block(block, h, kws[index]) for h, kws in zip(inputs.hidden, inputs.kwargs)]


class InputStats:
    """Running statistics of a linear layer's input vectors: mean, variance, ‖x_j‖², optionally x xᵀ."""

    def __init__(self, n: int, device, hessian: bool = False):
        self.n_tokens = 0
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(n, n, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        self.n_tokens += x.shape[0]
        x64 = x.double()
        self.sum += x64.sum(0)
        self.sq += (x64 * x64).sum(0)
        if self.xtx is not None:
            xf = x.float()
            self.xtx += xf.T @ xf

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.n_tokens, 1)).float()

    @property
    def var(self) -> torch.Tensor:
        n = max(self.n_tokens, 1)
        return (self.sq / n - (self.sum / n) ** 2).clamp_min(0).float()

    @property
    def sq_norm(self) -> torch.Tensor:
        return self.sq.float()

    @property
    def hessian(self) -> torch.Tensor:
        """Mean of x xᵀ over tokens (float32)."""
        if self.xtx is None:
            raise ValueError("this InputStats was created without hessian=True")
        return self.xtx / max(self.n_tokens, 1)


@torch.no_grad()
def collect_stats(block: nn.Module, inputs: BlockInputs, index: int, names: dict[str, nn.Linear],
                  hessian: bool = False) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """Run the block over all batches, gathering input statistics of the named linears; returns outputs too."""
    stats = {n: InputStats(m.in_features, m.weight.device, hessian) for n, m in names.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: stats[n].add(args[0]))
               for n, m in names.items()]
    try:
        outs = run_block(block, inputs, index)
    finally:
        for h in handles:
            h.remove()
    return stats, outs
