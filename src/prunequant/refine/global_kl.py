"""Global refinement: top-k KL to the original model's next-token distribution (docs/internals.md)."""
from __future__ import annotations

import math
import random
import time

import torch

from ..models import all_linear_names
from .attach import Attached, norm_params
from .blockwise import LossCurve, apply_step, optimizer


@torch.no_grad()
def teacher_topk(model, ids: torch.Tensor, k: int, batch_size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of calibration windows: (top-k log-probs float32, their token ids int32), on the CPU."""
    home = next(model.parameters()).device
    model.to(device)
    out = []
    try:
        for i in range(0, ids.shape[0], batch_size):
            logits = model(ids[i:i + batch_size].to(device), use_cache=False).logits.float()
            lp, idx = torch.log_softmax(logits, -1).topk(k, dim=-1)
            out.append((lp.cpu(), idx.int().cpu()))
    finally:
        model.to(home)
    return out


def topk_kl(logits: torch.Tensor, t_lp: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the top-k-plus-tail KL(teacher ‖ student)."""
    lq = torch.log_softmax(logits.float(), -1)
    lq_k = lq.gather(-1, t_idx.long())
    p_k = t_lp.exp()
    kl = (p_k * (t_lp - lq_k)).sum(-1)
    r_p = (1 - p_k.sum(-1)).clamp_min(1e-12)
    r_q = (1 - lq_k.exp().sum(-1)).clamp_min(1e-12)
    return (kl + r_p * (r_p.log() - r_q.log())).mean()


def _windows(ids, teacher, ws: list[int], batch_size: int):
    """(ids, top-k log-probs, top-k ids) of calibration windows ``ws`` (teacher is stored per batch)."""
    pick = [teacher[w // batch_size] for w in ws]
    lp = torch.stack([t[0][w % batch_size] for t, w in zip(pick, ws)])
    idx = torch.stack([t[1][w % batch_size] for t, w in zip(pick, ws)])
    return ids[ws], lp, idx


@torch.no_grad()
def calib_kl(model, ids, teacher, batch_size, device, windows: list[int] | None = None) -> float:
    """Mean top-k KL over the calibration ``windows`` (all by default)."""
    ws = list(range(ids.shape[0])) if windows is None else windows
    tot = 0.0
    for i in range(0, len(ws), batch_size):
        x, lp, idx = _windows(ids, teacher, ws[i:i + batch_size], batch_size)
        logits = model(x.to(device), use_cache=False).logits
        tot += float(topk_kl(logits, lp.to(device), idx.to(device))) * x.shape[0]
    return tot / max(len(ws), 1)


def split_holdout(n: int, share: float) -> tuple[list[int], list[int]]:
    """(training windows, judging windows): the last ``round(n · share)`` judge (with none: all)."""
    k = 0 if share <= 0 or n < 4 else min(max(round(n * share), 1), n - 1)
    train, held = list(range(n - k)), list(range(n - k, n))
    return train, held or train


def global_refine(model, ids: torch.Tensor, states: dict, teacher, spec, *, batch_size: int, device,
                  seed: int = 0, log_every: int = 10) -> dict:
    """Train every compressed linear's view against the ``teacher_topk`` teacher; model and ``states`` in place."""
    t0 = time.perf_counter()
    home = next(model.parameters()).device
    model.to(device)
    linears = {n: model.get_submodule(n) for n in all_linear_names(model) if n in states}
    views = Attached(linears, states, norm_params(model) if spec.lr_norm > 0 else None)
    n_steps = spec.n_global_steps
    train, judge = split_holdout(ids.shape[0], spec.holdout)
    log = {"steps": n_steps, "curve": [], "train_windows": len(train),
           "judge_windows": len(judge) if judge is not train else 0, "judge_curve": []}
    if not views:
        model.to(home)
        return log
    before = calib_kl(model, ids, teacher, batch_size, device, judge)
    best, best_kl, best_step = views.state_dict_views(), before, 0
    check_every = max(1, n_steps // 8)
    ckpt = bool(getattr(model, "supports_gradient_checkpointing", False))
    was_training = model.training
    rng = random.Random(seed)
    micro = min(spec.global_batch, batch_size, len(train))
    order: list = []
    with views.active(model), torch.enable_grad():
        if ckpt:
            _checkpointing(model, True)
        model.train()  # checkpointing acts only in training mode; dropout stays off (the teacher had none)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        opt, sched = optimizer([dict(g, lr=g["lr"] * spec.global_lr) for g in views.param_groups(spec)], device,
                               spec.schedule, n_steps)
        curve = LossCurve(n_steps, log_every, device)
        log["curve"] = curve.points  # filled as the stage runs
        try:
            for step in range(n_steps):
                if len(order) < micro:
                    order = list(train)
                    rng.shuffle(order)
                ws, order = order[:micro], order[micro:]
                x, lp, idx = _windows(ids, teacher, ws, batch_size)
                with views.weights_once():
                    loss = topk_kl(model(x.to(device), use_cache=False).logits, lp.to(device), idx.to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                apply_step(opt, sched, views)
                curve.add(step, loss)
                if (step + 1) % check_every == 0 or step + 1 == n_steps:
                    kl = calib_kl(model, ids, teacher, batch_size, device, judge)
                    log["judge_curve"].append([step + 1, round(kl, 6)])
                    if math.isfinite(kl) and kl < best_kl:
                        best, best_kl, best_step = views.state_dict_views(), kl, step + 1
        finally:
            if ckpt:
                _checkpointing(model, False)
            model.train(was_training)
    kept = best_step > 0
    views.load_state_dict_views(best)
    views.finish()
    model.to(home)
    log.update(kl_before=before, kl_after=best_kl, kl_trained=log["judge_curve"][-1][1] if log["judge_curve"]
               else before, kept=kept, best_step=best_step, seconds=round(time.perf_counter() - t0, 2))
    return log

def _checkpointing(model, on: bool) -> None:
    """Per-block activation checkpointing on or off (transformers renamed it in version 5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
