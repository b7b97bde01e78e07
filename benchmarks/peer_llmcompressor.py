"""Side by side with llm-compressor, in one run: same model, same calibration token ids, same evaluation.

    python benchmarks/peer_llmcompressor.py --configs sparsegpt50,wanda50 \
        --peer-python /work/peer-venv/bin/python --peer-python-mask /work/peer-venv-012/bin/python

Ours runs in this process (prunequant.api.compress); theirs runs as a subprocess in a separate virtual
environment (benchmarks/_peer_worker.py, llm-compressor's ``oneshot``), so llm-compressor and its pinned
transformers never meet prunequant's. Both start from the same float32 checkpoint (SmolLM2-135M
dequantized from the embedded GGUF, saved once with save_pretrained), get the same (N, L) calibration
token ids (prunequant.data.calibration_ids, checked by SHA-256), and are scored by the same
prunequant.evaluate.perplexity on the same windows. Theirs comes back as dense float32 block weights
(on-grid values for GPTQ), loaded into a fresh copy of the base model.

Ours and theirs run back to back per configuration, the order alternating from one configuration to
the next; the 1-minute load average before each run is recorded because the CPU is shared.
Results are merged into benchmarks/results/peer_llmcompressor.json (one configuration per call is fine)
and the Markdown table is regenerated from it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunequant.api import compress, library_versions
from prunequant.data import cache_dir, calibration_ids, load_text, tokenize
from prunequant.evaluate.perplexity import perplexity
from prunequant.models import load_model
from prunequant.recipe import PruneSpec, QuantSpec, Recipe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKER = HERE / "_peer_worker.py"
DAMP, BLOCK = 0.01, 128
GROUP = 64  # llm-compressor refuses g128 on SmolLM2's 576 input features (see DIFFERENCES)
PRUNE_TARGETS = {"targets": [r"re:model\.layers\.\d+$"], "ignore": []}
DIFFERENCES = [
    "Group size 64 for both: llm-compressor 0.14 rejects group 128 when 576 input features are not a "
    "multiple of it (validate_group_size_divisibility), and with bypass_divisibility_checks=True its "
    "observer crashes (unflatten 576 into groups of 128); ours would accept 'g128:ragged'.",
    "GPTQ grids: llm-compressor fixes every group's scale up front from the ORIGINAL weights "
    "(memoryless min-max observer), ours fits each group when GPTQ reaches it, on the weights as "
    "updated so far (as the reference GPTQ does). Same symmetric 4/3-bit grid (scale = 2·absmax/(2^b−1)).",
    "Act-order off for both (llm-compressor's default is 'static'; set to None here).",
    "Sequential: both calibrate block by block and feed the next block the COMPRESSED block's outputs "
    "(llm-compressor propagate_error=True). Inside a block llm-compressor collects every linear's "
    "statistics in one pass over the uncompressed block; ours runs with true_sequential=False to match "
    "(ours' default is true_sequential=True: q/k/v, o, gate/up, down each see the compressed earlier ones).",
    "SparseGPT unstructured: both threshold the saliency w²/U_jj² over each whole 128-column block (rows "
    "may differ); llm-compressor prunes every weight <= the (int(s·n)+1)-th smallest (so one more than s·n, "
    "plus ties), ours exactly round(s·n) per block.",
    "Joint: theirs is SparseGPT then GPTQ as two full sequential passes (independent pipeline; GPTQ "
    "recalibrates on the pruned model, mask kept by llm-compressor <= 0.12 when sparsity >= 5%); ours "
    "prunes and quantizes each layer in one engine pass on the same Hessian (one-pass OBS or case B).",
]


@dataclass
class Config:
    name: str
    label: str
    recipes: dict[str, Recipe]  # variant -> recipe (the first is the matched one)
    peer: list[dict]
    peer_env: str = "current"  # "current" (0.14.x) or "mask" (a release that keeps masks in GPTQ)
    bits: int | None = None
    notes: list[str] = field(default_factory=list)


def _gptq_spec(bits: int) -> QuantSpec:
    return QuantSpec(method="gptq", bits=bits, group_size=GROUP, symmetric=True, act_order=False,
                     mse_clip=False, damp=DAMP, blocksize=BLOCK)


def _peer_gptq(bits: int) -> dict:
    return {"type": "GPTQModifier", "targets": ["Linear"], "ignore": ["lm_head"], "block_size": BLOCK,
            "dampening_frac": DAMP, "actorder": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": GROUP, "actorder": None}}


def _peer_prune(kind: str, structure: str) -> dict:
    d = {"type": kind, "sparsity": 0.5, "mask_structure": structure, **PRUNE_TARGETS}
    if kind == "SparseGPTModifier":
        d.update(block_size=BLOCK, dampening_frac=DAMP)
    return d


def _recipe(prune=None, quant=None, joint="onepass", ts=False) -> Recipe:
    return Recipe(prune=prune, quant=quant, joint=joint, true_sequential=ts)


def _joint_variants(prune: PruneSpec, q: QuantSpec) -> dict[str, Recipe]:
    out = {}
    if (Path(__file__).resolve().parents[1] / "src/prunequant/solvers/joint.py").is_file():
        out["onepass"] = _recipe(prune, q, "onepass")
    out["caseB"] = _recipe(prune, q, "B")
    return out


def configs() -> dict[str, Config]:
    sg50 = PruneSpec("sparsegpt", 0.5, damp=DAMP, blocksize=BLOCK)
    sg24 = PruneSpec("sparsegpt", n=2, m=4, damp=DAMP, blocksize=BLOCK)
    cs = [
        Config("sparsegpt50", "SparseGPT 50%", {"matched": _recipe(sg50)}, [_peer_prune("SparseGPTModifier", "0:0")]),
        Config("wanda50", "Wanda 50%", {"matched": _recipe(PruneSpec("wanda", 0.5))},
               [_peer_prune("WandaPruningModifier", "0:0")]),
        Config("sparsegpt24", "SparseGPT 2:4", {"matched": _recipe(sg24)}, [_peer_prune("SparseGPTModifier", "2:4")]),
        Config("gptq_w4g64", f"GPTQ W4 g{GROUP} sym", {"matched": _recipe(quant=_gptq_spec(4))}, [_peer_gptq(4)],
               bits=4),
        Config("gptq_w3g64", f"GPTQ W3 g{GROUP} sym", {"matched": _recipe(quant=_gptq_spec(3))}, [_peer_gptq(3)],
               bits=3),
        Config("sgpt50_gptq4", f"SparseGPT 50% + GPTQ W4 g{GROUP}", _joint_variants(sg50, _gptq_spec(4)),
               [_peer_prune("SparseGPTModifier", "0:0"), _peer_gptq(4)], peer_env="mask", bits=4),
        Config("sgpt24_gptq4", f"SparseGPT 2:4 + GPTQ W4 g{GROUP}", _joint_variants(sg24, _gptq_spec(4)),
               [_peer_prune("SparseGPTModifier", "2:4"), _peer_gptq(4)], peer_env="mask", bits=4),
    ]
    return {c.name: c for c in cs}


# ---- shared inputs ----------------------------------------------------------------------------------

def base_checkpoint() -> Path:
    """SmolLM2-135M dequantized from the embedded GGUF, saved once as a float32 checkpoint."""
    d = cache_dir() / "peer" / "smollm2-135m-f32"
    if not (d / "model.safetensors").is_file():
        model, tok = load_model("smollm2-135m")
        model.save_pretrained(d)
        tok.save_pretrained(d)
    return d


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()


def block_weights(model) -> dict[str, torch.Tensor]:
    return {n + ".weight": m.weight for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


def weight_stats(model, bits: int | None) -> dict:
    """Achieved sparsity (exact zeros) over block linears and, for quantized runs, the largest number of
    distinct values in any (row, group of GROUP columns) — at most 2^bits on a real grid."""
    ws = block_weights(model)
    zeros = sum(int((w == 0).sum()) for w in ws.values())
    total = sum(w.numel() for w in ws.values())
    out = {"sparsity": zeros / total}
    if bits:
        worst = 0
        for w in ws.values():
            g = w.detach().reshape(w.shape[0], -1, GROUP).sort(dim=2).values
            distinct = 1 + (g[:, :, 1:] != g[:, :, :-1]).sum(dim=2)
            worst = max(worst, int(distinct.max()))
        out["max_levels_per_group"] = worst
    return out


def evaluate(model, eval_ids: dict, seq_len: int, batch_size: int) -> dict:
    out = {}
    for name, (ids, text_sha) in eval_ids.items():
        r = perplexity(model, ids, seq_len, batch_size=batch_size, progress=False, text_sha256=text_sha)
        out[name] = {k: r[k] for k in ("perplexity", "nll", "tokens", "windows", "seconds")}
    return out


# ---- the two sides ----------------------------------------------------------------------------------

def run_ours(cfg: Config, recipe: Recipe, base: Path, args, calib_sha: str, eval_ids) -> dict:
    model, tok = load_model(str(base))
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    res = compress(model, recipe, tokenizer=tok, calib_text="wiki", calib_samples=args.samples,
                   seq_len=args.seq_len, seed=args.seed, device="cpu", batch_size=args.batch_size, progress=False)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    got = res.record["calibration"]["token_ids_sha256"]
    if got != calib_sha:
        raise SystemExit(f"calibration ids differ between the sides ({got} vs {calib_sha})")
    out = {"seconds": seconds, "cpu_seconds": cpu_seconds, "engine_seconds": res.report.seconds, "load_avg_1m": load,
           "recipe": recipe.describe(), "true_sequential": recipe.true_sequential, **weight_stats(model, cfg.bits)}
    out["ppl"] = evaluate(model, eval_ids, args.seq_len, args.batch_size)
    return out


def run_theirs(cfg: Config, base: Path, args, ids_path: Path, work: Path, eval_ids) -> dict:
    python = args.peer_python_mask if cfg.peer_env == "mask" else args.peer_python
    job = {"model_dir": str(base), "calib_ids": str(ids_path), "modifiers": cfg.peer,
           "batch_size": args.batch_size, "threads": args.threads, "pipeline": "independent",
           "out_weights": str(work / "peer.safetensors"), "out_json": str(work / "peer.json")}
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ""}
    load = os.getloadavg()[0]
    with open(work / "peer.log", "w") as log:
        rc = subprocess.run([python, str(WORKER), str(work / "job.json")], env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = (work / "peer.log").read_text()[-3000:]
        raise SystemExit(f"peer worker failed (rc={rc}); log tail:\n{tail}")
    rec = json.loads((work / "peer.json").read_text())
    from safetensors.torch import load_file

    model, _ = load_model(str(base))
    weights = load_file(str(work / "peer.safetensors"))
    missing = set(block_weights(model)) - set(weights)
    if missing:
        raise SystemExit(f"peer returned no weights for {sorted(missing)[:3]}...")
    with torch.no_grad():
        for n, w in block_weights(model).items():
            w.copy_(weights[n])
    out = {"seconds": rec["seconds"], "cpu_seconds": rec.get("cpu_seconds"), "load_avg_1m": load, "versions": rec["versions"], "recipe": rec["recipe"],
           **weight_stats(model, cfg.bits)}
    out["ppl"] = evaluate(model, eval_ids, args.seq_len, args.batch_size)
    return out


def cached_baseline(model, eval_ids: dict, args) -> dict:
    """Dense perplexities, cached per protocol (eval text hashes, tokens, window length)."""
    key = hashlib.sha256(json.dumps([{t: v[1] for t, v in eval_ids.items()}, args.eval_tokens, args.seq_len])
                         .encode()).hexdigest()[:16]
    path = cache_dir() / "peer" / f"baseline-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    base = evaluate(model, eval_ids, args.seq_len, args.batch_size)
    path.write_text(json.dumps(base))
    return base


def merge_write(out: Path, data: dict, name: str, run: dict) -> dict:
    """Re-read the results file before writing, so runs of other invocations in flight are kept."""
    if out.is_file():
        disk = json.loads(out.read_text())
        if disk.get("meta", {}).get("calib_sha256") == data["meta"]["calib_sha256"] and \
                disk.get("meta", {}).get("eval_tokens") == data["meta"]["eval_tokens"]:
            data["runs"] = {**disk.get("runs", {}), **data["runs"]}
    data["runs"][name] = run
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(out)
    write_markdown(data, out.with_suffix(".md"))
    return data


# ---- results ----------------------------------------------------------------------------------------

def ratios(ours: dict, theirs: dict) -> dict:
    r = {f"ppl_{t}": ours["ppl"][t]["perplexity"] / theirs["ppl"][t]["perplexity"] for t in ours["ppl"]}
    r["time"] = ours["seconds"] / theirs["seconds"]
    if ours.get("cpu_seconds") and theirs.get("cpu_seconds"):
        r["cpu_time"] = ours["cpu_seconds"] / theirs["cpu_seconds"]
    return r


def _cpu(side: dict) -> str:
    return f"{side['cpu_seconds']:.0f}" if side.get("cpu_seconds") else "–"


def write_markdown(data: dict, path: Path) -> None:
    m = data["meta"]
    base = data.get("baseline", {})
    lines = [
        "# prunequant vs llm-compressor (side by side, one run per configuration)", "",
        f"SmolLM2-135M (float32, dequantized from the embedded Q4_1 GGUF); calibration {m['samples']} x "
        f"{m['seq_len']} tokens of the embedded Wikipedia calib split (seed {m['seed']}, same token ids for both, "
        f"sha256 {m['calib_sha256'][:12]}); perplexity on non-overlapping {m['seq_len']}-token windows, first "
        f"{m['eval_tokens']} tokens of each eval text; CPU, {m['threads']} threads each, batch {m['batch_size']}. "
        "Time = compression call only (ours: `compress()` incl. its calibration tokenisation; theirs: `oneshot()`), "
        "wall clock and process CPU time (user+sys of all threads; less sensitive to the shared CPU's load).",
        f"Dense baseline: wiki {base.get('wiki', {}).get('perplexity', float('nan')):.3f}, "
        f"lambada {base.get('lambada', {}).get('perplexity', float('nan')):.3f}.", "",
        "| config | ours variant | llm-compressor | ppl wiki ours / theirs | ratio | ppl lambada ours / theirs | "
        "ratio | wall s ours / theirs | ratio | CPU s ours / theirs | ratio | sparsity ours / theirs | first |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in data["runs"].items():
        th = run["theirs"]
        for var, o in run["ours"].items():
            r = run["ratios"][var]
            cpu_ratio = f"{r['cpu_time']:.2f}" if "cpu_time" in r else "–"
            lines.append(
                f"| {run['label']} | {var} | {th['versions']['llmcompressor']} | "
                f"{o['ppl']['wiki']['perplexity']:.3f} / {th['ppl']['wiki']['perplexity']:.3f} | {r['ppl_wiki']:.4f} | "
                f"{o['ppl']['lambada']['perplexity']:.3f} / {th['ppl']['lambada']['perplexity']:.3f} | "
                f"{r['ppl_lambada']:.4f} | {o['seconds']:.0f} / {th['seconds']:.0f} | {r['time']:.2f} | "
                f"{_cpu(o)} / {_cpu(th)} | {cpu_ratio} | "
                f"{o['sparsity']:.3f} / {th['sparsity']:.3f} | {run['first']} |")
    lines += ["", "Differences that remain between the two sides:", ""] + [f"- {d}" for d in m["differences"]]
    lines += ["", "Command: `" + m["command"] + "`", "", "Versions: " + json.dumps(m["versions"]), ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="sparsegpt50,wanda50,sparsegpt24",
                    help="comma list of: " + ", ".join(configs()) + " (or 'all')")
    ap.add_argument("--variants", default="", help="comma list of ours' variants to run (default: all of the config)")
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--peer-python-mask", default="/work/peer-venv-012/bin/python")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", choices=("alternate", "ours", "theirs"), default="alternate")
    ap.add_argument("--out", default=str(RESULTS / "peer_llmcompressor.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    allc = configs()
    names = list(allc) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in allc]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(allc)}")

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    base = base_checkpoint()
    model, tok = load_model(str(base))
    ids = calibration_ids(tok, load_text("wiki", "calib"), args.samples, args.seq_len, args.seed)
    eval_ids = {}
    for t in ("wiki", "lambada"):
        text = load_text(t, "eval")
        eval_ids[t] = (tokenize(tok, text, args.eval_tokens), text.sha256)
    meta = {"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed, "eval_tokens": args.eval_tokens,
            "threads": args.threads, "batch_size": args.batch_size, "calib_sha256": sha(ids),
            "eval_sha256": {t: v[1] for t, v in eval_ids.items()}, "differences": DIFFERENCES,
            "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "versions": library_versions(),
            "model": str(base), "cpu_count": os.cpu_count()}
    if data.get("meta") and {k: data["meta"].get(k) for k in ("samples", "seq_len", "seed", "eval_tokens")} != \
            {k: meta[k] for k in ("samples", "seq_len", "seed", "eval_tokens")}:
        data = {"runs": {}}  # a different protocol: start a fresh table
    data["meta"] = meta
    if "baseline" not in data:
        data["baseline"] = cached_baseline(model, eval_ids, args)
    del model

    with tempfile.TemporaryDirectory(prefix="peer-llmc-") as tmp:
        work = Path(tmp)
        ids_path = work / "calib_ids.pt"
        torch.save(ids, ids_path)
        for k, name in enumerate(names):
            cfg = allc[name]
            variants = {v: r for v, r in cfg.recipes.items() if not args.variants or v in args.variants.split(",")}
            first = args.first if args.first != "alternate" else ("ours" if k % 2 == 0 else "theirs")
            print(f"[{name}] {cfg.label}: {first} first", flush=True)
            ours, theirs = {}, None
            if first == "theirs":
                theirs = run_theirs(cfg, base, args, ids_path, work, eval_ids)
            for v, recipe in variants.items():
                ours[v] = run_ours(cfg, recipe, base, args, meta["calib_sha256"], eval_ids)
            if theirs is None:
                theirs = run_theirs(cfg, base, args, ids_path, work, eval_ids)
            run = {"label": cfg.label, "first": first, "ours": ours, "theirs": theirs, "peer_modifiers": cfg.peer,
                   "ratios": {v: ratios(o, theirs) for v, o in ours.items()}}
            data = merge_write(out, data, name, run)
            for v, r in run["ratios"].items():
                print(f"[{name}] {v}: " + ", ".join(f"{a}={b:.4f}" for a, b in r.items()), flush=True)


if __name__ == "__main__":
    main()
