"""Architectures as data: block paths, linears sharing one input (one Hessian), their norms, prunable parts."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelLoadError

# Families whose outputs degrade badly without a BOS first (Gemma-3-270M: wiki perplexity 51.6 without, 23.6
# with): every window and task context gets one, as lm-evaluation-harness does; others keep the GPTQ protocol.
BOS_FIRST = ("gemma",)


@dataclass(frozen=True)
class Structure:
    """The parts structural pruning resizes inside a decoder block: attention heads (``head_dim`` rows each of
    q/k/v, as many columns of o) and MLP channels (rows of gate/up, columns of down)."""

    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class ArchSpec:
    """Where blocks are and how their linears run: ``groups``, in execution order, the sets of linears reading one
    input (one Hessian each); ``structure`` None where heads and channels cannot be cut."""

    name: str
    blocks: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]
    conv1d: bool = False  # GPT-2 stores weights as (in, out)
    structure: Structure | None = None


_LLAMA = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

ARCHITECTURES: dict[str, ArchSpec] = {
    **{a: ArchSpec(a, "model.layers", _LLAMA, structure=Structure())
       for a in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "gemma")},
    "phi3": ArchSpec("phi3", "model.layers", (("self_attn.qkv_proj",), ("self_attn.o_proj",),
                                              ("mlp.gate_up_proj",), ("mlp.down_proj",))),
    "opt": ArchSpec("opt", "model.decoder.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                                    ("self_attn.out_proj",), ("fc1",), ("fc2",))),
    "gpt2": ArchSpec("gpt2", "transformer.h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
                     conv1d=True),
}


def arch_of(model: nn.Module) -> ArchSpec:
    mtype = getattr(model.config, "model_type", None)
    if mtype not in ARCHITECTURES:
        raise ModelLoadError(
            f"architecture {mtype!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Add an ArchSpec entry in prunequant.models.ARCHITECTURES to describe it.")
    return ARCHITECTURES[mtype]


def get_blocks(model: nn.Module, arch: ArchSpec | None = None) -> nn.ModuleList:
    arch = arch or arch_of(model)
    obj = model
    for part in arch.blocks.split("."):
        obj = getattr(obj, part)
    return obj


def base_model(model: nn.Module, arch: ArchSpec | None = None) -> nn.Module:
    """The module that holds the decoder blocks (its output is the final normed hidden state)."""
    return model.get_submodule((arch or arch_of(model)).blocks.rpartition(".")[0])


def set_blocks(model: nn.Module, layers: nn.ModuleList, arch: ArchSpec | None = None) -> None:
    parent, _, attr = (arch or arch_of(model)).blocks.rpartition(".")
    setattr(model.get_submodule(parent), attr, layers)


def block_linears(block: nn.Module, arch: ArchSpec) -> dict[str, nn.Module]:
    """Linear layers of one block by relative name, in execution order."""
    out = {}
    for group in arch.groups:
        for rel in group:
            out[rel] = block.get_submodule(rel)
    return out


def named_linears(model: nn.Module, arch: ArchSpec | None = None):
    """(block index, full name, module) of every block linear, in execution order."""
    arch = arch or arch_of(model)
    for i, block in enumerate(get_blocks(model, arch)):
        for rel, module in block_linears(block, arch).items():
            yield i, f"{arch.blocks}.{i}.{rel}", module


def all_linear_names(model: nn.Module) -> list[str]:
    return [name for _, name, _ in named_linears(model)]


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the storage (GPT-2 Conv1D is (in, out))."""
    w = module.weight
    return w.t() if _is_conv1d(module) else w


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    w = w.t() if _is_conv1d(module) else w
    module.weight.data.copy_(w.to(module.weight.dtype))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"



def bos_first(model) -> int | None:
    """The BOS id to put in front of every window for models that need one (``BOS_FIRST``), else None."""
    cfg = getattr(model, "config", None)
    if not str(getattr(cfg, "model_type", "") or "").startswith(BOS_FIRST):
        return None
    bos = getattr(cfg, "bos_token_id", None)
    return int(bos) if isinstance(bos, int) else None


def prepend_bos(x: torch.Tensor, bos: int) -> torch.Tensor:
    """(B, L) token ids → (B, L + 1) with ``bos`` in front of every row."""
    return torch.cat([x.new_full((x.shape[0], 1), bos), x], 1)


# The norm whose output is the input of each shared-input group, by architecture and the group's
# first linear (relative names inside a decoder block). Not listed = no folding (pre-hook division).
NORM_BEFORE: dict[str, dict[str, str]] = {
    **{a: {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm"}
       for a in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
    **{a: {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "pre_feedforward_layernorm"}
       for a in ("gemma2", "gemma3_text")},
    "phi3": {"self_attn.qkv_proj": "input_layernorm", "mlp.gate_up_proj": "post_attention_layernorm"},
    "opt": {"self_attn.q_proj": "self_attn_layer_norm", "fc1": "final_layer_norm"},
    "gpt2": {"attn.c_attn": "ln_1", "mlp.c_fc": "ln_2"},
}


def norm_groups(model: nn.Module, names: set[str]) -> list[tuple[str, list[str]]]:
    """(norm name, linear names) for shared-input groups fully present in ``names``."""
    try:
        arch = arch_of(model)
    except Exception:  # noqa: BLE001 - unknown architecture: no folding, pre-hooks only
        return []
    table = NORM_BEFORE.get(arch.name, {})
    if arch.name == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        return []  # post-norm OPT (350m): the linears' inputs are not norm outputs
    out = []
    for i, block in enumerate(get_blocks(model, arch)):
        prefix = f"{arch.blocks}.{i}."
        for group in arch.groups:
            norm_rel = table.get(group[0])
            full = [prefix + rel for rel in group]
            if norm_rel is None or not all(n in names for n in full):
                continue
            try:
                norm = block.get_submodule(norm_rel)
            except AttributeError:
                continue
            if getattr(norm, "weight", None) is not None:
                out.append((prefix + norm_rel, full))
    return out


def max_length(model) -> int:
    """The longest sequence the model takes (its configured context, at most 8192)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return min(v, 8192)
    return 2048


