"""Zero-shot multiple-choice scoring in lm-evaluation-harness conventions (docs/evaluation.md)."""
from __future__ import annotations

import copy
import inspect
import math
import time

import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..models import bos_first, max_length
from .task_data import TASKS, Example, TaskSpec, get_task

# Tasks on which even SmolLM2-135M is clearly above chance (WinoGrande, BoolQ, OpenBookQA, COPA and MMLU are
# within noise of chance for it, so retention leaves them out); ~6 min of one contended CPU core at limit=200.
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq", "lambada")
DEFAULT_LIMIT = 200


def encode_pair(tokenizer, context: str, continuation: str,
                _cache: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) tokenised jointly, the harness way (HFLM._encode_pair)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    if _cache is None or context not in _cache:
        ctx = tokenizer.encode(context, add_special_tokens=False)
        if _cache is not None:
            _cache[context] = ctx
    else:
        ctx = _cache[context]
    return ctx, whole[len(ctx):]


def _prefix_token(tokenizer) -> int:
    """Stands in for an empty context (the harness uses the end-of-text/BOS token)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("a request has an empty context and the tokenizer has neither a BOS nor an EOS token")


def _forward_kwargs(model) -> set[str]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"attention_mask", "position_ids", "logits_to_keep"} | set(params)
    return set(params)


@torch.inference_mode()
def score_requests(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16,
                   progress: bool = True, desc: str = "loglikelihood",
                   share_context: bool | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), all continuation tokens argmax?) per request (docs/internals.md)."""
    max_len = max_length(model)
    accepted = _forward_kwargs(model)
    ctx_cache: dict[str, list[int]] = {}
    encoded = []
    bos = bos_first(model)  # models that need a BOS first: every context starts with it (harness: add_bos_token)
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation, ctx_cache)
        if not cont:
            raise DataError(f"request {i} has a continuation that tokenizes to nothing: {continuation!r}")
        encoded.append(([bos] + ctx if bos is not None else ctx or [_prefix_token(tokenizer)], cont))
    plain: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # model input -> [(request, cont ids)]
    shared: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # context -> [(request, cont ids)]
    for i, (ctx, cont) in enumerate(encoded):
        # the harness keeps the last max_len+1 tokens and feeds all but the last
        plain.setdefault(tuple((ctx + cont)[-(max_len + 1):][:-1]), []).append((i, cont))
        if len(ctx) + len(cont) <= max_len + 1:
            shared.setdefault(tuple(ctx), []).append((i, cont))
    if share_context is None:
        fed_plain = sum(map(len, plain))
        fed_shared = sum(map(len, shared)) + sum(len(c) - 1 for g in shared.values() for _, c in g)
        share_context = "past_key_values" in accepted and fed_shared <= 0.75 * fed_plain
    if share_context:  # requests too long to share (truncated as the harness does) stay plain
        done = {i for g in shared.values() for i, _ in g}
        plain = {k: [(i, c) for i, c in g if i not in done] for k, g in plain.items()}
        plain = {k: g for k, g in plain.items() if g}
    else:
        shared = {}
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    batches = _plain_batches(plain, batch_size) + _shared_batches(shared, batch_size)
    for kind, chunk in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        if kind == "plain":
            _run_plain(model, accepted, chunk, plain, out)
        else:
            _run_shared(model, chunk, shared, out, batch_size)
    return out  # type: ignore[return-value]


def _plain_batches(rows: dict, batch_size: int) -> list:
    order = sorted(rows, key=len, reverse=True)  # length buckets: little padding, the longest first
    return [("plain", order[b: b + batch_size]) for b in range(0, len(order), batch_size)]


def _shared_batches(groups: dict, batch_size: int) -> list:
    """Up to ``batch_size`` contexts per batch, longest first."""
    order = sorted(groups, key=len, reverse=True)
    return [("shared", order[b: b + batch_size]) for b in range(0, len(order), batch_size)]


def _left_pad(seqs: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _gather(logp: torch.Tensor, greedy: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    target = torch.tensor(cont, device=logp.device)
    lp = logp.gather(-1, target[:, None]).squeeze(-1)
    return float(lp.double().sum()), bool((greedy == target).all())


def _run_plain(model, accepted: set[str], chunk: list, rows: dict, out: list) -> None:
    device = next(model.parameters()).device
    ids, mask = _left_pad(chunk, device)  # left padding: every continuation ends at the last column
    keep = max(len(c) for inp in chunk for _, c in rows[inp])
    kwargs = {}
    if "attention_mask" in accepted:
        kwargs["attention_mask"] = mask
    if "position_ids" in accepted:
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    logits = model(ids, **kwargs).logits[:, -keep:]
    logits = _upcast(logits)
    logp, greedy = torch.log_softmax(logits, dim=-1), logits.argmax(-1)
    for r, inp in enumerate(chunk):
        for i, cont in rows[inp]:
            out[i] = _gather(logp[r, keep - len(cont):], greedy[r, keep - len(cont):], cont)


def _run_shared(model, chunk: list, groups: dict, out: list, batch_size: int) -> None:
    """Contexts once (left-padded, cache kept); then all continuations on a copy of their context's cache."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(chunk, device)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    res = model(ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = _upcast(res.logits[:, -1])  # predicts each continuation's first token
    first_logp, first_greedy = torch.log_softmax(first, dim=-1), first.argmax(-1)
    rows = [(b, i, cont) for b, ctx in enumerate(chunk) for i, cont in groups[ctx]]
    longer = [(b, i, cont) for b, i, cont in rows if len(cont) > 1]
    for b, i, cont in rows:
        if len(cont) == 1:
            out[i] = _gather(first_logp[b, None], first_greedy[b, None], cont)
    if not longer:
        return
    # continuations longest first, in chunks of batch_size rows, each on its own copy of the context cache
    longer.sort(key=lambda row: len(row[2]), reverse=True)
    cache = res.past_key_values
    for c0 in range(0, len(longer), batch_size):
        part = longer[c0: c0 + batch_size]
        sel = torch.tensor([b for b, _, _ in part], device=device)
        part_cache = cache if c0 + batch_size >= len(longer) else copy.deepcopy(cache)
        part_cache.batch_select_indices(sel)
        width = len(part[0][2]) - 1
        ids2 = torch.zeros(len(part), width, dtype=torch.long, device=device)
        mask2 = torch.zeros(len(part), width, dtype=torch.long, device=device)
        for r, (_, _, cont) in enumerate(part):  # right padding after the context: pads are never attended
            ids2[r, : len(cont) - 1] = torch.tensor(cont[:-1])
            mask2[r, : len(cont) - 1] = 1
        pos2 = mask.sum(1)[sel][:, None] + torch.arange(width, device=device)
        logits = model(ids2, attention_mask=torch.cat([mask[sel], mask2], 1), position_ids=pos2,
                       past_key_values=part_cache, use_cache=True).logits
        logits = _upcast(logits)
        logp, greedy = torch.log_softmax(logits, dim=-1), logits.argmax(-1)
        for r, (b, i, cont) in enumerate(part):
            n = len(cont)
            lp = torch.cat([first_logp[b, None], logp[r, : n - 1]])
            gr = torch.cat([first_greedy[b, None], greedy[r, : n - 1]])
            out[i] = _gather(lp, gr, cont)


def score_examples(examples: list[Example], results: list[tuple[float, bool]]) -> dict:
    """Accuracy (argmax of log-likelihood), acc_norm (per character of the choice), n, chance level."""
    k = 0
    hits = norm_hits = 0
    chance = 0.0
    has_norm = all(ex.norm_lengths is not None for ex in examples)
    for ex in examples:
        res = results[k: k + len(ex.requests)]
        k += len(ex.requests)
        if ex.greedy:
            hits += int(res[0][1])
            continue
        lls = [ll for ll, _ in res]
        hits += int(_argmax(lls) == ex.label)
        chance += 1.0 / len(ex.requests)
        if has_norm:
            normed = [ll / max(n, 1) for ll, n in zip(lls, ex.norm_lengths)]
            norm_hits += int(_argmax(normed) == ex.label)
    n = len(examples)
    return {"acc": hits / n, "acc_norm": norm_hits / n if has_norm else None, "n": n, "chance": chance / n}


def _argmax(xs: list[float]) -> int:
    # first maximum, as numpy.argmax in the harness
    best = 0
    for j, x in enumerate(xs):
        if x > xs[best] or (math.isnan(xs[best]) and not math.isnan(x)):
            best = j
    return best


def evaluate_tasks(model, tokenizer, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
                   limit: int | None = DEFAULT_LIMIT, batch_size: int = 16, progress: bool = True,
                   share_context: bool | None = None, generation: dict | None = None) -> dict[str, dict]:
    """Zero-shot accuracy on each task: {task: {"acc", "acc_norm", "n", "chance", "seconds", "source"}}."""
    from .generative import get_gen_task, is_generative, run_gen_task

    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if limit is not None and limit < 1:
        raise DataError(f"limit {limit} must be a positive number of examples (or None for all)")
    # fail on a bad name before any scoring
    specs = [get_gen_task(t) if is_generative(t) else get_task(t) for t in tasks]
    was_training = model.training
    model.eval()
    out = {}
    try:
        for spec in specs:
            if not isinstance(spec, TaskSpec):
                out[spec.name] = run_gen_task(model, tokenizer, spec, limit=limit, batch_size=batch_size,
                                              progress=progress, **(generation or {}))
                continue
            t0 = time.time()
            examples = spec.load(limit)
            if not examples:
                raise DataError(f"task {spec.name} has no examples")
            reqs = [r for ex in examples for r in ex.requests]
            results = score_requests(model, tokenizer, reqs, batch_size=batch_size, progress=progress,
                                     desc=spec.name, share_context=share_context)
            out[spec.name] = score_examples(examples, results)
            out[spec.name].update(seconds=round(time.time() - t0, 2), source=spec.source)
    finally:
        model.train(was_training)
    return out


__all__ = ["DEFAULT_LIMIT", "DEFAULT_TASKS", "TASKS", "encode_pair", "evaluate_tasks", "score_examples", "score_requests"]
