"""`prunequant search`: the command-line face of ``prunequant.search.search``."""
from __future__ import annotations

import json


def add_search_parser(subparsers):
    p = subparsers.add_parser("search", help="search the configuration that keeps the most meaning for a budget")
    p.add_argument("model", help="hub id, local directory, .gguf file, or 'smollm2-135m'")
    p.add_argument("--budget", default="tcr=0.875",
                   help="tcr=X (theoretical compression rate >= X) or size=40MB (compact export bytes <= size)")
    p.add_argument("--n-trials", type=int, default=20, help="completed trials the study should hold (re-run to continue)")
    p.add_argument("--storage", default=None, help="optuna storage URL (default: sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default=None, help="default: MODEL-BUDGET")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="parallel trials with Ray (pip install 'prunequant[dist]')")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"])
    p.add_argument("--proxy-samples", type=int, default=16, help="sequences for the KL proxy")
    p.add_argument("--proxy-seq-len", type=int, default=256)
    p.add_argument("--full-eval-top-k", type=int, default=3, help="trials (best by proxy) to evaluate fully")
    p.add_argument("--calib-text", default="wiki")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length")
    p.add_argument("--text", "--eval-text", dest="texts", default="wiki",
                   help="comma-separated evaluation texts (the first also gives the proxy sequences)")
    p.add_argument("--max-tokens", type=int, default=20_000, help="perplexity on the first N tokens of each text")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--space", default=None, help="JSON/YAML file narrowing the search space (SearchSpace fields)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="directory for best_recipe.yaml, trials.json, pareto.png")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="do not start a new study from the standard recipes at the budget")
    p.add_argument("--json", default=None, help="also write the best trial and the front here")
    return p


def _load_space(path):
    if path is None:
        return None
    from pathlib import Path

    from ..errors import PrunequantError

    p = Path(path)
    if not p.is_file():
        raise PrunequantError(f"search-space file {p} not found")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(p.read_text()) or {}
    return json.loads(p.read_text())


def cmd_search(a) -> int:
    from . import search

    res = search(a.model, a.budget, a.n_trials, storage=a.storage, study_name=a.study_name, seed=a.seed,
                 workers=a.workers, ray_address=a.ray_address, proxy_samples=a.proxy_samples,
                 proxy_seq_len=a.proxy_seq_len, full_eval_top_k=a.full_eval_top_k, calib_text=a.calib_text,
                 calib_samples=a.calib_samples, seq_len=a.seq_len, eval_texts=[t for t in a.texts.split(",") if t],
                 eval_seq_len=a.eval_seq_len, eval_max_tokens=a.max_tokens, space=_load_space(a.space),
                 sampler=a.sampler, out=a.out, device=a.device, batch_size=a.batch_size,
                 warm_start=a.warm_start)
    if a.json:
        from pathlib import Path

        Path(a.json).write_text(json.dumps({"best": res.best, "front": res.front,
                                            "paths": {k: str(v) for k, v in res.paths.items()},
                                            "seconds": round(res.seconds, 1)}, indent=2, default=str))
    return 0 if res.best is not None else 1
