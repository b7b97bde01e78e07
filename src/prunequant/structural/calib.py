"""Calibration statistics of a block's linears for structural decisions, gathered inside the engine's loop."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import DataError
from .arch import Parts, structured_arch


def check_ids(calib_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise DataError("calibration data must be a non-empty LongTensor of token ids shaped (N, L)")
    if calib_ids.dtype not in (torch.int64, torch.int32):
        raise DataError(f"calibration ids must be integer token ids, got {calib_ids.dtype}")
    return calib_ids.long()


def batches(calib_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(check_ids(calib_ids).split(max(1, batch_size)))


@torch.no_grad()
def run_model(model: nn.Module, calib_ids: torch.Tensor, batch_size: int, handles: list) -> None:
    """The whole model over the calibration batches (its hooks gather what they need); the hooks then go."""
    dev = next(model.parameters()).device
    try:
        for ids in batches(calib_ids, batch_size):
            model(input_ids=ids.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()


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
def block_stats(block: nn.Module, inputs, device, names: dict[str, nn.Linear],
                hessian: bool = False) -> dict[str, InputStats]:
    """Run the block over the engine's calibration batches, gathering input statistics of the named linears."""
    from ..engine import run_block

    stats = {n: InputStats(m.in_features, m.weight.device, hessian) for n, m in names.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: stats[n].add(args[0]))
               for n, m in names.items()]
    try:
        run_block(block, inputs, device, outputs=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def block_loop(model: nn.Module, calib_ids: torch.Tensor, batch_size: int, hook, plan_for=None,
               sequential: bool = True):
    """``hook(i, parts, inputs, device)`` on every block inside the engine's loop, then its solve under ``plan_for``."""
    from ..engine import compress_model
    from ..recipe import LayerPlan

    st = structured_arch(model).structure

    def block_hook(i, block, arch, inputs, solve, report, dev):
        hook(i, Parts(block, st), inputs, dev)
        solve()

    return compress_model(model, check_ids(calib_ids), plan_for or (lambda name: LayerPlan()),
                          device=next(model.parameters()).device, batch_size=batch_size, true_sequential=sequential,
                          keep_states=plan_for is not None, progress=False, offload_activations=False,
                          block_hook=block_hook)
