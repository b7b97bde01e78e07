"""Structural pruning passes: heads + MLP channels by importance (FLAP / Wanda-like), whole blocks by influence."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import RecipeError
from . import importance as imp
from .arch import blocks, current_shapes
from .calib import block_loop, block_stats, run_model
from .surgery import drop_blocks, finish, prune_block


@dataclass
class StructuredReport:
    params_before: int
    params_after: int
    shapes: list[dict]
    kept_heads: list[list[int]] = field(default_factory=list)
    kept_channels: list[list[int]] = field(default_factory=list)
    removed_blocks: list[int] = field(default_factory=list)
    block_influence: list[float] = field(default_factory=list)

    @property
    def param_reduction(self) -> float:
        return 1 - self.params_after / max(self.params_before, 1)


def block_params(model: nn.Module) -> int:
    return sum(p.numel() for b in blocks(model) for p in b.parameters())


def _check_fraction(x: float, what: str) -> float:
    if not 0 <= x < 1:
        raise RecipeError(f"{what} {x} must be in [0, 1), e.g. 0.2 to remove 20%")
    return float(x)


def _global_counts(scores: list[torch.Tensor], keep_frac: float, min_keep: int = 1) -> list[int]:
    """How many units each layer keeps when standardized scores are thresholded across layers."""
    z = imp.standardize(scores)
    flat = torch.cat(z)
    n_keep = max(int(round(keep_frac * flat.numel())), min_keep * len(z))
    thr = torch.topk(flat, n_keep).values[-1]
    return [max(min_keep, int((s >= thr).sum())) for s in z]


def prune_structured(model: nn.Module, calib_ids: torch.Tensor, head_sparsity: float = 0.0,
                     mlp_sparsity: float = 0.0, metric: str = "flap", gqa: str = "group",
                     scope: str = "layer", bias_compensation: bool = True,
                     batch_size: int = 8) -> StructuredReport:
    """Remove attention heads and MLP channels in place, GQA-consistent and bias-compensated (docs/internals.md)."""
    hs, ms = _check_fraction(head_sparsity, "head_sparsity"), _check_fraction(mlp_sparsity, "mlp_sparsity")
    if metric not in imp.METRICS:
        raise RecipeError(f"unknown importance metric {metric!r}; choose one of {', '.join(imp.METRICS)}")
    if scope not in ("layer", "global"):
        raise RecipeError(f"scope {scope!r} unknown: use 'layer' or 'global'")
    if gqa not in ("group", "query"):
        raise RecipeError(f"gqa mode {gqa!r} unknown: use 'group' (whole KV groups) or 'query'")
    before = block_params(model)
    model.eval()
    head_counts = mlp_counts = None
    if scope == "global":
        head_counts, mlp_counts = _global_plan(model, calib_ids, hs, ms, metric, gqa, batch_size)
    report = StructuredReport(before, 0, [])

    def prune(i, p, inputs, device):
        stats = block_stats(p.block, inputs, device, {"o": p["o"], "down": p["down"]})
        n_heads, n_kv = p.n_heads, p.n_kv
        h_score = imp.head_scores(imp.channel_scores(p["o"].weight, stats["o"], metric), p.head_dim)
        c_score = imp.channel_scores(p["down"].weight, stats["down"], metric)
        n_h = head_counts[i] if head_counts else round((1 - hs) * n_heads)
        n_c = mlp_counts[i] if mlp_counts else max(1, round((1 - ms) * c_score.numel()))
        keep_h = imp.gqa_keep_heads(h_score, n_kv, n_h, gqa) if n_h < n_heads else None
        keep_c = torch.topk(c_score, n_c).indices.sort().values if n_c < c_score.numel() else None
        prune_block(p, keep_h, keep_c,
                    stats["o"].mean if bias_compensation else None,
                    stats["down"].mean if bias_compensation else None)
        report.kept_heads.append(keep_h.tolist() if keep_h is not None else list(range(n_heads)))
        report.kept_channels.append(keep_c.tolist() if keep_c is not None else list(range(c_score.numel())))

    block_loop(model, calib_ids, batch_size, prune)
    finish(model)
    report.params_after = block_params(model)
    report.shapes = [s.to_dict() for s in current_shapes(model)]
    return report


@torch.no_grad()
def _global_plan(model, calib_ids, hs, ms, metric, gqa, batch_size):
    h_scores, c_scores, n_kv = [], [], []

    def score(i, p, inputs, device):
        stats = block_stats(p.block, inputs, device, {"o": p["o"], "down": p["down"]})
        h = imp.head_scores(imp.channel_scores(p["o"].weight, stats["o"], metric), p.head_dim)
        kv = p.n_kv
        rep = h.numel() // kv
        # rank whole groups in group mode so the count is in groups
        h_scores.append(imp.group_scores(h, kv) if gqa == "group" else h)
        n_kv.append((kv, rep))
        c_scores.append(imp.channel_scores(p["down"].weight, stats["down"], metric))

    block_loop(model, calib_ids, batch_size, score)
    hc = _global_counts(h_scores, 1 - hs)
    heads = [c * rep if gqa == "group" else c for c, (kv, rep) in zip(hc, n_kv)]
    return heads, _global_counts(c_scores, 1 - ms)


@torch.no_grad()
def block_influence(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """ShortGPT Block Influence of every block: mean over calibration tokens of 1 − cos(input, output)."""
    layers = blocks(model)
    tot = [0.0] * len(layers)
    n = [0] * len(layers)

    def hook(mod, args, kw, out, i):
        h_in = args[0] if args else kw["hidden_states"]
        h_out = out[0] if isinstance(out, tuple) else out
        s, c = imp.block_influence(h_in, h_out)
        tot[i] += s
        n[i] += c

    handles = [b.register_forward_hook(lambda m, a, k, o, i=i: hook(m, a, k, o, i), with_kwargs=True)
               for i, b in enumerate(layers)]
    run_model(model, calib_ids, batch_size, handles)
    return [t / max(c, 1) for t, c in zip(tot, n)]


def remove_blocks(model: nn.Module, calib_ids: torch.Tensor, n_blocks: int, batch_size: int = 8) -> StructuredReport:
    """Delete the ``n_blocks`` blocks of lowest Block Influence (in place); the cheap structural option."""
    layers = blocks(model)
    if not 0 <= n_blocks < len(layers):
        raise RecipeError(f"n_blocks {n_blocks} must be in [0, {len(layers)}): at least one block must remain")
    model.eval()
    before = block_params(model)
    bi = block_influence(model, calib_ids, batch_size)
    order = sorted(range(len(bi)), key=lambda i: bi[i])[:n_blocks]
    originals = [s.original_index for s in current_shapes(model)]
    drop_blocks(model, order)
    return StructuredReport(before, block_params(model), [s.to_dict() for s in current_shapes(model)],
                            removed_blocks=sorted(originals[i] for i in order), block_influence=bi)
