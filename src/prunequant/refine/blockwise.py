"""Block-wise refinement: after a block is solved, match the original block's outputs (docs/internals.md)."""
from __future__ import annotations

import math
import random
import time

import torch

from ..models import block_linears
from ..onload import to_device
from .attach import Attached, norm_params


def _block_out(block, hidden, kw):
    y = block(hidden, **kw)
    return y[0] if isinstance(y, (tuple, list)) else y


def _rel_err(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    y, t = y.float(), t.float()
    return (y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)


@torch.no_grad()
def block_error(block, inputs, targets, device) -> float:
    """Relative squared output error over all calibration batches (each batch's error weighted by its size)."""
    num = den = 0.0
    for (h, kw), t in zip(inputs, targets):
        t = to_device(t, device).float()
        y = _block_out(block, to_device(h, device), to_device(kw, device)).float()
        num += float((y - t).pow(2).sum())
        den += float(t.pow(2).sum())
    return num / max(den, 1e-30)


def optimizer(groups, device, schedule: str, n_steps: int):
    """(Adam, its per-step rate scheduler) for one stage of ``n_steps``: call ``sched.step()`` after each
    ``opt.step()``. Adam is the fused kernel on CUDA (one launch for all views: these models are launch-bound)."""
    opt = torch.optim.Adam(groups, fused=torch.device(device).type == "cuda")
    if schedule == "cosine":
        rate = lambda s: 0.5 * (1 + math.cos(math.pi * min(s / n_steps, 1)))  # noqa: E731
    else:
        rate = lambda s: 1.0  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, rate)


def apply_step(opt, sched, views: Attached) -> None:
    """One optimiser step, the schedule's next rate, and the trained weights projected back onto their grids."""
    opt.step()
    sched.step()
    views.project_()


class LossCurve:
    """Mean training loss of every ``every`` steps (and of the last, shorter run), summed on the device in
    between: no host sync per step."""

    def __init__(self, n_steps: int, every: int, device):
        self.n_steps, self.every, self.points = n_steps, every, []
        self._sum, self._count = torch.zeros((), device=device), 0

    def add(self, step: int, loss: torch.Tensor) -> None:
        self._sum += loss.detach()
        self._count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.n_steps:
            self.points.append(round(float(self._sum) / self._count, 6))
            self._sum.zero_()
            self._count = 0


class BlockRefiner:
    """Engine hook: ``refiner(i, block, arch, inputs, solve, report, device)``; keeps a per-block log."""

    def __init__(self, spec, seed: int = 0, log_every: int = 10):
        self.spec, self.seed, self.log_every = spec, seed, log_every
        self.log: list[dict] = []
        self.seconds = 0.0  # spent refining (targets, training, checks), beyond the one-shot solve
        self._stream: list | None = None  # the original model's hidden states entering the next block

    def __call__(self, i, block, arch, inputs, solve, report, device) -> None:
        t0 = time.perf_counter()
        stream = self.spec.target == "original-stream"
        if stream and (self._stream is None or i == 0):
            self._stream = [h for h, _ in inputs]
        src = self._stream if stream else [h for h, _ in inputs]
        with torch.no_grad():
            targets = [to_device(_block_out(block, to_device(x, device), to_device(kw, device)), h.device)
                       for x, (h, kw) in zip(src, inputs)]
        if stream:
            self._stream = targets
        t_solve = time.perf_counter()
        solve()
        t_after = time.perf_counter()
        prefix = f"{arch.blocks}.{i}."
        linears = {prefix + rel: m for rel, m in block_linears(block, arch).items()}
        views = Attached(linears, report.states, norm_params(block) if self.spec.lr_norm > 0 else None)
        if views:
            self.log.append(self._train(i, block, inputs, targets, views, device))
            views.finish()
        self.seconds += (t_solve - t0) + (time.perf_counter() - t_after)

    def _train(self, i, block, inputs, targets, views: Attached, device) -> dict:
        spec = self.spec
        before = block_error(block, inputs, targets, device)
        best = views.state_dict_views()
        rng = random.Random(self.seed * 100_003 + i)
        order: list[int] = []
        was_training = block.training
        block.eval()  # no dropout: the targets were computed without it
        with views.active(block), torch.enable_grad():
            opt, sched = optimizer(views.param_groups(spec), device, spec.schedule, spec.steps)
            curve = LossCurve(spec.steps, self.log_every, device)
            for step in range(spec.steps):
                if not order:
                    order = list(range(len(inputs)))
                    rng.shuffle(order)
                k = order.pop()
                h, kw = inputs[k]
                loss = _rel_err(_block_out(block, to_device(h, device), to_device(kw, device)),
                                to_device(targets[k], device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                apply_step(opt, sched, views)
                curve.add(step, loss)
            after = block_error(block, inputs, targets, device)
        block.train(was_training)
        kept = after < before
        if not kept:
            views.load_state_dict_views(best)
        return {"block": i, "error_before": before, "error_after": after if kept else before,
                "error_trained": after, "kept": kept, "curve": curve.points}
