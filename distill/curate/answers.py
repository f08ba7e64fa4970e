"""Final-answer extraction: pure functions on strings.

Sources use these to turn a reference column into a final answer (GSM8K's `#### 72`, MATH's
`\\boxed{...}`); curation uses the same functions on model output, so a reference and a
prediction are always read the same way.
"""

from __future__ import annotations

import re

_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


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


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` or `\\fbox{…}`, braces balanced (nested braces kept)."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    best = text[start:i].strip()
                    break
    return best


ANSWER_EXTRACTORS = {
    "none": lambda s: s.strip() if s.strip() else None,
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
}
