"""The evaluation every run uses: perplexity, tasks and agreement with the original, as retention, Sr, SrCr."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch

from ..data import load_text, tokenize
from .perplexity import perplexity

log = logging.getLogger(__name__)


@dataclass
class SuiteConfig:
    texts: tuple[str, ...] = ("wiki", "lambada")
    seq_len: int = 512
    max_tokens: int = 20_000
    tasks: tuple[str, ...] = ()
    task_limit: int | None = 200
    agree_tokens: int = 8192  # KL / top-1 on the first N tokens of the first text (0 = off)
    prompts: int = 0  # held-out prompts for continuation similarity (0 = off; needs the MiniLM package)
    max_new_tokens: int = 32
    batch_size: int = 8
    # generative tasks (mmlu_pro, bbh, math; see generative.py): exemplars per prompt (None: the suite's
    # default), tokens generated per answer, seed of the per-subtask sample
    fewshot: int | None = None
    gen_tokens: int = 256
    task_seed: int = 0
    encoding: str | None = None  # of local text files (None: strict UTF-8)
    task_batch_size: int | None = None  # None: max(batch_size, 16)

    def settings(self) -> dict:
        out = asdict(self)
        out.pop("task_batch_size")  # batching does not change what is measured
        if self.encoding is None:  # keep the base-result cache keys of older runs
            out.pop("encoding")
        if not any(_is_generative(t) for t in self.tasks):  # keep the base-result cache keys of older runs
            for k in ("fewshot", "gen_tokens", "task_seed"):
                out.pop(k)
        return out

    def generation(self) -> dict:
        return {"fewshot": self.fewshot, "max_new_tokens": self.gen_tokens, "seed": self.task_seed}


def _is_generative(name: str) -> bool:
    from .generative import is_generative

    return is_generative(name)


@dataclass
class SuiteResult:
    metrics: dict
    base_metrics: dict | None = None
    retention: dict = field(default_factory=dict)
    sr: float | None = None
    srcr: float | None = None
    srcr_real: float | None = None


def _device_of(model):
    return next(model.parameters()).device


def _own_metrics(model, tok, cfg: SuiteConfig, progress: bool) -> dict:
    out = {"texts": {}}
    for name in cfg.texts:
        text = load_text(name, "eval", cfg.encoding)
        ids = tokenize(tok, text, cfg.max_tokens)
        r = perplexity(model, ids, cfg.seq_len, batch_size=cfg.batch_size, progress=progress, text_sha256=text.sha256)
        r["text"] = text.name
        out["texts"][name] = r
    if cfg.tasks:
        from .tasks import evaluate_tasks

        out["tasks"] = evaluate_tasks(model, tok, list(cfg.tasks), limit=cfg.task_limit,
                                      batch_size=cfg.task_batch_size or max(cfg.batch_size, 16), progress=progress,
                                      generation=cfg.generation())
    return out


def _agreement_ids(tok, cfg: SuiteConfig) -> torch.Tensor:
    ids = tokenize(tok, load_text(cfg.texts[0], "eval", cfg.encoding), cfg.agree_tokens)
    n = ids.numel() // cfg.seq_len
    return ids[: n * cfg.seq_len].view(n, cfg.seq_len)


def run_suite(model, tok, cfg: SuiteConfig, base=None, progress: bool = True, rates: dict | None = None) -> SuiteResult:
    """Evaluate ``model``; with ``base`` (the original, in memory) also agreement and retention against it."""
    from .retention import cached_base_results, retention, sr as mean_ratio
    from .srcr import srcr_from_rate

    metrics = _own_metrics(model, tok, cfg, progress)
    if base is None:
        return SuiteResult(metrics=metrics)
    base_metrics = cached_base_results(base, cfg.settings(), lambda: _own_metrics(base, tok, cfg, progress))
    if cfg.agree_tokens and cfg.texts:
        from .semantic import logit_agreement

        ids = _agreement_ids(tok, cfg)
        if ids.numel():
            metrics["agreement"] = logit_agreement(model, base, ids.to(_device_of(model)),
                                                   batch_size=cfg.batch_size, progress=progress)
    if cfg.prompts and cfg.texts:
        from .semantic import continuation_similarity, held_out_prompts

        prompts = held_out_prompts(load_text(cfg.texts[0], "eval", cfg.encoding).text, n=cfg.prompts)
        try:
            metrics["similarity"] = continuation_similarity(model, base, tok, prompts, cfg.max_new_tokens,
                                                            batch_size=cfg.batch_size, progress=progress)
        except Exception as e:  # noqa: BLE001 - the embedding model is optional; say why it was skipped
            log.warning("continuation similarity skipped: %s", str(e).splitlines()[0])
    ratios = retention(base_metrics, metrics)
    res = SuiteResult(metrics=metrics, base_metrics=base_metrics, retention=ratios,
                      sr=mean_ratio(ratios) if ratios else None)
    if rates and res.sr is not None:
        res.srcr = srcr_from_rate(res.sr, min(rates["tcr"], 0.999))
        res.srcr_real = srcr_from_rate(res.sr, min(max(rates.get("rate_with_overheads", 0.0), 0.0), 0.999))
    return res
