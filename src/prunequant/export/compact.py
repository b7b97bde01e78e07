"""The compact format: a pruned + quantized model stored near its theoretical size (docs/format.md)."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..solvers.base import LayerResult
from ..solvers.grid import group_index
from .bitpack import (decode_nm, detect_nm, encode_nm, nm_rank_bits, pack_bits, pack_mask, pack_trits,
                      unpack_bits, unpack_mask, unpack_trits)
from .common import (DTYPES, TERNARY_BITS, LinearExport, analyse_linear, assign_tensor, dtype_name, empty_model,
                     finish_model, model_tensors, read_descriptor, save_config, weight_key, write_descriptor,
                     write_extras, write_whole_model)
from .integrity import ExportError, ShardWriter, parse_size, shard_files, check_integrity

log = logging.getLogger(__name__)

FORMAT = "prunequant-compact"
PREFIX = "compact"
PARTS = ("mask", "nm_index", "codes", "scale", "zero", "g_idx", "values")


def _encode_mask(base: str, mask: torch.Tensor, tensors: dict) -> dict:
    nm = detect_nm(mask)
    if nm is None:
        tensors[f"{base}.mask"] = pack_mask(mask)
        return {"type": "bitmask"}
    n, m = nm
    rb = nm_rank_bits(m, m - n)
    tensors[f"{base}.nm_index"] = pack_bits(encode_nm(mask, m, m - n), rb)
    return {"type": "nm-rank", "n": n, "m": m, "bits_per_group": rb}


def _encode_quant(base: str, lin: LinearExport, mask, scale_dtype, tensors: dict) -> dict:
    q = lin.quant
    in_f = lin.weight.shape[1]
    codes = q.codes.reshape(-1) if mask is None else q.codes[mask]
    enc: dict = {"stored_as": "quantized", "kept": int(codes.numel())}
    if q.bits == TERNARY_BITS:
        tensors[f"{base}.codes"] = pack_trits(codes)
        enc.update(code_encoding="trits", code_bits=2)
    else:
        cb = int(q.bits)
        tensors[f"{base}.codes"] = pack_bits(codes, cb)
        enc.update(code_encoding="bits", code_bits=cb)
    scale = q.scale.detach().to("cpu", torch.float32)
    stored = scale.to(scale_dtype)
    tensors[f"{base}.scale"] = stored
    if scale_dtype != torch.float32:
        change = float(((stored.float() - scale).abs() / scale.abs().clamp_min(1e-30)).max())
        if change > 0:
            enc["scale_rounding"] = change
    zero = q.zero.detach().to("cpu", torch.float32)
    n_groups = scale.shape[1]
    maxcode = (1 << enc["code_bits"]) - 1
    if bool((zero == zero.reshape(-1)[0]).all()):
        enc["zero"] = {"type": "const", "value": float(zero.reshape(-1)[0])}
    elif bool((zero == zero.round()).all()) and 0 <= float(zero.min()) and float(zero.max()) <= maxcode:
        tensors[f"{base}.zero"] = pack_bits(zero.to(torch.int64), enc["code_bits"])
        enc["zero"] = {"type": "packed", "bits": enc["code_bits"]}
    else:
        tensors[f"{base}.zero"] = zero.to(scale_dtype)
        enc["zero"] = {"type": "float"}
    g = q.g_idx.detach().to("cpu", torch.int64)
    if torch.equal(g, group_index(in_f, q.group_size).long()):
        enc["g_idx"] = "contiguous"
    else:
        tensors[f"{base}.g_idx"] = g.to(torch.int16 if n_groups <= 32767 else torch.int32)
        enc["g_idx"] = "stored"
    enc["n_groups"] = n_groups
    return enc


def encode_linear(lin: LinearExport, dtype: torch.dtype, scale_dtype: torch.dtype) -> tuple[dict, dict]:
    """Tensors and the per-layer encoding record for one compressed linear."""
    base = weight_key(lin.name)
    tensors: dict[str, torch.Tensor] = {}
    mask = lin.mask
    enc: dict = {"mask_encoding": None if mask is None else _encode_mask(base, mask, tensors)}
    if lin.quant is not None:
        enc.update(_encode_quant(base, lin, mask, scale_dtype, tensors))
    elif mask is not None:
        tensors[f"{base}.values"] = lin.weight[mask].to(dtype)
        enc.update(stored_as="sparse-float", kept=int(mask.sum()))
    else:
        w = lin.weight.t() if lin.transposed else lin.weight
        tensors[base] = w.to(dtype)
        enc.update(stored_as="float", kept=lin.weight.numel())
    return tensors, enc


class CompactWriter:
    """Writes tensors in the compact format as they come (whole model, or block by block)."""

    def __init__(self, root: Path, states: dict[str, LayerResult], dtype: torch.dtype, *,
                 scale_dtype: torch.dtype = torch.float16, max_shard_size: int | str = "2GB"):
        dtype_name(dtype), dtype_name(scale_dtype)
        self.root, self.states, self.dtype, self.scale_dtype = root, states, dtype, scale_dtype
        self.writer = ShardWriter(root, PREFIX, parse_size(max_shard_size), metadata={"prunequant_format": FORMAT})
        self.layers: dict[str, dict] = {}
        self.rounded: list[float] = []

    def add(self, key: str, t: torch.Tensor, module_of) -> None:
        name = key[:-7] if key.endswith(".weight") and key[:-7] in self.states else None
        if name is None:
            self.writer.add({key: t.to(self.dtype) if t.is_floating_point() else t})
            return
        lin = analyse_linear(name, module_of(name), self.states[name])
        tensors, enc = encode_linear(lin, self.dtype, self.scale_dtype)
        self.writer.add(tensors)
        self.layers[name] = {**lin.record, **enc}
        if enc.get("scale_rounding"):
            self.rounded.append(enc["scale_rounding"])

    def close(self, model, tied: dict, tokenizer=None, extra_files: dict | None = None) -> None:
        bad = sorted(weight_key(n) for n in self.states if weight_key(n) in tied)
        if bad:
            raise ExportError(f"{bad[0]} is tied to {tied[bad[0]]}; a tied weight cannot be compressed on its own")
        missing = sorted(set(self.states) - set(self.layers))
        if missing:
            raise ExportError(f"states name {missing[0]}, which has no weight in the model; pass the model they "
                              "were computed on")
        if self.rounded:
            log.warning("%d layer scales are not exactly representable in %s (largest relative change %.2g); "
                        "pass scale_dtype=torch.float32 for a bit-exact export", len(self.rounded),
                        dtype_name(self.scale_dtype), max(self.rounded))
        save_config(model, self.root, self.dtype)
        shards = self.writer.close()
        write_descriptor(self.root, FORMAT, self.dtype, self.layers, scale_dtype=dtype_name(self.scale_dtype),
                         tied=tied, shards=shards)
        write_extras(self.root, tokenizer, extra_files)


def save_compact(model, states: dict[str, LayerResult], out_dir: str | Path, dtype: torch.dtype = torch.float16, *,
                 scale_dtype: torch.dtype = torch.float16, max_shard_size: int | str = "2GB",
                 overwrite: bool = False, tokenizer=None, extra_files: dict | None = None) -> Path:
    """Write ``model`` (its compressed linears described by ``states``) in the compact format."""
    dtype_name(dtype), dtype_name(scale_dtype)
    items, tied = model_tensors(model)
    bad = sorted(weight_key(n) for n in states if weight_key(n) in tied)
    if bad:
        raise ExportError(f"{bad[0]} is tied to {tied[bad[0]]}; a tied weight cannot be compressed on its own")
    return write_whole_model(
        model, Path(out_dir), overwrite,
        lambda tmp: CompactWriter(tmp, states, dtype, scale_dtype=scale_dtype, max_shard_size=max_shard_size),
        model.get_submodule, tokenizer, extra_files, items, tied)


# ---- loading ----------------------------------------------------------------------------------

def decode_linear(name: str, entry: dict, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's weight in the model's orientation, float32; inverse of encode_linear."""
    base = weight_key(name)
    if entry["stored_as"] == "float":
        return parts[base].float()
    out_f, in_f = entry["shape"]
    with _damaged(name):
        mask, kept = _decode_mask(base, entry, parts)
        if entry["stored_as"] == "sparse-float":
            W = torch.zeros(out_f, in_f, dtype=torch.float32, device=mask.device)
            W[mask] = parts[f"{base}.values"].float()
        else:
            W = _dequantize(base, entry, parts, mask, kept, out_f, in_f)
    return W.t() if entry.get("transposed") else W


@contextmanager
def _damaged(name: str):
    """A missing part or an inconsistent one becomes one line naming the layer."""
    try:
        yield
    except KeyError as e:
        raise ModelLoadError(f"layer {name}: tensor {e.args[0]} is missing from the export; re-export it") from None
    except ValueError as e:
        raise ModelLoadError(f"layer {name} cannot be decoded ({e}); the export is damaged, re-export it") from None


def _decode_mask(base: str, entry: dict, parts: dict) -> tuple[torch.Tensor | None, int]:
    """(mask or None, kept count) of a stored layer, checked against the descriptor."""
    out_f, in_f = entry["shape"]
    me = entry["mask_encoding"]
    if me is None:
        mask = None
    elif me["type"] == "bitmask":
        mask = unpack_mask(parts[f"{base}.mask"], (out_f, in_f))
    else:
        m, k = me["m"], me["m"] - me["n"]
        packed = parts[f"{base}.nm_index"]
        mask = decode_nm(unpack_bits(packed, me["bits_per_group"], out_f * in_f // m),
                         m, k, (out_f, in_f)).to(packed.device)
    kept = out_f * in_f if mask is None else int(mask.sum())
    if kept != entry["kept"]:
        raise ValueError(f"mask keeps {kept} weights, the descriptor says {entry['kept']}")
    return mask, kept


def _dequantize(base, entry, parts, mask, kept, out_f, in_f) -> torch.Tensor:
    q = _grid_state(base, entry, parts, mask, kept, out_f, in_f)
    # same formula and float32 arithmetic as QuantState.dequantize, so the weights come back bit-exact
    W = q.dequantize()
    return W if mask is None else torch.where(mask, W, torch.zeros((), dtype=W.dtype))


def _grid_state(base, entry, parts, mask, kept, out_f, in_f):
    """The stored grid as a QuantState over the whole (out, in) weight (docs/internals.md)."""
    from ..solvers.base import QuantState

    cb = entry["code_bits"]
    if entry["code_encoding"] == "trits":
        sel = unpack_trits(parts[f"{base}.codes"], kept)
    else:
        sel = unpack_bits(parts[f"{base}.codes"], cb, kept)
    scale = parts[f"{base}.scale"].float()
    dev = scale.device  # decoded where the parts are (a GPU when the model is loaded there)
    ng = entry["n_groups"]
    z = entry["zero"]
    if z["type"] == "const":
        zero = torch.full((out_f, ng), z["value"], dtype=torch.float32, device=dev)
    elif z["type"] == "packed":
        zero = unpack_bits(parts[f"{base}.zero"], z["bits"], out_f * ng).reshape(out_f, ng).float()
    else:
        zero = parts[f"{base}.zero"].float()
    if entry["g_idx"] == "contiguous":
        g = group_index(in_f, entry["group_size"] or 0, dev).long()
    else:
        g = parts[f"{base}.g_idx"].long()
    if mask is None:
        codes = sel.reshape(out_f, in_f).to(torch.uint8)
    else:
        zg = zero[:, g]
        exact = bool(((zg == zg.round()) & (zg >= 0) & (zg < (1 << cb))).all())
        codes = zg.to(torch.uint8) if exact else torch.zeros(out_f, in_f, dtype=torch.uint8, device=dev)
        codes[mask] = sel.to(torch.uint8)
    bits = 1.58 if entry["code_encoding"] == "trits" else cb
    return QuantState("uniform", bits, entry["group_size"] or 0, bool(entry.get("symmetric", False)), codes,
                      scale, zero, g.to(torch.int32))


def decode_state(name: str, entry: dict, parts: dict[str, torch.Tensor]):
    """(QuantState, mask or None, pruned positions exactly 0?) of a layer stored as codes, for packed runtimes."""
    base = weight_key(name)
    out_f, in_f = entry["shape"]  # the (out, in) orientation, also for transposed (Conv1D) layers
    with _damaged(name):
        mask, kept = _decode_mask(base, entry, parts)
        q = _grid_state(base, entry, parts, mask, kept, out_f, in_f)
    zeros_exact = mask is None or bool((q.dequantize()[~mask] == 0).all())
    return q, mask, zeros_exact


def layer_of(key: str, layers: dict) -> str | None:
    if key.endswith(".weight") and key[:-7] in layers:
        return key[:-7]
    prefix, _, part = key.rpartition(".")
    if part in PARTS and prefix.endswith(".weight") and prefix[:-7] in layers:
        return prefix[:-7]
    return None


def load_compact(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 verify: bool = True):
    """Rebuild the model from a compact export, decoding layer by layer on ``device`` in float32, then cast to
    ``dtype`` (default: the export's)."""
    from safetensors import safe_open

    root = Path(path)
    if verify:
        check_integrity(root)
    desc = read_descriptor(root)
    if desc is None or desc.get("format") != FORMAT:
        raise ModelLoadError(f"{root} is not a {FORMAT} export (no or another prunequant-export.json)")
    dtype = dtype or DTYPES[desc["dtype"]]
    layers = desc["layers"]
    model = empty_model(root, dtype)
    shards = shard_files(root, PREFIX)
    if not shards:
        raise ModelLoadError(f"{root} has no {PREFIX}*.safetensors shard; re-export it")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                grouped: dict[str, dict] = {}
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    name = layer_of(key, layers)
                    if name is None:
                        assign_tensor(model, key, f.get_tensor(key), dtype, device)
                    else:
                        grouped.setdefault(name, {})[key] = f.get_tensor(key)
                for name, parts in grouped.items():
                    if torch.device(device).type != "cpu":
                        parts = {k: v.to(device) for k, v in parts.items()}
                    W = decode_linear(name, layers[name], parts)
                    assign_tensor(model, weight_key(name), W, dtype, device)
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise ModelLoadError(f"{shard} cannot be read ({e}); it is truncated or altered, re-export it") from None
    return finish_model(model, desc.get("tied", {}), root)
