"""Issue 10's speed measurement: size, prefill / decode throughput and peak GPU memory of a 4/8-bit
channel mix with structural pruning (and its parts) against the uncompressed model, with packed low-bit
weights on real kernels.

Configurations, all built in one process by the project's own pipeline from the same base model, then
measured on the same inputs:

- ``base``: uncompressed, in --dtype (bf16 on CUDA);
- ``pruned``: structural pruning only (prune_structured: FLAP importance, bias compensation, whole KV
  groups; --head-sparsity / --mlp-sparsity of every layer) — a physically smaller dense model;
- ``w8``: 8-bit weight-only, per-channel symmetric grids (engine RTN or GPTQ);
- ``w4``: 4-bit weight-only, groups of --group-size, asymmetric (engine RTN or GPTQ); on CUDA measured twice,
  on our Triton kernel and on torch's tinygemm int4 kernel;
- ``mix``: channel-level 4/8-bit mix at --mix-bits bits per weight (layer-wise allocation, then
  apply_allocation with RTN or GPTQ; the high-bit and low-bit input channels of a layer are two segments of
  one fused kernel launch);
- ``mix+pruned``: ``pruned`` followed by the same mix.

Every block linear of a quantized configuration is swapped for a ``prunequant.runtime.QuantLinear`` built
from the quantization states the pipeline produced (checked to dequantize to the model's weights), on the
first backend that takes it and passes a probe check: CUDA — Triton kernel (2/4/8-bit, any group size),
then tinygemm (4-bit), then dequantize-per-call, then dense; CPU — torch's int4 / int8 CPU kernels, then
dequantize-per-call, then dense. Fallbacks and their reasons are in the JSON. Embeddings, norms and the LM
head stay dense in --dtype in every configuration.

Measured per configuration: logical parameters; bytes of all tensors in memory; stored bits per original
block-linear weight (codes, fp16 scales, zero points, column maps, biases — the pipeline's accounting);
the compact export's size (--export; not for channel-mixed layers, which that format stores as floats);
perplexity of the dequantized (dense) model and of the packed one (same windows: a check that the kernels
compute the same function); prefill tokens/s at each --batch × --prefill-len (KV cache on, logits of the
last position only; inputs above 64 rows either dequantize the layer once and call cuBLAS, or run the
Triton kernel with large tiles: both timed, JSON has both); greedy decode tokens/s of --new-tokens after a
--decode-prompt prompt, eager (DynamicCache) and with the step captured in a CUDA graph (StaticCache);
peak GPU memory (torch.cuda.max_memory_allocated, reset before each phase; the table gives the largest over
the prefill and decode phases; only the model being measured is on the GPU).
Timings: CUDA-synchronised, --warmup untimed runs, median of --repeats.

    python benchmarks/structural_speed.py --model smollm2-135m --out results.jsonl
    python benchmarks/structural_speed.py --shape 1b --out results.jsonl
    python benchmarks/structural_speed.py --shape 1b --quick --device cpu        # smoke run, tiny shapes
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from prunequant.runtime.serve import GraphDecoder, median_time, prefill_tps, sync

sys.path.insert(0, str(Path(__file__).parent))  # gpu_scale.py's model builder

CONFIGS = ("base", "pruned", "w8", "w4", "mix", "mix+pruned")


# ---- models --------------------------------------------------------------------------------------

def random_llama(shape: str, device, seed: int = 0):
    """A Llama-architecture model of a public shape with N(0, 0.02) weights (gpu_scale.py's builder), fp32,
    drawn directly on ``device`` (the same seed gives the same model: no resident copy is needed)."""
    from gpu_scale import fill_block, llama_config
    from transformers import AutoModelForCausalLM

    cfg = llama_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    for i, block in enumerate(model.model.layers):
        fill_block(block, seed + 1 + i, device)
    for mod, s in ((model.model.embed_tokens, seed), (model.lm_head, seed + 7)):
        mod.to_empty(device=device)
        with torch.no_grad():
            mod.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(s))
    model.model.norm.to_empty(device=device)
    model.model.norm.weight.data.fill_(1.0)
    with torch.device(device):  # its buffers were made on the meta device: make them again
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval()


class Source:
    """Makes a fresh fp32 copy of the base model on the device for each configuration."""

    def __init__(self, args, device):
        self.device = device
        self.tokenizer = None
        if args.shape:
            self.name = f"llama-{args.shape if not args.quick else 'tiny'}-random"
            self.shape = "tiny" if args.quick else args.shape
            self.cpu_model = None
            from gpu_scale import llama_config

            self.config = llama_config(self.shape)
        else:
            from prunequant.models import load_model

            self.name = args.model
            self.cpu_model, self.tokenizer = load_model(args.model)  # float32, CPU
            self.cpu_model.config._attn_implementation = "sdpa"
            self.config = self.cpu_model.config

    def fresh(self):
        if self.cpu_model is None:
            return random_llama(self.shape, self.device)
        return copy.deepcopy(self.cpu_model).to(self.device).eval()


def token_data(args, src: Source) -> dict:
    """Calibration and evaluation ids: --ids file, else the embedded wiki text (real models), else random."""
    vocab = src.config.vocab_size
    g = torch.Generator().manual_seed(0)
    if args.ids:
        saved = torch.load(args.ids)
        return {"calib": saved["calib"][: args.calib_n, : args.calib_len].long(),
                "eval": saved["eval"][: args.ppl_windows * args.ppl_len].long(),
                "source": f"{saved.get('source', '?')} (from {args.ids})"}
    if src.tokenizer is not None:
        try:
            from prunequant.data import calibration_ids, load_text, tokenize

            calib = calibration_ids(src.tokenizer, load_text("wiki", "calib"), args.calib_n, args.calib_len, seed=0)
            ev = tokenize(src.tokenizer, load_text("wiki", "eval"), max_tokens=args.ppl_windows * args.ppl_len)
            return {"calib": calib, "eval": ev, "source": "wiki (embedded): calib split / eval split"}
        except Exception as e:  # noqa: BLE001 - no text packages on this machine: random tokens, said so
            print(f"# wiki text unavailable ({type(e).__name__}: {str(e)[:120]}); random tokens", flush=True)
    return {"calib": torch.randint(0, vocab, (args.calib_n, args.calib_len), generator=g),
            "eval": torch.randint(0, vocab, (args.ppl_windows * args.ppl_len,), generator=g),
            "source": "random tokens"}


# ---- configurations (the pipeline) ---------------------------------------------------------------

def build_config(name: str, model, calib, args, device) -> tuple[dict, dict]:
    """Compress ``model`` (fp32, on device) in place as ``name`` says; returns (states by linear name, info)."""
    from prunequant.engine import compress_model
    from prunequant.recipe import QuantSpec, Recipe
    from prunequant import structural as S

    info, states = {}, {}
    if name.endswith("pruned"):
        rep = S.prune_structured(model, calib, head_sparsity=args.head_sparsity, mlp_sparsity=args.mlp_sparsity,
                                 metric="flap", gqa="group", scope="layer", batch_size=args.calib_batch)
        sh = rep.shapes[0]
        info["pruning"] = {"params_before": rep.params_before, "params_after": rep.params_after,
                           "heads": sh["num_attention_heads"], "kv_heads": sh["num_key_value_heads"],
                           "intermediate": sh["intermediate_size"], "metric": "flap", "bias_compensation": True}
    if name in ("w8", "w4"):
        spec = QuantSpec(method=args.method, bits=8 if name == "w8" else 4,
                         group_size=0 if name == "w8" else args.group_size, symmetric=name == "w8", ragged=True)
        plan = Recipe(quant=spec).plan_for
        if args.method == "rtn":
            rep = compress_model(model, None, plan, device=device, progress=False)
        else:
            rep = compress_model(model, calib, plan, device=device, batch_size=args.calib_batch, progress=False)
        states = {n: r.quant for n, r in rep.states.items() if r.quant is not None}
        info["quant"] = spec.describe()
    if name.startswith("mix"):
        alloc = S.layerwise_allocation(model, calib, args.mix_bits, choices=(("low", 4), ("high", 8)),
                                       group_size=args.group_size, batch_size=args.calib_batch)
        rep = S.apply_allocation(model, alloc, calib, method=args.method, batch_size=args.calib_batch)
        states = rep.states
        info["mix"] = {"target_bits": args.mix_bits, "avg_bits_of_this_model": round(rep.avg_bits, 4),
                       "high_fraction": _high_fraction(states), "allocation": "layer-wise",
                       "method": args.method, "group_size": args.group_size}
    return states, info


def _high_fraction(states: dict) -> float:
    hi = tot = 0
    for q in states.values():
        n = int(q.extra["perm"].numel())
        hi += int(q.extra["n_high"])
        tot += n
    return round(hi / max(tot, 1), 4)


def block_linears(model):
    from prunequant.models import arch_of, get_blocks
    from prunequant.models import block_linears as linears_of

    arch = arch_of(model)
    for i, b in enumerate(get_blocks(model, arch)):
        for rel, lin in linears_of(b, arch).items():
            yield f"{arch.blocks}.{i}.{rel}", lin


def stored_bits(model, states: dict) -> float:
    """Stored bits of the block linears (codes + fp16 scales + zero points + column maps + fp16 biases;
    dense layers at 16 bits) — divide by the original model's block-linear weights for bits per weight."""
    total = 0.0
    for name, lin in block_linears(model):
        n, k = lin.weight.shape
        q = states.get(name)
        if q is None:
            total += 16 * n * k
        elif q.kind == "channel-mixed":
            total += q.bits * n * k  # mixed_quantize's exact count (codes, grids, column map)
        else:
            g = q.scale.shape[1]
            total += n * k * q.bits + n * g * (16 + (0 if q.symmetric else q.bits))
        if lin.bias is not None:
            total += 16 * n
    return total


def compact_export_bytes(model, states: dict, dtype) -> int | None:
    from prunequant.export import save_compact, size_report
    from prunequant.solvers.base import LayerResult

    if any(q.kind != "uniform" for q in states.values()):
        return None
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m"
        save_compact(model, {n: LayerResult(weight=None, quant=q) for n, q in states.items()}, out, dtype)
        return size_report(out)["model_bytes"]


# ---- measurements --------------------------------------------------------------------------------

@torch.inference_mode()
def decode_eager_tps(model, prompt, new_tokens, device, warmup, repeats) -> float:
    """Greedy decode with a DynamicCache; warm-up runs are 8 steps long."""
    ts = []
    for r in range(warmup + repeats):
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        t = time.perf_counter()
        for _ in range(new_tokens if r >= warmup else min(8, new_tokens)):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
        sync(device)
        if r >= warmup:
            ts.append(time.perf_counter() - t)
        del cache, out
    return prompt.shape[0] * new_tokens / statistics.median(ts)


@torch.inference_mode()
def decode_tokens_eager(model, prompt, steps) -> torch.Tensor:
    """The greedy continuation (B, steps) with a DynamicCache (the reference for the CUDA-graph decode)."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    toks = []
    for _ in range(steps):
        toks.append(tok)
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
    return torch.cat(toks, 1)


@torch.inference_mode()
def forced_decode_logits(model, prompt, forced) -> torch.Tensor:
    """Last-position logits (float32) of each decode step fed the tokens ``forced`` (B, n) one by one: the
    small-input kernel path, teacher-forced so two models can be compared step by step."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, [out.logits[:, -1].float()]
    for i in range(forced.shape[1]):
        out = model(input_ids=forced[:, i:i + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


@torch.inference_mode()
def decode_graph_tps(model, prompt, new_tokens, warmup, repeats, check_steps: int = 16, compile=False):
    """One greedy decode step captured as a CUDA graph (runtime.serve.GraphDecoder; ``compile``: of the
    torch.compile'd forward), replayed ``new_tokens`` times per timed run. Returns (tokens/s, the first
    ``check_steps`` tokens it produced)."""
    dec = GraphDecoder(model, prompt, new_tokens, compile)
    dec.reset()  # check run: the tokens the graph produces (compared with the eager decode's)
    toks = []
    for _ in range(min(check_steps, new_tokens)):
        toks.append(dec.tok.clone())
        dec.run(1)

    def once():
        dec.reset()
        dec.run(new_tokens)
    tps = prompt.shape[0] * new_tokens / median_time(once, prompt.device, warmup, repeats)
    return tps, torch.cat(toks, 1)


class Peak:
    """Peak allocated GPU memory over a phase (0 on the CPU)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.value = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated()
        return False


def logical_params(model) -> int:
    from prunequant.runtime import QuantLinear

    n, seen = 0, set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            n += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def measure(model, args, device, ids, prefill_modes) -> dict:
    from prunequant.evaluate.perplexity import perplexity
    from prunequant.runtime import set_runtime_mode

    cuda = torch.device(device).type == "cuda"
    out = {"prefill_tok_s": {}, "decode_eager_tok_s": {}, "decode_graph_tok_s": {}, "peak_bytes": {}}
    if cuda:
        torch.cuda.empty_cache()
        out["resident_bytes"] = torch.cuda.memory_allocated()
    with Peak(device) as pk:
        out["ppl_packed"] = perplexity(model, ids["eval"], args.ppl_len, batch_size=args.ppl_batch, device=device,
                                       progress=False)["perplexity"]
    out["peak_bytes"]["ppl"] = pk.value
    for b in args.batch:
        x = ids["speed"][:b, : args.prefill_len].to(device)
        row = {}
        for mode in prefill_modes:
            if mode:
                set_runtime_mode(model, large_m=mode)
            try:
                with Peak(device) as pk:
                    row[mode or "dense"] = round(prefill_tps(model, x, args.warmup, args.repeats), 1)
                out["peak_bytes"][f"prefill_b{b}_{mode or 'dense'}"] = pk.value
            except Exception as e:  # noqa: BLE001 - e.g. the large-tile kernel does not compile: recorded
                if mode == prefill_modes[0]:
                    raise
                out.setdefault("prefill_errors", []).append(f"b{b} {mode}: {type(e).__name__}: {str(e)[:300]}")
        out["prefill_tok_s"][b] = row
        if prefill_modes[0]:
            set_runtime_mode(model, large_m=prefill_modes[0])
    for b in args.batch:
        prompt = ids["speed"][:b, : args.decode_prompt].to(device)
        with Peak(device) as pk:
            tps = decode_eager_tps(model, prompt, args.new_tokens, device, int(args.warmup > 0), args.decode_repeats)
            out["decode_eager_tok_s"][b] = round(tps, 2)
        out["peak_bytes"][f"decode_eager_b{b}"] = pk.value
        if cuda and args.graphs:
            try:
                with Peak(device) as pk:
                    tps, toks = decode_graph_tps(model, prompt, args.new_tokens, 1, args.decode_repeats)
                out["decode_graph_tok_s"][b] = round(tps, 2)
                out["peak_bytes"][f"decode_graph_b{b}"] = pk.value
                ref = decode_tokens_eager(model, prompt, toks.shape[1])
                out.setdefault("graph_tokens_match_eager", {})[b] = round(float((ref == toks).float().mean()), 4)
            except Exception as e:  # noqa: BLE001 - recorded; eager numbers stand
                out["decode_graph_tok_s"][b] = None
                out.setdefault("graph_errors", []).append(f"b{b}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                args.graphs = False  # do not try again for the next configurations
                print(f"# CUDA-graph decode failed, eager only from here: {out['graph_errors'][-1]}", flush=True)
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
    speed = {k: v for k, v in out["peak_bytes"].items() if k != "ppl"}
    out["peak_bytes_max"] = max(speed.values()) if speed else 0  # prefill / decode only (not the ppl check)
    return out


# ---- one model -----------------------------------------------------------------------------------

def variants_of(name: str, device, backends: list[str] | None = None) -> list[tuple[str, dict | None]]:
    """(label, backend preference) per measured variant; None = the runtime's defaults for the device."""
    if name in ("base", "pruned"):
        return [("dense", None)]
    if backends:
        return [("+".join(backends), {b: list(backends) for b in (2, 4, 8)})]
    if torch.device(device).type == "cuda" and name == "w4":
        return [("triton", None), ("tinygemm", {4: ["tinygemm", "triton", "packed"], 8: ["triton", "packed"]})]
    return [("default", None)]


def run_model(args, device, dtype, out_rows: list) -> None:
    from prunequant.runtime import QuantLinear, backend_summary, module_bytes, pack_model
    from prunequant.runtime.convert import state_to

    src = Source(args, device)
    ids = token_data(args, src)
    g = torch.Generator().manual_seed(1)
    ids["speed"] = torch.randint(0, src.config.vocab_size,
                                 (max(4, *args.batch), max(args.prefill_len, args.decode_prompt, 32)), generator=g)
    calib = ids["calib"]
    print(f"# {src.name}: calibration {tuple(calib.shape)} ({ids['source']}), perplexity on {ids['eval'].numel()} "
          f"tokens in windows of {args.ppl_len}", flush=True)
    n_orig = None
    for name in args.configs:
        t0 = time.time()
        model = src.fresh()
        if n_orig is None:
            n_orig = sum(lin.weight.numel() for _, lin in block_linears(model))
        try:
            states, info = build_config(name, model, calib, args, device)
        except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
            print(f"{name}: BUILD FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            del model
            continue
        build_s = time.time() - t0
        model = model.to(dtype)
        bits = stored_bits(model, states) / n_orig
        from prunequant.evaluate.perplexity import perplexity

        ppl_dense = perplexity(model, ids["eval"], args.ppl_len, batch_size=args.ppl_batch, device=device,
                               progress=False)["perplexity"]
        check_prompt = ids["speed"][:2, :32].to(device)
        check_forced = ids["speed"][2:4, :16].to(device) if ids["speed"].shape[0] >= 4 else check_prompt[:, :16]
        dense_logits = forced_decode_logits(model, check_prompt, check_forced) if states else None
        compact = None
        if args.export:
            try:
                compact = compact_export_bytes(model, states, dtype)
            except Exception as e:  # noqa: BLE001
                info["export_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        variants = variants_of(name, device, args.backends)
        # nothing but the model being measured stays on the device: states wait on the CPU, and with several
        # variants the dense model too (each variant gets a copy)
        states = {n: state_to(q, "cpu") for n, q in states.items()}
        if len(variants) > 1:
            model = model.to("cpu")
        for vi, (label, prefer) in enumerate(variants):
            m = (copy.deepcopy(model) if vi < len(variants) - 1 else model).to(device)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            t1 = time.time()
            pack = pack_model(m, states, prefer=prefer) if states else None
            pack_s = time.time() - t1
            qls = [x for x in m.modules() if isinstance(x, QuantLinear)]
            if any(x.fused for x in qls):  # large inputs: dequantize once + dense matmul, or the Triton kernel
                modes = ["reconstruct", "kernel"]
            elif any(x.reconstructable for x in qls):
                modes = ["reconstruct"]
            else:  # dense, or kernels that serve every input size (tinygemm, int8pack)
                modes = [None]
            lin_bytes = sum(module_bytes(lin) for _, lin in block_linears(m))
            try:
                meas = measure(m, args, device, ids, modes)
            except Exception as e:  # noqa: BLE001
                print(f"{name} [{label}]: MEASURE FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                del m
                continue
            row = {"model": src.name, "config": name, "variant": label, "device": _device_name(device),
                   "dtype": str(dtype).replace("torch.", ""), "avg_bits": round(bits, 4),
                   "params_logical": logical_params(m), "weight_bytes": module_bytes(m),
                   "block_linear_bytes": lin_bytes, "compact_export_bytes": compact, "ppl_dense": ppl_dense,
                   "build_s": round(build_s, 1), "pack_s": round(pack_s, 1), "info": info,
                   "backends": backend_summary(m), "pack": pack, **meas}
            row["ppl_rel_diff"] = abs(row["ppl_packed"] - ppl_dense) / ppl_dense
            if dense_logits is not None:  # the small-input (decode) kernels against the dense model, step by step
                lg = forced_decode_logits(m, check_prompt, check_forced)
                row["decode_logits_rel_diff"] = float((lg - dense_logits).norm() / dense_logits.norm())
                row["decode_argmax_match"] = float((lg.argmax(-1) == dense_logits.argmax(-1)).float().mean())
            row.update(_context(args, ids))
            out_rows.append(row)
            print(_line(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row, default=str) + "\n")
            del m
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def _context(args, ids) -> dict:
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": tv, "tokens": ids["source"], "command": "python benchmarks/structural_speed.py "
            + " ".join(sys.argv[1:]), "settings": {k: v for k, v in vars(args).items() if k not in ("configs",)}}


def _best_prefill(row, b):
    r = row["prefill_tok_s"].get(b) or {}
    if not r:
        return None, None
    mode = max(r, key=r.get)
    return r[mode], mode


def _line(row) -> str:
    b_lo, b_hi = min(row["prefill_tok_s"]), max(row["prefill_tok_s"])
    return (f"{row['config']:>10} [{row['variant']}] bits {row['avg_bits']:.3f} weights "
            f"{row['weight_bytes'] / 2**20:,.1f} MiB | prefill b{b_lo} {_best_prefill(row, b_lo)[0]} b{b_hi} "
            f"{_best_prefill(row, b_hi)[0]} tok/s | decode eager {row['decode_eager_tok_s']} graph "
            f"{row['decode_graph_tok_s']} tok/s | peak {row['peak_bytes_max'] / 2**30:.2f} GiB | ppl "
            f"{row['ppl_dense']:.3f} -> {row['ppl_packed']:.3f} | decode logits rel. diff "
            f"{_fmt_sci(row.get('decode_logits_rel_diff'))} | {row['backends'] or 'dense'}")


def _fmt(x, nd=0):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def _fmt_sci(x):
    return "–" if x is None else f"{x:.1e}"


def _ratio(a, b):
    return "–" if not a or not b else f"{a / b:.2f}×"


def _from_json(row: dict) -> dict:
    """JSON turned the batch-size keys into strings: back to ints."""
    for k in ("prefill_tok_s", "decode_eager_tok_s", "decode_graph_tok_s"):
        row[k] = {int(b): v for b, v in row.get(k, {}).items()}
    return row


def _mib(x):
    return "–" if x is None else f"{x / 2**20:,.1f}"


def markdown(rows: list[dict]) -> str:
    """One table per model: sizes, throughputs, peak memory, the packed-vs-dense checks, ratios to ``base``."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        base = next((r for r in rs if r["config"] == "base"), None)
        bs = sorted({int(b) for r in rs for b in r["prefill_tok_s"]})
        lo, hi = bs[0], bs[-1]
        graph = any(v for r in rs for v in r["decode_graph_tok_s"].values())
        dec = "decode_graph_tok_s" if graph else "decode_eager_tok_s"
        st = rs[0]["settings"]
        lines.append(f"\n**{model}** on {rs[0]['device']} ({rs[0]['dtype']}); prefill {st['prefill_len']} tokens, "
                     f"decode {st['new_tokens']} tokens after {st['decode_prompt']}; decode columns: "
                     f"{'CUDA graph (eager in brackets)' if graph else 'eager'}\n")
        head = ["config", "kernel", "avg bits", "params M", "weights MiB", "linears MiB", "compact MiB",
                f"prefill b{lo} tok/s", f"prefill b{hi} tok/s", f"decode b{lo} tok/s", f"decode b{hi} tok/s",
                "peak GiB", "ppl dense → packed", "decode logits Δ", "× weights", f"× prefill b{hi}",
                f"× decode b{lo}", f"× decode b{hi}", "× peak"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rs:
            p_lo, _ = _best_prefill(r, lo)
            p_hi, m_hi = _best_prefill(r, hi)
            kern = ", ".join(f"{k}×{v}" for k, v in r["backends"].items()) if r["backends"] else "dense"
            if m_hi in ("reconstruct", "kernel"):
                kern += f"; large inputs: {'dequantize + dense matmul' if m_hi == 'reconstruct' else 'Triton kernel'}"

            def dec_cell(b, r=r):
                g, e = r["decode_graph_tok_s"].get(b), r["decode_eager_tok_s"].get(b)
                return f"{_fmt(g, 1)} ({_fmt(e, 1)})" if graph else _fmt(e, 1)

            bd = (base or {}).get(dec, {})
            label = r["config"] + ("" if r["variant"] in ("dense", "default", "triton") else f" [{r['variant']}]")
            cells = [label, kern, f"{r['avg_bits']:.3f}", f"{r['params_logical'] / 1e6:,.1f}", _mib(r["weight_bytes"]),
                     _mib(r["block_linear_bytes"]), _mib(r["compact_export_bytes"]), _fmt(p_lo), _fmt(p_hi),
                     dec_cell(lo), dec_cell(hi), f"{r['peak_bytes_max'] / 2**30:.2f}",
                     f"{r['ppl_dense']:.3f} → {r['ppl_packed']:.3f}", _fmt_sci(r.get("decode_logits_rel_diff")),
                     _ratio(r["weight_bytes"], base and base["weight_bytes"]),
                     _ratio(p_hi, base and _best_prefill(base, hi)[0]), _ratio(r[dec].get(lo), bd.get(lo)),
                     _ratio(r[dec].get(hi), bd.get(hi)), _ratio(r["peak_bytes_max"], base and base["peak_bytes_max"])]
            lines.append("| " + " | ".join(cells) + " |")
        fb = [(r["config"], r["variant"], f) for r in rs if r["pack"] for f in r["pack"]["fallbacks"]]
        if fb:
            lines.append("\nFallbacks: " + "; ".join(f"{c} [{v}] {f['count']}× {f['reason']}" for c, v, f in fb[:12]))
        errs = [(r["config"], e) for r in rs for e in r.get("graph_errors", []) + r.get("prefill_errors", [])]
        errs += [(r["config"], f"{r['pack']['weights_differing_from_state']} weights differ from their states")
                 for r in rs if r["pack"] and r["pack"].get("weights_differing_from_state")]
        if errs:
            lines.append("\nErrors: " + "; ".join(f"{c} {e}" for c, e in errs[:8]))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model prunequant.models.load_model takes (smollm2-135m, a .gguf)")
    ap.add_argument("--shape", default=None, choices=["1b", "7b", "13b"], help="random-weight Llama of this shape")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, short inputs, one repeat")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="activation / dense dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="quantizer of w8/w4/mix")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--mix-bits", type=float, default=5.0, help="bits per weight of the 4/8 mix (4.16 = all 4-bit)")
    ap.add_argument("--head-sparsity", type=float, default=0.25)
    ap.add_argument("--mlp-sparsity", type=float, default=0.25)
    ap.add_argument("--calib-n", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--decode-prompt", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed prefill runs (median)")
    ap.add_argument("--decode-repeats", type=int, default=2, help="timed decode runs (median)")
    ap.add_argument("--backends", default=None,
                    help="comma list: backend preference for every quantized layer (e.g. triton,packed or "
                         "tinygemm,packed); default: the device's (CUDA: triton, then tinygemm for 4-bit; w4 is "
                         "also measured on tinygemm)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip the CUDA-graph decode")
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--ppl-batch", type=int, default=4)
    ap.add_argument("--export", default="auto", choices=["auto", "on", "off"],
                    help="compact export size (auto: models under 500M parameters)")
    ap.add_argument("--ids", default=None, help="a .pt with {'calib': (N, L), 'eval': (T,)} token ids (see --save-ids)")
    ap.add_argument("--save-ids", default=None, help="write --model's calibration / evaluation ids here and exit")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU machine is shared)")
    ap.add_argument("--out", default=None, help="append one JSON line per configuration here")
    ap.add_argument("--render", default=None, help="print the Markdown tables of a JSON-lines file and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(markdown([_from_json(json.loads(line)) for line in open(args.render) if line.strip()]))
        return
    if not args.model and not args.shape:
        args.model = "smollm2-135m"
    if args.model and args.shape:
        sys.exit("give --model or --shape, not both (run twice)")
    if args.quick:
        args.prefill_len, args.decode_prompt, args.new_tokens = 32, 16, 8
        args.batch = [1, 2]
        args.warmup, args.repeats, args.decode_repeats = 0, 1, 1
        args.calib_n, args.calib_len, args.ppl_windows, args.ppl_len = 2, 64, 2, 64
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.backends:
        from prunequant.runtime import BACKENDS

        args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if any(b not in BACKENDS for b in args.backends):
            sys.exit(f"unknown backend in {args.backends}; choose from {', '.join(BACKENDS)}")
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        sys.exit(f"unknown configurations {bad}; choose from {', '.join(CONFIGS)}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.save_ids:
        src = Source(args, "cpu")
        ids = token_data(args, src)
        torch.save({"calib": ids["calib"].to(torch.int32), "eval": ids["eval"].to(torch.int32),
                    "source": f"{src.name}: {ids['source']}"}, args.save_ids)
        print(f"wrote {args.save_ids}: calib {tuple(ids['calib'].shape)}, eval {ids['eval'].numel()} ({ids['source']})")
        return
    if args.export == "auto":
        args.export = "on" if (args.model or args.quick) else "off"
    args.export = args.export == "on"
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    t0 = time.time()
    run_model(args, device, dtype, rows)
    print(f"# total {time.time() - t0:.0f} s", flush=True)
    if rows:
        print(markdown(rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
