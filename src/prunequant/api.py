"""Public API: ``compress`` and ``evaluate`` (the CLI is a thin layer over these)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .data import calibration_ids, check_disjoint, load_text, tokenize
from .engine import EngineReport, compress_model, default_device
from .errors import PrunequantError
from .evaluate.perplexity import perplexity
from .models import (all_linear_names, arch_of, block_linears, bos_first, get_blocks, get_weight, load_model,
                     set_weight)
from .solvers import needs, solve_layer
from .rates import summarize
from .recipe import Recipe


@dataclass
class CompressionResult:
    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    report: EngineReport
    record: dict = field(default_factory=dict)
    export: object = None  # a StreamingExport still open (lazily loaded models): finished by save()
    original: object = None  # SafetensorsFiles of the original blocks, when asked to keep them

    @property
    def rates(self) -> dict:
        return self.record["rates"]


def library_versions() -> dict:
    import transformers

    out = {"prunequant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    for pkg in ("safetensors", "compressed_tensors", "optuna", "gguf"):
        try:
            mod = __import__(pkg)
            out[pkg] = getattr(mod, "__version__", "?")
        except ImportError:
            pass
    return out


def _ids_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()


def check_output_dir(out: str | Path | None, overwrite: bool) -> None:
    if out is None:
        return
    out = Path(out)
    if out.exists() and not overwrite:
        raise PrunequantError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    if out.parent.exists() and not out.parent.is_dir():
        raise PrunequantError(f"{out.parent} is not a directory; choose another --out")


def linear_param_counts(model) -> list[tuple[str, int]]:
    arch = arch_of(model)
    out = []
    for i, block in enumerate(get_blocks(model, arch)):
        for rel, mod in block_linears(block, arch).items():
            out.append((f"{arch.blocks}.{i}.{rel}", get_weight(mod).numel()))
    return out


def validate_recipe_for_model(model, recipe: Recipe) -> None:
    """Fail before any work when a layer's shape cannot take its plan (group size, N:M)."""
    arch = arch_of(model)
    for i, block in enumerate(get_blocks(model, arch)):
        for rel, mod in block_linears(block, arch).items():
            name = f"{arch.blocks}.{i}.{rel}"
            plan = recipe.plan_for(name)
            in_f = get_weight(mod).shape[1]
            q, p = plan.quant, plan.prune
            if q and q.group_size and in_f % q.group_size and not (q.ragged and q.group_size < in_f):
                raise PrunequantError(
                    f"group size {q.group_size} does not divide {name}'s {in_f} input features; use a divisor "
                    f"(e.g. g{_divisor(in_f)}), per-channel (pc), or add ':ragged' to let the last group of "
                    "each row be smaller (as GPTQ and compressed-tensors do)")
            if p and p.structured and in_f % p.m:
                raise PrunequantError(f"N:M pattern {p.n}:{p.m} needs {name}'s {in_f} input features to be a "
                                      f"multiple of {p.m}")


def smooth_activations(model, ids, alpha: float, batch_size: int) -> dict:
    """SmoothQuant migration before weight compression, folded into norms only (so the saved model is a
    plain checkpoint); the weight solvers then see the smoothed weights and inputs."""
    from .solvers.actquant import _norm_groups, apply_activation_quant, collect_act_absmax

    names = all_linear_names(model)
    foldable = {n for _, group in _norm_groups(model, set(names)) for n in group}
    dev = next(model.parameters()).device
    absmax = collect_act_absmax(model, sorted(foldable), (ids[i:i + batch_size].to(dev)
                                                          for i in range(0, ids.shape[0], batch_size)))
    apply_activation_quant(model, absmax, bits=16, alpha=alpha, smooth=True)  # bits=16: no quant hooks yet
    return {"smooth_alpha": alpha, "smoothed_linears": len(foldable)}


def enable_act_quant(model, bits: int):
    """Per-token fake quantization of every compressed linear's input (simulated W·A·)."""
    from .solvers.actquant import apply_activation_quant

    names = all_linear_names(model)
    return apply_activation_quant(model, {n: torch.ones(1) for n in names}, bits=bits, smooth=False)


def compress_data_free(model, plan_for, device=None, progress=True) -> EngineReport:
    """RTN and magnitude use no calibration data: solve every layer directly (same result as the engine)."""
    from tqdm.auto import tqdm

    from .engine import _cpu_quant, _summary
    from .solvers.base import LayerResult, LayerStats

    t0 = time.time()
    device = torch.device(device) if device else default_device()
    report = EngineReport()
    empty = LayerStats(hessian=None, sq_norm=None, n_tokens=0)
    for name in tqdm(all_linear_names(model), desc="compress (data-free)", disable=not progress):
        plan = plan_for(name)
        if plan.is_identity:
            continue
        module = model.get_submodule(name)
        w = get_weight(module).detach().to(device, torch.float32).clone(memory_format=torch.contiguous_format)
        t = time.time()
        res = solve_layer(w, empty, plan)
        set_weight(module, res.weight)
        report.layers[name] = _summary(name, w, plan, res, time.time() - t)
        report.states[name] = LayerResult(weight=None, mask=None if res.mask is None else res.mask.cpu(),
                                          quant=_cpu_quant(res.quant), info=res.info)
    report.seconds = time.time() - t0
    return report


def _divisor(n: int) -> int:
    for g in (128, 64, 32, 16, 8):
        if n % g == 0:
            return g
    return 0


def compress(
    model,
    recipe: Recipe,
    *,
    tokenizer=None,
    calib_text: str = "wiki",
    calib_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    device=None,
    batch_size: int = 8,
    out: str | Path | None = None,
    overwrite: bool = False,
    work_dir: str | Path | None = None,
    progress: bool = True,
    allocate: bool = True,
    act_bits: int | None = None,
    smooth_alpha: float = 0.5,
    fmt: str = "dense",
    dtype: torch.dtype | None = None,
    save_later: bool = False,
    keep_original: bool = False,
) -> CompressionResult:
    """Compress a model (object or anything ``load_model`` takes) with a recipe; optionally save to ``out``.

    A lazily loaded model (``load_model(..., lazy=True)``) is compressed block by block from its files and
    needs ``out``: each block is written (``fmt``, ``dtype``) as soon as it is done and then dropped.
    ``save_later`` leaves the output open until ``save(result, out, extra=...)`` (e.g. after an
    evaluation; a lazy model then keeps its compressed blocks in host memory). ``keep_original`` keeps
    the original blocks on disk (``result.original``; the checkpoint itself for a lazy model) so that
    ``original_model(result)`` can stream them back for comparisons without a second copy in memory.
    """
    from .lazy import is_lazy, lazy_source, save_blocks

    check_output_dir(out, overwrite)
    source = model if isinstance(model, str) else getattr(model, "name_or_path", "in-memory")
    if isinstance(model, str):
        model, tokenizer = load_model(model, lazy=out is not None)
    if tokenizer is None:
        raise PrunequantError("pass tokenizer= with an in-memory model")
    validate_recipe_for_model(model, recipe)
    lazy = is_lazy(model)
    needs_whole = act_bits or (allocate and recipe.allocation.get("method", "uniform") != "uniform")
    if lazy and (out is None or needs_whole):  # these read the whole model: load the blocks after all
        from .lazy import materialise

        materialise(model)
        lazy = False
    if work_dir is None and out is not None:
        work_dir = Path(str(out) + ".prunequant-work")
    original = None
    if keep_original:
        if is_lazy(model):
            original = lazy_source(model)
        else:
            import tempfile

            where = Path(str(work_dir) + "-original") if work_dir else Path(tempfile.mkdtemp(prefix="prunequant-"))
            original = save_blocks(model, where / "blocks.safetensors")
    torch.manual_seed(seed)
    calib = load_text(calib_text, "calib")
    ids = calibration_ids(tokenizer, calib, calib_samples, seq_len, seed, bos=bos_first(model))
    act_info = smooth_activations(model, ids, smooth_alpha, batch_size) if act_bits else None
    plan_recipe = recipe
    alloc_info = None
    if allocate and recipe.allocation.get("method", "uniform") != "uniform":
        from .allocate import allocate as run_allocation

        plan_recipe, alloc_info = run_allocation(model, recipe, ids, device=device, batch_size=batch_size)
    fingerprint = hashlib.sha256(json.dumps([plan_recipe.to_dict(), _ids_sha(ids), str(source)],
                                            sort_keys=True, default=str).encode()).hexdigest()
    stream = None
    if lazy:
        from .export.stream import StreamingExport
        from .lazy import LazyBlocks

        report = EngineReport()
        stream = StreamingExport(model, report.states, out, fmt=fmt, dtype=dtype, overwrite=overwrite)
        block_io = LazyBlocks(model, on_done=stream.add_block, keep=save_later)
        try:
            compress_model(model, ids, plan_recipe.plan_for, device=device or default_device(),
                           batch_size=batch_size, true_sequential=recipe.true_sequential, work_dir=work_dir,
                           fingerprint=fingerprint, progress=progress, block_io=block_io, report=report)
        except BaseException as e:
            stream.abort(e)
            raise
        report.timings["blocks_read"] = block_io.reads
        report.timings["write_blocks"] = block_io.write_seconds  # inside "offload"
    elif all(needs(plan_recipe.plan_for(n)) is None for n in all_linear_names(model)):
        report = compress_data_free(model, plan_recipe.plan_for, device=device, progress=progress)
    else:
        report = compress_model(model, ids, plan_recipe.plan_for, device=device or default_device(),
                                batch_size=batch_size, true_sequential=recipe.true_sequential,
                                work_dir=work_dir, fingerprint=fingerprint, progress=progress)
    if act_bits:
        enable_act_quant(model, act_bits)
        act_info.update(bits=act_bits)
    n_total = sum(p.numel() for p in model.parameters())
    rates = summarize(report.layers, n_total, linear_param_counts(model))
    record = {
        "prunequant_version": __version__,
        "source_model": str(source),
        "recipe": recipe.to_dict(),
        "recipe_description": recipe.describe(),
        "allocation": alloc_info,
        "act_quant": act_info,
        "calibration": {**calib.record(), "samples": calib_samples, "seq_len": seq_len, "seed": seed,
                        "token_ids_sha256": _ids_sha(ids)},
        "rates": rates,
        "layers": report.layers,
        "seconds": round(report.seconds, 2),
        "resumed_blocks": report.resumed_blocks,
        "timings": {k: round(v, 3) for k, v in report.timings.items()},
        "device": str(device or default_device()),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result = CompressionResult(model, tokenizer, recipe, report, record, export=stream, original=original)
    if out is not None and not save_later:
        save(result, out, overwrite=overwrite, fmt=fmt, dtype=dtype)
    return result


def drop_original(result: CompressionResult) -> None:
    """Delete the original blocks kept on disk by ``keep_original`` (a lazy model's checkpoint stays)."""
    files, result.original = result.original, None
    if files is not None and getattr(files, "owned", False):
        shutil.rmtree(files.root, ignore_errors=True)


def original_model(result: CompressionResult):
    """The model before compression, sharing everything outside the blocks with ``result.model`` and
    reading each block from disk as it runs (needs ``compress(..., keep_original=True)``)."""
    from .lazy import streamed_original

    if result.original is None:
        raise PrunequantError("the original was not kept: compress with keep_original=True")
    return streamed_original(result.model, result.original)


def save(result: CompressionResult, out: str | Path, overwrite: bool = False, fmt: str = "dense",
         extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``result`` in a format of prunequant.export (dense, compact, compressed-tensors).

    Every format is written to a temporary sibling, gets a SHA-256 manifest, and is renamed into place
    when complete; prunequant.json (recipe, seeds, hashes, versions, results) goes in with it. Dense keeps
    the model's own dtype by default, so reloading gives back exactly the evaluated weights.
    """
    from .export import export as export_fn

    out = Path(out)
    rec = {**result.record, **(extra or {}), "format": fmt}
    if result.export is not None:  # written block by block during compression: add the rest and close it
        stream, result.export = result.export, None
        stream.finish(result.tokenizer, {"prunequant.json": json.dumps(rec, indent=2, default=str)})
        return out
    check_output_dir(out, overwrite)
    dtype = dtype or next(result.model.parameters()).dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    export_fn(result.model.to("cpu"), result.report.states, out, fmt=fmt, dtype=dtype, overwrite=overwrite,
              tokenizer=result.tokenizer,
              extra_files={"prunequant.json": json.dumps(rec, indent=2, default=str)})
    return out


def evaluate(model, tokenizer=None, *, texts=("wiki",), seq_len: int = 512, max_tokens: int | None = 20_000,
             batch_size: int = 8, device=None, progress: bool = True, calib_text: str | None = None) -> dict:
    """Perplexity on each evaluation text (the 'eval' split of embedded corpora)."""
    if isinstance(model, str):
        model, tokenizer = load_model(model)
    if device is not None:
        model.to(device)
    elif torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    out = {}
    for name in texts:
        text = load_text(name, "eval")
        if calib_text is not None and calib_text == name:
            check_disjoint(load_text(calib_text, "calib"), text)
        ids = tokenize(tokenizer, text, max_tokens)
        out[name] = perplexity(model, ids, seq_len, batch_size=batch_size, progress=progress,
                               text_sha256=text.sha256)
        out[name]["text"] = text.name
    return {"texts": out}
