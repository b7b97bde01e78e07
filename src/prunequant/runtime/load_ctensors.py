"""Load a compressed-tensors ``pack-quantized`` checkpoint straight into packed modules.

Each quantized linear's ``weight_packed`` holds signed values ``v`` (``num_bits``, offset 2^(b−1)) with
``w = scale · (v − zp)``; as our uniform grid that is ``code = v + 2^(b−1)``, ``zero = zp + 2^(b−1)``
(``zp = 0`` for symmetric schemes), exactly. A layer is built as soon as its parts are read; no float
copy of a packed weight is made (only one layer's dequantized weight, for the probe check).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..solvers.base import QuantState
from ..solvers.grid import group_index


def is_ctensors(root: Path) -> bool:
    cfg = root / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except ValueError:
        return False
    return q.get("quant_method") == "compressed-tensors"


def layer_state(mod: str, parts: dict, scheme) -> QuantState:
    """The uniform-grid QuantState of one pack-quantized layer."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = scheme.weights
    bits = int(w.num_bits)
    shape = torch.Size(parts["weight_shape"].tolist())
    out_f, in_f = shape
    offset = 1 << (bits - 1)
    codes = (unpack_from_int32(parts["weight_packed"], bits, shape).to(torch.int16) + offset).to(torch.uint8)
    scale = parts["weight_scale"].float().reshape(out_f, -1)
    ng = scale.shape[1]
    if w.symmetric:
        zero = torch.full((out_f, ng), float(offset))
    else:
        zp = unpack_from_int32(parts["weight_zero_point"], bits, torch.Size([out_f, ng]), packed_dim=0)
        zero = zp.float() + offset
    gs = int(w.group_size) if w.group_size else 0
    if gs and gs * ng != in_f:
        raise ModelLoadError(f"layer {mod}: {ng} groups of {gs} do not cover its {in_f} input columns")
    if not gs and ng != 1:
        raise ModelLoadError(f"layer {mod}: per-channel scheme with {ng} scales per row")
    return QuantState("uniform", bits, gs, bool(w.symmetric), codes, scale, zero, group_index(in_f, gs))


@torch.no_grad()
def load_ctensors_packed(root: Path, device, dtype, prefer, check: bool, verify: bool):
    from compressed_tensors.quantization import QuantizationConfig
    from ..export.common import empty_model, finish_model, read_descriptor
    from ..export.ctensors import iter_quantized_layers, schemes_by_module
    from ..export.integrity import check_integrity
    from .qlinear import swap_in_packed

    check_integrity(root, verify)  # verify=False skips it with a warning, as everywhere
    qdict = dict(json.loads((root / "config.json").read_text()).get("quantization_config") or {})
    fmt = qdict.get("format")
    if fmt not in ("pack-quantized", None):
        raise ModelLoadError(f"compressed-tensors format {fmt!r}: the packed runtime loads pack-quantized checkpoints")
    for k in ("version", "sparsity_config", "transform_config", "quant_method"):
        qdict.pop(k, None)
    qconfig = QuantizationConfig.model_validate(qdict)
    model = empty_model(root, dtype)
    schemes = schemes_by_module(model, qconfig)
    counts: Counter = Counter()
    fallbacks: Counter = Counter()
    for mod, parts, scheme in iter_quantized_layers(root, model, schemes, dtype, device):
        swap_in_packed(model, mod, layer_state(mod, parts, scheme), device, dtype, prefer, check, counts, fallbacks)
    desc = read_descriptor(root) or {}
    model = finish_model(model, desc.get("tied", {}), root).to(device)
    return model, {"format": "compressed-tensors", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                   "layers": sum(counts.values()), "modules": dict(sorted(counts.items())),
                   "fallbacks": [{"reason": k, "count": v} for k, v in fallbacks.most_common()]}
