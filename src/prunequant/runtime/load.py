"""Load a ``compact`` export (or a compressed-tensors one: load_ctensors.py) straight into packed modules.

The model skeleton is built on the meta device (no weights); each shard is then read tensor by tensor:
plain tensors (embeddings, norms, biases, layers stored as floats) go to their place on the device, and
each quantized linear becomes a QuantLinear built from its codes, grids and mask — no float copy of the
model's weights is ever made, only one layer's dequantized weight at a time, for the check that the
packed layer computes what its dequantized weight computes (``build_quant_linear``'s probe).

Sparse + quantized layers (2:4, N:M or unstructured masks) run on the same packed codes, their pruned
positions set to the zero point's code (exactly 0): on an H200, torch's semi-structured 2:4 kernels were
3-140× slower than dense bf16 at these shapes (BENCHMARKS.md, issue 14), so no sparse kernel is used.
Layers a compact export stores as floats (pruned only, act-order grids, ternary, channel-mixed) load dense.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .convert import default_backends
from .fuse import fuse_siblings
from .qlinear import QuantLinear, swap_in_packed

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    """bf16 on CUDA (the kernels' activation dtype), float32 on the CPU (exact, and fast there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@torch.no_grad()
def _packed_layer(model, name: str, entry: dict, parts: dict, device, dtype, prefer, check, counts, fallbacks):
    from ..export.compact import decode_linear, decode_state

    if entry.get("stored_as") == "quantized":
        q, mask, zeros_exact = decode_state(name, entry, parts)
        if zeros_exact:
            swap_in_packed(model, name, q, device, dtype, prefer, check, counts, fallbacks)
            return
        fallbacks["pruned weights are not 0 on their grid (non-integer zero point): dense weight"] += 1
    W = decode_linear(name, entry, parts)
    counts[f"{entry.get('stored_as', 'float')}:dense"] += 1
    module = model.get_submodule(name)
    module._parameters["weight"] = nn.Parameter(W.to(device, dtype), requires_grad=False)


def load_packed(path: str | Path, device=None, dtype: torch.dtype | None = None, *,
                prefer: dict[int, list[str]] | None = None, check: bool = True, verify: bool = True,
                fuse: bool = True):
    """Load a compact (or compressed-tensors pack-quantized) export for inference: (model with QuantLinears
    on ``device``, load record).

    ``prefer`` maps bit width → backends to try in order (default: ``default_backends(device)``); every
    packed layer is checked against its dequantized weight on a probe input and falls back (with the
    reason in the record) when a backend fails it. Layers the export stores as floats (pruned but not
    quantized, act-order grids, ternary) load as dense weights. ``fuse``: sibling projections with the same
    packing (q/k/v, gate/up) run as one matmul (fuse.py).
    """
    from safetensors import safe_open

    from ..export.common import FORMAT_VERSION, assign_tensor, empty_model, finish_model, read_descriptor, weight_key
    from ..export.compact import FORMAT, PREFIX, layer_of
    from ..export.integrity import check_integrity, shard_files

    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a directory; give a compact export directory (prunequant compress "
                             "--format compact)")
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    prefer = prefer or default_backends(device)
    from .load_ctensors import is_ctensors, load_ctensors_packed

    if is_ctensors(root):
        model, record = load_ctensors_packed(root, device, dtype, prefer, check, verify)
        record["fused_groups"] = fuse_siblings(model, dtype, check) if fuse else 0
        return model, record
    desc = read_descriptor(root)
    if desc is None:
        raise ModelLoadError(f"{root} has no prunequant-export.json; the packed runtime loads compact and "
                             "compressed-tensors exports (prunequant compress --format compact)")
    if desc.get("format") != FORMAT:
        raise ModelLoadError(f"{root} is a {desc.get('format')!r} export; the packed runtime loads {FORMAT!r} "
                             "exports (re-export with --format compact)")
    if int(desc.get("format_version", 1)) > FORMAT_VERSION:
        raise ModelLoadError(f"{root} has format version {desc.get('format_version')}, newer than this prunequant "
                             f"reads ({FORMAT_VERSION}); upgrade prunequant")
    check_integrity(root, verify)  # verify=False skips it with a warning, as everywhere
    layers = desc["layers"]
    model = empty_model(root, dtype)
    shards = shard_files(root, PREFIX)
    if not shards:
        raise ModelLoadError(f"{root} has no {PREFIX}*.safetensors shard; re-export it")
    counts: Counter = Counter()
    fallbacks: Counter = Counter()
    for shard in shards:
        try:
            f = safe_open(str(shard), framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise ModelLoadError(f"{shard} cannot be read ({e}); it is truncated or altered, re-export it") from None
        with f:
            keys = list(f.keys())  # noqa: SIM118 - safe_open is not a dict
            n_parts = Counter(layer_of(k, layers) for k in keys)
            grouped: dict[str, dict] = {}
            for key in keys:  # a layer is built as soon as its parts are read: one layer in memory at a time
                name = layer_of(key, layers)
                if name is None:
                    assign_tensor(model, key, f.get_tensor(key), dtype, device)
                else:
                    grouped.setdefault(name, {})[key] = f.get_tensor(key)
                    if len(grouped[name]) == n_parts[name]:
                        _packed_layer(model, name, layers[name], grouped.pop(name), device, dtype, prefer, check,
                                      counts, fallbacks)
    missing = [n for n in layers if weight_key(n) not in dict(model.named_parameters())
               and not isinstance(model.get_submodule(n), QuantLinear)]
    if missing:
        raise ModelLoadError(f"{root} lacks the weights of layer {missing[0]}; re-export it")
    model = finish_model(model, desc.get("tied", {}), root).to(device)
    record = {"format": FORMAT, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "layers": len(layers), "modules": dict(sorted(counts.items())),
              "fallbacks": [{"reason": k, "count": v} for k, v in fallbacks.most_common()],
              "fused_groups": fuse_siblings(model, dtype, check) if fuse else 0}
    return model, record
