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
from itertools import compress

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
#
# Scraped web text spells the same problem with characters a re-typist never would: invisible
# format characters inside words (soft hyphens from hyphenation, zero-width spaces/joiners, word
# joiners, BOMs), letters from other scripts that look like Latin ones, and math rendered to
# unicode (x², √2, θ, ½, 30°) instead of its LaTeX source. `unify_unicode` folds all of it to
# the spelling `strip_latex` gives the LaTeX source, so `x²`, `x^2` and `x^{2}` end as the same
# tokens on the benchmark side and on the candidate side alike.

_CHAR_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "`": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-",
    "\u2015": "-", "\u2212": "-",
    "\u00d7": " * ", "\u00b7": " * ", "\u22c5": " * ", "\u2217": " * ", "\u2219": " * ", "\u00f7": " / ",
    "\u2264": " <= ", "\u2265": " >= ", "\u2260": " != ", "\u00a0": " ",
    "\u2266": " <= ", "\u2267": " >= ", "\u2a7d": " <= ", "\u2a7e": " >= ",
    "\u2044": "/", "\u2215": "/",  # fraction slash, division slash
    # Unicode math symbols -> the word `strip_latex` leaves for their LaTeX command (`\sqrt{2}`
    # -> "sqrt 2", `30^\circ` -> "30 ^ circ", `\angle ABC` -> "angle abc").
    "\u221a": " sqrt ", "\u221b": " sqrt[3] ", "\u221c": " sqrt[4] ",
    "\u00b0": " ^ circ ", "\u2218": " circ ", "\u2220": " angle ", "\u2221": " measuredangle ",
    "\u25b3": " triangle ", "\u25b5": " triangle ", "\u2206": " triangle ",  # "∆ABC" is a triangle
    "\u221e": " infty ", "\u00b1": " pm ", "\u2213": " mp ", "\u22a5": " perp ", "\u2225": " parallel ",
    "\u2208": " in ", "\u2209": " notin ", "\u220b": " ni ", "\u2282": " subset ", "\u2286": " subseteq ",
    "\u2283": " supset ", "\u2287": " supseteq ", "\u222a": " cup ", "\u2229": " cap ", "\u2205": " emptyset ",
    "\u2248": " approx ", "\u2261": " equiv ", "\u223c": " sim ", "\u2245": " cong ", "\u221d": " propto ",
    "\u2211": " sum ", "\u220f": " prod ", "\u222b": " int ", "\u2202": " partial ", "\u2207": " nabla ",
    "\u2200": " forall ", "\u2203": " exists ", "\u00ac": " neg ", "\u2227": " wedge ", "\u2228": " vee ",
    "\u2192": " to ", "\u2223": " mid ", "\u2224": " nmid ", "\u2234": " therefore ", "\u2235": " because ",
    "\u230a": " lfloor ", "\u230b": " rfloor ", "\u2308": " lceil ", "\u2309": " rceil ",
    "\u27e8": " langle ", "\u27e9": " rangle ", "\u3008": " langle ", "\u3009": " rangle ",
    "\u22ef": " ... ", "\u22ee": " ... ", "\u22f1": " ... ",
}

# Look-alike letters -> the Latin letter they imitate (a hand-made subset of Unicode's
# confusables: the Cyrillic and Greek letters that pass for Latin ones in common fonts). Greek
# capitals that look Latin are never math symbols (LaTeX has no \Alpha), nor are omicron and
# iota in practice; the other Greek letters are folded by context in `_greek` below.
_CONFUSABLES = dict(zip(
    "аеорсухѕіјԁԛԝһӏкүѵ" "АВЕКМНОРСТХУЅІЈԚԜҮӀ" "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ" "οι" "ıȷɑɡ",
    "aeopcyxsijdqwhlkyv" "ABEKMHOPCTXYSIJQWYI" "ABEZHIKMNOPTYX" "oi" "ijag",
))

# Greek lowercase letters that pass for a Latin letter. They are Latin INSIDE a Latin word
# ("mιnυtes"); alone or at a word's edge they are math (`2πr`, `ρgh`, `αx`) and become their
# LaTeX name, unless the text is obfuscated (see `_obfuscated`). ε, τ, ω are left out on purpose:
# poor look-alikes, and common math symbols (ωt, τ, ε) that must stay "omega", "tau", "epsilon".
_GREEK_LOOKALIKE = dict(zip("αγκνρυχ", "aykvpux"))
_GREEK_NAMES = dict(zip(
    "αβγδεζηθικλμνξοπρστυφχψωςΓΔΘΛΞΠΣΦΨΩ",
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi o pi rho sigma tau "
    "upsilon phi chi psi omega sigma gamma delta theta lambda xi pi sigma phi psi omega".split(),
))
# Patterns that search long texts for rare characters start with a character class, written
# `[..][..]*` rather than `[..]+`: Python's re skips ahead with a pattern's first-character set
# only when the pattern starts with a plain class, and testing every position instead costs
# ~50 ns a character (~1 ms on a 3,000-word chain of thought, per pattern).
_GREEK_RUN_RE = re.compile("[" + "".join(_GREEK_NAMES) + "][" + "".join(_GREEK_NAMES) + "]*")
_NON_ASCII_RUN = re.compile("[^\x00-\x7f][^\x00-\x7f]*")
_FOLDABLE_RUN = re.compile("[`\x80-\U0010ffff][`\x80-\U0010ffff]*")
"""Runs of the characters `_FOLD` can change: "`" and non-ASCII (it maps no other ASCII)."""

# Default-ignorable characters that are not format characters (category Cf, dropped by test):
# combining grapheme joiner, variation selectors, Hangul fillers, Khmer inherent vowels,
# Mongolian variation selectors.
_IGNORABLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x3164, 0xFFA0]
    + list(range(0xFE00, 0xFE10)) + list(range(0xE0100, 0xE01F0))
)


class _FoldTable(dict):
    """`str.translate` table, code point -> replacement, filled on first sight of a character:
    format characters (category Cf: soft hyphen, zero-width space/joiners, word joiner, BOM,
    bidi marks) and other invisibles dropped, math symbols and quotes to their ASCII spelling.
    Memoised so every text costs one pass, whatever the alphabet, and importing costs nothing
    (scanning all of Unicode for Cf takes ~0.5 s)."""

    def __missing__(self, cp: int) -> str | int:
        ch = chr(cp)
        out: str | int = "" if cp in _IGNORABLE or unicodedata.category(ch) == "Cf" else _CHAR_MAP.get(ch, cp)
        self[cp] = out
        return out


_FOLD = _FoldTable()
_LATIN = str.maketrans(_CONFUSABLES)
_CONF = "".join(_CONFUSABLES)
_CONF_RE = re.compile(f"[{_CONF}]")
_CYRILLIC_RE = re.compile("[\u0400-\u04ff]")
_ASCII_LETTER_RE = re.compile("[A-Za-z]")
_MIXED_RE = re.compile(f"[A-Za-z][{_CONF}]|[{_CONF}][A-Za-z]")


def _obfuscated(text: str) -> bool:
    """Whether `text` carries homoglyph obfuscation: a Latin letter touching a look-alike letter
    (UTS #39's mixed-script confusable; never in clean text), or look-alikes standing alone
    ("2 х + у") in a text whose letters are mostly Latin (2:1), which a Russian text (Cyrillic
    words, Latin variables) is not. There every Greek look-alike is read as the Latin letter it
    imitates, not only those inside a Latin word."""
    if _CONF_RE.search(text) is None:
        return False
    if _MIXED_RE.search(text) is not None:
        return True
    return 2 * len(_CYRILLIC_RE.findall(text)) < len(_ASCII_LETTER_RE.findall(text))


# `sinαcosβ`, `2tanα`: a function name before a Greek letter makes it math, whatever follows.
_FUNCTION_BEFORE = re.compile(r"(?:sin|cos|tan|cot|sec|csc|sinh|cosh|tanh|log|lg|ln|exp)$")


def _script_forms() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Superscript, subscript and vulgar-fraction characters -> their NFKC text, read from the
    Unicode database in the blocks that hold them (a full scan would cost ~0.2 s at import)."""
    blocks = [(0xA0, 0x100), (0x2B0, 0x370), (0x1D00, 0x1DC0), (0x2070, 0x20A0), (0x2150, 0x2190),
              (0x2C7C, 0x2C7E), (0xA69C, 0xA69E), (0xA770, 0xA771), (0xA7F0, 0xA800), (0xAB5C, 0xAB70),
              (0x10780, 0x107C0), (0x1E030, 0x1E090)]
    forms: dict[str, dict[str, str]] = {"<super>": {}, "<sub>": {}, "<fraction>": {}}
    for lo, hi in blocks:
        for cp in range(lo, hi):
            tag = unicodedata.decomposition(chr(cp)).split(" ", 1)[0]
            if tag in forms:
                forms[tag][chr(cp)] = unicodedata.normalize("NFKC", chr(cp))
    del forms["<super>"]["\u00ba"]  # º: scraped text uses it for the degree sign, handled below
    return forms["<super>"], forms["<sub>"], forms["<fraction>"]


_SUPER, _SUB, _VULGAR = _script_forms()
_DEGREE_LIKE = "\u00ba\u02da"  # º, ˚: typed for ° ("30º")
_SCRIPT_RE = re.compile(
    f"([{''.join(_SUPER)}]+)|([{''.join(_SUB)}]+)|([{''.join(_VULGAR)}])|([{_DEGREE_LIKE}])"
)


def _script(m: re.Match) -> str:
    """A superscript run -> `^` + its text (x² -> x^2, 10⁻³ -> 10^−3: `x^{-3}` ends as the same
    tokens), a subscript run -> `_` + its text, ½ -> ` 1/2 ` (so 1½ is "1 1/2", as
    `1\\frac{1}{2}`), º/˚ -> °."""
    sup, sub, frac, degree = m.groups()
    if sup:
        return "^" + "".join(_SUPER[c] for c in sup)
    if sub:
        return "_" + "".join(_SUB[c] for c in sub)
    if frac:
        return " " + _VULGAR[frac].replace("\u2044", "/") + " "
    return "\u00b0"


def _ascii_letter(s: str, i: int) -> bool:
    return 0 <= i < len(s) and s[i].isascii() and s[i].isalpha()


def _greek(m: re.Match, obfuscated: bool = False) -> str:
    """A run of Greek letters: the Latin look-alike when every letter of it has one and the run
    sits inside a Latin word, or anywhere in an `obfuscated` text (see `_obfuscated`: there "α",
    "3χ" and "αnd" are the disguised "a", "3x" and "and"); otherwise each letter's LaTeX name
    (θ -> theta, as `\\theta` normalises), so `2πr` is "2 pi r" and `ρgh` "rho gh", as their
    LaTeX sources, and so is `sinαcosβ` ("sin alpha cos beta")."""
    run, s, i, j = m[0], m.string, m.start(), m.end()
    if all(c in _GREEK_LOOKALIKE for c in run) and (obfuscated or (
            _ascii_letter(s, i - 1) and _ascii_letter(s, j) and not _FUNCTION_BEFORE.search(s, max(0, i - 4), i))):
        return "".join(_GREEK_LOOKALIKE[c] for c in run)
    return "".join(f" {_GREEK_NAMES[c]} " for c in run)


def _greek_obfuscated(m: re.Match) -> str:
    return _greek(m, obfuscated=True)


def unify_unicode(text: str) -> str:
    """NFKC (full-width forms, ligatures, math alphanumerics) plus: format characters and other
    invisibles dropped, look-alike Cyrillic/Greek letters to Latin, unicode math rendered as
    its LaTeX source normalises (superscripts/subscripts, ½, √, °, ∠, △, ×, ÷, ≤, ≥, ≠, ∞, Greek
    letters as names), quotes and dashes to ASCII. One pass per step: linear time."""
    if text.isascii():  # NFKC and every fold below are the identity on ASCII but for "`"
        return text.replace("`", "'") if "`" in text else text
    # Super/subscripts and fractions are non-ASCII and `_script` reads only its match, so the
    # rewrite runs inside the non-ASCII runs alone; likewise `str.translate` runs only on
    # what `_FOLD` can change. Same result as on the whole text, ~5x faster on mostly-ASCII
    # text (`_SCRIPT_RE`'s alternation tests every position: ~2 ms on 20k characters).
    text = _NON_ASCII_RUN.sub(lambda m: _SCRIPT_RE.sub(_script, m[0]), text)
    text = _FOLDABLE_RUN.sub(lambda m: m[0].translate(_FOLD), unicodedata.normalize("NFKC", text))
    obfuscated = _obfuscated(text)
    if _CONF_RE.search(text) is not None:  # translating is a no-op without look-alikes
        text = text.translate(_LATIN)
    return _GREEK_RUN_RE.sub(_greek_obfuscated if obfuscated else _greek, text)


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
            # `a_{1}` is as simple as `a_1` (and as `a₁` once unicode is folded): no brackets.
            simple = re.fullmatch(r"[\w.]+|\\[A-Za-z]+", arg.replace("{", "").replace("}", ""))
            parts.append(arg if simple else f"({arg})")
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


_VARIANT_RE = re.compile(r"\\var(epsilon|theta|phi|pi|rho|sigma|kappa)(?![A-Za-z])")
_PRIME_RE = re.compile(r"\^\s*\{(?:\s*\\prime(?![A-Za-z]))+\s*\}|\^?\s*\\prime(?![A-Za-z])")
_DOTS_RE = re.compile(r"\\(?:[clvd]?dots[cbimo]?|ldots|cdots)(?![A-Za-z])")
_COMMAND_RE = re.compile(r"\\([A-Za-z]+)")
# The digit is matched, not looked behind for, so re can skip to digits (see `_GREEK_RUN_RE`).
_LATEX_THOUSANDS = re.compile(r"(\d)(?:\{,\}|\\,|\\!)(?=\d{3}(?!\d))")


def strip_latex(text: str) -> str:
    """LaTeX markup rewritten to plain text: fractions to `a/b`, `\\cdot`/`\\times` to `*`,
    `\\text{..}`/`\\mathrm{..}`/`\\left`/`\\right` dropped (argument kept), spacing commands
    (`\\!`, `\\,`, `\\quad`) removed, `$`, `\\(`, `\\[` delimiters removed, `^{2}` -> `^2`,
    `\\vartheta` -> `\\theta` (likewise epsilon, phi, pi, rho, sigma, kappa), `\\dots` and
    `\\cdots` -> `...`, `^{\\prime}` -> `'`, other commands to their name (`\\pi` -> `pi`)."""
    if "\\" not in text and "{" not in text:  # plain text: only `$` and `%` can need work
        return text.replace("$", " ").replace("%", " percent ") if ("$" in text or "%" in text) else text
    text = _LATEX_THOUSANDS.sub(r"\1", text)  # 1{,}000, 1\,000
    text = text.replace("\\!", "")
    text = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", text)
    # Variant glyphs are one letter to a reader, and unicode renders both the same way (ϑ and θ
    # are one letter after NFKC): `\vartheta` -> `\theta`, `\varnothing` -> `\emptyset`.
    # Ellipses become "..." as typed (and as `…` after NFKC).
    text = _VARIANT_RE.sub(r"\\\1", text).replace("\\varnothing", "\\emptyset")
    text = _DOTS_RE.sub(" ... ", text)
    if "\\prime" in text:  # `A^{\prime}` / `A^\prime` -> `A'`, as typed and as `A′` renders
        text = _PRIME_RE.sub(lambda m: "'" * m[0].count("prime"), text)
    text = _SPACE_COMMANDS.sub(" ", text)
    text = _DROP_COMMANDS.sub(" ", text)
    for pat, rep in _OPERATOR_COMMANDS:
        text = pat.sub(rep, text)
    text = text.replace("\\{", "{").replace("\\}", "}")
    if "frac" in text:
        text = _frac_to_slash(text)
    # A function, not the template r" \1 ": Python 3.11 expands templates in Python per match.
    text = _COMMAND_RE.sub(lambda m: f" {m[1]} ", text)
    text = text.replace("\\\\", " ").replace("\\", " ")
    return text.replace("{", " ").replace("}", " ")


# ----------------------------------------------------------------------------- numbers

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_VALUE = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
# `\d(?<![\d.]\d)\d*` is `(?<![\d.])\d+` starting with a digit class, so re can skip to digits
# (see `_GREEK_RUN_RE`); likewise the comma pattern starts with its literal.
_DECIMAL_ZEROS = re.compile(r"(\d(?<![\d.]\d)\d*)\.(\d*?)0+(?!\d)")
_THOUSANDS_COMMA = re.compile(r",(?<=\d,)(?=\d{3}(?!\d))")


def normalize_numbers(text: str) -> str:
    """Number formatting made canonical: thousands separators removed (`1,000` -> `1000`),
    trailing decimal zeros dropped (`5.0` -> `5`, `2.50` -> `2.5`). Number words are handled
    on tokens (`number_words_to_digits`)."""
    if "," in text:
        text = _THOUSANDS_COMMA.sub("", text)
    if "." in text:
        text = _DECIMAL_ZEROS.sub(lambda m: m[1] + ("." + m[2] if m[2] else ""), text)
    return text


def number_words_to_digits(tokens: list[str]) -> list[str]:
    """Lower-case number words 0-99 to digits (`twenty five`, `twenty - five` -> `25`).
    Larger spelled numbers ("two hundred") are left alone: they are rare in problems and
    "hundred" alone is ambiguous ("hundreds of")."""
    # Only the number words are visited; the tokens between them are copied as slices. Found
    # in C (compress/map), this costs ~1/3 of a Python loop over every token (a chain of
    # thought has ~4,000 tokens and a few dozen number words).
    hits = compress(range(len(tokens)), map(_WORD_VALUE.__contains__, tokens))
    out: list[str] = []
    done = 0  # tokens[:done] are consumed
    for i in hits:
        if i < done:  # the unit of a "twenty five" already read
            continue
        out.extend(tokens[done:i])
        value = _WORD_VALUE[tokens[i]]
        done = i + 1
        if value >= 20 and value % 10 == 0:  # "twenty five" / "twenty - five"
            j = i + 2 if i + 2 < len(tokens) and tokens[i + 1] == "-" else i + 1
            unit = _WORD_VALUE.get(tokens[j]) if j < len(tokens) else None
            if unit is not None and 1 <= unit <= 9:
                value += unit
                done = j + 1
        out.append(str(value))
    out.extend(tokens[done:])
    return out


# ----------------------------------------------------------------------------- tokens

# A decimal number, a run of letters (any script), or one of the kept math symbols; other
# punctuation is skipped by the scan rather than matched and filtered out.
_KEEP_SYMBOLS = frozenset("+-*/=<>^()[]|!")
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+|[" + re.escape("".join(sorted(_KEEP_SYMBOLS))) + "]")
_WORD_RE = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")


def normalize_text(text: str) -> str:
    """The canonical form of a problem text, for exact comparison and n-grams.

    Instruction wrappers stripped, NFKC + quote/dash unification, LaTeX rewritten (see
    `strip_latex`), lower case, number formatting canonical (see `normalize_numbers` and
    `number_words_to_digits`), then tokens (numbers, letter runs, and the math symbols
    `+-*/=<>^()[]|!`) joined by single spaces; other punctuation (`.,;:?'"`) is dropped. Idempotent: normalize_text(normalize_text(t)) ==
    normalize_text(t).
    """
    # `<=` / `>=` / `!=` survive as two tokens; join them back so exact comparison matches the
    # unicode spellings mapped above.
    return re.sub(r"([<>!]) =", r"\1=", " ".join(_tokens(text)))


def _tokens(text: str) -> list[str]:
    """The tokens `normalize_text` joins: words, numbers and the kept operators, in order."""
    text = normalize_numbers(strip_latex(strip_instructions(unify_unicode(text))).lower())
    return number_words_to_digits(_TOKEN_RE.findall(text))


def words_of_normalized(normalized: str) -> list[str]:
    """The word and number tokens of an already normalised text (operators dropped)."""
    return _WORD_RE.findall(normalized)


def word_tokens(text: str) -> list[str]:
    """The words and numbers of `normalize_text(text)`, in order: the unit of word n-grams.

    Operators and brackets are left out, so `\\frac{a+b}{c}`, `(a+b)/c` and `a + b over c`
    differ only in the word "over"."""
    # Equal to words_of_normalized(normalize_text(text)): each word token is one `_WORD_RE`
    # match and the `<=` join touches only operators. Taking them from the token list saves
    # joining and re-scanning the text (~1 ms on a 3,000-word chain of thought).
    return [t for t in _tokens(text) if t not in _KEEP_SYMBOLS]
