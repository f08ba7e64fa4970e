"""Final-answer extraction: pure functions on strings.

Sources use these to turn a reference column into a final answer (GSM8K's `#### 72`, MATH's
`\\boxed{...}`); curation uses the same functions on model output, so a reference and a
prediction are always read the same way.

Extraction only finds the answer; it never rewrites LaTeX (the verifier normalises). The rewrites
are dropping thousands separators from a plain number (`1,000` -> `1000`, which would otherwise
read as a tuple), and taking the answer out of its sentence ("the smallest value is \\(0\\)." ->
`0`).

A wrong answer is worse than none for SFT filtering (a sample kept for the wrong reason), so
every reader gives None rather than guess: the default methods read only what the text marks as
its answer (a box, "The answer is ...", `#### N`) or a last sentence with exactly one value in
it. The lenient `last_number` (any last number on the last line) is opt-in.

Every function here is linear in the length of the text: truncated long-CoT output often ends in
100,000 blank lines or a loop of unclosed `\\boxed{`, and a reader that rescans from each line or
each opening would take minutes on one such sample. No pattern below lets `\\s` run across lines
from a `^` anchor, and every scan resumes where the previous one stopped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_BOX_TOKEN = re.compile(r"[^\s$]+")
_BRACE = re.compile(r"(?<!\\)[{}]")
# The model's closing statement; the last one wins. "Answer:" alone is too common inside a chain
# of thought to be anchored anywhere but at the start of a line; `[ \t]` (not `\s`) there, so that
# the anchor cannot run over the following lines (that made 100,000 blank lines quadratic).
# "Final Answer" ending its line is a heading: the answer is on the next lines.
_ANSWER_IS = re.compile(
    r"\bfinal\s+answer(?:\s+is\b|[ \t*_]*:|[ \t*_#]*$)"
    r"|\banswer\s+is\b"
    r"|^[ \t>#*_]*answer[ \t*_]*(?::|$)",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
# Math delimiters; `\$` is a dollar sign. Paired in one pass by `_math_spans`.
_DELIM = re.compile(r"(?<!\\)(?:\\[()\[\]]|\$\$?)")
_CLOSER = {"\\(": "\\)", "\\[": "\\]", "$": "$", "$$": "$$"}
# A sentence ends at `.`, `!` or `?` followed by a space or the end (not `3.5`, not `e.g.x`).
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_CLAUSE_END = re.compile(r"[.!?](?=\s|$)|,?\s+(?:which|since|because|as|so|where)\b", re.IGNORECASE)
# "the smallest value is 0": a short subject phrase (words only) and its verb, dropped.
_SUBJECT = re.compile(
    r"(?:[A-Za-z'\u2019-]+[ \t]+){0,8}?(?:is|are|was|were|equals|would[ \t]+be|will[ \t]+be)[ \t]*:?[ \t]+",
    re.IGNORECASE,
)
# A word of three letters or more that is no LaTeX command: text, not math, inside `$…$`.
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_CALC = re.compile(r"<<[^<>\n]*>>")  # GSM8K's calculator annotations, `<<48/2=24>>`
_DISPLAY_OPEN = re.compile(r"\s*(\\\[|\$\$)")
_NON_SPACE = re.compile(r"\S")
_ALNUM = re.compile(r"[A-Za-z0-9]")
_LEADING_NUMBER = re.compile(r"(" + _NUMBER.pattern + r")(?:[ \t]+[A-Za-z][A-Za-z ]*)?")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_EQUATION_SIDE = re.compile(r"[A-Za-z][^=]*[-+*/^]|[-+*/^][^=]*[A-Za-z]")  # letters and operators
_DEFINED = re.compile(r"\s*[A-Za-z](?:_\{?\w+\}?)?'?\s*")
# A number standing alone: not the 3 of `\frac13`, `x^3` or `a_3` (units may follow: `400ml`).
_BARE_NUMBER = re.compile(r"(?<![\w\\{}^_.])(?:" + _NUMBER.pattern + r")(?![\d{}^_])")
# Where the stated value starts in a last sentence: after its last `=`, verb or clause break
# ("so the radius is $7$ units" -> "$7$ units").
_SPLIT = re.compile(
    r"=|\b(?:is|are|was|were|be|equals|gives|get|gets|got|obtain|find|implies|have|has)\b|(?<=\w)'s\b|[,;:](?=\s)",
    re.IGNORECASE,
)
_MAX_STATEMENT = 300  # an "answer" longer than this is a paragraph, not a final answer
# A final statement with no number or math in it and more words than this (of 3+ letters) is
# prose, not an answer; up to it, a text answer ("Monday", "no real solutions") is kept.
_MAX_TEXT_ANSWER_WORDS = 3


def strip_thousands(answer: str) -> str:
    """`1,234,567.5` -> `1234567.5` when the whole answer is such a number; anything else as is."""
    if _THOUSANDS.fullmatch(answer):
        return answer.replace(",", "")
    return answer


def _clean(answer: str | None) -> str | None:
    if answer is None:
        return None
    answer = answer.strip()
    return strip_thousands(answer) if answer else None


# --------------------------------------------------------------------------- boxes


def _box_spans(text: str) -> list[tuple[int, int | None]]:
    """(start, end) of every box's content in order; end is None for a box never closed.

    One pass: each brace scan starts where the previous box ended, and an unclosed box ends
    the search (everything after it is inside it)."""
    spans: list[tuple[int, int | None]] = []
    pos = 0
    while (m := _BOX_OPEN.search(text, pos)) is not None:
        if m.group(1) is None:
            # `\boxed 5`: LaTeX boxes one token; models mean the whole word up to a space or `$`.
            tok = _BOX_TOKEN.match(text, m.end())
            if tok is None:
                spans.append((m.end(), None))
                break
            spans.append((m.end(), tok.end()))
            pos = tok.end()
            continue
        depth, start = 1, m.end()
        end = None
        for b in _BRACE.finditer(text, start):
            depth += 1 if b.group() == "{" else -1
            if depth == 0:
                end = b.start()
                break
        spans.append((start, end))
        if end is None:
            break
        pos = end + 1
    return spans


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` / `\\fbox{…}` (braces balanced, nested braces kept) or
    `\\boxed 5`; None when there is no box or the last one is never closed (a truncated answer)."""
    spans = _box_spans(text)
    if not spans or spans[-1][1] is None:
        return None
    start, end = spans[-1]
    content = text[start:end].strip()
    if not content:
        return None
    if text[start - 1] != "{":
        content = content.rstrip(".,;:")
    return content or None


# --------------------------------------------------------------------------- statements


def _math_spans(s: str) -> list[tuple[int, int, int, int]]:
    """(outer start, outer end, content start, content end) of each `$…$`, `$$…$$`, `\\(…\\)` and
    `\\[…\\]` in `s`, in one pass. An opener never closed swallows the rest (no span). A `$…$`
    whose content is prose (`$5 and got $`) is two dollar signs, not math: its closing `$` opens
    the next candidate instead."""
    spans: list[tuple[int, int, int, int]] = []
    opened: re.Match | None = None
    for m in _DELIM.finditer(s):
        d = m.group()
        if opened is None:
            if d in _CLOSER:
                opened = m
            continue
        if d != _CLOSER[opened.group()]:
            continue
        content = s[opened.end() : m.start()]
        if opened.group() == "$" and "\\" not in content and _WORD.search(content):
            opened = m  # currency: `$5 and got $3`
            continue
        spans.append((opened.start(), m.end(), opened.end(), m.start()))
        opened = None
    return spans


def _blank(s: str, spans: list[tuple[int, int, int, int]]) -> str:
    """`s` with its math spans blanked out (NULs), so that searches see only the prose around
    them, in time linear in `s` however many spans there are."""
    if not spans:
        return s
    parts, pos = [], 0
    for a, b, _, _ in spans:
        parts += [s[pos:a], "\0" * (b - a)]
        pos = b
    parts.append(s[pos:])
    return "".join(parts)


def _first_sentence(s: str) -> str:
    """`s` up to its first sentence end or subordinate clause outside math ("5. Because ..." and
    "$28$, which is ..." -> "5", "$28$")."""
    m = _CLAUSE_END.search(_blank(s, _math_spans(s)))
    return s if m is None else s[: m.start()]


def _last_sentence(s: str) -> str:
    """The last non-empty sentence of `s` (ends outside math), trailing period dropped."""
    s = s.rstrip().rstrip(".!?").rstrip()
    cut = 0
    for m in _SENTENCE_END.finditer(_blank(s, _math_spans(s))):
        cut = m.end()
    return s[cut:].strip()


def _rhs(math: str) -> str:
    """The value a math expression states: the right side of its last top-level `=` when the
    left is a computation or a name (`3 + 4 = 7`, `a = b = 7`, `(a, b) = (1, 2)`, `LP = 72`);
    a one-letter definition (`x = 3`, `y = 2x + 1`) or an equation (`x^2 - 4 = 0`) is kept whole:
    the verifier reads it, and its right side alone would be a wrong answer."""
    depth, eqs = 0, []
    for i, c in enumerate(math):
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif c == "=" and depth == 0 and math[i - 1 : i] not in ("<", ">", "!", "\\"):
            eqs.append(i)
    whole = math.strip().rstrip(".,").strip()
    if not eqs:
        return whole
    lhs = math[: eqs[0]]
    if len(eqs) == 1 and (_DEFINED.fullmatch(lhs) or _EQUATION_SIDE.search(_COMMAND.sub("", lhs))):
        return whole
    return math[eqs[-1] + 1 :].strip().rstrip(".,").strip()


def _strip_wrapping(s: str) -> str:
    # Markdown bold and a closing period wrap the answer in several orders ("**5**." / "$5$.").
    for _ in range(3):
        s = s.strip().rstrip(".,;:!").strip().strip("*_").strip()
    return s


def _read_statement(s: str) -> str | None:
    """The answer a final statement states: `s` ("the smallest value is \\(0\\)." -> `0`,
    "$\\frac{1}{3}$" -> `\\frac{1}{3}`, "= 42" -> `42`, "5 + 7 = 12 apples" -> `12`)."""
    s = _strip_wrapping(_first_sentence(s.strip().lstrip(":*_ \t")))
    if s.startswith("="):
        s = s[1:].strip()
    if (m := _SUBJECT.match(s)) is not None and not _math_spans(s[: m.end()]):
        s = s[m.end() :]
    s = _strip_wrapping(s)
    spans = _math_spans(s)
    if len(spans) == 1:
        # One math span: it is the answer, the words around it are units or filler
        # ("\\(12\\) apples"), unless the text says more than one value outside it.
        a, b, c, d = spans[0]
        rest = s[:a] + " " + s[b:]
        if not _NUMBER.search(rest):
            s = _rhs(s[c:d])
    elif not spans:
        s = _rhs(s)  # "12.5 + 12.5 = 24"
    if (m := _LEADING_NUMBER.fullmatch(s)) is not None:
        s = m.group(1)  # "580 total shoppers": the units are words
    if not s or len(s) > _MAX_STATEMENT:
        return None
    spans = _math_spans(s)
    blank = _blank(s, spans)
    words = _WORD.findall(blank)
    if words and (spans or _BARE_NUMBER.search(blank)):
        # A value inside prose: "that the area of the square ... is actually 1" is 1, "a decimal
        # approximation of 1.0024" 1.0024; two values in it are no answer.
        return _one_value(s, blank)
    if len(words) > _MAX_TEXT_ANSWER_WORDS:
        return None  # prose with no value ("that there are no cars that ..."): not an answer
    return s


def _display_after(text: str, pos: int) -> tuple[int, int] | None:
    """(start, end) of the content of the `\\[…\\]` / `$$…$$` that starts at `pos` (after spaces)."""
    m = _DISPLAY_OPEN.match(text, pos)
    if m is None:
        return None
    close = text.find("\\]" if m.group(1) == "\\[" else "$$", m.end())
    return (m.end(), close) if close >= 0 else None


def _read_display(content: str) -> str | None:
    return _rhs(content.strip().rstrip(".,").strip()) or None


def extract_answer_is(text: str) -> str | None:
    """The answer of the last explicit final-answer statement: what follows "The answer is" /
    "Final answer:" / "Answer:" (at a line start) up to the end of its sentence, read by
    `_read_statement` ("the smallest value is 0." -> `0`, `\\(\\frac{1}{3}\\)` whole). After a
    heading ("**Final Answer**", "The final answer is:" ending its line) the answer is the next
    displayed formula or the next non-empty line."""
    last = None
    for m in _ANSWER_IS.finditer(text):
        last = m
    if last is None:
        return None
    line_end = text.find("\n", last.end())
    line_end = len(text) if line_end < 0 else line_end
    display = _display_after(text, last.end())
    if display is not None:
        return _read_display(text[display[0] : display[1]]) if display[1] - display[0] <= _MAX_STATEMENT else None
    rest = text[last.end() : line_end]
    if not _strip_wrapping(rest.strip().lstrip(":*_#")):
        nxt = _NON_SPACE.search(text, line_end)
        if nxt is None:
            return None
        display = _display_after(text, nxt.start())
        if display is not None:
            return _read_display(text[display[0] : display[1]]) if display[1] - display[0] <= _MAX_STATEMENT else None
        end = text.find("\n", nxt.start())
        rest = text[nxt.start() : len(text) if end < 0 else end]
    return _read_statement(rest)


def extract_gsm8k(text: str) -> str | None:
    """What follows the last `####`, with thousands separators removed (`1,000` -> `1000`)."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    ans = text[idx + 4 :].strip().splitlines()
    if not ans or not ans[0].strip():
        return None
    value = ans[0].strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", value)


def _last_line(text: str) -> str:
    text = text.rstrip()
    return text[text.rfind("\n") + 1 :]


def extract_last_statement(text: str) -> str | None:
    """The value of the text's last sentence when that sentence holds exactly one: a displayed
    formula that ends the text (`\\[ 3 + 4 = 7 \\]` -> `7`), else the last sentence of the last
    line, which is taken whole when it is only math (`**42**`, `\\frac{1}{2}`), else read after its
    last `=` or verb ("so 48 + 24 = 72 clips." -> `72`) when that part has one math
    span (`$\\frac{1}{3}$`, read whole) or one number in it. None when there are several
    ("2,001,000 terms of (x+y+z)^1999": not a guess between them)."""
    tail = text.rstrip().rstrip(".").rstrip()
    for close, opener in (("\\]", "\\["), ("$$", "$$")):
        if tail.endswith(close):
            start = tail.rfind(opener, 0, len(tail) - len(close))
            if start >= 0 and len(tail) - start <= _MAX_STATEMENT:
                content = _rhs(tail[start + len(opener) : len(tail) - len(close)])
                return content if content and not content.endswith("=") else None
            return None
    line = _CALC.sub("", _last_line(text))
    if len(line) > 2000:
        return None
    bare = _strip_wrapping(line).strip("$").strip()
    if len(bare) <= 100 and _ALNUM.search(bare) and "&" not in bare and not _WORD.search(bare):
        # A last line that is only math (`**42**`, `= 42`, `\frac{1}{2}`, an answer column): whole.
        return _rhs(bare) or None
    sentence = _last_sentence(line)
    blank = _blank(sentence, _math_spans(sentence))
    if "\\" in blank:
        return None  # LaTeX outside any delimiter (`&= -\frac83 \end{align*}`): no plain reading
    return _one_value(sentence, blank)


def _one_value(sentence: str, blank: str) -> str | None:
    """The one value of a sentence of prose (`blank`: the sentence with its math blanked), read
    after its last `=`, verb or clause break, else in the whole sentence: a number, or the
    content of a math span (its right side). None for none, or for several: no guess."""
    cut = max((m.end() for m in _SPLIT.finditer(blank)), default=0)
    for part in (sentence[cut:], sentence) if cut else (sentence,):
        spans = _math_spans(part)
        numbers = _BARE_NUMBER.findall(_blank(part, spans))
        if len(spans) + len(numbers) == 1:
            if numbers:
                return numbers[0]
            _, _, c, d = spans[0]
            return _rhs(part[c:d]) or None
        if spans or numbers:
            return None  # several values: no guess between them
    return None


def extract_last_number(text: str) -> str | None:
    """The last number (integer, decimal, `a/b`; sign and thousands separators allowed) on the
    last non-empty line. Lenient and often wrong on prose (a year, an exponent, the 3 of
    `\\frac{1}{3}`), so not among the default methods; opt in with `curate.verify.methods`."""
    nums = _NUMBER.findall(_last_line(text))
    return nums[-1] if nums else None


EXTRACTION_METHODS: dict[str, Callable[[str], str | None]] = {
    "boxed": extract_boxed,
    "answer_is": extract_answer_is,
    "gsm8k": extract_gsm8k,
    "last_statement": extract_last_statement,
    "last_number": extract_last_number,
}
"""Extraction methods by the name `curate.verify.methods` uses, tried in the configured order."""

DEFAULT_METHODS = ("boxed", "answer_is", "gsm8k", "last_statement")


def _extract_from(text: str, methods: Sequence[str]) -> str | None:
    for name in methods:
        if name == "boxed" and _box_spans(text):
            # A response that opens a box commits to it: a truncated last box is no answer, not
            # an invitation to pick some other number from the text.
            return _clean(extract_boxed(text))
        ans = _clean(EXTRACTION_METHODS[name](text))
        if ans is not None:
            return ans
    return None


def extract_answer(
    response: str,
    reasoning: str | None = None,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    use_reasoning: bool = False,
) -> str | None:
    """The final answer of a model output, or None.

    Only `response` (the text after `</think>`) counts; `reasoning` is searched only when
    `use_reasoning` is set and the response has no answer (a thinking model that ran out of
    budget may have stated it only there). Methods are tried in order (`EXTRACTION_METHODS`)."""
    for name in methods:
        if name not in EXTRACTION_METHODS:
            raise ValueError(f"unknown extraction method {name!r}; known: {', '.join(EXTRACTION_METHODS)}")
    ans = _extract_from(response or "", methods)
    if ans is None and use_reasoning and reasoning:
        ans = _extract_from(reasoning, methods)
    return ans


ANSWER_EXTRACTORS = {
    "none": lambda s: s.strip() if s.strip() else None,
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "auto": extract_answer,
}
