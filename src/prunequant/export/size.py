"""Size accounting of an export directory: bytes, bits per parameter, TCr and real rate (docs/format.md)."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import ModelLoadError
from ..accounting import tcr_layers
from .common import EXPORT_JSON, read_descriptor
from .integrity import MANIFEST, check_integrity, read_safetensors_header

_MODEL_FILES = {"config.json", "generation_config.json", EXPORT_JSON, MANIFEST}


def _is_model_file(rel: str) -> bool:
    return rel.endswith((".safetensors", ".safetensors.index.json")) or rel in _MODEL_FILES


def _owner(key: str, layers: dict) -> str | None:
    i = key.rfind(".weight")
    return key[:i] if i > 0 and key[:i] in layers else None


def detect_format(root: str | Path) -> str:
    """'compact', 'compressed-tensors' or 'dense' (a plain transformers checkpoint)."""
    import json

    root = Path(root)
    desc = read_descriptor(root)
    if desc is not None:
        return {"prunequant-compact": "compact"}.get(desc.get("format"), desc.get("format"))
    cfg = root / "config.json"
    if cfg.is_file():
        try:
            q = json.loads(cfg.read_text()).get("quantization_config") or {}
        except ValueError:
            raise ModelLoadError(f"{cfg} is not valid JSON; re-export the model") from None
        if q.get("quant_method") == "compressed-tensors":
            return "compressed-tensors"
        if any(root.glob("*.safetensors")):
            return "dense"
    raise ModelLoadError(f"{root} is not a model export: no {EXPORT_JSON} and no config.json + *.safetensors")


def size_report(root: str | Path, verify: bool = True) -> dict:
    """Bytes on disk, bits per parameter, TCr and real compression rate of an export (manifest checked first)."""
    root = Path(root)
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a directory")
    check_integrity(root, verify)
    fmt = detect_format(root)
    desc = read_descriptor(root) or {}
    layers_meta = desc.get("layers", {})
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    model_bytes = sum(v for k, v in files.items() if _is_model_file(k))
    layer_bytes = {n: 0 for n in layers_meta}
    other_params = other_bytes = tensor_bytes = 0
    for rel in files:
        if not rel.endswith(".safetensors"):
            continue
        for key, info in read_safetensors_header(root / rel).items():
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            tensor_bytes += nbytes
            owner = _owner(key, layers_meta)
            if owner is not None:
                layer_bytes[owner] += nbytes
            else:
                other_bytes += nbytes
                other_params += math.prod(info["shape"])
    rows = []
    for name, meta in layers_meta.items():
        n, b = meta["n_params"], layer_bytes[name]
        s, q = meta.get("sparsity", 0.0), meta.get("bits", 16.0)
        rows.append({"name": name, "shape": meta["shape"], "n_params": n, "sparsity": s, "bits": q,
                     "group_size": meta.get("group_size"), "nm": meta.get("nm"),
                     "stored_as": meta.get("stored_as"), "bytes": b, "bits_per_param": 8 * b / n,
                     "tcr": 1 - q * (1 - s) / 16, "real_cr": 1 - 8 * b / (16 * n)})
    n_layers = sum(r["n_params"] for r in rows)
    b_layers = sum(r["bytes"] for r in rows)
    n_total = n_layers + other_params
    theo = [(r["n_params"], r["sparsity"], r["bits"]) for r in rows]
    return {
        "dir": str(root), "format": fmt, "bytes_on_disk": sum(files.values()), "model_bytes": model_bytes,
        "tensor_bytes": tensor_bytes, "other_files_bytes": sum(files.values()) - model_bytes,
        "layers": rows,
        "compressed": {"n_params": n_layers, "bytes": b_layers,
                       "bits_per_param": 8 * b_layers / n_layers if n_layers else None,
                       "tcr": tcr_layers(theo) if rows else None,
                       "real_cr": 1 - 8 * b_layers / (16 * n_layers) if n_layers else None},
        "other": {"n_params": other_params, "bytes": other_bytes},
        "model": {"n_params": n_total, "bytes": model_bytes,
                  "bits_per_param": 8 * model_bytes / n_total if n_total else None,
                  "tcr": tcr_layers(theo + [(other_params, 0.0, 16.0)]) if n_total else None,
                  "real_cr": 1 - 8 * model_bytes / (16 * n_total) if n_total else None},
    }


def _mib(b: int) -> str:
    return f"{b / 2**20:,.2f} MiB"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def size_tables(report: dict, per_layer: bool = True):
    """rich Tables: per compressed layer (optional) and the totals."""
    from rich.table import Table

    tables = []
    if per_layer and report["layers"]:
        t = Table(title=f"{report['dir']} ({report['format']}): compressed layers")
        for col in ("layer", "shape", "sparsity", "bits", "group", "N:M", "stored as", "bytes", "bits/param",
                    "TCr", "real CR"):
            t.add_column(col, justify="left" if col in ("layer", "stored as") else "right")
        for r in report["layers"]:
            nm = f"{r['nm'][0]}:{r['nm'][1]}" if r["nm"] else ""
            t.add_row(r["name"], "×".join(map(str, r["shape"])), _pct(r["sparsity"]), f"{r['bits']:.3g}",
                      str(r["group_size"] or ("ch" if r["group_size"] == 0 else "")), nm, r["stored_as"] or "",
                      f"{r['bytes']:,}", f"{r['bits_per_param']:.3f}", _pct(r["tcr"]), _pct(r["real_cr"]))
        tables.append(t)
    t = Table(title=f"{report['dir']} ({report['format']}): totals")
    for col in ("part", "parameters", "bytes", "bits/param", "TCr", "real CR"):
        t.add_column(col, justify="left" if col == "part" else "right")
    c, o, m = report["compressed"], report["other"], report["model"]
    if report["layers"]:
        t.add_row("compressed linears", f"{c['n_params']:,}", _mib(c["bytes"]), f"{c['bits_per_param']:.3f}",
                  _pct(c["tcr"]), _pct(c["real_cr"]))
    t.add_row("other tensors", f"{o['n_params']:,}", _mib(o["bytes"]),
              f"{8 * o['bytes'] / o['n_params']:.3f}" if o["n_params"] else "—", "", "")
    t.add_row("whole model (files)", f"{m['n_params']:,}", _mib(m["bytes"]),
              f"{m['bits_per_param']:.3f}" if m["bits_per_param"] else "—", _pct(m["tcr"]), _pct(m["real_cr"]))
    if report["other_files_bytes"]:
        t.add_row("tokenizer, records", "", _mib(report["other_files_bytes"]), "", "", "")
    tables.append(t)
    return tables


def print_size_report(report: dict | str | Path, per_layer: bool = True, console=None) -> None:
    from rich.console import Console

    if not isinstance(report, dict):
        report = size_report(report)
    if console is None:
        import sys

        console = Console() if sys.stdout.isatty() else Console(width=160)  # pipes/files: no truncated names
    for t in size_tables(report, per_layer):
        console.print(t)
