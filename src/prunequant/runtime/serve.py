"""`prunequant generate` and `prunequant bench`: run a compressed model the way it is served.

A compact or compressed-tensors export loads into packed modules (``load_packed``); any other model spec (a dense export, a
local checkpoint, a hub id, an embedded name) loads as it is, so the same commands measure the dense
model next to the compressed one (``bench --against``).

Timings: prefill = one forward of ``batch × prompt_len`` tokens with the KV cache on (logits of the last
position only); decode = greedy steps after a ``decode_prompt_len``-token prompt. On CUDA one decode step
is captured in a CUDA graph over a static KV cache (the same on both sides of a comparison); on the CPU
decode runs eagerly. With ``compile`` the decode step is the torch.compile'd forward (over a static cache on
the CPU too). Warm-up runs are untimed; the median of ``repeats`` is reported.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from ..errors import ModelLoadError, PrunequantError
from .load import default_device, default_dtype, load_packed
from .qlinear import QuantLinear, module_bytes

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EXACT = {b: ["packed"] for b in (2, 3, 4, 8)}


def is_packable(path: str) -> bool:
    """A compact export or a compressed-tensors pack-quantized checkpoint: loads into packed modules."""
    from ..export.common import read_descriptor
    from ..export.compact import FORMAT
    from .load_ctensors import is_ctensors

    p = Path(path)
    if not p.is_dir():
        return False
    desc = read_descriptor(p)
    return (desc is not None and desc.get("format") == FORMAT) or is_ctensors(p)


def backends_for(kernel: str, device, exact: bool = False) -> dict[int, list[str]]:
    """Backend order per bit width for --kernel / --exact (every order ends in the exact path)."""
    from .convert import default_backends

    if exact:
        return dict(EXACT)
    prefer = default_backends(device)
    if kernel == "tinygemm":
        prefer[4] = ["tinygemm"] + [b for b in prefer.get(4, []) if b != "tinygemm"]
    elif kernel == "triton":
        prefer = {b: ["triton"] + [x for x in order if x != "triton"] for b, order in prefer.items()}
    elif kernel == "sparse24":  # 2:4-sparse layers as kept codes + positions; the others as before
        prefer = {b: ["sparse24"] + [x for x in order if x != "sparse24"] for b, order in prefer.items()}
    return prefer


def load_for_serving(spec: str, device=None, dtype=None, exact: bool = False, kernel: str = "auto",
                     verify: bool = True):
    """(model, tokenizer or None, record): packed for a compact / compressed-tensors export, as stored
    otherwise."""
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    if is_packable(spec):
        model, rec = load_packed(spec, device, dtype, prefer=backends_for(kernel, device, exact), verify=verify)
        tok = None
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec)
        except Exception:  # noqa: BLE001 - an export saved without its tokenizer can still be benchmarked
            tok = None
        return model, tok, rec
    from ..models import load_model

    model, tok = load_model(spec, dtype=dtype, verify=verify)
    return model.to(device).eval(), tok, {"format": "dense", "device": str(device),
                                          "dtype": str(dtype).replace("torch.", "")}


# ---- generate ------------------------------------------------------------------------------------

def _backend(compile: bool | str) -> str:
    return "inductor" if compile is True else compile


def compile_kwargs(device, compile: bool | str) -> dict:
    """``generate`` arguments that run the steps through torch.compile over a static cache (transformers
    compiles them; on CUDA its mode replays each step as a CUDA graph)."""
    from transformers import CompileConfig

    if not compile:
        return {}
    cuda = torch.device(device).type == "cuda"
    cfg = CompileConfig(dynamic=False, backend=_backend(compile), mode="reduce-overhead" if cuda else "default")
    if not cuda:
        if not hasattr(CompileConfig, "_compile_all_devices"):
            raise PrunequantError("this transformers version compiles generate() on CUDA only; drop --compile")
        cfg._compile_all_devices = True  # transformers' switch for compiling off CUDA
    return {"cache_implementation": "static", "compile_config": cfg}


@torch.inference_mode()
def generate(model, tok, prompt: str, max_new_tokens: int, out=None, compile: bool | str = False) -> dict:
    """Greedy generation of ``prompt``, streamed to ``out`` (default: the current sys.stdout) as it is
    produced; returns the timing (``compile``: the steps through torch.compile, compiled first)."""
    from transformers import TextStreamer

    out = out if out is not None else sys.stdout

    if tok is None:
        raise ModelLoadError("this model directory has no tokenizer; export it with its tokenizer to generate text")
    device = next(model.parameters()).device
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(device)

    class Stream(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    streamer = Stream(tok, skip_prompt=True, skip_special_tokens=True)
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
              **compile_kwargs(device, compile))
    compile_s = None
    if compile:  # compile the prompt's and the decode step's graphs first, so that tokens/s is the steady rate
        from transformers import StoppingCriteria, StoppingCriteriaList

        class AfterThree(StoppingCriteria):  # the same max_new_tokens sizes the same static cache
            def __call__(self, input_ids, scores, **kwargs):
                done = input_ids.shape[1] >= ids.shape[1] + 3
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=max_new_tokens, stopping_criteria=StoppingCriteriaList([AfterThree()]),
                       **kw)
        sync(device)
        compile_s = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    gen = model.generate(ids, max_new_tokens=max_new_tokens, streamer=streamer, **kw)
    sync(device)
    dt = time.perf_counter() - t0
    n = gen.shape[1] - ids.shape[1]
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": int(n), "seconds": round(dt, 3),
            "tokens_per_s": round(n / dt, 2) if dt > 0 else None, "compile_seconds": compile_s}


# ---- bench ---------------------------------------------------------------------------------------

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.inference_mode()
def prefill_tps(model, ids, warmup: int, repeats: int) -> float:
    return ids.numel() / median_time(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), ids.device,
                                      warmup, repeats)


def compiled(model, compile: bool | str):
    """The model's forward for decode steps: as it is, or through torch.compile (``compile`` True for the
    default backend, or a backend's name), which fuses the element-wise work between the layers; the
    packed kernels stay opaque custom ops (runtime/ops.py)."""
    if not compile:
        return model
    return torch.compile(model.forward, dynamic=False, backend=_backend(compile))


def static_cache(model, prompt, new_tokens: int):
    """A StaticCache with room for the prompt and the new tokens: a compiled or captured step sees fixed shapes."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 8)


class GraphDecoder:
    """Greedy decode over a StaticCache; one step captured as a CUDA graph (every tensor it touches keeps
    its address), replayed per token; ``reset`` rewinds to just after the prompt. With ``compile`` the
    captured step is the torch.compile'd forward."""

    def __init__(self, model, prompt, new_tokens: int, compile: bool | str = False):
        self.model = model
        self.forward = compiled(model, compile)
        self.cache = static_cache(model, prompt, new_tokens)
        out = model(input_ids=prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.first = out.logits[:, -1:].argmax(-1)
        self.tok = self.first.clone()
        self.lengths = [layer.cumulative_length for layer in self.cache.layers]
        self.start = [t.clone() for t in self.lengths]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles and tunes the kernels outside the capture
            for _ in range(3 if compile else 2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _step(self):
        o = self.forward(input_ids=self.tok, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.tok.copy_(o.logits[:, -1:].argmax(-1))

    def reset(self):
        for t, s in zip(self.lengths, self.start):
            t.copy_(s)
        self.tok.copy_(self.first)

    def run(self, steps: int):
        for _ in range(steps):
            self.graph.replay()


@torch.inference_mode()
def decode_tps(model, prompt, new_tokens: int, warmup: int, repeats: int, compile: bool | str = False) -> float:
    device = prompt.device
    if device.type == "cuda":
        dec = GraphDecoder(model, prompt, new_tokens, compile)

        def once():
            dec.reset()
            dec.run(new_tokens)
        return prompt.shape[0] * new_tokens / median_time(once, device, warmup, repeats)
    if compile:
        fwd, cache = compiled(model, compile), static_cache(model, prompt, new_tokens)

        def steps():
            cache.reset()
            tok = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:]
            tok = tok.argmax(-1)
            t = time.perf_counter()
            for _ in range(new_tokens):
                out = fwd(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t
        for _ in range(max(warmup, 1)):  # the first step compiles
            steps()
        return prompt.shape[0] * new_tokens / statistics.median(steps() for _ in range(repeats))

    def eager():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t

    for _ in range(warmup):
        eager()
    return prompt.shape[0] * new_tokens / statistics.median(eager() for _ in range(repeats))


def _peak(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench(model, batches: list[int], prompt_len: int, decode: int, decode_prompt_len: int = 256,
          warmup: int = 1, repeats: int = 3, seed: int = 0, compile: bool | str = False, say=None) -> dict:
    """Prefill and decode tokens/s per batch size, weight bytes, peak memory (GPU: allocated by torch;
    CPU: the process's peak resident set); ``compile``: decode steps through torch.compile; ``say``: progress."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx and max(prompt_len, decode_prompt_len + decode) > ctx:
        raise PrunequantError(f"--prompt-len {prompt_len} / decode {decode_prompt_len}+{decode} exceed the model's "
                              f"context of {ctx} tokens")
    g = torch.Generator().manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = {"device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
           "weights_gib": round(module_bytes(model) / 2**30, 4),
           "packed_linears": sum(isinstance(m, QuantLinear) for m in model.modules()),
           "decode_compiled": bool(compile), "prefill": {}, "decode": {}}
    for b in batches:
        ids = torch.randint(0, vocab, (b, prompt_len), generator=g).to(device)
        res["prefill"][str(b)] = round(prefill_tps(model, ids, warmup, repeats), 2)
        if say:  # the first call at a shape also tunes its tiles: a long wait deserves a word
            say(f"prefill b{b} × {prompt_len}: {res['prefill'][str(b)]:,.1f} tok/s")
        prompt = torch.randint(0, vocab, (b, decode_prompt_len), generator=g).to(device)
        res["decode"][str(b)] = round(decode_tps(model, prompt, decode, warmup, repeats, compile), 2)
        if say:
            say(f"decode b{b} × {decode}: {res['decode'][str(b)]:,.1f} tok/s")
    res["peak_gib"] = round(_peak(device), 3)
    res["peak_kind"] = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    return res


def ratios(ours: dict, base: dict) -> dict:
    out = {}
    for phase in ("prefill", "decode"):
        out[phase] = {b: round(v / base[phase][b], 3) for b, v in ours[phase].items() if base[phase].get(b)}
    out["weights"] = round(ours["weights_gib"] / base["weights_gib"], 3)
    return out


def format_bench(name: str, r: dict) -> str:
    pre = ", ".join(f"b{b} {v:,.1f}" for b, v in r["prefill"].items())
    dec = ", ".join(f"b{b} {v:,.1f}" for b, v in r["decode"].items())
    return (f"{name}: prefill tok/s {pre} | decode tok/s {dec} | weights {r['weights_gib']:.3f} GiB | "
            f"peak {r['peak_gib']:.2f} GiB ({r['peak_kind']})")
