"""Generative suites (MMLU-Pro, BBH, MATH): answer extraction, the MATH normaliser, prompts, data loading,
scoring with a scripted model whose generations are known, batched == unbatched greedy decoding."""
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from prunequant.errors import DataError
from prunequant.evaluate import answers, generative
from prunequant.evaluate.generative import (BBH_SUBTASKS, SUITES, Item, build_prompt, generate_greedy, get_gen_task,
                                            run_gen_task, select)

# --- the MATH normaliser ------------------------------------------------------------------------------------

EQUAL = [
    (r"\frac{1}{2}", r"\dfrac{1}{2}"), (r"\frac{1}{2}", r"\tfrac12"), (r"\frac{1}{2}", "1/2"), (r"\frac{1}{2}", "0.5"),
    (r"\frac{1}{2}", ".5"), ("0.5", "0.50"), ("5", "5.0"), ("5", "5.00"), ("5", r"5\text{ cm}"),
    ("10", r"10\text{ inches}^2"), ("10", "10 inches"), ("5", "x = 5"), ("5", "k=5"), ("90", r"90^\circ"),
    ("90", r"90^{\circ}"), ("50", r"50\%"), ("10", r"\$10"), ("1000", "1,000"), ("1000", r"1{,}000"),
    ("(1,2)", r"\left( 1, 2 \right)"), ("(1,2)", "(1, 2)"), (r"\sqrt{2}", r"\sqrt2"), ("5", r"\!5"),
    (r"-\frac{1}{2}", r"\frac{-1}{2}"), (r"-\frac{1}{2}", "-1/2"), ("3", "$3$"), ("3", r"\(3\)"), ("3", "3."),
    ("3", "{3}"), ("Monday", r"\text{Monday}"), ("(A)", r"\text{(A)}"), (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}"),
    (r"2\sqrt{3}", r"2 \sqrt{3}"), ("0", "-0.0"), (r"\frac{3}{4}", "0.75"), ("7", r"\boxed{7}"),
    (r"\infty", r"\infty"), ("x^{2}+1", "x^{2} + 1"),
    (r"\frac{1}{2}", r"\frac 1 2"), ("2", r"\displaystyle 2"), ("4", r"4\,\mathrm{m}"),
]
NOT_EQUAL = [("2", "3"), (r"\frac{1}{3}", "0.33"), ("5", "50"), ("12", "1,2"), (r"\sqrt{2}", "2"), ("x", "y"),
             ("(1,2)", "(2,1)"), ("0.5", "5"), ("", "0"), (None, "1"), ("1", None)]


@pytest.mark.parametrize("a,b", EQUAL)
def test_math_equal_accepts_equivalent_forms(a, b):
    assert answers.math_equal(a, b) and answers.math_equal(b, a)


@pytest.mark.parametrize("a,b", NOT_EQUAL)
def test_math_equal_rejects_different_answers(a, b):
    assert not answers.math_equal(a, b)


@pytest.mark.parametrize("raw,norm", [
    (r"\dfrac{3}{4}", r"\frac{3}{4}"), (r"\frac12", r"\frac{1}{2}"), (r"\frac1{2}", r"\frac{1}{2}"),
    ("1/2", r"\frac{1}{2}"),
    (r"\left[0, 1\right)", "[0,1)"), ("2.50", "2.5"), (".25", "0.25"), ("007", "7"), (r"5\text{ cm}^2", "5"),
    (r"\sqrt[3]{2}", r"\sqrt[3]{2}"), (r"\text{east}", "east"), ("x = 3", "3"), ("y=2x+1", "2x+1"),
    (r"a = b = 3", "a=b=3"), (r"\{1, 2\}", r"\{1,2\}"), ("1,234,567", "1234567"),
])
def test_normalize_math(raw, norm):
    assert answers.normalize_math(raw) == norm


def test_last_boxed_balanced_braces():
    assert answers.last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert answers.last_boxed(r"\boxed{x^{2}+\sqrt{y}} done") == r"x^{2}+\sqrt{y}"
    assert answers.last_boxed(r"so $\boxed 5$.") == "5"
    assert answers.last_boxed(r"\fbox{3}") == "3"
    assert answers.last_boxed(r"stopped inside \boxed{\frac{1") is None
    assert answers.last_boxed("no box here") is None


def test_extract_math_answer_fallbacks():
    assert answers.extract_math_answer(r"So $x=2$ and the answer is $\boxed{2}$.") == "2"
    assert answers.extract_math_answer("The final answer is $\\frac{1}{2}$. I hope it is correct.") == r"\frac{1}{2}"
    assert answers.extract_math_answer("the answer is 3.5.") == "3.5"
    assert answers.extract_math_answer("I do not know") is None


# --- MMLU-Pro and BBH extraction -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,n,want", [
    ("Let's think. B looks tempting but the answer is (C).", 10, "C"),
    ("... so The Answer Is (J)", 10, "J"),
    ("the answer is D.", 4, "D"),
    ("the answer is a bit unclear", 4, None),      # lowercase "a" is a word, not option A
    ("Answer: (B)", 4, "B"),
    (" (E) because the others fail", 10, "E"),      # a direct answer
    ("C.", 4, "C"),
    ("I would rule out (A), so probably (B) and", 4, "B"),  # last "(X)" as the last resort
    ("the answer is (H)", 4, None),                 # no option H among 4
    ("no idea", 10, None),
    ("first the answer is (A), corrected: the answer is (B)", 4, "B"),
])
def test_extract_choice_letter(text, n, want):
    assert answers.extract_choice_letter(text, n) == want


def test_extract_final_answer():
    assert answers.extract_final_answer("Step one. So the answer is (A).") == "(A)"
    assert answers.extract_final_answer("The answer is **Yes**.") == "Yes"
    assert answers.extract_final_answer("False\nmore text") == "False"
    assert answers.extract_final_answer("the answer is 42.\nQ: next") == "42"
    assert answers.extract_final_answer("  \n") is None


BBH_Q = "Which is red?\nOptions:\n(A) sky\n(B) blood\n(C) grass"


@pytest.mark.parametrize("pred,target,question,ok", [
    ("(B)", "(B)", BBH_Q, True), ("B", "(B)", BBH_Q, True), ("(A)", "(B)", BBH_Q, False),
    ("blood", "(B)", BBH_Q, True), ("grass", "(B)", BBH_Q, False),
    ("True", "True", "", True), ("true", "True", "", True), ("False", "True", "", False),
    ("Yes, it is", "Yes", "", True), ("invalid", "valid", "", False), ("valid", "valid", "", True),
    ("12", "12", "", True), ("12.", "12", "", True), ("1,200", "1200", "", True), ("13", "12", "", False),
    (") ] }", ")]}", "", True), (")]}", ") ] }", "", True), (") ]", ") ] }", "", False),
    ("apple Banana cherry", "apple banana cherry", "", True), ("apple cherry", "apple banana cherry", "", False),
    (None, "True", "", False),
])
def test_bbh_match(pred, target, question, ok):
    assert answers.bbh_match(pred, target, question) is ok


def test_bbh_chance():
    assert answers.bbh_chance("(B)", BBH_Q) == pytest.approx(1 / 3)
    assert answers.bbh_chance("False", "") == 0.5
    assert answers.bbh_chance("valid", "") == 0.5
    assert answers.bbh_chance("12", "") == 0.0
    assert answers.bbh_chance("apple pear", "") == 0.0


# --- names, data, prompts ---------------------------------------------------------------------------------------

def test_task_names():
    assert get_gen_task("bbh").subtasks is None and len(BBH_SUBTASKS) == 27
    assert get_gen_task("bbh:navigate+snarks").subtasks == ("navigate", "snarks")
    assert get_gen_task("mmlu_pro:computer science").subtasks == ("computer_science",)
    t = get_gen_task("math:file:/x/y.jsonl")
    assert t.path == "/x/y.jsonl" and t.suite is SUITES["math"]
    with pytest.raises(DataError, match="unknown bbh subtask"):
        get_gen_task("bbh:navigation")
    with pytest.raises(DataError, match="names no file"):
        get_gen_task("bbh:file:")
    assert generative.is_generative("math500") and not generative.is_generative("file:x.jsonl")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def mmlu_rows():
    dev = [{"question": f"Dev question {i}?", "options": ["w", "x", "y", "z", "N/A"], "answer": "B",
            "category": "physics", "cot_content": f"A: Let's think step by step. Reason {i}. The answer is (B).",
            "split": "validation"} for i in range(2)]
    test = [{"question": f"Test question {i}?", "choices": ["p", "q", "r"], "answer_index": i % 3,
             "subtask": "physics"} for i in range(4)]
    return dev + test


def test_mmlu_pro_prompt_from_a_file(tmp_path):
    task = get_gen_task("mmlu_pro:file:" + write_jsonl(tmp_path / "m.jsonl", mmlu_rows()))
    scored, shots = generative.load_file(task)
    assert [len(v) for v in scored.values()] == [4] and [len(v) for v in shots.values()] == [2]
    assert shots["physics"][0].choices == ["w", "x", "y", "z"]  # "N/A" padding dropped
    assert [it.answer for it in scored["physics"]] == ["A", "B", "C", "A"]
    chosen = select(scored, shots, k=2, limit=None, seed=None)
    exs, rest = chosen["physics"]
    assert len(rest) == 4  # dev exemplars: nothing taken out of the scored items
    p = build_prompt(SUITES["mmlu_pro"], exs, rest[1], cot=True)
    assert p.startswith("Here are multiple-choice questions on physics.")
    assert "Question: Dev question 0?\nOptions:\n(A) w\n(B) x\n(C) y\n(D) z\nAnswer: Let's think step by step. " \
           "Reason 0. The answer is (B).\n\n" in p
    assert p.endswith("Question: Test question 1?\nOptions:\n(A) p\n(B) q\n(C) r\nAnswer: Let's think step by step.")
    direct = build_prompt(SUITES["mmlu_pro"], exs, rest[1], cot=False)
    assert "Answer: The answer is (B).\n\n" in direct and direct.endswith("(C) r\nAnswer:")


def bbh_rows():
    rows = [{"input": f"Is statement {i} true?", "target": "True" if i % 2 == 0 else "False",
             "subtask": "boolean_expressions"} for i in range(6)]
    rows += [{"input": f"Pick {i}.\nOptions:\n(A) one\n(B) two", "target": "(A)", "subtask": "navigate"}
             for i in range(4)]
    return rows


def test_bbh_exemplars_are_the_first_k_items_and_not_scored(tmp_path):
    task = get_gen_task("bbh:file:" + write_jsonl(tmp_path / "b.jsonl", bbh_rows()))
    scored, shots = generative.load_file(task)
    assert shots == {}
    chosen = select(scored, shots, k=2, limit=None, seed=None)
    exs, rest = chosen["boolean_expressions"]
    assert [e.question for e in exs] == ["Is statement 0 true?", "Is statement 1 true?"]
    assert [r.question for r in rest] == [f"Is statement {i} true?" for i in range(2, 6)]
    p = build_prompt(SUITES["bbh"], exs, rest[0], cot=False)
    assert ("Q: Is statement 0 true?\nA: The answer is True.\n\n"
            "Q: Is statement 1 true?\nA: The answer is False.\n\n") in p
    assert p.endswith("Q: Is statement 2 true?\nA:")
    # limit per subtask and a seeded, reproducible sample; seed=None keeps source order
    a = select(scored, shots, k=2, limit=3, seed=1)
    assert {s: len(r) for s, (_, r) in a.items()} == {"boolean_expressions": 3, "navigate": 2}
    assert [r.question for r in a["boolean_expressions"][1]] == \
           [r.question for r in select(scored, shots, k=2, limit=3, seed=1)["boolean_expressions"][1]]
    orders = {tuple(r.question for r in select(scored, shots, 2, None, s)["boolean_expressions"][1]) for s in range(8)}
    assert len(orders) > 1


def test_bbh_rationale_gives_chain_of_thought_exemplars():
    ex = Item("Q1?", "(B)", "navigate", rationale="A: Step one, step two.")
    p = build_prompt(SUITES["bbh"], [ex], Item("Q2?", "(A)", "navigate"), cot=True)
    assert "Q: Q1?\nA: Step one, step two. So the answer is (B).\n\n" in p
    assert p.endswith("Q: Q2?\nA: Let's think step by step.")


def test_math_prompt_and_answer_from_solution(tmp_path):
    rows = [{"problem": "What is 1+1?", "solution": r"We add: $1+1=\boxed{2}$.", "type": "Algebra", "fewshot": True},
            {"problem": "Half of 1?", "solution": r"It is $\boxed{\frac12}$.", "type": "Algebra"},
            {"problem": "3 times 2?", "answer": "6", "subject": "Algebra"}]
    task = get_gen_task("math:file:" + write_jsonl(tmp_path / "m.jsonl", rows))
    scored, shots = generative.load_file(task)
    assert [it.answer for it in scored["algebra"]] == [r"\frac12", "6"]
    p = build_prompt(SUITES["math"], shots["algebra"], scored["algebra"][1], cot=True)
    assert "Problem:\nWhat is 1+1?\n\nSolution: We add: $1+1=\\boxed{2}$.\n\n" in p
    assert p.endswith("Problem:\n3 times 2?\n\nSolution:")


@pytest.mark.parametrize("suite,row,msg", [
    ("mmlu_pro", {"question": "q", "choices": ["a", "b"], "answer": "C"}, "not one of the letters"),
    ("mmlu_pro", {"question": "q", "answer": "A"}, "choices"),
    ("bbh", {"input": "q"}, "answer"),
    ("math", {"problem": "q", "solution": "no box"}, "boxed"),
    ("bbh", ["not", "an", "object"], "JSON object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, suite, row, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "ok?", "choices": ["a", "b"], "answer": "A", "target": "x", "answer_index": 0,
                             "solution": r"\boxed{1}"}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:3: malformed {suite} row .*{msg}"):
        generative.load_file(get_gen_task(f"{suite}:file:{f}"))
    with pytest.raises(DataError, match="not found"):
        generative.load_file(get_gen_task(f"{suite}:file:{tmp_path / 'missing.jsonl'}"))


def test_hub_without_datasets_or_network_names_the_file_option(monkeypatch):
    generative._hub_rows.cache_clear()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataError, match=r"pip install datasets.*--tasks bbh:file:PATH.jsonl"):
        run_gen_task(None, None, "bbh:navigate")
    fake = types.ModuleType("datasets")

    def offline(*a, **k):
        raise ConnectionError("no network")
    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    generative._hub_rows.cache_clear()
    with pytest.raises(DataError, match=r"cannot load TIGER-Lab/MMLU-Pro.*no network.*mmlu_pro:file:PATH.jsonl"):
        run_gen_task(None, None, "mmlu_pro")
    generative._hub_rows.cache_clear()


def test_hub_rows_map_to_items(monkeypatch):
    """The hub loaders with a stand-in for ``datasets.load_dataset`` serving rows in each dataset's schema."""
    served = {
        ("TIGER-Lab/MMLU-Pro", None, "test"): [{"question": "q", "options": ["a", "b", "N/A"], "answer": "B",
                                                "answer_index": 1, "category": "computer science", "cot_content": ""}],
        ("TIGER-Lab/MMLU-Pro", None, "validation"): [
            {"question": "d", "options": ["a", "b"], "answer": "A", "category": "computer science",
             "cot_content": "A: Let's think step by step. The answer is (A)."}],
        ("lukaemon/bbh", "navigate", "test"): [{"input": f"n{i}", "target": "Yes"} for i in range(5)],
        ("EleutherAI/hendrycks_math", "counting_and_probability", "test"):
            [{"problem": "p", "solution": r"\boxed{3}", "type": "Counting & Probability", "level": "Level 1"}],
        ("EleutherAI/hendrycks_math", "counting_and_probability", "train"):
            [{"problem": "long", "solution": "x" * 2000 + r"\boxed{1}", "type": "Counting & Probability"},
             {"problem": "t", "solution": r"\boxed{2}", "type": "Counting & Probability"}],
    }
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda repo, config=None, split=None: served[(repo, config, split)]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    generative._hub_rows.cache_clear()
    try:
        scored, shots = generative.load_hub(get_gen_task("mmlu_pro"), 5)
        assert scored["computer_science"][0].choices == ["a", "b"] and scored["computer_science"][0].answer == "B"
        assert shots["computer_science"][0].rationale.startswith("A: Let's think")
        scored, shots = generative.load_hub(get_gen_task("bbh:navigate"), 3)
        assert list(scored) == ["navigate"] and shots == {}
        scored, shots = generative.load_hub(get_gen_task("math:counting_and_probability"), 4)
        assert scored["counting_and_probability"][0].answer == "3"
        assert [s.question for s in shots["counting_and_probability"]] == ["t"]  # over-long solutions skipped
    finally:
        generative._hub_rows.cache_clear()


# --- scoring end to end with a scripted model ----------------------------------------------------------------------

class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose ``generate`` answers the prompt's last question with fixed text: the reply
    of the first key found after the last ``marker``. Everything else (prompts, tokenisation, decoding, stop
    strings, extraction, scoring) is the real code."""

    def __init__(self, tok, replies: dict[str, str], marker: str, max_len: int = 100_000):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.replies, self.marker = tok, replies, marker
        self.config = SimpleNamespace(max_position_embeddings=max_len)
        self.prompts = []

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        rows = []
        for ids, m in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[m.bool()].tolist())
            self.prompts.append(prompt)
            tail = prompt[prompt.rfind(self.marker):]
            reply = next(v for k, v in self.replies.items() if k in tail)
            rows.append(self.tok.encode(reply, add_special_tokens=False)[: generation_config.max_new_tokens])
        width = max(map(len, rows))
        eos = self.tok.eos_token_id
        gen = torch.tensor([r + [eos] * (width - len(r)) for r in rows], dtype=torch.long)
        return torch.cat([input_ids, gen], 1)


@pytest.fixture(scope="module")
def tok():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


def test_mmlu_pro_scores_right_answers_one_and_wrong_zero(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", mmlu_rows())
    # gold letters of the 4 test questions: A, B, C, A
    # right, and cut at the stop string
    replies = {"Test question 0?": " Because of p. The answer is (A).\nQuestion: Test question 9?",
               "Test question 1?": " The answer is (C).",   # wrong
               "Test question 2?": " Clearly (C)",           # right, by the "(X)" fallback
               "Test question 3?": " I cannot tell."}        # nothing extractable
    model = ScriptedLM(tok, replies, "Question:")
    res = run_gen_task(model, tok, "mmlu_pro:file:" + path, fewshot=2, batch_size=3, progress=False,
                       return_samples=True)  # seed 0: the 4 items in a shuffled order
    assert res["exact_match"] == res["acc"] == 0.5 and res["n"] == 4 and res["acc_norm"] is None
    assert res["chance"] == pytest.approx(1 / 3) and res["no_answer"] == 0.25
    assert res["subtasks"] == {"physics": {"exact_match": 0.5, "n": 4, "chance": pytest.approx(1 / 3)}}
    by_q = {s["question"]: s for s in res["samples"]}
    assert [by_q[f"Test question {i}?"]["correct"] for i in range(4)] == [True, False, True, False]
    assert by_q["Test question 0?"]["generation"] == " Because of p. The answer is (A)."  # stop string cut
    assert by_q["Test question 3?"]["extracted"] is None
    assert res["fewshot"] == 2 and res["cot"] is True and res["generative"] is True
    assert all(p.count("Reason 0.") == 1 and p.count("Reason 1.") == 1 for p in model.prompts)


def test_bbh_per_subtask_scores_and_chance(tmp_path, tok):
    path = write_jsonl(tmp_path / "b.jsonl", bbh_rows())
    # scored after 1 exemplar each: statements 1..5 (False, True, False, True, False) and Pick 1..3 (all (A))
    replies = {"statement 1 ": " The answer is False.", "statement 2 ": " The answer is True.",
               "statement 3 ": " The answer is True.", "statement 4 ": " the answer is true.\n\nQ: more",
               "statement 5 ": " False", "Pick 1.": " The answer is (A).", "Pick 2.": " The answer is one.",
               "Pick 3.": " The answer is (B)."}
    model = ScriptedLM(tok, replies, "Q:")
    res = run_gen_task(model, tok, "bbh:file:" + path, fewshot=1, seed=None, progress=False)
    assert res["subtasks"]["boolean_expressions"] == {"exact_match": 0.8, "n": 5, "chance": 0.5}
    assert res["subtasks"]["navigate"] == {"exact_match": pytest.approx(2 / 3), "n": 3, "chance": 0.5}
    assert res["exact_match"] == pytest.approx(6 / 8) and res["chance"] == 0.5 and res["cot"] is False


def test_math_end_to_end_with_equivalent_forms(tmp_path, tok):
    rows = [{"problem": f"Problem number {i}", "answer": a} for i, a in enumerate(["0", r"\frac{1}{2}", "10", "3"])]
    replies = {"number 1": r" So it is $\boxed{0.5}$.", "number 2": r" $\boxed{10\text{ cm}}$",
               "number 3": " The final answer is $4$."}
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    res = run_gen_task(ScriptedLM(tok, replies, "Problem:"), tok, "math:file:" + path, fewshot=1, progress=False)
    assert res["n"] == 3 and res["exact_match"] == pytest.approx(2 / 3) and res["chance"] == 0.0


def test_long_prompts_drop_exemplars(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", mmlu_rows())
    scored, _ = generative.load_file(get_gen_task("mmlu_pro:file:" + path))
    bare = len(tok(build_prompt(SUITES["mmlu_pro"], [], scored["physics"][0], cot=True))["input_ids"])
    # room for the question alone, not for an exemplar
    model = ScriptedLM(tok, {"Test question": " The answer is (A)."}, "Question:", max_len=bare + 8 + 4)
    res = run_gen_task(model, tok, "mmlu_pro:file:" + path, fewshot=2, max_new_tokens=8, progress=False)
    assert res["prompts_shortened"] == 4
    assert all("Dev question" not in p for p in model.prompts)


def test_evaluate_tasks_and_retention_include_generative_tasks(tmp_path, tok):
    from prunequant.evaluate.retention import flatten_metrics, retention
    from prunequant.evaluate.tasks import evaluate_tasks

    name = "bbh:file:" + write_jsonl(tmp_path / "b.jsonl", bbh_rows())
    good = ScriptedLM(tok, {"statement 1 ": " False", "statement": " True", "Pick": " (A)"}, "Q:")
    bad = ScriptedLM(tok, {"statement": " True", "Pick": " (B)"}, "Q:")
    kw = dict(limit=None, progress=False, generation={"fewshot": 1, "seed": None, "max_new_tokens": 8})
    base, comp = evaluate_tasks(good, tok, [name], **kw), evaluate_tasks(bad, tok, [name], **kw)
    # base: statements 1..5 -> F,T,T(wrong),T,T(wrong) = 3/5 plus 3/3 picks: 6/8; the other: 2/5 + 0/3 = 2/8
    assert base[name]["exact_match"] == 0.75 and comp[name]["exact_match"] == 0.25
    assert flatten_metrics({"tasks": comp})[f"task:{name}"] == 0.25
    # chance-adjusted (chance 1/2 here); min_se=0: keep the measure although 8 items are within noise of chance
    ratio = retention({"tasks": base}, {"tasks": comp}, min_se=0)[f"task:{name}"]
    assert ratio == pytest.approx((0.25 - 0.5) / (0.75 - 0.5))


def test_suite_settings_and_cli(tmp_path):
    from prunequant.cli import _suite_cfg, build_parser
    from prunequant.evaluate.suite import SuiteConfig

    assert "fewshot" not in SuiteConfig(tasks=("arc_easy",)).settings()  # old cache keys unchanged
    s = SuiteConfig(tasks=("arc_easy", "bbh")).settings()
    assert s["fewshot"] is None and s["gen_tokens"] == 256 and s["task_seed"] == 0
    a = build_parser().parse_args(["eval", "m", "--tasks", "mmlu_pro,bbh:navigate+snarks,math", "--fewshot", "2",
                                   "--gen-tokens", "64", "--task-seed", "3", "--limit", "5"])
    cfg = _suite_cfg(a)
    assert cfg.tasks == ("mmlu_pro", "bbh:navigate+snarks", "math") and cfg.task_limit == 5
    assert cfg.generation() == {"fewshot": 2, "max_new_tokens": 64, "seed": 3}


# --- real greedy decoding on a tiny model ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_generation_equals_unbatched(kind, tok):
    from tiny import tiny_model

    model = tiny_model(kind).double()  # float64: no near-tie can flip an argmax between the two runs
    prompts = ["The quick brown fox", "Compression keeps meaning per bit; pruning removes weights and", "dog",
               "quantization rounds them. The quick brown fox jumps over the lazy"]
    one = generate_greedy(model, tok, prompts, max_new_tokens=12, batch_size=1, progress=False)
    many = generate_greedy(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False)
    assert one == many and all(one)
    # reference: each prompt alone, no padding, token by token without a cache
    for p, text in zip(prompts, one):
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        ref = ids[0, len(tok(p)["input_ids"]):].tolist()
        ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert tok.decode(ref, skip_special_tokens=True) == text
    # a stop string ends the generation where it first occurs in the generated text (not in the prompt:
    # "and" ends prompt 1, and for gpt2 the generation is " and and ...")
    for p, text in zip(prompts, one):
        stop = next((text[j: j + 2] for j in range(1, len(text) - 1) if text[j: j + 2].isascii()
                     and text[j: j + 2].isprintable()), None)
        if stop is None:
            continue
        cut = generate_greedy(model, tok, [p], max_new_tokens=12, stop=[stop, "\x00never"], progress=False)
        assert cut == [text[: text.find(stop)]]


def test_cli_eval_runs_generative_tasks_from_files(tmp_path, capsys, monkeypatch):
    """`prunequant eval DIR --tasks bbh:file:...,math:file:...` on a tiny saved model; a missing hub dataset
    fails with one line naming the file option."""
    from prunequant.cli import main
    from tiny import TRAIN_TEXT, save_tiny

    model_dir = tmp_path / "tiny"
    save_tiny(model_dir)
    text = tmp_path / "eval.txt"
    text.write_text(TRAIN_TEXT * 20)
    bbh = write_jsonl(tmp_path / "b.jsonl", bbh_rows())
    math = write_jsonl(tmp_path / "m.jsonl", [{"problem": f"{i}+{i}?", "answer": str(2 * i)} for i in range(4)])
    js = tmp_path / "e.json"
    code = main(["eval", str(model_dir), "--against", str(model_dir), "--text", str(text), "--seq-len", "32",
                 "--max-tokens", "256", "--agree-tokens", "64", "--tasks", f"bbh:file:{bbh},math:file:{math}",
                 "--fewshot", "1", "--gen-tokens", "6", "--limit", "2", "--json", str(js)])
    assert code == 0, capsys.readouterr().err
    res = json.loads(js.read_text())
    b = res["tasks"][f"bbh:file:{bbh}"]
    assert b["n"] == 4 and b["subtasks"]["navigate"]["n"] == 2 and b["max_new_tokens"] == 6 and b["fewshot"] == 1
    assert res["tasks"][f"math:file:{math}"]["chance"] == 0.0
    assert res["protocol"]["gen_tokens"] == 6
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "datasets", None)  # as without the package (or a network)
    generative._hub_rows.cache_clear()
    code = main(["eval", str(model_dir), "--text", str(text), "--seq-len", "32", "--max-tokens", "64",
                 "--tasks", "bbh:snarks", "--gen-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "bbh:file:PATH.jsonl" in err and "Traceback" not in err
