"""normalize_text / word_tokens: one test per transformation, mostly as "these two spellings of
the same problem normalise to the same string, and a different problem does not"."""

from __future__ import annotations

import json

import pytest
from conftest import DATA

from distill.curate.normalize import (
    normalize_numbers,
    normalize_text,
    number_words_to_digits,
    strip_instructions,
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
