"""Where the prunable parts of a model live, and their per-layer shapes.

Decoder-only models whose blocks have ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (Llama,
Mistral, Qwen2/3, Gemma 2/3, SmolLM, ...); the block loop is the engine's, for every architecture it knows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ModelLoadError

ATTN_IN = ("q_proj", "k_proj", "v_proj")  # share one input (the normed hidden state)
MLP_IN = ("gate_proj", "up_proj")
SHAPES_KEY = "prunequant_layer_shapes"  # config attribute holding the per-layer shapes
REMOVED_KEY = "prunequant_removed_blocks"  # original indices of whole blocks that were removed


@dataclass
class LayerShape:
    """The shape of one decoder block after structural pruning (what load_structured rebuilds)."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    o_proj_bias: bool
    down_proj_bias: bool
    original_index: int

    def to_dict(self) -> dict:
        return asdict(self)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) == 0:
        raise ModelLoadError(f"{type(model).__name__} has no model.layers: structural pruning supports "
                             "Llama/Mistral/Qwen/Gemma-shaped causal LMs")
    b = layers[0]
    ok = all(hasattr(b.self_attn, n) for n in ATTN_IN + ("o_proj",)) and all(
        hasattr(b.mlp, n) for n in MLP_IN + ("down_proj",))
    if not ok:
        raise ModelLoadError(f"{type(model).__name__} blocks lack q/k/v/o_proj or gate/up/down_proj: "
                             "structural pruning supports Llama/Mistral/Qwen/Gemma-shaped models only")
    return layers


def head_dim(model: nn.Module) -> int:
    return int(blocks(model)[0].self_attn.head_dim)


def layer_shape(block: nn.Module, original_index: int) -> LayerShape:
    attn, mlp = block.self_attn, block.mlp
    hd = attn.head_dim
    return LayerShape(
        num_attention_heads=attn.q_proj.out_features // hd,
        num_key_value_heads=attn.k_proj.out_features // hd,
        intermediate_size=mlp.down_proj.in_features,
        o_proj_bias=attn.o_proj.bias is not None,
        down_proj_bias=mlp.down_proj.bias is not None,
        original_index=original_index,
    )


def current_shapes(model: nn.Module) -> list[LayerShape]:
    stored = getattr(model.config, SHAPES_KEY, None)
    layers = blocks(model)
    originals = [s["original_index"] for s in stored] if stored else list(range(len(layers)))
    return [layer_shape(b, originals[i]) for i, b in enumerate(layers)]


def record_shapes(model: nn.Module) -> None:
    """Write the current per-layer shapes into the config so a save/reload can rebuild them."""
    shapes = current_shapes(model)
    model.config.prunequant_layer_shapes = [s.to_dict() for s in shapes]
    model.config.num_hidden_layers = len(shapes)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    a, m = block.self_attn, block.mlp
    d = {f"self_attn.{n}": getattr(a, n) for n in ATTN_IN + ("o_proj",)}
    d.update({f"mlp.{n}": getattr(m, n) for n in MLP_IN + ("down_proj",)})
    return d


def new_linear(in_f: int, out_f: int, bias: bool, like: nn.Linear) -> nn.Linear:
    w = like.weight
    lin = nn.Linear(in_f, out_f, bias=bias, device=w.device, dtype=w.dtype)
    lin.weight.requires_grad_(w.requires_grad)
    return lin


@torch.no_grad()
def resize_block(block: nn.Module, shape: LayerShape) -> None:
    """Replace the linears of a block with empty ones of ``shape`` (weights are loaded afterwards)."""
    a, m = block.self_attn, block.mlp
    hd = a.head_dim
    hidden = a.q_proj.in_features
    h, kv, inter = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
    a.q_proj = new_linear(hidden, h * hd, a.q_proj.bias is not None, a.q_proj)
    a.k_proj = new_linear(hidden, kv * hd, a.k_proj.bias is not None, a.k_proj)
    a.v_proj = new_linear(hidden, kv * hd, a.v_proj.bias is not None, a.v_proj)
    a.o_proj = new_linear(h * hd, hidden, shape.o_proj_bias, a.o_proj)
    set_gqa(a, h, kv)
    m.gate_proj = new_linear(hidden, inter, m.gate_proj.bias is not None, m.gate_proj)
    m.up_proj = new_linear(hidden, inter, m.up_proj.bias is not None, m.up_proj)
    m.down_proj = new_linear(inter, hidden, shape.down_proj_bias, m.down_proj)
    if hasattr(m, "intermediate_size"):
        m.intermediate_size = inter


def set_gqa(attn: nn.Module, n_heads: int, n_kv: int) -> None:
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} KV heads evenly")
    attn.num_key_value_groups = n_heads // n_kv
    for name, val in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
        if hasattr(attn, name):
            setattr(attn, name, val)
