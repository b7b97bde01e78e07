"""What every export format shares: reading a compressed linear, the descriptor, the config, empty models."""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..solvers.base import LayerResult, QuantState
from .bitpack import detect_nm
from .integrity import CONFIG_MARK, ExportError

log = logging.getLogger(__name__)

EXPORT_JSON = "prunequant-export.json"
FORMAT_VERSION = 1
TERNARY_BITS = 1.58
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ExportError(f"dtype {dtype} is not supported for export; use torch.float16, torch.bfloat16 or torch.float32")


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def code_bits(bits: float) -> int:
    """Integer bits of a code (ternary codes 0..2 need 2 bits in integer formats)."""
    return 2 if bits == TERNARY_BITS else int(bits)


def theoretical_bits(bits: float) -> float:
    return math.log2(3) if bits == TERNARY_BITS else float(bits)


@dataclass
class LinearExport:
    """One compressed linear as it will be written: the (out, in) float32 weight, the stored positions (``mask``,
    None = all) and the quantization state when its codes describe the weight exactly."""

    name: str
    weight: torch.Tensor  # (out, in) float32, on the module's device
    mask: torch.Tensor | None
    quant: QuantState | None
    transposed: bool
    record: dict  # per-layer metadata: shape, n_params, sparsity, bits, group_size, symmetric, nm, note


def _uniform_ok(q: QuantState | None) -> bool:
    return q is not None and q.kind == "uniform" and q.codes is not None and q.scale is not None


def mask_cost_bits(n: int, kept: int, nm: tuple[int, int] | None, value_bits: float) -> float:
    """Bits to store n positions as a mask (or N:M ranks when ``nm``) + one value per kept position."""
    from .bitpack import nm_rank_bits

    mbits = n if nm is None else nm_rank_bits(nm[1], nm[1] - nm[0]) * (n // nm[1])
    return mbits + kept * value_bits


def analyse_linear(name: str, module: nn.Module, state: LayerResult | None) -> LinearExport:
    """Decide how a linear is stored so that reloading gives back exactly the model's weight (docs/internals.md)."""
    transposed = is_conv1d(module)
    w = module.weight.detach()
    dev = w.device  # the checks run where the weight is (a block still on the GPU: far faster than the CPU)
    W = (w.t() if transposed else w).to(torch.float32)
    out_f, in_f = W.shape
    qs = state.quant_on(dev) if state is not None else None  # held packed: unpacked where the weight is
    mask = state.mask_on(dev) if state is not None else None
    notes = []
    if mask is not None and tuple(mask.shape) != (out_f, in_f):
        raise ExportError(f"layer {name}: mask shape {tuple(mask.shape)} differs from the weight's {(out_f, in_f)}")
    nonzero = W != 0
    n_nonzero = int(torch.count_nonzero(nonzero))
    if mask is not None:
        mask = mask.to(dev, torch.bool)
        if bool((nonzero & ~mask).any()):
            log.warning("layer %s: weights outside the recorded mask are non-zero; the state does not match "
                        "the model, storing the weight's own non-zeros", name)
            notes.append("recorded mask inconsistent with the weight")
            mask = None
    kept = int(torch.count_nonzero(mask)) if mask is not None else None
    # sparsity for TCr: the mask's (a quantized layer without one counts as dense, as in the engine's summary),
    # as an exact integer count: a float32 mean rounds differently on a GPU and a CPU
    if mask is not None:
        sparsity = 1.0 - kept / mask.numel()
    else:
        sparsity = 0.0 if qs is not None else 1.0 - n_nonzero / nonzero.numel()

    q = qs if _uniform_ok(qs) else None
    if qs is not None and q is None:
        notes.append(f"quantization kind {qs.kind!r} stored as float values")
    if q is not None:
        if tuple(q.codes.shape) != (out_f, in_f):
            raise ExportError(f"layer {name}: codes shape {tuple(q.codes.shape)} differs from the weight's")
        dq = q.dequantize().to(torch.float32).to(w.dtype).float()
        tol = W.abs()  # 1e-6 max|W| + 2 eps |W|, in place (a layer-sized temporary fewer)
        floor = 1e-6 * float(tol.max().clamp_min(1e-30))
        tol.mul_(2 * torch.finfo(w.dtype).eps).add_(floor)
        exact = dq.sub_(W).abs_() <= tol
        del dq, tol
        if not bool((exact | ~nonzero).all()):
            log.warning("layer %s: its codes do not dequantize to the model's weight; storing float values", name)
            notes.append("codes inconsistent with the weight: stored as float values")
            q = None
        all_ok = q is not None and bool(exact.all())
    value_bits = code_bits(q.bits) if q is not None else 16
    options = []
    if q is None or all_ok:
        options.append((out_f * in_f * value_bits, None))
    mask_nm = detect_nm(mask) if mask is not None else None
    if mask is not None:
        options.append((mask_cost_bits(W.numel(), kept, mask_nm, value_bits), mask))
    if not options or n_nonzero * value_bits < min(c for c, _ in options):  # else the non-zeros cannot be cheaper
        options.append((mask_cost_bits(W.numel(), n_nonzero, detect_nm(nonzero), value_bits), nonzero))
    _, chosen = min(options, key=lambda t: t[0])

    record = {
        "shape": [out_f, in_f], "n_params": out_f * in_f, "transposed": transposed, "sparsity": sparsity,
        "bits": _recorded_bits(qs, state),
        "quant_bits": qs.bits if qs is not None else None,
        "group_size": qs.group_size if qs is not None else None,
        "symmetric": qs.symmetric if qs is not None else None,
        "kind": qs.kind if qs is not None else None,
        "nm": list(mask_nm) if mask_nm else None,
    }
    if notes:
        record["note"] = "; ".join(notes)
    return LinearExport(name, W, chosen, q, transposed, record)


def _recorded_bits(qs: QuantState | None, state: LayerResult | None) -> float:
    """Bits per kept weight for TCr: the solver's own average (e.g. BiLLM's) when it gives one."""
    if qs is None:
        return 16.0
    avg = (state.info or {}).get("avg_bits") if state is not None else None
    return float(avg) if avg else theoretical_bits(qs.bits)


def weight_key(name: str) -> str:
    return f"{name}.weight"


def model_tensors(model: nn.Module):
    """(name, tensor) of the state dict, each storage once; ``tied`` maps dropped names to kept ones."""
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    items = []
    for k, t in model.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) \
            if t.device.type != "meta" else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        if t.device.type == "meta":
            raise ExportError(f"tensor {k} is on the meta device (offloaded?); load the model fully before exporting")
        if key is not None:
            seen[key] = k
        items.append((k, t))
    return items, tied


def shard_order(model: nn.Module) -> tuple[str | None, str | None]:
    """(prefix of every block, prefix of the last block), or Nones for a model without known blocks.

    Every export writes the tensors outside the blocks first (embeddings, final norm, head: known from the
    start), then the blocks in order, the last one in a shard of its own (ShardWriter.set_last_group): so a
    streaming export has little left to write when the last block is done, and equals the in-memory one."""
    from ..models import arch_of, get_blocks

    try:
        arch = arch_of(model)
        n = len(get_blocks(model, arch))
    except (ModelLoadError, AttributeError):
        return None, None
    return arch.blocks + ".", f"{arch.blocks}.{n - 1}." if n else None


def write_whole_model(model: nn.Module, out_dir: Path, overwrite: bool, make_writer, lookup, tokenizer=None,
                      extra_files: dict | None = None, items=None, tied=None) -> Path:
    """Write every tensor of an in-memory model through ``make_writer(tmp)`` into an atomic output directory."""
    from .integrity import atomic_output

    if items is None:
        items, tied = model_tensors(model)
    blocks, last = shard_order(model)
    if blocks is not None:  # stable: outside tensors first, the blocks after them in order
        items = sorted(items, key=lambda kv: kv[0].startswith(blocks))
    with atomic_output(out_dir, overwrite) as tmp:
        w = make_writer(tmp)
        w.writer.set_last_group(last)
        with w.writer.aborting():
            for key, t in items:
                w.add(key, t, lookup)
            w.close(model, tied, tokenizer, extra_files)
    return Path(out_dir)


def save_config(model: nn.Module, root: Path, dtype: torch.dtype, quantization_config: dict | None = None) -> None:
    """config.json (without any loader-specific quantization config) and generation_config.json."""
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = dtype
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    d["dtype"] = dtype_name(dtype)
    d[CONFIG_MARK] = FORMAT_VERSION
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    (root / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(root)
        except Exception as e:  # noqa: BLE001 - a generation config is optional
            log.warning("generation config not saved: %s", e)


def write_descriptor(root: Path, fmt: str, dtype: torch.dtype, layers: dict, **extra) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pq_version = version("prunequant")
    except PackageNotFoundError:
        pq_version = None
    desc = {"format": fmt, "format_version": FORMAT_VERSION, "prunequant_version": pq_version,
            "dtype": dtype_name(dtype), **extra, "layers": layers}
    (root / EXPORT_JSON).write_text(json.dumps(desc, indent=1))
    return desc


def read_descriptor(root: Path) -> dict | None:
    p = Path(root) / EXPORT_JSON
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{p} is unreadable ({e}); re-export the model") from None


def write_extras(root: Path, tokenizer=None, extra_files: dict | None = None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
    for rel, content in (extra_files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif isinstance(content, str):
            p.write_text(content)
        else:
            p.write_text(json.dumps(content, indent=2, default=str))


def empty_model(root: Path, dtype: torch.dtype | None):
    """The architecture from root/config.json with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(root)
    except Exception as e:  # noqa: BLE001 - any config problem is the export's
        raise ModelLoadError(f"cannot read the model config in {root}: {e}") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def assign_tensor(model: nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype, device) -> None:
    mod_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        raise ModelLoadError(f"tensor {key} names no module of the model; the export does not match its config") \
            from None
    if attr in module._parameters:
        old = module._parameters[attr]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise ModelLoadError(f"tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(old.shape)}")
        v = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        module._parameters[attr] = nn.Parameter(v, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    else:
        raise ModelLoadError(f"tensor {key} names nothing in the model; the export does not match its config")


def forget_mark(model: nn.Module) -> None:
    """A loaded model is no longer the export: saving it elsewhere must not claim a missing manifest."""
    if hasattr(model.config, CONFIG_MARK):
        delattr(model.config, CONFIG_MARK)


def finish_model(model: nn.Module, tied: dict[str, str], root: Path) -> nn.Module:
    for dropped, kept in tied.items():
        mod_name, _, attr = dropped.rpartition(".")
        src_mod, _, src_attr = kept.rpartition(".")
        src = getattr(model.get_submodule(src_mod), src_attr)
        setattr(model.get_submodule(mod_name), attr, src)
    forget_mark(model)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{root} lacks {len(missing)} tensors of the model (e.g. {missing[0]}); re-export it")
    return model.eval()
