"""Run EleutherAI's lm-evaluation-harness itself on an in-memory model (optional; docs/internals.md)."""
from __future__ import annotations

from ..errors import PrunequantError

INSTALL_HINT = 'pip install lm-eval  (lm-eval >= 0.4.10: pip install "lm-eval[hf]")'


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval(model, tokenizer, tasks: list[str], num_fewshot: int = 0, limit: int | float | None = None,
                batch_size: int | str = 8, include_path: str | None = None, **simple_evaluate_kwargs) -> dict:
    """``lm_eval.simple_evaluate`` on the in-memory ``model``; the harness's full output dict."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise PrunequantError(f"the lm-eval adapter needs lm-evaluation-harness, which is not installed "
                              f"({e.name or e}): {INSTALL_HINT}; prunequant's own zero-shot tasks "
                              "(prunequant.evaluate.tasks) need no extra package") from None
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        simple_evaluate_kwargs.setdefault("task_manager", TaskManager(include_path=include_path))
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   **simple_evaluate_kwargs)


# Chance levels of common harness tasks (the harness does not report them); 1 / number of choices.
KNOWN_CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "piqa": 0.5, "boolq": 0.5,
                "openbookqa": 0.25, "sciq": 0.25, "copa": 0.5, "winogrande": 0.5, "mmlu": 0.25,
                "lambada_openai": 0.0, "lambada_standard": 0.0}


def to_task_results(output: dict, chance: dict[str, float] | None = None) -> dict[str, dict]:
    """{task: {"acc", "acc_norm", "n", "chance"}} from lm-eval's output, the shape retention() reads."""
    from ..errors import DataError

    table = {**KNOWN_CHANCE, **(chance or {})}
    out = {}
    n_samples = output.get("n-samples", {})
    for task, r in output.get("results", {}).items():
        acc = r.get("acc,none")
        if acc is None:
            continue
        n = n_samples.get(task, {})
        c = table.get(task, 0.25 if task.startswith("mmlu") else None)
        if c is None:
            raise DataError(f"chance level of lm-eval task {task!r} is unknown: pass chance={{{task!r}: 1/choices}}")
        out[task] = {"acc": acc, "acc_norm": r.get("acc_norm,none"), "n": n.get("effective", n.get("original")),
                     "chance": c, "source": "lm-evaluation-harness"}
    return out


__all__ = ["lm_eval_available", "run_lm_eval", "to_task_results"]
