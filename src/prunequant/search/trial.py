"""One trial's work, where the model lives: compress a copy, measure TCr, bytes and the proxy KL."""
from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import DataError, PrunequantError
from ..recipe import Recipe


@dataclass
class TrialSetup:
    """Everything a worker needs to reproduce a trial (plain data: it travels to Ray actors)."""

    model: str
    calib_text: str = "wiki"
    calib_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    proxy_samples: int = 16
    proxy_seq_len: int = 256
    eval_texts: tuple = ("wiki",)
    eval_seq_len: int = 512
    eval_max_tokens: int = 20_000
    batch_size: int = 8
    device: str | None = None
    threads: int | None = None  # torch CPU threads in this worker (None: leave as is)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eval_texts"] = list(self.eval_texts)
        return d

    @property
    def proxy_text(self) -> str:
        return self.eval_texts[0]


def logit_agreement(model, base, ids: torch.Tensor, batch_size: int = 8) -> dict:
    """KL(original ‖ compressed) per predicted token (nats) and top-1 agreement (evaluate/semantic.py)."""
    from ..evaluate.semantic import logit_agreement as agreement

    out = agreement(model, base, ids, batch_size=batch_size, progress=False)
    return {"kl": float(out["kl"]), "top1": float(out["top1"])}


def retention_scores(base_eval: dict, comp_eval: dict, agreement: dict, tcr: float) -> dict:
    """Retention ratios, their mean Sr, and SrCr = Sr / (1 − TCr) (λ = 1)."""
    from ..evaluate.retention import retention, sr
    from ..evaluate.srcr import srcr_from_rate

    ratios = retention(base_eval, {**comp_eval, "agreement": agreement})
    s = sr(ratios)
    return {"ratios": ratios, "sr": s, "srcr": srcr_from_rate(s, tcr)}


def proxy_ids(tokenizer, setup: TrialSetup) -> tuple[torch.Tensor, dict]:
    """Proxy sequences, disjoint from the perplexity and calibration tokens (docs/internals.md)."""
    from ..data import check_disjoint, load_text, tokenize

    text = load_text(setup.proxy_text, "eval")
    check_disjoint(load_text(setup.calib_text, "calib"), text)
    n, L, offset = setup.proxy_samples, setup.proxy_seq_len, setup.eval_max_tokens
    ids = tokenize(tokenizer, text, max_tokens=offset + n * L)
    overlaps = ids.numel() < offset + n * L
    if overlaps:
        n = min(n, ids.numel() // L)
        if n < 1:
            raise DataError(f"proxy text {text.name} has {ids.numel()} tokens, fewer than one proxy sequence of {L}; "
                            "give a longer evaluation text or a smaller --proxy-seq-len")
        start = ids.numel() - n * L
    else:
        start = offset
    windows = ids[start: start + n * L].view(n, L)
    return windows, {"text": text.name, "sha256": text.sha256, "start_token": int(start), "samples": n,
                     "seq_len": L, "overlaps_perplexity_tokens": bool(overlaps)}


class TrialRunner:
    """Holds the original model; compresses copies of it. One per process (Ray: one per actor)."""

    def __init__(self, setup: TrialSetup | dict, model=None, tokenizer=None):
        from ..engine import default_device
        from ..models import load_model

        self.setup = setup if isinstance(setup, TrialSetup) else TrialSetup(**setup)
        if self.setup.threads:
            torch.set_num_threads(self.setup.threads)
        self.device = torch.device(self.setup.device) if self.setup.device else default_device()
        if model is None:
            model, tokenizer = load_model(self.setup.model)
        self.base, self.tokenizer = model.to(self.device).eval(), tokenizer
        self.proxy, self.proxy_record = proxy_ids(tokenizer, self.setup)

    def inventory(self) -> dict:
        from .budget import Inventory

        return Inventory.of(self.base).to_dict()

    def _compress(self, recipe: Recipe):
        from .. import api

        s = self.setup
        model = copy.deepcopy(self.base)
        res = api.compress(model, recipe, tokenizer=self.tokenizer, calib_text=s.calib_text,
                           calib_samples=s.calib_samples, seq_len=s.seq_len, seed=s.seed, device=self.device,
                           batch_size=s.batch_size, progress=False)
        return res

    def run(self, recipe: dict, measure_size: bool = False) -> dict:
        """Compress with ``recipe`` and measure: rates, bytes (if asked), proxy KL / top-1."""
        t0 = time.time()
        res = self._compress(Recipe.from_dict(recipe))
        out = {"tcr": float(res.rates["tcr"]), "rate_with_overheads": float(res.rates["rate_with_overheads"]),
               "mean_sparsity": float(res.rates["mean_sparsity"]), "compress_seconds": round(time.time() - t0, 2),
               "allocation": _small_allocation(res.record.get("allocation"))}
        if measure_size:
            out["bytes"] = compact_bytes(res)
        agreement = logit_agreement(res.model.to(self.device), self.base, self.proxy, self.setup.batch_size)
        out.update(kl=agreement["kl"], top1=agreement["top1"], proxy_retention=math.exp(-agreement["kl"]),
                   seconds=round(time.time() - t0, 2))
        return out

    def base_eval(self) -> dict:
        from .. import api

        s = self.setup
        return api.evaluate(self.base, self.tokenizer, texts=list(s.eval_texts), seq_len=s.eval_seq_len,
                            max_tokens=s.eval_max_tokens, batch_size=s.batch_size, device=self.device,
                            progress=False, calib_text=s.calib_text)

    def full_eval(self, recipe: dict, base_eval: dict) -> dict:
        """Perplexity of the compressed model on the evaluation texts, and retention against the original."""
        from .. import api

        t0 = time.time()
        s = self.setup
        res = self._compress(Recipe.from_dict(recipe))
        ev = api.evaluate(res.model, self.tokenizer, texts=list(s.eval_texts), seq_len=s.eval_seq_len,
                          max_tokens=s.eval_max_tokens, batch_size=s.batch_size, device=self.device,
                          progress=False, calib_text=s.calib_text)
        agreement = logit_agreement(res.model.to(self.device), self.base, self.proxy, s.batch_size)
        ppl = {t: v["perplexity"] for t, v in ev["texts"].items()}
        tcr = float(res.rates["tcr"])
        return {"perplexity": ppl, "tcr": tcr, **agreement, **retention_scores(base_eval, ev, agreement, tcr),
                "seconds": round(time.time() - t0, 2)}

    def call(self, token, method: str, *args) -> dict:
        """Run a method and never raise (Ray's pool loses track of a task that raises): errors come back as data."""
        try:
            return {"token": token, "ok": True, "result": getattr(self, method)(*args)}
        except PrunequantError as e:
            return {"token": token, "ok": False, "error": f"{type(e).__name__}: {e}", "user_error": True}
        except Exception as e:  # noqa: BLE001 - recorded on the trial, shown to the user
            return {"token": token, "ok": False, "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=8), "user_error": False}


def _small_allocation(alloc: dict | None) -> dict | None:
    """What the allocator decided, without the bulky per-layer sensitivity tables."""
    if not alloc:
        return None
    return {k: v for k, v in alloc.items() if k not in ("sensitivity", "outlier_ratio")}


def compact_bytes(res) -> int:
    """Real bytes of the compact export's model files (weights, headers, config, descriptor)."""
    from ..export import export, size_report

    tmp = Path(tempfile.mkdtemp(prefix="pq-search-size-"))
    try:
        export(res.model, res.report.states, tmp / "m", fmt="compact")
        return int(size_report(tmp / "m")["model_bytes"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
