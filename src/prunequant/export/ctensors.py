"""compressed-tensors export ("pack-quantized"), what transformers and vLLM load (docs/format.md)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..solvers.base import LayerResult, QuantState
from ..solvers.grid import group_index
from .common import (DTYPES, TERNARY_BITS, analyse_linear, assign_tensor, code_bits, dtype_name, empty_model,
                     finish_model, read_descriptor, save_config, weight_key, write_descriptor, write_extras,
                     write_whole_model)
from .integrity import ExportError, ShardWriter, parse_size, shard_files, check_integrity

log = logging.getLogger(__name__)

FORMAT = "compressed-tensors"
ASYM_MODES = ("zero-point", "widen")


def _unsupported_reason(module: nn.Module, q: QuantState | None, asymmetric: str) -> str | None:
    """Why a layer's quantization cannot be written as pack-quantized (None = it can)."""
    if q is None:
        return "not quantized"
    if q.kind != "uniform":
        return f"quantization kind {q.kind!r} has no integer codes"
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear (compressed-tensors compresses nn.Linear only)"
    bits = code_bits(q.bits)
    if not 1 <= bits <= 8 or (q.bits != TERNARY_BITS and q.bits != int(q.bits)):
        return f"{q.bits}-bit codes (pack-quantized holds 1..8-bit integers)"
    in_f = q.codes.shape[1]
    if not torch.equal(q.g_idx.to("cpu", torch.int64), group_index(in_f, q.group_size).long()):
        return "act-order groups (g_idx) are not expressible in compressed-tensors >= 0.20; use the compact format"
    ragged = ragged_problem("this layer", in_f, q.group_size)
    if ragged:
        return ragged.split(": ", 1)[1]
    zero = q.zero
    if not bool((zero == zero.round()).all()) or float(zero.min()) < 0 or float(zero.max()) > 2**bits - 1:
        return "zero points are not integers within the code range"
    if asymmetric == "widen" and not _is_symmetric(zero, bits) and bits == 8:
        return "an asymmetric 8-bit grid cannot be widened to 9 bits; use asymmetric='zero-point'"
    return None


MIN_CT_GROUP = 32  # smallest group a ragged layout is re-expressed with (scale overhead, kernel support)


def ragged_problem(name: str, in_f: int, group_size: int) -> str | None:
    """Why this layer's ragged groups cannot be written as compressed-tensors (None = they can)."""
    if group_size <= 0 or in_f % group_size == 0:
        return None
    g = math.gcd(group_size, in_f)
    if g >= MIN_CT_GROUP:
        return None
    return (f"{name}: group size {group_size} leaves a ragged last group over its {in_f} input features, which "
            f"compressed-tensors cannot store (it needs groups that divide the row; re-expressed, they would be "
            f"{g} columns wide); use g{nearest_group_size(in_f, group_size)} (the nearest that divides {in_f}), "
            "per-channel (pc), or --format compact")


def nearest_group_size(in_f: int, group_size: int) -> int:
    """The divisor of ``in_f`` (a multiple of 8, >= MIN_CT_GROUP) nearest to ``group_size``, else ``in_f``."""
    cands = [d for d in range(MIN_CT_GROUP, in_f + 1, 8) if in_f % d == 0] or [in_f]
    return min(cands, key=lambda d: (abs(d - group_size), -d))


def _is_symmetric(zero: torch.Tensor, bits: int) -> bool:
    return bool((zero == 2 ** (bits - 1)).all())


def _ct_group_size(q: QuantState) -> int:
    """Group size as written: a ragged layout becomes gcd(group size, in_features)-column groups (ragged_problem)."""
    return math.gcd(q.group_size, q.codes.shape[1]) if q.group_size > 0 else 0


def _scheme_of(q: QuantState, asymmetric: str) -> tuple[int, int, bool]:
    """(num_bits, group_size or 0 for channel, symmetric) as written to config.json."""
    bits = code_bits(q.bits)
    gs = _ct_group_size(q)
    if _is_symmetric(q.zero, bits):
        return bits, gs, True
    if asymmetric == "widen":
        return bits + 1, gs, True
    return bits, gs, False


def _pack_layer(name: str, lin, scheme: tuple[int, int, bool], scale_dtype: torch.dtype) -> dict:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = lin.quant
    num_bits, _, sym = scheme
    dev = q.codes.device  # packed where the block is (a GPU): only the int32 words travel to the host
    codes = q.codes.to(torch.int64)
    zero = q.zero.to(dev, torch.float32).round().to(torch.int64)
    g = q.g_idx.to(dev, torch.int64)
    zero_full = zero[:, g]
    if lin.mask is not None:  # pruned positions take the zero point's code: they decode to exactly 0
        codes = torch.where(lin.mask.to(dev), codes, zero_full)
    offset = 2 ** (num_bits - 1)
    if sym:
        qv = codes - zero_full  # the signed value; for a widened asymmetric grid it spans ±(2^b − 1)
    else:
        qv = codes - offset
    if int(qv.min()) < -offset or int(qv.max()) > offset - 1:
        raise ExportError(f"layer {name}: codes do not fit the {num_bits}-bit signed range")
    gs = scheme[1]
    # scale/zero of each written group: the original group of its first column (identity unless ragged)
    first = (g[::gs] if gs else g[:1]).cpu()
    base = f"{name}."
    out = {
        base + "weight_packed": pack_to_int32(qv.to(torch.int8), num_bits),
        base + "weight_scale": q.scale.to("cpu", torch.float32)[:, first].to(scale_dtype),
        base + "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if not sym:
        zp = (zero[:, first.to(dev)] - offset).to(torch.int8)
        out[base + "weight_zero_point"] = pack_to_int32(zp, num_bits, packed_dim=0)
    return out


def _quantization_config(schemes: dict[tuple, list[str]], ignore: list[str]) -> dict:
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    for i, ((bits, gs, sym), targets) in enumerate(sorted(schemes.items(), key=lambda kv: kv[0])):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                strategy="group" if gs else "channel", group_size=gs if gs else None)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args)
    qc = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                            ignore=ignore)
    return {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
            "sparsity_config": {}, "transform_config": {}, **qc.model_dump(exclude={"quant_method"})}


def _check_options(dtype, scale_dtype, asymmetric: str, fallback: str) -> None:
    dtype_name(dtype), dtype_name(scale_dtype or dtype)
    if asymmetric not in ASYM_MODES:
        raise ExportError(f"asymmetric={asymmetric!r}: choose one of {', '.join(ASYM_MODES)}")
    if fallback not in ("error", "dense"):
        raise ExportError(f"fallback={fallback!r}: choose 'error' or 'dense'")


class CompressedTensorsWriter:
    """Writes a pack-quantized checkpoint as tensors come (whole model, or block by block)."""

    def __init__(self, root: Path, states: dict[str, LayerResult], dtype: torch.dtype, *,
                 scale_dtype: torch.dtype | None = None, asymmetric: str = "zero-point", fallback: str = "error",
                 max_shard_size: int | str = "2GB"):
        _check_options(dtype, scale_dtype, asymmetric, fallback)
        self.scale_dtype = scale_dtype or dtype
        self.root, self.states, self.dtype = root, states, dtype
        self.asymmetric, self.fallback = asymmetric, fallback
        self.writer = ShardWriter(root, "model", parse_size(max_shard_size))
        self.schemes: dict[tuple, list[str]] = {}
        self.layers: dict[str, dict] = {}

    def reason(self, name: str, module: nn.Module) -> str | None:
        st = self.states[name]
        r = _unsupported_reason(module, st.quant, self.asymmetric) if st.quant is not None else None
        if r and self.fallback == "error":
            raise ExportError(f"layer(s) cannot be written as compressed-tensors, e.g. {name}: {r}; export in the "
                              "compact format, or pass fallback='dense' to store them unquantized")
        return r

    def add(self, key: str, t: torch.Tensor, module_of) -> None:
        name = key[:-7] if key.endswith(".weight") and key[:-7] in self.states else None
        lin = reason = None
        if name is not None:
            module = module_of(name)
            reason = self.reason(name, module)
            lin = analyse_linear(name, module, self.states[name])
        if lin is None or lin.quant is None or reason:
            if lin is not None:
                self.layers[name] = {**lin.record, "stored_as": "float"}
                if reason:
                    self.layers[name]["note"] = reason
            self.writer.add({key: t.to(self.dtype) if t.is_floating_point() else t})
            return
        scheme = _scheme_of(lin.quant, self.asymmetric)
        self.writer.add(_pack_layer(name, lin, scheme, self.scale_dtype))
        self.schemes.setdefault(scheme, []).append(name)
        self.layers[name] = {**lin.record, "stored_as": "quantized", "ct_bits": scheme[0], "ct_symmetric": scheme[2]}

    def close(self, model, tied: dict, tokenizer=None, extra_files: dict | None = None) -> None:
        quantized = {n for names in self.schemes.values() for n in names}
        ignore = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n not in quantized]
        qconfig = _quantization_config(self.schemes, ignore) if self.schemes else None
        save_config(model, self.root, self.dtype, quantization_config=qconfig)
        self.writer.close()
        write_descriptor(self.root, FORMAT, self.dtype, self.layers, scale_dtype=dtype_name(self.scale_dtype),
                         tied=tied, asymmetric=self.asymmetric)
        write_extras(self.root, tokenizer, extra_files)


def save_compressed_tensors(model, states: dict[str, LayerResult], out_dir: str | Path,
                            dtype: torch.dtype = torch.float16, *, scale_dtype: torch.dtype | None = None,
                            asymmetric: str = "zero-point", fallback: str = "error",
                            max_shard_size: int | str = "2GB", overwrite: bool = False, tokenizer=None,
                            extra_files: dict | None = None) -> Path:
    """Write a compressed-tensors "pack-quantized" checkpoint (``asymmetric``, ``fallback``: docs/internals.md)."""
    _check_options(dtype, scale_dtype, asymmetric, fallback)
    modules = dict(model.named_modules())
    missing = sorted(n for n in states if n not in modules)
    if missing:
        raise ExportError(f"states name {missing[0]}, which is not a module of the model")
    reasons = {}
    for name, st in states.items():
        if st.quant is not None:
            r = _unsupported_reason(modules[name], st.quant, asymmetric)
            if r:
                reasons[name] = r
    if reasons and fallback == "error":
        first = next(iter(reasons))
        raise ExportError(f"{len(reasons)} layer(s) cannot be written as compressed-tensors, e.g. {first}: "
                          f"{reasons[first]}; export in the compact format, or pass fallback='dense' to store "
                          "them unquantized")
    return write_whole_model(
        model, Path(out_dir), overwrite,
        lambda tmp: CompressedTensorsWriter(tmp, states, dtype, scale_dtype=scale_dtype, asymmetric=asymmetric,
                                            fallback=fallback, max_shard_size=max_shard_size),
        modules.__getitem__, tokenizer, extra_files)


# ---- loading through prunequant -----------------------------------------------------------------

CT_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def schemes_by_module(model: nn.Module, qconfig) -> dict:
    from compressed_tensors.utils import match_named_modules

    out = {}
    for scheme in qconfig.config_groups.values():
        for name, _ in match_named_modules(model, scheme.targets, qconfig.ignore or []):
            out.setdefault(name, scheme)
    return out


def load_compressed_tensors(path: str | Path, dtype: torch.dtype | None = None,
                            device: str | torch.device = "cpu", verify: bool = True):
    """Load a pack-quantized checkpoint, each layer decompressed with its own scheme (mixed, asymmetric too)."""
    import json

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    root = Path(path)
    if verify:
        check_integrity(root)
    cfg = json.loads((root / "config.json").read_text())
    qdict = dict(cfg.get("quantization_config") or {})
    if not qdict:  # nothing was quantized: a plain checkpoint
        from .dense import load_dense

        return load_dense(root, dtype=dtype, device=device, verify=False)
    if qdict.get("quant_method") != "compressed-tensors":
        raise ModelLoadError(f"{root}/config.json has no compressed-tensors quantization_config")
    fmt = qdict.get("format")
    if fmt not in ("pack-quantized", "dense", None):
        raise ModelLoadError(f"compressed-tensors format {fmt!r} is not supported here; use pack-quantized")
    for k in ("version", "sparsity_config", "transform_config", "quant_method"):
        qdict.pop(k, None)
    qconfig = QuantizationConfig.model_validate(qdict)
    desc = read_descriptor(root) or {}
    dtype = dtype or DTYPES.get(desc.get("dtype") or cfg.get("dtype") or "", torch.float16)
    model = empty_model(root, dtype)
    schemes = schemes_by_module(model, qconfig)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    for mod, parts, scheme in iter_quantized_layers(root, model, schemes, dtype, device):
        parts["weight_scale"] = parts["weight_scale"].float()  # decompress in float32
        w = compressor.decompress(parts, scheme)["weight"]
        assign_tensor(model, weight_key(mod), w, dtype, device)
    return finish_model(model, desc.get("tied", {}), root)


def iter_quantized_layers(root: Path, model: nn.Module, schemes: dict, dtype, device):
    """Walk the shards: assign plain tensors; yield (module name, parts, scheme) per complete quantized layer."""
    from safetensors import safe_open

    pending: dict[str, dict] = {}
    shards = shard_files(root, "model")
    if not shards:
        raise ModelLoadError(f"{root} has no model*.safetensors shard")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    mod, _, part = key.rpartition(".")
                    if part not in CT_PARTS or mod not in schemes:
                        assign_tensor(model, key, f.get_tensor(key), dtype, device)
                        continue
                    parts = pending.setdefault(mod, {})
                    parts[part] = f.get_tensor(key)
                    need = {"weight_packed", "weight_scale", "weight_shape"}
                    if not schemes[mod].weights.symmetric:
                        need.add("weight_zero_point")
                    if need <= set(parts):
                        yield mod, pending.pop(mod), schemes[mod]
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged files raise several exception types
            raise ModelLoadError(f"{shard} cannot be read ({e}); it is truncated or altered, re-export it") from None
    if pending:
        raise ModelLoadError(f"{root}: layer {next(iter(pending))} lacks some of {', '.join(CT_PARTS)}")
