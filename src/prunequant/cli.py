"""`prunequant` command line: a thin layer over the API. User mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from .errors import PrunequantError
from .recipe import JOINT_ALIASES, JOINT_MODES
from .runtime_cli import add_serve_parsers, cmd_bench, cmd_generate
from .search.cli import add_search_parser, cmd_search


def _recipe_from_args(a):
    from .recipe import Allocation, Recipe, joint_mode, parse_prune, parse_quant

    if a.recipe:
        r = Recipe.load(a.recipe)
        if a.prune or a.quant:
            raise PrunequantError("give either --recipe or --prune/--quant, not both")
    else:
        if not a.prune and not a.quant:
            raise PrunequantError("nothing to do: give --prune METHOD:SPARSITY and/or --quant METHOD:BITS[:gGROUP], "
                                  "or --recipe FILE")
        r = Recipe(prune=parse_prune(a.prune) if a.prune else None,
                   quant=parse_quant(a.quant) if a.quant else None)
    if a.joint:
        r.joint = joint_mode(a.joint)
    if a.allocation:
        r.allocation = Allocation(method=a.allocation, avg_bits=a.avg_bits)
    if a.no_true_sequential:
        r.true_sequential = False
    if getattr(a, "refine", None):
        from dataclasses import replace

        from .recipe import RefineSpec

        base = r.refine or RefineSpec(mode=a.refine)
        r.refine = replace(base, mode=a.refine, **{k: v for k, v in (("steps", a.refine_steps),
                                                                    ("global_steps", a.refine_global_steps))
                                                   if v is not None})
    elif getattr(a, "refine_steps", None) is not None or getattr(a, "refine_global_steps", None) is not None:
        raise PrunequantError("--refine-steps needs --refine blockwise|global|both")
    return r


def _add_eval_args(p, default_texts="wiki,lambada"):
    p.add_argument("--text", "--eval-text", dest="texts", default=default_texts,
                   help="comma-separated evaluation texts: wiki, lambada, a .txt/.jsonl file, wikitext2/c4/ptb (network)")
    p.add_argument("--max-tokens", type=int, default=20_000, help="evaluate the first N tokens of each text")
    p.add_argument("--eval-seq-len", type=int, default=None, help="perplexity window (default: --seq-len)")
    p.add_argument("--fewshot", type=int, default=None,
                   help="generative tasks (mmlu_pro, bbh, math): exemplars per prompt (default 5 / 3 / 4)")
    p.add_argument("--gen-tokens", type=int, default=256, help="generative tasks: max new tokens per answer")
    p.add_argument("--task-seed", type=int, default=0, help="generative tasks: seed of the per-subtask sample")
    p.add_argument("--encoding", default=None, help="encoding of local .txt/.jsonl texts (default: UTF-8, strictly)")


def _add_load_args(p):
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="load a prunequant output whose files do not match (or lack) its manifest, with a warning")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a hub model run the Python code it ships (off by default)")


def _add_calib_args(p, calib_samples):
    p.add_argument("--calib-text", default="wiki")
    p.add_argument("--calib-samples", type=int, default=calib_samples)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")


def _add_job_args(p):
    _add_calib_args(p, calib_samples=64)
    p.add_argument("--eval", action="store_true")
    _add_eval_args(p)
    _add_load_args(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prunequant", description="Joint pruning + quantization of causal LMs")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="compress a model with a recipe and save it")
    c.add_argument("model", help="hub id, local directory, .gguf file, or 'smollm2-135m' / 'gemma3-270m'")
    c.add_argument("--recipe", help="recipe file (.yaml/.json)")
    c.add_argument("--prune", help="METHOD:SPARSITY (sparsegpt:0.5) or METHOD:N:M with N of every M pruned (wanda:2:4)")
    c.add_argument("--quant", help="METHOD:BITS[:gGROUP|pc][:sym][:actorder][:mse], e.g. gptq:4:g128, rtn:8, billm:1")
    c.add_argument("--joint", choices=[*JOINT_MODES, *JOINT_ALIASES], help="how pruning and quantization combine "
                   "(onepass: one OBS pass; A: quantize zeros too; B: keep the mask exact)")
    c.add_argument("--allocation", choices=["uniform", "owl", "bits"], help="per-layer allocation")
    c.add_argument("--avg-bits", type=float, help="average-bit budget for --allocation bits")
    c.add_argument("--no-true-sequential", action="store_true", help="one stats pass per block instead of per sub-layer")
    c.add_argument("--refine", choices=["blockwise", "global", "both"], help="end-to-end refinement after the "
                   "layer-wise solve: match each original block's outputs, KL to the original logits, or both "
                   "(only codes, scales and zero points move; masks, bits and format stay)")
    c.add_argument("--refine-steps", type=int, help="optimiser steps per block (default 100)")
    c.add_argument("--refine-global-steps", type=int, help="steps of the global KL stage (default: --refine-steps)")
    c.add_argument("--act-bits", type=int, choices=[4, 8], help="simulated per-token activation quantization "
                   "(W·A8 / W·A4) with SmoothQuant migration folded into the norms")
    _add_calib_args(c, calib_samples=128)
    c.add_argument("--format", default="dense", choices=["dense", "compact", "compressed-tensors"])
    c.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of stored floats (default: the model's, so reload is exact)")
    c.add_argument("--load-dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype the model is loaded and run in while compressing (auto: a checkpoint "
                   "directory's own dtype on a GPU, float32 on the CPU)")
    c.add_argument("--eval", action="store_true", help="evaluate the original and the compressed model: "
                   "perplexity, KL/top-1 agreement, retention, Sr and SrCr")
    c.add_argument("--tasks", default=None, help="with --eval: zero-shot tasks, e.g. arc_easy,piqa,hellaswag; "
                   "generative: mmlu_pro,bbh,math (network) or SUITE:file:PATH.jsonl")
    c.add_argument("--limit", type=int, default=None, help="examples per task, per subtask for generative tasks "
                   "(default 200)")
    c.add_argument("--prompts", type=int, default=0, help="with --eval: held-out prompts for continuation similarity")
    c.add_argument("--agree-tokens", type=int, default=8192)
    _add_eval_args(c)
    _add_load_args(c)

    e = sub.add_parser("eval", help="evaluate a model (perplexity; tasks and retention with --tasks/--against)")
    e.add_argument("model")
    _add_eval_args(e, default_texts="wiki")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default=None)
    e.add_argument("--json", help="write results as JSON here")
    e.add_argument("--against", help="baseline model for retention measures")
    e.add_argument("--tasks", default=None, help="comma-separated tasks: zero-shot (e.g. arc_easy,piqa) and "
                   "generative (mmlu_pro,bbh,math with a network; SUITE:file:PATH.jsonl offline)")
    e.add_argument("--limit", type=int, default=None, help="examples per task, per subtask for generative tasks "
                   "(default 200)")
    e.add_argument("--prompts", type=int, default=0, help="held-out prompts for continuation similarity (MiniLM)")
    e.add_argument("--agree-tokens", type=int, default=8192, help="tokens for KL / top-1 against --against")
    e.add_argument("--report-dir", help="write JSON, Markdown and PNG plots here")
    _add_load_args(e)

    st = sub.add_parser("structured", help="structural pruning: attention heads, MLP channels, whole blocks")
    st.add_argument("model")
    st.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads to remove (GQA-aware)")
    st.add_argument("--mlp", type=float, default=0.0, help="fraction of MLP intermediate channels to remove")
    st.add_argument("--remove-blocks", type=int, default=0, help="remove N whole blocks by block influence")
    st.add_argument("--metric", default="flap", choices=["flap", "wanda", "magnitude"])
    _add_job_args(st)

    gl = sub.add_parser("global", help="learn structural pruning + channel-level mixed precision against the "
                        "model's own output under one average-bit budget")
    gl.add_argument("model")
    gl.add_argument("--avg-bits", type=float, required=True, help="stored bits per original block-linear weight")
    gl.add_argument("--choices", default="prune:0,low:2,high:4", help="per-channel options, e.g. prune:0,low:4,high:8")
    gl.add_argument("--steps", type=int, default=100)
    gl.add_argument("--layerwise", action="store_true", help="layer-wise allocation instead of the learnt global one")
    _add_job_args(gl)

    rp = sub.add_parser("report", help="table, JSON, Markdown and plots (retention, Pareto, Sr-vs-TCr frontier) "
                        "for several evaluated runs")
    rp.add_argument("runs", nargs="+", help="compressed-model directories (compress --eval) or run JSON files")
    rp.add_argument("--out", required=True, help="directory for report.json/.md and the PNG plots")
    rp.add_argument("--title", default="prunequant evaluation")

    s = sub.add_parser("size", help="bytes on disk, bits per parameter, TCr and real compression rate")
    s.add_argument("dir")
    s.add_argument("--no-verify", dest="verify", action="store_false",
                   help="measure a directory whose files do not match (or lack) its manifest, with a warning")
    add_search_parser(sub)
    add_serve_parsers(sub)
    for p in sub.choices.values():  # `--debug` also after the command; SUPPRESS keeps the top-level value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_args(a)
        with _output_lock_of(a):
            return {"compress": cmd_compress, "eval": cmd_eval, "size": cmd_size, "structured": cmd_structured,
                    "global": cmd_global, "search": cmd_search, "report": cmd_report,
                    "generate": cmd_generate, "bench": cmd_bench}[a.cmd](a)
    except BaseException as err:  # noqa: BLE001 - every failure becomes one line (--debug: the traceback too)
        if isinstance(err, SystemExit):
            raise
        if a.debug:
            traceback.print_exc()
        msg, code = _one_line(err)
        print(f"prunequant: {msg}", file=sys.stderr)
        return code


def _one_line(err: BaseException) -> tuple[str, int]:
    """(message, exit code): 2 for a usage error, 1 for a failed run, 3 out of memory, 130 interrupted."""
    if isinstance(err, PrunequantError):
        return f"error: {err}", err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return "interrupted; no output was written (re-run the same command to resume)", 130
    if isinstance(err, MemoryError):
        return "error: out of CPU memory; use fewer --calib-samples or a smaller --batch-size", 3
    if isinstance(err, RuntimeError) and "out of memory" in str(err).lower():  # CUDA OOM
        return "error: out of GPU memory; use a smaller --batch-size or --device cpu", 3
    if isinstance(err, OSError):
        what = f" ({err.filename})" if err.filename else ""
        hint = "; free some space and re-run (it resumes)" if err.errno == errno.ENOSPC else ""
        return f"error: {err.strerror or err}{what}{hint}", 1
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")[:300]
    return f"internal error: {type(err).__name__}: {first} (re-run with --debug for the traceback)", 1


_POSITIVE = ("seq_len", "eval_seq_len", "calib_samples", "batch_size", "max_tokens", "n_trials", "workers",
             "proxy_samples", "proxy_seq_len", "steps")


def check_args(a) -> None:
    """Numbers that can never work fail here, before anything is loaded."""
    for name in _POSITIVE:
        v = getattr(a, name, None)
        if v is None:
            continue
        least = 2 if name.endswith("seq_len") else 1
        if v < least:
            raise PrunequantError(f"--{name.replace('_', '-')} {v} must be at least {least}")
    from .data import check_source

    for src in [getattr(a, "calib_text", None)] + (getattr(a, "texts", None) or "").split(","):
        if src:
            check_source(src)
    if getattr(a, "encoding", None):
        import codecs

        try:
            codecs.lookup(a.encoding)
        except LookupError:
            raise PrunequantError(f"unknown --encoding {a.encoding!r}; use e.g. latin-1 or utf-8") from None
    out = getattr(a, "out", None)
    if out and a.cmd in _WRITERS:
        from .outputs import check_output_path

        check_output_path(out, a.overwrite)


_WRITERS = ("compress", "structured", "global")


def check_context_early(a) -> None:
    """For a local checkpoint the context is known before its weights are read: check window lengths then."""
    evals = a.cmd == "eval" or getattr(a, "eval", False)
    _check_windows(_config_context(getattr(a, "model", None)), ("--seq-len", getattr(a, "seq_len", None)),
                   ("--eval-seq-len", getattr(a, "eval_seq_len", None) if evals else None))


def _config_context(spec) -> int | None:
    cfg = Path(spec) / "config.json" if spec else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
        return int(c.get("max_position_embeddings") or c.get("n_positions") or 0) or None
    except (ValueError, TypeError, AttributeError):
        return None  # the loader says what is wrong with it


def _output_lock_of(a):
    """The lock of the output directory, held from before the model is loaded to the final rename."""
    import contextlib

    if a.cmd not in _WRITERS:
        return contextlib.nullcontext()
    from .outputs import output_lock

    return output_lock(a.out)


def check_seq_len(model, *pairs) -> None:
    """Windows longer than the model's context give meaningless numbers: refuse them."""
    _check_windows(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None),
                   *pairs)


def _check_windows(ctx: int | None, *pairs) -> None:
    for flag, v in pairs:
        if ctx and v and v > ctx:
            raise PrunequantError(f"{flag} {v} is longer than the model's context of {ctx} tokens; use at most {ctx}")


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, name)


def _texts(a) -> list[str]:
    return [t for t in a.texts.split(",") if t]


def _suite_cfg(a):
    from .evaluate.suite import SuiteConfig

    tasks = tuple(t for t in (getattr(a, "tasks", None) or "").split(",") if t)
    return SuiteConfig(texts=tuple(_texts(a)), seq_len=a.eval_seq_len or a.seq_len, max_tokens=a.max_tokens,
                       tasks=tasks, task_limit=getattr(a, "limit", None) or 200, batch_size=a.batch_size,
                       agree_tokens=getattr(a, "agree_tokens", 8192), prompts=getattr(a, "prompts", 0),
                       fewshot=getattr(a, "fewshot", None), gen_tokens=getattr(a, "gen_tokens", 256),
                       task_seed=getattr(a, "task_seed", 0), encoding=getattr(a, "encoding", None))


def cmd_compress(a) -> int:
    from . import api
    from .models import load_model
    from .outputs import work_root
    from .tables import print_compression_table

    recipe = _recipe_from_args(a)  # the output directory was checked before dispatch (_WRITERS)
    check_context_early(a)
    print(f"recipe: {recipe.describe()}")
    t0 = time.perf_counter()
    model, tok = load_model(a.model, dtype=_load_dtype(a), verify=a.verify, trust_remote_code=a.trust_remote_code,
                            lazy=True)
    load_seconds = time.perf_counter() - t0
    check_seq_len(model, ("--seq-len", a.seq_len), ("--eval-seq-len", a.eval_seq_len if a.eval else None))
    res = api.compress(model, recipe, tokenizer=tok, calib_text=a.calib_text, calib_samples=a.calib_samples,
                       seq_len=a.seq_len, seed=a.seed, device=a.device, batch_size=a.batch_size, out=a.out,
                       overwrite=a.overwrite, fmt=a.format, dtype=_dtype(a.dtype), save_later=True,
                       keep_model=bool(a.eval),  # the compressed blocks are needed again only to evaluate
                       keep_original=a.eval, act_bits=a.act_bits, work_dir=work_root(a.out), encoding=a.encoding)
    res.record["source_model"] = a.model
    res.record["timings"]["load"] = round(load_seconds, 3)
    extra = {}
    if a.eval:  # the original streams back from disk one block at a time: no second copy in memory
        extra = _evaluate_once(res, a, lambda: _evaluate_compressed(res, tok, a))
    t_save = time.perf_counter()
    api.save(res, a.out, overwrite=a.overwrite, fmt=a.format, extra=extra, dtype=_dtype(a.dtype))
    t_save = time.perf_counter() - t_save
    if res.original is not None and a.eval:
        api.drop_original(res)
    print_compression_table(res.record, extra.get("evaluation"))
    if res.record.get("refine"):
        print(_refine_line(res.record["refine"]))
    print(f"saved to {a.out} (finishing the output took {t_save:.1f} s)")
    return 0


def _load_dtype(a):
    """Dtype to load the model in for compression: ``--load-dtype``, where 'auto' is the checkpoint's on a GPU."""
    import torch

    from .models import checkpoint_dtype

    choice = getattr(a, "load_dtype", None) or "float32"
    if choice != "auto":
        return getattr(torch, choice)
    on_gpu = _device(a).startswith("cuda")
    return (checkpoint_dtype(a.model) or torch.float32) if on_gpu else torch.float32


def _device(a) -> str:
    """Where to compute: --device, else the GPU when there is one."""
    return a.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")


def _refine_line(info: dict) -> str:
    parts = []
    blocks = info.get("blocks") or []
    if blocks:
        import statistics

        gain = statistics.median(b["error_after"] / max(b["error_before"], 1e-30) for b in blocks)
        parts.append(f"block output error x{gain:.3f} (median over {len(blocks)} blocks, "
                     f"{sum(b['kept'] for b in blocks)} kept)")
    g = info.get("global")
    if g and "kl_before" in g:
        parts.append(f"calibration KL {g['kl_before']:.4f} -> {g['kl_after']:.4f}")
    return (f"refinement: {'; '.join(parts) or 'nothing to refine'}; {info['seconds']:.1f} s "
            f"({info['time_ratio']:.2f}x the one-shot {info['seconds_one_shot']:.1f} s)")


def _evaluate_compressed(res, tok, a) -> dict:
    from . import api
    from .evaluate.suite import run_suite

    dev = _device(a)
    res.model.to(dev)
    suite = run_suite(res.model, tok, _suite_cfg(a), base=api.original_model(res), rates=res.rates)
    res.model.to("cpu")
    return {"evaluation": {"base": suite.base_metrics, "compressed": suite.metrics,
                           "retention": suite.retention, "sr": suite.sr, "srcr": suite.srcr,
                           "srcr_real": suite.srcr_real, "protocol": _suite_cfg(a).settings()}}


def _evaluate_once(res, a, run) -> dict:
    """Keep the evaluation beside the resume checkpoints, so a run killed while saving does not redo it."""
    from .checkpoint import Checkpoint

    if res.work_dir is None:
        return run()
    ck = Checkpoint(res.work_dir, "")
    saved = ck.read_json("evaluation.json")
    protocol = json.loads(json.dumps(_suite_cfg(a).settings(), default=str))
    if saved and saved.get("evaluation", {}).get("protocol") == protocol:
        print(f"evaluation: reusing the result recorded in {res.work_dir}")
        return saved
    extra = run()
    ck.write_json("evaluation.json", extra)
    return extra


def cmd_eval(a) -> int:
    from .evaluate.suite import run_suite
    from .models import load_model
    from .tables import print_eval_table

    check_context_early(a)
    t0 = time.perf_counter()
    dev = _device(a)
    # loaded onto the evaluation device: an export is decoded there, layer by layer
    model, tok = load_model(a.model, device=dev, verify=a.verify, trust_remote_code=a.trust_remote_code)
    load_seconds = time.perf_counter() - t0
    check_seq_len(model, ("--seq-len", a.seq_len), ("--eval-seq-len", a.eval_seq_len))
    base = None
    if a.against:
        base, _ = load_model(a.against, verify=a.verify, trust_remote_code=a.trust_remote_code)
    model.to(dev)
    if base is not None:
        base.to(dev)
    suite = run_suite(model, tok, _suite_cfg(a), base=base, rates=_rates_of(a.model))
    res = {"model": a.model, "against": a.against, **suite.metrics, "protocol": _suite_cfg(a).settings(),
           "load_seconds": round(load_seconds, 3)}
    flat = next(iter(suite.metrics["texts"].values()))
    res.update({k: flat[k] for k in ("perplexity", "tokens", "seq_len")})  # the first text, at top level
    if base is not None:
        res.update(base=suite.base_metrics, retention=suite.retention, sr=suite.sr, srcr=suite.srcr)
    print_eval_table(res)
    if a.report_dir:
        from .report import write_report

        runs = [{"name": a.model, "tcr": (_rates_of(a.model) or {}).get("tcr", 0.0), "metrics": suite.metrics,
                 "retention": suite.retention, "sr": suite.sr, "srcr": suite.srcr}]
        if base is not None:
            runs.insert(0, {"name": a.against, "tcr": 0.0, "metrics": suite.base_metrics,
                            "retention": {k: 1.0 for k in suite.retention}, "sr": 1.0, "srcr": 1.0})
        write_report(runs, a.report_dir)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


def _rates_of(spec: str) -> dict | None:
    rec = Path(spec) / "prunequant.json"
    try:
        return json.loads(rec.read_text()).get("rates") if rec.is_file() else None
    except json.JSONDecodeError:
        return None


def _job_setup(a):
    from .data import calibration_ids, load_text
    from .models import bos_first, load_model

    check_context_early(a)
    model, tok = load_model(a.model, verify=a.verify, trust_remote_code=a.trust_remote_code)
    check_seq_len(model, ("--seq-len", a.seq_len), ("--eval-seq-len", a.eval_seq_len if a.eval else None))
    ids = calibration_ids(tok, load_text(a.calib_text, "calib", a.encoding), a.calib_samples, a.seq_len, a.seed,
                          bos=bos_first(model))
    base = None
    if a.eval:
        import copy

        base = copy.deepcopy(model)
    if a.device:
        model.to(a.device)
    return model, tok, ids, base


def _job_finish(a, model, tok, base, record: dict) -> int:
    from . import api
    from .export.integrity import atomic_output
    from .structural import save_structured

    if a.eval:
        from .evaluate.suite import run_suite

        dev = _device(a)
        model.to(dev)
        base.to(dev)
        suite = run_suite(model, tok, _suite_cfg(a), base=base)
        record["evaluation"] = {"base": suite.base_metrics, "compressed": suite.metrics,
                                "retention": suite.retention, "sr": suite.sr}
        for name, r in suite.metrics["texts"].items():
            b = suite.base_metrics["texts"][name]["perplexity"]
            print(f"perplexity {r['text']} (L={r['seq_len']}, {r['tokens']} tok): {b:.3f} -> {r['perplexity']:.3f}")
        print(f"Sr (mean retention ratio): {suite.sr:.4f}")
    model.to("cpu")
    out = Path(a.out)
    with atomic_output(out, a.overwrite) as tmp:  # manifest, and no replacing unless --overwrite
        save_structured(model, tmp)
        tok.save_pretrained(tmp)
        record.update(source_model=a.model, versions=api.library_versions(),
                      calibration={"text": a.calib_text, "samples": a.calib_samples, "seq_len": a.seq_len,
                                   "seed": a.seed})
        (tmp / "prunequant.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"saved to {out}")
    return 0


def cmd_structured(a) -> int:
    from dataclasses import asdict

    from .structural import prune_structured, remove_blocks

    for name, v in (("--heads", a.heads), ("--mlp", a.mlp)):
        if not 0 <= v < 1:
            raise PrunequantError(f"{name} {v} is outside [0, 1); e.g. 0.25 removes a quarter")
    if a.remove_blocks < 0:
        raise PrunequantError("--remove-blocks must be >= 0")
    if not (a.heads or a.mlp or a.remove_blocks):
        raise PrunequantError("nothing to do: give --heads, --mlp and/or --remove-blocks")
    model, tok, ids, base = _job_setup(a)
    reports = {}
    if a.remove_blocks:
        reports["blocks"] = asdict(remove_blocks(model, ids, a.remove_blocks, batch_size=a.batch_size))
    if a.heads or a.mlp:
        r = prune_structured(model, ids, head_sparsity=a.heads, mlp_sparsity=a.mlp, metric=a.metric,
                             batch_size=a.batch_size)
        reports["structured"] = asdict(r)
        print(f"parameters: {r.params_before:,} -> {r.params_after:,} ({r.param_reduction:.1%} fewer)")
    return _job_finish(a, model, tok, base, {"structural": reports, "command": "structured"})


def cmd_global(a) -> int:
    from .structural import apply_allocation, layerwise_allocation, learn_global_allocation

    try:
        choices = tuple((k, int(v)) for k, v in (c.split(":") for c in a.choices.split(",")))
    except ValueError:
        raise PrunequantError(f"cannot read --choices {a.choices!r}: use e.g. prune:0,low:2,high:4") from None
    model, tok, ids, base = _job_setup(a)
    if a.layerwise:
        alloc = layerwise_allocation(model, ids, a.avg_bits, choices=choices, batch_size=a.batch_size)
    else:
        alloc = learn_global_allocation(model, ids, a.avg_bits, choices=choices, steps=a.steps, seed=a.seed,
                                        batch_size=min(a.batch_size, 4))
    rep = apply_allocation(model, alloc, ids, batch_size=a.batch_size)
    print(f"stored bits per original block-linear weight: {rep.avg_bits:.3f} (target {a.avg_bits})")
    return _job_finish(a, model, tok, base, {"command": "global", "avg_bits": rep.avg_bits,
                                             "planned_bits": rep.planned_bits, "choices": a.choices,
                                             "layer_errors": rep.layer_errors, "allocation_info": alloc.info})


def cmd_report(a) -> int:
    from .report import load_runs, write_report

    try:
        runs = load_runs(a.runs)
    except (OSError, ValueError, KeyError) as e:
        raise PrunequantError(f"cannot read the runs: {e}") from None
    files = write_report(runs, a.out, title=a.title)
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


def cmd_size(a) -> int:
    from .export import size_report, print_size_report

    print_size_report(size_report(a.dir, verify=a.verify))
    return 0


if __name__ == "__main__":
    sys.exit(main())
