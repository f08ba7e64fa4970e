"""normalize_text / word_tokens: one test per transformation, mostly as "these two spellings of
the same problem normalise to the same string, and a different problem does not". The last
tests cover scraped-text spellings (invisible characters, look-alike letters, unicode math),
including one through the decontamination index."""

from __future__ import annotations

import json
import random
import re
import sys
import time
import unicodedata

import pytest
from conftest import DATA, REPO

from distill.curate.benchmarks import BenchmarkRef, load_benchmarks
from distill.curate.decontam import BenchmarkIndex, DecontamConfig
from distill.curate.normalize import (
    normalize_numbers,
    normalize_text,
    number_words_to_digits,
    strip_instructions,
    unify_unicode,
    word_tokens,
)


def same(a: str, b: str) -> bool:
    return normalize_text(a) == normalize_text(b)


def test_case_whitespace_punctuation():
    assert same("How many apples does Tom have?", "how  many\tapples\ndoes TOM have")
    assert same("Tom, Ann; and Bob: go!", "Tom Ann and Bob go!")
    assert not same("How many apples does Tom have?", "How many pears does Tom have?")


def test_unicode_quotes_dashes_nfkc():
    assert same("Tom\u2019s \u201cbig\u201d x\u2212y \u2014 done", "Tom's \"big\" x-y - done")
    assert same("\uff21\uff22\uff23 \ufb01le", "ABC file")  # full-width letters, fi ligature
    assert same("x \u2264 3 and y \u00d7 2", r"x \le 3 and y \times 2")


def test_latex_fractions():
    assert same(r"What is $\frac{1}{2}$ of 10?", "What is 1/2 of 10?")
    assert same(r"\dfrac{3}{4} + \tfrac{a}{b}", "3/4 + a/b")
    assert same(r"\frac12", "1/2")
    assert same(r"\frac{a+b}{c}", "(a+b)/c")
    assert same(r"\frac{\frac{1}{2}}{3}", "(1/2)/3")
    assert not same(r"\frac{1}{2}", "2/1")


def test_latex_delimiters_and_sizing():
    assert same(r"Find $x$ if \(x^2 = 4\).", "Find x if x^2 = 4.")
    assert same(r"\left( x + 1 \right)", "(x+1)")
    assert same(r"\[ y = 2 \]", "y = 2")


def test_latex_operators_and_text():
    assert same(r"$3 \cdot 4$", "3 * 4")
    assert same(r"$3 \times 4$", "3*4")
    assert same(r"$5\text{ cm}$ and $2\mathrm{kg}$", "5 cm and 2kg")
    assert same(r"x^{2} + y_{1}", "x^2 + y_1")
    assert same(r"a\!b\,c\;d\quad e", "ab c d e")
    assert same(r"$\pi r^2$", "pi r^2")


def test_numbers():
    assert normalize_numbers("1,000 and 12,345,678 but 1,2,3") == "1000 and 12345678 but 1,2,3"
    assert normalize_numbers("5.0 2.50 3.14 10.") == "5 2.5 3.14 10."
    assert same("He has 1,000 coins", r"He has 1{,}000 coins")
    assert same("twenty-five apples and seven pears", "25 apples and 7 pears")
    assert number_words_to_digits(["forty", "-", "two", "and", "ninety"]) == ["42", "and", "90"]
    assert not same("5 apples", "6 apples")


@pytest.mark.parametrize("wrapped", [
    "Problem: {}",
    "Question: {}\nAnswer:",
    "{}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "Solve the following math problem step by step. {}",
    "**Problem:** {}\n\nLet's think step by step.",
    "Question: Solve the following math problem efficiently and clearly. {}",
])
def test_instruction_wrappers(wrapped):
    problem = "If $x + 3 = 5$, what is $x$?"
    assert same(wrapped.format(problem), problem)


def test_wrapper_words_inside_a_problem_are_kept():
    text = "A problem: solve step by step how many ways there are."
    assert strip_instructions(text) == text
    assert strip_instructions("Question:") == "Question:"  # nothing left to strip to


def test_word_tokens_drop_operators_keep_numbers():
    assert word_tokens(r"Compute $\dbinom{8}{4} \cdot 2.5$.") == ["compute", "binom", "8", "4", "2.5"]
    assert word_tokens(r"$\frac{a+b}{c}$") == word_tokens("(a + b) / c")


def test_idempotent_on_real_benchmarks():
    texts = []
    for name in ("math500", "olympiadbench", "gsm8k"):
        with open(DATA / "benchmarks" / f"{name}.jsonl") as f:
            texts += [json.loads(line)["problem"] for line in f][:300]
    for t in texts:
        n = normalize_text(t)
        assert normalize_text(n) == n, t
        assert n == n.lower() and "  " not in n and "\\" not in n and "$" not in n



# ----------------------------------------------------------------------------- fast paths
# normalize_text is the unit of dedup, decontamination and the repetition filter, so its speed-ups
# must not move a single byte: each is checked against the plain spelling it replaced.


def _plain_unify_unicode(text: str) -> str:
    """`unify_unicode` applying every step to the whole text."""
    from distill.curate.normalize import (
        _FOLD, _GREEK_RUN_RE, _LATIN, _SCRIPT_RE, _greek, _greek_obfuscated, _obfuscated, _script,
    )
    if text.isascii():
        return text.replace("`", "'")
    text = _SCRIPT_RE.sub(_script, text)
    text = unicodedata.normalize("NFKC", text).translate(_FOLD)
    obfuscated = _obfuscated(text)
    return _GREEK_RUN_RE.sub(_greek_obfuscated if obfuscated else _greek, text.translate(_LATIN))


def _plain_number_words(tokens: list[str]) -> list[str]:
    from distill.curate.normalize import _WORD_VALUE

    out, i = [], 0
    while i < len(tokens):
        value = _WORD_VALUE.get(tokens[i])
        if value is None:
            out.append(tokens[i])
            i += 1
            continue
        if value >= 20 and value % 10 == 0:
            j = i + 2 if i + 2 < len(tokens) and tokens[i + 1] == "-" else i + 1
            unit = _WORD_VALUE.get(tokens[j]) if j < len(tokens) else None
            if unit is not None and 1 <= unit <= 9:
                out.append(str(value + unit))
                i = j + 1
                continue
        out.append(str(value))
        i += 1
    return out


def _fuzz_texts() -> list[str]:
    """Real problems and solutions, and random strings built from every piece the folds and
    regexes look at: super/subscripts, fractions, Greek and Cyrillic look-alikes, invisibles,
    combining marks, thousands separators in text and LaTeX, decimals, number words, primes."""
    texts = []
    with open(DATA / "benchmarks" / "math500.jsonl") as f:
        for line in list(f)[:200]:
            row = json.loads(line)
            texts += [row["problem"], row["solution"]]
    pieces = (list("abxyzXY0123456789 ,.`'\"$\\{}()^_-+=<>!%\n")
              + list("²³⁰⁻⁺ⁿᵃ₁₂₊½¾º˚°√∛θαβγπρχκνυιοΑΕаеосхуТЕЖ\u200b\u00ad\ufeff\u0301é٣·×÷≤≥≠∞…′″“’—−ﬁＡ１𝑥ℝ")
              + ["1,000", "2.50", "5.0", "10.", ".50", "0.000", "12,345,678", "\\,", "{,}", "\\!", "000",
                 "\\prime", "^{\\prime}", "\\frac{1}{2}", "\\cdot", "\\text{ cm}", "\\left(", "sin", "twenty",
                 "five", "ninety", "nine", " - ", "one", "Problem:", "<think>", "\\boxed{18}"])
    rng = random.Random(0)
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["".join(rng.choice(pieces) for _ in range(2000)) for _ in range(10)]
    return texts


def test_fast_paths_equal_their_plain_spellings():
    from distill.curate.normalize import (
        _DECIMAL_ZEROS, _KEEP_SYMBOLS, _LATEX_THOUSANDS, _THOUSANDS_COMMA, _TOKEN_RE, words_of_normalized,
    )
    plain_tokens = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+|[^\w\s]")
    for t in _fuzz_texts():
        assert unify_unicode(t) == _plain_unify_unicode(t), t
        assert _LATEX_THOUSANDS.sub(r"\1", t) == re.sub(r"(?<=\d)(?:\{,\}|\\,|\\!)(?=\d{3}(?!\d))", "", t), t
        assert _THOUSANDS_COMMA.sub("", t) == re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", t), t
        assert [(m.span(), m.groups()) for m in _DECIMAL_ZEROS.finditer(t)] == [
            (m.span(), m.groups()) for m in re.finditer(r"(?<![\d.])(\d+)\.(\d*?)0+(?!\d)", t)], t
        assert _TOKEN_RE.findall(t) == [x for x in plain_tokens.findall(t) if x[0].isalnum() or x in _KEEP_SYMBOLS], t
        assert word_tokens(t) == words_of_normalized(normalize_text(t)), t
    rng = random.Random(1)
    vocab = ["twenty", "five", "-", "nine", "ninety", "zero", "one", "x", "ten", "forty", "eleven"]
    for _ in range(5000):
        tokens = [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
        assert number_words_to_digits(tokens) == _plain_number_words(tokens), tokens

# ----------------------------------------------------------------------------- scraped-text folds
# Invisible characters, look-alike letters and unicode-rendered math (issue 12, item 6). Each
# spelling must normalise to what the clean / LaTeX spelling does, on both sides of decontam.

INVISIBLE = ["\u00ad", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u200e", "\u202a", "\u034f", "\ufe0f"]


@pytest.mark.parametrize("ch", INVISIBLE)
def test_invisible_characters_are_dropped(ch):
    clean = "How many positive integers less than 100 are divisible by 7?"
    dirty = f"{ch}How ma{ch}ny posi{ch}tive integ{ch}ers less th{ch}an 1{ch}00 are divi{ch}sible by 7?"
    assert normalize_text(dirty) == normalize_text(clean)
    assert unify_unicode("ap" + ch + "ple") == "apple"


def test_confusable_letters_fold_to_latin():
    # Cyrillic а е о р с у х і ѕ һ and capitals, Greek capitals and omicron: always Latin.
    assert same("Thе раrаbоlа у = х^2 раѕѕеѕ thrоugһ thе роіnt (2, 4).",
                "The parabola y = x^2 passes through the point (2, 4).")
    assert same("ΤΗΕ ΚΑΤΕ", "THE KATE")
    assert same("Find the cοmmοn rοοt", "Find the common root")
    # Greek lower-case look-alikes inside a Latin word
    assert same("mιnυtes and sρeeds", "minutes and speeds")
    # In a text already shown to be obfuscated (a Latin letter touching a Cyrillic one), Greek
    # look-alikes at a word's edge or alone are the Latin letters they imitate too.
    assert same("Dоra wαnts α rope αnd 3χ = 6", "Dora wants a rope and 3x = 6")
    assert same("Solve $w + 3 χ - 2 y = 6$ and $2 х + у = 1$", "Solve $w + 3 x - 2 y = 6$ and $2 x + y = 1$")
    # A Russian text (Cyrillic words, a Latin variable) is not obfuscated: its α stays alpha.
    assert normalize_text("Угол α равен 30, x = 2").split()[1] == "alpha"
    assert not same("Thе раrаbоlа", "The parabolas")


@pytest.mark.parametrize("unicode_form, latex", [
    ("x² + y² = 25", r"$x^2 + y^{2} = 25$"),
    ("10⁻³ and xⁿ⁺¹", r"$10^{-3}$ and $x^{n+1}$"),
    ("x₁ + x₂₃", r"$x_1 + x_{23}$"),
    ("√2 + 2√3 + ∛5", r"$\sqrt{2} + 2\sqrt{3} + \sqrt[3]{5}$"),
    ("θ = 30°, ∠ABC = 90º", r"$\theta = 30^\circ$, $\angle ABC = 90^{\circ}$"),
    ("△ABC ⊥ ∥", r"$\triangle ABC \perp \parallel$"),
    ("2πr and πr²", r"$2\pi r$ and $\pi r^2$"),
    ("ρgh, αx, ωt, sinαcosβ", r"$\rho gh$, $\alpha x$, $\omega t$, $\sin\alpha\cos\beta$"),
    ("ϑ φ ϵ ε", r"$\vartheta \varphi \epsilon \varepsilon$"),
    ("½ + 1¾", r"$\frac{1}{2} + 1\frac{3}{4}$"),
    ("a₁/2 + r₀/r", r"$\frac{a_{1}}{2} + \frac{r_0}{r}$"),
    ("3 × 4 ÷ 2 · 5", r"$3 \times 4 \div 2 \cdot 5$"),
    ("a ≤ b ≥ c ≠ d ⩽ e", r"$a \le b \geq c \neq d \leqslant e$"),
    ("x → ∞, a ± b, x ∈ ℝ", r"$x \to \infty$, $a \pm b$, $x \in \mathbb{R}$"),
    ("1, 2, …, n and 1 + ⋯ + n", r"$1, 2, \ldots, n$ and $1 + \cdots + n$"),
    ("A′B′ and f″(x)", r"$A^{\prime}B^\prime$ and $f''(x)$"),
    ("Δ and Ω and ∆ABC", r"$\Delta$ and $\Omega$ and $\triangle ABC$"),
])
def test_unicode_math_normalises_like_its_latex(unicode_form, latex):
    assert normalize_text(unicode_form) == normalize_text(latex), (normalize_text(unicode_form), normalize_text(latex))


def test_clean_math_text_with_greek_letters_is_unchanged():
    text = (r"Let $\alpha$ and $\beta$ be angles with $\sin\alpha = \frac{3}{5}$, and let "
            r"$r = 2\pi$. Find $\theta$ if $0 \le \theta < 2\pi$ and $\lambda x^{2} = \mu$.")
    assert unify_unicode(text) == text  # ASCII: nothing to fold
    assert normalize_text(text) == (
        "let alpha and beta be angles with sin alpha = 3 / 5 and let r = 2 pi find theta if "
        "0 <= theta < 2 pi and lambda x ^ 2 = mu")
    # Greek letters written in unicode in otherwise clean text are math, not look-alikes.
    assert normalize_text("Let α and β be angles, r = 2π, and γ = ρgh.") == (
        "let alpha and beta be angles r = 2 pi and gamma = rho gh")


def test_generated_copies_fold_on_real_math500():
    """The synthetic kinds of tools/contam_testset.py on every MATH-500 problem: invisible and
    look-alike copies normalise to the clean text's exact normal form; unicode-rendered math to
    the same words (the n-gram unit); operators may differ (√(x+1) keeps its brackets)."""
    sys.path.insert(0, str(REPO / "tools"))
    from contam_testset import confusable, invisible, renderable, unicode_math

    with open(DATA / "benchmarks" / "math500.jsonl") as f:
        problems = [json.loads(line)["problem"] for line in f]
    rng = random.Random(0)
    for edit, exact_share, words_share, pool in (
        (invisible, 1.0, 1.0, problems),
        (confusable, 1.0, 1.0, problems),
        (unicode_math, 0.85, 0.99, [p for p in problems if renderable(p)]),
    ):
        copies = [edit(p, rng)[0] for p in pool]
        assert sum(c != p for c, p in zip(copies, pool)) >= 0.95 * len(pool)  # the edit did something
        exact = sum(normalize_text(c) == normalize_text(p) for c, p in zip(copies, pool)) / len(pool)
        words = sum(word_tokens(c) == word_tokens(p) for c, p in zip(copies, pool)) / len(pool)
        assert exact >= exact_share and words >= words_share, (edit.__name__, exact, words)


def test_folding_is_linear_on_pathological_text():
    """Long runs of every folded kind (invisibles, super/subscripts, fractions, Greek letters in
    and out of words, Cyrillic look-alikes) and one Greek run as long as the text: 8x the text
    costs about 8x the time (quadratic would be 64x)."""
    unit = ("a" + "ρ" * 40 + "1 " + "x" + "²" * 40 + " " + "\u200b" * 40 + "½√θ∠" * 10 + " Тhе "
            + "ᵃ" * 20 + "₁" * 20 + " sinαcosα ")

    def cost(reps: int) -> float:
        text = unit * reps + "a" + "ρ" * (reps * 40) + "1"
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            normalize_text(text)
            best = min(best, time.perf_counter() - t)
        return best
    small, large = cost(50), cost(400)  # ~13k and ~104k characters
    assert large / small < 20, (small, large)


def test_fewshot_wrapped_multi_edited_math500_copy_is_caught():
    """A real MATH-500 problem with look-alike letters, invisible characters and its LaTeX
    rendered as unicode, as the last question of a few-shot prompt, is found by the index; the
    same prompt without it is not."""
    ref = BenchmarkRef(name="math500", path=str(DATA / "benchmarks" / "math500.jsonl"))
    benchmarks = load_benchmarks([ref])
    index = BenchmarkIndex(benchmarks, DecontamConfig(benchmarks=[ref]))
    original = dict(benchmarks[0].items)["math500-0"]
    assert original.startswith("Convert the point $(0,3)$ in rectangular coordinates to polar")
    copy = ("\ufeffConvеrt the ρoint (0,3) in rес\u00adtangular co\u200bordinates to ρolar coordіnates.  "
            "Entеr your ans\u200dwer in the form (r,θ), wһere r > 0 and 0 ≤ θ < 2π.")
    shots = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as "
             "many clips in May. How many clips did Natalia sell altogether in April and May?\n"
             "Answer: 72\n\nQuestion: Weng earns $12 an hour for babysitting. Yesterday, she just did "
             "50 minutes of babysitting. How much did she earn?\nAnswer: 10\n\n")
    found = index.check(shots + f"Question: {copy}\nAnswer:")
    assert found is not None and not found.candidate and found.item_id == "math500-0", found
    assert index.check(shots + "Question: How many legs do 3 spiders have?\nAnswer:") is None
