"""Math answers: extract the final answer of a completion and check it against the reference.

Extraction, in order of precedence (the first rule that finds something wins):
1. `\\boxed{...}`: the last complete one (braces may nest); a model that corrects itself boxes again.
2. `<answer>...</answer>`: the last closed tag's content.
3. The last number in the text (`1,234`, `-3.5`, `3/4`), so a bare "... so she has 18 apples." counts.
Unclosed markup (`\\boxed{12`, `<answer>12`) is skipped, and the next rule applies.

Verification, cheapest first:
- the same text once LaTeX dressing, units, `$` and trailing periods are gone;
- numbers: exact rational equality (`0.5` = `1/2` = `\\frac{1}{2}`, `1,234` = `1234`, `-3` = `−3`), where
  `25%` also equals `0.25` when only one side is a percentage;
- expressions: sympy, in a sandbox child process with a timeout (`2\\sqrt{2}` = `sqrt(8)`, `x+1` = `1+x`;
  kubeforge.rewards.sandbox).
  Only a whitelisted grammar (digits, single-letter symbols, + - * / ^, parentheses and a few
  functions) ever reaches sympy's parser, because parsing evaluates; an answer longer than
  MAX_ANSWER_CHARS, outside the grammar, or too slow to compare (within sandbox.SYMPY_TIMEOUT_S and
  before its batch's deadline) is simply wrong.

Malformed model output never raises: it scores 0. A missing reference answer is a data error and raises.
"""

from __future__ import annotations

import re
from fractions import Fraction

from kubeforge.rewards import sandbox, scoring

MAX_ANSWER_CHARS = 200  # longer "answers" are not answers; also bounds the work per item

_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape (\{ is no brace), or a brace
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
_LAST_NUMBER = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-−]?\.\d+")
_NUMBER = re.compile(
    r"(?P<sign>-)?\s*(?P<int>\d{1,3}(?:,\d{3})+|\d*)(?P<dec>\.\d+)?(?:\s*/\s*(?P<den>\d+))?\s*(?P<pct>%)?"
    # trailing units: words after a space ("18 apples"), or two letters or more ("18cm"), never "2x"
    r"(?:\s+[a-zA-Z][a-zA-Z\s.]*|[a-zA-Z]{2,}[a-zA-Z\s.]*)?"
)
_LATEX_FRAC = re.compile(r"(?P<sign>-)?\\frac\{(?P<num>-?\d+)\}\{(?P<den>-?\d+)\}")
_TEXT_COMMANDS = ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")
_REPLACEMENTS = [
    ("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\!", ""), ("\\,", ""),
    ("\\;", ""), ("\\:", ""), ("\\ ", " "), ("~", " "), ("{,}", ","), ("\\%", "%"), ("\\$", ""), ("$", ""),
    ("^\\circ", ""), ("^{\\circ}", ""), ("°", ""), ("−", "-"), ("–", "-"), ("×", "*"), ("÷", "/"),
    ("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
]  # fmt: skip
# LaTeX names -> the names the sympy child knows; any other backslash command makes an answer unparseable.
_LATEX_NAMES = {"\\pi": "pi", "\\infty": "oo", "\\ln": "log", "\\log": "log", "\\exp": "exp", "\\sin": "sin",
                "\\cos": "cos", "\\tan": "tan"}  # fmt: skip
_FUNCTIONS = frozenset({"sqrt", "pi", "oo", "log", "exp", "sin", "cos", "tan"})
_SOURCE_CHARS = re.compile(r"[0-9A-Za-z+\-*/().\s]*")


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each `{` -> index of its `}`, in one pass (scanning from each of many unclosed `\\boxed{`
    would take quadratic time); `\\{` and `\\}` are literal braces, not grouping."""
    pairs, opened = {}, []
    for m in _BRACE_TOKENS.finditer(text):
        if m[0] == "{":
            opened.append(m.start())
        elif m[0] == "}" and opened:
            pairs[opened.pop()] = m.start()
    return pairs


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """(content, index after the closing brace) of the group whose `{` is at `start`; None if unclosed."""
    close = _brace_pairs(text).get(start)
    return None if close is None else (text[start + 1 : close], close + 1)


def _last_marked(completion: str) -> str | None:
    """The content of the last complete `\\boxed{}`, else of the last closed `<answer>` tag."""
    pairs = _brace_pairs(completion)
    for m in reversed(list(_BOXED.finditer(completion))):
        close = pairs.get(m.end() - 1)
        if close is not None:
            return completion[m.end() : close]
    closes = list(_ANSWER_CLOSE.finditer(completion))
    if closes:
        opens = list(_ANSWER_OPEN.finditer(completion, 0, closes[-1].start()))
        if opens:
            return completion[opens[-1].end() : closes[-1].start()]
    return None


def extract_answer(completion: str) -> str | None:
    """The completion's final answer, by the module's order of precedence; None when there is none."""
    marked = _last_marked(completion)
    if marked is not None:
        return marked
    numbers = _LAST_NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def has_marked_answer(completion: str) -> bool:
    """Whether the completion states its answer in `\\boxed{}` or `<answer>` tags, with something inside."""
    marked = _last_marked(completion)
    return marked is not None and bool(_clean(marked[:MAX_ANSWER_CHARS]))


def _clean(text: str) -> str:
    """The answer without its dressing: outer boxes, $, spacing commands, text wrappers, units, "x =", periods."""
    s = text.strip()
    for _ in range(4):  # \boxed{\boxed{5}}: unwrap a few levels, the rest is not worth a credit
        m = _BOXED.match(s)
        group = _braced(s, m.end() - 1) if m else None
        if group is None or group[1] != len(s):
            break
        s = group[0].strip()
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    for command in _TEXT_COMMANDS:  # \text{ apples} -> " apples": the unit rule below drops it
        while (i := s.find(command + "{")) >= 0:
            group = _braced(s, i + len(command))
            if group is None:
                break
            s = s[:i] + " " + group[0] + s[group[1] :]
    s = re.sub(r"^[A-Za-z]\w*\s*=\s*(?=\S)", "", s.strip())  # "x = 5" answers 5
    return s.strip().rstrip(".,;:!").strip()


def _number(text: str) -> tuple[Fraction, bool] | None:
    """(value, is a percentage) when `text` is one number (units allowed), else None."""
    m = _LATEX_FRAC.fullmatch(text)
    if m:
        den = int(m["den"])
        if den == 0:
            return None
        value = Fraction(int(m["num"]), den)
        return (-value if m["sign"] else value), False
    m = _NUMBER.fullmatch(text)
    if not m or not (m["int"] or m["dec"]):
        return None
    value = Fraction(m["int"].replace(",", "") or "0") + (Fraction(m["dec"]) if m["dec"] else 0)
    if m["den"]:
        if int(m["den"]) == 0:
            return None
        value /= int(m["den"])
    return (-value if m["sign"] else value), bool(m["pct"])


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    (x, x_pct), (y, y_pct) = a, b
    if x == y:
        return True
    # "25%" answers both "25" (what percent?) and "0.25" (what fraction?); two percentages compare as numbers
    if x_pct and not y_pct:
        return x / 100 == y
    if y_pct and not x_pct:
        return y / 100 == x
    return False


def _to_source(text: str) -> str | None:
    """A whitelisted sympy source for a LaTeX or plain expression; None when it is outside the grammar."""
    out = []
    i = 0
    while i < len(text):
        if text.startswith("\\frac", i):
            num = _braced(text, i + 5) if text.startswith("{", i + 5) else None
            den = _braced(text, num[1]) if num and text.startswith("{", num[1]) else None
            if den is None:
                return None
            parts = [_to_source(num[0]), _to_source(den[0])]
            if None in parts:
                return None
            out.append(f"(({parts[0]})/({parts[1]}))")
            i = den[1]
        elif text.startswith("\\sqrt", i):
            j = i + 5
            index = None
            if text.startswith("[", j):  # \sqrt[3]{x}
                close = text.find("]", j)
                index = _to_source(text[j + 1 : close]) if close > 0 else None
                if index is None:
                    return None
                j = close + 1
            if text.startswith("{", j):
                group = _braced(text, j)
                if group is None:
                    return None
                radicand, j = _to_source(group[0]), group[1]
            elif j < len(text) and text[j].isalnum():  # \sqrt2
                radicand, j = text[j], j + 1
            else:
                return None
            if radicand is None:
                return None
            out.append(f"(({radicand})**(1/({index})))" if index else f"sqrt({radicand})")
            i = j
        elif text[i] == "\\":
            name = re.match(r"\\[A-Za-z]+", text[i:])
            if not name or name[0] not in _LATEX_NAMES:
                return None
            out.append(f" {_LATEX_NAMES[name[0]]} ")
            i += len(name[0])
        else:
            out.append({"{": "(", "}": ")", "^": "**"}.get(text[i], text[i]))
            i += 1
    source = "".join(out)
    if not _SOURCE_CHARS.fullmatch(source):
        return None
    if any(len(word) > 1 and word not in _FUNCTIONS for word in re.findall(r"[A-Za-z]+", source)):
        return None  # words are prose or unknown functions, not single-letter symbols
    return source


def _canonical(text: str) -> str:
    return re.sub(r"\s+", "", text).casefold()


def answers_match(predicted: str, reference: str) -> bool:
    """Whether the extracted answer `predicted` equals `reference` (see the module's docstring)."""
    if len(predicted) > MAX_ANSWER_CHARS:
        return False
    p, r = _clean(predicted), _clean(reference)
    if not p:
        return False
    if _canonical(p) == _canonical(r):
        return True
    pn, rn = _number(p), _number(r)
    if pn is not None and rn is not None:
        return _numbers_equal(pn, rn)
    ps, rs = _to_source(p), _to_source(r)
    if ps is None or rs is None:
        return False
    return sandbox.pool().equivalent(ps, rs, deadline=scoring.batch_deadline())


def correctness(prompt: str, completion: str, answer: str) -> float:
    """1 when the completion's final answer equals the item's answer, else 0."""
    if not answer.strip():
        raise ValueError(
            "math reward: the item's answer is empty; each item needs its reference answer "
            "(for GSM8K, the text after '####': see kubeforge.data)"
        )
    predicted = extract_answer(completion)
    return float(predicted is not None and answers_match(predicted, answer))


def format_reward(prompt: str, completion: str, answer: str) -> float:
    """1 when the completion marks its final answer with `\\boxed{}` or `<answer>` tags, else 0."""
    return float(has_marked_answer(completion))
