"""The sequential block-wise engine: each block solved on the compressed blocks' outputs (docs/internals.md)."""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .distributed import DistContext
from .models import ArchSpec, arch_of, block_linears, get_blocks, get_weight, set_weight
from .onload import BlockIO, decide_offload, store_nest, to_device, to_store, trim_host_heap
from .recipe import LayerPlan
from .solvers import needs, row_separable, solve_layer
from .solvers.base import LayerRecord, LayerResult, LayerStats, QuantState
from .solvers.hessian import layer_objective

log = logging.getLogger(__name__)

Solver = Callable[[torch.Tensor, LayerStats, LayerPlan], LayerResult]


class _Stop(Exception):
    """Raised inside a hook to skip the rest of a forward pass."""


@dataclass
class EngineReport:
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    states: dict[str, LayerResult] = field(default_factory=dict)  # masks and quant states for export (weight=None)
    seconds: float = 0.0
    resumed_blocks: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds by phase: capture, onload, stats, solve, ...
    offloaded: bool = False  # were calibration activations kept on the CPU


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def block_layer_types(model) -> list[str] | None:
    """Per block, its attention type where the model mixes several (``config.layer_types``), else None."""
    lt = getattr(model.config, "layer_types", None)
    return list(lt) if lt and len(set(lt)) > 1 else None


@torch.no_grad()
def capture_block_inputs(model, calib_ids: torch.Tensor, batch_size: int, store: torch.device,
                         layer_types: list[str] | None = None):
    """Run the model up to its first decoder block; return per-batch (hidden_states, kwargs)."""
    blocks = get_blocks(model)
    inputs: list[tuple[torch.Tensor, dict]] = []
    first = {}
    for j, t in enumerate(layer_types or []):
        first.setdefault(t, j)
    stop_at = max(first.values(), default=0)
    current: dict = {}

    def grab(_module, args, kwargs, j=0):
        hidden = args[0] if args else kwargs["hidden_states"]  # read only: blocks before the last one still run
        kw = store_nest({k: v for k, v in kwargs.items()
                         if k not in ("past_key_values", "past_key_value", "use_cache", "hidden_states")}, store)
        if not layer_types:
            inputs.append((to_store(hidden, store), kw))
            raise _Stop
        if j == 0:
            current["hidden"] = to_store(hidden, store)
        current.setdefault("kw", {})[layer_types[j]] = kw
        if j == stop_at:
            inputs.append((current.pop("hidden"), current.pop("kw")))
            raise _Stop

    hooked = sorted(first.values()) if layer_types else [0]
    handles = [blocks[j].register_forward_pre_hook(functools.partial(grab, j=j), with_kwargs=True) for j in hooked]
    dev = next(p for p in model.parameters() if p.device.type != "meta").device
    try:
        for i in range(0, calib_ids.shape[0], batch_size):
            try:
                model(calib_ids[i: i + batch_size].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return inputs


_MM_OUT_DTYPE: bool | None = None  # does this torch do bf16/fp16 x bf16/fp16 -> float32 matmuls?


@contextlib.contextmanager
def _tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx (x: tokens × features) in float32 (bf16/fp16 on CUDA through the tensor cores)."""
    global _MM_OUT_DTYPE
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        if _MM_OUT_DTYPE is not False:
            try:
                out = torch.mm(x.t(), x, out_dtype=torch.float32)
                _MM_OUT_DTYPE = True
                return out
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_OUT_DTYPE = False
        xf = x.float()
        with _tf32():
            return xf.t() @ xf
    xf = x.float()
    return xf.t() @ xf


class _StatsHook:
    """Accumulates the input statistics of one linear (shared by the linears that read the same input)."""

    def __init__(self, want_hessian: bool, want_sq: bool, stop: bool):
        self.want_hessian, self.want_sq, self.stop = want_hessian, want_sq, stop
        self.h = None  # float32 sum of x xᵀ (divided by n in stats())
        self.sq = None
        self.n = 0

    def __call__(self, _module, args, _output):
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if self.want_hessian:
            xx = gram(x)
            self.h = xx if self.h is None else self.h.add_(xx)
        if self.want_sq:
            xf = x.float()
            s = (xf * xf).sum(0)
            self.sq = s if self.sq is None else self.sq.add_(s)
        self.n += x.shape[0]
        if self.stop:
            raise _Stop

    def reduce(self, dist: DistContext, device) -> None:
        """Sum the statistics over processes (a no-op for one)."""
        self.n = dist.all_reduce_int(self.n, device)
        for t in (self.h, self.sq):
            if t is not None:
                dist.all_reduce_(t)

    def stats(self) -> LayerStats:
        h = None if self.h is None else self.h.div_(max(self.n, 1))  # the mean of x xᵀ
        self.h = None
        return LayerStats(hessian=h, sq_norm=self.sq, n_tokens=self.n)


@torch.no_grad()
def run_block(block, inputs, device, outputs: bool):
    """Run ``block`` over the calibration batches ``inputs`` ([(hidden, kwargs)]); its outputs if asked."""
    outs = []
    for hidden, kw in inputs:
        try:
            y = block(to_device(hidden, device), **to_device(kw, device))
        except _Stop:
            continue
        if outputs:
            y = y[0] if isinstance(y, (tuple, list)) else y
            outs.append(to_store(y, hidden.device))
    return outs


class _Clock:
    """Wall time by phase (synchronising the GPU at each boundary so the phases do not blur)."""

    def __init__(self, device: torch.device, into: dict):
        self.device, self.into = device, into

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.into[phase] = self.into.get(phase, 0.0) + time.perf_counter() - t


def compress_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    plan_for: Callable[[str], LayerPlan],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    true_sequential: bool = True,
    offload_activations: bool | None = None,
    keep_states: bool = True,
    solver: Solver = solve_layer,
    work_dir: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
    block_io: BlockIO | None = None,
    dist: DistContext | None = None,
    block_hook: Callable | None = None,
    report: EngineReport | None = None,
) -> EngineReport:
    """Compress ``model`` in place, block by block; returns per-layer results (arguments: docs/internals.md)."""
    t0 = time.time()
    device = torch.device(device) if device is not None else default_device()
    dist = dist or DistContext()
    if block_hook is not None and dist.world > 1:
        raise ValueError("a block hook (refinement) runs in one process; drop it or use one process")
    block_io = block_io or BlockIO()
    arch = arch_of(model)
    blocks = get_blocks(model, arch)
    report = report if report is not None else EngineReport()
    clock = _Clock(device, report.timings)
    calib_ids = None if calib_ids is None else dist.shard(calib_ids)  # None: data-free solvers (RTN, magnitude)
    if calib_ids is None:
        offload_activations = False
    elif offload_activations is None:
        act_bytes = next(blocks[0].parameters()).element_size()
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd")
        offload_activations = decide_offload(blocks[0], device, calib_ids.numel(),
                                             min(batch_size, calib_ids.shape[0]) * calib_ids.shape[1], hidden, act_bytes)
    report.offloaded = bool(offload_activations) and device.type != "cpu"
    store = torch.device("cpu") if offload_activations else device

    resume = Checkpoint(work_dir, fingerprint) if work_dir else None
    done = resume.done() if resume else 0

    if done >= len(blocks):  # every block was compressed before (killed during evaluation or save)
        for i, block in enumerate(blocks):
            block_io.load(i, block, device)
            resume.load_block(i, block, report)
            block_io.unload(i, block)
        report.resumed_blocks = len(blocks)
        report.seconds = time.time() - t0
        return report

    # Everything outside the blocks (embeddings, rotary, final norm) runs where it lives.
    types = block_layer_types(model)
    with clock("capture"):
        inputs = [] if calib_ids is None else capture_block_inputs(model, calib_ids, batch_size, store,
                                                                    layer_types=types)
    bar = tqdm(range(len(blocks)), desc="compress", unit="block", disable=not progress)
    try:
        for i in bar:
            block = blocks[i]
            block_inputs = inputs if types is None else [(h, kw[types[i]]) for h, kw in inputs]
            with clock("onload"):
                block_io.load(i, block, device)
            if i < done:
                resume.load_block(i, block, report)
                report.resumed_blocks += 1
            else:
                solve = functools.partial(_compress_block, i, block, arch, block_inputs, plan_for, device,
                                          true_sequential, solver, report, keep_states, clock, dist)
                solve() if block_hook is None else block_hook(i, block, arch, block_inputs, solve, report, device)
                if resume and dist.rank == 0:
                    with clock("checkpoint"):  # the copy to the host; the files are written on a thread
                        resume.save_block(i, block, report, arch)
            with clock("forward_out"):
                inputs_next = run_block(block, block_inputs, device, outputs=True)
                inputs = [(y, kw) for y, (_, kw) in zip(inputs_next, inputs)]
            with clock("offload"):
                block_io.unload(i, block)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            trim_host_heap()
    except BaseException:
        if resume:
            resume.close(failing=True)
        raise
    if resume:
        with clock("checkpoint"):
            resume.close()
    # the work dir stays until the output is saved (api.save removes it after the final rename)
    report.seconds = time.time() - t0
    return report


def _stackable(plans: list[LayerPlan], solver) -> bool:
    """Solve these linears (same input) as one matrix? Only identical row-separable built-in Hessian quantizers."""
    p = plans[0]
    if solver is not solve_layer or len(plans) < 2 or any(q != p for q in plans) or p.prune is not None:
        return False
    return p.quant is not None and needs(p) == "hessian" and row_separable(p)


def _split_result(res: LayerResult, sizes: list[int]) -> list[LayerResult]:
    """Cut a stacked solve's result back into one result per linear (rows in stacking order)."""
    out, r0 = [], 0
    for n in sizes:
        rows = slice(r0, r0 + n)
        q = res.quant
        if q is not None:
            if q.kind != "uniform" or q.extra:
                raise AssertionError("stacked solves are only used for uniform grids")
            q = QuantState(kind=q.kind, bits=q.bits, group_size=q.group_size, symmetric=q.symmetric,
                           codes=q.codes[rows], scale=q.scale[rows], zero=q.zero[rows], g_idx=q.g_idx)
        out.append(LayerResult(weight=res.weight[rows], mask=None if res.mask is None else res.mask[rows],
                               quant=q, info=dict(res.info)))
        r0 += n
    return out


def _solve_job(rels, stats, plans, linears, solver, prefix, dev_clock_sync):
    """Solve one job (a linear, or a stack of linears sharing the input); return [(rel, w, result, secs)]."""
    ws = [get_weight(linears[r]).detach().float() for r in rels]
    w = (ws[0] if len(ws) == 1 else torch.cat(ws, 0)).clone(memory_format=torch.contiguous_format)
    t = time.time()
    res = solver(w, stats, plans[rels[0]])
    dev_clock_sync()
    secs = time.time() - t
    if len(rels) == 1:
        return [(rels[0], w, res, secs)]
    parts = _split_result(res, [x.shape[0] for x in ws])
    out = []
    for rel, wi, ri in zip(rels, ws, parts):
        ri.info["error"] = layer_objective(wi, ri.weight, stats.hessian)
        ri.info["stacked"] = len(rels)
        out.append((rel, wi, ri, secs * wi.shape[0] / w.shape[0]))
    return out


def _compress_block(i, block, arch: ArchSpec, inputs, plan_for, device, true_sequential, solver, report,
                    keep_states, clock, dist: DistContext):
    prefix = f"{arch.blocks}.{i}."
    linears = block_linears(block, arch)
    plans = {rel: plan_for(prefix + rel) for rel in linears}
    groups = [g for g in arch.groups if any(not plans[r].is_identity for r in g)]
    if not groups:
        return
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
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
        with clock("forward_stats"):
            try:
                run_block(block, inputs, device, outputs=False)
            finally:
                for h in handles:
                    h.remove()
            for g in stage:
                hooks[g].reduce(dist, device)
        jobs = []  # (relative names solved together, their shared statistics)
        for g in stage:
            stats = hooks.pop(g).stats()
            active = [r for r in g if not plans[r].is_identity]
            if _stackable([plans[r] for r in active], solver):
                jobs.append((active, stats))
            else:
                jobs.extend(([r], stats) for r in active)
        costs = [sum(linears[r].weight.numel() * max(linears[r].weight.shape) for r in rels) for rels, _ in jobs]
        owners = dist.assign(costs)
        with clock("solve"):
            for (rels, stats), owner in zip(jobs, owners):
                solved = _solve_job(rels, stats, plans, linears, solver, prefix, sync) if owner == dist.rank else None
                _apply(solved, rels, owner, linears, plans, prefix, report, keep_states, dist, device)
        del jobs  # free the Hessians before the next stage


def _apply(solved, rels, owner, linears, plans, prefix, report, keep_states, dist: DistContext, device):
    """Write the solved weights into the block (every rank), and record summaries and export states."""
    records = []
    for k, rel in enumerate(rels):
        module = linears[rel]
        if solved is not None:
            _, w, res, secs = solved[k]
            weight, name = res.weight, prefix + rel
            records.append((name, LayerRecord.of(name, w, plans[rel], res, secs),
                            res.for_export() if keep_states else None))
        else:
            weight = torch.empty(get_weight(module).shape, dtype=torch.float32, device=device)
        set_weight(module, dist.broadcast_(weight.to(device=device, dtype=torch.float32), owner))
    records = dist.broadcast_object(records, owner)
    for name, summary, state in records:
        report.layers[name] = summary
        if state is not None:
            report.states[name] = state
