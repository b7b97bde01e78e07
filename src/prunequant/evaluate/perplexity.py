"""Perplexity, GPTQ protocol: non-overlapping windows of L tokens, each scored on its own (docs/internals.md)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DataError
from ..models import bos_first, prepend_bos
from ..onload import trim_host_heap


LOGIT_BYTES = 128 * 2**20  # float32 logits computed at once in evaluations (rows of L × vocab)


def rows_per_pass(model, seq_len: int) -> int:
    """Windows per forward pass so that their float32 logits stay within LOGIT_BYTES (memory, not results)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    return max(1, LOGIT_BYTES // max(1, seq_len * vocab * 4))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch_size: int = 8, device=None,
               progress: bool = True, text_sha256: str | None = None) -> dict:
    """``ids``: 1-D LongTensor of the evaluation text's tokens."""
    ids = ids.flatten()
    n_win = ids.numel() // seq_len
    if seq_len < 2 or n_win < 1:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                        "give a longer text or a smaller --seq-len")
    device = device or next(model.parameters()).device
    windows = ids[: n_win * seq_len].view(n_win, seq_len)
    bos = bos_first(model)
    total_nll, count = 0.0, 0
    t0 = time.time()
    rows = rows_per_pass(model, seq_len)
    for i in tqdm(range(0, n_win, batch_size), desc="perplexity", unit="batch", disable=not progress):
        x = windows[i: i + batch_size].to(device)
        nlls = []
        for r in range(0, x.shape[0], rows):  # the (rows, L, vocab) logits, not the batch's, at a time
            xr = x[r: r + rows]
            if bos is None:
                logits = model(xr, use_cache=False).logits[:, :-1].float()
            else:
                logits = model(prepend_bos(xr, bos), use_cache=False).logits[:, 1:-1].float()
            nlls.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xr[:, 1:].reshape(-1),
                                        reduction="none"))
            del logits
        total_nll += float(torch.cat(nlls).sum())
        count += x[:, 1:].numel()
        trim_host_heap()
    mean = total_nll / count
    out = {"perplexity": math.exp(mean), "nll": mean, "tokens": int(n_win * seq_len), "predicted_tokens": count,
           "seq_len": seq_len, "windows": n_win, "seconds": round(time.time() - t0, 2),
           "protocol": "non-overlapping windows, token-level exp(mean NLL)" + (", BOS first" if bos is not None else "")}
    if text_sha256:
        out["text_sha256"] = text_sha256
    return out
