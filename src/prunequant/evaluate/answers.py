"""Answer extraction and exact-match checks for the generative suites (rules: docs/internals.md)."""
from __future__ import annotations

import re
from fractions import Fraction

# --- MMLU-Pro -------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def extract_choice_letter(text: str, n_options: int = 10) -> str | None:
    """The chosen option letter (A.. up to ``n_options``), or None when the text names none."""
    valid = LETTERS[:n_options]
    cls = f"[{valid}]"
    patterns = [
        rf"(?i:answer\s+is)\s*:?\s*\(?\s*({cls})\s*\)?(?![A-Za-z])",  # "the answer is (C)" / "answer is C."
        rf"(?i:answer)\s*:\s*\(?\s*({cls})\s*\)?(?![A-Za-z])",        # "Answer: C"
    ]
    for pat in patterns:
        hits = re.findall(pat, text)
        if hits:
            return hits[-1]
    m = re.match(rf"\s*\(?({cls})(?:\)|\.|:|\s*$)", text)  # a direct answer: "(C) ..." / "C." / "C"
    if m:
        return m.group(1)
    hits = re.findall(rf"\(({cls})\)", text)  # last resort: the last "(X)" mentioned
    return hits[-1] if hits else None


# --- BBH ------------------------------------------------------------------------------------------------

BINARY = {"true": "false", "false": "true", "yes": "no", "no": "yes", "valid": "invalid", "invalid": "valid"}
_BRACKETS = set("()[]{}<> ")


def extract_final_answer(text: str) -> str | None:
    """The text after the last "answer is" (to the end of its line), else the first non-empty line."""
    hits = re.findall(r"answer\s+is\s*:?\s*(.*)", text, flags=re.IGNORECASE)
    cand = hits[-1] if hits else next((ln for ln in text.splitlines() if ln.strip()), "")
    prev = None
    while prev != cand:  # markup and a final period, in any order: "**Yes**." -> Yes
        prev, cand = cand, re.sub(r"[.\s]+$", "", cand.strip().strip("*$`'\""))
    return cand or None


def answer_kind(target: str) -> str:
    """How a BBH gold target is compared: 'letter', 'binary', 'number' or 'text'."""
    t = target.strip()
    if re.fullmatch(r"\([A-Z]\)", t):
        return "letter"
    if t.lower() in BINARY:
        return "binary"
    if re.fullmatch(r"-?\d+(\.\d+)?", t):
        return "number"
    return "text"


def parse_options(question: str) -> dict[str, str]:
    """{"A": option text, ...} from lines "(A) text" of a question (BBH's Options block)."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s*\(([A-Z])\)\s*(.+?)\s*$", question, re.M)}


def _number(s: str) -> float | None:
    m = re.search(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", s)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def bbh_match(pred: str | None, target: str, question: str = "") -> bool:
    """Whether an extracted BBH answer equals the gold target, compared by the target's kind."""
    if pred is None:
        return False
    kind = answer_kind(target)
    t = target.strip()
    if kind == "letter":
        m = re.search(r"\(([A-Z])\)", pred) or re.match(r"\s*([A-Z])(?:[).:\s]|$)", pred)
        if m:
            return m.group(1) == t[1]
        opts = parse_options(question)  # the option's text instead of its letter
        norm = _collapse(pred).lower()
        return any(_collapse(v).lower() == norm and k == t[1] for k, v in opts.items())
    if kind == "binary":
        words = re.findall(r"[A-Za-z]+", pred)
        return bool(words) and words[0].lower() == t.lower()
    if kind == "number":
        v = _number(pred)
        return v is not None and abs(v - float(t)) < 1e-9
    if set(t) <= _BRACKETS:  # Dyck closings: spacing is not part of the answer
        return pred.replace(" ", "") == t.replace(" ", "")
    return _collapse(pred).lower() == _collapse(t).lower()


def bbh_chance(target: str, question: str) -> float:
    """Chance accuracy of one BBH item: 1/#options for a letter answer, 1/2 for a binary one, else 0."""
    kind = answer_kind(target)
    if kind == "letter":
        n = len(parse_options(question))
        return 1.0 / n if n >= 2 else 0.0
    return 0.5 if kind == "binary" else 0.0


def _collapse(s: str) -> str:
    return " ".join(s.split()).rstrip(".")


# --- MATH -----------------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces), or of "\\boxed 5"; None if none."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (6 if text.startswith("\\boxed", i) else 5)
    rest = text[j:]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):  # "\boxed 5$"
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    rest = rest.lstrip()
    end = _balanced_group(rest, 0)
    return None if end is None else rest[1:end - 1]  # None: no box, or the generation stopped inside it


def extract_math_answer(text: str) -> str | None:
    """The model's final MATH answer: the last \\boxed{} content, else "the (final) answer is X"."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hits = re.findall(r"answer\s+is\s*:?\s*(.+)", text, flags=re.IGNORECASE)
    if not hits:
        return None
    cand = hits[-1].strip()
    m = re.match(r"\$([^$]+)\$", cand)
    if m:
        return m.group(1)
    cand = re.sub(r"\s*(\.|I hope it is correct).*$", "", cand) if not re.match(r"-?\d*\.\d", cand) else cand
    return cand.rstrip(". ") or None


def _balanced_group(s: str, i: int) -> int | None:
    """Index just past the {...} group opening at s[i], or None."""
    if i >= len(s) or s[i] != "{":
        return None
    depth = 0
    for k in range(i, len(s)):
        if s[k] == "{":
            depth += 1
        elif s[k] == "}":
            depth -= 1
            if depth == 0:
                return k + 1
    return None


def _unwrap_command(s: str, names: tuple[str, ...]) -> str:
    """\\name{X} -> X for each listed command (balanced braces)."""
    for name in names:
        token = "\\" + name
        while True:
            i = s.find(token + "{")
            if i < 0:
                break
            end = _balanced_group(s, i + len(token))
            if end is None:
                break
            s = s[:i] + s[i + len(token) + 1: end - 1] + s[end:]
    return s


def _brace_args(s: str, cmd: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}: one-character arguments braced."""
    token, n_args = "\\" + cmd, 2 if cmd == "frac" else 1
    out, i = [], 0
    while True:
        j = s.find(token, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        k = j + len(token)
        out.append(s[i:k])
        if k < len(s) and s[k].isalpha():  # another command that starts with the same letters
            i = k
            continue
        for _ in range(n_args):
            if k < len(s) and s[k] == "{":
                end = _balanced_group(s, k)
                if end is None:
                    break
                out.append(s[k:end])
                k = end
            elif k < len(s) and s[k] not in "}\\^_[":
                out.append("{" + s[k] + "}")
                k += 1
            else:
                break
        i = k


_UNIT = r"\\(?:text|mbox|mathrm|textrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?"


def normalize_math(s: str | None) -> str | None:
    """A canonical string for a MATH answer, so that equal answers written differently compare equal."""
    if s is None:
        return None
    s = str(s).strip()
    s = s.replace("\n", " ")
    for a, b in (("\\$", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""), ("$", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\(?:!|,|;|:|quad|qquad|displaystyle)(?![A-Za-z])", " ", s)
    s = s.replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])\.?", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("{,}", "")
    s = s.strip()
    unitless = re.sub(rf"\s*{_UNIT}\s*$", "", s)  # trailing unit: "5\text{ cm}^2" -> "5"
    if unitless and unitless != s:
        s = unitless
    s = _unwrap_command(s, ("text", "textbf", "mathrm", "textrm", "mbox", "mathbf", "boxed"))
    m = re.fullmatch(r"(-?[\d.,]+)\s+[A-Za-z][A-Za-z ]*", s)  # "5 cm", "10 inches" -> the number
    if m:
        s = m.group(1)
    if s.count("=") == 1:  # "x = 5" / "k=3" -> the value
        lhs, rhs = s.split("=")
        if re.fullmatch(r"\s*[A-Za-z](?:_\{?\w\}?)?\s*", lhs) and rhs.strip():
            s = rhs
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = _brace_args(s, "frac")
    s = _brace_args(s, "sqrt")
    m = re.fullmatch(r"(-?)\(?(\d+)\)?/\(?(\d+)\)?", s)  # a/b with integers -> \frac{a}{b}
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    m = re.fullmatch(r"\\frac\{-(\d+)\}\{(\d+)\}", s)  # \frac{-a}{b} -> -\frac{a}{b}
    if m:
        s = f"-\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = _canonical_decimal(s)
    while len(s) >= 2 and s[0] == "{" and _balanced_group(s, 0) == len(s):
        s = s[1:-1]
    return s


def _canonical_decimal(s: str) -> str:
    m = re.fullmatch(r"(-?)(\d*)\.(\d+)", s)
    if m:
        whole, frac = m.group(2) or "0", m.group(3).rstrip("0")
        whole = whole.lstrip("0") or "0"
        s = f"{m.group(1)}{whole}" + (f".{frac}" if frac else "")
        return "0" if s == "-0" else s
    m = re.fullmatch(r"(-?)0*(\d+)", s)
    if m:
        return f"{m.group(1)}{m.group(2)}" if m.group(2) != "0" else "0"
    return s


def _as_fraction(s: str) -> Fraction | None:
    """The exact value of an integer, decimal or (possibly negative) \\frac{int}{int}; None otherwise."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if m:
            v = Fraction(int(m.group(2)), int(m.group(3)))
            return -v if m.group(1) else v
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(pred: str | None, gold: str | None) -> bool:
    """Whether two MATH answers are equal: same normalised string, or the same rational value."""
    if pred is None or gold is None:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a is None or b is None or a == "":
        return False
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    return fa is not None and fa == fb


__all__ = ["answer_kind", "bbh_chance", "bbh_match", "extract_choice_letter", "extract_final_answer",
           "extract_math_answer", "last_boxed", "math_equal", "normalize_math", "parse_options"]
