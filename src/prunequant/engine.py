"""The sequential block-wise engine.

Catch the inputs of the first decoder block, then for each block: collect per-linear input
statistics with hooks, hand each weight to a solver, and re-run the calibration activations through
the *compressed* block so that later blocks see (and compensate) the error of earlier ones.
Only the current block sits on the compute device; activations can be offloaded to the CPU.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import ArchSpec, arch_of, block_linears, get_blocks, get_weight, set_weight
from .recipe import LayerPlan
from .solvers import needs, solve_layer
from .solvers.base import LayerResult, LayerStats

log = logging.getLogger(__name__)

Solver = Callable[[torch.Tensor, LayerStats, LayerPlan], LayerResult]


class _Stop(Exception):
    """Raised inside a hook to skip the rest of a forward pass."""


@dataclass
class EngineReport:
    layers: dict[str, dict] = field(default_factory=dict)  # per-layer summary (shape, sparsity, bits, time, error)
    states: dict[str, LayerResult] = field(default_factory=dict)  # masks and quant states for export (weight=None)
    seconds: float = 0.0
    resumed_blocks: int = 0


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model, calib_ids: torch.Tensor, batch_size: int, store: torch.device):
    """Run the model up to its first decoder block; return per-batch (hidden_states, kwargs)."""
    blocks = get_blocks(model)
    inputs: list[tuple[torch.Tensor, dict]] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        inputs.append((hidden.to(store), _to(kw, store)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    dev = next(model.parameters()).device
    try:
        for i in range(0, calib_ids.shape[0], batch_size):
            try:
                model(calib_ids[i: i + batch_size].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs


class _StatsHook:
    """Accumulates the input statistics of one linear (shared by the linears that read the same input)."""

    def __init__(self, want_hessian: bool, want_sq: bool, stop: bool):
        self.want_hessian, self.want_sq, self.stop = want_hessian, want_sq, stop
        self.h = None
        self.sq = None
        self.n = 0

    def __call__(self, _module, args, _output):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        b = x.shape[0]
        if self.want_hessian:
            xx = x.t() @ x
            if self.h is None:
                self.h = xx / b
            else:  # running mean: H_n = H_{n-b}·(n-b)/n + XXᵀ/n
                self.h.mul_(self.n / (self.n + b)).add_(xx, alpha=1.0 / (self.n + b))
        if self.want_sq:
            s = (x * x).sum(0)
            self.sq = s if self.sq is None else self.sq.add_(s)
        self.n += b
        if self.stop:
            raise _Stop

    def stats(self) -> LayerStats:
        return LayerStats(hessian=self.h, sq_norm=self.sq, n_tokens=self.n)


@torch.no_grad()
def _run_block(block, inputs, device, outputs: bool):
    outs = []
    for hidden, kw in inputs:
        try:
            y = block(hidden.to(device), **_to(kw, device))
        except _Stop:
            continue
        if outputs:
            y = y[0] if isinstance(y, (tuple, list)) else y
            outs.append(y.to(hidden.device))
    return outs


def _summary(name: str, w: torch.Tensor, plan: LayerPlan, res: LayerResult, seconds: float) -> dict:
    q = plan.quant
    return {
        "name": name, "shape": list(w.shape), "n_params": w.numel(),
        "prune": plan.prune.describe() if plan.prune else None,
        "quant": q.describe() if q else None,
        "sparsity": round(res.sparsity, 6) if plan.prune else 0.0,
        "nm": [plan.prune.n, plan.prune.m] if plan.prune and plan.prune.structured else None,
        "bits": (q.bits if q else 16), "group_size": (q.group_size if q else None),
        "error": res.info.get("error"), "seconds": round(seconds, 4),
        **{k: v for k, v in res.info.items() if k in ("damp", "dead", "avg_bits")},
    }


def compress_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    plan_for: Callable[[str], LayerPlan],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    true_sequential: bool = True,
    offload_activations: bool = False,
    keep_states: bool = True,
    solver: Solver = solve_layer,
    work_dir: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
) -> EngineReport:
    """Compress ``model`` in place, block by block; returns per-layer results.

    ``work_dir`` (optional) holds a checkpoint after every block; a later call with the same
    ``fingerprint`` resumes from it instead of starting over.
    """
    t0 = time.time()
    device = torch.device(device) if device is not None else default_device()
    arch = arch_of(model)
    blocks = get_blocks(model, arch)
    store = torch.device("cpu") if offload_activations else device
    report = EngineReport()

    resume = _Checkpoint(work_dir, fingerprint) if work_dir else None
    done = resume.done() if resume else 0

    # Everything outside the blocks (embeddings, rotary, final norm) runs where it lives.
    inputs = capture_block_inputs(model, calib_ids, batch_size, store)
    bar = tqdm(range(len(blocks)), desc="compress", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        if i < done:
            resume.load_block(i, block, report)
            report.resumed_blocks += 1
        else:
            _compress_block(i, block, arch, inputs, plan_for, device, true_sequential, solver, report, keep_states)
            if resume:
                resume.save_block(i, block, report, arch)
        inputs_next = _run_block(block, inputs, device, outputs=True)
        inputs = [(y, kw) for y, (_, kw) in zip(inputs_next, inputs)]
        block.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if resume:
        resume.clear()
    report.seconds = time.time() - t0
    return report


def _compress_block(i, block, arch: ArchSpec, inputs, plan_for, device, true_sequential, solver, report, keep_states):
    prefix = f"{arch.blocks}.{i}."
    linears = block_linears(block, arch)
    plans = {rel: plan_for(prefix + rel) for rel in linears}
    groups = [g for g in arch.groups if any(not plans[r].is_identity for r in g)]
    if not groups:
        return
    stages = [[g] for g in groups] if true_sequential else [groups]
    for stage in stages:
        hooks, handles = {}, []
        last = stage[-1]
        for g in stage:
            want_h = any(needs(plans[r]) == "hessian" for r in g)
            want_sq = any(needs(plans[r]) == "sq_norm" for r in g)
            hook = _StatsHook(want_h, want_sq, stop=(g is last and true_sequential))
            hooks[g] = hook
            handles.append(linears[g[0]].register_forward_hook(hook))
        try:
            _run_block(block, inputs, device, outputs=False)
        finally:
            for h in handles:
                h.remove()
        for g in stage:
            stats = hooks[g].stats()
            for rel in g:
                plan = plans[rel]
                if plan.is_identity:
                    continue
                module = linears[rel]
                w = get_weight(module).detach().float().clone(memory_format=torch.contiguous_format)
                t = time.time()
                res = solver(w, stats, plan)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                set_weight(module, res.weight)
                name = prefix + rel
                report.layers[name] = _summary(name, w, plan, res, time.time() - t)
                if keep_states:
                    report.states[name] = LayerResult(
                        weight=None,
                        mask=None if res.mask is None else res.mask.cpu(),
                        quant=_cpu_quant(res.quant), info=res.info)
            hooks[g] = None  # free the Hessian before the next stage


def _cpu_quant(q):
    if q is None:
        return None
    for attr in ("codes", "scale", "zero", "g_idx"):
        v = getattr(q, attr)
        if torch.is_tensor(v):
            setattr(q, attr, v.cpu())
    q.extra = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in q.extra.items()}
    return q


class _Checkpoint:
    """Per-block checkpoints so an interrupted run resumes where it stopped."""

    def __init__(self, work_dir, fingerprint: str):
        self.dir = Path(work_dir)
        self.fingerprint = fingerprint
        self.meta = self.dir / "progress.json"

    def done(self) -> int:
        if not self.meta.is_file():
            return 0
        try:
            meta = json.loads(self.meta.read_text())
        except json.JSONDecodeError:
            return 0
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("work dir %s belongs to a different run; starting over", self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            return 0
        return int(meta.get("done", 0))

    def save_block(self, i, block, report: EngineReport, arch: ArchSpec):
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        prefix = f"{arch.blocks}.{i}."
        sd = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        save_file(sd, str(self.dir / f"block_{i}.safetensors"))
        mine = {k: v for k, v in report.layers.items() if k.startswith(prefix)}
        states = {k: v for k, v in report.states.items() if k.startswith(prefix)}
        torch.save({"layers": mine, "states": states}, self.dir / f"block_{i}.pt")
        tmp = self.meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": i + 1}))
        tmp.replace(self.meta)

    def load_block(self, i, block, report: EngineReport):
        from safetensors.torch import load_file

        sd = load_file(str(self.dir / f"block_{i}.safetensors"))
        block.load_state_dict(sd)
        saved = torch.load(self.dir / f"block_{i}.pt", weights_only=False)
        report.layers.update(saved["layers"])
        report.states.update(saved["states"])

    def clear(self):
        shutil.rmtree(self.dir, ignore_errors=True)
