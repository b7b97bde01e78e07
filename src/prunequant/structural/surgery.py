"""Physically smaller models: cut heads, MLP channels or whole blocks; save and reload them."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, RecipeError
from ..models.arch import set_blocks
from .arch import (REMOVED_KEY, SHAPES_KEY, LayerShape, Parts, blocks, current_shapes, new_linear, parts,
                   record_shapes, resize_block, set_gqa)


def _take(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
          add_bias: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    if add_bias is not None:
        b = add_bias.to(w.dtype) if b is None else b + add_bias.to(b.dtype)
    new = new_linear(w.shape[1], w.shape[0], b is not None, lin)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def gqa_layout(keep_heads: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Kept KV heads for kept query heads; raises if the kept heads break grouped-query attention."""
    rep = n_heads // n_kv
    keep_heads = keep_heads.sort().values
    if keep_heads.numel() == 0:
        raise RecipeError("every attention head of a layer would be removed: keep at least one")
    if keep_heads.unique().numel() != keep_heads.numel() or int(keep_heads.max()) >= n_heads:
        raise RecipeError(f"head indices must be distinct and < {n_heads}")
    groups = keep_heads // rep
    kv, counts = groups.unique(return_counts=True)
    if counts.unique().numel() != 1:
        raise RecipeError(f"kept query heads per KV head must be equal for grouped-query attention, got "
                          f"{counts.tolist()}: prune whole KV groups or the same number of heads per group")
    return kv


@torch.no_grad()
def prune_block(p: Parts, keep_heads: torch.Tensor | None = None,
                keep_channels: torch.Tensor | None = None, attn_mean: torch.Tensor | None = None,
                mlp_mean: torch.Tensor | None = None) -> None:
    """Keep only the given query heads and MLP channels of one block (in place), bias-compensated with means."""
    if keep_heads is not None:
        hd = p.head_dim
        keep_heads = keep_heads.to(p["q"].weight.device).long().sort().values
        kv = gqa_layout(keep_heads, p.n_heads, p.n_kv)
        ar = torch.arange(hd, device=keep_heads.device)
        q_rows = (keep_heads[:, None] * hd + ar).reshape(-1)
        kv_rows = (kv[:, None] * hd + ar).reshape(-1)
        comp = _compensation(p["o"].weight, q_rows, attn_mean)
        for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            p[role] = _take(p[role], rows=rows)
        p["o"] = _take(p["o"], cols=q_rows, add_bias=comp)
        set_gqa(p.attn, keep_heads.numel(), kv.numel())
    if keep_channels is not None:
        keep = keep_channels.to(p["down"].weight.device).long().sort().values
        if keep.numel() == 0:
            raise RecipeError("every MLP channel of a layer would be removed: keep at least one")
        comp = _compensation(p["down"].weight, keep, mlp_mean)
        p["gate"] = _take(p["gate"], rows=keep)
        p["up"] = _take(p["up"], rows=keep)
        p["down"] = _take(p["down"], cols=keep, add_bias=comp)
        if hasattr(p.mlp, "intermediate_size"):
            p.mlp.intermediate_size = keep.numel()


def _compensation(weight: torch.Tensor, kept_cols: torch.Tensor, mean: torch.Tensor | None):
    if mean is None:
        return None
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept_cols] = False
    if not removed.any():
        return None
    return weight.float()[:, removed] @ mean.to(weight.device).float()[removed]


def finish(model: nn.Module) -> None:
    """Record the new per-layer shapes in the config (call after any surgery)."""
    record_shapes(model)


@torch.no_grad()
def drop_blocks(model: nn.Module, indices: list[int]) -> None:
    """Delete whole decoder blocks (current positions) and renumber the rest for the KV cache."""
    layers = blocks(model)
    n = len(layers)
    drop = sorted(set(int(i) for i in indices))
    if any(i < 0 or i >= n for i in drop):
        raise RecipeError(f"block indices must be in [0, {n}), got {drop}")
    if len(drop) >= n:
        raise RecipeError(f"cannot remove all {n} blocks: keep at least one")
    shapes = current_shapes(model)
    keep = [i for i in range(n) if i not in drop]
    removed = list(getattr(model.config, REMOVED_KEY, []) or []) + [shapes[i].original_index for i in drop]
    set_blocks(model, nn.ModuleList([layers[i] for i in keep]))
    for new_i, p in enumerate(parts(model)):
        p.attn.layer_idx = new_i
        if hasattr(p.block, "layer_idx"):
            p.block.layer_idx = new_i
    lt = getattr(model.config, "layer_types", None)
    if lt is not None and len(lt) == n:
        model.config.layer_types = [lt[i] for i in keep]
    model.config.prunequant_layer_shapes = [shapes[i].to_dict() for i in keep]
    setattr(model.config, REMOVED_KEY, sorted(removed))
    record_shapes(model)


def save_structured(model: nn.Module, out_dir: str | Path) -> Path:
    """Save a structurally pruned model (weights + config with per-layer shapes)."""
    record_shapes(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def load_structured(model_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    verify: bool = True):
    """Rebuild a model saved by save_structured with its per-layer shapes (manifest checked first)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..export.integrity import check_integrity

    d = Path(model_dir)
    if verify:
        check_integrity(d)
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"{d} has no config.json: pass the directory given to save_structured")
    config = AutoConfig.from_pretrained(d)
    raw = json.loads((d / "config.json").read_text())
    shapes = raw.get(SHAPES_KEY)
    if not shapes:
        raise ModelLoadError(f"{d}/config.json has no {SHAPES_KEY}: it was not saved by save_structured; "
                             "load it with AutoModelForCausalLM.from_pretrained instead")
    config.num_hidden_layers = len(shapes)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    for p, s in zip(parts(model), shapes):
        resize_block(p, LayerShape(**s))
    state = {}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{d} holds no .safetensors weights")
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ModelLoadError(f"weights in {d} do not match the stored shapes: missing {sorted(set(missing) - tied)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    return model.to(device).eval()
