"""The parts structural pruning resizes and their per-layer shapes, found through the model's ArchSpec."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ModelLoadError
from ..models.arch import ARCHITECTURES, ArchSpec, Structure, arch_of, get_blocks

ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
ROLES = ATTN_ROLES + MLP_ROLES
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


class Parts:
    """The resizable linears of one decoder block by role (q, k, v, o, gate, up, down)."""

    def __init__(self, block: nn.Module, structure: Structure):
        self.block, self.st = block, structure
        self.attn = block.get_submodule(structure.attn)
        self.mlp = block.get_submodule(structure.mlp)

    def _owner(self, role: str) -> nn.Module:
        return self.attn if role in ATTN_ROLES else self.mlp

    def __getitem__(self, role: str) -> nn.Linear:
        return getattr(self._owner(role), getattr(self.st, role))

    def __setitem__(self, role: str, lin: nn.Linear) -> None:
        setattr(self._owner(role), getattr(self.st, role), lin)

    def rel(self, role: str) -> str:
        """The linear's name inside the block (as in ArchSpec.groups)."""
        return f"{self.st.attn if role in ATTN_ROLES else self.st.mlp}.{getattr(self.st, role)}"

    @property
    def head_dim(self) -> int:
        return int(self.attn.head_dim)

    @property
    def n_heads(self) -> int:
        return self["q"].out_features // self.head_dim

    @property
    def n_kv(self) -> int:
        return self["k"].out_features // self.head_dim

    @property
    def inter(self) -> int:
        return self["down"].in_features

    def shape(self, original_index: int) -> LayerShape:
        return LayerShape(self.n_heads, self.n_kv, self.inter, self["o"].bias is not None,
                          self["down"].bias is not None, original_index)


def structured_arch(model: nn.Module) -> ArchSpec:
    arch = arch_of(model)
    if arch.structure is None:
        ok = sorted(a for a, s in ARCHITECTURES.items() if s.structure is not None)
        raise ModelLoadError(f"structural pruning does not support {arch.name!r} (fused or ungated projections); "
                             f"supported: {', '.join(ok)}")
    return arch


def role_of(arch: ArchSpec) -> dict[str, str]:
    """Role (q, k, v, o, gate, up, down) of each resizable linear by its name inside a block."""
    st = arch.structure
    return {f"{st.attn if r in ATTN_ROLES else st.mlp}.{getattr(st, r)}": r for r in ROLES}


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model whose architecture structural pruning supports."""
    layers = get_blocks(model, structured_arch(model))
    if len(layers) == 0:
        raise ModelLoadError(f"{type(model).__name__} has no decoder blocks")
    return layers


def parts(model: nn.Module) -> list[Parts]:
    st = structured_arch(model).structure
    return [Parts(b, st) for b in blocks(model)]


def current_shapes(model: nn.Module) -> list[LayerShape]:
    stored = getattr(model.config, SHAPES_KEY, None)
    ps = parts(model)
    originals = [s["original_index"] for s in stored] if stored else list(range(len(ps)))
    return [p.shape(originals[i]) for i, p in enumerate(ps)]


def record_shapes(model: nn.Module) -> None:
    """Write the current per-layer shapes into the config so a save/reload can rebuild them."""
    shapes = current_shapes(model)
    model.config.prunequant_layer_shapes = [s.to_dict() for s in shapes]
    model.config.num_hidden_layers = len(shapes)


def new_linear(in_f: int, out_f: int, bias: bool, like: nn.Linear) -> nn.Linear:
    w = like.weight
    lin = nn.Linear(in_f, out_f, bias=bias, device=w.device, dtype=w.dtype)
    lin.weight.requires_grad_(w.requires_grad)
    return lin


@torch.no_grad()
def resize_block(p: Parts, shape: LayerShape) -> None:
    """Replace the linears of a block with empty ones of ``shape`` (weights are loaded afterwards)."""
    hd, hidden = p.head_dim, p["q"].in_features
    h, kv, inter = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
    for role, i, o, bias in (("q", hidden, h * hd, None), ("k", hidden, kv * hd, None), ("v", hidden, kv * hd, None),
                             ("o", h * hd, hidden, shape.o_proj_bias), ("gate", hidden, inter, None),
                             ("up", hidden, inter, None), ("down", inter, hidden, shape.down_proj_bias)):
        old = p[role]
        p[role] = new_linear(i, o, old.bias is not None if bias is None else bias, old)
    set_gqa(p.attn, h, kv)
    if hasattr(p.mlp, "intermediate_size"):
        p.mlp.intermediate_size = inter


def set_gqa(attn: nn.Module, n_heads: int, n_kv: int) -> None:
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} KV heads evenly")
    attn.num_key_value_groups = n_heads // n_kv
    for name, val in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
        if hasattr(attn, name):
            setattr(attn, name, val)
