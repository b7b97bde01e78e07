"""Generative suites scored by exact match: MMLU-Pro, BIG-Bench Hard (BBH) and MATH (docs/evaluation.md)."""
from __future__ import annotations

import functools
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..models import max_length
from . import answers

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_SEED = 0

BBH_SUBTASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting")
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
MMLU_PRO_CATEGORIES = ("biology", "business", "chemistry", "computer_science", "economics", "engineering",
                       "health", "history", "law", "math", "other", "philosophy", "physics", "psychology")


@dataclass
class Item:
    """One question. ``answer``: the gold option letter (MMLU-Pro), target string (BBH) or final answer (MATH)."""

    question: str
    answer: str
    subtask: str
    choices: list[str] | None = None
    rationale: str | None = None


# --- the suites: prompt wording, answer extraction, scoring -----------------------------------------------

class Suite:
    name = ""
    default_shots = 0
    stop: tuple[str, ...] = ()
    subtasks: tuple[str, ...] = ()

    def header(self, subtask: str) -> str:
        raise NotImplementedError

    def ask(self, item: Item) -> str:
        """The question block, up to where the answer starts."""
        raise NotImplementedError

    def reply(self, item: Item, cot: bool) -> str:
        """An exemplar's answer (follows ``ask``)."""
        raise NotImplementedError

    def trigger(self, cot: bool) -> str:
        """Appended after the scored question's ``ask``."""
        return " Let's think step by step." if cot else ""

    def extract(self, text: str, item: Item) -> str | None:
        raise NotImplementedError

    def correct(self, pred: str | None, item: Item) -> bool:
        raise NotImplementedError

    def chance(self, item: Item) -> float:
        return 0.0

    def check(self, item: Item) -> None:
        """Raise ValueError on an item this suite cannot score."""
        if not item.question.strip() or not item.answer.strip():
            raise ValueError("empty question or answer")


def _strip_cot_prefix(text: str) -> str:
    return re.sub(r"^\s*(?:A|Answer)\s*:\s*", "", text.strip())


class MMLUPro(Suite):
    name, default_shots, stop, subtasks = "mmlu_pro", 5, ("\nQuestion:",), MMLU_PRO_CATEGORIES

    def header(self, subtask):
        topic = subtask.replace("_", " ")
        return (f"Here are multiple-choice questions on {topic}. For each one, reason it out step by step and "
                f"close with \"The answer is (X)\", X being the letter of the correct option.\n\n")

    def ask(self, item):
        opts = "".join(f"({answers.LETTERS[j]}) {c}\n" for j, c in enumerate(item.choices or []))
        return f"Question: {item.question.strip()}\nOptions:\n{opts}Answer:"

    def reply(self, item, cot):
        final = f"The answer is ({item.answer})."
        if not cot or not item.rationale:
            return " " + final
        body = _strip_cot_prefix(item.rationale)
        if not body.lower().startswith("let's think step by step"):
            body = "Let's think step by step. " + body
        if answers.extract_choice_letter(body, len(item.choices or [])) != item.answer:
            body = body.rstrip() + " " + final
        return " " + body

    def extract(self, text, item):
        return answers.extract_choice_letter(text, len(item.choices or []))

    def correct(self, pred, item):
        return pred is not None and pred == item.answer

    def chance(self, item):
        return 1.0 / len(item.choices or [1])

    def check(self, item):
        super().check(item)
        n = len(item.choices or [])
        if not 2 <= n <= 10:
            raise ValueError(f"{n} choices; MMLU-Pro items have 2 to 10")
        if item.answer not in answers.LETTERS[:n]:
            raise ValueError(f"answer {item.answer!r} is not one of the letters A-{answers.LETTERS[n - 1]}")


class BBH(Suite):
    name, default_shots, stop, subtasks = "bbh", 3, ("\nQ:", "\n\n"), BBH_SUBTASKS

    def header(self, subtask):
        return (f"BIG-Bench Hard, {subtask.replace('_', ' ')}. Each answer ends with \"the answer is\" and "
                f"then the final answer alone.\n\n")

    def ask(self, item):
        return f"Q: {item.question.strip()}\nA:"

    def reply(self, item, cot):
        if cot and item.rationale:
            return f" {_strip_cot_prefix(item.rationale).rstrip()} So the answer is {item.answer.strip()}."
        return f" The answer is {item.answer.strip()}."

    def extract(self, text, item):
        return answers.extract_final_answer(text)

    def correct(self, pred, item):
        return answers.bbh_match(pred, item.answer, item.question)

    def chance(self, item):
        return answers.bbh_chance(item.answer, item.question)


class Math(Suite):
    name, default_shots, stop, subtasks = "math", 4, ("\nProblem:",), MATH_SUBJECTS

    def header(self, subtask):
        return "Solve each problem, showing the work, and give the final answer in \\boxed{}.\n\n"

    def ask(self, item):
        return f"Problem:\n{item.question.strip()}\n\nSolution:"

    def reply(self, item, cot):
        final = f"The final answer is $\\boxed{{{item.answer}}}$."
        if not cot or not item.rationale:
            return " " + final
        body = item.rationale.strip()
        return " " + (body if answers.last_boxed(body) is not None else f"{body} {final}")

    def trigger(self, cot):
        return ""

    def extract(self, text, item):
        return answers.extract_math_answer(text)

    def correct(self, pred, item):
        return answers.math_equal(pred, item.answer)


class Math500(Math):
    name = "math500"


SUITES: dict[str, Suite] = {s.name: s for s in (MMLUPro(), BBH(), Math(), Math500())}


# --- task names ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenTask:
    name: str
    suite: Suite
    subtasks: tuple[str, ...] | None = None  # None: all
    path: str | None = None  # a local file instead of the hub

    @property
    def source(self) -> str:
        return self.path and f"local file {self.path}" or _HUB_SOURCE[self.suite.name]


_HUB_SOURCE = {
    "mmlu_pro": "TIGER-Lab/MMLU-Pro test (Wang et al. 2024), exemplars from its validation split",
    "bbh": "lukaemon/bbh test (BIG-Bench Hard; Suzgun et al. 2022), exemplars the first k items of each subtask",
    "math": "EleutherAI/hendrycks_math test (MATH; Hendrycks et al. 2021), exemplars from its train split",
    "math500": "HuggingFaceH4/MATH-500 (Lightman et al. 2023), exemplars the first k items of each subject",
}


def is_generative(name: str) -> bool:
    return name.split(":", 1)[0] in SUITES


def _slug(s: str) -> str:
    return re.sub(r"\W+", "_", str(s).replace("&", " and ").strip().lower()).strip("_") or "default"


def get_gen_task(name: str) -> GenTask:
    """A generative task by name (see the module docstring); fails on a bad name before any data is read."""
    base, _, rest = name.partition(":")
    if base not in SUITES:
        raise DataError(f"unknown generative task {name!r}; choose from {', '.join(SUITES)}")
    suite = SUITES[base]
    if rest.startswith("file:"):
        path = rest[5:]
        if not path:
            raise DataError(f"{name!r} names no file; use {base}:file:PATH.jsonl")
        return GenTask(name, suite, path=path)
    if not rest:
        return GenTask(name, suite)
    subs = tuple(_slug(s) for s in re.split(r"[+,]", rest) if s.strip())
    if not subs:
        raise DataError(f"{name!r} names no subtasks; e.g. {base}:{(suite.subtasks or ('algebra',))[0]}")
    known = suite.subtasks
    if known:
        unknown = [s for s in subs if s not in known]
        if unknown:
            raise DataError(f"unknown {base} subtask(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return GenTask(name, suite, subtasks=subs)


# --- data -----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _hub_rows(task_name: str, suite_name: str, repo: str, config: str | None, split: str) -> tuple[dict, ...]:
    hint = (f"offline, give a local file instead: --tasks {suite_name}:file:PATH.jsonl "
            "(schema: prunequant.evaluate.generative)")
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"task {task_name} reads {repo} from the Hugging Face hub, which needs the `datasets` package "
                        f"and a network (pip install datasets); {hint}") from None
    try:
        ds = load_dataset(repo, config, split=split) if config else load_dataset(repo, split=split)
        return tuple(dict(r) for r in ds)
    except Exception as e:  # noqa: BLE001 - offline, missing repo, bad config: one clear message
        where = f"{repo}" + (f" ({config})" if config else "") + f", split {split}"
        raise DataError(f"task {task_name}: cannot load {where} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); {hint}") from None


def _first(row: dict, keys: tuple[str, ...]):
    for k in keys:
        if row.get(k) is not None:
            return row[k]
    return None


def item_from_row(row: dict, suite: Suite, default_subtask: str) -> Item:
    """An Item from a row in the local-file schema (hub field names accepted as aliases)."""
    if not isinstance(row, dict):
        raise ValueError("a line must be a JSON object")
    q = _first(row, ("question", "input", "problem"))
    if not isinstance(q, str):
        raise ValueError('need "question" (or "input"/"problem"): a string')
    sub = _first(row, ("subtask", "category", "subject", "type"))
    rationale = _first(row, ("rationale", "cot_content", "solution", "cot"))
    if rationale is not None and not isinstance(rationale, str):
        raise ValueError('"rationale" must be a string')
    choices = None
    ans = _first(row, ("answer", "target"))
    if isinstance(suite, MMLUPro):
        choices = _first(row, ("choices", "options"))
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError('need "choices" (or "options"): a list of strings')
        choices = [c for c in choices if c.strip() != "N/A"]
        if ans is None or isinstance(ans, int):
            idx = ans if ans is not None else _first(row, ("answer_index", "label"))
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(choices):
                raise ValueError('need "answer": a letter, or "answer_index": an index into "choices"')
            ans = answers.LETTERS[idx]
        ans = str(ans).strip().strip("()").upper()
    elif isinstance(suite, Math):
        if ans is None and isinstance(rationale, str):
            ans = answers.last_boxed(rationale)
        if ans is None:
            raise ValueError('need "answer", or a "solution" with a \\boxed{} answer')
    if isinstance(ans, (int, float)):  # bool too
        ans = str(ans)
    if not isinstance(ans, str):
        raise ValueError('need "answer" (or "target"): a string')
    item = Item(q, ans, _slug(sub) if sub is not None else default_subtask, choices, rationale)
    suite.check(item)
    return item


def _is_exemplar(row: dict) -> bool:
    return bool(row.get("fewshot")) or str(row.get("split", "")).lower() in ("dev", "validation", "train", "fewshot")


def _group(items: list[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {}
    for it in items:
        out.setdefault(it.subtask, []).append(it)
    return out


def load_file(task: GenTask) -> tuple[dict[str, list[Item]], dict[str, list[Item]]]:
    """(scored items per subtask, exemplar items per subtask) from a local JSONL file."""
    path = Path(task.path)
    if not path.is_file():
        raise DataError(f"task file {path} not found (task {task.name})")
    scored, shots = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item = item_from_row(row, task.suite, task.suite.name)
            except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
                raise DataError(f"{path}:{line_no}: malformed {task.suite.name} row ({type(e).__name__}: {e}); "
                                "see prunequant.evaluate.generative for the schema") from None
            (shots if _is_exemplar(row) else scored).append(item)
    if not scored:
        raise DataError(f"task file {path} has no items to score")
    return _group(scored), _group(shots)


def load_hub(task: GenTask, k: int) -> tuple[dict[str, list[Item]], dict[str, list[Item]]]:
    s, name = task.suite, task.name

    def items(rows, sub=None):
        out = []
        for i, r in enumerate(rows):
            try:
                it = item_from_row(r, s, sub or s.name)
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"task {name}: hub row {i} is malformed ({e})") from None
            if sub:  # the config's name, not the row's own label ("Counting & Probability")
                it.subtask = sub
            out.append(it)
        return out

    if s.name == "mmlu_pro":
        scored = _group(items(_hub_rows(name, s.name, "TIGER-Lab/MMLU-Pro", None, "test")))
        shots = _group(items(_hub_rows(name, s.name, "TIGER-Lab/MMLU-Pro", None, "validation")))
    elif s.name == "bbh":
        scored = {sub: items(_hub_rows(name, s.name, "lukaemon/bbh", sub, "test"), sub)
                  for sub in task.subtasks or BBH_SUBTASKS}
        shots = {}
    elif s.name == "math":
        scored, shots = {}, {}
        for sub in task.subtasks or MATH_SUBJECTS:
            scored[sub] = items(_hub_rows(name, s.name, "EleutherAI/hendrycks_math", sub, "test"), sub)
            train = items(_hub_rows(name, s.name, "EleutherAI/hendrycks_math", sub, "train"), sub)
            shots[sub] = [it for it in train if it.rationale and answers.last_boxed(it.rationale) is not None
                          and len(it.rationale) <= 1000][:max(k, 0)]
    else:  # math500
        scored = _group(items(_hub_rows(name, s.name, "HuggingFaceH4/MATH-500", None, "test")))
        shots = {}
    if task.subtasks:
        scored = {sub: v for sub, v in scored.items() if sub in task.subtasks}
        if not scored:
            raise DataError(f"task {name}: none of the subtasks {', '.join(task.subtasks)} is in the data")
    return scored, shots


def select(scored: dict[str, list[Item]], shots: dict[str, list[Item]], k: int, limit: int | None,
           seed: int | None) -> dict[str, tuple[list[Item], list[Item]]]:
    """{subtask: (exemplars, scored items)}: scored items shuffled with ``seed`` and cut to ``limit``."""
    out = {}
    for sub, pool in scored.items():
        dev = shots.get(sub) or []
        if dev or k == 0:
            ex, rest = dev[:k], list(pool)
        else:
            ex, rest = pool[:k], pool[k:]
        if seed is not None:
            random.Random(f"{seed}|{sub}").shuffle(rest)
        if limit is not None:
            rest = rest[:limit]
        if not rest:
            log.warning("subtask %s has no items left to score after %d exemplars; skipped", sub, len(ex))
            continue
        out[sub] = (ex, rest)
    return out


# --- prompts ----------------------------------------------------------------------------------------------------

def build_prompt(suite: Suite, exemplars: list[Item], item: Item, cot: bool) -> str:
    """Header, the exemplars with their answers, then the question and the answer's opening."""
    parts = [suite.header(item.subtask)]
    parts += [suite.ask(ex) + suite.reply(ex, cot) + "\n\n" for ex in exemplars]
    parts.append(suite.ask(item) + suite.trigger(cot))
    return "".join(parts)


# --- generation -------------------------------------------------------------------------------------------------

def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(t) for t in src if t is not None)
    return sorted(ids)


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        j = text.find(s)
        if j >= 0:
            cut = min(cut, j)
    return text[:cut]


def _stop_on_text(tokenizer, stop, prompt_width: int):
    """Stop a row once its generated text holds a stop string (decoding only each row's last tokens)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    tail = max(map(len, stop), default=0) + 2

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [any(s in tokenizer.decode(row[-tail:], skip_special_tokens=True) for s in stop)
                    for row in input_ids[:, prompt_width:].tolist()]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnText()] if stop else [])


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    stop: tuple[str, ...] | list[str] = (), batch_size: int = 16, progress: bool = True,
                    desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts``, cut at EOS and the first stop string, in left-padded batches."""
    if not prompts:
        return []
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    room = max(max_length(model) - max_new_tokens, 1)
    enc = []
    for p in prompts:
        ids = tokenizer(p)["input_ids"]
        if not ids:
            raise DataError("a prompt tokenizes to nothing")
        enc.append(ids[-room:])
    # explicit values, so a model's own generation defaults (repetition penalty etc.) cannot change greedy search
    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                           repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=pad,
                           eos_token_id=eos or None, use_cache=True)
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]), reverse=True)
    out: list[str | None] = [None] * len(prompts)
    batches = [order[b: b + batch_size] for b in range(0, len(order), batch_size)]
    for chunk in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        width = max(len(enc[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
            mask[r, width - len(enc[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                             stopping_criteria=_stop_on_text(tokenizer, tuple(stop), width))
        for r, i in enumerate(chunk):
            row = gen[r, width:].tolist()
            end = next((j for j, t in enumerate(row) if t in eos), len(row))
            out[i] = cut_at_stop(tokenizer.decode(row[:end], skip_special_tokens=True), stop)
    return out  # type: ignore[return-value]


# --- scoring ----------------------------------------------------------------------------------------------------

def score(suite: Suite, items: list[Item], generations: list[str]) -> tuple[dict, list[dict]]:
    """Exact match overall and per subtask, with chance levels; and one record per item."""
    per: dict[str, list] = {}
    records = []
    for it, text in zip(items, generations):
        pred = suite.extract(text, it)
        ok = suite.correct(pred, it)
        per.setdefault(it.subtask, []).append((ok, suite.chance(it), pred is None))
        records.append({"subtask": it.subtask, "question": it.question, "gold": it.answer, "extracted": pred,
                        "correct": ok, "generation": text})
    n = len(items)
    flat = [r for rs in per.values() for r in rs]
    res = {"exact_match": sum(r[0] for r in flat) / n, "n": n, "chance": sum(r[1] for r in flat) / n,
           "no_answer": sum(r[2] for r in flat) / n,
           "subtasks": {s: {"exact_match": sum(r[0] for r in rs) / len(rs), "n": len(rs),
                            "chance": sum(r[1] for r in rs) / len(rs)} for s, rs in per.items()}}
    return res, records


def run_gen_task(model, tokenizer, task: GenTask | str, limit: int | None = None, fewshot: int | None = None,
                 max_new_tokens: int | None = None, seed: int | None = DEFAULT_SEED, batch_size: int = 16,
                 cot: bool | str = "auto", progress: bool = True, return_samples: bool = False) -> dict:
    """Evaluate one generative task (docs/evaluation.md)."""
    t0 = time.time()
    task = get_gen_task(task) if isinstance(task, str) else task
    suite = task.suite
    k = suite.default_shots if fewshot is None else int(fewshot)
    if k < 0:
        raise DataError(f"fewshot {k} must be >= 0")
    if limit is not None and limit < 1:
        raise DataError(f"limit {limit} must be a positive number of items per subtask (or None for all)")
    m = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else int(max_new_tokens)
    if m < 1:
        raise DataError(f"max_new_tokens {m} must be >= 1")
    scored, shots = load_file(task) if task.path else load_hub(task, k)
    chosen = select(scored, shots, k, limit, seed)
    if not chosen:
        raise DataError(f"task {task.name} has no items to score")
    used = [ex for exs, _ in chosen.values() for ex in exs]
    use_cot = all(ex.rationale for ex in used) if cot == "auto" else bool(cot)
    room = max_length(model) - m
    prompts, items, shortened = [], [], 0
    for sub, (exs, rest) in chosen.items():
        for it in rest:
            n_ex = len(exs)
            prompt = build_prompt(suite, exs, it, use_cot)
            while n_ex and len(tokenizer(prompt)["input_ids"]) > room:
                n_ex -= 1
                prompt = build_prompt(suite, exs[:n_ex], it, use_cot)
            shortened += n_ex < len(exs)
            prompts.append(prompt)
            items.append(it)
    was_training = model.training
    model.eval()
    try:
        gens = generate_greedy(model, tokenizer, prompts, m, suite.stop, batch_size, progress, desc=task.name)
    finally:
        model.train(was_training)
    res, records = score(suite, items, gens)
    res["acc"], res["acc_norm"] = res["exact_match"], None
    res.update(fewshot=k, cot=use_cot, max_new_tokens=m, seed=seed, limit=limit, prompts_shortened=shortened,
               generative=True, source=task.source, seconds=round(time.time() - t0, 2))
    if return_samples:
        for rec, p in zip(records, prompts):
            rec["prompt"] = p
        res["samples"] = records
    return res


def evaluate_generative(model, tokenizer, tasks, limit: int | None = None, **kwargs) -> dict[str, dict]:
    """{task name: metrics} for several generative tasks (a list or a comma-separated string)."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    specs = [get_gen_task(t) for t in tasks]
    return {s.name: run_gen_task(model, tokenizer, s, limit=limit, **kwargs) for s in specs}


__all__ = ["BBH_SUBTASKS", "MATH_SUBJECTS", "MMLU_PRO_CATEGORIES", "SUITES", "GenTask", "Item", "build_prompt",
           "evaluate_generative", "generate_greedy", "get_gen_task", "is_generative", "item_from_row", "run_gen_task",
           "score", "select"]
