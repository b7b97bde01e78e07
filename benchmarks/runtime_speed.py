"""Speed of the packed runtime against dense bf16 and the public low-bit kernels, on one GPU.

Two tables, each from one run:

``kernels``: one linear layer of each Llama-3-8B block shape (q/o 4096→4096, k/v 4096→1024, gate/up
4096→14336, down 14336→4096), random N(0, 0.02) weights, bf16 activations, 1 / 8 / 32 / 2048 input rows.
Microseconds per call (CUDA-graph replay, L2 flushed before each call: decode's conditions), relative error to the
dequantized weight's float32 product, for: dense bf16 (cuBLAS); ours at 4-bit g128, 8-bit per channel,
3-bit g128 and 2-bit g64 (prunequant.runtime.QuantLinear: tuned Triton GEMV / tensor-core kernel /
dequantize + cuBLAS, whichever its dispatch picks); torch's tinygemm int4 (``_weight_int4pack_mm``);
gemlite 4-bit g128 (``A16Wn``); 2:4 sparse bf16 through torch's semi-structured sparse tensors; torchao
Marlin / sparse-Marlin (each row says why it did not run where it did not).

``model``: a whole model (``--shape 8b``: Llama-3-8B shape, random weights; ``--model smollm2-135m``:
real weights), configurations: dense bf16; 4-bit g128 on ours, on tinygemm and on gemlite; 8-bit per
channel; 2:4 + 4-bit g128 (2:4 magnitude pruning, then RTN of the kept weights: pruned weights are code =
zero point, exactly 0); 2:4 sparse bf16 (semi-structured); the 4/8-bit channel mix (25% of input
channels at 8 bits, the rest at 4, g128) on a model with 25% of its heads (whole KV groups) and MLP
channels removed (the shape our structural pruning produces; random weights). Weights are quantized by
RTN (speed does not depend on the values). Per configuration: block-linear weight bytes; prefill tokens/s
at 2048 tokens × batch 1 and 8; greedy decode tokens/s at batch 1 / 8 / 32, 128 tokens after a 256-token
prompt with one decode step captured in a CUDA graph (dense too); peak GPU memory; and the check that
the packed model's decode tokens equal those of its dequantized dense twin over the first 16 steps,
and (real weights) the packed vs dequantized perplexity.

    python benchmarks/runtime_speed.py kernels --out kernels.jsonl
    python benchmarks/runtime_speed.py model --shape 8b --out model_8b.jsonl
    python benchmarks/runtime_speed.py model --model smollm2-135m --out model_smol.jsonl
    python benchmarks/runtime_speed.py model --shape tiny --device cpu   # smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

SHAPES_8B = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
             "down_proj": (4096, 14336)}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(*a):
    print(*a, flush=True)


def emit(row: dict, args) -> None:
    """Print a finished row and append it to --out at once (a run cut short keeps what it measured)."""
    log(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        from prunequant.runtime.triton_wmm import TRIALS

        if TRIALS:  # every tile the tuner timed so far, to see how close the candidates ran
            Path(args.out).with_suffix(".trials.json").write_text(json.dumps(TRIALS))


def profile_decode(model, prompt, steps: int = 16, top: int = 12, compile=False) -> dict:
    """Where a graph-replayed decode step spends GPU time: the kernels (torch profiler, CUPTI) by total
    device time, in µs per step and as a share of all kernel time."""
    from torch.profiler import ProfilerActivity, profile

    from prunequant.runtime.serve import GraphDecoder

    dec = GraphDecoder(model, prompt, steps, compile)
    dec.reset()
    dec.run(steps)
    dec.reset()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.run(steps)
        torch.cuda.synchronize()
    evs = [(e.key, getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0), e.count)
           for e in prof.key_averages()]
    evs = sorted([e for e in evs if e[1] > 0], key=lambda e: -e[1])
    total = sum(e[1] for e in evs) or 1.0
    return {"kernel_us_per_step": round(total / steps, 1),
            "top": [{"kernel": k[:90], "us_per_step": round(t / steps, 2), "share": round(t / total, 3),
                     "calls_per_step": round(c / steps, 1)} for k, t, c in evs[:top]]}


# ---- weights -------------------------------------------------------------------------------------

def prune24(W: torch.Tensor) -> torch.Tensor:
    """Mask keeping the 2 largest-magnitude weights of every 4 consecutive input columns."""
    g = W.abs().reshape(W.shape[0], -1, 4)
    keep = g.topk(2, dim=-1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return m.reshape(W.shape)


def rtn(W: torch.Tensor, bits: int, group_size: int, symmetric: bool, mask=None):
    from prunequant.recipe import QuantSpec
    from prunequant.solvers.quant import rtn_quantize

    spec = QuantSpec(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric, ragged=True)
    return rtn_quantize(W.float(), spec, mask).quant


def mixed(W: torch.Tensor, high_fraction: float, seed: int):
    from prunequant.solvers.mixed import MixSpec, mixed_quantize

    g = torch.Generator(device="cpu").manual_seed(seed)
    high = torch.rand(W.shape[1], generator=g) < high_fraction
    return mixed_quantize(W.float(), high.to(W.device),
                          MixSpec(low_bits=4, high_bits=8, group_size=128, allow_prune=False)).quant


# ---- public kernels ------------------------------------------------------------------------------

def gemlite_linear(q, bias, dtype):
    """gemlite's A16Wn from our codes / scales / zero points (its grid is ours: (code − zero) · scale)."""
    from gemlite.helper import A16Wn

    return A16Wn(device=q.codes.device, dtype=dtype).from_weights(
        q.codes.to(torch.uint8), q.scale.to(dtype), q.zero.to(dtype), int(q.bits), q.group_size, bias=bias)


def torchao_marlin_reason() -> str | None:
    """None if torchao offers a Marlin int4 kernel here, else why not."""
    try:
        import torchao
    except Exception as e:  # noqa: BLE001
        return f"torchao does not import: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    names = [n for n in dir(torch.ops.torchao) if "marlin" in n.lower()]
    if not names:
        return (f"torchao {torchao.__version__} registers no Marlin op (torch.ops.torchao has none with 'marlin' "
                "in its name; the 0.18 wheel's Python has no Marlin layout either)")
    return None


def semi_sparse(W: torch.Tensor):
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(W)


# ---- kernel table --------------------------------------------------------------------------------

def bench_us(fn) -> float:
    """GPU µs per call from CUDA-graph replay with the L2 flushed before each call (decode's conditions)."""
    from prunequant.runtime.triton_wmm import graph_time_us

    return graph_time_us(fn)


def kernels(args) -> list[dict]:
    from prunequant.runtime import build_quant_linear, segments_of

    dev, dt = "cuda", torch.bfloat16
    rows = []
    marlin = torchao_marlin_reason()
    for name, (N, K) in SHAPES_8B.items():
        g = torch.Generator(device=dev).manual_seed(N + K)
        W = torch.randn(N, K, device=dev, generator=g) * 0.02
        m24 = prune24(W)
        builds = {}
        specs = {k: v for k, v in {"ours w4 g128": (4, 128, False, None), "ours w8": (8, 0, True, None),
                 "ours w3 g128": (3, 128, False, None), "ours w2 g64": (2, 64, False, None),
                 "ours 2:4+w4 g128": (4, 128, False, m24)}.items() if not args.methods or k in args.methods}
        for label, (bits, gs, sym, mask) in specs.items():
            q = rtn(W, bits, gs, sym, mask)
            ql, rec = build_quant_linear(segments_of(q), K, N, None, device=dev, dtype=dt,
                                         prefer={bits: ["triton"]})
            builds[label] = (lambda x, ql=ql: ql(x), q.dequantize().to(dt), rec[0]["backend"])
        q4 = rtn(W, 4, 128, False)
        W4 = q4.dequantize().to(dt)
        try:
            tg, rec = build_quant_linear(segments_of(q4), K, N, None, device=dev, dtype=dt,
                                         prefer={4: ["tinygemm"]})
            builds["tinygemm int4 g128"] = (lambda x, m=tg: m(x), W4, rec[0]["backend"])
        except Exception as e:  # noqa: BLE001
            builds["tinygemm int4 g128"] = (None, None, f"error: {e}")
        try:
            gl = gemlite_linear(q4, None, dt)
            builds["gemlite w4 g128"] = (lambda x, m=gl: m(x), W4, "gemlite A16Wn")
        except Exception as e:  # noqa: BLE001
            builds["gemlite w4 g128"] = (None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        Wd = W.to(dt)
        W24 = torch.where(m24, W, 0).to(dt)
        try:
            ws = semi_sparse(W24)
            builds["2:4 bf16 (semi-structured)"] = (lambda x, w=ws: F.linear(x, w), W24, "torch semi-structured")
        except Exception as e:  # noqa: BLE001
            builds["2:4 bf16 (semi-structured)"] = (None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        builds["torchao Marlin / sparse-Marlin"] = (None, None, marlin or "available")
        if args.methods:
            builds = {k: v for k, v in builds.items() if k in args.methods}
        for M in args.rows:
            x = torch.randn(M, K, device=dev, generator=g).to(dt)
            t_dense = bench_us(lambda: F.linear(x, Wd))
            rows.append({"table": "kernels", "layer": name, "N": N, "K": K, "M": M, "method": "dense bf16",
                         "us": round(t_dense, 2), "x_dense": 1.0, "rel_err": 0.0, "note": "cuBLAS"})
            emit(rows[-1], args)
            for label, (fn, Wref, note) in builds.items():
                r = {"table": "kernels", "layer": name, "N": N, "K": K, "M": M, "method": label, "note": note}
                if fn is None:
                    r["us"] = None
                else:
                    try:
                        ref = x.float() @ Wref.float().t()
                        y = fn(x)
                        r["rel_err"] = float((y.float() - ref).norm() / ref.norm())
                        t = bench_us(lambda: fn(x))
                        r.update(us=round(t, 2), x_dense=round(t_dense / t, 3))
                    except Exception as e:  # noqa: BLE001
                        r.update(us=None, note=f"{note}; {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                rows.append(r)
                emit(r, args)
        del builds
        torch.cuda.empty_cache()
    return rows


# ---- model table ---------------------------------------------------------------------------------

def build_dense(args, device, *, pruned: bool = False):
    """The base model in bf16 on ``device`` (random weights for --shape; the real model for --model)."""
    if args.model:
        from prunequant.models import load_model

        model, tok = load_model(args.model)
        model.config._attn_implementation = "sdpa"
        return model.to(device, args.dtype).eval(), tok
    from structural_speed import random_llama

    shape = args.shape
    model = random_llama(shape, device) if not pruned else random_pruned(shape, device)
    return model.to(args.dtype).eval(), None


def random_pruned(shape: str, device):
    """The shape structural pruning of 25% heads (whole KV groups) and 25% MLP channels leaves."""
    from gpu_scale import fill_block, llama_config
    from transformers import AutoModelForCausalLM

    cfg = llama_config(shape)
    cfg.num_key_value_heads = max(1, cfg.num_key_value_heads * 3 // 4)
    q_per_kv = cfg.num_attention_heads // llama_config(shape).num_key_value_heads
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.num_attention_heads = cfg.num_key_value_heads * q_per_kv
    cfg.intermediate_size = cfg.intermediate_size * 3 // 4
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    for i, block in enumerate(model.model.layers):
        fill_block(block, 100 + i, device)
    for mod, s in ((model.model.embed_tokens, 0), (model.lm_head, 7)):
        mod.to_empty(device=device)
        with torch.no_grad():
            mod.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(s))
    model.model.norm.to_empty(device=device)
    model.model.norm.weight.data.fill_(1.0)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval()


def block_linears(model):
    for i, b in enumerate(model.model.layers):
        for n in LINEARS:
            parent = b.self_attn if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else b.mlp
            yield f"model.layers.{i}.{'self_attn' if parent is b.self_attn else 'mlp'}.{n}", parent, n


@torch.no_grad()
def convert(model, config: str, device) -> dict:
    """Swap the block linears for ``config``'s modules, one layer at a time (the dense weight of a layer is
    dropped as soon as its replacement exists)."""
    from prunequant.runtime import build_quant_linear, segments_of

    dt = next(model.parameters()).dtype
    backends: dict[str, int] = {}
    for name, parent, attr in block_linears(model):
        lin = getattr(parent, attr)
        W = lin.weight.detach()
        bias = None if lin.bias is None else lin.bias.detach()
        if config == "2:4 bf16":
            Wp = torch.where(prune24(W), W, 0)
            new = torch.nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=device, dtype=dt)
            new.weight = torch.nn.Parameter(semi_sparse(Wp.to(dt)), requires_grad=False)
            if bias is not None:
                new.bias.copy_(bias)
            label = "semi-structured"
        else:
            if config.startswith("mix"):
                q = mixed(W, 0.25, seed=hash(name) % 2**31)
            elif config.startswith("w8"):
                q = rtn(W, 8, 0, True)
            else:
                q = rtn(W, 4, 128, False, prune24(W) if config.startswith("2:4+w4") else None)
            if config == "w4 gemlite":
                new = gemlite_linear(q, bias, dt)
                label = "gemlite"
            else:
                prefer = {4: ["tinygemm"]} if config == "w4 tinygemm" else \
                    {4: ["sparse24", "triton", "packed"]} if config == "2:4+w4 sparse24" else \
                    {b: ["triton", "packed"] for b in (2, 3, 4, 8)}
                new, recs = build_quant_linear(segments_of(q), W.shape[1], W.shape[0], bias, device=device, dtype=dt,
                                               prefer=prefer)
                label = new.backend
        setattr(parent, attr, new)
        del lin, W
        backends[label] = backends.get(label, 0) + 1
    if config in ("w4", "w8", "2:4+w4", "w3", "w2"):  # q/k/v and gate/up as one matmul each, as load_packed does
        from prunequant.runtime import fuse_siblings

        backends["fused groups"] = fuse_siblings(model, dt)
    gc.collect()
    torch.cuda.empty_cache() if torch.device(device).type == "cuda" else None
    return backends


def linear_bytes(model) -> int:
    from prunequant.runtime import module_bytes

    from prunequant.runtime.fuse import ProjectionSlice

    total, seen = 0, set()
    for _, parent, attr in block_linears(model):
        m = getattr(parent, attr)
        if isinstance(m, ProjectionSlice):  # siblings share one module: count it once
            if id(m.shared) in seen:
                continue
            seen.add(id(m.shared))
            m = m.shared
        if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "packed"):  # semi-structured: values + metadata
            w = m.weight
            total += sum(t.numel() * t.element_size() for t in (w.packed, w.meta) if t is not None)
            total += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
        elif hasattr(m, "W_q"):  # gemlite
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values() if torch.is_tensor(t))
        else:
            total += module_bytes(m)
    return total


def measure(model, args, device, label: str, ref_tokens=None) -> dict:
    from structural_speed import Peak, decode_graph_tps, prefill_tps

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    out = {"config": label}
    peak = 0
    cuda = torch.device(device).type == "cuda"
    for b in args.prefill_batch:
        ids = torch.randint(0, vocab, (b, args.prefill_len), generator=g).to(device)
        with Peak(device) as p:
            out[f"prefill_b{b}"] = round(prefill_tps(model, ids, args.warmup, args.repeats), 1)
        peak = max(peak, p.value)
    tokens = None
    for b in args.decode_batch:
        prompt = torch.randint(0, vocab, (b, args.decode_prompt), generator=g).to(device)
        with Peak(device) as p:
            if cuda:
                tps, toks = decode_graph_tps(model, prompt, args.decode, args.warmup, args.repeats,
                                             compile=args.compile)
            else:
                from structural_speed import decode_eager_tps, decode_tokens_eager

                tps = decode_eager_tps(model, prompt, args.decode, device, args.warmup, args.repeats)
                toks = decode_tokens_eager(model, prompt, 16)
        out[f"decode_b{b}"] = round(tps, 1)
        peak = max(peak, p.value)
        if tokens is None:
            tokens = toks[:, :16].cpu()
    out["peak_gib"] = round(peak / 2**30, 3)
    out["linear_mib"] = round(linear_bytes(model) / 2**20, 1)
    if ref_tokens is not None:
        out["same_tokens_as_dequantized"] = f"{int((tokens == ref_tokens).sum())}/{ref_tokens.numel()}"
    return out, tokens


@torch.no_grad()
def dequantized_twin_tokens(model, config, args, device):
    """Decode tokens of the dense model whose weights are this configuration's dequantized weights."""
    from structural_speed import decode_tokens_eager

    dt = next(model.parameters()).dtype
    for name, parent, attr in block_linears(model):
        W = getattr(parent, attr).weight
        if config.startswith("mix"):
            from prunequant.runtime import state_weight

            Wq = state_weight(mixed(W, 0.25, seed=hash(name) % 2**31))
        elif config.startswith("w8"):
            Wq = rtn(W, 8, 0, True).dequantize()
        elif config == "2:4 bf16":
            Wq = torch.where(prune24(W), W, 0)
        else:
            Wq = rtn(W, 4, 128, False, prune24(W) if config.startswith("2:4+w4") else None).dequantize()
        W.data.copy_(Wq.to(dt))
    g = torch.Generator().manual_seed(1)
    for b in args.prefill_batch:  # same generator draws as measure()
        torch.randint(0, model.config.vocab_size, (b, args.prefill_len), generator=g)
    prompt = torch.randint(0, model.config.vocab_size, (args.decode_batch[0], args.decode_prompt), generator=g)
    return decode_tokens_eager(model, prompt.to(device), 16).cpu()


def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, ids.numel() - 1, window):
            chunk = ids[s:s + window + 1].to(next(model.parameters()).device)[None]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            nll += float(F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def model_table(args) -> list[dict]:
    device = args.device
    cuda = device == "cuda"
    configs = args.configs or ["dense", "w4", "w4 tinygemm", "w4 gemlite", "w8", "2:4+w4", "2:4+w4 sparse24",
                               "2:4 bf16", "mix+pruned"]
    if not cuda:
        configs = [c for c in configs if c not in ("w4 gemlite", "2:4 bf16")]
    rows = []
    ppl_ids = None
    for config in configs:
        t0 = time.time()
        try:
            model, tok = build_dense(args, device, pruned=config == "mix+pruned")
            ref = None
            if config != "dense" and not args.model and args.twin:
                twin, _ = build_dense(args, device, pruned=config == "mix+pruned")
                ref = dequantized_twin_tokens(twin, config, args, device)
                del twin
                gc.collect()
                torch.cuda.empty_cache() if cuda else None
            ppl = {}
            if args.model:
                if ppl_ids is None and args.ids:
                    ppl_ids = torch.load(args.ids)["eval"][: args.ppl_tokens].long()
                elif ppl_ids is None:
                    from prunequant.data import load_text, tokenize

                    ppl_ids = tokenize(tok, load_text("wiki", "eval"), max_tokens=args.ppl_tokens)
                if config not in ("dense", "2:4 bf16", "w4 gemlite", "w4 tinygemm"):
                    # the dequantized twin: same weights, dense modules
                    twin, _ = build_dense(args, device)
                    dequantized_twin_tokens(twin, config, args, device)
                    ppl["ppl_dequantized"] = round(perplexity(twin, ppl_ids, 512), 4)
                    del twin
            backends = {"dense": 196} if config == "dense" else convert(model, config, device)
            if args.model:
                ppl["ppl"] = round(perplexity(model, ppl_ids, 512), 4)
            row, _ = measure(model, args, device, config, ref)
            row.update(ppl, backends=backends, seconds=round(time.time() - t0, 1))
            if args.profile and cuda:
                g = torch.Generator().manual_seed(2)
                for b in args.profile:
                    prompt = torch.randint(0, model.config.vocab_size, (b, args.decode_prompt), generator=g)
                    try:
                        row[f"profile_decode_b{b}"] = profile_decode(model, prompt.to(device), compile=args.compile)
                    except Exception as e:  # noqa: BLE001 - a profiler without CUPTI: keep the row
                        row[f"profile_decode_b{b}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        except Exception as e:  # noqa: BLE001 - one failing configuration keeps its row with the reason
            traceback.print_exc()
            row = {"config": config, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        row.update(table="model", model=args.model or f"llama-{args.shape}-random",
                   compiled=bool(args.compile and cuda))
        rows.append(row)
        emit(row, args)
        model = None
        gc.collect()
        torch.cuda.empty_cache() if cuda else None
    return rows


def memory_table(args) -> list[dict]:
    """Bytes of the block linears as each configuration holds them (CPU; the GPU layouts of these
    backends are the same tensors): one block of the shape, times the number of blocks."""
    from gpu_scale import fill_block, llama_config
    from transformers import AutoModelForCausalLM

    rows = []
    for config in args.configs or ["w4", "2:4+w4", "2:4+w4 sparse24", "w8"]:
        cfg = llama_config(args.shape, blocks=1)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        fill_block(model.model.layers[0], 1, "cpu")
        model.model.layers[0].to(args.dtype)
        dense = sum(getattr(p, a).weight.numel() * 2 for _, p, a in block_linears(model))
        backends = convert(model, config, "cpu")
        blocks = llama_config(args.shape).num_hidden_layers
        mib = linear_bytes(model) * blocks / 2**20
        row = {"table": "memory", "model": f"llama-{args.shape}", "config": config, "backends": backends,
               "linear_mib": round(mib, 1), "dense_bf16_mib": round(dense * blocks / 2**20, 1),
               "ratio": round(mib * 2**20 / (dense * blocks), 4)}
        rows.append(row)
        emit(row, args)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=("kernels", "model", "memory"))
    ap.add_argument("--shape", default="8b", help="gpu_scale.py shape of the random model (8b, 1b, tiny)")
    ap.add_argument("--model", default=None, help="a real model instead (e.g. smollm2-135m)")
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="*", default=None, help="kernel table: only these rows (labels)")
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 32, 2048])
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--prefill-batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--decode-batch", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--decode-prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=20480)
    ap.add_argument("--ids", default=None, help="a .pt file with evaluation token ids under 'eval' (offline)")
    ap.add_argument("--compile", action="store_true",
                    help="decode steps through torch.compile on both sides (the model body fused; kernels as ops)")
    ap.add_argument("--no-twin", dest="twin", action="store_false",
                    help="skip the random model's dequantized twin (its token check means little on flat logits)")
    ap.add_argument("--profile", type=int, nargs="*", default=None,
                    help="model table: profile the graph-replayed decode at these batch sizes (torch profiler)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    log(f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    {"kernels": kernels, "model": model_table, "memory": memory_table}[args.table](args)


if __name__ == "__main__":
    main()
