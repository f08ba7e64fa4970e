"""Text normalisation for dedup and decontamination: pure functions on strings.

Two copies of the same problem should normalise to the same string even when one was
re-typed: different case, whitespace, punctuation, unicode quotes and dashes, LaTeX markup
(`\\frac{a}{b}` vs `a/b`, `$`, `\\left(`, `\\cdot`, `^{2}` vs `^2`, `\\text{..}`), number
formatting (`1,000` vs `1000`, `5.0` vs `5`, `five` vs `5`) and the instruction wrappers that
prompt templates put around a problem ("Problem:", "Please reason step by step, ...").

`normalize_text` returns a canonical string: lower case, one space between tokens, where a
token is a word, a number, or one operator/bracket character. `word_tokens` returns only the
words and numbers of it (operators dropped), the unit of word n-grams: LaTeX rewrites change
operators (`\\cdot` -> `*`, implicit products) far more often than they change words.
"""

from __future__ import annotations

import re
import unicodedata

# ----------------------------------------------------------------------------- instruction wrappers

# Applied case-insensitively to the NFKC text before anything else, repeatedly (templates nest:
# "Question: Solve the following math problem. ..."). Each must be anchored at the start or the
# end so text in the middle of a problem is never removed.
_PREFIXES = [
    r"(?:solve|answer) the following (?:math(?:ematics|ematical)? )?(?:problem|question)s?"
    r"(?: (?:efficiently and clearly|step[- ]by[- ]step|carefully))?\s*[.:]?",
    r"(?:here is|consider) (?:a|the following) (?:math )?(?:problem|question)\s*[.:]?",
    r"(?:problem|question|q|task|exercise)\s*(?:\d+\s*)?[:.)]",
    r"(?:user|human)\s*:",
]
_SUFFIXES = [
    r"please reason step by step,? and put your final answer within \\boxed\{\}\.?",
    r"(?:please )?put your final answer (?:with)?in \\boxed\{\}\.?",
    r"let'?s think step by step\.?",
    r"(?:please )?(?:reason|think|solve(?: it)?) step by step\.?",
    r"(?:please )?show your work\.?",
    r"return your final (?:response|answer) as .{0,80}$",
    r"the last line of your response should be .{0,200}$",
    r"(?:answer|solution|assistant)\s*:",
]
_PREFIX_RE = re.compile(r"^[\s*#>_]*(?:" + "|".join(_PREFIXES) + r")[\s*#_]*", re.IGNORECASE)
_SUFFIX_RE = re.compile(r"[\s*#_]*(?:" + "|".join(_SUFFIXES) + r")[\s*#_]*$", re.IGNORECASE | re.DOTALL)


_SUFFIX_HINTS = ("step", "boxed", "answer", "solution", "assistant", "work", "response", "last line")
_WINDOW = 400  # wrappers are short; searching only the ends keeps long texts cheap


def strip_instructions(text: str) -> str:
    """`text` without the instruction prefixes/suffixes prompt templates wrap around a problem.

    Stops when stripping would leave nothing (a text that is only "Question:" stays as is).
    """
    while True:
        out = _PREFIX_RE.sub("", text[:_WINDOW], count=1) + text[_WINDOW:]
        tail = out[-_WINDOW:].lower()
        if any(h in tail for h in _SUFFIX_HINTS):  # the suffix regex is the costly part
            out = out[: max(0, len(out) - _WINDOW)] + _SUFFIX_RE.sub("", out[-_WINDOW:], count=1)
        if out == text or not out.strip():
            return text
        text = out


# ----------------------------------------------------------------------------- unicode

_CHAR_MAP = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "`": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-",
        "\u2015": "-", "\u2212": "-",
        "\u00d7": " * ", "\u00b7": " * ", "\u22c5": " * ", "\u2217": " * ", "\u00f7": " / ",
        "\u2264": " <= ", "\u2265": " >= ", "\u2260": " != ", "\u00a0": " ",
    }
)


def unify_unicode(text: str) -> str:
    """NFKC (full-width forms, ligatures, superscript digits) plus quotes, dashes, and the
    unicode math operators mapped to their ASCII spelling."""
    return unicodedata.normalize("NFKC", text).translate(_CHAR_MAP)


# ----------------------------------------------------------------------------- LaTeX

_FRAC_RE = re.compile(r"\\[dtc]?frac\s*")


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """The TeX argument starting at s[i] (after spaces): `{balanced}`, a `\\command`, or one
    character. Returns (argument text, index after it), or None at the end of the string."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            if s[j] == "{":
                depth += 1
            elif s[j] == "}":
                depth -= 1
                if depth == 0:
                    return s[i + 1 : j], j + 1
        return s[i + 1 :], len(s)  # unbalanced: take the rest rather than fail
    if s[i] == "\\":
        m = re.match(r"\\[A-Za-z]+|\\.", s[i:])
        return m.group(0), i + len(m.group(0))
    return s[i], i + 1


def _frac_to_slash(s: str) -> str:
    """`\\frac{a}{b}`, `\\dfrac`, `\\tfrac`, `\\frac12` -> `a/b`; compound parts get brackets
    (`\\frac{a+b}{c}` -> `(a+b)/c`), nested fractions are rewritten inside out."""
    out = []
    pos = 0
    while True:
        m = _FRAC_RE.search(s, pos)
        if m is None:
            out.append(s[pos:])
            return "".join(out)
        num = _read_arg(s, m.end())
        den = _read_arg(s, num[1]) if num else None
        if den is None:  # `\frac` at the end of the text: nothing to rewrite
            out.append(s[pos:])
            return "".join(out)
        parts = []
        for arg in (num[0], den[0]):
            arg = _frac_to_slash(arg).strip()
            parts.append(arg if re.fullmatch(r"[\w.]+|\\[A-Za-z]+", arg) else f"({arg})")
        out.append(s[pos : m.start()])
        out.append(f" {parts[0]}/{parts[1]} ")
        pos = den[1]


# Commands whose name carries no content: their argument (if any) is kept, the name dropped.
_DROP_COMMANDS = re.compile(
    r"\\(?:text(?:bf|it|rm|sf|tt|normal)?|math(?:rm|bf|it|sf|tt|bb|cal|frak|op)?|operatorname|"
    r"mbox|hbox|emph|boldsymbol|bm|displaystyle|textstyle|scriptstyle|limits|nolimits|"
    r"left|right|big|Big|bigg|Bigg|bigl|bigr|Bigl|Bigr|biggl|biggr)(?![A-Za-z])\.?"
)
_SPACE_COMMANDS = re.compile(r"\\(?:quad|qquad|[ ,;:>]|hspace\{[^}]*\}|vspace\{[^}]*\})|~")
_OPERATOR_COMMANDS = [
    (re.compile(r"\\(?:cdot|times|ast)(?![A-Za-z])"), " * "),
    (re.compile(r"\\div(?![A-Za-z])"), " / "),
    (re.compile(r"\\(?:leq?|leqslant)(?![A-Za-z])"), " <= "),
    (re.compile(r"\\(?:geq?|geqslant)(?![A-Za-z])"), " >= "),
    (re.compile(r"\\(?:neq?)(?![A-Za-z])"), " != "),
    (re.compile(r"\\%"), " percent "),
    (re.compile(r"%"), " percent "),
    (re.compile(r"\\\$|\$"), " "),
    (re.compile(r"\\[()\[\]]"), " "),  # \( \) \[ \] math delimiters
]


def strip_latex(text: str) -> str:
    """LaTeX markup rewritten to plain text: fractions to `a/b`, `\\cdot`/`\\times` to `*`,
    `\\text{..}`/`\\mathrm{..}`/`\\left`/`\\right` dropped (argument kept), spacing commands
    (`\\!`, `\\,`, `\\quad`) removed, `$`, `\\(`, `\\[` delimiters removed, `^{2}` -> `^2`,
    other commands to their name (`\\pi` -> `pi`)."""
    if "\\" not in text and "{" not in text:  # plain text: only `$` and `%` can need work
        return text.replace("$", " ").replace("%", " percent ") if ("$" in text or "%" in text) else text
    text = re.sub(r"(?<=\d)(?:\{,\}|\\,|\\!)(?=\d{3}(?!\d))", "", text)  # 1{,}000, 1\,000
    text = text.replace("\\!", "")
    text = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", text)
    text = _SPACE_COMMANDS.sub(" ", text)
    text = _DROP_COMMANDS.sub(" ", text)
    for pat, rep in _OPERATOR_COMMANDS:
        text = pat.sub(rep, text)
    text = text.replace("\\{", "{").replace("\\}", "}")
    if "frac" in text:
        text = _frac_to_slash(text)
    text = re.sub(r"\\([A-Za-z]+)", r" \1 ", text)
    text = text.replace("\\\\", " ").replace("\\", " ")
    return re.sub(r"[{}]", " ", text)


# ----------------------------------------------------------------------------- numbers

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_VALUE = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_DECIMAL_ZEROS = re.compile(r"(?<![\d.])(\d+)\.(\d*?)0+(?!\d)")


def normalize_numbers(text: str) -> str:
    """Number formatting made canonical: thousands separators removed (`1,000` -> `1000`),
    trailing decimal zeros dropped (`5.0` -> `5`, `2.50` -> `2.5`). Number words are handled
    on tokens (`number_words_to_digits`)."""
    if "," in text:
        text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    if "." in text:
        text = _DECIMAL_ZEROS.sub(lambda m: m[1] + ("." + m[2] if m[2] else ""), text)
    return text


def number_words_to_digits(tokens: list[str]) -> list[str]:
    """Lower-case number words 0-99 to digits (`twenty five`, `twenty - five` -> `25`).
    Larger spelled numbers ("two hundred") are left alone: they are rare in problems and
    "hundred" alone is ambiguous ("hundreds of")."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        value = _WORD_VALUE.get(tokens[i])
        if value is None:
            out.append(tokens[i])
            i += 1
            continue
        if value >= 20 and value % 10 == 0:  # "twenty five" / "twenty - five"
            j = i + 2 if i + 2 < len(tokens) and tokens[i + 1] == "-" else i + 1
            unit = _WORD_VALUE.get(tokens[j]) if j < len(tokens) else None
            if unit is not None and 1 <= unit <= 9:
                out.append(str(value + unit))
                i = j + 1
                continue
        out.append(str(value))
        i += 1
    return out


# ----------------------------------------------------------------------------- tokens

# A decimal number, a run of letters (any script), or one non-space, non-word character.
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+|[^\w\s]")
_KEEP_SYMBOLS = frozenset("+-*/=<>^()[]|!")
_WORD_RE = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")


def normalize_text(text: str) -> str:
    """The canonical form of a problem text, for exact comparison and n-grams.

    Instruction wrappers stripped, NFKC + quote/dash unification, LaTeX rewritten (see
    `strip_latex`), lower case, number formatting canonical (see `normalize_numbers` and
    `number_words_to_digits`), then tokens (numbers, letter runs, and the math symbols
    `+-*/=<>^()[]|!`) joined by single spaces; other punctuation (`.,;:?'"`) is dropped. Idempotent: normalize_text(normalize_text(t)) ==
    normalize_text(t).
    """
    text = normalize_numbers(strip_latex(strip_instructions(unify_unicode(text))).lower())
    tokens = [t for t in _TOKEN_RE.findall(text) if t[0].isalnum() or t in _KEEP_SYMBOLS]
    tokens = number_words_to_digits(tokens)
    # `<=` / `>=` / `!=` survive as two tokens; join them back so exact comparison matches the
    # unicode spellings mapped above.
    return re.sub(r"([<>!]) =", r"\1=", " ".join(tokens))


def words_of_normalized(normalized: str) -> list[str]:
    """The word and number tokens of an already normalised text (operators dropped)."""
    return _WORD_RE.findall(normalized)


def word_tokens(text: str) -> list[str]:
    """The words and numbers of `normalize_text(text)`, in order: the unit of word n-grams.

    Operators and brackets are left out, so `\\frac{a+b}{c}`, `(a+b)/c` and `a + b over c`
    differ only in the word "over"."""
    return words_of_normalized(normalize_text(text))
