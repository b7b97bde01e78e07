"""Retention of each measure against the uncompressed model (docs/srcr.md), and a cache of its results."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import DataError
from .srcr import semantic_retention

log = logging.getLogger(__name__)
MIN_SE_ABOVE_CHANCE = 2.0


def _perplexities(metrics: dict) -> dict[str, float]:
    texts = metrics.get("texts", metrics.get("perplexity", {})) or {}
    out = {}
    for name, v in texts.items():
        ppl = v.get("perplexity", v.get("ppl")) if isinstance(v, dict) else v
        if ppl is not None:
            out[name] = float(ppl)
    return out


def task_accuracy(r: dict) -> float:
    """The accuracy a task's retention uses: acc_norm where the task reports one, acc otherwise."""
    return float(r["acc_norm"] if r.get("acc_norm") is not None else r["acc"])


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """Raw values under the measure names that ``retention`` uses (for tables)."""
    out = {f"ppl:{k}": v for k, v in _perplexities(metrics).items()}
    out.update({f"task:{k}": task_accuracy(r) for k, r in (metrics.get("tasks") or {}).items()})
    agreement = metrics.get("agreement") or {}
    for k in ("kl", "top1"):
        if agreement.get(k) is not None:
            out[k] = float(agreement[k])
    sim = metrics.get("similarity") or {}
    if sim.get("similarity") is not None:
        out["similarity"] = float(sim["similarity"])
    return out


def _chance_margin(r: dict, min_se: float) -> float:
    """How far above chance the base must be: ``min_se`` standard errors of an accuracy at chance."""
    c, n = float(r.get("chance", 0.0)), max(int(r.get("n", 1)), 1)
    return min_se * math.sqrt(c * (1 - c) / n)


def skipped_measures(base: dict, min_se: float = MIN_SE_ABOVE_CHANCE) -> dict[str, str]:
    """Tasks left out of retention because the base model is at (or within noise of) chance there."""
    out = {}
    for name, r in (base.get("tasks") or {}).items():
        a, c = task_accuracy(r), float(r.get("chance", 0.0))
        if a - c <= _chance_margin(r, min_se) or a - c <= 0:
            out[f"task:{name}"] = (f"base accuracy {a:.3f} is within {min_se:g} standard errors of chance {c:.3f} "
                                   f"(n={r.get('n')}): a ratio would be noise")
    return out


def retention(base: dict, compressed: dict, min_se: float = MIN_SE_ABOVE_CHANCE) -> dict[str, float]:
    """Per-measure retention ratios of ``compressed`` against ``base`` (see the module docstring)."""
    out: dict[str, float] = {}
    pb, pc = _perplexities(base), _perplexities(compressed)
    for name in pb:
        if name in pc:
            if not (pc[name] > 0 and pb[name] > 0):
                raise DataError(f"perplexity on {name!r} is not positive (base {pb[name]}, model {pc[name]})")
            out[f"ppl:{name}"] = pb[name] / pc[name]
    skipped = skipped_measures(base, min_se)
    for name, rb in (base.get("tasks") or {}).items():
        rc = (compressed.get("tasks") or {}).get(name)
        if rc is None:
            continue
        if f"task:{name}" in skipped:
            log.warning("retention: %s left out: %s", name, skipped[f"task:{name}"])
            continue
        if rb.get("n") != rc.get("n"):
            raise DataError(f"task {name}: base scored {rb.get('n')} examples, the model {rc.get('n')}; "
                            "evaluate both with the same limit")
        chance = float(rb.get("chance", 0.0))
        out[f"task:{name}"] = (task_accuracy(rc) - chance) / (task_accuracy(rb) - chance)
    agreement = compressed.get("agreement") or {}
    if agreement.get("kl") is not None:
        out["kl"] = math.exp(-float(agreement["kl"]))
    if agreement.get("top1") is not None:
        out["top1"] = float(agreement["top1"])
    sim = compressed.get("similarity") or {}
    if sim.get("similarity") is not None:
        out["similarity"] = float(sim["similarity"])
    return out


def sr(ratios: dict[str, float]) -> float:
    """Sr: the mean of the retention ratios (each clipped below at 0)."""
    return semantic_retention(ratios)


# --- the original model is evaluated once ------------------------------------------------------------------

def model_fingerprint(model, settings: dict | None = None, samples: int = 1024) -> str:
    """Deterministic sha256 of a model (names, shapes, sampled values, exact checksums) and its settings."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            picked = flat[::step][:samples].to("cpu", torch.float64)
            h.update(picked.numpy().tobytes())
            h.update(_checksum(flat).encode())
    h.update(json.dumps(settings or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _checksum(flat: torch.Tensor) -> str:
    """Exact integer sums of the tensor's bytes and their squares (docs/internals.md)."""
    v = flat.contiguous()
    if v.dtype == torch.bool:
        v = v.view(torch.uint8)
    v = v.view(torch.int16) if v.element_size() >= 2 else v.view(torch.uint8)
    s1 = s2 = 0
    for c in v.split(1 << 22):
        c = c.to(torch.int64)
        s1 += int(c.sum())
        s2 += int((c * c).sum())
    return f"{s1}|{s2}|"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRUNEQUANT_CACHE", Path.home() / ".cache" / "prunequant")) / "base-results"


def cached_base_results(model, settings: dict, compute: Callable[[], dict], cache_dir: str | Path | None = None,
                        refresh: bool = False) -> dict:
    """The base model's results for these settings: from the cache, else ``compute()`` once and stored."""
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = model_fingerprint(model, settings)
    f = d / f"{key}.json"
    if f.exists() and not refresh:
        try:
            return json.loads(f.read_text())["results"]
        except (json.JSONDecodeError, KeyError):
            log.warning("ignoring unreadable cache file %s", f)
    results = compute()
    d.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"fingerprint": key, "settings": settings, "created": time.time(),
                               "results": results}, indent=1, default=str))
    tmp.replace(f)
    return results


__all__ = ["cached_base_results", "flatten_metrics", "model_fingerprint", "retention", "skipped_measures", "sr",
           "task_accuracy"]
