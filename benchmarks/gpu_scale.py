"""Speed and memory of the block engine on a GPU, on Llama-shaped models with random weights.

Builds a Llama-architecture model of a named shape (1b, 7b, 13b, 70b) with random weights (no
download), compresses it with GPTQ 4-bit g128, SparseGPT 50% and joint 50% + 4-bit (one pass) on
128 × 2048 random calibration tokens, and prints per-layer and total time, peak GPU memory, and
time over a compute floor computed from the shapes (below).

The model is built on the meta device: embeddings on the CPU; blocks either materialised on the CPU
up front (``--where cpu``: the engine onloads each block over PCIe, as with a real checkpoint) or
drawn on the GPU when their turn comes and dropped afterwards (``--where lazy``: for shapes whose
weights do not fit in host memory, e.g. 70B in 128 GB). ``--blocks N`` builds only the first N
blocks and extrapolates the total to the full depth (stated in the output).

Floor (per block, N calibration tokens, sequence s, hidden d): forward 2·N·P + 2·N·s·d FLOPs
(P = linear parameters; causal attention), counted once per calibration pass the engine makes;
Hessians 2·N·d_in² per shared-input group; all at the measured bf16 matmul rate. Solver work
(lazy OBS updates rows·cols², objective 2·rows·cols², factorisations ~1.5·cols³) at the measured
float32 matmul rate.

    python benchmarks/gpu_scale.py --shape 7b --methods gptq,sparsegpt,joint --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from prunequant.engine import compress_model
from prunequant.models import get_blocks
from prunequant.onload import BlockIO
from prunequant.recipe import PruneSpec, QuantSpec, Recipe

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab (public Llama configurations)
    "tiny": (256, 768, 2, 4, 4, 1000),
    "1b": (2048, 8192, 16, 32, 8, 128256),     # Llama-3.2-1B
    "8b": (4096, 14336, 32, 32, 8, 128256),    # Llama-3-8B
    "7b": (4096, 11008, 32, 32, 32, 32000),    # Llama-2-7B
    "13b": (5120, 13824, 40, 40, 40, 32000),   # Llama-2-13B
    "70b": (8192, 28672, 80, 64, 8, 128256),   # Llama-3-70B
}


def recipe_of(method: str, peer_like: bool = False) -> Recipe:
    q = QuantSpec(method="gptq", bits=4, group_size=128, symmetric=peer_like, act_order=peer_like)
    p = PruneSpec(method="sparsegpt", sparsity=0.5)
    return {"gptq": Recipe(quant=q), "sparsegpt": Recipe(prune=p),
            "joint": Recipe(prune=p, quant=q, joint="onepass")}[method]


def llama_config(shape: str, blocks: int | None = None):
    from transformers import LlamaConfig

    d, inter, layers, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=blocks or layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def fill_block(block: torch.nn.Module, seed: int, device) -> None:
    """Give a (meta or real) block random weights on ``device``: N(0, 0.02) linears, unit norms."""
    block.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


class RandomBlocks(BlockIO):
    """Blocks live on the meta device; each gets random weights on the GPU when its turn comes and is
    dropped after (the compressed weights are not kept: a benchmark of speed and memory only)."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def load(self, i, block, device):
        fill_block(block, self.seed + i, device)

    def unload(self, i, block):
        block.to("meta")


def build_model(shape: str, blocks: int | None, where: str, seed: int = 0, dtype=torch.bfloat16,
                lm_head: bool = False):
    from transformers import AutoModelForCausalLM

    cfg = llama_config(shape, blocks)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    gen = "cuda" if torch.cuda.is_available() else "cpu"
    emb = model.model.embed_tokens
    emb.to_empty(device=gen)
    with torch.no_grad():
        emb.weight.normal_(0.0, 0.02, generator=torch.Generator(device=gen).manual_seed(seed))
    emb.to("cpu")
    model.model.norm.to_empty(device="cpu")
    model.model.norm.weight.data.fill_(1.0)
    if lm_head:  # the engine never runs it; peers that run the whole model need it
        model.lm_head.to_empty(device=gen)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.02, generator=torch.Generator(device=gen).manual_seed(seed + 7))
        model.lm_head.to("cpu")
    with torch.device("cpu"):  # its inverse frequencies were made on the meta device: make them again
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    if where == "cpu":
        for i, block in enumerate(get_blocks(model)):
            fill_block(block, seed + 1 + i, gen)
            block.to("cpu")
    return model, cfg


# ---- floors --------------------------------------------------------------------------------------

def _rate(dtype, n=8192, reps=10) -> float:
    """Measured matmul rate in FLOP/s (float32 without TF32 for the solver's rate)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(2):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 * reps / (time.perf_counter() - t)


def block_floor(cfg, n_tokens: int, seq: int, method: str, true_sequential: bool) -> dict:
    """FLOPs of one block's compression, by kind."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kvd = d // cfg.num_attention_heads * cfg.num_key_value_heads
    lin = {"qkv": d * (d + 2 * kvd), "o": d * d, "gate_up": 2 * d * f, "down": f * d}
    attn = 2 * seq * d  # per token, causal (QKᵀ and PV, half of the square)
    full = 2 * sum(lin.values()) + attn
    if true_sequential:  # partial passes up to each group's input, then the output pass
        prefix = [0, 2 * lin["qkv"] + attn, 2 * (lin["qkv"] + lin["o"]) + attn,
                  2 * (lin["qkv"] + lin["o"] + lin["gate_up"]) + attn]
        fwd = n_tokens * (sum(prefix) + full)
    else:
        fwd = n_tokens * 2 * full
    hess = 2 * n_tokens * (3 * d * d + f * f)
    jobs = [(d + 2 * kvd, d), (d, d), (2 * f, d), (d, f)]  # stacked (rows, cols) per group
    if method != "gptq":  # only GPTQ stacks q/k/v and gate/up; the others solve them one by one
        jobs = [(d, d), (kvd, d), (kvd, d), (d, d), (f, d), (f, d), (d, f)]
    solver = sum(3 * r * c * c + 1.5 * c**3 for r, c in jobs)
    return {"forward": fwd, "hessian": hess, "solver": solver}


# ---- run -----------------------------------------------------------------------------------------

def run_one(shape, method, n_blocks, where, n_samples, seq, batch_size, true_sequential, keep_states,
            rates, peer_like=False, seed=0, device="cuda", offload=None) -> dict:
    cuda = device == "cuda"
    model, cfg = build_model(shape, n_blocks, where, seed)
    ids = torch.randint(0, cfg.vocab_size, (n_samples, seq), generator=torch.Generator().manual_seed(seed))
    io = RandomBlocks(seed + 1) if where == "lazy" else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    rep = compress_model(model, ids, recipe_of(method, peer_like).plan_for, device=device, batch_size=batch_size,
                         true_sequential=true_sequential, keep_states=keep_states, progress=False, block_io=io,
                         offload_activations=offload)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    full_layers = SHAPES[shape][2]
    nb = cfg.num_hidden_layers
    per_block = (secs - rep.timings.get("capture", 0.0)) / nb
    est_total = rep.timings.get("capture", 0.0) + per_block * full_layers
    fl = block_floor(cfg, n_samples * seq, seq, method, true_sequential)
    floor_block = (fl["forward"] + fl["hessian"]) / rates["bf16"] + fl["solver"] / rates["fp32"]
    layer_secs = {}
    for name, row in rep.layers.items():
        rel = name.split(".", 3)[-1]
        layer_secs.setdefault(rel, []).append(row.seconds)
    out = {
        "shape": shape, "method": method, "where": where, "blocks_run": nb, "blocks_full": full_layers,
        "tokens": n_samples * seq, "batch_size": batch_size, "true_sequential": true_sequential,
        "peer_like": peer_like, "seconds": round(secs, 2), "seconds_full_est": round(est_total, 1),
        "per_block_s": round(per_block, 3), "floor_block_s": round(floor_block, 3),
        "over_floor": round(per_block / floor_block, 2), "peak_gib": round(peak / 2**30, 2),
        "offloaded": rep.offloaded, "phases_s": {k: round(v, 2) for k, v in rep.timings.items()},
        "layer_median_s": {k: round(statistics.median(v), 4) for k, v in layer_secs.items()},
        "floor_flops_block": fl,
    }
    del model, rep
    if cuda:
        torch.cuda.empty_cache()
    return out


def warm_up(methods):
    """Compile the Triton kernels and create cuBLAS/cuSOLVER handles outside the timed runs."""
    for m in methods:
        run_one("tiny", m, 1, "cpu", 4, 256, 4, False, True, {"bf16": 1e15, "fp32": 1e14})


def print_row(r):
    ph = r["phases_s"]
    print(f"{r['shape']:>4} {r['method']:>9} {r['blocks_run']:>3}/{r['blocks_full']:<3} "
          f"{r['seconds']:>8.1f} {r['seconds_full_est']:>9.1f} {r['per_block_s']:>7.2f} {r['floor_block_s']:>7.2f} "
          f"{r['over_floor']:>6.2f} {r['peak_gib']:>7.1f}  "
          + " ".join(f"{k}={v:.1f}" for k, v in ph.items()), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", required=True, choices=sorted(SHAPES))
    ap.add_argument("--methods", default="gptq,sparsegpt,joint")
    ap.add_argument("--blocks", type=int, default=None, help="build only this many blocks; extrapolate the rest")
    ap.add_argument("--where", choices=["cpu", "lazy", "auto"], default="auto",
                    help="blocks on the CPU, or drawn on the GPU when needed (auto: lazy for 70b)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--true-sequential", action="store_true", help="re-run the block after each linear group")
    ap.add_argument("--no-states", action="store_true", help="do not keep codes/masks on the CPU (for 70b)")
    ap.add_argument("--peer-like", action="store_true", help="GPTQ as llm-compressor's W4A16: symmetric, act-order")
    ap.add_argument("--out", default=None, help="append JSON results to this file")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the tiny shape on the CPU (a check of the script)")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        for m in a.methods.split(","):
            print_row(run_one("tiny", m, 1, "cpu", 4, 64, 4, False, True, {"bf16": 1e12, "fp32": 1e11},
                              device="cpu"))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_scale.py needs a CUDA GPU")
    methods = a.methods.split(",")
    rates = {"bf16": _rate(torch.bfloat16), "fp32": _rate(torch.float32)}
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | matmul bf16 "
          f"{rates['bf16'] / 1e12:.0f} TFLOP/s, fp32 {rates['fp32'] / 1e12:.0f} TFLOP/s", flush=True)
    for m in methods:
        try:
            warm_up([m])
        except Exception as e:  # noqa: BLE001 - the timed run will report it
            print(f"warm-up {m}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    print("shape    method blocks  total_s  full_est_s blk_s  floor_s  x_floor peak_GiB  phases (s)")
    for shape in a.shape:
        where = a.where if a.where != "auto" else ("lazy" if shape == "70b" else "cpu")
        for m in methods:
            try:
                r = run_one(shape, m, a.blocks, where, a.samples, a.seq_len, a.batch_size, a.true_sequential,
                            not (a.no_states or where == "lazy"), rates, a.peer_like)
            except Exception as e:  # noqa: BLE001 - report and go on with the next method
                print(f"{shape} {m}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                torch.cuda.empty_cache()
                continue
            r.update(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                     command="python benchmarks/gpu_scale.py " + " ".join(argv or sys.argv[1:]))
            print_row(r)
            print("     per-layer median solve s:", json.dumps(r["layer_median_s"]), flush=True)
            if a.out:
                with open(a.out, "a") as fh:
                    fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
