"""The whole user path at 8B scale: a Llama-3-8B-shaped checkpoint directory (random bf16 weights, sharded
safetensors + index, a tokenizer whose vocabulary matches the config) compressed by the real CLI, then
`prunequant size` and `prunequant eval` on the output; wall seconds by phase, peak host RSS of every
command (VmHWM) and peak GPU memory; resume after SIGKILL; llm-compressor `oneshot` + `save_pretrained`
(W4A16) on the same directory, side by side.

    python benchmarks/user_path_8b.py --tokenizer TOKDIR --work /tmp/u8 --out results.json \
        [--peer-site DIR] [--steps gptq,joint,ct,peer,resume] [--budget 420]

TOKDIR holds tokenizer files (e.g. SmolLM2's, vocabulary 49152: the config takes its size). Steps run in
the order given while the time budget (seconds) lasts; results are written after every step. The
calibration text is the package's 'wiki' (its cache in $PRUNEQUANT_CACHE when offline).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
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
COMPRESS = ["--calib-samples", "128", "--seq-len", "2048", "--load-dtype", "auto"]
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


def run(cmd: list[str], env: dict, log: Path, kill_when=None) -> dict:
    """Run a command; wall seconds, exit code, peak host RSS (VmHWM, polled) and the printed GPU peak."""
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT)
        hwm, killed = 0, False
        while p.poll() is None:
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) * 1024)
            except OSError:
                pass
            if not killed and ((kill_when is not None and kill_when()) or time.perf_counter() > DEADLINE[0]):
                p.send_signal(signal.SIGKILL)
                killed = True
            time.sleep(0.2)
    text = log.read_text(errors="replace")
    gpu = [int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("GPU_PEAK_BYTES")]
    return {"cmd": " ".join(cmd[3:] if cmd[1] == "-c" else cmd), "rc": p.returncode,
            "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(hwm / 2**30, 2),
            "peak_gpu_gib": round(gpu[-1] / 2**30, 2) if gpu else None, "killed": killed,
            "tail": text[-1500:] if p.returncode else ""}


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


def compress_job(name, args, ckpt, work, env, results, evaluate=True):
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    r = {"compress": run(pq("compress", ckpt, *args, "--out", out), env, work / f"{name}.log")}
    if r["compress"]["rc"] == 0:
        rec = json.loads((out / "prunequant.json").read_text())
        r["timings"] = rec.get("timings")
        r["rates"] = {k: rec["rates"].get(k) for k in ("tcr", "rate_with_overheads") if k in rec["rates"]}
        r["bytes_on_disk"] = sum(p.stat().st_size for p in out.iterdir())
        r["size"] = run(pq("size", out), env, work / f"{name}.size.log")
        r["size"]["stdout"] = (work / f"{name}.size.log").read_text()[-1200:]
        if evaluate:
            js = work / f"{name}.eval.json"
            r["eval"] = run(pq("eval", out, "--max-tokens", 16384, "--json", js), env, work / f"{name}.eval.log")
            if js.is_file():
                e = json.loads(js.read_text())
                r["eval"].update(perplexity=e.get("perplexity"), reload_seconds=e.get("load_seconds"))
    results[name] = r
    return out


def peer_job(ckpt, work, env, peer_site: str, results):
    """llm-compressor 0.14 oneshot GPTQ W4A16 (g128) + save_pretrained, same 128 × 2048 calibration ids."""
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
ids = torch.load({str(ids)!r})
ds = Dataset.from_dict({{"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}})
oneshot(model=model, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
        max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
t2 = time.perf_counter()
model.save_pretrained({str(work / 'peer_out')!r}, save_compressed=True)
t3 = time.perf_counter()
print("PEER_TIMES", json.dumps({{"load": t1 - t0, "oneshot": t2 - t1, "save": t3 - t2}}), flush=True)
print('GPU_PEAK_BYTES', torch.cuda.max_memory_allocated(), flush=True)
"""
    penv = {**env, "PYTHONPATH": f"{peer_site}:{env.get('PYTHONPATH', '')}"}
    r = run([sys.executable, "-c", script], penv, work / "peer.log")
    for ln in (work / "peer.log").read_text(errors="replace").splitlines():
        if ln.startswith("PEER_TIMES"):
            r["phases"] = {k: round(v, 1) for k, v in json.loads(ln.split(" ", 1)[1]).items()}
    results["llmcompressor_w4a16"] = r


def calib_ids(ckpt: Path, path: Path) -> None:
    """The calibration token ids prunequant draws (same text, seed, sampling), for the peer."""
    import torch
    from transformers import AutoTokenizer

    from prunequant.data import calibration_ids, load_text

    tok = AutoTokenizer.from_pretrained(ckpt)
    torch.save(calibration_ids(tok, load_text("wiki", "calib"), int(COMPRESS[1]), int(COMPRESS[3]), 0), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--work", default="/tmp/u8")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", default="gptq,joint,peer,ct,resume")
    ap.add_argument("--peer-site", default=None)
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--small", action="store_true", help="a 2-block, hidden-256 model (a smoke test on a CPU)")
    a = ap.parse_args()
    start = time.perf_counter()
    DEADLINE[0] = start + a.budget
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict = {"date": time.strftime("%Y-%m-%d"), "steps": a.steps}
    out = Path(a.out)

    def save():
        out.write_text(json.dumps(results, indent=1, default=str))

    import torch

    if a.small:
        SHAPE.update(hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
                     num_key_value_heads=2)
        COMPRESS[1], COMPRESS[3] = "4", "64"
    results["machine"] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
                          "cpus": os.cpu_count()}
    ckpt = work / "llama3-8b-shape"
    results["checkpoint"] = make_checkpoint(ckpt, Path(a.tokenizer))
    save()
    joint = ["--prune", "sparsegpt:0.5", "--quant", "gptq:4:g128", "--joint", "onepass", *COMPRESS]
    gptq = ["--quant", "gptq:4:g128", *COMPRESS]
    for step in a.steps.split(","):
        left = a.budget - (time.perf_counter() - start)
        if left < 60:
            results.setdefault("skipped", []).append(step)
            continue
        if step == "gptq":
            compress_job("gptq_compact", [*gptq, "--format", "compact"], ckpt, work, env, results)
        elif step == "joint":
            compress_job("joint_compact", [*joint, "--format", "compact"], ckpt, work, env, results)
        elif step == "ct":
            compress_job("joint_ct", [*joint, "--format", "compressed-tensors"], ckpt, work, env, results,
                         evaluate=False)
        elif step == "peer" and a.peer_site:
            calib_ids(ckpt, work / "calib_ids.pt")
            peer_job(ckpt, work, env, a.peer_site, results)
        elif step == "resume":  # SIGKILL once block 10 is checkpointed, re-run, compare with the full run
            full = work / "gptq_compact"
            if not full.is_dir():
                full = compress_job("gptq_compact", [*gptq, "--format", "compact"], ckpt, work, env, results, False)
            res_out = work / "resumed"
            progress = Path(str(res_out) + ".prunequant-work") / "progress.json"

            def after_block_10():
                try:
                    return json.loads(progress.read_text()).get("done", 0) >= 11
                except (OSError, ValueError):
                    return False
            cmd = pq("compress", ckpt, *gptq, "--format", "compact", "--out", res_out)
            first = run(cmd, env, work / "resume1.log", kill_when=after_block_10)
            second = run(cmd, env, work / "resume2.log")
            rec = json.loads((res_out / "prunequant.json").read_text()) if second["rc"] == 0 else {}
            results["resume"] = {"killed_run": first, "rerun": second, "resumed_blocks": rec.get("resumed_blocks"),
                                 "same_hashes": second["rc"] == 0 and tree_hashes(res_out) == tree_hashes(full)}
        save()
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    save()


if __name__ == "__main__":
    main()
