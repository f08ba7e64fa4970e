"""Final-answer extraction: pure functions on strings.

Sources use these to turn a reference column into a final answer (GSM8K's `#### 72`, MATH's
`\\boxed{...}`); curation uses the same functions on model output, so a reference and a
prediction are always read the same way.

Extraction only finds the answer; it never rewrites LaTeX (the verifier normalises). The one
rewrite is dropping thousands separators from a plain number (`1,000` -> `1000`), which would
otherwise read as a tuple.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
# The model's closing statement; the last one wins, what follows it up to the end of the line is
# the answer. "Answer:" alone is too common inside a chain of thought to be anchored anywhere
# but at the start of a line.
_ANSWER_IS = re.compile(
    r"(?:(?:the\s+)?final\s+answer\s*(?:is|:)|the\s+answer\s+is|^\s*\**answer\**\s*:)\s*:?\s*\**\s*(.*)",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")


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


def _box_spans(text: str) -> list[tuple[int, int | None]]:
    """(start, end) of every box's content in order; end is None for a box never closed."""
    spans: list[tuple[int, int | None]] = []
    pos = 0
    while (m := _BOX_OPEN.search(text, pos)) is not None:
        if m.group(1) is None:
            # `\boxed 5`: LaTeX boxes one token; models mean the whole word up to a space or `$`.
            tok = re.match(r"[^\s$]+", text[m.end() :])
            if tok is None:
                spans.append((m.end(), None))
                break
            spans.append((m.end(), m.end() + tok.end()))
            pos = m.end() + tok.end()
            continue
        depth, start = 1, m.end()
        end = None
        for i in range(start, len(text)):
            c = text[i]
            if c == "{" and text[i - 1] != "\\":
                depth += 1
            elif c == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    end = i
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


def extract_answer_is(text: str) -> str | None:
    """What follows the last "The answer is" / "Final answer:" / "Answer:" (at a line start), up
    to the end of its line, without a trailing period, `$…$` or `**` bold markers."""
    last = None
    for m in _ANSWER_IS.finditer(text):
        last = m
    if last is None:
        return None
    ans = last.group(1).strip()
    # Markdown bold and a closing period wrap the answer in several orders ("**5**." / "$5$.").
    for _ in range(3):
        ans = ans.strip().rstrip(".").strip().strip("*").strip()
        if len(ans) >= 2 and ans.startswith("$") and ans.endswith("$"):
            ans = ans.strip("$").strip()
        elif ans.startswith("\\(") and ans.endswith("\\)"):
            ans = ans[2:-2].strip()
    return ans or None


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


def extract_last_number(text: str) -> str | None:
    """The last number (integer, decimal, `a/b`; sign and thousands separators allowed) on the
    last non-empty line: a last resort for answers stated without any marker."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    nums = _NUMBER.findall(lines[-1])
    return nums[-1] if nums else None


EXTRACTION_METHODS: dict[str, Callable[[str], str | None]] = {
    "boxed": extract_boxed,
    "answer_is": extract_answer_is,
    "gsm8k": extract_gsm8k,
    "last_number": extract_last_number,
}
"""Extraction methods by the name `curate.verify.methods` uses, tried in the configured order."""

DEFAULT_METHODS = ("boxed", "answer_is", "gsm8k", "last_number")


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
