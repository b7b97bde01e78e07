"""Importance of structural units (MLP channels, attention heads, KV groups, whole blocks); docs/internals.md."""
from __future__ import annotations

import torch

from ..errors import RecipeError

METRICS = ("flap", "wanda", "magnitude")


def channel_scores(weight: torch.Tensor, stats, metric: str = "flap") -> torch.Tensor:
    """Score of each input column of ``weight`` (out, in) given its input statistics (calib.InputStats)."""
    w = weight.detach().float()
    if metric == "flap":
        return stats.var.to(w.device) * w.pow(2).sum(0)
    if metric == "wanda":
        return stats.sq_norm.to(w.device).sqrt() * w.abs().sum(0)
    if metric == "magnitude":
        return w.pow(2).sum(0).sqrt()
    raise RecipeError(f"unknown importance metric {metric!r}; choose one of {', '.join(METRICS)}")


def head_scores(col_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum the o_proj input-column scores over each query head's channels."""
    return col_scores.reshape(-1, head_dim).sum(1)


def group_scores(head: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Sum the query-head scores over each KV group (heads i share KV head i // (n_heads / n_kv))."""
    return head.reshape(n_kv, -1).sum(1)


def standardize(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """FLAP's adaptive structure: make scores comparable across layers (zero mean, unit std per layer)."""
    out = []
    for s in scores:
        s = s.float()
        std = s.std() if s.numel() > 1 else s.new_tensor(1.0)
        out.append((s - s.mean()) / (std + 1e-12))
    return out


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """ShortGPT's Block Influence summed over tokens: Σ_t (1 − cos(h_in_t, h_out_t)), and the token count."""
    a = h_in.reshape(-1, h_in.shape[-1]).float()
    b = h_out.reshape(-1, h_out.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
    return float((1 - cos).sum()), a.shape[0]


def gqa_keep_heads(head: torch.Tensor, n_kv: int, n_keep: int, mode: str) -> torch.Tensor:
    """Indices of query heads to keep (sorted), GQA-consistent (modes "group" and "query": docs/internals.md)."""
    n_heads = head.numel()
    rep = n_heads // n_kv
    by_group = head.reshape(n_kv, rep)
    if mode == "group":
        g = min(n_kv, max(1, round(n_keep / rep)))
        keep_g = torch.topk(by_group.sum(1), g).indices.sort().values
        return (keep_g[:, None] * rep + torch.arange(rep, device=head.device)).reshape(-1)
    if mode == "query":
        c = min(rep, max(1, round(n_keep / n_kv)))
        top = torch.topk(by_group, c, dim=1).indices.sort(dim=1).values
        return (torch.arange(n_kv, device=head.device)[:, None] * rep + top).reshape(-1)
    raise RecipeError(f"unknown GQA pruning mode {mode!r}; choose 'group' (whole KV groups) or 'query'")
