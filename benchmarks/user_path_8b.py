"""The whole user path at 8B scale: a Llama-3-8B-shaped checkpoint directory (random bf16 weights, sharded
safetensors + index, a tokenizer whose vocabulary matches the config) compressed by the real CLI, then
`prunequant size`, `prunequant eval` (reload + perplexity) and `prunequant bench` on the output; wall
seconds by phase, peak host RSS of every command (VmHWM) and peak GPU memory; resume after SIGKILL;
llm-compressor `oneshot` + `save_pretrained` (W4A16) on the same directory, side by side.

    python benchmarks/user_path_8b.py --tokenizer TOKDIR --work /tmp/u8 --out results.json \
        [--peer-site DIR] [--steps gptq,joint,resume,ct,joint_eval,rtn,bench,peer] [--budget 455] [--bench-against] [--small]

TOKDIR holds tokenizer files (e.g. SmolLM2's, vocabulary 49152: the config takes its size). Steps run in
the order given; each command has its own time box (BOX) and none runs past the budget (seconds from the
start), so one slow step cannot eat the others; the JSON is rewritten after every command, and the
commands' logs go to OUT with the suffix .logs.txt. The calibration text is the package's 'wiki' (its
cache in $PRUNEQUANT_CACHE when offline). ``--small``: a 12-block, hidden-256 model (a check on a CPU).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=False)  # Llama-3-8B; vocabulary from the tokenizer
DEADLINE = [float("inf")]  # every command is killed past it (the budget)
# seconds each command may take at most (the 8B run's expected time, with room); the budget caps them all
BOX = {"compress": 200, "size": 40, "eval": 120, "resume_killed": 150, "resume_rerun": 200, "bench": 240}
COMPRESS = ["--calib-samples", "128", "--seq-len", "2048", "--load-dtype", "auto"]
EVAL_TOKENS = [16384]
GPU_PEAK = ("import atexit, runpy, sys, torch\n"
            "atexit.register(lambda: print('GPU_PEAK_BYTES', torch.cuda.max_memory_allocated() if "
            "torch.cuda.is_available() else 0, flush=True))\n"
            "sys.argv = ['prunequant'] + sys.argv[1:]\n"
            "runpy.run_module('prunequant.cli', run_name='__main__')\n")


def make_checkpoint(root: Path, tokenizer: Path, shard_blocks: int = 4) -> dict:  # 9 files of ~2 GB
    """Random N(0, 0.02) linears and unit norms drawn on the GPU, written shard by shard (bf16)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(**SHAPE, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      dtype="bfloat16")
    root.mkdir(parents=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * d // cfg.num_attention_heads

    def rnd(*shape):
        return torch.empty(shape, device=dev, dtype=torch.bfloat16).normal_(0, 0.02, generator=g).cpu()

    def block(i):
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rnd(d, d), p + "self_attn.k_proj.weight": rnd(kv, d),
                p + "self_attn.v_proj.weight": rnd(kv, d), p + "self_attn.o_proj.weight": rnd(d, d),
                p + "mlp.gate_proj.weight": rnd(f, d), p + "mlp.up_proj.weight": rnd(f, d),
                p + "mlp.down_proj.weight": rnd(d, f),
                p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)}

    groups = [list(range(i, min(i + shard_blocks, cfg.num_hidden_layers)))
              for i in range(0, cfg.num_hidden_layers, shard_blocks)]
    n = len(groups) + 1
    weight_map, total = {}, 0
    for k, blocks in enumerate(groups):
        tensors = {}
        if k == 0:
            tensors["model.embed_tokens.weight"] = rnd(cfg.vocab_size, d)
        for i in blocks:
            tensors.update(block(i))
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    last = {"model.norm.weight": torch.ones(d, dtype=torch.bfloat16), "lm_head.weight": rnd(cfg.vocab_size, d)}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(last, str(root / name), metadata={"format": "pt"})
    weight_map.update({key: name for key in last})
    total += sum(t.numel() * t.element_size() for t in last.values())
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(root)
    tok.save_pretrained(root)
    shards = sorted(root.glob("model-*.safetensors"))
    return {"seconds": round(time.perf_counter() - t0, 1), "bytes": total, "shards": len(shards),
            "largest_shard_bytes": max(p.stat().st_size for p in shards), "vocab": cfg.vocab_size,
            "params": total // 2}


def run(cmd: list[str], env: dict, log: Path, kill_when=None, box: float = float("inf")) -> dict:
    """Run a command; wall seconds, exit code, peak host RSS (VmHWM, polled) and the printed GPU peak. It is
    killed (SIGKILL) when ``kill_when()`` says so, after ``box`` seconds, or at the budget's end."""
    t0 = time.perf_counter()
    stop_at = min(DEADLINE[0], t0 + box)
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT)
        hwm, killed = 0, None
        while p.poll() is None:
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if killed is None:
                if kill_when is not None and kill_when():
                    killed = "asked"
                elif time.perf_counter() > stop_at:
                    killed = "time box" if stop_at < DEADLINE[0] else "budget"
                if killed:
                    p.send_signal(signal.SIGKILL)
            time.sleep(0.2)
    text = log.read_text(errors="replace")
    gpu = [int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("GPU_PEAK_BYTES")]
    out = {"cmd": " ".join(cmd[3:] if cmd[1] == "-c" else cmd), "rc": p.returncode,
           "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(hwm / 2**30, 2),
           "peak_gpu_gib": round(gpu[-1] / 2**30, 2) if gpu else None, "killed": killed,
           "tail": text[-1500:] if p.returncode else ""}
    done = re.findall(r"(\d+)/(\d+) \[", text)  # the last progress bar position (a killed run: how far it got)
    if killed and done:
        out["progress"] = "/".join(done[-1])
    return out


def pq(*args) -> list[str]:
    return [sys.executable, "-c", GPU_PEAK, *map(str, args)]


def tree_hashes(d: Path) -> dict:
    skip = {"prunequant.json", "prunequant-manifest.json"}
    out = {}
    for p in sorted(d.iterdir()):
        if p.name in skip:
            continue
        raw = p.read_bytes()
        if p.suffix == ".safetensors":  # the header's metadata map has no fixed order: hash its meaning
            n = int.from_bytes(raw[:8], "little")
            raw = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode() + raw[8 + n:]
        out[p.name] = hashlib.sha256(raw).hexdigest()
    return out


def phases(compress: dict, timings: dict | None, log: Path) -> dict:
    """Wall seconds by phase of one compress command: load (skeleton + embeddings), capture, compression
    (block reads, statistics, solve, output pass, checkpoint copies), save (block writes + finishing the
    output: remaining shards, records, manifest, rename) and the rest (interpreter start, imports, text)."""
    t = timings or {}
    m = re.search(r"finishing the output took ([0-9.]+) s", log.read_text(errors="replace"))
    finish = float(m.group(1)) if m else None
    write = t.get("write_blocks", 0.0)
    comp = sum(t.get(k, 0.0) for k in ("onload", "forward_stats", "solve", "forward_out", "checkpoint"))
    comp += t.get("offload", 0.0) - write  # moving the block back/dropping it, without the writes
    out = {"load": t.get("load"), "capture": t.get("capture"), "compression": round(comp, 1),
           "block_writes": round(write, 1), "finish_output": finish,
           "save": round(write + (finish or 0.0), 1)}
    known = sum(v for v in (out["load"], out["capture"], comp, write, finish) if v)
    out["rest"] = round(compress["seconds"] - known, 1)
    out["load_compress_save"] = round(compress["seconds"], 1)
    return out


def compress_job(name, args, ckpt, work, env, results, save, evaluate=True) -> Path:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    r = results[name] = {}
    log = work / f"{name}.log"
    r["compress"] = run(pq("compress", ckpt, *args, "--out", out), env, log, box=BOX["compress"])
    save()
    if r["compress"]["rc"] != 0:
        return out
    rec = json.loads((out / "prunequant.json").read_text())
    r["timings"] = rec.get("timings")
    r["phases"] = phases(r["compress"], rec.get("timings"), log)
    r["rates"] = {k: rec["rates"].get(k) for k in ("tcr", "rate_with_overheads") if k in rec["rates"]}
    r["bytes_on_disk"] = sum(p.stat().st_size for p in out.iterdir())
    r["size"] = run(pq("size", out), env, work / f"{name}.size.log", box=BOX["size"])
    r["size"]["totals"] = [ln for ln in (work / f"{name}.size.log").read_text().splitlines()
                           if "whole model" in ln or "compressed linears" in ln]
    save()
    if evaluate:
        eval_job(name, out, work, env, results, save)
    return out


def eval_job(name, out, work, env, results, save) -> None:
    """`prunequant eval OUT --max-tokens 16384`: reload (decoded on the GPU) + perplexity."""
    js = work / f"{name}.eval.json"
    r = results[name]["eval"] = run(pq("eval", out, "--max-tokens", EVAL_TOKENS[0], "--json", js), env,
                                    work / f"{name}.eval.log", box=BOX["eval"])
    if js.is_file():
        e = json.loads(js.read_text())
        r.update(perplexity=e.get("perplexity"), tokens=e.get("tokens"), seq_len=e.get("seq_len"),
                 reload_seconds=e.get("load_seconds"))
    save()


def bench_job(out, work, env, results, save, against=None) -> None:
    js = work / "bench.json"
    extra = ["--against", against] if against else []
    r = results["bench"] = run(pq("bench", out, "--batch", "1,8", "--prompt-len", 512, "--decode", 64,
                                  "--repeats", 2, *extra, "--json", js), env, work / "bench.log",
                               box=BOX["bench"] * (2 if against else 1))
    r["of"] = out.name
    if js.is_file():
        r["result"] = json.loads(js.read_text())
    save()


def peer_job(ckpt, work, env, peer_site: str, results, save, batch_size: int):
    """llm-compressor 0.14 oneshot GPTQ W4A16 (g128) + save_pretrained, same calibration ids, same batch."""
    ids = work / "calib_ids.pt"
    script = f"""
import time, torch, json
t0 = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from datasets import Dataset
model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained({str(ckpt)!r})
t1 = time.perf_counter()
print("PEER_LOADED", t1 - t0, flush=True)
ids = torch.load({str(ids)!r})
ds = Dataset.from_dict({{"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}})
oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
        max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0], batch_size={batch_size},
        shuffle_calibration_samples=False, tokenizer=tok)
t2 = time.perf_counter()
print("PEER_COMPRESSED", t2 - t1, flush=True)
model.save_pretrained({str(work / 'peer_out')!r}, save_compressed=True)
t3 = time.perf_counter()
print("PEER_TIMES", json.dumps({{"load": t1 - t0, "oneshot": t2 - t1, "save": t3 - t2}}), flush=True)
print('GPU_PEAK_BYTES', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0, flush=True)
"""
    penv = {**env, "PYTHONPATH": f"{peer_site}:{env.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    calib_ids(ckpt, ids)
    r = results["llmcompressor_w4a16"] = {"calib_ids_seconds": round(time.perf_counter() - t0, 1)}
    r.update(run([sys.executable, "-c", script], penv, work / "peer.log"))
    text = (work / "peer.log").read_text(errors="replace")
    for ln in text.splitlines():
        if ln.startswith("PEER_TIMES"):
            r["phases"] = {k: round(v, 1) for k, v in json.loads(ln.split(" ", 1)[1]).items()}
        elif ln.startswith("PEER_LOADED"):
            r["load_seconds"] = round(float(ln.split()[1]), 1)
    layers = re.findall(r"\((\d+)/(\d+)\): Calibrating", text)  # its sequential pipeline's progress
    if layers:
        r["layers_calibrated"] = "/".join(layers[-1])
    save()


def calib_ids(ckpt: Path, path: Path) -> None:
    """The calibration token ids prunequant draws (same text, seed, sampling), for the peer."""
    import torch
    from transformers import AutoTokenizer

    from prunequant.data import calibration_ids, load_text

    tok = AutoTokenizer.from_pretrained(ckpt)
    torch.save(calibration_ids(tok, load_text("wiki", "calib"), int(COMPRESS[1]), int(COMPRESS[3]), 0), path)


def resume_job(ckpt, work, env, results, save, gptq_args) -> None:
    """SIGKILL once block 10 is checkpointed, re-run the same command, compare with the uninterrupted run."""
    full = work / "gptq_compact"
    if not (full / "prunequant.json").is_file():
        full = compress_job("gptq_compact", [*gptq_args, "--format", "compact"], ckpt, work, env, results, save,
                            evaluate=False)
    res_out = work / "resumed"
    work_dir = Path(str(res_out) + ".prunequant-work")

    def after_block_10():
        for progress in work_dir.glob("*/progress.json"):
            try:
                if json.loads(progress.read_text()).get("done", 0) >= 11:
                    return True
            except (OSError, ValueError):
                pass
        return False
    cmd = pq("compress", ckpt, *gptq_args, "--format", "compact", "--out", res_out)
    r = results["resume"] = {"disk_free_gib": round(shutil.disk_usage(work).free / 2**30, 1)}
    r["killed_run"] = run(cmd, env, work / "resume1.log", kill_when=after_block_10, box=BOX["resume_killed"])
    r["checkpointed_blocks"] = max((json.loads(p.read_text()).get("done", 0) for p in work_dir.glob("*/progress.json")),
                                   default=0)
    for partial in work.glob(".resumed.partial-*"):  # the killed run's unfinished output (disk)
        shutil.rmtree(partial, ignore_errors=True)
    save()
    r["rerun"] = run(cmd, env, work / "resume2.log", box=BOX["resume_rerun"])
    rec = json.loads((res_out / "prunequant.json").read_text()) if r["rerun"]["rc"] == 0 else {}
    r["resumed_blocks"] = rec.get("resumed_blocks")
    if r["rerun"]["rc"] == 0:
        r["rerun"]["phases"] = phases(r["rerun"], rec.get("timings"), work / "resume2.log")
    r["same_hashes"] = bool(r["rerun"]["rc"] == 0 and full.is_dir() and tree_hashes(res_out) == tree_hashes(full))
    save()
    shutil.rmtree(res_out, ignore_errors=True)  # disk: the 8B work dirs and outputs add up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--work", default="/tmp/u8")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", default="gptq,joint,resume,ct,joint_eval,bench,peer")
    ap.add_argument("--peer-site", default=None)
    ap.add_argument("--budget", type=float, default=455.0)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration batch, both sides")
    ap.add_argument("--bench-against", action="store_true", help="bench the dense checkpoint beside the output")
    ap.add_argument("--small", action="store_true", help="a 12-block, hidden-256 model (a check on a CPU)")
    a = ap.parse_args()
    start = time.perf_counter()
    DEADLINE[0] = start + a.budget
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {"date": time.strftime("%Y-%m-%d"), "steps": a.steps, "budget_s": a.budget, "box_s": BOX}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(results, indent=1, default=str))

    import torch
    import transformers

    if a.small:
        SHAPE.update(hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
                     num_key_value_heads=2)
        COMPRESS[1], COMPRESS[3] = "4", "64"
        EVAL_TOKENS[0] = 2048
        BOX.update({k: v * 3 for k, v in BOX.items()})  # a shared CPU is slow
    results["machine"] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "cpus": os.cpu_count(),
                          "host_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    ckpt = work / "llama3-8b-shape"
    results["checkpoint"] = make_checkpoint(ckpt, Path(a.tokenizer))
    results["checkpoint"]["disk_free_gib_after"] = round(shutil.disk_usage(work).free / 2**30, 1)
    save()
    batch = ["--batch-size", str(a.batch_size)]
    joint = ["--prune", "sparsegpt:0.5", "--quant", "gptq:4:g128", "--joint", "onepass", *COMPRESS, *batch]
    gptq = ["--quant", "gptq:4:g128", *COMPRESS, *batch]
    for step in a.steps.split(","):
        if a.budget - (time.perf_counter() - start) < 30:
            results.setdefault("skipped", []).append(step)
            continue
        if step == "gptq":
            compress_job("gptq_compact", [*gptq, "--format", "compact"], ckpt, work, env, results, save)
        elif step == "joint":
            compress_job("joint_compact", [*joint, "--format", "compact"], ckpt, work, env, results, save,
                         evaluate=False)
        elif step == "joint_eval" and (work / "joint_compact" / "prunequant.json").is_file():
            eval_job("joint_compact", work / "joint_compact", work, env, results, save)
            shutil.rmtree(work / "joint_compact", ignore_errors=True)
        elif step == "ct":
            compress_job("joint_ct", [*joint, "--format", "compressed-tensors"], ckpt, work, env, results, save,
                         evaluate=False)
            shutil.rmtree(work / "joint_ct", ignore_errors=True)
        elif step == "resume":
            if shutil.disk_usage(work).free < 40 * 2**30 and (work / "joint_compact").is_dir():
                shutil.rmtree(work / "joint_compact")  # the resume step writes ~30 GB (8B): disk first
                results["joint_compact_removed_for_disk"] = True
            resume_job(ckpt, work, env, results, save, gptq)
        elif step == "rtn":  # data-free 4-bit: no calibration pass (also the quickest output for `bench`)
            compress_job("rtn_compact", ["--quant", "rtn:4:g128", *COMPRESS, *batch, "--format", "compact"], ckpt,
                         work, env, results, save, evaluate=False)
        elif step == "bench" and (done := [d for d in ("gptq_compact", "rtn_compact")
                                           if (work / d / "prunequant.json").is_file()]):
            bench_job(work / done[0], work, env, results, save, ckpt if a.bench_against else None)
        elif step == "peer" and a.peer_site:
            peer_job(ckpt, work, env, a.peer_site, results, save, a.batch_size)
        else:
            results.setdefault("skipped", []).append(step)
        save()
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    save()
    with open(str(out) + ".logs.txt", "w") as f:  # every command's log, tails only (they can be long)
        for log in sorted(work.glob("*.log")):
            f.write(f"===== {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")


if __name__ == "__main__":
    main()
