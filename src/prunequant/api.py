"""Public API: ``compress`` and ``evaluate`` (the CLI is a thin layer over these)."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .version import __version__
from .data import calibration_ids, check_disjoint, load_text
from .engine import EngineReport, compress_model, default_device
from .errors import PrunequantError
from .outputs import check_output_path, output_lock, work_root
from .models import all_linear_names, bos_first, get_weight, load_model, named_linears
from .solvers import needs
from .accounting import summarize
from .recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    report: EngineReport
    record: dict = field(default_factory=dict)
    export: object = None  # a StreamingExport still open (lazily loaded models): finished by save()
    original: object = None  # SafetensorsFiles of the original blocks, when asked to keep them
    work_dir: Path | None = None  # resume checkpoints; removed by save() once the output is in place

    @property
    def rates(self) -> dict:
        return self.record["rates"]


def library_versions() -> dict:
    import transformers

    out = {"prunequant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    for pkg in ("safetensors", "compressed_tensors", "optuna", "gguf"):
        try:
            out[pkg] = getattr(__import__(pkg), "__version__", "?")
        except ImportError:
            pass
    return out


def _ids_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()


def linear_param_counts(model) -> list[tuple[str, int]]:
    return [(name, get_weight(mod).numel()) for _, name, mod in named_linears(model)]


def validate_recipe_for_model(model, recipe: Recipe, fmt: str | None = None, announce: bool = True) -> None:
    """Fail before any work when a layer cannot take its plan (N:M) or the format cannot store it."""
    from .export.ctensors import ragged_problem

    ragged: dict[tuple[int, int], list[str]] = {}
    for _, name, mod in named_linears(model):
        plan = recipe.plan_for(name)
        in_f = get_weight(mod).shape[1]
        q, p = plan.quant, plan.prune
        if q and q.group_size and in_f % q.group_size:
            ragged.setdefault((q.group_size, in_f), []).append(name)
            why = ragged_problem(name, in_f, q.group_size) if fmt == "compressed-tensors" else None
            if why:
                raise PrunequantError(why)
        if p and p.structured and in_f % p.m:
            raise PrunequantError(f"N:M pattern {p.n}:{p.m} needs {name}'s {in_f} input features to be a "
                                  f"multiple of {p.m}")
    for (g, in_f), names in (ragged.items() if announce else ()):
        last = in_f % g if g < in_f else in_f
        log.warning("group size %d does not divide the %d input features of %d layer(s) (e.g. %s): the last group "
                    "of each row has %d columns", g, in_f, len(names), names[0], last)


def smooth_activations(model, ids, alpha: float, batch_size: int) -> dict:
    """SmoothQuant migration before weight compression, folded into norms only (the saved model stays plain)."""
    from .models import norm_groups
    from .solvers.actquant import apply_activation_quant, collect_act_absmax

    names = all_linear_names(model)
    groups = norm_groups(model, set(names))
    foldable = {n for _, group in groups for n in group}
    dev = next(model.parameters()).device
    absmax = collect_act_absmax(model, sorted(foldable), (ids[i:i + batch_size].to(dev)
                                                          for i in range(0, ids.shape[0], batch_size)))
    apply_activation_quant(model, absmax, bits=16, alpha=alpha, smooth=True, groups=groups)  # 16: no hooks yet
    return {"smooth_alpha": alpha, "smoothed_linears": len(foldable)}


def enable_act_quant(model, bits: int):
    """Per-token fake quantization of every compressed linear's input (simulated W·A·)."""
    from .solvers.actquant import apply_activation_quant

    names = all_linear_names(model)
    return apply_activation_quant(model, {n: torch.ones(1) for n in names}, bits=bits, smooth=False)


def _locks_output(fn):
    """Hold the lock of ``out`` (when given) for the whole call: one writer per output directory."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("out") is None:
            return fn(*args, **kwargs)
        with output_lock(kwargs["out"]):
            return fn(*args, **kwargs)
    return wrapper


@_locks_output
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
    encoding: str | None = None,
    fmt: str | None = None,
    dtype: torch.dtype | None = None,
    save_later: bool = False,
    keep_original: bool = False,
    keep_model: bool | None = None,
) -> CompressionResult:
    """Compress a model with a recipe; optionally save to ``out`` (resume, lazy models: docs/internals.md)."""
    from .lazy import is_lazy, lazy_source, save_blocks

    if out is not None:
        check_output_path(out, overwrite)
    source = model if isinstance(model, str) else getattr(model, "name_or_path", "in-memory")
    if isinstance(model, str):
        model, tokenizer = load_model(model, lazy=out is not None)
    if tokenizer is None:
        raise PrunequantError("pass tokenizer= with an in-memory model")
    validate_recipe_for_model(model, recipe, fmt=fmt)
    lazy = is_lazy(model)
    needs_whole = act_bits or recipe.refine is not None or (allocate and recipe.allocation.method != "uniform")
    if lazy and (out is None or needs_whole):  # these read the whole model: load the blocks after all
        from .lazy import materialise

        materialise(model)
        lazy = False
    original = None
    if keep_original:
        if is_lazy(model):
            original = lazy_source(model)
        else:
            import tempfile

            where = Path(str(out) + ".prunequant-original") if out else Path(tempfile.mkdtemp(prefix="prunequant-"))
            original = save_blocks(model, where / "blocks.safetensors")
    torch.manual_seed(seed)
    calib = load_text(calib_text, "calib", encoding)
    ids = calibration_ids(tokenizer, calib, calib_samples, seq_len, seed, bos=bos_first(model))
    act_info = smooth_activations(model, ids, smooth_alpha, batch_size) if act_bits else None
    plan_recipe = recipe
    alloc_info = None
    if allocate and recipe.allocation.method != "uniform":
        from .allocate import allocate as run_allocation

        plan_recipe, alloc_info = run_allocation(model, recipe, ids, device=device, batch_size=batch_size)
    fingerprint = hashlib.sha256(json.dumps([plan_recipe.to_dict(), _ids_sha(ids), str(source), act_bits,
                                             smooth_alpha if act_bits else None],
                                            sort_keys=True, default=str).encode()).hexdigest()
    if work_dir is None and out is not None:
        work_dir = work_root(out)
    if work_dir is not None:
        work_dir = Path(work_dir) / fingerprint[:16]
    refine = recipe.refine
    teacher = _teacher(model, ids, refine, batch_size, device)
    hook = None
    if refine is not None and refine.blockwise:
        from .refine import BlockRefiner

        hook = BlockRefiner(refine, seed=seed)
    data_free = hook is None and all(needs(plan_recipe.plan_for(n)) is None for n in all_linear_names(model))
    engine_ids = None if data_free else ids  # RTN and magnitude read no activations
    stream = None
    if lazy:
        from .export.stream import StreamingExport
        from .lazy import LazyBlocks

        report = EngineReport()
        stream = StreamingExport(model, report.states, out, fmt=fmt or "dense", dtype=dtype, overwrite=overwrite)
        block_io = LazyBlocks(model, on_done=stream.add_block, keep=save_later if keep_model is None else keep_model)
        try:
            compress_model(model, engine_ids, plan_recipe.plan_for, device=device or default_device(),
                           batch_size=batch_size, true_sequential=recipe.true_sequential, work_dir=work_dir,
                           fingerprint=fingerprint, progress=progress, block_io=block_io, report=report,
                           block_hook=hook)
        except BaseException as e:
            stream.abort(e)
            raise
        report.timings["blocks_read"] = block_io.reads
        report.timings["write_blocks"] = block_io.write_seconds  # inside "offload"
    else:
        report = compress_model(model, engine_ids, plan_recipe.plan_for, device=device or default_device(),
                                batch_size=batch_size, true_sequential=recipe.true_sequential,
                                work_dir=work_dir, fingerprint=fingerprint, progress=progress, block_hook=hook)
    refine_info = _refine_global(model, ids, report, refine, teacher, hook, batch_size, device, seed)
    if act_bits:
        enable_act_quant(model, act_bits)
        act_info.update(bits=act_bits)
    n_total = sum(p.numel() for p in model.parameters())
    rates = summarize(report.layers, plan_recipe.plan_for, n_total, linear_param_counts(model))
    record = {
        "prunequant_version": __version__,
        "source_model": str(source),
        "recipe": recipe.to_dict(),
        "recipe_description": recipe.describe(),
        "allocation": alloc_info,
        "act_quant": act_info,
        "refine": refine_info,
        "calibration": {**calib.record(), "samples": calib_samples, "seq_len": seq_len, "seed": seed,
                        "token_ids_sha256": _ids_sha(ids)},
        "rates": rates,
        "layers": {n: r.to_dict() for n, r in report.layers.items()},
        "seconds": round(report.seconds, 2),
        "resumed_blocks": report.resumed_blocks,
        "timings": {k: round(v, 3) for k, v in report.timings.items()},
        "device": str(device or default_device()),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result = CompressionResult(model, tokenizer, recipe, report, record, work_dir=work_dir, export=stream,
                               original=original)
    if out is not None and not save_later:
        save(result, out, overwrite=overwrite, fmt=fmt or "dense", dtype=dtype)
    return result


def drop_original(result: CompressionResult) -> None:
    """Delete the original blocks kept on disk by ``keep_original`` (a lazy model's checkpoint stays)."""
    import shutil

    files, result.original = result.original, None
    if files is not None and getattr(files, "owned", False):
        shutil.rmtree(files.root, ignore_errors=True)


def original_model(result: CompressionResult):
    """The model before compression, streamed block by block from disk (``compress(keep_original=True)``)."""
    from .lazy import streamed_original

    if result.original is None:
        raise PrunequantError("the original was not kept: compress with keep_original=True")
    return streamed_original(result.model, result.original)


def _teacher(model, ids, refine, batch_size, device):
    """The original model's top-k next-token log-probabilities on the calibration windows (global refinement)."""
    if refine is None or not refine.global_stage:
        return None
    from .refine import teacher_topk

    t = time.time()
    out = teacher_topk(model, ids, refine.topk, batch_size, device or default_device())
    return out, time.time() - t


def _refine_global(model, ids, report, refine, teacher, hook, batch_size, device, seed) -> dict | None:
    """Run the global stage (if asked) and return what refinement did and cost, beside the one-shot time."""
    if refine is None:
        return None
    from dataclasses import asdict

    info = {"spec": asdict(refine), "seconds_blockwise": round(hook.seconds, 2) if hook else 0.0,
            "blocks": hook.log if hook else []}
    seconds = info["seconds_blockwise"]
    if teacher is not None:
        from .refine import global_refine

        lp, t_teacher = teacher
        info["global"] = global_refine(model, ids, report.states, lp, refine, batch_size=batch_size,
                                       device=device or default_device(), seed=seed)
        seconds += t_teacher + info["global"].get("seconds", 0.0)
        report.seconds += t_teacher + info["global"].get("seconds", 0.0)
    info["seconds"] = round(seconds, 2)
    info["seconds_one_shot"] = round(report.seconds - seconds, 2)
    info["time_ratio"] = round(seconds / max(report.seconds - seconds, 1e-9), 3)
    return info


def save(result: CompressionResult, out: str | Path, overwrite: bool = False, fmt: str = "dense",
         extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``result`` in a format of prunequant.export (dense, compact, compressed-tensors), atomically."""
    from .checkpoint import clear_work_dir
    from .export import export as export_fn

    out = Path(out)
    rec = {**result.record, **(extra or {}), "format": fmt}
    if result.export is not None:  # written block by block during compression: add the rest and close it
        stream, result.export = result.export, None
        with output_lock(out):
            stream.finish(result.tokenizer, {"prunequant.json": json.dumps(rec, indent=2, default=str)})
    else:
        check_output_path(out, overwrite)
        dtype = dtype or next(result.model.parameters()).dtype
        with output_lock(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            export_fn(result.model.to("cpu"), result.report.states, out, fmt=fmt, dtype=dtype, overwrite=overwrite,
                      tokenizer=result.tokenizer,
                      extra_files={"prunequant.json": json.dumps(rec, indent=2, default=str)})
    if result.work_dir is not None:
        clear_work_dir(result.work_dir)
    return out


def evaluate(model, tokenizer=None, *, texts=("wiki",), seq_len: int = 512, max_tokens: int | None = 20_000,
             batch_size: int = 8, device=None, progress: bool = True, calib_text: str | None = None) -> dict:
    """Perplexity on each evaluation text (the 'eval' split of embedded corpora), through evaluate.suite."""
    from .evaluate.suite import SuiteConfig, run_suite

    if isinstance(model, str):
        model, tokenizer = load_model(model)
    if device is not None:
        model.to(device)
    elif torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    if calib_text is not None and calib_text in texts:
        check_disjoint(load_text(calib_text, "calib"), load_text(calib_text, "eval"))
    cfg = SuiteConfig(texts=tuple(texts), seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                      agree_tokens=0)
    return run_suite(model, tokenizer, cfg, progress=progress).metrics
